"""BOS, decided once, on token ids and the tokenizer's own behaviour (never on string prefixes).

`bos_token` is not always a beginning-of-sequence marker: SmolLM2's is `<|im_start|>`, a role marker
its chat template writes before every turn, and its tokenizer adds nothing. What matters for
llama.cpp and Ollama is whether the tokenizer itself puts BOS first (the GGUF's add_bos_token, so the
runner adds it) and whether a rendered text's first token id is that BOS:

- the tokenizer adds BOS and the chat template writes it: the runner adds it again, so the text it
  gets must not contain it (`runner_prompt` removes it; Ollama's TEMPLATE never writes it);
- the tokenizer adds no BOS: the text is used as it is, whatever its first token is.
"""

from __future__ import annotations

from typing import Any

_PROBE = "a"


def adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizer(text) puts bos_token_id first that the text itself does not contain."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_specials = tokenizer(_PROBE)["input_ids"]
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return with_specials[:1] == [bos] and plain[:1] != [bos]


def starts_with_bos(tokenizer: Any, text: str) -> bool:
    """Whether the first token id of `text` (no special tokens added) is bos_token_id."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and bool(text) and tokenizer(text, add_special_tokens=False)["input_ids"][:1] == [bos]


def runner_prompt(tokenizer: Any, text: str) -> str:
    """`text` (a rendered chat prompt) as llama.cpp/Ollama must receive it: without a leading BOS when the
    tokenizer adds BOS itself (the runner adds it from the GGUF), unchanged otherwise."""
    if adds_bos(tokenizer) and starts_with_bos(tokenizer, text) and text.startswith(tokenizer.bos_token):
        return text[len(tokenizer.bos_token):]
    return text
