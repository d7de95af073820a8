"""Batched tokenization in worker threads: each document becomes [BOS] + tokens + [EOS].

BOS only if the tokenizer adds one itself (its post-processor puts it in front of every
encoding); EOS always, at the end of each document and nowhere else. Documents go to the Rust
tokenizer in batches of about `BATCH_CHARS` characters; `num_threads` batches are encoded at
once in threads (the Rust tokenizer releases the GIL), so reading and cleaning the next batch
overlaps with encoding, and at most `num_threads + 1` batches are in memory. Results come back
in input order as (texts, ids) with ids a pyarrow list<int32> array: no Python list per token
is kept.
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from typing import Iterable, Iterator, Optional

from cpt_kit.errors import DataError

BATCH_CHARS = 1_000_000
"""Characters of text per encode call (about 250k tokens): large enough to keep the tokenizer busy."""
BATCH_DOCS = 4096
"""At most this many documents per encode call."""


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


def with_specials(ids: list[list[int]], bos: Optional[int], eos: int):
    """pyarrow list<int32> array of [BOS] + ids + [EOS] per document, built with numpy."""
    import numpy as np
    import pyarrow as pa

    specials = 1 + (bos is not None)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths + specials, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.int32)
    content = np.ones(len(flat), dtype=bool)
    content[offsets[1:] - 1] = False
    flat[offsets[1:] - 1] = eos
    if bos is not None:
        content[offsets[:-1]] = False
        flat[offsets[:-1]] = bos
    flat[content] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))


def text_batches(texts: Iterable[str], max_chars: int | None = None) -> Iterator[list[str]]:
    """Lists of documents of about max_chars (default BATCH_CHARS) characters, at most BATCH_DOCS each."""
    max_chars, max_docs = max_chars or BATCH_CHARS, BATCH_DOCS
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_batches(tokenizer, batches: Iterable[list[str]], num_threads: int) -> Iterator[tuple[list[str], object]]:
    """(texts, ids) per batch, in order; `num_threads` batches are encoded concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    bos, eos = special_ids(tokenizer)

    def encode(texts: list[str]):
        return texts, with_specials(encode_texts(tokenizer, texts), bos, eos)

    with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="cpt-kit-tokenize") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.submit(encode, batch))
            if len(pending) > num_threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
