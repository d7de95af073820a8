"""Tokenizer extension for a new language: add frequent words the tokenizer splits badly.

Candidates are whole words (letter runs) that follow a space, occur at least `min_frequency`
times and take at least `min_subtokens` tokens; they are ranked by frequency x tokens saved and
the best `max_new_tokens` are added as normal (non-special) added tokens.

The SentencePiece word-boundary marker: a SentencePiece-style tokenizer (Metaspace
pre-tokenizer) turns " kato" into "▁kato" before BPE, but added tokens are matched on the raw
text first. So the new token's content is the word WITH its leading space (" kato", not
"▁kato" and not "kato"): it then matches exactly the text that "▁" + "k" + "at" + "o" covered,
the tokenization gets shorter, and decoding gives back the same text (the decoder turns "▁"
into spaces and leaves the added token's own space alone). Content without the space would
leave a lone "▁" token in front of each occurrence (no saving) and match inside other words;
"▁kato" would never match raw text at all. llama.cpp's converter writes added tokens as
USER_DEFINED pieces and also matches them on raw text, so the GGUF tokenizes the same way.

`init_ids` of a new token are the ids of the pieces it replaces (its old tokenization), so the
train stage can initialise the new embedding rows with their mean.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from cpt_kit.errors import DataError
from cpt_kit.recipe import TokenizerExtension

WORD = re.compile(r"(?<= )[^\W\d_]+")
MAX_CANDIDATES = 50_000
SAMPLE_CHARS = 20_000_000


def sample(texts: list[str], max_chars: int = SAMPLE_CHARS) -> list[str]:
    """The first documents up to max_chars characters (deterministic)."""
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def fertility(tokenizer, texts: list[str]) -> float:
    """Tokens per whitespace-separated word (special tokens not counted)."""
    if not texts:
        return 0.0
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    words = sum(len(t.split()) for t in texts)
    return round(sum(map(len, ids)) / max(1, words), 4)


def choose_tokens(tokenizer, texts: list[str], spec: TokenizerExtension) -> list[dict]:
    """The words to add, best first: {"token", "frequency", "init_ids"}."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(WORD.findall(text))
    frequent = [(w, c) for w, c in counts.most_common(MAX_CANDIDATES) if c >= spec.min_frequency]
    if not frequent:
        return []
    vocab = tokenizer.get_vocab()
    pieces = [" " + w for w, _ in frequent]
    encoded = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    scored = []
    for (word, count), piece, ids in zip(frequent, pieces, encoded):
        if len(ids) >= spec.min_subtokens and piece not in vocab:
            scored.append((count * (len(ids) - 1), word, {"token": piece, "frequency": count, "init_ids": ids}))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [entry for _, _, entry in scored[: spec.max_new_tokens]]


def extend(tokenizer, texts: list[str], spec: TokenizerExtension) -> dict:
    """Add the chosen tokens to `tokenizer` in place; returns the tokenizer_extension.json content."""
    from transformers import AddedToken

    probe = sample(texts)
    before = fertility(tokenizer, probe)
    base_vocab_size = len(tokenizer)
    chosen = choose_tokens(tokenizer, probe, spec)
    round_trips_before = _round_trips(tokenizer, probe[:200])
    tokenizer.add_tokens([AddedToken(c["token"], normalized=False, special=False, single_word=False,
                                     lstrip=False, rstrip=False) for c in chosen])
    added = [{"token": c["token"], "id": tokenizer.convert_tokens_to_ids(c["token"]),
              "init_ids": c["init_ids"], "frequency": c["frequency"]} for c in chosen]
    after = fertility(tokenizer, probe)
    broken = [i for i, (was, now) in enumerate(zip(round_trips_before, _round_trips(tokenizer, probe[:200])))
              if was and not now]
    if broken:
        raise DataError(f"the extended tokenizer no longer decodes {len(broken)} document(s) back to their text "
                        f"(first: document {broken[0]})", where="data.extend_tokenizer",
                        hint="this tokenizer's pre-tokenizer is not supported for extension; "
                             "set data.extend_tokenizer=None")
    return {"added": added, "base_vocab_size": base_vocab_size, "vocab_size": len(tokenizer),
            "fertility_before": before, "fertility_after": after,
            "sample_documents": len(probe), "settings": {"max_new_tokens": spec.max_new_tokens,
                                                         "min_frequency": spec.min_frequency,
                                                         "min_subtokens": spec.min_subtokens}}


def _round_trips(tokenizer, texts: list[str]) -> list[bool]:
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [tokenizer.decode(ids) == text for ids, text in zip(encoded, texts)]


def write_added_tokens_json(extension: dict, tokenizer_dir: Path) -> None:
    """added_tokens.json ({content: id}): where llama.cpp's SentencePiece converter looks for added tokens."""
    mapping = {a["token"]: a["id"] for a in extension["added"]}
    (Path(tokenizer_dir) / "added_tokens.json").write_text(json.dumps(mapping, ensure_ascii=False, indent=2) + "\n",
                                                           encoding="utf-8")
