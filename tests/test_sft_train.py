"""SFT training: packing without cross-contamination, hf and Unsloth runs (assistant loss goes down,
new chat tokens trained), base from a run directory / adapter folder, lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stage_helpers import adapter_tensors, read_jsonl, run_until
from test_sft_data import chat_rows, write_jsonl

from cpt_kit.errors import RecipeError
from cpt_kit.recipe import Data, Eval, Export, Lora, Model, Recipe, Sft, Train


def sft_recipe(base, source, seq: int = 96, **train) -> Recipe:
    settings = dict(objective="sft", backend="hf", learning_rate=3e-3, embedding_learning_rate=None, max_steps=16,
                    per_device_train_batch_size=4, gradient_accumulation_steps=1, eval_steps=8, save_steps=8,
                    warmup_ratio=0.0, gradient_checkpointing=False)
    settings.update(train)
    return Recipe(name="chat", model=Model(base=str(base), max_seq_length=seq, load_in_4bit=False),
                  lora=Lora(r=8, lora_alpha=16, train_embeddings=False),
                  data=Data(sources=(source,), heldout_fraction=0.15),
                  train=Train(**settings), eval=Eval(max_new_tokens=0, max_blocks=8),
                  export=Export(quantizations=("Q8_0",)), sft=Sft())


def test_packed_conversations_do_not_attend_to_each_other(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_kit.train.chat_data import collator, packing_isolated

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    model.config.use_cache = False  # as the train stage sets it
    a = {"input_ids": [1, 50, 51, 52, 53, 54], "labels": [-100, -100, -100, 52, 53, 54]}
    b = {"input_ids": [1, 60, 61, 62, 63], "labels": [-100, -100, 61, 62, 63]}
    batch = collator(pad_token_id=0, packing=True)([a, b])
    assert "attention_mask" not in batch and batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    assert batch["labels"][0, 6].item() == -100  # no token is predicted across the boundary
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    assert torch.allclose(packed[6:], alone, atol=1e-5)  # b sees nothing of a
    assert packing_isolated(model, 0)
    model.config.use_cache = True  # transformers then ignores the boundaries: the guard must see it
    assert not packing_isolated(model, 0)
    padded = collator(pad_token_id=0, packing=False)([a, b])
    assert padded["attention_mask"][1].tolist() == [1] * 5 + [0] and padded["labels"][1, 5].item() == -100


def test_padding_share_lower_with_packing():
    from datasets import Dataset

    from cpt_kit.train.chat_data import pack, padding_share

    ds = Dataset.from_dict({"input_ids": [[1] * n for n in (10, 60, 12, 50, 8, 70, 9, 40)],
                            "labels": [[1] * n for n in (10, 60, 12, 50, 8, 70, 9, 40)]})
    packed = pack(ds, 96)
    assert len(packed) < len(ds) and sum(map(len, packed["input_ids"])) == sum(map(len, ds["input_ids"]))
    assert padding_share(ds, 4, False, 96) > 0.3 and padding_share(packed, 4, True, 96) == 0.0


def check_sft_run(root: Path, backend: str) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    metrics = manifest["stages"]["train"]["metrics"]
    assert metrics["backend"] == backend and metrics["objective"] == "sft"
    losses = [r["loss"] for r in read_jsonl(root / "logs" / "train.jsonl") if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8  # assistant-token loss goes down
    assert metrics["embeddings_enabled_for_chat_tokens"] is True  # lora.train_embeddings was False
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) >= {"embed_tokens", "lm_head"}
    tensors = adapter_tensors(root / "adapter")
    embed = next(v for k, v in tensors.items() if "embed_tokens" in k)
    assert embed.shape[0] == 1002  # <|im_start|>, <|im_end|> added
    info = json.loads((root / "adapter" / "cpt_kit_train.json").read_text())
    assert info["objective"] == "sft" and info["vocab_size"] == 1002
    for split in ("train", "heldout"):  # training wrote no dataset cache into prepare's (recorded) output
        assert sorted(p.name for p in (root / "data" / split).iterdir()) == \
            ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_hf_sft_run(tmp_path, tiny_base, packing):
    import torch

    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    recipe = sft_recipe(tiny_base, source, seq=160, packing=packing)
    root = tmp_path / "run"
    run_until(recipe, root, "train")
    metrics = check_sft_run(root, "hf")
    assert metrics["packing"] is packing
    conversations = json.loads((root / "manifest.json").read_text())["stages"]["prepare"]["metrics"]["train_conversations"]
    assert (metrics["train_rows"] <= conversations // 2) is packing  # ~50-token conversations, 160-token rows
    # the new control-token rows started as the mean of the old rows and were trained away from it
    from safetensors.torch import load_file
    base = load_file(str(next(Path(tiny_base).glob("*.safetensors"))))["model.embed_tokens.weight"]
    embed = next(v for k, v in adapter_tensors(root / "adapter").items() if "embed_tokens" in k)
    mean = base.float().mean(0)
    assert not torch.allclose(embed[1001].float(), mean, atol=1e-4)
    assert torch.allclose(embed[1001].float(), mean, atol=0.5)


UNSLOTH_SCRIPT = """
import json, sys
from pathlib import Path
import unsloth  # first, as in a real run
sys.path.insert(0, sys.argv[3])
from cpt_kit.recipe import recipe_from_dict
from stage_helpers import run_until
run_until(recipe_from_dict(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]), "train")
"""


@pytest.mark.slow
def test_unsloth_sft_run(tmp_path, tiny_base):
    pytest.importorskip("unsloth")
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    recipe = sft_recipe(tiny_base, source, backend="unsloth")
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe.to_dict()))
    root = tmp_path / "run"
    env = dict(os.environ, UNSLOTH_SKIP_TORCHVISION_CHECK="1", PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", UNSLOTH_SCRIPT, str(recipe_file), str(root),
                           str(Path(__file__).parent)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_sft_run(root, "unsloth")


def test_run_directory_base_without_merge_names_stage_and_command(tmp_path):
    from cpt_kit.model_source import resolve_base

    run = tmp_path / "language"
    (run / "adapter").mkdir(parents=True)
    manifest = {"recipe": {"name": "language"}, "stages": {"train": {"status": "done"}, "merge": {"status": "failed"}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecipeError, match=rf"(?s)merge stage is failed.*cpt-kit export {run}"):
        resolve_base(Model(base=str(run)))
    manifest["stages"] = {"prepare": {"status": "done"}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    (run / "adapter").rmdir()
    with pytest.raises(RecipeError, match=r"(?s)train stage is not run.*--until merge"):
        resolve_base(Model(base=str(run)))
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    with pytest.raises(RecipeError, match="no config.json"):
        resolve_base(Model(base=str(not_a_model)))


def test_peft_adapter_folder_as_base_is_merged_once_and_recorded(tmp_path, tiny_base, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cpt_kit.lineage import lineage
    from cpt_kit.model_source import resolve_base

    monkeypatch.setenv("CPT_KIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = Path(resolve_base(Model(base=str(adapter))))
    assert merged.parent == tmp_path / "cache" and (merged / "config.json").is_file()
    with torch.no_grad():
        actual = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(actual, expected, atol=1e-4)
    stamp = (merged / "config.json").stat().st_mtime_ns
    assert Path(resolve_base(Model(base=str(adapter)))) == merged and (merged / "config.json").stat().st_mtime_ns == stamp
    chain = lineage(Model(base=str(adapter)))
    assert [c["kind"] for c in chain] == ["adapter"] and chain[0]["base"] == str(tiny_base)
    assert chain[0]["name"] == "adapter" and chain[0]["adapter_sha256"]
