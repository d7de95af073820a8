"""Train stage: unit tests (fast) and hf-backend end-to-end runs (slow).

The Unsloth backend's end-to-end run is in test_train_unsloth.py (its own process, because
`import unsloth` patches transformers/peft/trl for the whole process).
"""

from __future__ import annotations

import json
import math

import pytest

from stage_helpers import adapter_tensors, base_tensors, read_jsonl, run_until

EMBED_KEY = "base_model.model.model.embed_tokens.weight"
HEAD_KEY = "base_model.model.lm_head.weight"


# ----------------------------------------------------------------------------- fast unit tests

def test_resume_checkpoint_picks_newest_complete(tmp_path):
    from cpt_kit.train.stage import resume_checkpoint
    assert resume_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert resume_checkpoint(tmp_path).name == "checkpoint-4"


def test_extend_vocabulary_initialises_new_rows_from_subtoken_means(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_kit.train.embeddings import extend_vocabulary

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    old = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    n = old.shape[0]
    ext = {"added": [{"token": "kato", "id": n, "init_ids": [5, 6, 7]}, {"token": "hundo", "id": n + 1, "init_ids": [9]}]}
    assert extend_vocabulary(model, ext) == 2
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == n + 2
    assert torch.allclose(emb[n], old[[5, 6, 7]].mean(0)) and torch.allclose(emb[n + 1], old[9])
    assert torch.allclose(head[n], old_head[[5, 6, 7]].mean(0))
    assert torch.equal(emb[:n], old)
    assert extend_vocabulary(model, None) == 0


def test_embedding_param_groups_separate_rates():
    import torch

    from cpt_kit.train.backend import embedding_param_groups

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(10, 4)
            self.q_proj = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 10, bias=False)

    groups = embedding_param_groups(Tiny(), 1e-3, 1e-4, 0.01)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert len(groups[0]["params"]) == 2 and len(groups[1]["params"]) == 2


@pytest.mark.parametrize("installed", [True, False])
def test_auto_backend_is_hf_on_cpu_and_unsloth_on_a_gpu(monkeypatch, installed):
    from cpt_kit.train import backend

    monkeypatch.setattr(backend, "unsloth_available", lambda: installed)
    name, why = backend.choose_backend("auto", "cpu")
    assert name == "hf" and "no GPU" in why and "faster" in why  # even with unsloth installed
    assert backend.choose_backend("auto", "cuda")[0] == ("unsloth" if installed else "hf")
    assert backend.choose_backend("hf", "cuda") == ("hf", "requested by the recipe")
    if installed:  # the tests' way to run the Unsloth path on CPU: ask for it
        assert backend.choose_backend("unsloth", "cpu") == ("unsloth", "requested by the recipe")
    else:
        from cpt_kit.errors import RecipeError
        with pytest.raises(RecipeError, match="unsloth is not installed"):
            backend.choose_backend("unsloth", "cpu")


def test_cpu_defaults_no_checkpointing_fused_adamw():
    """On CPU gradient checkpointing only costs time (BENCHMARKS.md): auto turns it off there, on with a GPU."""
    from cpt_kit.hardware import Hardware, use_gradient_checkpointing
    from cpt_kit.recipe import Model, Recipe, apply_overrides
    from cpt_kit.train.backend import resolve_optim

    cpu, gpu = Hardware("cpu", "x86_64", False, 0.0), Hardware("cuda", "H100", True, 80.0)
    recipe = Recipe(name="t", model=Model(base="some/model"))
    assert recipe.train.gradient_checkpointing == "auto"
    assert use_gradient_checkpointing(recipe, cpu) is False and use_gradient_checkpointing(recipe, gpu) is True
    forced = apply_overrides(recipe, ["train.gradient_checkpointing=true"])
    assert forced.train.gradient_checkpointing is True and use_gradient_checkpointing(forced, cpu) is True
    off = apply_overrides(recipe, ["train.gradient_checkpointing=false"])
    assert use_gradient_checkpointing(off, gpu) is False
    assert apply_overrides(off, ["train.gradient_checkpointing=auto"]).train.gradient_checkpointing == "auto"
    assert resolve_optim(recipe, "cpu") == "adamw_torch_fused" and resolve_optim(recipe, "cuda") == "adamw_8bit"


