"""Trainer callbacks: logs/train.jsonl (loss, both learning rates, tokens/s, memory) and the NaN guard.

Both work with either backend: they only read what every transformers Trainer passes to its
callbacks (the logs, the optimizer, the model).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from cpt_kit.errors import TrainingError


def memory_mb(device: str) -> float:
    """Peak memory of this process so far: CUDA max allocated, or on CPU the peak resident set
    size (VmHWM; the current RSS after a step is far below the peak reached inside it)."""
    if device == "cuda":
        import torch
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def group_learning_rates(optimizer: Any) -> tuple[Optional[float], Optional[float]]:
    """(LoRA learning rate, embedding learning rate) as the optimizer uses them now."""
    if optimizer is None:
        return None, None
    lora = embed = None
    embed_ids = getattr(optimizer, "cpt_kit_embedding_ids", set())
    for group in getattr(optimizer, "param_groups", []):
        if not group["params"]:
            continue
        is_embed = group.get("cpt_kit_embeddings") or any(id(p) in embed_ids for p in group["params"])
        if is_embed and embed is None:
            embed = float(group["lr"])
        elif not is_embed and lora is None:
            lora = float(group["lr"])
    return lora, embed


class TrainLog(TrainerCallback):
    """Writes one JSON object per logging step (and per evaluation) to logs/train.jsonl."""

    def __init__(self, path: Path, tokens_per_step: int, device: str, embedding_ids: set[int]):
        self.path = Path(path)
        self.tokens_per_step = tokens_per_step
        self.device = device
        self.embedding_ids = embedding_ids
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.train_seconds = 0.0
        self.steps_this_session = 0
        self._interval_seconds = 0.0
        self._interval_steps = 0
        self._step_started: Optional[float] = None

    def read_earlier(self, up_to_step: int) -> None:
        """Take the losses an earlier session logged up to `up_to_step` (the checkpoint resumed from), so
        first/last loss cover the whole training; later records (steps redone) are not taken."""
        if not self.path.is_file():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill
                continue
            if record.get("step", up_to_step + 1) > up_to_step:
                continue
            if "loss" in record:
                self.losses.append((record["step"], float(record["loss"])))
            elif "eval_loss" in record:
                self.eval_losses.append((record["step"], float(record["eval_loss"])))

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            optimizer.cpt_kit_embedding_ids = self.embedding_ids
        self._write({"event": "train_begin", "step": state.global_step, "max_steps": state.max_steps,
                     "time": time.time()})

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            self.train_seconds += elapsed
            self._interval_seconds += elapsed
            self._interval_steps += 1
            self.steps_this_session += 1
            self._step_started = None

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        logs = dict(logs or {})
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            lr, embed_lr = group_learning_rates(optimizer)
            tps = (self._interval_steps * self.tokens_per_step / self._interval_seconds
                   if self._interval_seconds > 0 else None)
            record.update(loss=float(logs["loss"]), learning_rate=lr, embedding_learning_rate=embed_lr,
                          grad_norm=_float(logs.get("grad_norm")),
                          tokens_per_second=round(tps, 1) if tps else None, memory_mb=memory_mb(self.device))
            self._interval_seconds, self._interval_steps = 0.0, 0
            self.losses.append((state.global_step, float(logs["loss"])))
        elif "eval_loss" in logs:
            record.update(eval_loss=float(logs["eval_loss"]))
            self.eval_losses.append((state.global_step, float(logs["eval_loss"])))
        else:
            return
        self._write(record)


class NanGuard(TrainerCallback):
    """Stops training on a NaN/inf loss, and never lets a non-finite state be saved.

    The logged loss is checked at every logging step (the trainer's NaN filter is turned off so
    a NaN is not averaged away); before every checkpoint the trainable weights are checked too.
    Raising inside the trainer's log/step hooks aborts before the save of that step.
    """

    def __init__(self, precision: str):
        self.precision = precision

    def _fail(self, step: int, what: str) -> None:
        hint = "lower train.learning_rate (and train.embedding_learning_rate)"
        if self.precision != "fp32":
            hint += ", or use --set train.precision=fp32"
        hint += "; the last good checkpoint in checkpoints/ is kept, rerun resumes from it only if the recipe is unchanged"
        raise TrainingError(f"training diverged at step {step}: {what}", where="train", hint=hint)

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = ("loss", "eval_loss") if self.precision == "fp16" else ("loss", "eval_loss", "grad_norm")
        for key in keys:  # fp16's loss scaler skips steps with inf gradients by design
            value = _float((logs or {}).get(key))
            if value is not None and not math.isfinite(value):
                self._fail(state.global_step, f"{key} is {value}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if (control.should_save or control.should_training_stop) and model is not None:
            name = first_non_finite_parameter(model)
            if name:
                self._fail(state.global_step, f"trainable weight {name} is not finite")


def first_non_finite_parameter(model: Any) -> Optional[str]:
    import torch
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param).all()):
            return name
    return None


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class TrainProgress(TrainerCallback):
    """Training progress (step/total, loss, eval loss, tokens/s, elapsed, ETA) through
    `cpt_kit.progress`: a bar on a terminal, a plain line every few steps or seconds in a log file.
    It replaces the trainer's tqdm bars and printed log dicts, which interleave into an unreadable screen."""

    def __init__(self, console: Any, tokens_per_step: int):
        self.console = console
        self.tokens_per_step = tokens_per_step
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):
        from cpt_kit.progress import progress

        self.progress = progress(self.console, "train", state.max_steps, unit="steps", completed=state.global_step,
                                 rate_scale=self.tokens_per_step, rate_unit="tok/s")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None and not control.should_log:  # else on_log moves on, with this step's loss
            self.progress.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.progress is not None:
            fields = {name: f"{float(logs[key]):.3f}" for name, key in (("loss", "loss"), ("eval", "eval_loss"))
                      if key in logs}
            self.progress.update(state.global_step, force="eval_loss" in logs, **fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step)
            self.progress.close()
            self.progress = None
