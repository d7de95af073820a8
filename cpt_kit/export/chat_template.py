"""What the tokenizer's own chat template is: its family, its end-of-turn tokens, its default system
prompt, and the prompt Ollama must build for a conversation.

The family is found by rendering, never from names or substrings: probe conversations are rendered
with the tokenizer's chat template and with each family's real template (cpt_kit.export.chat_families)
for the same tokenizer, and the family whose prompts are identical (as the llama.cpp runner receives
them, see cpt_kit.bos) wins. A template that inserts a default system prompt is compared with that
text as the system message (it becomes the Modelfile's SYSTEM). A fine-tune of "Llama" with a ChatML
template is ChatML; Phi-4 (ChatML with <|im_sep|>) is not ChatML; Llama-2 (<<SYS>>) is not Mistral.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cpt_kit.bos import adds_bos, runner_prompt, starts_with_bos
from cpt_kit.errors import ExportError
from cpt_kit.export.chat_families import FAMILIES, RENDER_KWARGS, family as get_family, fill_template

WHERE = "export.modelfile.template"
COMPLETION_TEMPLATE = "{{ .Prompt }}"
"""Ollama's own default TEMPLATE: the raw prompt, for models without a chat template."""
_SENTINEL = "CPTKIT_SYSTEM_SENTINEL"
SYSTEM = {"role": "system", "content": "Vi respondas \"mallonge\" kaj ĝentile."}
PROBES = {
    "one_turn": [{"role": "user", "content": "Saluton! Kiel vi fartas?"}],
    "multi_turn": [{"role": "user", "content": "Kio estas Esperanto?"},
                   {"role": "assistant", "content": "Planlingvo de 1887."},
                   {"role": "user", "content": "Kiu kreis ĝin?\nDiru mallonge."}],
    "system_multi_turn": [SYSTEM, {"role": "user", "content": "Saluton"},
                          {"role": "assistant", "content": "Saluton! Kiel mi helpu?"},
                          {"role": "user", "content": "Rakontu {{ .Prompt }} ŝercon."}],
}
"""Conversations the family detection and verify's Go-render check use (no leading/trailing spaces in
contents: several real templates trim them and Ollama's TEMPLATE cannot)."""


@dataclass
class ChatTemplateInfo:
    """The outcome of inspecting a tokenizer for the Modelfile."""

    family: str
    """A family of chat_families, "completion" (no chat template), or "file" (a user-supplied TEMPLATE)."""
    template: str
    """The Ollama (Go text/template) TEMPLATE text."""
    stops: list[str]
    """End-of-turn strings, one `PARAMETER stop` each."""
    default_system: Optional[str] = None
    """A system prompt the Jinja inserts when the conversation has none (becomes SYSTEM)."""
    notes: list[str] = field(default_factory=list)


def jinja_text(tokenizer: Any) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def render(tokenizer: Any, messages: list[dict], chat_template: Optional[str] = None, **kwargs) -> str:
    """apply_chat_template as text with the generation prompt (and cpt-kit's fixed date for Llama-3.1+)."""
    kwargs.setdefault("add_generation_prompt", True)
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                         **RENDER_KWARGS, **kwargs)


def _try_render(tokenizer: Any, messages: list[dict], chat_template: Optional[str] = None) -> Optional[str]:
    try:
        return render(tokenizer, messages, chat_template)
    except Exception:  # the template rejects this conversation (e.g. raise_exception on a system role)
        return None


def default_system_prompt(tokenizer: Any) -> Optional[str]:
    """The system text the Jinja inserts when a conversation has no system message, if any.

    Renders [system=SENTINEL, user] and [user]; if the second equals the first with some text in
    place of SENTINEL, that text is the default system prompt.
    """
    user = PROBES["one_turn"][0]
    with_system = _try_render(tokenizer, [{"role": "system", "content": _SENTINEL}, user])
    without = _try_render(tokenizer, [user])
    if with_system is None or without is None or _SENTINEL not in with_system \
            or with_system.replace(_SENTINEL, "") == without:
        return None
    before, after = with_system.split(_SENTINEL, 1)
    match = re.fullmatch(re.escape(before) + "(.*?)" + re.escape(after), without, flags=re.DOTALL)
    return match.group(1) if match and match.group(1) else None


def with_system(messages: list[dict], system: Optional[str]) -> list[dict]:
    """The conversation as Ollama sends it to the TEMPLATE: SYSTEM first unless it starts with a system message."""
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}] + list(messages)
    return list(messages)


def expected_prompt(tokenizer: Any, messages: list[dict], system: Optional[str] = None) -> Optional[str]:
    """The prompt text Ollama must build for `messages` with Modelfile SYSTEM `system`: the HF chat
    template's rendering, as the runner receives it (no BOS it adds itself). None if HF rejects it."""
    text = _try_render(tokenizer, with_system(messages, system))
    return None if text is None else runner_prompt(tokenizer, text)


