"""Every stage declares the recipe fields it reads (its fingerprint hashes exactly those): a stage
that reads a field it does not declare would not be redone when that field changes."""

from __future__ import annotations

import dataclasses

import pytest
from stage_helpers import (RecordingRecipe, quiet_console, record_stage_files, record_stage_reads, undeclared,
                           undeclared_files)

from cpt_kit import pipeline
from cpt_kit.recipe import Model, Recipe
from cpt_kit.rundir import RunDir


def test_recording_view_reports_an_undeclared_read():
    reads: set = set()
    view = RecordingRecipe(Recipe(name="t", model=Model(base="m")), reads)
    assert view.eval.max_blocks == 256 and view.model.max_seq_length == 2048 and view.data.replay is None
    assert reads == {"eval.max_blocks", "model.max_seq_length", "data.replay"}
    assert undeclared(reads, ("eval", "model.base")) == ["data.replay", "model.max_seq_length"]
    assert undeclared(reads, ("eval.max_blocks", "model", "data")) == []
    view.to_dict()
    assert undeclared(reads, ("eval", "model", "data")) == ["* (method to_dict)"]


def test_a_stage_reading_an_undeclared_field_is_caught(tmp_path, monkeypatch):
    """The check below, on a stand-in table whose verify reads eval.max_blocks without declaring it
    (the defect the real verify stage had)."""
    package = tmp_path / "reads_stand_in"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "verify.py").write_text(
        "from cpt_kit.rundir import atomic_write_text\n"
        "def run(ctx):\n"
        "    atomic_write_text(ctx.run.verify, str(ctx.recipe.export.max_f16_ppl_delta + ctx.recipe.eval.max_blocks))\n"
        "    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = pipeline.Stage("verify", "reads_stand_in.verify", reads=("export",), outputs=("verify.json",))
    monkeypatch.setattr(pipeline, "STAGE_TABLE", (stage,))
    reads = record_stage_reads(monkeypatch, pipeline.STAGE_TABLE)
    pipeline.run_pipeline(Recipe(name="t", model=Model(base="m")), RunDir(tmp_path / "run"), quiet_console())
    assert undeclared(reads["verify"], stage.reads) == ["eval.max_blocks"]


@pytest.mark.slow
def test_real_stages_read_only_declared_fields(tiny_recipe, tmp_path, monkeypatch, general_texts, write_corpus):
    """The whole pipeline on a tiny recipe (with replay text, so that branch runs too)."""
    from cpt_kit.recipe import Replay

    replay = write_corpus(general_texts, "general")
    recipe = tiny_recipe()
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, replay=Replay(sources=(str(replay),))))
    reads = record_stage_reads(monkeypatch, pipeline.STAGE_TABLE)
    files = record_stage_files(monkeypatch, pipeline.STAGE_TABLE, tmp_path / "run")
    pipeline.run_pipeline(recipe, RunDir(tmp_path / "run"), quiet_console())
    declared = {s.name: s.reads for s in pipeline.STAGE_TABLE}
    assert {name: undeclared(found, declared[name]) for name, found in reads.items()} == {s: [] for s in declared}
    # the run files each stage opened for reading are among those it declares (its fingerprint hashes them)
    assert undeclared_files(files, pipeline.STAGE_TABLE) == {s: [] for s in declared}
    assert {"ollama/Modelfile", "gguf/quality.json"} <= files["verify"] and "data/stats.json" in files["report"]
    assert "eval.max_blocks" in reads["verify"]  # (model.max_seq_length only for runs without held-out data)
    # the gguf stage gates each quantization on the verify blocks, under the recipe's limits
    assert {"eval.max_blocks", "export.quant_max_kl", "export.quant_max_ppl_delta"} <= reads["gguf"]
    assert "eval.prompts" in reads["compare"] and "train.objective" in reads["safety"]
