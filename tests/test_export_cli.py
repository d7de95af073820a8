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
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["eo-F16.gguf", "eo-Q8_0.gguf", "quality.json"]
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
    assert [p.name for p in busy.iterdir()] == ["something.txt"]  # nothing written, not even a lock


def test_recipe_for_adapter_reads_adapter_config(adapter_dir):
    from cpt_kit.export.from_adapter import recipe_for_adapter

    recipe = recipe_for_adapter(adapter_dir, None, "x", ["export.outtype=bf16"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert recipe.model.base == config["base_model_name_or_path"] and recipe.model.load_in_4bit is False
    assert recipe.lora.lora_alpha == 8 and recipe.lora.train_embeddings is True
    assert recipe.export.outtype == "bf16"


@pytest.fixture(scope="module")
def biased_base(tiny_base, tmp_path_factory):
    """The tiny Llama with attention biases (Qwen2-style q/k/v/o biases), so bias options mean something."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("biased") / "base"
    config = AutoConfig.from_pretrained(tiny_base)
    config.attention_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(out)
    for item in tiny_base.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", "generation_config.json"):
            shutil.copyfile(item, out / item.name)
    return out


PLAIN_ADAPTERS = {  # no modules_to_save: what most LoRA adapters people have look like
    "q_v_only": dict(target_modules=["q_proj", "v_proj"], use_rslora=False),
    "all_linear_rslora": dict(target_modules="all-linear", use_rslora=True),
    "bias_all": dict(target_modules=["q_proj", "v_proj"], bias="all", use_rslora=False),
    "bias_lora_only": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="lora_only", use_rslora=True),
    "lora_bias": dict(target_modules=["q_proj", "v_proj"], lora_bias=True, use_rslora=False),
}


def test_recipe_for_a_plain_adapter_is_valid(tmp_path):
    """Without modules_to_save the recipe trains no embeddings, so it has no embedding learning rate
    (the default one made the recipe invalid before any --set could apply)."""
    from cpt_kit.export.from_adapter import recipe_for_adapter

    adapter = tmp_path / "plain"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": False, "modules_to_save": None,
        "base_model_name_or_path": "some/base",
        "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"]}))
    recipe = recipe_for_adapter(adapter, None, "plain", ["export.quantizations=Q8_0"])
    assert recipe.lora.train_embeddings is False and recipe.train.embedding_learning_rate is None
    assert recipe.lora.target_modules == ("q_proj", "v_proj") and recipe.lora.r == 16
    assert recipe.lora.use_rslora is False and recipe.export.quantizations == ("Q8_0",)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PLAIN_ADAPTERS))
def test_export_plain_lora_adapter(kind, biased_base, tmp_path):
    from test_merge import make_adapter

    adapter = make_adapter(biased_base, tmp_path / kind, modules_to_save=(), **PLAIN_ADAPTERS[kind])
    out = tmp_path / "run"
    result = invoke("export", "--adapter", adapter, "--base", biased_base, "--output-dir", out, "--until", "merge")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    merge = manifest["stages"]["merge"]
    assert merge["status"] == "done" and merge["metrics"]["merge_math_rel_diff"] < 1e-4, merge["metrics"]
    assert manifest["recipe"]["lora"]["use_rslora"] is PLAIN_ADAPTERS[kind]["use_rslora"]
    assert manifest["recipe"]["lora"]["train_embeddings"] is False
    if kind.startswith("bias"):  # the trained biases are in the merged weights
        assert any(name.endswith("q_proj.bias") for name in merge["metrics"]["full_modules"])


@pytest.mark.slow
def test_changed_adapter_is_exported_again(biased_base, tmp_path):
    """A new adapter copied into an existing export run: merge and everything after it are redone."""
    from stage_helpers import base_tensors
    from test_merge import make_adapter

    out = tmp_path / "run"
    first = make_adapter(biased_base, tmp_path / "a1" / "adapter", modules_to_save=(), seed=1)
    args = ["--base", biased_base, "--output-dir", out, "--name", "eo", "--until", "gguf",
            "--set", "export.quantizations=Q8_0"]
    assert invoke("export", "--adapter", first, *args).exit_code == 0
    merged_before = base_tensors(out / "merged")
    gguf_before = (out / "gguf" / "eo-Q8_0.gguf").read_bytes()

    second = make_adapter(biased_base, tmp_path / "a2" / "adapter", modules_to_save=(), seed=2)
    again = invoke("export", "--adapter", second, *args)
    assert again.exit_code == 0, again.output
    assert "inputs changed: adapter/adapter_model.safetensors" in again.output
    assert "merge: done already" not in again.output and "gguf: done already" not in again.output
    merged_after = base_tensors(out / "merged")
    assert any(not (merged_after[k] == merged_before[k]).all() for k in merged_before)
    assert (out / "gguf" / "eo-Q8_0.gguf").read_bytes() != gguf_before


def _tree(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("force", [False, True])
def test_export_adapter_never_replaces_an_adapter_cpt_kit_trained(adapter_dir, tiny_base, tmp_path, force):
    """A run whose train stage cpt-kit ran: `export --adapter ... --output-dir RUN` is refused before
    anything is copied, whatever the flags and whatever --name says."""
    import shutil

    from cpt_kit.file_records import records
    from cpt_kit.manifest import Manifest
    from cpt_kit.recipe import Model, Recipe

    run = tmp_path / "demo"
    shutil.copytree(adapter_dir, run / "adapter")
    (run / "adapter" / "cpt_kit_train.json").write_text(json.dumps({"base": str(tiny_base), "steps": 40}))
    manifest = Manifest.load(run / "manifest.json")
    manifest.data["recipe"] = Recipe(name="demo", model=Model(base=str(tiny_base))).to_dict()
    manifest.start("train", "f00d", {})
    manifest.finish("train", {"steps": 40}, 1.0, records(run, ["adapter"]))
    before = _tree(run / "adapter")
    other = tmp_path / "other-adapter"
    shutil.copytree(adapter_dir, other)
    (other / "adapter_model.safetensors").write_bytes(b"another adapter")
    args = ["export", "--adapter", other, "--base", tiny_base, "--output-dir", run, "--name", "demo"]
    result = invoke(*args, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert "whose adapter cpt-kit trained" in result.output and f"cpt-kit export {run}" in result.output
    assert _tree(run / "adapter") == before
    assert json.loads((run / "manifest.json").read_text())["stages"]["train"]["status"] == "done"


@pytest.mark.slow
def test_export_adapter_keeps_files_it_did_not_copy(tiny_base, tmp_path):
    """A note in adapter/ is not replaced: a changed adapter is refused until it is moved out; the same
    adapter again redoes nothing; files the previous adapter had and the new one has not are removed."""
    from test_merge import make_adapter

    first = make_adapter(tiny_base, tmp_path / "a1" / "adapter", seed=1)
    (first / "extra.txt").write_text("only in the first adapter")
    second = make_adapter(tiny_base, tmp_path / "a2" / "adapter", seed=2)
    out = tmp_path / "E1"
    args = ["--base", tiny_base, "--output-dir", out, "--name", "eo", "--until", "merge"]
    assert invoke("export", "--adapter", first, *args).exit_code == 0
    (out / "adapter" / "NOTES.md").write_text("notes")
    before = _tree(out / "adapter")

    refused = invoke("export", "--adapter", second, *args)
    assert refused.exit_code == 2 and "adapter/NOTES.md" in refused.output and "move them out" in refused.output
    assert _tree(out / "adapter") == before

    same = invoke("export", "--adapter", first, *args)
    assert same.exit_code == 0 and "merge: done already" in same.output, same.output
    assert _tree(out / "adapter") == before

    (out / "adapter" / "NOTES.md").rename(tmp_path / "NOTES.md")
    changed = invoke("export", "--adapter", second, *args)
    assert changed.exit_code == 0, changed.output
    assert "merge: done already" not in changed.output
    assert sorted(_tree(out / "adapter")) == sorted([p.name for p in second.iterdir()] + ["cpt_kit_train.json"])
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (second / "adapter_model.safetensors").read_bytes()
