"""One text collection of prepare (the corpus, or the replay text) after reading and tokenizing.

`Part.split(...)` decides the held-out documents (split.choose_heldout, with the recipe's
minimum), `check(...)` turns a too-small part into a DataError (and a too-small held-out set
into a warning), `blocks(...)` reads the spill back once: it yields the training blocks in
document order and writes the held-out blocks (and texts) on the way. Token and block counts
are known before packing: they are sums of the per-document token counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from cpt_kit.data.corpus import CorpusStats
from cpt_kit.data.pack import BlockWriter, Packer
from cpt_kit.data.spill import Spilled
from cpt_kit.data.split import HeldOut, choose_heldout
from cpt_kit.errors import DataError
from cpt_kit.recipe import Data


def need_heldout_tokens(d: Data, block: int) -> int:
    """Held-out minimum in tokens: whole blocks, at least heldout_min_blocks and heldout_min_tokens."""
    return max(d.heldout_min_blocks, -(-d.heldout_min_tokens // block)) * block


@dataclass
class Part:
    label: str
    key: str
    """Recipe key of its sources (for errors)."""
    read: CorpusStats
    spilled: Spilled
    held: HeldOut
    block: int
    specials_per_doc: int

    @classmethod
    def split(cls, label: str, key: str, read: CorpusStats, spilled: Spilled, fraction: float, d: Data,
              block: int, specials_per_doc: int) -> "Part":
        held = choose_heldout(spilled.positions, spilled.tokens, fraction, need_heldout_tokens(d, block),
                              d.heldout_max_share)
        return cls(label, key, read, spilled, held, block, specials_per_doc)

    @property
    def tokens(self) -> Any:
        import numpy as np

        return np.frombuffer(self.spilled.tokens, dtype=np.int64)

    @property
    def train_tokens(self) -> int:
        return int(self.tokens[~self.held.mask].sum())

    @property
    def train_blocks(self) -> int:
        return self.train_tokens // self.block

    @property
    def heldout_blocks(self) -> int:
        return self.held.tokens // self.block

    def check(self, min_train_blocks: int, max_share: float, log: Callable[[str], None]) -> None:
        block, total = self.block, int(self.tokens.sum())
        where = f"{self.label} ({len(self.spilled)} documents, {total:,} tokens)"
        if self.heldout_blocks == 0:
            raise DataError(f"{where}: the held-out documents have {self.held.tokens:,} tokens, fewer than one "
                            f"block of {block}", where=self.key, hint="add text, or lower model.max_seq_length")
        if self.train_blocks < min_train_blocks:
            raise DataError(f"{where}: the training side has {self.train_tokens:,} tokens = {self.train_blocks} "
                            f"blocks of {block}; need at least {min_train_blocks} blocks "
                            f"({min_train_blocks * block:,} tokens)", where=self.key,
                            hint="add text or lower model.max_seq_length / data.min_train_blocks")
        if self.held.capped:
            log(f"[yellow]{self.label}: the held-out set has {self.heldout_blocks} blocks ({self.held.tokens:,} "
                f"tokens), fewer than the {self.held.need_tokens // block} wanted (data.heldout_min_blocks / "
                f"heldout_min_tokens): the text is too small for that within data.heldout_max_share={max_share}. "
                "Perplexities on it are rough; add text if you can.[/yellow]")

    def blocks(self, heldout: BlockWriter, heldout_texts=None) -> Iterator:
        """Training blocks (2-D chunks) in document order; writes held-out blocks (and texts) on the way."""
        import numpy as np
        import pyarrow as pa

        train, held = Packer(self.block), Packer(self.block)
        start = 0
        for texts, ids in self.spilled.batches():
            mask = self.held.mask[start:start + len(texts)]
            start += len(texts)
            if mask.any():
                heldout.write(held.add(ids.filter(pa.array(mask)).flatten().to_numpy()))
                if heldout_texts is not None:
                    for i in np.flatnonzero(mask):
                        heldout_texts.write(json.dumps({"text": texts[i]}, ensure_ascii=False) + "\n")
            if not mask.all():
                yield train.add(ids.filter(pa.array(~mask)).flatten().to_numpy())

    def stats(self) -> dict:
        import numpy as np

        n_held = int(self.held.mask.sum())
        total, words = int(self.tokens.sum()), int(np.frombuffer(self.spilled.words, dtype=np.int64).sum())
        content = total - self.specials_per_doc * len(self.spilled)
        return {"documents": self.read.stats(),
                "split": {"train_documents": len(self.spilled) - n_held, "heldout_documents": n_held},
                "tokens": {"total": total, "train": self.train_tokens, "heldout": self.held.tokens,
                           "dropped_train_tail": self.train_tokens % self.block,
                           "dropped_heldout_tail": self.held.tokens % self.block,
                           "heldout_wanted": self.held.need_tokens},
                "blocks": {"train": self.train_blocks, "heldout": self.heldout_blocks},
                "heldout_reached_minimum": not self.held.capped,
                "words": words, "fertility": round(content / max(1, words), 4)}
