"""The devices `cpt-kit plan --gpu` knows: memory, peak dense 16-bit throughput, bf16 support.

Peak TFLOPS are the vendors' dense (no sparsity) fp16/bf16 tensor-core figures. Training never
reaches them: the planner multiplies by a utilisation measured on a real run (see UTILISATION
in cpt_kit.planner.estimate and BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpt_kit.errors import CptKitError


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    memory_gib: float
    """Memory a training process can use (a T4 shows 15.0 GiB of its 16 GB in Colab)."""
    peak_tflops: float
    bf16: bool
    cuda: bool = True


DEVICES = {d.key: d for d in (
    Device("t4", "NVIDIA T4 (Colab free tier)", 15.0, 65.0, bf16=False),
    Device("l4", "NVIDIA L4", 22.0, 121.0, bf16=True),
    Device("a10g", "NVIDIA A10G", 22.0, 125.0, bf16=True),
    Device("a100-40gb", "NVIDIA A100 40GB", 39.4, 312.0, bf16=True),
    Device("a100-80gb", "NVIDIA A100 80GB", 79.1, 312.0, bf16=True),
    Device("h100", "NVIDIA H100 80GB", 79.1, 989.0, bf16=True),
    # this project's 2-core CI machine: AVX2 FMA fp32, 2 cores x ~3 GHz x 32 FLOP/cycle
    Device("cpu", "CPU (2 cores, AVX2, fp32)", 24.0, 0.19, bf16=False, cuda=False),
)}


def device(key: str) -> Device:
    try:
        return DEVICES[key]
    except KeyError:
        raise CptKitError(f"unknown device {key!r}", where="--gpu", hint="one of " + ", ".join(DEVICES)) from None


def detected_device() -> Device | None:
    """The local GPU as a Device (memory from the driver, throughput from the table when the name
    matches), or None on a machine without CUDA."""
    from cpt_kit.hardware import detect

    hw = detect()
    if hw.device != "cuda":
        return None
    lowered = hw.name.lower()
    known = next((d for key, d in DEVICES.items() if d.cuda and key.split("-")[0] in lowered), None)
    peak = known.peak_tflops if known else 100.0
    return Device("detected", hw.name, hw.memory_gb, peak, hw.bf16)
