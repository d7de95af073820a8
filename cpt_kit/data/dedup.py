"""Exact and near-duplicate detection.

Exact: a hash of the cleaned text. Near: MinHash signatures (datasketch) in an LSH index; a
document is a near duplicate when an earlier kept document's estimated Jaccard similarity is
at least the threshold. Shingles are word 5-grams, or character 5-grams for short documents
and scripts written without spaces. First come, first kept: the order of the sources decides.
"""

from __future__ import annotations

import hashlib
import zlib

WORD_NGRAM = 5
CHAR_NGRAM = 5
MIN_WORD_SHINGLES = 8
NUM_PERM = 64


class ExactDeduper:
    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        """True if this text was seen before; remembers it otherwise."""
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


def shingles(text: str) -> list[str]:
    """Word 5-grams, or character 5-grams when the text has too few words for them (readable form)."""
    words = text.split()
    if _word_mode(words, text):
        return sorted({" ".join(words[i:i + WORD_NGRAM]) for i in range(len(words) - WORD_NGRAM + 1)})
    flat = " ".join(words)
    return sorted({flat[i:i + CHAR_NGRAM] for i in range(max(1, len(flat) - CHAR_NGRAM + 1))})


def _word_mode(words: list, text: str) -> bool:
    return len(words) - WORD_NGRAM + 1 >= MIN_WORD_SHINGLES and len(text) < 20 * len(words)


def shingle_hashes(text: str):
    """32-bit hashes of the shingles of `shingles(text)`, computed with numpy (same grams, fast).

    Words are hashed with crc32 (stable across processes and runs), then each n-gram's hashes
    are combined with a polynomial and mixed down to 32 bits.
    """
    import numpy as np

    raw = text.encode("utf-8")
    words = raw.split()
    if _word_mode(words, text):
        units = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
        n = WORD_NGRAM
    else:
        units = np.frombuffer(b" ".join(words).decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
        units = units.astype(np.uint64)
        n = min(CHAR_NGRAM, len(units))
    if len(units) == 0:
        return np.zeros(1, dtype=np.uint64)
    count = len(units) - n + 1
    combined = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        combined = combined * np.uint64(1_000_003) + units[k:k + count]
    return np.unique((combined * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32))


class NearDeduper:
    """MinHash LSH index of the documents kept so far."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        self._lsh = MinHashLSH(threshold=min(threshold, 0.99), num_perm=num_perm)
        self._kept: dict[int, object] = {}

    def signature(self, text: str):
        m = self._template.copy()
        m.update_batch(shingle_hashes(text).tolist())
        return m

    def is_duplicate(self, key: int, text: str) -> bool:
        """True if `text` nearly duplicates a kept document; otherwise it is indexed under `key`."""
        m = self.signature(text)
        for other in self._lsh.query(m):
            if m.jaccard(self._kept[other]) >= self.threshold:
                return True
        self._lsh.insert(key, m, check_duplication=False)
        self._kept[key] = m
        return False
