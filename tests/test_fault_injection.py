"""Fault injection: kill -9 at points inside every stage, then rerun; the manifest survives any kill;
a full disk leaves the previous state as it was.

The end-to-end test runs the tiny pipeline once without faults (the reference), then once more in
another directory, killed (SIGKILL to the process and its children, see fault_child.py) at a point
in each stage and restarted each time. After every kill no file under a final name is partial, and
the run that finally completes has the reference's merged weights and GGUF files, bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from cpt_kit.file_records import TEMPORARY
from cpt_kit.manifest import Manifest
from cpt_kit.rundir import atomic_path, atomic_write_json, remove_stale_partials

CHILD = Path(__file__).with_name("fault_child.py")
KILLS = [  # (point, the stage that is running when the process dies)
    ("tokenize", "prepare"), ("train_step_10", "train"), ("checkpoint_8_write", "train"), ("evaluate", "evaluate"),
    ("merge", "merge"), ("compare", "compare"), ("convert", "gguf"), ("quantize", "gguf"), ("modelfile", "modelfile"),
    ("verify", "verify"), ("report", "report"),
]


def run_child(point: str, recipe: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(CHILD), point, str(recipe), str(out)], capture_output=True, text=True,
                          env=env, start_new_session=True, timeout=600)


def final_files(root: Path):
    """Every file under a final name (not an unfinished atomic write, not inside one)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not TEMPORARY.match(d)]
        for name in filenames:
            if not TEMPORARY.match(name):
                yield Path(dirpath, name)


def assert_nothing_partial(root: Path) -> None:
    """JSON parses, safetensors and GGUF files are as long as their headers say, datasets load. A
    checkpoint that was being written when the process died has no trainer_state.json (HF writes it
    last): it is not a resumable checkpoint, and the next run removes it."""
    from gguf import GGUFReader

    from cpt_kit.run_files import _safetensors_size

    for path in final_files(root):
        checkpoint = next((p for p in path.parents if p.name.startswith("checkpoint-")), None)
        if checkpoint is not None and not (checkpoint / "trainer_state.json").exists():
            continue
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        elif path.suffix == ".safetensors":
            assert _safetensors_size(path) == path.stat().st_size, path
        elif path.suffix == ".gguf":
            GGUFReader(path)
    for name in ("train", "heldout"):
        if (root / "data" / name).is_dir():
            from datasets import load_from_disk
            assert len(load_from_disk(str(root / "data" / name))) > 0


