"""The chat-template families cpt-kit knows: for each, a real Hugging Face chat template (Jinja), the
Ollama TEMPLATE (Go text/template) that renders the same prompts, the control tokens the family needs
in the vocabulary and the tokens that end a turn.

    from cpt_kit.export.chat_families import FAMILIES, family
    chatml = family("chatml")
    tokenizer.add_special_tokens({"additional_special_tokens": list(chatml.control_tokens)})
    tokenizer.chat_template = chatml.jinja

Files: `modelfiles/<name>.jinja` and `modelfiles/<name>.tmpl` (package cpt_kit.modelfiles). In a
TEMPLATE, `@@eos_token@@` stands for the tokenizer's eos_token and `@@date_string@@` for DATE_STRING.
The Jinja texts are the models' own (sources in JINJA_SOURCES). A family without a TEMPLATE
(`go_template is None`) is recognised but cannot be exported to Ollama automatically.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from cpt_kit.errors import ExportError

DATE_STRING = "26 Jul 2024"
"""Llama-3.1/3.2 templates write "Today Date: <date>" from strftime_now; cpt-kit renders them with their
own fallback date (date_string), and the Modelfile writes the same fixed date, so training prompts and
Ollama prompts agree instead of depending on the day they were rendered."""
RENDER_KWARGS = {"date_string": DATE_STRING}
"""Extra variables for apply_chat_template wherever cpt-kit renders a chat template."""

JINJA_SOURCES = {
    "chatml": "teknium/OpenHermes-2.5-Mistral-7B (llama.cpp tests/test-chat-template.cpp)",
    "llama3": "meta-llama/Meta-Llama-3-8B-Instruct (ollama template/index.json, llama3-instruct)",
    "llama31": "meta-llama/Llama-3.2-3B-Instruct (llama.cpp models/templates)",
    "gemma": "google/gemma-3-4b-it tokenizer_config.json",
    "phi3": "microsoft/Phi-3.5-mini-instruct (llama.cpp models/templates)",
    "phi4": "microsoft/phi-4 tokenizer_config.json",
    "mistral": "mistralai/Mistral-7B-Instruct-v0.2 (llama.cpp tests/test-chat-template.cpp)",
    "llama2": "meta-llama Llama-2-chat (ollama template/index.json, llama2-chat)",
    "qa": "cpt-kit's plain-text question/answer prompt format (sft.chat_template='qa')",
}


@dataclass(frozen=True)
class ChatFamily:
    name: str
    control_tokens: tuple[str, ...]
    """Special tokens the family's prompts use (must be single tokens in the vocabulary)."""
    stop_tokens: tuple[str, ...]
    """Tokens that end an assistant turn (besides eos_token), one `PARAMETER stop` each when present."""
    has_go_template: bool = True

    @property
    def jinja(self) -> str:
        """The family's Hugging Face chat template."""
        return _read(f"{self.name}.jinja")

    @property
    def go_template(self) -> Optional[str]:
        """The Ollama TEMPLATE, with @@eos_token@@ / @@date_string@@ placeholders; None if there is none."""
        return _read(f"{self.name}.tmpl").rstrip("\n") if self.has_go_template else None


FAMILIES: dict[str, ChatFamily] = {f.name: f for f in (
    ChatFamily("chatml", ("<|im_start|>", "<|im_end|>"), ("<|im_end|>",)),
    ChatFamily("phi4", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), ("<|im_end|>",)),
    ChatFamily("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>", "<|eom_id|>")),
    ChatFamily("llama31", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("<|eot_id|>", "<|eom_id|>")),
    ChatFamily("gemma", ("<start_of_turn>", "<end_of_turn>"), ("<end_of_turn>",)),
    ChatFamily("phi3", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ("<|end|>", "<|endoftext|>")),
    ChatFamily("mistral", ("[INST]", "[/INST]"), ()),
    ChatFamily("llama2", ("[INST]", "[/INST]"), (), has_go_template=False),
    ChatFamily("qa", (), ()),  # plain-text prompt format "### Question:/### Answer:", turns end with eos_token
)}


def _read(filename: str) -> str:
    try:
        return resources.files("cpt_kit.modelfiles").joinpath(filename).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):  # running from a source tree without installing
        return (Path(__file__).resolve().parents[2] / "modelfiles" / filename).read_text(encoding="utf-8")


def family(name: str) -> ChatFamily:
    if name not in FAMILIES:
        raise ExportError(f"unknown chat template family {name!r}", where="export.modelfile.template",
                          hint=f"use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def fill_template(template: str, tokenizer) -> str:
    """A TEMPLATE with its placeholders replaced for `tokenizer`."""
    return template.replace("@@eos_token@@", tokenizer.eos_token or "").replace("@@date_string@@", DATE_STRING)
