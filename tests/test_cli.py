"""The command line, through click's runner (and one subprocess for start-up imports)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from conftest import REPO
from cpt_kit.cli import main
from cpt_kit.pipeline import STAGES
from test_pipeline import stand_in_stages  # noqa: F401  (fixture)


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_is_quick_and_imports_nothing_heavy():
    code = "import sys, cpt_kit.cli; print(sorted(m for m in ('torch', 'transformers', 'unsloth', 'datasets', 'llama_cpp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "show"):
        assert command in result.output


def test_show_resolves_overrides():
    result = invoke("show", str(REPO / "recipes" / "language.py"), "--set", "lora.r=16", "--docs")
    assert result.exit_code == 0, result.output
    assert "r = 16" in result.output
    assert "LoRA rank" in result.output


def test_bad_override_exits_2_with_key_and_suggestion():
    result = CliRunner().invoke(main, ["show", str(REPO / "recipes" / "demo.py"), "--set", "train.learnin_rate=1"])
    assert result.exit_code == 2
    assert "train.learnin_rate" in result.output and "train.learning_rate" in result.output
    assert "Traceback" not in result.output


def test_bf16_on_cpu_rejected_before_anything_loads(tmp_path):
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "demo.py"), "--set", "train.precision=bf16",
                                       "--output-dir", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 2
    assert "train.precision" in result.output
    assert not (tmp_path / "run").exists()


def test_recipe_with_error_in_file_reports_line(tmp_path):
    recipe = tmp_path / "broken.py"
    recipe.write_text(textwrap.dedent("""\
        from cpt_kit.recipe import Recipe, Model, Train
        RECIPE = Recipe(name="b", model=Model(base="m"),
                        train=Train(learning_rate=-1.0))
    """))
    result = CliRunner().invoke(main, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 2
    assert f"{recipe}:2" in result.output and "train.learning_rate" in result.output


def test_until_and_stage_are_exclusive(tmp_path):
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "demo.py"), "--until", "train",
                                       "--stage", "train"])
    assert result.exit_code == 2 and "either --until or --stage" in result.output


def write_tiny_recipe(folder, name: str, base, corpus, data_extra: str = ""):
    """A fast recipe file for the tiny base (hf backend, 8 steps, Q8_0 only)."""
    recipe = folder / f"{name}.py"
    data_extra = f", {data_extra}" if data_extra else ""
    recipe.write_text(textwrap.dedent(f"""\
        from cpt_kit.recipe import Data, Eval, Export, Lora, Model, Recipe, TokenizerExtension, Train
        RECIPE = Recipe(
            name={name!r},
            model=Model(base={str(base)!r}, max_seq_length=64),
            lora=Lora(r=8, lora_alpha=16),
            data=Data(sources=({str(corpus)!r},), heldout_fraction=0.1, min_train_blocks=4{data_extra}),
            train=Train(backend="hf", learning_rate=2e-3, embedding_learning_rate=5e-4, max_steps=8,
                        per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=4,
                        save_steps=4, warmup_ratio=0.0, gradient_checkpointing=False),
            eval=Eval(prompts=("La kato",), max_new_tokens=4, max_blocks=8),
            export=Export(quantizations=("Q8_0",)),
        )
    """))
    return recipe


@pytest.mark.slow
def test_run_whole_pipeline_then_rerun_skips(tiny_base, target_texts, write_corpus, tmp_path, monkeypatch):
    """`cpt-kit run` on a tiny recipe: every stage done, outputs present, verify passed; a rerun
    skips everything; a changed recipe is refused without --force."""
    recipe = write_tiny_recipe(tmp_path, "tiny-cli", tiny_base, write_corpus(target_texts, "eo"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtokenVALUE")
    result = invoke("run", str(recipe))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny-cli"
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in STAGES)
    assert manifest["stages"]["evaluate"]["metrics"]["ppl_trained"] < manifest["stages"]["evaluate"]["metrics"]["ppl_base"]
    assert json.loads((run / "verify.json").read_text())["passed"] is True
    modelfile = (run / "ollama" / "Modelfile").read_text()
    assert "FROM ../gguf/tiny-cli-Q8_0.gguf" in modelfile and (run / "gguf" / "tiny-cli-Q8_0.gguf").is_file()
    assert "ollama create tiny-cli -f runs/tiny-cli/ollama/Modelfile" in result.output
    assert "hf_SECRETtokenVALUE" not in result.output
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".md", "") and path.stat().st_size < 5e6:
            assert b"hf_SECRETtokenVALUE" not in path.read_bytes(), path

    again = invoke("run", str(recipe))
    assert again.exit_code == 0
    assert again.output.count("done already") == len(STAGES)

    changed = CliRunner().invoke(main, ["run", str(recipe), "--set", "train.learning_rate=1e-3"])
    assert changed.exit_code == 2
    assert "train.learning_rate" in changed.output and "--force" in changed.output


@pytest.mark.slow
def test_extended_vocabulary_goes_all_the_way_to_a_verified_gguf(tiny_base, target_texts, write_corpus, tmp_path,
                                                                 monkeypatch):
    """New-language CPT with tokenizer extension: the grown vocabulary is trained, merged, converted,
    and llama.cpp tokenizes the held-out text exactly like the extended HF tokenizer."""
    recipe = write_tiny_recipe(tmp_path, "ext", tiny_base, write_corpus(target_texts, "eo"),
                               "extend_tokenizer=TokenizerExtension(max_new_tokens=48, min_frequency=3)")
    monkeypatch.chdir(tmp_path)
    result = invoke("run", str(recipe))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "ext"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    added = stages["prepare"]["metrics"]["new_tokens"]
    assert added > 0 and stages["prepare"]["metrics"]["fertility_after"] < stages["prepare"]["metrics"]["fertility_before"]
    base_vocab = json.loads((tiny_base / "config.json").read_text())["vocab_size"]
    assert stages["merge"]["metrics"]["vocab_size"] == base_vocab + added
    assert json.loads((run / "merged" / "config.json").read_text())["vocab_size"] == base_vocab + added
    report = json.loads((run / "verify.json").read_text())
    assert report["passed"] and report["checks"]["tokenizer"]["mismatched"] == 0


def test_force_never_writes_into_a_directory_that_is_not_a_run(tmp_path):
    """The issue's repro: `--force` on a folder of the user's used to replace its data/."""
    mine = tmp_path / "X" / "data" / "mine.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "demo.py"), "--output-dir", str(tmp_path / "X"),
                                       "--until", "prepare", "--force"])
    assert result.exit_code == 2 and "is not a cpt-kit run" in result.output
    assert "--force" not in result.output.split("error:")[1]
    assert mine.read_text() == "mine" and sorted(p.name for p in (tmp_path / "X").rglob("*")) == ["data", "mine.txt"]


def test_recipe_that_is_not_python_is_a_clear_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\n")
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == 2 and "not a Python file" in result.output and "recipes/demo.py" in result.output
    assert "internal error" not in result.output


def _recipe_with_base(tmp_path, base) -> str:
    recipe = tmp_path / "r.py"
    recipe.write_text(f"from cpt_kit.recipe import Model, Recipe, Train\n"
                      f"RECIPE = Recipe(name='r', model=Model(base={str(base)!r}), train=Train(backend='hf'))\n")
    return str(recipe)


def test_invalid_base_is_reported_before_a_run_directory_exists(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, tmp_path / "no-such-model"),
                                       "--output-dir", str(out)])
    assert result.exit_code == 2 and "model.base" in result.output and "does not exist" in result.output
    assert not out.exists()


@pytest.mark.parametrize("kind", ["broken_config", "tiny_missing", "tiny_empty"])
def test_unusable_base_is_a_clear_error_before_a_run_directory_exists(tmp_path, kind):
    base = tmp_path / "model"
    base.mkdir()
    if kind == "broken_config":
        (base / "config.json").write_text('{\n  "model_type": "llama",\n  "vocab_size": 32000,,\n}\n')
    name = {"broken_config": base, "tiny_missing": f"tiny:{tmp_path / 'nonexistent'}", "tiny_empty": f"tiny:{base}"}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, name[kind]), "--output-dir", str(out)])
    assert result.exit_code == 2 and "model.base" in result.output and "internal error" not in result.output
    if kind == "broken_config":
        assert f"{base / 'config.json'}:3:" in result.output and "not valid JSON" in result.output
    else:
        assert ("is not a folder" if kind == "tiny_missing" else "no .txt files") in result.output
    assert not out.exists()


def test_base_needing_remote_code_names_the_setting_and_the_risk(tmp_path):
    base = tmp_path / "custom-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                                                   "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, base), "--output-dir", str(out)])
    assert result.exit_code == 2 and "--set model.trust_remote_code=true" in result.output
    assert "runs the repository's code" in result.output and "internal error" not in result.output
    assert not out.exists()
    allowed = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, base), "--output-dir", str(out),
                                        "--set", "model.trust_remote_code=true", "--dry-run"])
    assert allowed.exit_code == 0, allowed.output


def test_failed_run_prints_the_failure_first_and_no_next_step(tmp_path, monkeypatch, stand_in_stages):
    """Stand-in stages (test_pipeline) through the real CLI: verify fails after modelfile wrote a Modelfile."""
    monkeypatch.setenv("FAIL_STAGE", "verify")
    monkeypatch.setenv("MODELFILE_FILES", "Modelfile")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, "someone/base"), "--output-dir", str(out)])
    assert result.exit_code == 2
    text = result.output
    assert text.index("error:") < text.index("cpt-kit run:") < text.index("the run failed at verify")
    assert "next:" not in text and "ollama create" not in text
    monkeypatch.delenv("FAIL_STAGE")
    fixed = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, "someone/base"), "--output-dir", str(out)])
    assert fixed.exit_code == 0 and "next: ollama create r" in fixed.output


def test_a_stale_verify_gets_no_next_step(tmp_path, monkeypatch, stand_in_stages):
    """`--stage gguf --force` on a finished run leaves verify stale: the Modelfile's GGUF is unchecked."""
    monkeypatch.setenv("MODELFILE_FILES", "Modelfile")
    out = tmp_path / "run"
    recipe = _recipe_with_base(tmp_path, "someone/base")
    assert CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out)]).exit_code == 0
    result = CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out), "--stage", "gguf", "--force"])
    assert result.exit_code == 0, result.output
    assert "ollama create" not in result.output
    assert "not ready:" in result.output and "verify" in result.output.split("not ready:")[1]


