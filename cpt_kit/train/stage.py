"""The train stage: LoRA continued pretraining on the packed blocks of data/ (or, with
train.objective="sft", supervised fine-tuning on its conversations), into adapter/.

Reads data/train, data/heldout (one column `input_ids`, fixed-length blocks), data/tokenizer/
and, when present, data/tokenizer_extension.json. Writes checkpoints/checkpoint-N/ every
`train.save_steps`, logs/train.jsonl, and adapter/ (PEFT adapter with embed_tokens/lm_head as
full weights, the tokenizer, cpt_kit_train.json) atomically. A rerun with the same fingerprint
(interrupted, or finished and adapter/ deleted) resumes from its last complete checkpoint; any other
run removes the `checkpoint-N/` folders and logs/train.jsonl first (nothing else in checkpoints/).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cpt_kit.errors import DataError, TrainingError
from cpt_kit.rundir import atomic_path, atomic_write_json
from cpt_kit.run_files import checkpoint_problem, checkpoints_newest_first

EXTRA_CALLBACKS: list[Any] = []
"""TrainerCallbacks added to every run of the stage (a seam for tests and benchmarks)."""


def run(ctx) -> dict[str, Any]:
    return train(ctx, EXTRA_CALLBACKS)


def train(ctx, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run the stage; `callbacks` (extra TrainerCallbacks) exist for tests and benchmarks."""
    from cpt_kit.train.backend import choose_backend, get_backend
    backend_name, backend_reason = choose_backend(ctx.recipe.train.backend, ctx.hardware.device)
    backend = get_backend(backend_name)  # imports unsloth first, if chosen

    from cpt_kit.train.backend import TrainSetup, embedding_parameters, resolve_optim
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from cpt_kit.train.callbacks import NanGuard, TrainLog, TrainProgress, first_non_finite_parameter
    from cpt_kit.run_files import read_extension
    from cpt_kit.train.embeddings import tie_record, tie_summary
    from cpt_kit.hardware import CPU_4BIT_NOTE, resolve_precision, use_4bit, use_gradient_checkpointing
    from cpt_kit.lineage import describe as describe_lineage, record_lineage
    from cpt_kit.model_source import load_kwargs, resolve_base

    recipe, run_dir, hw = ctx.recipe, ctx.run, ctx.hardware
    # first, before anything can fail: checkpoints of another fingerprint must not survive a failed start
    checkpoint = resume_checkpoint(run_dir.checkpoints, ctx.log) if ctx.resume else None
    log_path = run_dir.logs / "train.jsonl"
    if checkpoint is None:
        removed = remove_training_files(run_dir.checkpoints, log_path)
        if removed:
            ctx.log(f"training from the start: removed {', '.join(removed)} (an earlier training's working files)")
    else:
        ctx.log(f"resuming from {checkpoint.name} (the last complete checkpoint of this stage with the same inputs)")
    chat = recipe.train.objective == "sft"
    if chat:
        from cpt_kit.train import chat_data
        train_ds, eval_ds = chat_data.load_conversations(run_dir.data)
    else:
        train_ds, eval_ds = load_blocks(run_dir.data, recipe.model.max_seq_length)
    tokenizer_dir = run_dir.tokenizer
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise DataError(f"{tokenizer_dir} has no tokenizer", where=str(tokenizer_dir),
                        hint="run the prepare stage first (cpt-kit run RECIPE --until prepare)")
    load_in_4bit = use_4bit(recipe, hw)
    if recipe.model.load_in_4bit and not load_in_4bit and CPU_4BIT_NOTE not in ctx.notes:
        ctx.log(CPU_4BIT_NOTE)  # (`cpt-kit run` has shown it before the run already)
    precision = resolve_precision(recipe, hw)
    extension = read_extension(run_dir.data / "tokenizer_extension.json")
    embeddings_enabled = bool(chat and extension and extension.get("added") and not recipe.lora.train_embeddings)
    if embeddings_enabled:
        ctx.log("[yellow]the chat template's new tokens need trained embeddings: embed_tokens and lm_head are "
                "trained although lora.train_embeddings=False[/yellow]")
    setup = TrainSetup(recipe=recipe, base=resolve_base(recipe.model), load_kwargs=load_kwargs(recipe.model),
                       tokenizer_dir=tokenizer_dir, device=hw.device, precision=precision,
                       load_in_4bit=load_in_4bit, optim=resolve_optim(recipe, hw.device),
                       gradient_checkpointing=use_gradient_checkpointing(recipe, hw), output_dir=run_dir.checkpoints,
                       extension=extension, train_embeddings=recipe.lora.train_embeddings or embeddings_enabled)
    ctx.log(f"backend {backend.name} ({backend_reason}), precision {precision}, "
            f"{'4-bit' if load_in_4bit else 'unquantized'} base, optimizer {setup.optim}, gradient checkpointing "
            f"{'on' if setup.gradient_checkpointing else 'off'}, "
            f"{len(train_ds)} train / {len(eval_ds)} held-out {'conversations' if chat else 'blocks'}")

    from transformers import set_seed
    set_seed(recipe.train.seed)  # before LoRA's random init: the same seed gives the same adapter
    model, tokenizer = backend.load_model(setup)
    base_config = _base_text_config(setup)
    base_vocab, tied_base = int(base_config.vocab_size), bool(getattr(base_config, "tie_word_embeddings", False))
    vocab_size = model.get_input_embeddings().weight.shape[0]
    t = recipe.train
    row_tokens = recipe.model.max_seq_length
    collate = None
    chain = record_lineage(ctx.manifest, recipe.model)
    if chain:
        ctx.log(f"base lineage: {describe_lineage(chain)}")
    model.config.use_cache = False  # training builds no KV cache (with one, packed rows would attend across)
    if chat:
        train_ds, collate, row_tokens = chat_data.training_inputs(model, tokenizer, train_ds, recipe, backend.name)
    tokens_per_step = round(t.per_device_train_batch_size * t.gradient_accumulation_steps * row_tokens)
    log = TrainLog(log_path, tokens_per_step, hw.device, {id(p) for p in embedding_parameters(model)})
    if checkpoint is not None:
        log.read_earlier(checkpoint_step(checkpoint))  # the losses before it, for the stage's metrics
    trainer = backend.make_trainer(setup, model, tokenizer, train_ds, eval_ds,
                                   [log, NanGuard(precision), TrainProgress(ctx.console, tokens_per_step), *callbacks],
                                   collate)
    for noisy in (PrinterCallback, ProgressCallback):  # TrainProgress shows the same, on one line
        trainer.remove_callback(noisy)
    started = time.perf_counter()
    if checkpoint is not None and training_finished(checkpoint):
        # the end of training (adapter/ was deleted): the adapter is its weights, no step is trained again
        ctx.log(f"{checkpoint.name} is the last step of training: writing the adapter from it")
        load_checkpoint_adapter(model, checkpoint)
        trainer.state = type(trainer.state).load_from_json(str(checkpoint / "trainer_state.json"))
        runtime = 0.0
    else:
        runtime = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).metrics.get(
            "train_runtime", 0.0)
    final_eval = None
    if len(eval_ds):
        last = log.eval_losses[-1] if log.eval_losses else None
        final_eval = last[1] if last and last[0] == trainer.state.global_step else trainer.evaluate()["eval_loss"]
    seconds = time.perf_counter() - started
    bad = first_non_finite_parameter(model)
    if bad:
        raise TrainingError(f"trainable weight {bad} is not finite after training; the adapter was not saved",
                            where="train", hint="lower train.learning_rate, or use --set train.precision=fp32")

    tie = tie_record(model, tied_base)
    save_adapter(run_dir.adapter, model, tokenizer_dir, dict(
        base=setup.base, base_vocab_size=base_vocab, vocab_size=vocab_size, backend=backend.name,
        precision=precision, loaded_in_4bit=load_in_4bit,
        learning_rate=t.learning_rate, embedding_learning_rate=t.embedding_learning_rate,
        lora=dict(r=recipe.lora.r, lora_alpha=recipe.lora.lora_alpha, use_rslora=recipe.lora.use_rslora,
                  target_modules=list(recipe.lora.target_modules), modules_to_save=setup.modules_to_save),
        tokenizer_extended=bool(setup.extension and setup.extension.get("added")), objective=t.objective,
        embeddings_enabled_for_chat_tokens=embeddings_enabled,
        steps=trainer.state.global_step, final_eval_loss=final_eval, **tie))
    if tied_base:
        ctx.log(f"tied embeddings: {tie_summary(tie)}; lm_head "
                + ("is the trained embed_tokens (one matrix)" if tie["embedding_tie"] == "kept" else
                   "and embed_tokens are separate matrices now"))
    losses = [loss for _, loss in log.losses]
    steps = trainer.state.global_step
    metrics = dict(
        backend=backend.name, backend_reason=backend_reason, precision=precision, loaded_in_4bit=load_in_4bit,
        gradient_checkpointing=setup.gradient_checkpointing, steps=steps,
        resumed_from_step=checkpoint_step(checkpoint) if checkpoint else None,
        first_train_loss=losses[0] if losses else None, last_train_loss=losses[-1] if losses else None,
        final_eval_loss=final_eval, train_tokens=steps * tokens_per_step,
        tokens_per_second=round(log.steps_this_session * tokens_per_step / log.train_seconds, 1)
        if log.train_seconds else None,
        seconds=round(seconds, 2), train_runtime=round(runtime, 2),
        tied_base=tied_base, embedding_tie=tie["embedding_tie"], tie=tie_summary(tie),
        headline=["first_train_loss", "last_train_loss", "final_eval_loss", "tokens_per_second", "backend",
                  "backend_reason", "tie"])
    if chat:
        metrics.update(objective="sft", packing=t.packing, train_rows=len(train_ds),
                       embeddings_enabled_for_chat_tokens=embeddings_enabled)
        if embeddings_enabled:
            metrics["headline"].append("embeddings_enabled_for_chat_tokens")
    return metrics


