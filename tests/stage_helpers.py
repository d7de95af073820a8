"""Shared test helpers: run directories, stage contexts, quiet consoles, pipeline runs, tensors."""

from __future__ import annotations

import io
import json
import os
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


def write_passing_quality(run: Path, quants: dict[str, int]) -> None:
    """gguf/quality.json in which each quantization (name -> bytes) passed its limits: for stage tests whose
    subject is not the quantization gate itself (the gate itself is tested in test_quant, test_gguf and test_verify)."""
    formats = {q: {"passed": True, "bytes": size, "reasons": []} for q, size in quants.items()}
    path = run / "gguf" / "quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"passed": True, "reference": {"name": "F16", "bytes": 2 * max(quants.values())},
                                "formats": formats, "failed": []}))


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


class RecordingRecipe:
    """A read-only view of a recipe that records every field read as a dotted key ("eval.max_blocks").

    Sections are wrapped too, so `recipe.model` passed to a helper still records what the helper reads."""

    def __init__(self, obj, reads: set, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name):
        import dataclasses
        value = getattr(self._obj, name)
        key = self._prefix + name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return RecordingRecipe(value, self._reads, key + ".")
        self._reads.add(key if not callable(value) else f"{self._prefix}* (method {name})")
        return value

    def __setattr__(self, name, value):
        raise AttributeError("a recipe is read-only")


def undeclared(reads: set, declared: tuple) -> list:
    """Keys in `reads` that no declared key covers (a declared section covers all its fields)."""
    return sorted(k for k in reads if not any(k == d or k.startswith(d + ".") for d in declared))


def record_stage_reads(monkeypatch, table) -> dict:
    """Wrap each stage module's run/input_fingerprint so ctx.recipe records reads; returns {stage: reads}."""
    import dataclasses
    import importlib

    found: dict = {}
    for stage in table:
        module = importlib.import_module(stage.module)
        reads = found.setdefault(stage.name, set())
        for hook in ("run", "input_fingerprint"):
            if hasattr(module, hook):
                original = getattr(module, hook)

                def wrapped(ctx, original=original, reads=reads):
                    return original(dataclasses.replace(ctx, recipe=RecordingRecipe(ctx.recipe, reads)))
                monkeypatch.setattr(module, hook, wrapped)
    return found


_FILE_READS: dict = {"stage": None, "root": None, "found": None}


def _record_open(event: str, args: tuple) -> None:
    """Audit hook: a file opened for reading under the recorded run, by the stage running now."""
    state = _FILE_READS
    if event != "open" or state["stage"] is None or not isinstance(args[0], (str, os.PathLike)):
        return
    path, mode, flags = args
    reading = ("r" in mode and "+" not in mode) if isinstance(mode, str) else (flags & os.O_ACCMODE) == os.O_RDONLY
    try:
        rel = Path(os.path.abspath(path)).relative_to(state["root"])
    except ValueError:
        return
    if reading:
        state["found"].setdefault(state["stage"], set()).add(rel.as_posix())


def record_stage_files(monkeypatch, table, root: Path) -> dict:
    """Wrap each stage module's run/input_fingerprint so the files it opens for reading (from Python:
    files that a C or Rust library opens itself are not seen) under the run directory `root` are
    recorded; returns {stage: {run-relative path}}. The audit hook stays installed (Python cannot
    remove one) but records nothing outside a wrapped call."""
    import importlib
    import sys

    if not getattr(record_stage_files, "hooked", False):
        sys.addaudithook(_record_open)
        record_stage_files.hooked = True
    found: dict = {}
    _FILE_READS.update(root=Path(os.path.abspath(root)), found=found)
    for stage in table:
        module = importlib.import_module(stage.module)
        for hook in ("run", "input_fingerprint"):
            if hasattr(module, hook):
                original = getattr(module, hook)

                def wrapped(ctx, original=original, name=stage.name):
                    _FILE_READS["stage"] = name
                    try:
                        return original(ctx)
                    finally:
                        _FILE_READS["stage"] = None
                monkeypatch.setattr(module, hook, wrapped)
    return found


def undeclared_files(files: dict, table) -> dict:
    """{stage: run files it opened for reading that it does not declare}: a stage's inputs, its own
    outputs (the report embeds its plots) and manifest.json (the report's source) are declared; an
    unfinished write (.NAME.partial-PID) is the stage's own."""
    from cpt_kit.file_records import TEMPORARY

    found = {}
    for stage in table:
        allowed = (*stage.inputs, *stage.outputs, "manifest.json")
        found[stage.name] = sorted(
            p for p in files.get(stage.name, ()) if not any(TEMPORARY.match(part) for part in p.split("/"))
            and not any(p == a or p.startswith(a + "/") for a in allowed))
    return found
