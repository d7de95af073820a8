"""Is `merged/` really base + adapter? Two checks on a probe batch, reported separately.

math (the oracle): the merged weights exactly as the merge computes them, in fp32 BEFORE rounding
to the stored dtype, are loaded into the model; its logits must equal those of base + adapter run
by PEFT (fp32) within `MATH_TOLERANCE` of the largest |logit|. In fp32 only summation-order noise
is left (under 1e-6 relative on the test models), so a wrong scaling, a transposed or a missing
delta shows even when training moved the weights very little. The error is also given as a share
of the adapter's own effect on the logits (max |PEFT - base|).

storage: what writing the merged weights in their dtype (bf16/fp16) costs. Logits of the stored
model vs the fp32 merge, gated per dtype by `STORAGE_TOLERANCE` (catches fp16 overflow), and at
weight level the share of the training's change that rounding lost,
||stored - merged|| / ||merged - base|| over the changed tensors: a CPT delta smaller than half a
bf16 step of the base weight vanishes when stored; this number says how much of that happened.
Both run on the GPU when there is one (TF32 off), else on the CPU.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from cpt_kit.errors import ExportError

MATH_TOLERANCE = 1e-4
"""Largest accepted |merged fp32 - PEFT| logit difference relative to the largest |PEFT logit|. Measured
summation-order noise is 6e-7 to 9e-7 on the 2-layer test models; it grows with depth, so the gate keeps
a margin for 30-layer models on GPUs while sitting 400x under the old bf16 gate (4e-2): a factor-2
scaling error is caught whenever the adapter moves the logits by more than 0.01% of their range."""
STORAGE_TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 4e-2}
"""Largest accepted |stored - merged fp32| logit difference relative to the largest |logit|, by stored dtype."""


def weight_dtype(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def probe_ids(model_dir: Path, vocab_size: int, texts: list[str] = (), length: int = 48):
    """A probe batch: tokenized texts (if any) plus a row of deterministic random ids over the whole vocabulary."""
    import torch
    from transformers import AutoTokenizer

    rows = []
    if texts:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for text in texts[:2]:
            ids = tokenizer(text)["input_ids"][:length]
            if len(ids) == length:
                rows.append(ids)
    generator = torch.Generator().manual_seed(0)
    rows.append(torch.randint(vocab_size, (length,), generator=generator).tolist())
    return torch.tensor(rows)


@contextmanager
def _full_fp32():
    """Matmuls in true fp32 (no TF32) for the duration of the check; the previous settings come back."""
    import torch

    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def _stored_tensor(merged_dir: Path, weight_map: dict[str, str], name: str):
    from safetensors import safe_open

    with safe_open(str(Path(merged_dir) / weight_map[name]), framework="pt") as handle:
        return handle.get_tensor(name)


def check_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, ids) -> dict:
    """{"math": {...}, "storage": {...}, "probe_tokens", "check_device"}; each part has `passed`."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_kit.export.merge import base_files, changed_tensors

    device = "cuda" if torch.cuda.is_available() else "cpu"
    placement = {"dtype": torch.float32, "device_map": {"": device}}
    vocab = AutoConfig.from_pretrained(merged_dir).vocab_size
    ids = ids.to(device)
    with torch.no_grad(), _full_fp32():
        base = AutoModelForCausalLM.from_pretrained(base_dir, **placement)
        if base.get_input_embeddings().weight.shape[0] != vocab:
            base.resize_token_embeddings(vocab, mean_resizing=False)
        reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        expected = reference(input_ids=ids).logits.float().cpu()
        with reference.disable_adapter():
            base_logits = reference(input_ids=ids).logits.float().cpu()
        del reference, base
        if device == "cuda":
            torch.cuda.empty_cache()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, **placement).eval()
        stored_logits = merged(input_ids=ids).logits.float().cpu()
        stored_map, _ = base_files(merged_dir)
        lost = change = 0.0
        tensors = 0
        for name, exact, base_value in changed_tensors(base_dir, adapter_dir):
            exact = exact.float()
            if base_value is not None:
                stored = _stored_tensor(merged_dir, stored_map, name).float()
                lost += float((stored - exact).pow(2).sum())
                change += float((exact - base_value.float()).pow(2).sum())
            try:
                merged.get_parameter(name).copy_(exact)
            except AttributeError:
                raise ExportError(f"merged tensor {name} is not a parameter of the loaded model",
                                  where=str(merged_dir),
                                  hint="this architecture renames weights on load; the merge check cannot map them"
                                  ) from None
            tensors += 1
        exact_logits = merged(input_ids=ids).logits.float().cpu()
        del merged
    scale = max(expected.abs().max().item(), 1e-12)
    math_abs = (exact_logits - expected).abs().max().item()
    effect = (expected - base_logits).abs().max().item()
    storage_abs = (stored_logits - exact_logits).abs().max().item()
    dtype = weight_dtype(merged_dir)
    storage_tolerance = STORAGE_TOLERANCE.get(dtype, STORAGE_TOLERANCE["bfloat16"])
    return {
        "math": {"max_abs_logit_diff": math_abs, "max_rel_logit_diff": math_abs / scale, "tolerance": MATH_TOLERANCE,
                 "adapter_effect": effect, "error_vs_adapter_effect": math_abs / effect if effect > 0 else None,
                 "passed": math_abs / scale <= MATH_TOLERANCE},
        "storage": {"dtype": dtype, "max_abs_logit_diff": storage_abs, "max_rel_logit_diff": storage_abs / scale,
                    "tolerance": storage_tolerance, "changed_tensors": tensors,
                    "delta_lost_to_rounding": (lost / change) ** 0.5 if change > 0 else 0.0,
                    "passed": storage_abs / scale <= storage_tolerance},
        "probe_tokens": int(ids.numel()), "check_device": device,
    }
