"""The pipeline's bookkeeping: skipping finished stages, refusing to overwrite, recording failures.

The stages here are small stand-in modules (this file tests the orchestration, not the stages);
the real stages are exercised end to end in the stage tests.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from stage_helpers import quiet_console

from cpt_kit import pipeline
from cpt_kit.errors import CptKitError
from cpt_kit.manifest import Manifest
from cpt_kit.recipe import Model, Recipe, Train, apply_overrides
from cpt_kit.rundir import RunDir, atomic_path, atomic_write_json

STAND_IN = textwrap.dedent("""\
    import json, os
    from cpt_kit.errors import DataError

    def run(ctx):
        log = ctx.run.root / "calls.txt"
        with open(log, "a") as handle:
            handle.write(__name__.rsplit(".", 1)[1] + "\\n")
        if os.environ.get("FAIL_STAGE") == __name__.rsplit(".", 1)[1]:
            raise DataError("corpus too small", where="corpus/", hint="add text")
        if os.environ.get("CRASH_STAGE") == __name__.rsplit(".", 1)[1]:
            raise ZeroDivisionError("boom")
        return {"value": 1.5, "resume": ctx.resume}
""")


@pytest.fixture()
def stand_in_stages(tmp_path, monkeypatch):
    package = tmp_path / "fake_stages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    table = []
    for stage in pipeline.STAGE_TABLE:
        (package / f"{stage.name}.py").write_text(STAND_IN)
        table.append(pipeline.Stage(stage.name, f"fake_stages.{stage.name}", stage.sections))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pipeline, "STAGE_TABLE", tuple(table))
    yield
    for name in [m for m in sys.modules if m.startswith("fake_stages")]:
        del sys.modules[name]


def recipe(**train) -> Recipe:
    return Recipe(name="t", model=Model(base="m"), train=Train(**train))


def calls(run: RunDir) -> list[str]:
    path = run.root / "calls.txt"
    return path.read_text().split() if path.exists() else []


def test_runs_all_stages_then_skips_them(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    manifest = pipeline.run_pipeline(recipe(), run, quiet_console())
    assert calls(run) == list(pipeline.STAGES)
    on_disk = json.loads(run.manifest.read_text())
    assert on_disk["recipe"]["name"] == "t"
    assert on_disk["versions"]["torch"]
    assert all(on_disk["stages"][s]["status"] == "done" for s in pipeline.STAGES)
    assert on_disk["stages"]["train"]["metrics"]["value"] == 1.5
    assert manifest.data == on_disk
    pipeline.run_pipeline(recipe(), run, quiet_console())
    assert calls(run) == list(pipeline.STAGES), "finished stages must be skipped on rerun"


def test_until_and_stage(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="train")
    assert calls(run) == ["prepare", "train"]
    with pytest.raises(CptKitError, match="needs 'evaluate'"):
        pipeline.run_pipeline(recipe(), run, quiet_console(), only="merge")
    pipeline.run_pipeline(recipe(), run, quiet_console(), only="evaluate")
    assert calls(run) == ["prepare", "train", "evaluate"]


def test_changed_recipe_refuses_to_redo_finished_stages_without_force(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="evaluate")
    changed = apply_overrides(recipe(), ["train.learning_rate=1e-3"])
    with pytest.raises(CptKitError) as info:
        pipeline.run_pipeline(changed, run, quiet_console())
    assert "train.learning_rate" in info.value.message and "--force" in info.value.hint
    assert calls(run) == ["prepare", "train", "evaluate"]
    pipeline.run_pipeline(changed, run, quiet_console(), force=True)
    # prepare does not depend on train.*: kept; train and everything after it redone
    assert calls(run) == ["prepare", "train", "evaluate", "train", "evaluate", "merge", "gguf", "modelfile", "verify"]


def test_other_recipe_or_foreign_directory_not_overwritten(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    other = Recipe(name="other", model=Model(base="m"))
    with pytest.raises(CptKitError, match="holds the run of recipe 't'"):
        pipeline.run_pipeline(other, run, quiet_console())
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(CptKitError, match="not a cpt-kit run"):
        pipeline.run_pipeline(recipe(), RunDir(foreign), quiet_console())
    assert (foreign / "notes.txt").read_text() == "precious"


def test_failure_is_recorded_and_resume_flag_set(tmp_path, stand_in_stages, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.setenv("FAIL_STAGE", "train")
    with pytest.raises(CptKitError, match="corpus too small"):
        pipeline.run_pipeline(recipe(), run, quiet_console())
    entry = Manifest.load(run.manifest).stage("train")
    assert entry["status"] == "failed" and "corpus too small" in entry["error"] and "add text" in entry["error"]
    monkeypatch.delenv("FAIL_STAGE")
    manifest = pipeline.run_pipeline(recipe(), run, quiet_console(), until="train")
    assert manifest.metrics("train")["resume"] is True
    assert manifest.stage("train")["attempts"] == 2


def test_unexpected_crash_writes_error_log(tmp_path, stand_in_stages, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.setenv("CRASH_STAGE", "prepare")
    with pytest.raises(ZeroDivisionError):
        pipeline.run_pipeline(recipe(), run, quiet_console())
    assert "ZeroDivisionError" in (run.logs / "error.log").read_text()
    assert Manifest.load(run.manifest).stage("prepare")["status"] == "failed"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert (final / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_rerunning_one_stage_marks_later_stages_stale(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    pipeline.run_pipeline(recipe(), run, quiet_console(), only="train", force=True)
    stages = Manifest.load(run.manifest).data["stages"]
    assert stages["prepare"]["status"] == "done" and stages["train"]["status"] == "done"
    assert all(stages[s]["status"] == "stale" for s in pipeline.STAGES[2:])
    pipeline.run_pipeline(recipe(), run, quiet_console())  # redone without --force: they were out of date
    assert calls(run) == list(pipeline.STAGES) + ["train"] + list(pipeline.STAGES[2:])
    assert all(s["status"] == "done" for s in Manifest.load(run.manifest).data["stages"].values())
