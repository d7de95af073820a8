"""What the machine can do, and the recipe checks that depend on it (run before any model loads)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from cpt_kit.errors import RecipeError
from cpt_kit.recipe import Recipe


CPU_4BIT_NOTE = ("no GPU: loading the base in 16/32-bit instead of 4-bit (bitsandbytes 4-bit with trainable "
                 "embeddings needs CUDA; on CPU 4-bit saves nothing that matters)")


@dataclass(frozen=True)
class Hardware:
    device: str
    """cuda or cpu."""
    name: str
    """GPU name, or the CPU's description."""
    bf16: bool
    """Whether bf16 compute is supported (Ampere and newer on CUDA)."""
    memory_gb: float
    """GPU memory in GiB (0 on CPU)."""


def detect() -> Hardware:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, torch.cuda.is_bf16_supported(), props.total_memory / 2**30)
    import platform
    return Hardware("cpu", platform.processor() or platform.machine(), False, 0.0)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_threads() -> int:
    """Threads for llama.cpp's CPU work (quantize, importance matrix): OMP_NUM_THREADS when set (the
    variable that also sets torch's threads), else the CPUs this process may use: its affinity
    (taskset, a container's cpuset) capped by a cgroup CPU quota (`docker --cpus`). Not
    os.cpu_count(): inside a container that is the host's count, and llama.cpp threads that outnumber
    the usable CPUs spin-wait on each other and run many times slower."""
    wanted = os.environ.get("OMP_NUM_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            usable = min(usable, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, usable)


def check_recipe_against_hardware(recipe: Recipe, hw: Hardware) -> list[str]:
    """Raise for settings this machine cannot run; return notes about what cpt-kit adapts."""
    notes = []
    precision = recipe.train.precision
    if hw.device == "cuda" and precision == "bf16" and not hw.bf16:
        raise RecipeError(f"bf16 was requested but {hw.name} has no bf16 support", where="train.precision",
                          hint="use --set train.precision=fp16 (or auto); T4 and V100 GPUs need fp16")
    if hw.device == "cuda" and recipe.model.dtype == "bfloat16" and not hw.bf16:
        raise RecipeError(f"bfloat16 weights were requested but {hw.name} has no bf16 support",
                          where="model.dtype", hint="use --set model.dtype=float16 (or auto)")
    if hw.device == "cpu" and precision in ("fp16", "bf16"):
        raise RecipeError(f"{precision} mixed precision needs a GPU; this machine has none",
                          where="train.precision", hint="use --set train.precision=auto (fp32 on CPU)")
    if hw.device == "cpu" and recipe.model.load_in_4bit:
        notes.append(CPU_4BIT_NOTE)
    return notes


def resolve_precision(recipe: Recipe, hw: Hardware) -> str:
    """fp32, fp16 or bf16: what training uses on this machine."""
    if recipe.train.precision != "auto":
        return recipe.train.precision
    if hw.device != "cuda":
        return "fp32"
    return "bf16" if hw.bf16 else "fp16"


def use_4bit(recipe: Recipe, hw: Hardware) -> bool:
    return recipe.model.load_in_4bit and hw.device == "cuda"


def use_gradient_checkpointing(recipe: Recipe, hw: Hardware) -> bool:
    """train.gradient_checkpointing resolved: auto is on with a GPU (memory is the limit there) and
    off on CPU, where it only adds recomputation (bench/train.py: hf+gc vs hf)."""
    setting = recipe.train.gradient_checkpointing
    return hw.device == "cuda" if setting == "auto" else bool(setting)
