"""`cpt-kit plan`: will a recipe fit a device, and how long will it train? No weights are loaded.

    shapes.py    model shape from config.json (or a table of the shipped recipes' hub models)
    gpus.py      devices: memory, peak FLOPS, bf16
    estimate.py  peak memory by part and FLOPs per token for LoRA on a frozen (4-bit) base
    tokens.py    how many token positions training computes on (padding of SFT batches included)
    (here)       the recipe -> settings, the verdict, and the changes that make a run fit
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cpt_kit.planner.estimate import CPU_UTILISATION, GIB, UTILISATION, Estimate, Settings, estimate
from cpt_kit.planner.gpus import Device
from cpt_kit.planner.shapes import ModelShape, shape_for_base
from cpt_kit.planner.tokens import train_tokens


@dataclass(frozen=True)
class Advice:
    assignments: tuple[str, ...]
    """The KEY=VALUE recipe overrides that make it fit."""
    needed_gib: float
    note: str = ""
    """What the change costs, when it is more than memory or speed."""

    @property
    def cli(self) -> str:
        """The change as `cpt-kit run`/`plan` arguments, one --set per key, ready to paste."""
        return " ".join(f"--set {a}" for a in self.assignments) + (f"  ({self.note})" if self.note else "")


@dataclass(frozen=True)
class TrainingPlan:
    shape: ModelShape
    device: Device
    settings: Settings
    estimate: Estimate
    train_tokens: int | None
    tokens_source: str
    flops_per_token: float
    """At the rows' real length (an SFT batch's longest row; attention grows with it)."""
    advice: tuple[Advice, ...]

    @property
    def needed_gib(self) -> float:
        return self.estimate.needed_gib(self.device.cuda)

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.device.memory_gib

    @property
    def hours(self) -> float | None:
        if self.train_tokens is None:
            return None
        util = UTILISATION[self.settings.backend] if self.device.cuda else CPU_UTILISATION
        return self.train_tokens * self.flops_per_token / (self.device.peak_tflops * 1e12 * util) / 3600

    def to_dict(self) -> dict:
        return {"model": self.shape.name, "device": self.device.name, "device_memory_gib": self.device.memory_gib,
                "settings": dataclasses.asdict(self.settings),
                "parts_gib": {k: round(v / GIB, 3) for k, v in self.estimate.parts.items()},
                "peak_gib": round(self.estimate.peak_bytes / GIB, 3), "needed_gib": round(self.needed_gib, 3),
                "fits": self.fits, "params_total": self.shape.total_params,
                "params_trainable": self.estimate.trainable_params,
                "flops_per_token": self.flops_per_token, "train_tokens": self.train_tokens,
                "tokens_source": self.tokens_source, "hours": self.hours,
                "advice": [dataclasses.asdict(a) for a in self.advice]}


def settings_for(recipe, device: Device) -> Settings:
    t = recipe.train
    backend = t.backend if t.backend != "auto" else ("unsloth" if device.cuda else "hf")
    checkpointing = t.gradient_checkpointing
    if not isinstance(checkpointing, bool):  # "auto": on where memory is scarce (GPU), off on CPU
        checkpointing = device.cuda
    return Settings(batch_size=t.per_device_train_batch_size, seq_len=recipe.model.max_seq_length,
                    r=recipe.lora.r, targets=tuple(recipe.lora.target_modules),
                    train_embeddings=recipe.lora.train_embeddings,
                    load_in_4bit=recipe.model.load_in_4bit and device.cuda,
                    gradient_checkpointing=checkpointing, backend=backend, cuda=device.cuda,
                    eight_bit_optimizer="8bit" in t.optim or (t.optim == "auto" and device.cuda),
                    padded_batches=t.objective == "sft" and not t.packing)


def plan_recipe(recipe, device: Device, *, shape: ModelShape | None = None,
                run_dir: Path | None = None) -> TrainingPlan:
    shape = shape or shape_for_base(recipe.model.base, recipe.model.revision)
    settings = settings_for(recipe, device)
    est = estimate(shape, settings)
    count = train_tokens(recipe, run_dir)
    flops = estimate(shape, dataclasses.replace(settings, seq_len=max(1, round(count.row_length)))).flops_per_token
    plan = TrainingPlan(shape, device, settings, est, count.tokens, count.source, flops, ())
    if not plan.fits:
        plan = dataclasses.replace(plan, advice=tuple(fitting_changes(shape, settings, device, recipe)))
    return plan


def fitting_changes(shape: ModelShape, s: Settings, device: Device, recipe) -> list[Advice]:
    """Single changes that make the run fit, else the smallest combination found, cheapest first."""
    accum = recipe.train.gradient_accumulation_steps
    candidates: list[tuple[tuple[str, ...], Settings, str]] = []
    if not s.gradient_checkpointing:
        candidates.append((("train.gradient_checkpointing=true",), dataclasses.replace(s, gradient_checkpointing=True), ""))
    if device.cuda and not s.load_in_4bit:
        candidates.append((("model.load_in_4bit=true",), dataclasses.replace(s, load_in_4bit=True), ""))
    batch, factor = s.batch_size, 1
    while batch > 1:
        batch, factor = batch // 2, factor * 2
        candidates.append(((f"train.per_device_train_batch_size={batch}",
                            f"train.gradient_accumulation_steps={accum * factor}"),
                           dataclasses.replace(s, batch_size=batch), ""))
    seq = s.seq_len
    while seq > 512:
        seq //= 2
        candidates.append(((f"model.max_seq_length={seq}",), dataclasses.replace(s, seq_len=seq), ""))
    r = s.r
    while r > 8:
        r //= 2
        candidates.append(((f"lora.r={r}",), dataclasses.replace(s, r=r), ""))
    if s.train_embeddings:
        candidates.append((("lora.train_embeddings=false", "train.embedding_learning_rate=none"),
                           dataclasses.replace(s, train_embeddings=False), "a new language then cannot learn new embeddings"))

    def needed(settings: Settings) -> float:
        return estimate(shape, settings).needed_gib(device.cuda)

    fits = [Advice(change, needed(st), note) for change, st, note in candidates if needed(st) <= device.memory_gib]
    if fits:
        return fits[:4]
    combined, changes, notes = s, {}, []
    for change, st, note in candidates:  # apply in order until it fits; a later value of a key replaces the earlier
        combined = _merge(combined, st, s)
        changes.update((a.split("=")[0], a) for a in change)
        notes += [note] if note else []
        if needed(combined) <= device.memory_gib:
            return [Advice(tuple(changes.values()), needed(combined), "; ".join(notes))]
    return []


def _merge(current: Settings, candidate: Settings, original: Settings) -> Settings:
    """`current` with every field that `candidate` changed relative to `original`."""
    changed = {f.name: getattr(candidate, f.name) for f in dataclasses.fields(Settings)
               if getattr(candidate, f.name) != getattr(original, f.name)}
    return dataclasses.replace(current, **changed)


def describe(plan: TrainingPlan) -> list[str]:
    """The plan as lines for the terminal (rich markup)."""
    s, shape = plan.settings, plan.shape
    lines = [f"{shape.name}: {shape.total_params / 1e6:,.0f}M parameters, vocabulary {shape.vocab_size:,}"
             f"{', tied embeddings' if shape.tied_embeddings else ''}; trainable {plan.estimate.trainable_params / 1e6:,.1f}M",
             f"on {plan.device.name}: {s.backend}, {'4-bit' if s.load_in_4bit else '16-bit' if s.cuda else '32-bit'} base, "
             f"batch {s.batch_size} x seq {s.seq_len}, r={s.r}, "
             f"gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"]
    for part, size in plan.estimate.parts.items():
        lines.append(f"  {part:<22} {size / GIB:7.2f} GiB")
    extra = "allocator + CUDA context" if s.cuda else "Python/torch runtime"
    lines.append(f"  {'peak (with ' + extra + ')':<22} {plan.needed_gib:7.2f} GiB of {plan.device.memory_gib:g} GiB")
    if plan.fits:
        lines.append("[green]fits[/green]")
    else:
        lines.append(f"[red]does not fit[/red] ({plan.needed_gib:.1f} GiB needed, {plan.device.memory_gib:g} GiB there)")
        for advice in plan.advice:
            lines.append(f"  fits with {advice.cli}  ({advice.needed_gib:.1f} GiB)")
        if not plan.advice:
            lines.append("  nothing in reach fits: use a smaller model or a larger device")
    if plan.hours is not None:
        lines.append(f"time: ~{_duration(plan.hours)} for {plan.train_tokens:,} tokens ({plan.tokens_source}); "
                     f"{plan.flops_per_token / 1e9:.2f} GFLOP/token")
    else:
        lines.append(f"time: unknown ({plan.tokens_source}); {plan.flops_per_token / 1e9:.2f} GFLOP/token")
    return lines


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    return f"{hours * 60:.0f} min" if hours < 2 else f"{hours:.1f} h"


@dataclass(frozen=True)
class GpuCheck:
    """What `cpt-kit run` prints before it starts on a GPU."""

    text: str
    warning: bool = False
    """True when no estimate was possible (the run goes on unchecked)."""


def check_fits_this_gpu(recipe, run_dir: Path | None) -> GpuCheck | None:
    """Before `cpt-kit run` loads anything on a GPU: raise if the plan says the run cannot fit this
    GPU (with the changes that would make it fit), else the estimate in one line; a warning when the
    base's shape is unknown offline (the run is not blocked for it). None on CPU."""
    from cpt_kit.errors import CptKitError
    from cpt_kit.planner.gpus import detected_device
    from cpt_kit.planner.shapes import UnknownShape

    gpu = detected_device()
    if gpu is None:
        return None
    try:
        plan = plan_recipe(recipe, gpu, run_dir=run_dir)
    except UnknownShape:
        return GpuCheck(f"no memory estimate for {recipe.model.base!r}: its config.json is neither local, nor in the "
                        "Hugging Face cache, nor in the planner's table; starting without the check. To get one: "
                        "download its config.json and run `cpt-kit plan RECIPE --config path/to/config.json`",
                        warning=True)
    if not plan.fits:
        advice = "; or ".join(a.cli for a in plan.advice) or "a smaller model or a larger GPU"
        raise CptKitError(f"this run needs about {plan.needed_gib:.1f} GiB and {gpu.name} has {gpu.memory_gib:.1f} GiB "
                          "(`cpt-kit plan` shows the breakdown)", where="model / lora / train",
                          hint=f"it fits with {advice}; or pass --skip-plan-check to try anyway")
    time = f", ~{_duration(plan.hours)} of training" if plan.hours is not None else ""
    return GpuCheck(f"plan: about {plan.needed_gib:.1f} of {gpu.memory_gib:.1f} GiB on {gpu.name}{time}")
