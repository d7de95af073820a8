"""Helpers for the train/evaluate tests: a run directory with data/ prepared, and a stage context.

Uses the real prepare stage when it exists (cpt_kit.data.prepare); otherwise packs the corpus
here the same way the stage contract describes (EOS at document ends, fixed-length blocks,
held-out split by document).
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

from rich.console import Console

from cpt_kit.manifest import Manifest
from cpt_kit.pipeline import StageContext
from cpt_kit.rundir import RunDir


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=120)


def make_ctx(recipe, run: RunDir, resume: bool = False) -> StageContext:
    return StageContext(recipe, run, Manifest.load(run.manifest), quiet_console(), "test", resume, [])


def have_prepare_stage() -> bool:
    return importlib.util.find_spec("cpt_kit.data.prepare") is not None


def prepare_data(recipe, run: RunDir, texts: list[str], replay_texts: list[str] | None = None) -> None:
    """Write data/train, data/heldout (and data/replay_heldout), data/tokenizer for `recipe`."""
    if have_prepare_stage():
        from cpt_kit.data import prepare
        prepare.run(make_ctx(recipe, run))
        return
    from datasets import Dataset
    from transformers import AutoTokenizer

    base = Path(recipe.model.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(run.tokenizer)
    if (base / "tokenizer.model").is_file():
        shutil.copyfile(base / "tokenizer.model", run.tokenizer / "tokenizer.model")
    seq = recipe.model.max_seq_length
    n_held = max(1, round(len(texts) * recipe.data.heldout_fraction))

    def pack(docs: list[str]) -> list[list[int]]:
        ids: list[int] = []
        for doc in docs:
            ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        return [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]

    Dataset.from_dict({"input_ids": pack(texts[n_held:])}).save_to_disk(str(run.data / "train"))
    Dataset.from_dict({"input_ids": pack(texts[:n_held])}).save_to_disk(str(run.data / "heldout"))
    if replay_texts:
        Dataset.from_dict({"input_ids": pack(replay_texts)}).save_to_disk(str(run.data / "replay_heldout"))
