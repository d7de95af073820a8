"""Held-out split by document, deterministic, with a minimum size in tokens.

Each document gets a position u in [0, 1) from sha256(seed, text). Documents with
u < heldout_fraction are held out. The order of the corpus, the machine and the number of
threads do not matter, and adding documents never moves an existing document to the other side.

A held-out set of a few hundred tokens makes every perplexity noise (a 1% fraction of 2,473
short documents gave one block of 256 tokens). So the held-out side must hold at least
`need_tokens` tokens (prepare asks for max(data.heldout_min_blocks blocks,
data.heldout_min_tokens), by default 16 blocks and 8,192 tokens: enough blocks for a bootstrap
over blocks, and a standard error of a few percent on a perplexity: the error shrinks
with the square root of the tokens, about 3% at 8k tokens for a per-token loss spread of
2.5 nats, if tokens were independent; they are not, so that is a floor): if the fraction gives fewer,
further documents are added in u order. It never takes more than `max_share` of the corpus
tokens (data.heldout_max_share, default 10%): training text matters more. When that cap stops
it, `HeldOut.capped` is set and prepare warns that the corpus is too small for both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any


def split_position(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class HeldOut:
    mask: Any
    """numpy bool array: True for held-out documents."""
    tokens: int
    """Tokens of the held-out documents (BOS/EOS included)."""
    need_tokens: int
    capped: bool
    """The minimum was not reached because of the max_share cap."""


def choose_heldout(positions, tokens, fraction: float, need_tokens: int, max_share: float) -> HeldOut:
    """Held-out documents: u < fraction, grown in u order to `need_tokens` within `max_share` of the tokens.

    At least one document is held out and at least one is kept for training (with two or more).
    """
    import numpy as np

    positions, tokens = np.asarray(positions, dtype=np.float64), np.asarray(tokens, dtype=np.int64)
    mask = positions < fraction
    if len(positions) < 2:
        return HeldOut(np.zeros(len(positions), dtype=bool), 0, need_tokens, False)
    if not mask.any():
        mask[np.argmin(positions)] = True
    have = int(tokens[mask].sum())
    capped = False
    if have < need_tokens:
        cap = max_share * int(tokens.sum())
        rest = np.flatnonzero(~mask)
        order = rest[np.argsort(positions[rest], kind="stable")][:-1]  # keep one training document
        running = have + np.cumsum(tokens[order])
        reach = int(np.searchsorted(running, need_tokens)) + 1  # documents needed to reach need_tokens
        allowed = int(np.searchsorted(running, cap, side="right"))  # documents within the cap
        take = min(reach, allowed, len(order))
        capped = take < reach
        mask[order[:take]] = True
        have = int(tokens[mask].sum())
    return HeldOut(mask, have, need_tokens, capped)
