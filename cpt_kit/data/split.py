"""Held-out split by document, deterministic: a hash of the cleaned text and the seed decides.

Each document gets a position u in [0, 1) from sha256(seed, text); documents with
u < fraction are held out. The order of the corpus, the machine and the number of processes
do not matter, and adding documents never moves an existing document to the other side.
At least one document is held out (the one with the smallest u), and `grow_to_tokens` adds
further documents in u order until the held-out side fills one packed block.
"""

from __future__ import annotations

import hashlib


def split_position(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_indices(texts: list[str], fraction: float, seed: int) -> list[int]:
    """Indices of held-out documents (sorted), at least one when there are two or more documents."""
    if len(texts) < 2:
        return []
    positions = [split_position(t, seed) for t in texts]
    held = [i for i, u in enumerate(positions) if u < fraction]
    if not held:
        held = [min(range(len(texts)), key=positions.__getitem__)]
    return sorted(held)


def grow_to_tokens(texts: list[str], held: list[int], token_counts: list[int], need_tokens: int,
                   seed: int, max_fraction: float = 0.5) -> list[int]:
    """Add documents (smallest u first) until the held-out side has `need_tokens` tokens.

    Never holds out more than `max_fraction` of the documents; returns the (sorted) indices.
    """
    chosen = set(held)
    total = sum(token_counts[i] for i in chosen)
    if total >= need_tokens:
        return sorted(chosen)
    order = sorted((i for i in range(len(texts)) if i not in chosen), key=lambda i: split_position(texts[i], seed))
    for i in order:
        if total >= need_tokens or len(chosen) + 1 > max_fraction * len(texts):
            break
        chosen.add(i)
        total += token_counts[i]
    return sorted(chosen)