def test_missing_data_is_a_clear_error(tmp_path):
    from cpt_kit.errors import DataError
    from cpt_kit.train.stage import load_blocks
    with pytest.raises(DataError, match="prepare stage"):
        load_blocks(tmp_path / "data", 64)


# ----------------------------------------------------------------------------- end to end (hf)

def check_trained_run(root, base_dir, recipe, backend: str) -> dict:
    """Assertions shared by the hf and unsloth end-to-end tests; returns the manifest's metrics."""
    manifest = json.loads((root / "manifest.json").read_text())
    train, ev = manifest["stages"]["train"]["metrics"], manifest["stages"]["evaluate"]["metrics"]
    assert train["backend"] == backend and train["precision"] == "fp32" and train["loaded_in_4bit"] is False
    assert train["steps"] == recipe.train.max_steps
    assert train["last_train_loss"] < train["first_train_loss"]
    assert math.isfinite(train["final_eval_loss"])
    assert ev["ppl_trained"] < ev["ppl_base"]
    # logs/train.jsonl: one record per logging step with loss, both lrs, tokens/s, memory; eval entries
    records = read_jsonl(root / "logs" / "train.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, recipe.train.max_steps + 1))
    assert all(r["tokens_per_second"] > 0 and r["memory_mb"] > 0 for r in steps)
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    # the embeddings had their own learning rate (same schedule, scaled by the ratio of the two rates)
    ratio = recipe.train.embedding_learning_rate / recipe.train.learning_rate
    for r in steps:
        assert r["embedding_learning_rate"] == pytest.approx(r["learning_rate"] * ratio, rel=1e-6)
    assert steps[0]["learning_rate"] != steps[0]["embedding_learning_rate"]
    # adapter: full embed_tokens and lm_head weights, changed from the base
    adapter = adapter_tensors(root / "adapter")
    base = base_tensors(base_dir)
    assert adapter[EMBED_KEY].shape == base["model.embed_tokens.weight"].shape
    assert not adapter[EMBED_KEY].equal(base["model.embed_tokens.weight"])
    head_base = base.get("lm_head.weight", base["model.embed_tokens.weight"])
    assert not adapter[HEAD_KEY].equal(head_base)
    info = json.loads((root / "adapter" / "cpt_kit_train.json").read_text())
    assert info["backend"] == backend and info["vocab_size"] == info["base_vocab_size"]
    assert info["tied_base"] is False and info["embedding_tie"] == "none" and train["tie"] == "base not tied"
    for name in ("tokenizer.json", "tokenizer_config.json", "adapter_config.json"):
        assert (root / "adapter" / name).is_file()
    assert sorted((p.name for p in (root / "checkpoints").glob("checkpoint-*"))) == ["checkpoint-12", "checkpoint-6"]
    ppl = json.loads((root / "eval" / "perplexity.json").read_text())
    assert ppl["sets"]["heldout"]["trained"]["perplexity"] == pytest.approx(ev["ppl_trained"], rel=1e-3)
    samples = json.loads((root / "eval" / "samples.json").read_text())
    assert samples and {"prompt", "before", "after"} <= set(samples[0])
    return {"train": train, "evaluate": ev}


@pytest.mark.slow
def test_hf_backend_end_to_end(tmp_path, tiny_recipe, tiny_base):
    recipe = tiny_recipe()
    root = tmp_path / "run"
    run_until(recipe, root)
    check_trained_run(root, tiny_base, recipe, "hf")
    # the adapter loads with plain PEFT and reproduces the final held-out loss
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                      str(root / "adapter"))
    from datasets import load_from_disk

    from cpt_kit.perplexity import perplexity
    blocks = load_from_disk(str(root / "data" / "heldout"))["input_ids"]
    manifest = json.loads((root / "manifest.json").read_text())
    eval_loss = manifest["stages"]["train"]["metrics"]["final_eval_loss"]
    assert perplexity(model, blocks)["nll_per_token"] == pytest.approx(eval_loss, rel=1e-3)