def test_a_busy_run_directory_is_refused_without_the_other_runs_state(tmp_path, stand_in_stages):
    from test_run_lock import _holder

    out = tmp_path / "run"
    recipe = _recipe_with_base(tmp_path, "someone/base")
    assert CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out), "--until", "prepare"]).exit_code == 0
    holder = _holder(out)
    try:
        result = CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2
    assert f"another cpt-kit run is using this run directory: pid {holder.pid}" in result.output
    assert "cpt-kit run:" not in result.output and "the run failed" not in result.output


@pytest.fixture()
def real_report_stage(stand_in_stages, monkeypatch):
    """Stand-in stages (test_pipeline), except the real report stage."""
    from cpt_kit import pipeline

    monkeypatch.setattr(pipeline, "STAGE_TABLE", tuple(
        dataclasses.replace(s, module="cpt_kit.report") if s.name == "report" else s for s in pipeline.STAGE_TABLE))


def test_a_run_that_fails_after_prepare_still_writes_its_report(tmp_path, monkeypatch, real_report_stage):
    monkeypatch.setenv("FAIL_STAGE", "safety")
    monkeypatch.setenv("MODELFILE_FILES", "Modelfile")
    out, recipe = tmp_path / "run", _recipe_with_base(tmp_path, "someone/base")
    result = CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out)])
    assert result.exit_code == 2
    text = result.output
    assert text.index("error: corpus/: corpus too small") < text.index("report of the failed run: ") \
        < text.index("the run failed at safety")
    report = (out / "report.md").read_text()
    assert "**This run failed at safety.**" in report and "safety: corpus/: corpus too small" in report
    assert "ollama create" not in report
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["safety"]["status"] == "failed" and stages["report"]["status"] == "stale"
    monkeypatch.delenv("FAIL_STAGE")
    fixed = CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out)])
    assert fixed.exit_code == 0 and "written while the run had failed at safety" in fixed.output
    report = (out / "report.md").read_text()
    assert "This run failed" not in report and f"ollama create r -f {out / 'ollama' / 'Modelfile'}" in report
    assert json.loads((out / "manifest.json").read_text())["stages"]["report"]["status"] == "done"


