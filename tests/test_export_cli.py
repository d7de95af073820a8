"""`cpt-kit export`: a plain PEFT adapter + base, and an existing run directory."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cpt_kit.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    from test_merge import make_adapter
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter") / "my-adapter")


@pytest.mark.slow
def test_export_adapter_then_run_dir(adapter_dir, tiny_base, tmp_path):
    out = tmp_path / "run"
    result = invoke("export", "--adapter", adapter_dir, "--base", tiny_base, "--output-dir", out,
                    "--name", "eo", "--until", "gguf", "--set", "export.quantizations=Q8_0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "eo" and manifest["recipe"]["model"]["base"] == str(tiny_base)
    assert manifest["recipe"]["lora"]["r"] == 4 and manifest["recipe"]["lora"]["use_rslora"] is True
    for stage in ("prepare", "train", "evaluate"):
        assert manifest["stages"][stage]["status"] == "external"
    assert manifest["stages"]["merge"]["status"] == "done"
    assert manifest["stages"]["merge"]["metrics"]["merge_math_rel_diff"] < 1e-5
    assert manifest["stages"]["gguf"]["status"] == "done" and "modelfile" not in manifest["stages"]
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["eo-F16.gguf", "eo-Q8_0.gguf"]
    assert json.loads((out / "adapter" / "cpt_kit_train.json").read_text())["external"] is True

    again = invoke("export", "--adapter", adapter_dir, "--base", tiny_base, "--output-dir", out,
                   "--name", "eo", "--until", "gguf", "--set", "export.quantizations=Q8_0")
    assert again.exit_code == 0, again.output
    assert "merge: done already" in again.output and "gguf: done already" in again.output

    changed = invoke("export", out, "--until", "gguf", "--set", "export.quantizations=Q4_K_M")
    assert changed.exit_code == 2 and "--force" in changed.output
    forced = invoke("export", out, "--until", "gguf", "--set", "export.quantizations=Q4_K_M", "--force")
    assert forced.exit_code == 0, forced.output
    assert "merge: done already" in forced.output
    assert (out / "gguf" / "eo-Q4_K_M.gguf").is_file()


@pytest.mark.slow
def test_export_adapter_through_verify_without_heldout_data(adapter_dir, tiny_base, tmp_path):
    """A plain adapter has no held-out data: verify compares perplexity on its probe texts instead."""
    out = tmp_path / "run"
    result = invoke("export", "--adapter", adapter_dir, "--base", tiny_base, "--output-dir", out,
                    "--name", "eo", "--set", "export.quantizations=Q8_0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] is True
    assert report["checks"]["perplexity"]["block_source"] == "probe_texts"
    assert report["checks"]["perplexity"]["blocks"] >= 1
    assert (out / "ollama" / "Modelfile").read_text().startswith("FROM ../gguf/eo-Q8_0.gguf")


def test_export_usage_errors(adapter_dir, tmp_path):
    assert invoke("export").exit_code == 2
    assert invoke("export", tmp_path, "--adapter", adapter_dir).exit_code == 2
    not_a_run = invoke("export", tmp_path)
    assert not_a_run.exit_code == 2 and "not a cpt-kit run" in not_a_run.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("x")
    result = invoke("export", "--adapter", adapter_dir, "--output-dir", busy)
    assert result.exit_code == 2 and "not a cpt-kit run" in result.output


def test_recipe_for_adapter_reads_adapter_config(adapter_dir):
    from cpt_kit.export.from_adapter import recipe_for_adapter

    recipe = recipe_for_adapter(adapter_dir, None, "x", ["export.outtype=bf16"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert recipe.model.base == config["base_model_name_or_path"] and recipe.model.load_in_4bit is False
    assert recipe.lora.lora_alpha == 8 and recipe.lora.train_embeddings is True
    assert recipe.export.outtype == "bf16"
