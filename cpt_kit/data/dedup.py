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


def shingles(text: str) -> list[bytes]:
    """Word 5-grams, or character 5-grams when the text has too few words for them."""
    words = text.split()
    if len(words) - WORD_NGRAM + 1 >= MIN_WORD_SHINGLES and len(text) < 20 * len(words):
        grams = (" ".join(words[i:i + WORD_NGRAM]) for i in range(len(words) - WORD_NGRAM + 1))
    else:
        flat = " ".join(words)
        grams = (flat[i:i + CHAR_NGRAM] for i in range(max(1, len(flat) - CHAR_NGRAM + 1)))
    return list({g.encode("utf-8") for g in grams})


class NearDeduper:
    """MinHash LSH index of the documents kept so far."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)
        self._lsh = MinHashLSH(threshold=min(threshold, 0.99), num_perm=num_perm)
        self._kept: dict[int, object] = {}

    def signature(self, text: str):
        m = self._template.copy()
        m.update_batch(shingles(text))
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
