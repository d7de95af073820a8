"""Replay mixing: general-text blocks mixed into the training blocks against forgetting.

With a replay fraction f and T corpus blocks, about f / (1 - f) * T replay blocks are used, so
replay makes up about f of the training tokens. Both sides stream: of the R replay training
blocks, an evenly spaced subset of the wanted size is taken (it spans the whole replay text,
not only its beginning), and those blocks are interleaved evenly among the corpus blocks (so
replay is spread over the whole run rather than bunched at the end; the trainer shuffles
blocks too). Deterministic: the same inputs give the same blocks in the same order.
"""

from __future__ import annotations

from typing import Iterable, Iterator


def replay_blocks_wanted(corpus_blocks: int, fraction: float) -> int:
    return max(1, round(fraction / (1 - fraction) * corpus_blocks)) if corpus_blocks else 0


def evenly_spaced(total: int, wanted: int, start: int, count: int):
    """Bool mask over items start..start+count-1 of `total`: which belong to an evenly spaced `wanted` of them."""
    import numpy as np

    index = np.arange(start, start + count, dtype=np.int64)
    if wanted >= total:
        return np.ones(count, dtype=bool)
    return (index + 1) * wanted // total > index * wanted // total


def select_evenly(blocks: Iterable, total: int, wanted: int) -> Iterator:
    """The evenly spaced `wanted` of `total` blocks arriving in chunks (2-D arrays)."""
    seen = 0
    for chunk in blocks:
        yield chunk[evenly_spaced(total, wanted, seen, len(chunk))]
        seen += len(chunk)


class _Rows:
    """Rows drawn from an iterator of 2-D chunks."""

    def __init__(self, chunks: Iterable) -> None:
        self.chunks, self.buffer, self.at = iter(chunks), None, 0

    def take(self, n: int) -> list:
        out = []
        while n > 0:
            if self.buffer is None or self.at >= len(self.buffer):
                self.buffer, self.at = next(self.chunks, None), 0
                if self.buffer is None:
                    break
                continue
            part = self.buffer[self.at:self.at + n]
            out.append(part)
            self.at += len(part)
            n -= len(part)
        return out


def interleave(corpus: Iterable, n_corpus: int, replay: Iterable, n_replay: int, chunk: int = 1024) -> Iterator:
    """All corpus and replay blocks (2-D chunks), replay at evenly spaced positions."""
    import numpy as np

    total = n_corpus + n_replay
    corpus_rows, replay_rows = _Rows(corpus), _Rows(replay)
    for start in range(0, total, chunk):
        is_replay = evenly_spaced(total, n_replay, start, min(chunk, total - start))
        from_corpus = corpus_rows.take(int((~is_replay).sum()))
        from_replay = replay_rows.take(int(is_replay.sum()))
        if not from_corpus and not from_replay:
            return
        sample = (from_corpus or from_replay)[0]
        out = np.empty((len(is_replay), sample.shape[1]), dtype=sample.dtype)
        if from_corpus:
            out[~is_replay] = np.concatenate(from_corpus)
        if from_replay:
            out[is_replay] = np.concatenate(from_replay)
        yield out