def merged_tensors(root: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for path in sorted((root / "merged").glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def gguf_tensors(path: Path) -> dict:
    from gguf import GGUFReader
    return {t.name: bytes(t.data.tobytes()) for t in GGUFReader(path).tensors}


@pytest.mark.slow
def test_killed_in_every_stage_then_rerun_gives_the_same_model(tiny_base, target_texts, write_corpus, tmp_path):
    from test_cli import write_tiny_recipe

    recipe = write_tiny_recipe(tmp_path, "fi", tiny_base, write_corpus(target_texts, "eo"))
    recipe.write_text(recipe.read_text().replace("max_steps=8", "max_steps=12"))
    reference = tmp_path / "reference"
    done = run_child("none", recipe, reference)
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "killed"
    said = {}
    for point, stage in KILLS:
        killed = run_child(point, recipe, run)
        assert killed.returncode == -signal.SIGKILL, f"{point}: {killed.returncode}\n{killed.stdout}{killed.stderr}"
        said[point] = " ".join(killed.stdout.split())  # (rich wraps long lines)
        manifest = Manifest.load(run / "manifest.json")  # parses after every kill
        assert manifest.stage(stage)["status"] == "running", (point, manifest.data["stages"])
        assert_nothing_partial(run)
        if point == "train_step_10":  # damage the newest checkpoint: the next run must skip it
            assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
            weights = run / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
    final = run_child("none", recipe, run)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "checkpoint-8 cannot be resumed from: adapter_model.safetensors is truncated" in said["checkpoint_8_write"]
    assert "resuming from checkpoint-4" in said["checkpoint_8_write"]
    assert "checkpoint-8 cannot be resumed from: it has no trainer_state.json" in said["evaluate"]
    assert "removed unfinished files of an interrupted run" in said["quantize"]  # the converter's .partial
    assert_nothing_partial(run)
    assert not [p for p in run.rglob("*") if TEMPORARY.match(p.name)], "unfinished files left behind"

    manifest = Manifest.load(run / "manifest.json").data
    assert all(entry["status"] == "done" for entry in manifest["stages"].values())
    train = manifest["stages"]["train"]
    assert train["metrics"]["steps"] == 12 and train["metrics"]["resumed_from_step"] == 4
    state = json.loads((run / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert json.loads((run / "verify.json").read_text())["passed"] is True
    assert (run / "eval" / "comparison.md").is_file() and (run / "report.md").is_file()
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(p.name for p in (reference / "report").iterdir())
    # resumed training is bitwise identical to uninterrupted training here (CPU, same seed, RNG and
    # optimizer state restored from checkpoint-4), so every later output is too
    expected, got = merged_tensors(reference), merged_tensors(run)
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    for name in ("fi-F16.gguf", "fi-Q8_0.gguf"):
        assert gguf_tensors(reference / "gguf" / name) == gguf_tensors(run / "gguf" / name), name


MANIFEST_KILL = textwrap.dedent("""\
    import os, signal, sys
    from pathlib import Path
    from cpt_kit.manifest import Manifest
    point, path = sys.argv[1], Path(sys.argv[2])
    manifest = Manifest.load(path)
    manifest.data["stages"]["train"] = {"status": "running", "note": "x" * 200000}
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if point == "before_rename":
        os.replace = die
    elif point == "before_fsync":
        os.fsync = die
    elif point == "mid_write":
        real_fdopen = os.fdopen
        class HalfWriter:
            def __init__(self, handle): self.handle = handle
            def __enter__(self): return self
            def __exit__(self, *exc): return False
            def write(self, text):
                self.handle.write(text[: len(text) // 2]); self.handle.flush(); die()
        os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
    manifest.save()
""")


@pytest.mark.parametrize("point", ["mid_write", "before_fsync", "before_rename"])
def test_manifest_survives_a_kill_while_it_is_saved(tmp_path, point):
    path = tmp_path / "run" / "manifest.json"
    atomic_write_json(path, {"stages": {"prepare": {"status": "done"}}})
    before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", MANIFEST_KILL, point, str(path)], env=env)
    assert killed.returncode == -signal.SIGKILL
    assert path.read_bytes() == before and Manifest.load(path).stage("prepare") == {"status": "done"}
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "manifest.json"]
    assert len(leftovers) == 1 and TEMPORARY.match(leftovers[0])
    assert remove_stale_partials(path.parent) == leftovers
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


class DiskFull:
    """A file handle that writes `allowed` bytes, then fails as a full disk does."""

    def __init__(self, handle, allowed: int):
        self.handle, self.allowed = handle, allowed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False

    def write(self, data):
        if len(data) > self.allowed:
            self.handle.write(data[: self.allowed])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.allowed -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def fill_disk_for(monkeypatch, name: str, allowed: int) -> None:
    """Make atomic writes of files called `name` (their temporary files) hit a full disk after `allowed` bytes."""
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return DiskFull(handle, allowed) if f".{name}." in os.readlink(f"/proc/self/fd/{fd}") else handle
    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_while_writing_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "verify.json"
    atomic_write_json(target, {"passed": True})
    before = target.read_bytes()
    fill_disk_for(monkeypatch, "verify.json", 10)
    with pytest.raises(OSError) as info:
        atomic_write_json(target, {"passed": False, "checks": list(range(1000))})
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["verify.json"]

    gguf = tmp_path / "gguf" / "m-Q8_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF old model")
    with pytest.raises(OSError):
        with atomic_path(gguf) as partial:
            with DiskFull(open(partial, "wb"), 100) as handle:
                handle.write(b"\0" * 4096)
    assert gguf.read_bytes() == b"GGUF old model" and [p.name for p in gguf.parent.iterdir()] == ["m-Q8_0.gguf"]


def test_disk_full_in_a_stage_is_reported_and_keeps_the_finished_outputs(tmp_path, monkeypatch):
    """Through the pipeline (stand-in stages): the gguf stage runs out of space while rewriting its
    output; the error says so, the earlier output and its record stay, and the next run redoes only it."""
    from stage_helpers import quiet_console
    from test_pipeline import STAND_IN, recipe

    from cpt_kit import pipeline
    from cpt_kit.errors import CptKitError
    from cpt_kit.recipe import apply_overrides
    from cpt_kit.rundir import RunDir

    package = tmp_path / "full_stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for stage in pipeline.STAGE_TABLE:
        (package / f"{stage.name}.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dataclasses
    table = tuple(dataclasses.replace(s, module=f"full_stages.{s.name}") for s in pipeline.STAGE_TABLE)
    monkeypatch.setattr(pipeline, "STAGE_TABLE", table)
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="gguf")
    before = (run.root / "gguf" / "out.txt").read_bytes()
    record = Manifest.load(run.manifest).stage("gguf")["outputs"]

    fill_disk_for(monkeypatch, "out.txt", 3)
    changed = apply_overrides(recipe(), ["export.quantizations=Q8_0"])
    with pytest.raises(CptKitError, match="the disk is full: gguf could not write") as info:
        pipeline.run_pipeline(changed, run, quiet_console(), until="gguf", force=True)
    assert "free some space" in info.value.hint
    assert (run.root / "gguf" / "out.txt").read_bytes() == before
    entry = Manifest.load(run.manifest).stage("gguf")
    assert entry["status"] == "failed" and entry["outputs"] == record
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pipeline, "STAGE_TABLE", table)
    pipeline.run_pipeline(changed, run, quiet_console(), until="gguf", force=True)
    assert Manifest.load(run.manifest).stage("gguf")["status"] == "done"
    for name in [m for m in sys.modules if m.startswith("full_stages")]:
        del sys.modules[name]
