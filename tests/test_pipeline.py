"""The pipeline's bookkeeping: skipping finished stages, refusing to overwrite, recording failures.

The stages here are small stand-in modules (this file tests the orchestration, not the stages);
the real stages are exercised end to end in the stage tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    from cpt_kit import pipeline
    from cpt_kit.errors import DataError
    from cpt_kit.rundir import atomic_write_text

    NAME = __name__.rsplit(".", 1)[1]

    def run(ctx):
        log = ctx.run.root / "calls.txt"
        with open(log, "a") as handle:
            handle.write(NAME + "\\n")
        if os.environ.get("FAIL_STAGE") == NAME:
            raise DataError("corpus too small", where="corpus/", hint="add text")
        if os.environ.get("CRASH_STAGE") == NAME:
            raise ZeroDivisionError("boom")
        stage = next(s for s in pipeline.STAGE_TABLE if s.name == NAME)
        names = os.environ.get(f"{NAME.upper()}_FILES", "out.txt").split(",")
        for output in stage.outputs:  # its outputs depend on its fingerprint, as real outputs do
            for path in ([ctx.run.root / output] if "." in output else [ctx.run.root / output / n for n in names]):
                atomic_write_text(path, f"{NAME} {ctx.fingerprint}")
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
        table.append(dataclasses.replace(stage, module=f"fake_stages.{stage.name}"))
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
    with pytest.raises(CptKitError, match="needs 'merge'.*not run yet"):
        pipeline.run_pipeline(recipe(), run, quiet_console(), only="gguf")
    pipeline.run_pipeline(recipe(), run, quiet_console(), only="merge")  # needs train, not evaluate
    pipeline.run_pipeline(recipe(), run, quiet_console(), only="evaluate")
    assert calls(run) == ["prepare", "train", "merge", "evaluate"]


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
    assert calls(run) == ["prepare", "train", "evaluate", "train", "evaluate", "merge", "compare", "gguf", "modelfile",
                          "verify", "safety", "report"]


def test_other_recipe_or_foreign_directory_not_overwritten(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    other = Recipe(name="other", model=Model(base="m"))
    with pytest.raises(CptKitError, match="holds the run of recipe 't'"):
        pipeline.run_pipeline(other, run, quiet_console())
    foreign = tmp_path / "mine"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "mine.txt").write_text("precious")
    for force in (False, True):  # --force never writes into a directory cpt-kit did not create
        with pytest.raises(CptKitError, match="not a cpt-kit run") as info:
            pipeline.run_pipeline(recipe(), RunDir(foreign), quiet_console(), until="prepare", force=force)
        assert "--force" not in info.value.render()
    assert (foreign / "data" / "mine.txt").read_text() == "precious"
    assert sorted(p.name for p in foreign.rglob("*")) == ["data", "mine.txt"]


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


def test_eval_only_change_redoes_the_stages_that_read_it_and_nothing_else(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    changed = apply_overrides(recipe(), ["eval.prompts=La kato"])
    plan = pipeline.make_plan(changed, run, Manifest.load(run.manifest), quiet_console())
    # evaluate and compare read eval.prompts; the report reads their eval/ files
    assert [s.stage.name for s in plan.steps if s.action == "run"] == ["evaluate", "compare", "report"]
    assert plan.conflicts == ["evaluate", "compare"] and "recipe changed: eval.prompts" in plan.steps[2].reasons
    pipeline.run_pipeline(changed, run, quiet_console(), force=True)
    assert calls(run) == list(pipeline.STAGES) + ["evaluate", "compare", "report"]


def test_export_change_keeps_training_and_names_the_field(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    changed = apply_overrides(recipe(), ["export.quantizations=Q8_0"])
    with pytest.raises(CptKitError, match="gguf: recipe changed: export.quantizations") as info:
        pipeline.run_pipeline(changed, run, quiet_console())
    assert "train" not in info.value.message and "--force" in info.value.hint
    pipeline.run_pipeline(changed, run, quiet_console(), force=True)
    # gguf's own field changed; modelfile and verify read it too; nothing before gguf reruns
    assert calls(run)[len(pipeline.STAGES):] == ["gguf", "modelfile", "verify", "safety", "report"]


def test_outputs_are_recorded_and_a_missing_or_changed_output_is_redone(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    outputs = Manifest.load(run.manifest).stage("gguf")["outputs"]
    assert list(outputs) == ["gguf/out.txt"]
    assert outputs["gguf/out.txt"]["size"] == (run.root / "gguf/out.txt").stat().st_size
    assert len(outputs["gguf/out.txt"]["sha256"]) == 64

    (run.root / "gguf/out.txt").unlink()
    plan = pipeline.make_plan(recipe(), run, Manifest.load(run.manifest), quiet_console())
    gguf = next(s for s in plan.steps if s.stage.name == "gguf")
    assert gguf.action == "run" and gguf.reasons == ["outputs gguf/out.txt is missing"] and not plan.conflicts
    pipeline.run_pipeline(recipe(), run, quiet_console())  # no --force needed: the output was broken
    # gguf wrote the same file again, so modelfile and verify (which read it) stay done
    assert calls(run)[len(pipeline.STAGES):] == ["gguf"]

    text = (run.root / "merged/out.txt").read_text()
    (run.root / "merged/out.txt").write_text(text[: len(text) // 2])
    pipeline.run_pipeline(recipe(), run, quiet_console())
    assert calls(run)[len(pipeline.STAGES) + 1:] == ["merge"]
    (run.root / "merged/out.txt").write_text(text.upper())  # same size, other content
    pipeline.run_pipeline(recipe(), run, quiet_console())
    assert calls(run)[len(pipeline.STAGES) + 2:] == ["merge"]


def test_changed_input_file_redoes_the_stages_that_read_it(tmp_path, stand_in_stages):
    """An adapter replaced by hand (as `cpt-kit export --adapter` does with a new adapter) redoes
    everything that reads adapter/, without --force, and nothing else."""
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    manifest = Manifest.load(run.manifest)
    manifest.data["stages"]["train"]["status"] = "external"  # an adapter cpt-kit did not train
    manifest.save()
    (run.root / "adapter/out.txt").write_text("another adapter")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    # evaluate, merge and modelfile read adapter/; gguf and verify read what merge wrote from it
    assert calls(run)[len(pipeline.STAGES):] == ["evaluate", "merge", "compare", "gguf", "modelfile", "verify", "safety", "report"]


def test_a_file_dropped_among_the_recorded_outputs_redoes_nothing(tmp_path, stand_in_stages):
    """A stage's inputs are the files the earlier stages recorded as their outputs: a note a user
    leaves in data/train or adapter/ is not read by any stage, so nothing is redone."""
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    (run.root / "data/train/notes.txt").write_text("where this corpus came from")
    (run.root / "adapter/README.md").write_text("my adapter")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    assert calls(run) == list(pipeline.STAGES)
    (run.root / "data/train/out.txt").write_text("edited by hand")  # a recorded output: prepare redoes it
    with pytest.raises(CptKitError, match="would replace files this run did not write: data/train/notes.txt"):
        pipeline.run_pipeline(recipe(), run, quiet_console())  # prepare rewrites data/train: the note would be lost
    (run.root / "data/train/notes.txt").unlink()
    pipeline.run_pipeline(recipe(), run, quiet_console())
    # prepare wrote the same file again, so what reads it is still up to date
    assert calls(run)[len(pipeline.STAGES):] == ["prepare"]
    assert (run.root / "data/train/out.txt").read_text().startswith("prepare ")


def test_outputs_an_earlier_run_wrote_are_replaced_user_files_never(tmp_path, stand_in_stages, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.setenv("GGUF_FILES", "a.gguf,b.gguf")
    pipeline.run_pipeline(recipe(), run, quiet_console())
    (run.root / "gguf/mine.gguf").write_text("the user's")
    monkeypatch.setenv("GGUF_FILES", "a.gguf")
    with pytest.raises(CptKitError, match="would replace files this run did not write: gguf/mine.gguf"):
        pipeline.run_pipeline(recipe(), run, quiet_console(), only="gguf", force=True)
    assert (run.root / "gguf/mine.gguf").read_text() == "the user's"
    (run.root / "gguf/mine.gguf").rename(tmp_path / "mine.gguf")
    pipeline.run_pipeline(recipe(), run, quiet_console(), only="gguf", force=True)
    # b.gguf was recorded by the earlier run and not written by this one: removed
    assert sorted(p.name for p in (run.root / "gguf").iterdir()) == ["a.gguf"]
    assert list(Manifest.load(run.manifest).stage("gguf")["outputs"]) == ["gguf/a.gguf"]


def test_user_file_beside_the_outputs_survives_prepare(tmp_path, stand_in_stages):
    """data/mine.txt is not under any of prepare's outputs (data/train, data/heldout, ...): kept."""
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    (run.root / "data/mine.txt").write_text("mine")
    pipeline.run_pipeline(apply_overrides(recipe(), ["data.seed=1"]), run, quiet_console(), until="prepare", force=True)
    assert calls(run) == ["prepare", "prepare"] and (run.root / "data/mine.txt").read_text() == "mine"


