"""Packing: concatenate documents (each already ending in EOS) and cut fixed-length blocks.

The last partial block is dropped and its tokens counted. Blocks are saved as a `datasets`
dataset with one column `input_ids` (int64), every row exactly `block_size` ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Packed:
    blocks: Any
    """numpy int64 array of shape (n_blocks, block_size)."""
    tokens: int
    """Tokens of the documents packed (BOS/EOS included)."""
    dropped_tokens: int
    """Tokens of the last partial block, not used."""

    @property
    def n_blocks(self) -> int:
        return int(self.blocks.shape[0])


def pack(ids, indices, block_size: int) -> Packed:
    """Pack the documents `indices` (in that order) of a pyarrow list array of ids."""
    import numpy as np
    import pyarrow as pa

    if len(indices) == 0:
        return Packed(np.zeros((0, block_size), np.int64), 0, 0)
    flat = ids.take(pa.array(indices, type=pa.int64())).flatten().to_numpy(zero_copy_only=False)
    flat = flat.astype(np.int64, copy=False)
    n_blocks = len(flat) // block_size
    blocks = flat[: n_blocks * block_size].reshape(n_blocks, block_size)
    return Packed(blocks, int(len(flat)), int(len(flat) - n_blocks * block_size))


def shuffle_blocks(blocks, seed: int):
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(blocks))
    return blocks[order]


def save_blocks(blocks, path: Path) -> None:
    """Write blocks with `datasets.save_to_disk` (one column input_ids)."""
    import datasets
    import numpy as np
    import pyarrow as pa

    n, size = blocks.shape
    values = pa.array(np.ascontiguousarray(blocks).reshape(-1), type=pa.int64())
    large = n * size >= 2**31
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int64 if large else np.int32)
    array = (pa.LargeListArray if large else pa.ListArray).from_arrays(pa.array(offsets), values)
    table = pa.table({"input_ids": array})
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})
    dataset = datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(path))
    finally:
        if bars:
            datasets.enable_progress_bars()
