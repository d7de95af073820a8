"""Exact and near-duplicate detection, in compact memory.

Exact: an 8-byte blake2b hash of the cleaned text. Near: a MinHash signature (64 hash
functions over the document's shingles) and LSH banding; a document is a near duplicate when an
earlier kept document that shares a band has an estimated Jaccard similarity of at least the
threshold. Shingles are word 5-grams, or character 5-grams for short documents and scripts
written without spaces. First come, first kept: the order of the sources decides.

Memory is what bounds prepare on a large corpus, so the indexes are numpy arrays rather than
Python objects: `KeyIndex` (12 bytes per key) holds the exact hashes and the LSH band keys, and
the signatures are one uint32 matrix (256 bytes per kept document), about 320 bytes per kept
document in all (datasketch's MinHash objects and MinHashLSH sets take about 2-3 KB). The
band/row split is datasketch's optimum for the threshold. Signatures use multiply-shift
hashing (h(x) = (a*x + b) mod 2^64 >> 32, a odd): vectorised without a modulo, several times
faster than a Mersenne-prime MinHash; long documents are signed on a fixed quarter of their
shingles (SAMPLE_ABOVE). One document is remembered per band bucket: a candidate that
only collides with a dissimilar earlier bucket holder is compared with that one only.
"""

from __future__ import annotations

import hashlib
import zlib

WORD_NGRAM = 5
CHAR_NGRAM = 5
MIN_WORD_SHINGLES = 8
NUM_PERM = 64
MERGE_EVERY = 65_536
"""KeyIndex keeps this many recent keys in a dict before merging them into its sorted arrays."""
SAMPLE_ABOVE = 2048
"""Documents with more shingles are signed on the quarter of them whose hash is 0 mod 4: the same
rule for every document, so the Jaccard estimate stays unbiased, at a quarter of the work."""
SIGNATURE_COLUMNS = 8192
SIGNATURE_BLOCK = 16_384
"""Signatures are stored in blocks of this many rows (4 MB each)."""
"""Shingles hashed at once (bounds the temporary 64 x n matrix of a long document to 4 MB)."""


class KeyIndex:
    """uint64 key -> int32 value, stored in sorted numpy arrays plus a small dict of recent keys."""

    def __init__(self) -> None:
        import numpy as np

        self.keys = np.zeros(0, dtype=np.uint64)
        self.values = np.zeros(0, dtype=np.int32)
        self.recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.keys) + len(self.recent)

    def find(self, keys) -> list[int]:
        """The value of each key, -1 where it is absent."""
        import numpy as np

        pos = np.minimum(np.searchsorted(self.keys, keys), max(0, len(self.keys) - 1))
        found = np.where(self.keys[pos] == keys, self.values[pos], -1) if len(self.keys) else np.full(len(keys), -1)
        return [self.recent.get(k, v) for k, v in zip(keys.tolist(), found.tolist())]

    def add(self, keys, value: int) -> None:
        """Store `value` under keys that are not in the index yet."""
        for key in keys.tolist():
            self.recent.setdefault(key, value)
        if len(self.recent) >= MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        import numpy as np

        new_keys = np.fromiter(self.recent.keys(), dtype=np.uint64, count=len(self.recent))
        new_values = np.fromiter(self.recent.values(), dtype=np.int32, count=len(self.recent))
        order = np.argsort(new_keys)
        at = np.searchsorted(self.keys, new_keys[order])
        self.keys = np.insert(self.keys, at, new_keys[order])
        self.values = np.insert(self.values, at, new_values[order])
        self.recent.clear()


class ExactDeduper:
    def __init__(self) -> None:
        self._seen = KeyIndex()

    def is_duplicate(self, text: str) -> bool:
        """True if this text was seen before; remembers it otherwise."""
        import numpy as np

        key = np.frombuffer(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), dtype=np.uint64)
        if self._seen.find(key)[0] != -1:
            return True
        self._seen.add(key, 1)
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
    """32-bit hashes (as uint64) of the shingles of `shingles(text)`, computed with numpy (same grams, fast).

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
    """MinHash signatures and LSH band keys of the documents kept so far."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM, seed: int = 1):
        import numpy as np
        from datasketch import MinHashLSH

        self.threshold = threshold
        lsh = MinHashLSH(threshold=min(threshold, 0.99), num_perm=num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        rng = np.random.default_rng(seed)
        self._a = (rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self._b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)
        self._band_mix = rng.integers(0, 2**63, size=(1, self.rows), dtype=np.uint64) | np.uint64(1)
        self._band_salt = np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        self._signatures: list = []  # blocks of SIGNATURE_BLOCK rows: growing never copies what is there
        self.kept = 0
        self._buckets = KeyIndex()

    def signature(self, text: str):
        """uint32 MinHash signature: per hash function, the smallest hash over the shingles."""
        import numpy as np

        hashes = shingle_hashes(text)
        if len(hashes) > SAMPLE_ABOVE:  # the same quarter of every long document's shingles
            hashes = hashes[(hashes & np.uint64(3)) == 0]
        signature = np.full(len(self._a), np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(hashes), SIGNATURE_COLUMNS):
            part = (self._a * hashes[start:start + SIGNATURE_COLUMNS] + self._b) >> np.uint64(32)
            np.minimum(signature, part.min(axis=1), out=signature)
        return signature.astype(np.uint32)

    def band_keys(self, signature):
        import numpy as np

        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        return (bands * self._band_mix).sum(axis=1, dtype=np.uint64) ^ self._band_salt

    def is_duplicate(self, text: str) -> bool:
        """True if `text` nearly duplicates a kept document; otherwise it is indexed as kept."""
        import numpy as np

        signature = self.signature(text)
        keys = self.band_keys(signature)
        holders = self._buckets.find(keys)
        for row in set(holders) - {-1}:
            earlier = self._signatures[row // SIGNATURE_BLOCK][row % SIGNATURE_BLOCK]
            if np.count_nonzero(earlier == signature) >= self.threshold * len(signature):
                return True
        if self.kept % SIGNATURE_BLOCK == 0:
            self._signatures.append(np.zeros((SIGNATURE_BLOCK, len(signature)), dtype=np.uint32))
        self._signatures[-1][self.kept % SIGNATURE_BLOCK] = signature
        self._buckets.add(keys[np.array(holders) == -1], self.kept)
        self.kept += 1
        return False
