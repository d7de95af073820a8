"""Documents spilled to a local Arrow file as they stream past, so no pass holds the corpus.

`collect(batches, path, seed, tokenizer=...)` writes each batch of documents (text, and token
ids when a tokenizer is given) to an Arrow IPC stream file and keeps only three numbers per
document in memory: its split position (split.split_position), its token count and its word
count. `Spilled.batches()` reads the file back batch by batch, in order (plain reads, no
memory map: a later pass touches one batch at a time). `Spilled.tokenized(...)` makes the
tokenized spill from a text-only one (after the tokenizer was extended).
"""

from __future__ import annotations

from array import array
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from cpt_kit.data.split import split_position
from cpt_kit.data.tokenize import encode_batches


@dataclass
class Spilled:
    path: Path
    seed: int
    positions: array = field(default_factory=lambda: array("d"))
    tokens: array = field(default_factory=lambda: array("q"))
    words: array = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.positions)

    def batches(self) -> Iterator[tuple[list[str], Optional[object]]]:
        """(texts, ids or None) per written batch."""
        import pyarrow as pa

        with pa.OSFile(str(self.path), "rb") as handle, pa.ipc.open_stream(handle) as reader:
            for batch in reader:
                ids = batch.column("ids") if "ids" in batch.schema.names else None
                yield batch.column("text").to_pylist(), ids

    def texts(self, keep: Callable[[int], bool] = lambda i: True) -> Iterator[str]:
        i = 0
        for texts, _ in self.batches():
            for text in texts:
                if keep(i):
                    yield text
                i += 1

    def tokenized(self, path: Path, tokenizer, num_threads: int) -> "Spilled":
        out = collect((texts for texts, _ in self.batches()), path, self.seed, tokenizer, num_threads)
        self.path.unlink()
        return out


def collect(batches: Iterable[list[str]], path: Path, seed: int, tokenizer=None, num_threads: int = 1,
            stop: Callable[[list[float], object], bool] | None = None) -> Spilled:
    """Write the batches to `path`; tokenized when `tokenizer` is given.

    stop(positions, ids) is called after each batch; returning True ends the reading there.
    """
    import numpy as np
    import pyarrow as pa

    spilled = Spilled(Path(path), seed)
    schema = pa.schema([("text", pa.large_string())] + ([("ids", pa.list_(pa.int32()))] if tokenizer else []))
    source = encode_batches(tokenizer, batches, num_threads) if tokenizer else ((b, None) for b in batches)
    with pa.OSFile(str(path), "wb") as handle, pa.ipc.new_stream(handle, schema) as writer, closing(source):
        for texts, ids in source:
            positions = [split_position(t, seed) for t in texts]
            spilled.positions.extend(positions)
            spilled.words.extend(len(t.split()) for t in texts)
            columns = [pa.array(texts, type=pa.large_string())]
            if ids is not None:
                spilled.tokens.extend(np.diff(ids.offsets.to_numpy()).astype(np.int64).tolist())
                columns.append(ids)
            writer.write_batch(pa.record_batch(columns, schema=schema))
            if stop is not None and stop(positions, ids):
                break
    return spilled
