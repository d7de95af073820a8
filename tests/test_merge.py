"""Streaming LoRA merge: merged fp32 logits equal PEFT's (a wrong scaling of small deltas is caught), bf16
storage rounding reported apart, tied/untied embeddings, grown vocabulary, shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt_kit.errors import ExportError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, *, modules_to_save=("embed_tokens", "lm_head"), use_rslora=True, r=4,
                 lora_alpha=8, new_tokens=(), seed=1, lora_b_std=0.05, target_modules=TARGETS, **lora_kwargs) -> Path:
    """A PEFT adapter as the train stage writes it: random lora_B, perturbed full modules, tokenizer saved."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if new_tokens:
        tokenizer.add_tokens(list(new_tokens))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, use_rslora=use_rslora,
                        modules_to_save=list(modules_to_save) or None, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, lora_b_std)
            elif "modules_to_save" in name or (name.endswith(".bias") and param.requires_grad):
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (Path(base) / "tokenizer.model").is_file():
        (Path(out) / "tokenizer.model").write_bytes((Path(base) / "tokenizer.model").read_bytes())
    return Path(out)


def merge_and_compare(base: Path, adapter: Path, out: Path) -> tuple[dict, dict]:
    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.export.merge_check import check_merge, probe_ids

    info = merge_adapter(base, adapter, out)
    check = check_merge(base, adapter, out, probe_ids(out, info["vocab_size"], ["La kato sidas sur la mato. " * 8]))
    return info, check


def assert_exact(check: dict) -> None:
    """The merge math reproduces PEFT in fp32 (the oracle), with room to spare under the gate."""
    from cpt_kit.export.merge_check import MATH_TOLERANCE

    assert check["math"]["passed"] and check["math"]["max_rel_logit_diff"] < MATH_TOLERANCE / 5, check


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names |= set(handle.keys())
    return names


