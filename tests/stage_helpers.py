"""Run directories and stage contexts for the modelfile/verify stage tests (no training needed)."""

from __future__ import annotations

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