def load_blocks(data_dir: Path, seq_len: int):
    """data/train and data/heldout as datasets with `input_ids` rows of exactly seq_len ids."""
    from cpt_kit.run_files import load_prepared_split

    sets = []
    for name in ("train", "heldout"):
        path, ds = load_prepared_split(data_dir, name)
        if "input_ids" not in ds.column_names:
            raise DataError(f"{path} has no input_ids column (columns: {ds.column_names})", where=str(path),
                            hint="rerun the prepare stage")
        if len(ds) and len(ds[0]["input_ids"]) != seq_len:
            raise DataError(f"{path} holds blocks of {len(ds[0]['input_ids'])} tokens, the recipe trains on "
                            f"{seq_len}", where="model.max_seq_length", hint="rerun the prepare stage")
        sets.append(ds.select_columns(["input_ids"]))
    if len(sets[0]) == 0:
        raise DataError("no training blocks", where=str(data_dir / "train"), hint="add text to data.sources")
    return sets[0], sets[1]


def resume_checkpoint(checkpoints: Path, log: Callable[[str], None] = lambda message: None) -> Optional[Path]:
    """The newest complete checkpoint, or None. Newer ones that are incomplete or damaged (see
    run_files.checkpoint_problem) are removed, with a message, so training redoes their steps."""
    for _, path in checkpoints_newest_first(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"[yellow]{path.name} cannot be resumed from: {problem}; removed it[/yellow]")
        shutil.rmtree(path)
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def training_finished(checkpoint: Path) -> bool:
    """The checkpoint is of the last step (its trainer_state.json: global_step reached max_steps)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def load_checkpoint_adapter(model: Any, checkpoint: Path) -> None:
    """Put the adapter weights a checkpoint holds (PEFT's adapter_model.safetensors) into `model`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise TrainingError(f"{checkpoint} holds weights the model does not have: {result.unexpected_keys[:3]}",
                            where=str(checkpoint), hint="delete checkpoints/ and run again (training restarts)")