class PoisonAt:
    """A callback that turns a trainable weight into NaN at the end of `step` (a diverging run)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Poison(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == step:
                    import torch
                    with torch.no_grad():
                        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return _Poison()


class KillAt:
    """A callback that raises KeyboardInterrupt at the end of `step` (a killed run)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt(f"killed at step {step}")
        return _Kill()


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    from cpt_kit.errors import TrainingError
    from cpt_kit.train import stage

    recipe = tiny_recipe(train={"max_steps": 8, "save_steps": 2, "eval_steps": 0})
    root = tmp_path / "run"
    monkeypatch.setattr(stage, "EXTRA_CALLBACKS", [PoisonAt(3)])
    with pytest.raises(TrainingError) as err:
        run_until(recipe, root, "train")
    message = err.value.render()
    assert "diverged at step" in message and "learning_rate" in message
    checkpoints = sorted(p.name for p in (root / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"], checkpoints  # nothing saved from the NaN state
    assert not (root / "adapter").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "failed"


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    from cpt_kit.train import stage

    recipe = tiny_recipe(train={"max_steps": 8, "save_steps": 4, "eval_steps": 0})
    root = tmp_path / "run"
    monkeypatch.setattr(stage, "EXTRA_CALLBACKS", [KillAt(6)])
    with pytest.raises(KeyboardInterrupt):
        run_until(recipe, root, "train")
    assert (root / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file()
    monkeypatch.setattr(stage, "EXTRA_CALLBACKS", [])
    manifest = run_until(recipe, root, "train")
    metrics = manifest.metrics("train")
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 8
    begins = [r["step"] for r in read_jsonl(root / "logs" / "train.jsonl") if r.get("event") == "train_begin"]
    assert begins == [0, 4]
    state = json.loads((root / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert (root / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_deleted_adapter_is_rewritten_from_the_last_checkpoint_and_user_files_in_checkpoints_stay(
        tmp_path, tiny_recipe):
    from stage_helpers import RecordingConsole

    from cpt_kit.pipeline import run_pipeline
    from cpt_kit.rundir import RunDir

    recipe = tiny_recipe(train={"max_steps": 8, "save_steps": 4, "eval_steps": 0})
    root = tmp_path / "run"
    before = run_until(recipe, root, "train").metrics("train")
    adapter_before = adapter_tensors(root / "adapter")
    (root / "checkpoints" / "my-best").mkdir()
    (root / "checkpoints" / "my-best" / "keep.txt").write_text("mine")
    import shutil
    shutil.rmtree(root / "adapter")  # same recipe, same data: the final checkpoint still holds the adapter
    after = run_until(recipe, root, "train").metrics("train")
    assert after["resumed_from_step"] == 8 and after["steps"] == 8  # no step trained again
    assert (after["first_train_loss"], after["last_train_loss"]) == (before["first_train_loss"], before["last_train_loss"])
    assert after["final_eval_loss"] == pytest.approx(before["final_eval_loss"], rel=1e-5)
    adapter_after = adapter_tensors(root / "adapter")
    assert adapter_after.keys() == adapter_before.keys()
    assert all(adapter_after[k].equal(adapter_before[k]) for k in adapter_before)
    begins = [r["step"] for r in read_jsonl(root / "logs" / "train.jsonl") if r.get("event") == "train_begin"]
    assert begins == [0]

    # another recipe: training starts over, removing the trainer's checkpoint-N folders and the log only
    console = RecordingConsole()
    shorter = tiny_recipe(train={"max_steps": 4, "save_steps": 4, "eval_steps": 0})
    run_pipeline(shorter, RunDir(root), console, until="train", force=True)
    assert "removed checkpoints/checkpoint-4, checkpoints/checkpoint-8, logs/train.jsonl" in console.text
    assert (root / "checkpoints" / "my-best" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (root / "checkpoints").glob("*-*")) == ["checkpoint-4", "my-best"]
    begins = [r["step"] for r in read_jsonl(root / "logs" / "train.jsonl") if r.get("event") == "train_begin"]
    assert begins == [0]


def check_tied_base_kept_tied(root, base_dir) -> dict:
    """A tied base trained with train_embeddings: one trained matrix, recorded, merged still tied
    (shared by the hf and the unsloth tests). Returns adapter/cpt_kit_train.json."""
    info = json.loads((root / "adapter" / "cpt_kit_train.json").read_text())
    assert info["tied_base"] is True and info["embedding_tie"] == "kept"
    assert info["embedding_matrix_mib"] == pytest.approx(1000 * 256 * 2 / 2**20, abs=0.05)
    adapter, base = adapter_tensors(root / "adapter"), base_tensors(base_dir)
    assert adapter[EMBED_KEY].equal(adapter[HEAD_KEY])  # lm_head is the trained embed_tokens
    assert not adapter[EMBED_KEY].equal(base["model.embed_tokens.weight"])  # and it was trained
    train = json.loads((root / "manifest.json").read_text())["stages"]["train"]["metrics"]
    assert train["embedding_tie"] == "kept" and train["tie"].startswith("kept (untying would add 0.5 MiB")
    return info


@pytest.mark.slow
def test_tied_base_stays_tied_and_progress_is_printed_without_a_terminal(tmp_path, tiny_recipe, tiny_tied):
    import io

    from rich.console import Console

    from cpt_kit.pipeline import run_pipeline
    from cpt_kit.recipe import Model
    from cpt_kit.rundir import RunDir
    from cpt_kit.summary import print_summary

    recipe = tiny_recipe(model=Model(base=str(tiny_tied), max_seq_length=64, load_in_4bit=False),
                         train={"max_steps": 4, "save_steps": 4, "eval_steps": 2})
    root, out = tmp_path / "run", io.StringIO()
    console = Console(file=out, width=200)  # like nohup or CI: not a terminal
    manifest = run_pipeline(recipe, RunDir(root), console, until="merge")
    check_tied_base_kept_tied(root, tiny_tied)
    merged = json.loads((root / "merged" / "config.json").read_text())
    assert merged.get("tie_word_embeddings", True) is True and manifest.metrics("merge")["untied"] is False
    assert "lm_head.weight" not in base_tensors(root / "merged")
    summary = io.StringIO()
    print_summary(Console(file=summary, width=1000), RunDir(root), manifest)  # wide: no wrapped cells
    assert "tie=kept (untying would add 0.5 MiB F16)" in summary.getvalue()
    assert "backend=hf, backend_reason=requested by the recipe" in summary.getvalue()
    text = out.getvalue()
    # progress lines while training: step/total, loss, eval loss, tokens/s, elapsed, ETA
    lines = [line for line in text.splitlines() if line.startswith("  train  ")]
    assert lines[0].startswith("  train  0/4 steps (0%)")
    assert any(" 2/4 steps (50%)  loss " in line and "eval " in line for line in lines[1:]), lines
    assert "4/4 steps (100%)" in lines[-1] and "tok/s" in lines[-1] and "elapsed" in lines[-1]
    assert any("ETA" in line for line in lines[1:])


def test_trainable_weights_are_put_back_in_fp32(tiny_base):
    """TRL casts QLoRA trainable weights to bf16 (breaks the fp16 grad scaler on a T4, loses small
    embedding updates); the hf backend puts them back in fp32 and leaves frozen weights alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cpt_kit.train.hf_backend import keep_trainable_weights_in_fp32

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # what TRL does for a quantized model
    keep_trainable_weights_in_fp32(model)
    trainable = [p.dtype for p in model.parameters() if p.requires_grad]
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad]
    assert trainable and set(trainable) == {torch.float32}
    assert set(frozen) == {torch.bfloat16}