def test_interrupted_attempt_outputs_are_the_runs_own(tmp_path, stand_in_stages, monkeypatch):
    """Files a failed attempt wrote (after it started) are replaced by the next attempt, no error."""
    run = RunDir(tmp_path / "run")
    monkeypatch.setenv("FAIL_STAGE", "prepare")
    with pytest.raises(CptKitError):
        pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    (run.root / "data/train").mkdir(parents=True)
    (run.root / "data/train/half.arrow").write_text("from the failed attempt")
    monkeypatch.delenv("FAIL_STAGE")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    assert Manifest.load(run.manifest).stage("prepare")["status"] == "done"


def test_unreadable_manifest_is_reported_not_replaced(tmp_path, stand_in_stages):
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    run.manifest.write_text('{"stages": {"prepare": {"status": "do')
    with pytest.raises(CptKitError) as info:
        pipeline.run_pipeline(recipe(), run, quiet_console())
    assert str(run.manifest) in info.value.render() and "move the run directory" in info.value.hint
    assert "line 1 column" in info.value.render() and "backup" not in info.value.hint  # cpt-kit keeps none
    assert run.manifest.read_text() == '{"stages": {"prepare": {"status": "do'


def test_unfinished_files_of_dead_processes_are_removed_at_start(tmp_path, stand_in_stages):
    import subprocess
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = RunDir(tmp_path / "run")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    leftovers = [run.root / "gguf" / f".t-Q8_0.gguf.partial-{dead.pid}", run.root / f".merged.partial-{dead.pid}",
                 run.root / "eval" / f".samples.json.tmp-{dead.pid}-k2j3h4_x", run.root / "data" / f".train.replaced-{dead.pid}"]
    # hidden files of the user's that merely look temporary, and a write of a live process, stay
    users = [run.root / "data" / ".mynote.tmp", run.root / "eval" / ".draft.json.k2j3h4.tmp",
             run.root / ".notes.tmp-backup", run.root / "gguf" / f".t-F16.gguf.partial-{os.getppid()}"]
    for path in leftovers + users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    pipeline.run_pipeline(recipe(), run, quiet_console(), until="prepare")
    assert [p for p in leftovers if p.exists()] == [] and all(p.exists() for p in users)


def test_atomically_written_files_get_the_mode_open_gives_and_a_name_with_the_pid(tmp_path, monkeypatch):
    from cpt_kit.file_records import TEMPORARY
    from cpt_kit.rundir import atomic_write_text

    names = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(os.path.basename(src)), real_replace(src, dst)))
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}")
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640
    assert names[0].startswith(f".manifest.json.tmp-{os.getpid()}-") and TEMPORARY.match(names[0])
    assert TEMPORARY.match(names[0]).group("pid") == str(os.getpid())


def test_atomic_entries_replaces_its_entries_only(tmp_path):
    from cpt_kit.rundir import atomic_entries

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "old.arrow").write_text("old")
    (data / "mine.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with atomic_entries(data) as tmp:
            (tmp / "train").mkdir()
            raise RuntimeError("killed")
    assert (data / "train" / "old.arrow").read_text() == "old"
    with atomic_entries(data) as tmp:
        (tmp / "train").mkdir()
        (tmp / "train" / "new.arrow").write_text("new")
        (tmp / "stats.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in data.iterdir()) == ["mine.txt", "stats.json", "train"]
    assert [p.name for p in (data / "train").iterdir()] == ["new.arrow"]
