"""Helpers for the train/evaluate tests (no tests here): quiet console, stage context, pipeline runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from cpt_kit.manifest import Manifest
from cpt_kit.pipeline import StageContext, run_pipeline
from cpt_kit.rundir import RunDir


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=120)


def make_ctx(recipe, run: RunDir, resume: bool = False) -> StageContext:
    return StageContext(recipe, run, Manifest.load(run.manifest), quiet_console(), "test", resume, [])


def run_until(recipe, root: Path, until: str = "evaluate") -> Manifest:
    return run_pipeline(recipe, RunDir(root), quiet_console(), until=until)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def base_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
