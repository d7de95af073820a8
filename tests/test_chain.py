"""Issue 12's chain in one test session, through the command line: a tiny CPT run -> SFT on chat data
from that run directory -> compare -> export -> verify -> safety probe. The tiny model fails
the probe: the run fails at the safety stage and the model is not published; the explicit override
(`--set safety.accept_failure=true`) finishes it, and the manifest records the override."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from stage_helpers import record_stage_files, record_stage_reads, run_until, undeclared, undeclared_files

pytestmark = pytest.mark.slow


def write_chat_data(folder) -> str:
    """Short supportive exchanges: few enough tokens that a tiny model learns to end its turn in 60 steps
    (verify requires an SFT model to stop by itself)."""
    rows = [{"messages": [{"role": "user", "content": f"I feel worried about day {i}."},
                          {"role": "assistant", "content": f"I hear you. Day {i % 7} will pass."}]} for i in range(40)]
    path = folder / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_chat_recipe(folder, cpt_root):
    recipe = folder / "chat.py"
    recipe.write_text(textwrap.dedent(f"""\
        from cpt_kit.recipe import Data, Eval, Export, Lora, Model, Recipe, Safety, Sft, Train
        RECIPE = Recipe(
            name="chat",
            model=Model(base={str(cpt_root)!r}, max_seq_length=96, load_in_4bit=False),
            lora=Lora(r=8, lora_alpha=16, train_embeddings=False),
            data=Data(sources=({write_chat_data(folder)!r},), heldout_fraction=0.1),
            sft=Sft(system_prompt="You answer kindly."),
            train=Train(objective="sft", backend="hf", learning_rate=3e-3, embedding_learning_rate=None, max_steps=60,
                        per_device_train_batch_size=8, gradient_accumulation_steps=1, eval_steps=30, save_steps=60,
                        warmup_ratio=0.0, gradient_checkpointing=False, packing=True),
            eval=Eval(prompts=("I feel anxious before my exams.", "Mi sentas min soleca."), max_new_tokens=8,
                      max_blocks=4),
            export=Export(quantizations=("Q8_0",)),
            safety=Safety(languages=("en", "eo"), categories=("suicidal_explicit", "medication_dose", "off_topic"),
                          max_new_tokens=16),
        )
    """))
    return recipe


def test_cpt_then_sft_then_export_verify_and_the_safety_gate(tiny_recipe, tmp_path, monkeypatch):
    from cpt_kit import pipeline
    from cpt_kit.cli import main
    from cpt_kit.lineage import weights_sha256
    from cpt_kit.report import fmt

    cpt_root = tmp_path / "language"
    run_until(tiny_recipe(), cpt_root, "merge")
    reads = record_stage_reads(monkeypatch, pipeline.STAGE_TABLE)  # the SFT path's reads (test_stage_reads: CPT's)
    recipe = write_chat_recipe(tmp_path, cpt_root)
    root = tmp_path / "chat"
    files = record_stage_files(monkeypatch, pipeline.STAGE_TABLE, root)

    failed = CliRunner().invoke(main, ["run", str(recipe), "--output-dir", str(root)])
    assert failed.exit_code == 2, failed.output
    assert "safety probe below the recipe's thresholds" in failed.output
    assert "not a clinical validation" in failed.output and "safety.accept_failure=true" in failed.output
    assert "not published" in failed.output and "ollama create" not in failed.output
    manifest = json.loads((root / "manifest.json").read_text())
    stages = manifest["stages"]
    assert [stages[s]["status"] for s in ("prepare", "train", "merge", "compare", "verify", "safety")] == \
        ["done"] * 5 + ["failed"]
    assert stages["report"]["status"] == "stale" and "overrides" not in manifest
    assert stages["train"]["metrics"]["objective"] == "sft"
    cpt_base = tiny_recipe().model.base  # the original model: the CPT run's base
    assert [(item["kind"], item["recipe"], item["base"]) for item in manifest["lineage"]] == [("run", "tiny", cpt_base)]
    assert manifest["lineage"][0]["merged_sha256"] == weights_sha256(cpt_root / "merged")
    verify = json.loads((root / "verify.json").read_text())
    assert verify["passed"] and verify["checks"]["stop"]["eot_tokens"]["<|im_end|>"]["is_eog"]
    report = json.loads((root / "safety.json").read_text())
    assert report["gate"]["passed"] is False and report["gate"]["overridden"] is False
    assert {r["language"] for r in report["results"]} == {"en", "eo"} and set(report["pass_rates"]) == {"hf", "gguf"}
    assert report["generation"]["system"] == "You answer kindly."
    failed_report = (root / "report.md").read_text(encoding="utf-8")  # the failed run's report, per category
    assert "**This run failed at safety.**" in failed_report and "safety probe below the recipe's thresholds" in failed_report
    for fmt_, rates in report["pass_rates"].items():
        for category, v in rates["categories"].items():
            assert f"| {fmt_} | {category} | {fmt(v['rate'])} | {v['passed']}/{v['total']} |" in failed_report
    assert "ollama create" not in failed_report and "report of the failed run" in failed.output
    comparison = json.loads((root / "eval" / "comparison.json").read_text())
    assert [m["mode"] for m in comparison["models"]] == ["completion", "completion", "chat"]
    assert [m["label"] for m in comparison["models"]][:2] == [f"original ({cpt_base})", "cpt run 'tiny'"]

    finished = CliRunner().invoke(main, ["run", str(recipe), "--output-dir", str(root),
                                         "--set", "safety.accept_failure=true"])
    assert finished.exit_code == 0, finished.output
    assert "overridden" in finished.output
    # the override changes the safety stage only: nothing before it runs again (packing wrote no cache
    # file into data/train, the train stage's recorded input)
    assert finished.output.count("runs because") == 2, finished.output  # safety and report
    assert sorted(p.name for p in (root / "data" / "train").iterdir()) == \
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["safety"]["status"] == "done" and manifest["stages"]["safety"]["metrics"]["gate"] == "overridden"
    override = manifest["overrides"]["safety"]
    assert override["key"] == "safety.accept_failure" and override["reasons"] == report["gate"]["reasons"]
    assert manifest["recipe"]["safety"]["accept_failure"] is True
    assert json.loads((root / "safety.json").read_text())["gate"]["overridden"] is True
    final_report = (root / "report.md").read_text(encoding="utf-8")
    assert "overridden" in final_report and "This run failed" not in final_report
    declared = {s.name: s.reads for s in pipeline.STAGE_TABLE}
    assert {name: undeclared(found, declared[name]) for name, found in reads.items()} == {s: [] for s in declared}
    assert undeclared_files(files, pipeline.STAGE_TABLE) == {s: [] for s in declared}
    assert "safety.json" in files["report"] and "ollama/Modelfile" in files["safety"]
    assert {"sft.system_prompt", "train.objective"} <= reads["modelfile"] and "sft" in {r.split(".")[0] for r in reads["prepare"]}