def _family_prompt(tokenizer: Any, name: str, messages: list[dict]) -> Optional[str]:
    """What the family's TEMPLATE renders for `messages`, computed from its Jinja (TEMPLATEs never write BOS)."""
    jinja = FAMILIES[name].jinja
    text = _try_render(tokenizer, messages, jinja)
    if text is not None and "bos_token" in jinja and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


def matches_family(tokenizer: Any, name: str, default_system: Optional[str]) -> bool:
    """True when the tokenizer's template and family `name` give the same runner prompt on every probe
    conversation the tokenizer's template accepts (at least one)."""
    compared = 0
    for messages in PROBES.values():
        expected = expected_prompt(tokenizer, messages)
        if expected is None:
            continue
        if _family_prompt(tokenizer, name, with_system(messages, default_system)) != expected:
            return False
        compared += 1
    return compared > 0


def detect_family(tokenizer: Any) -> str:
    """The family whose real template renders like the tokenizer's own ("completion" without one)."""
    if not jinja_text(tokenizer):
        return "completion"
    default = default_system_prompt(tokenizer)
    for name in FAMILIES:
        if matches_family(tokenizer, name, default):
            return name
    if starts_with_bos(tokenizer, render(tokenizer, PROBES["one_turn"])) and not adds_bos(tokenizer):
        raise ExportError(
            f"the chat template writes bos_token {tokenizer.bos_token!r} but the tokenizer does not add BOS itself, "
            "so the GGUF says add_bos_token=false and Ollama's prompt (its TEMPLATE never writes BOS) would start "
            "without it", where=WHERE,
            hint='set "add_bos_token": true in the tokenizer (tokenizer_config.json) before training, or give '
                 "export.modelfile.template a file whose TEMPLATE writes it")
    raise ExportError(
        "the tokenizer's chat template renders like none of the known families "
        f"({', '.join(FAMILIES)}) on cpt-kit's probe conversations", where=WHERE,
        hint="set export.modelfile.template to a family name, or to a file with an Ollama Go TEMPLATE "
             "that renders like the tokenizer's chat template (verify compares the two)")


def end_of_turn_tokens(tokenizer: Any, family_name: str, eos_ids: tuple[int, ...] = ()) -> list[str]:
    """The one definition of end-of-turn tokens (Modelfile stops and verify's stop check): eos_token,
    every eos id of the generation config, and the family's stop tokens the vocabulary has as a single
    added token (special or not)."""
    stops: list[str] = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [t for t in (tokenizer.convert_ids_to_tokens(int(i)) for i in eos_ids) if t]
    added = {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    added.update(getattr(tokenizer, "all_special_tokens", []) or [])
    if family_name in FAMILIES:
        stops += [t for t in FAMILIES[family_name].stop_tokens if t in added]
    return list(dict.fromkeys(stops))


def _bos_notes(tokenizer: Any) -> list[str]:
    probe = render(tokenizer, PROBES["one_turn"])
    if adds_bos(tokenizer) and not starts_with_bos(tokenizer, probe):
        return ["the tokenizer adds BOS but its chat template does not write it: llama.cpp/Ollama put BOS "
                "before chat prompts, apply_chat_template(tokenize=True) does not"]
    return []


def inspect_tokenizer(tokenizer: Any, choice: str = "auto", eos_ids: tuple[int, ...] = ()) -> ChatTemplateInfo:
    """Pick the TEMPLATE for `tokenizer` (choice: auto, none, a family name, or a template file path)."""
    text = jinja_text(tokenizer)
    if choice in ("none", "completion") or (choice == "auto" and not text):
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
        return ChatTemplateInfo("completion", COMPLETION_TEMPLATE, stops)
    if choice == "auto":
        name = detect_family(tokenizer)
    elif choice in FAMILIES:
        name = choice
    elif Path(choice).is_file():
        name = "file"
    else:
        raise ExportError(f"unknown chat template {choice!r}", where=WHERE,
                          hint=f"use auto, none, one of {', '.join(FAMILIES)}, or the path of a template file")
    if name == "file":
        template = Path(choice).read_text(encoding="utf-8").rstrip("\n")
    else:
        go_template = get_family(name).go_template
        if go_template is None:
            raise ExportError(
                f"the chat template is the {name} family, for which cpt-kit has no Ollama TEMPLATE that renders "
                "identically", where=WHERE,
                hint="write an Ollama Go TEMPLATE for it into a file and set export.modelfile.template to that path "
                     "(verify compares its rendering with the chat template)")
        template = go_template
    template = fill_template(template, tokenizer)
    notes = _bos_notes(tokenizer) if text else []
    return ChatTemplateInfo(name, template, end_of_turn_tokens(tokenizer, name, eos_ids),
                            default_system_prompt(tokenizer) if text else None, notes)