def test_a_report_that_fails_does_not_mask_the_run_failure(tmp_path, monkeypatch, stand_in_stages):
    monkeypatch.setenv("FAIL_STAGE", "verify")
    monkeypatch.setenv("CRASH_STAGE", "report")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, "someone/base"), "--output-dir", str(out)])
    assert result.exit_code == 2
    text = result.output
    assert text.index("error: corpus/: corpus too small") < text.index(
        "the report of this failed run could not be written: ZeroDivisionError: boom") < text.index(
        "the run failed at verify")
    assert "ZeroDivisionError" in (out / "logs" / "report-error.log").read_text()
    assert not (out / "logs" / "error.log").exists()


def test_a_crash_after_prepare_still_writes_the_report_and_keeps_its_traceback(tmp_path, monkeypatch,
                                                                               real_report_stage):
    monkeypatch.setenv("CRASH_STAGE", "verify")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", _recipe_with_base(tmp_path, "someone/base"), "--output-dir", str(out)])
    assert result.exit_code == 1
    assert "internal error: ZeroDivisionError: boom" in result.output
    assert "ZeroDivisionError" in (out / "logs" / "error.log").read_text()
    assert "**This run failed at verify.**" in (out / "report.md").read_text()


@pytest.mark.parametrize("flags", [["--until", "verify"], ["--stage", "verify"]])
def test_a_run_that_stops_before_the_report_writes_none_when_it_fails(tmp_path, monkeypatch, real_report_stage, flags):
    out, recipe = tmp_path / "run", _recipe_with_base(tmp_path, "someone/base")
    if flags[0] == "--stage":
        assert CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out), "--until", "modelfile"]).exit_code == 0
    monkeypatch.setenv("FAIL_STAGE", "verify")
    result = CliRunner().invoke(main, ["run", recipe, "--output-dir", str(out), *flags])
    assert result.exit_code == 2 and "corpus too small" in result.output
    assert not (out / "report.md").exists()
