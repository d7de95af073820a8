"""Shared test helpers: run directories, stage contexts, quiet consoles, pipeline runs, tensors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path


class RecordingConsole:
    def __init__(self):
        self.lines: list[str] = []

    def print(self, *args, **kwargs):
        self.lines.append(" ".join(str(a) for a in args))

    def rule(self, title="", **kwargs):
        self.lines.append(f"--- {title}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def make_run(root: Path, model_dir: Path) -> Path:
    """A run directory whose merged/ is `model_dir` (copied)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, root / "merged", dirs_exist_ok=True)
    return root


def context(recipe, root: Path):
    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.rundir import RunDir

    return StageContext(recipe, RunDir(root), Manifest.load(root / "manifest.json"), RecordingConsole())


def quiet_console():
    from rich.console import Console
    return Console(file=io.StringIO(), width=120)


def run_until(recipe, root: Path, until: str = "evaluate"):
    from cpt_kit.pipeline import run_pipeline
    from cpt_kit.rundir import RunDir
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