@pytest.mark.parametrize("use_rslora", [True, False])
def test_merged_logits_equal_peft(tiny_base, tmp_path, use_rslora):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", use_rslora=use_rslora)
    info, check = merge_and_compare(tiny_base, adapter, tmp_path / "merged")
    assert_exact(check)
    assert info["scaling"] == ("rslora" if use_rslora else "alpha/r")
    assert info["lora_modules"] == 2 * len(TARGETS)
    assert set(info["full_modules"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert not info["untied"] and config_of(tmp_path / "merged")["tie_word_embeddings"] is False
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= set(info["tokenizer_files"])
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_rank_and_alpha_patterns(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", modules_to_save=(), use_rslora=False,
                           rank_pattern={"q_proj": 8}, alpha_pattern={"down_proj": 32})
    _, check = merge_and_compare(tiny_base, adapter, tmp_path / "merged")
    assert_exact(check)


def test_tied_embeddings_trained_differently_are_untied(tiny_tied, tmp_path):
    adapter = make_adapter(tiny_tied, tmp_path / "adapter")
    info, check = merge_and_compare(tiny_tied, adapter, tmp_path / "merged")
    assert_exact(check)
    assert info["tied_base"] and info["untied"] and "different values" in info["untie_reason"]
    assert config_of(tmp_path / "merged")["tie_word_embeddings"] is False
    assert "lm_head.weight" in tensor_names(tmp_path / "merged")


def test_tied_embeddings_kept_tied_when_adapter_keeps_the_tie(tiny_tied, tmp_path):
    adapter = make_adapter(tiny_tied, tmp_path / "adapter", modules_to_save=("embed_tokens",), ensure_weight_tying=True)
    info, check = merge_and_compare(tiny_tied, adapter, tmp_path / "merged")
    assert_exact(check)
    assert info["tied_merged"] and not info["untied"]
    assert config_of(tmp_path / "merged").get("tie_word_embeddings", True) is True
    assert "lm_head.weight" not in tensor_names(tmp_path / "merged")


def test_tied_only_embed_trained_without_tie_reproduces_peft(tiny_tied, tmp_path):
    """PEFT keeps the base weight as lm_head when only embed_tokens is a module to save: untie to match it."""
    adapter = make_adapter(tiny_tied, tmp_path / "adapter", modules_to_save=("embed_tokens",))
    info, check = merge_and_compare(tiny_tied, adapter, tmp_path / "merged")
    assert_exact(check)
    assert info["untied"] and "ensure_weight_tying" in info["untie_reason"]


def test_grown_vocabulary_is_carried_through(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", new_tokens=("ĉiutage", "kolektiĝis", "ŝtonpontoj"))
    info, check = merge_and_compare(tiny_base, adapter, tmp_path / "merged")
    assert_exact(check)
    assert info["base_vocab_size"] == 1000 and info["vocab_size"] == 1003
    assert config_of(tmp_path / "merged")["vocab_size"] == 1003
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == 1003 and tokenizer.convert_tokens_to_ids("ŝtonpontoj") == 1002


def test_multi_shard_bf16_streaming(tmp_path, general_texts):
    import torch
    from safetensors import safe_open

    from cpt_kit.tiny_model import build_tiny_model

    base = build_tiny_model(tmp_path / "base", general_texts[:20], vocab_size=600, dtype="bfloat16",
                            max_shard_size="300KB")
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 3
    adapter = make_adapter(base, tmp_path / "adapter")
    info, check = merge_and_compare(base, adapter, tmp_path / "merged")
    merged = tmp_path / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert info["shards"] == len(set(index["weight_map"].values()))
    total = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(str(merged / shard), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    assert not list(merged.glob(".*partial*"))
    assert_exact(check)
    assert check["storage"]["dtype"] == "bfloat16" and check["storage"]["passed"], check


def test_adapter_for_another_base_is_rejected(tiny_base, tmp_path, general_texts):
    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", general_texts[:20], vocab_size=600, hidden_size=128, intermediate_size=256)
    adapter = make_adapter(other, tmp_path / "adapter", modules_to_save=())
    with pytest.raises(ExportError, match="another base"):
        merge_adapter(tiny_base, adapter, tmp_path / "merged")


def test_quantized_base_is_refused(tiny_base, tmp_path):
    import shutil

    from cpt_kit.export.merge import base_files

    base = tmp_path / "base4bit"
    shutil.copytree(tiny_base, base)
    config = config_of(base)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="16-bit"):
        base_files(base)


def _ctx(recipe, run_root: Path):
    from rich.console import Console

    from cpt_kit.manifest import Manifest
    from cpt_kit.pipeline import StageContext
    from cpt_kit.rundir import RunDir

    run = RunDir(run_root)
    return StageContext(recipe, run, Manifest.load(run.manifest), Console(quiet=True))


def test_merge_stage_writes_merged_and_metrics(tiny_base, tiny_recipe, tmp_path):
    from cpt_kit.export import merge_stage

    ctx = _ctx(tiny_recipe(), tmp_path / "run")
    make_adapter(tiny_base, ctx.run.adapter)
    (ctx.run.adapter / "cpt_kit_train.json").write_text(json.dumps({"base": str(tiny_base), "loaded_in_4bit": True}))
    metrics = merge_stage.run(ctx)
    assert (ctx.run.merged / "config.json").is_file()
    check = metrics["merge_check"]
    assert check["math"]["passed"] and check["storage"]["passed"] and check["storage"]["dtype"] == "float32"
    assert metrics["merge_math_rel_diff"] == check["math"]["max_rel_logit_diff"]
    assert metrics["delta_lost_to_rounding"] == 0.0  # fp32 storage keeps every delta
    assert metrics["base"] == str(tiny_base)
    json.dumps(metrics)


@pytest.mark.parametrize("failing,message", [("math", "fp32, before rounding"), ("storage", "storing the merged weights")])
def test_merge_stage_failed_check_leaves_no_merged_dir(tiny_base, tiny_recipe, tmp_path, monkeypatch, failing, message):
    from cpt_kit.export import merge_check, merge_stage

    ctx = _ctx(tiny_recipe(), tmp_path / "run")
    make_adapter(tiny_base, ctx.run.adapter)
    real = merge_check.check_merge

    def failed(*args):
        check = real(*args)
        check[failing].update(passed=False, max_rel_logit_diff=0.5)
        return check

    monkeypatch.setattr(merge_check, "check_merge", failed)
    with pytest.raises(ExportError, match=message):
        merge_stage.run(ctx)
    assert not ctx.run.merged.exists()
    assert [p.name for p in ctx.run.root.iterdir()] == ["adapter"]


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory, general_texts):
    from cpt_kit.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bf16") / "base", general_texts[:20], vocab_size=600, dtype="bfloat16")


def test_wrong_scaling_of_small_cpt_deltas_is_caught(tiny_bf16, tmp_path, monkeypatch):
    """Small deltas merged with twice the right scaling: the fp32 oracle fails it, while the old check
    (stored bf16 logits vs PEFT at relative 4e-2) would have passed it."""
    from cpt_kit.export import merge

    adapter = make_adapter(tiny_bf16, tmp_path / "adapter", modules_to_save=(), lora_b_std=0.0005)
    _, good = merge_and_compare(tiny_bf16, adapter, tmp_path / "good")
    assert_exact(good)
    scale = good["math"]["max_abs_logit_diff"] / good["math"]["max_rel_logit_diff"]  # largest |logit|
    assert 0 < good["math"]["adapter_effect"] / scale < 0.03  # small deltas: they move logits by under 3%

    right = merge.Adapter.scaling
    monkeypatch.setattr(merge.Adapter, "scaling", lambda self, module: 2.0 * right(self, module))
    _, wrong = merge_and_compare(tiny_bf16, adapter, tmp_path / "wrong")
    assert not wrong["math"]["passed"]
    assert wrong["math"]["error_vs_adapter_effect"] == pytest.approx(1.0, rel=0.2)  # the whole effect again, once too often
    old_style = wrong["math"]["max_rel_logit_diff"] + wrong["storage"]["max_rel_logit_diff"]  # bound on stored vs PEFT
    assert old_style < 4e-2


def test_bf16_storage_rounding_is_reported_apart_from_the_math(tiny_bf16, tmp_path):
    adapter = make_adapter(tiny_bf16, tmp_path / "adapter", modules_to_save=(), lora_b_std=0.0005)
    _, check = merge_and_compare(tiny_bf16, adapter, tmp_path / "merged")
    assert_exact(check)
    storage = check["storage"]
    assert storage["dtype"] == "bfloat16" and storage["passed"]
    assert storage["changed_tensors"] == 2 * len(TARGETS)
    # deltas of the size of a bf16 step: a large part of the training's change does not survive storage
    assert 0.05 < storage["delta_lost_to_rounding"] < 1.5
    assert storage["max_rel_logit_diff"] > 10 * check["math"]["max_rel_logit_diff"]
