"""The chat template SFT trains with: the tokenizer's own, or a family from the Modelfile's table.

A base without a chat template (typical after CPT of a base model) gets the recipe's family
(`sft.chat_template`, ChatML by default) from `cpt_kit.export.chat_families`, the same table the
Modelfile's TEMPLATE comes from, so training and Ollama cannot disagree. Its
control tokens are added as special tokens (new ids; their embedding rows start as the mean of
the existing rows and are trained, see `cpt_kit.train.embeddings`), eos becomes the family's
end-of-turn token (so HF, llama.cpp and Ollama all stop there), and the pad token is made
distinct from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from cpt_kit.errors import CptKitError, DataError
from cpt_kit.recipe import Sft

PAD_TOKEN = "<|pad|>"


@dataclass
class ChatSetup:
    family: Optional[str]
    """Family of the template (None: the tokenizer's own template matches no known family)."""
    origin: str
    """"tokenizer" (its own template) or "recipe" (sft.chat_template given to the tokenizer)."""
    end_of_turn_ids: tuple[int, ...]
    """Ids that close an assistant turn; each assistant turn must train one of them."""
    added: list[dict[str, Any]] = field(default_factory=list)
    """Tokens added to the vocabulary: {"token", "id", "init": "mean", "kind"}."""
    notes: list[str] = field(default_factory=list)

    def to_json(self, tokenizer) -> dict[str, Any]:
        return {"family": self.family, "origin": self.origin,
                "end_of_turn": tokenizer.convert_ids_to_tokens(list(self.end_of_turn_ids)),
                "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
                "added_tokens": [a["token"] for a in self.added], "notes": self.notes}


def training_families() -> tuple[str, ...]:
    """Families SFT can give a base without a template: those with an Ollama TEMPLATE in the table."""
    from cpt_kit.export.chat_families import FAMILIES
    return tuple(name for name, fam in FAMILIES.items() if fam.has_go_template)


def setup_chat_template(tokenizer: Any, spec: Sft) -> ChatSetup:
    """Give `tokenizer` (in place) the chat template training uses; returns what was done."""
    from cpt_kit.export.chat_families import family
    from cpt_kit.export.chat_template import detect_family, jinja_text

    own = jinja_text(tokenizer)
    notes: list[str] = []
    base_size = len(tokenizer)
    if own and spec.chat_template == "auto":
        try:
            name: Optional[str] = detect_family(tokenizer)
        except CptKitError:
            name = None
            notes.append("the tokenizer's chat template matches no known family: set export.modelfile.template "
                         "to an Ollama TEMPLATE file that renders like it")
        setup = ChatSetup(name, "tokenizer", _end_of_turn_ids(tokenizer, name, own), notes=notes)
    else:
        name = "chatml" if spec.chat_template == "auto" else spec.chat_template
        chosen = family(name)
        if own:
            notes.append(f"the tokenizer's own chat template is replaced by {name} (sft.chat_template)")
        missing = [t for t in chosen.control_tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = chosen.jinja
        if chosen.stop_tokens:
            tokenizer.eos_token = chosen.stop_tokens[0]
        setup = ChatSetup(name, "recipe", (tokenizer.eos_token_id,), notes=notes)
    _distinct_pad(tokenizer, setup)
    for token in tokenizer.convert_ids_to_tokens(list(range(base_size, len(tokenizer)))):
        kind = "pad" if token == tokenizer.pad_token else "control"
        setup.added.append({"token": token, "id": tokenizer.convert_tokens_to_ids(token), "init": "mean", "kind": kind})
    if setup.added:
        setup.notes.append(f"added {len(setup.added)} special token(s) {[a['token'] for a in setup.added]}: their "
                           "embed_tokens/lm_head rows start as the mean of the existing rows and are trained")
    return setup


def _end_of_turn_ids(tokenizer: Any, name: Optional[str], template: str) -> tuple[int, ...]:
    """The family's end-of-turn tokens (cpt_kit.export.chat_template.end_of_turn_tokens, the Modelfile's
    stops); for an unknown family, eos and any known stop token its template writes."""
    from cpt_kit.export.chat_families import FAMILIES
    from cpt_kit.export.chat_template import end_of_turn_tokens

    if name is not None:
        tokens = end_of_turn_tokens(tokenizer, name)
    else:
        known = {t for fam in FAMILIES.values() for t in fam.stop_tokens if t in template}
        tokens = ([tokenizer.eos_token] if tokenizer.eos_token else []) + sorted(known & set(tokenizer.get_vocab()))
    if not tokens:
        raise DataError("the tokenizer has neither an EOS token nor a known end-of-turn token, so the model "
                        "could not learn to stop", where="model.tokenizer",
                        hint="use a tokenizer with an eos_token, or set sft.chat_template to a family")
    return tuple(dict.fromkeys(tokenizer.convert_tokens_to_ids(t) for t in tokens))


def _distinct_pad(tokenizer: Any, setup: ChatSetup) -> None:
    """Padding must not share an id with EOS/end-of-turn (a pad-masking collator would then mask the
    very token that teaches the model to stop): use unk when there is one, else add PAD_TOKEN."""
    taken = set(setup.end_of_turn_ids) | {tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in taken:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in taken:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    setup.notes.append(f"pad token set to {tokenizer.pad_token!r} (distinct from the end-of-turn token)")


def prompt_adds_bos(tokenizer: Any, rendered: str) -> bool:
    """Whether tokenizing the rendered text should let the tokenizer add BOS: not when the template
    wrote BOS itself (it would be there twice), as llama.cpp/Ollama's runner does."""
    return not (tokenizer.bos_token and rendered.startswith(tokenizer.bos_token))
