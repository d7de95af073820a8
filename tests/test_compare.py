"""The compare stage: the recipe's prompts answered by every model of the lineage (original base ->
CPT run -> this run) side by side, each prompted as it is used (chat template or completion)."""

from __future__ import annotations

import json
import shutil

import pytest

from stage_helpers import context, make_run

pytestmark = pytest.mark.slow


def test_the_same_prompts_answered_by_base_cpt_and_sft_models(tiny_base, tiny_tied, tiny_chatml, tiny_recipe,
                                                              tmp_path):
    from cpt_kit import compare
    from cpt_kit.recipe import Eval, Export, ModelfileSpec

    cpt_run = make_run(tmp_path / "language", tiny_tied)  # stands for the CPT run's merged model
    run = make_run(tmp_path / "chat", tiny_chatml)  # this (SFT) run's merged model: has a chat template
    prompts = ("I feel anxious before exams.", "Mi sentas min soleca.")
    recipe = tiny_recipe(eval=Eval(prompts=prompts, max_new_tokens=6),
                         export=Export(modelfile=ModelfileSpec(system="You are kind.")))
    ctx = context(recipe, run)
    # cpt_kit.lineage's format: the ancestor runs oldest first; the first one's base is the original model
    ctx.manifest.data["lineage"] = [{"kind": "run", "path": str(cpt_run), "recipe": "language", "objective": "cpt",
                                     "base": str(tiny_base), "merged_sha256": "0" * 64}]
    metrics = compare.run(ctx)
    assert metrics["models"] == 3 and metrics["prompts"] == 2

    table = json.loads((run / "eval" / "comparison.json").read_text(encoding="utf-8"))
    labels = [m["label"] for m in table["models"]]
    assert labels == [f"original ({tiny_base})", "cpt run 'language'", "this run (cpt 'tiny')"]
    assert [m["mode"] for m in table["models"]] == ["completion", "completion", "chat"]
    assert [row["prompt"] for row in table["prompts"]] == list(prompts)
    assert all(len(row["answers"]) == 3 for row in table["prompts"])
    assert table["system"] == "You are kind."
    # greedy answers are reproducible: the base model answers as a plain completion of the prompt
    _, again = compare.answer(str(tiny_base), [prompts[0]], None, 6)
    assert table["prompts"][0]["answers"][0] == again[0]

    text = (run / "eval" / "comparison.md").read_text(encoding="utf-8")
    assert text.count("| model | answer |") == 2
    for label in labels:
        assert text.count(f"| {label} |") == 2


def test_without_lineage_the_recipe_base_is_the_before(tiny_base, tiny_chatml, tiny_recipe, tmp_path):
    from cpt_kit import compare
    from cpt_kit.recipe import Eval

    run = make_run(tmp_path / "run", tiny_chatml)
    ctx = context(tiny_recipe(eval=Eval(prompts=("Hello",), max_new_tokens=4)), run)
    assert [c["label"] for c in compare.columns(ctx)] == [f"base ({tiny_base})", "this run (cpt 'tiny')"]


def test_no_prompts_no_comparison(tiny_recipe, tmp_path):
    from cpt_kit import compare
    from cpt_kit.recipe import Eval

    run = tmp_path / "run"
    run.mkdir()
    assert compare.run(context(tiny_recipe(eval=Eval(prompts=())), run))["models"] == 0
    assert json.loads((run / "eval" / "comparison.json").read_text())["skipped"]
    shutil.rmtree(run)
