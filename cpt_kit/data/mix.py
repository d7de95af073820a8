"""Replay mixing: general-text blocks mixed into the training blocks against forgetting.

With a replay fraction f and T corpus blocks, about f / (1 - f) * T replay blocks are drawn
(a seeded shuffle of the replay blocks), so replay makes up about f of the training tokens.
The combined blocks are shuffled with the same seed: deterministic, and replay is spread over
the whole run rather than bunched at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpt_kit.data.pack import shuffle_blocks


@dataclass
class Mixed:
    blocks: Any
    replay_blocks: int
    wanted_replay_blocks: int

    @property
    def replay_share(self) -> float:
        return round(self.replay_blocks / max(1, len(self.blocks)), 4)


def replay_blocks_wanted(corpus_blocks: int, fraction: float) -> int:
    return max(1, round(fraction / (1 - fraction) * corpus_blocks)) if corpus_blocks else 0


def mix(corpus_blocks, replay_blocks, fraction: float, seed: int) -> Mixed:
    import numpy as np

    wanted = replay_blocks_wanted(len(corpus_blocks), fraction)
    chosen = shuffle_blocks(replay_blocks, seed)[:wanted]
    blocks = shuffle_blocks(np.concatenate([corpus_blocks, chosen]), seed + 1)
    return Mixed(blocks, int(len(chosen)), wanted)
