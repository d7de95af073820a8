"""What the tokenizer's own chat template is: its family, its end-of-turn tokens, its default system prompt.

The family is read from the Jinja text and the tokenizer's special tokens, never from the model's
hub name: a fine-tune of "Llama" with a ChatML template is ChatML. Each family has an Ollama
TEMPLATE in `modelfiles/<family>.tmpl` (package `cpt_kit.modelfiles`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from cpt_kit.errors import ExportError

# family -> markers that must all appear in the Jinja text (checked in this order).
FAMILY_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("phi3", ("<|assistant|>", "<|end|>")),
    ("mistral", ("[INST]", "[/INST]")),
)
# Token strings that end a turn in the families above (used only when the tokenizer knows them).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
FAMILIES = tuple(name for name, _ in FAMILY_MARKERS) + ("completion",)
_SENTINEL = "\x00CPTKIT-SYSTEM\x00"


@dataclass
class ChatTemplateInfo:
    """The outcome of inspecting a tokenizer for the Modelfile."""

    family: str
    """chatml, llama3, gemma, phi3, mistral, completion, or "file" for a user-supplied template."""
    template: str
    """The Ollama (Go text/template) TEMPLATE text."""
    stops: list[str]
    """End-of-turn strings, one `PARAMETER stop` each."""
    default_system: Optional[str] = None
    """A system prompt the Jinja inserts when the conversation has none (becomes SYSTEM)."""
    bos_in_template: bool = False
    """True when the Jinja writes bos_token itself (Ollama's runner adds BOS instead)."""
    notes: list[str] = field(default_factory=list)


def jinja_text(tokenizer: Any) -> Optional[str]:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def detect_family(template_text: Optional[str]) -> str:
    """The family whose markers all appear in the Jinja text."""
    if not template_text:
        return "completion"
    for family, markers in FAMILY_MARKERS:
        if all(m in template_text for m in markers):
            return family
    raise ExportError(
        "the tokenizer's chat template matches none of the known families "
        f"({', '.join(FAMILIES[:-1])})", where="export.modelfile.template",
        hint="set export.modelfile.template to a family name or to a file with an Ollama Go TEMPLATE "
             "that renders like the tokenizer's chat template")


def load_template(family: str) -> str:
    """The TEMPLATE text of a family (a file in cpt_kit.modelfiles), without the file's final newline."""
    try:
        text = resources.files("cpt_kit.modelfiles").joinpath(f"{family}.tmpl").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        text = (Path(__file__).resolve().parents[2] / "modelfiles" / f"{family}.tmpl").read_text(encoding="utf-8")
    return text.rstrip("\n")


def adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizer(text) puts BOS first (transformers 5 no longer exposes add_bos_token reliably)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def special_tokens(tokenizer: Any) -> set[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens.update(str(t) for t in decoder.values() if getattr(t, "special", False))
    return tokens


def end_of_turn_tokens(tokenizer: Any, template_text: Optional[str], eos_ids: tuple[int, ...] = ()) -> list[str]:
    """eos, every eos id of the generation config, and each known end-of-turn token the tokenizer
    has as a special token and its chat template writes."""
    stops: list[str] = []
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    for token_id in eos_ids:
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        if token:
            stops.append(token)
    known = special_tokens(tokenizer)
    for token in END_OF_TURN_TOKENS:
        if token in known and (template_text is None or token in template_text):
            stops.append(token)
    return list(dict.fromkeys(stops))


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def default_system_prompt(tokenizer: Any) -> Optional[str]:
    """The system text the Jinja inserts when a conversation has no system message, if any.

    Renders [system=SENTINEL, user] and [user]; if the second equals the first with some text in
    place of SENTINEL, that text is the default system prompt.
    """
    user = {"role": "user", "content": "Saluton!"}
    try:
        with_system = render(tokenizer, [{"role": "system", "content": _SENTINEL}, user])
        without = render(tokenizer, [user])
    except Exception:  # templates that reject a system role have no default to find
        return None
    if _SENTINEL not in with_system or with_system.replace(_SENTINEL, "") == without:
        return None
    before, after = with_system.split(_SENTINEL, 1)
    match = re.fullmatch(re.escape(before) + "(.*?)" + re.escape(after), without, flags=re.DOTALL)
    return match.group(1) if match and match.group(1) else None


def inspect_tokenizer(tokenizer: Any, choice: str = "auto", eos_ids: tuple[int, ...] = ()) -> ChatTemplateInfo:
    """Pick the TEMPLATE for `tokenizer` (choice: auto, none, a family name, or a template file path)."""
    text = jinja_text(tokenizer)
    notes: list[str] = []
    if choice == "auto":
        family = detect_family(text)
    elif choice == "none":
        family = "completion"
    elif choice in FAMILIES:
        family = choice
    elif Path(choice).is_file():
        family = "file"
    else:
        raise ExportError(f"unknown chat template {choice!r}", where="export.modelfile.template",
                          hint=f"use auto, none, one of {', '.join(FAMILIES)}, or the path of a template file")
    template = Path(choice).read_text(encoding="utf-8").rstrip("\n") if family == "file" else load_template(family)
    template = template.replace("@@eos_token@@", tokenizer.eos_token or "").replace(
        "@@bos_token@@", tokenizer.bos_token or "")
    if family == "completion":
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
        return ChatTemplateInfo(family, template, stops, notes=notes)
    stops = end_of_turn_tokens(tokenizer, text, eos_ids)
    bos_in_template = False
    if text:
        probe = render(tokenizer, [{"role": "user", "content": "Saluton!"}])
        bos_in_template = bool(tokenizer.bos_token) and probe.startswith(tokenizer.bos_token)
        bos_added = adds_bos(tokenizer)
        if bos_in_template and not bos_added:
            notes.append("the chat template writes bos_token but the tokenizer does not add BOS: "
                         "Ollama's prompt will have no BOS")
        if bos_added and not bos_in_template and tokenizer.bos_token:
            notes.append("the tokenizer adds BOS but its chat template does not write it: llama.cpp/Ollama "
                         "put BOS before chat prompts, apply_chat_template(tokenize=True) does not")
    return ChatTemplateInfo(family, template, stops, default_system_prompt(tokenizer) if text else None,
                            bos_in_template, notes)
