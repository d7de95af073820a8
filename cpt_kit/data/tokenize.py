"""Batched, multi-process tokenization: each document becomes [BOS] + tokens + [EOS].

BOS only if the tokenizer adds one itself (its post-processor puts it in front of every
encoding); EOS always, at the end of each document and nowhere else. Tokenization runs through
`datasets.Dataset.map(batched=True, num_proc=...)`; a tiny corpus uses one process because a
process pool costs more to start than it saves. The result stays in Arrow (a list array of
ids per document), so packing is a flat copy rather than a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from cpt_kit.errors import DataError

BATCH_SIZE = 1000
PARALLEL_MIN_CHARS = 4_000_000
"""Below this many characters a single process is faster than a pool."""
CHUNKS = 20
"""Large corpora are mapped in this many slices so the progress bar moves."""


@dataclass
class TokenizedDocs:
    ids: Any
    """pyarrow ListArray: the ids of each document, with BOS/EOS."""
    lengths: Any
    """numpy int64 array: tokens per document, BOS/EOS included."""
    words: Any
    """numpy int64 array: whitespace-separated words per document."""
    specials_per_doc: int
    """How many of each document's tokens are BOS/EOS (1 or 2)."""

    def content_tokens(self, indices=None) -> int:
        lengths = self.lengths if indices is None else self.lengths[indices]
        return int(lengths.sum()) - self.specials_per_doc * len(lengths)

    def fertility(self, indices=None) -> float:
        words = self.words if indices is None else self.words[indices]
        return round(self.content_tokens(indices) / max(1, int(words.sum())), 4)


def special_ids(tokenizer) -> tuple[Optional[int], int]:
    """(BOS id if the tokenizer adds it, EOS id)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so document ends cannot be marked",
                        where="model.tokenizer", hint="use a tokenizer with an eos_token (set model.tokenizer)")
    from cpt_kit.bos import adds_bos

    return (tokenizer.bos_token_id if adds_bos(tokenizer) else None), tokenizer.eos_token_id


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; straight through the Rust tokenizer when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _encode_batch(batch, tokenizer, bos: Optional[int], eos: int):
    import pyarrow as pa

    texts = batch.column("text").to_pylist()
    head, tail = ([bos] if bos is not None else []), [eos]
    ids = [head + x + tail for x in encode_texts(tokenizer, texts)]
    return pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                     "words": pa.array([len(t.split()) for t in texts], type=pa.int64())})


def tokenize_documents(texts: list[str], tokenizer, num_proc: int,
                       advance: Callable[[int], None] | None = None) -> TokenizedDocs:
    """Tokenize all documents; `advance(n_docs)` is called as slices finish (for a progress bar)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    bos, eos = special_ids(tokenizer)
    total_chars = sum(map(len, texts))
    procs = num_proc if total_chars >= PARALLEL_MIN_CHARS else 1
    slices = CHUNKS if advance is not None and total_chars >= PARALLEL_MIN_CHARS else 1
    step = max(BATCH_SIZE * (2 * procs if procs > 1 else 1), -(-len(texts) // slices))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    id_chunks, word_chunks = [], []
    try:
        for start in range(0, max(1, len(texts)), step):
            part = datasets.Dataset.from_dict({"text": texts[start:start + step]}).with_format("arrow")
            part = part.map(_encode_batch, batched=True, batch_size=BATCH_SIZE,
                            num_proc=procs if len(part) >= 2 * BATCH_SIZE else None,
                            remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer, "bos": bos, "eos": eos},
                            keep_in_memory=True, new_fingerprint=f"cpt-kit-tokenize-{start}")
            id_chunks.extend(c.cast(pa.list_(pa.int64())) for c in part.data.column("input_ids").chunks)
            word_chunks.extend(c.cast(pa.int64()) for c in part.data.column("words").chunks)
            if advance is not None:
                advance(len(part))
    finally:
        if bars:
            datasets.enable_progress_bars()
    ids = pa.chunked_array(id_chunks, type=pa.list_(pa.int64())).combine_chunks() if id_chunks \
        else pa.array([], type=pa.list_(pa.int64()))
    offsets = ids.offsets.to_numpy()
    lengths = np.diff(offsets).astype(np.int64)
    words = pa.chunked_array(word_chunks, type=pa.int64()).to_numpy() if word_chunks else np.zeros(0, np.int64)
    return TokenizedDocs(ids=ids, lengths=lengths, words=words, specials_per_doc=1 + (bos is not None))
