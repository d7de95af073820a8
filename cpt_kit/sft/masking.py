"""Assistant-only labels computed from the rendered chat template, at token level.

For a conversation the template renders the whole text once. For each assistant turn i it also
renders the conversation up to turn i with the generation prompt (where the assistant's text
starts) and up to and including turn i (where it ends, after its end-of-turn token); both must
be prefixes of the whole text, which is how any template that can serve a chat behaves. The
tokenizer's offset mapping then says, token by token, which tokens lie in an assistant span:
those are trained (label = id), everything else (system and user turns, the generation prompt
such as `<|im_start|>assistant\\n`, BOS, whitespace after an end-of-turn token) is -100. No
decoded-text search is involved, so `[INST]`-style templates and tokens that merge across a
boundary are handled the same way.

Each assistant span must train at least one end-of-turn id (`ChatSetup.end_of_turn_ids`), or
the model never learns to stop; the example's origin (file:line) is named otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from cpt_kit.errors import DataError

IGNORE = -100


class MaskError(DataError):
    """An example whose assistant turns cannot be trained as they are rendered."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    text: str
    """The rendered conversation (as training saw it)."""
    turns: int
    """Messages kept (fewer than the conversation had when it was truncated)."""

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def render(tokenizer: Any, messages: Sequence[dict], generation_prompt: bool, where: str) -> str:
    from cpt_kit.export.chat_families import RENDER_KWARGS

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                             **RENDER_KWARGS)
    except Exception as exc:  # the template's own raise_exception (e.g. "only user and assistant roles")
        raise MaskError(f"the chat template rejects this conversation: {exc}", where=where,
                        hint="some templates take no system message (set sft.system_prompt=None or pick another "
                             "sft.chat_template)") from None


def assistant_spans(tokenizer: Any, messages: Sequence[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant turn incl. its end-of-turn])."""
    full = render(tokenizer, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, where)
        through = render(tokenizer, messages[:i + 1], False, where).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise MaskError(f"the chat template does not render turn {i} as a prefix of the whole conversation, "
                            "so the assistant's tokens cannot be located", where=where,
                            hint="use a template that renders conversations incrementally (set sft.chat_template "
                                 "to a family such as chatml)")
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_with_labels(tokenizer: Any, messages: Sequence[dict], end_of_turn_ids: Sequence[int],
                         where: str) -> Example:
    """input_ids with labels = id inside assistant spans and -100 elsewhere; checks every span
    trains an end-of-turn id."""
    from cpt_kit.sft.templates import prompt_adds_bos

    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=prompt_adds_bos(tokenizer, text), return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    eot = set(end_of_turn_ids)
    for turn, (start, end) in enumerate(spans):
        inside = [j for j, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        for j in inside:
            labels[j] = ids[j]
        if not any(ids[j] in eot for j in inside):
            names = tokenizer.convert_ids_to_tokens(sorted(eot))
            raise MaskError(f"assistant turn {turn + 1} ends without a trained end-of-turn token ({', '.join(names)}): "
                            "the model would never learn to stop", where=where,
                            hint="the chat template must close assistant turns with the end-of-turn token; "
                                 "set sft.chat_template to a family (chatml, llama3, gemma, mistral)")
    example = Example(list(ids), labels, text, len(messages))
    if example.trained == 0:
        raise MaskError("no token of this example is trained (every label is masked)", where=where,
                        hint="check that the assistant turns have content and the template writes them")
    return example


def fit(tokenizer: Any, messages: Sequence[dict], end_of_turn_ids: Sequence[int], max_length: int,
        policy: str, where: str) -> Optional[Example]:
    """The example within max_length tokens: whole, or (policy "truncate") cut after the last
    assistant turn that still fits; None when it must be dropped. Never cuts inside a turn."""
    example = tokenize_with_labels(tokenizer, messages, end_of_turn_ids, where)
    if len(example.input_ids) <= max_length:
        return example
    if policy != "truncate":
        return None
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for stop in reversed(ends[:-1]):
        shorter = tokenize_with_labels(tokenizer, messages[:stop], end_of_turn_ids, where)
        if len(shorter.input_ids) <= max_length:
            return shorter
    return None
