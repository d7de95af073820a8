"""Packing: concatenate documents (each already ending in EOS) and cut fixed-length blocks.

`Packer` takes the ids of documents as they stream past and returns the full blocks; the last
partial block is dropped (stats.json counts its tokens). `BlockWriter` appends blocks to a `datasets`
directory (the format `save_to_disk` writes: one Arrow file, `state.json`,
`dataset_info.json`; `load_from_disk` reads it) as they come, so no pass holds all blocks.
Blocks are one column `input_ids` (int64), every row exactly `block_size` ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

ARROW_FILE = "data-00000-of-00001.arrow"


class Packer:
    def __init__(self, block_size: int) -> None:
        import numpy as np

        self.block_size = block_size
        self.tail = np.zeros(0, dtype=np.int64)
        """Ids of the partial block so far (dropped at the end: the tokens count says how many)."""

    def add(self, flat):
        """Append a flat run of ids; returns the blocks it completes, shape (n, block_size)."""
        import numpy as np

        data = np.concatenate([self.tail, np.asarray(flat, dtype=np.int64)])
        n = len(data) // self.block_size
        self.tail = data[n * self.block_size:].copy()
        return data[: n * self.block_size].reshape(n, self.block_size)


def _features():
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))})


class BlockWriter:
    """Blocks appended to a `load_from_disk`-readable dataset directory."""

    def __init__(self, path: Path, block_size: int) -> None:
        from datasets.arrow_writer import ArrowWriter

        self.path, self.block_size, self.blocks = Path(path), block_size, 0
        self._digest = hashlib.blake2b(digest_size=16)  # content fingerprint (datasets keys its caches by it)
        self.path.mkdir(parents=True)
        self._writer = ArrowWriter(features=_features(), path=str(self.path / ARROW_FILE))

    def write(self, blocks) -> None:
        import numpy as np
        import pyarrow as pa

        if len(blocks) == 0:
            return
        flat = np.ascontiguousarray(blocks, dtype=np.int64).reshape(-1)
        self._digest.update(flat.data)
        values = pa.array(flat)
        offsets = pa.array(np.arange(0, (len(blocks) + 1) * self.block_size, self.block_size, dtype=np.int32))
        self._writer.write_table(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, values)}))
        self.blocks += len(blocks)

    def close(self) -> None:
        import datasets

        self._writer.finalize()
        self._writer.close()
        state = {"_data_files": [{"filename": ARROW_FILE}], "_fingerprint": self._digest.hexdigest(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        (self.path / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = asdict(datasets.DatasetInfo(features=_features()))
        (self.path / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2),
                                                     encoding="utf-8")

    def __enter__(self) -> "BlockWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