def remove_training_files(checkpoints: Path, log_path: Path) -> list[str]:
    """Remove what a training run writes there: the trainer's `checkpoint-N/` folders and cpt-kit's
    training log. Anything else (a user's `checkpoints/my-best/`) is left. Returns what was removed."""
    removed = []
    for _, path in sorted(checkpoints_newest_first(checkpoints)):
        shutil.rmtree(path)
        removed.append(f"{checkpoints.name}/{path.name}")
    if log_path.is_file():
        log_path.unlink()
        removed.append(f"{log_path.parent.name}/{log_path.name}")
    return removed


def save_adapter(adapter_dir: Path, model: Any, tokenizer_dir: Path, info: dict[str, Any]) -> None:
    """PEFT adapter + the prepared tokenizer files (copied) + cpt_kit_train.json, renamed into place at once."""
    with atomic_path(adapter_dir) as tmp:
        model.save_pretrained(str(tmp))
        # The tokenizer prepare saved, byte for byte: a re-save through transformers 5 would drop
        # settings such as "legacy" (SentencePiece spacing after special tokens).
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file():
                shutil.copyfile(item, tmp / item.name)
        atomic_write_json(tmp / "cpt_kit_train.json", info)


def _base_text_config(setup):
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(setup.base, **setup.load_kwargs)
    return getattr(config, "get_text_config", lambda: config)()
