"""How many tokens a run computes on (for the time estimate): from max_steps, the prepared data, or
the size of the local sources.

CPT blocks and packed SFT rows are max_seq_length long. Unpacked SFT pads each batch to its
longest row, so a row costs the expected longest of a batch: computed from the prepared rows'
lengths when data/train exists, else max_seq_length (an upper bound, and said so).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

BYTES_PER_TOKEN = 4.0
"""Rough size of a token in UTF-8 text, used only when the corpus has not been prepared yet."""


@dataclass(frozen=True)
class TokenCount:
    tokens: int | None
    """Token positions the model computes on in training (padding included); None when unknown."""
    source: str
    row_length: float
    """Positions per row (max_seq_length, or a padded batch's expected longest row)."""


def train_tokens(recipe, run_dir: Path | None) -> TokenCount:
    """Tokens the run will compute on: fixed by max_steps, else epochs x the prepared (or estimated) corpus."""
    t, max_seq = recipe.train, recipe.model.max_seq_length
    data = Path(run_dir) / "data" if run_dir else None
    row, note, lengths = float(max_seq), "", None
    if t.objective == "sft" and not t.packing:
        lengths = prepared_row_lengths(data / "train", max_seq) if data else None
        if lengths:
            row = expected_batch_longest(lengths, t.per_device_train_batch_size)
            note = (f"; batches padded to their longest row: {row:,.0f} positions per row expected from the "
                    f"{len(lengths)} rows in {data / 'train'}")
        else:
            note = ("; an upper bound: SFT batches are padded to their longest row, not to max_seq_length "
                    "(prepare the data, `cpt-kit run RECIPE --until prepare`, for a closer figure)")
    if t.max_steps > 0:
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * row
        return TokenCount(int(t.max_steps * per_step), f"train.max_steps={t.max_steps}{note}", row)
    if lengths:
        return TokenCount(int(len(lengths) * row * t.num_train_epochs),
                          f"{len(lengths)} rows x {t.num_train_epochs:g} epochs{note}", row)
    stats = data / "stats.json" if data else None
    if stats and stats.is_file():
        corpus = json.loads(stats.read_text())["train"]["tokens"]
        return TokenCount(int(corpus * t.num_train_epochs), f"{stats} x {t.num_train_epochs:g} epochs", row)
    size = 0
    for source in recipe.data.sources:
        if source.startswith("hf:"):
            return TokenCount(None, f"{source} is on the hub: its size is known after `cpt-kit run ... --until prepare`",
                              row)
        from glob import glob
        for match in glob(str(Path(source).expanduser()), recursive=True):
            p = Path(match)
            size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    if size == 0:
        return TokenCount(None, "no local corpus found to size", row)
    return TokenCount(int(size / BYTES_PER_TOKEN * t.num_train_epochs),
                      f"~{size / 1e6:.1f} MB of sources / {BYTES_PER_TOKEN:g} bytes per token x "
                      f"{t.num_train_epochs:g} epochs", row)


def prepared_row_lengths(split: Path, max_seq: int) -> list[int] | None:
    """Lengths of the rows prepare saved in `split` (a datasets folder of Arrow stream files), read
    with pyarrow alone (no datasets import: `cpt-kit plan` stays fast); None when there are none."""
    files = sorted(split.glob("*.arrow")) if split.is_dir() else []
    if not files:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths: list[int] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            table = pa.ipc.open_stream(source).read_all()
        if "input_ids" not in table.column_names:
            return None
        lengths += [min(n, max_seq) for n in pc.list_value_length(table["input_ids"]).to_pylist()]
    return lengths or None


def expected_batch_longest(lengths: list[int], batch: int) -> float:
    """Expected longest row of a batch of `batch` rows drawn at random without replacement: with the
    lengths sorted, the k-th smallest is the longest with probability C(k-1, b-1) / C(n, b)."""
    ordered, n = sorted(lengths), len(lengths)
    b = min(batch, n)
    log_all = math.lgamma(n + 1) - math.lgamma(b + 1) - math.lgamma(n - b + 1)
    return sum(length * math.exp(math.lgamma(k) - math.lgamma(b) - math.lgamma(k - b + 1) - log_all)
               for k, length in enumerate(ordered, start=1) if k >= b)
