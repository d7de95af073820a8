"""The merge stage: ORIGINAL 16-bit base + `adapter/` -> `merged/`, checked against PEFT's logits.

The merged directory is built under a temporary name; it is renamed to `merged/` only after the
logits of the merged model (transformers, fp32) match those of base + adapter (PEFT, fp32) on a
probe batch within a tolerance that depends on the dtype the weights are written in.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpt_kit.errors import ExportError
from cpt_kit.export.verify_stage import heldout_texts
from cpt_kit.rundir import atomic_path
from cpt_kit.train.stage import read_train_info

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}
"""Largest accepted |merged - PEFT| logit difference relative to the largest |PEFT logit|, by weight dtype."""


def resolve_merge_base(ctx) -> Path:
    """The ORIGINAL base weights: the base the train stage recorded, else the recipe's; hub ids are downloaded."""
    from cpt_kit.model_source import load_kwargs, resolve_base

    base = read_train_info(ctx.run.adapter, required=False).get("base") or resolve_base(ctx.recipe.model)
    if Path(base).expanduser().exists():
        return Path(base).expanduser()
    from huggingface_hub import snapshot_download

    kwargs = load_kwargs(ctx.recipe.model)
    try:
        return Path(snapshot_download(base, revision=kwargs.get("revision"), token=kwargs.get("token"),
                                      allow_patterns=["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]))
    except Exception as exc:
        raise ExportError(f"cannot download the base {base!r} for the merge: {exc}", where="model.base",
                          hint="point model.base to a local copy of the original 16-bit model") from None


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


def compare_logits(base_dir: Path, adapter_dir: Path, merged_dir: Path, ids) -> dict:
    """Max abs / relative difference of merged-model logits vs base + adapter in PEFT (both fp32).

    Runs on the GPU when there is one (fp32 needs 4 bytes per parameter there), else on the CPU;
    both models are placed explicitly, whatever device Unsloth's patches would pick.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    placement = {"dtype": torch.float32, "device_map": {"": device}}
    vocab = AutoConfig.from_pretrained(merged_dir).vocab_size
    ids = ids.to(device)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, **placement)
        if base.get_input_embeddings().weight.shape[0] != vocab:
            base.resize_token_embeddings(vocab, mean_resizing=False)
        reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        expected = reference(input_ids=ids).logits.float().cpu()
        del reference, base
        if device == "cuda":
            torch.cuda.empty_cache()
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, **placement).eval()
        actual = merged(input_ids=ids).logits.float().cpu()
        del merged
    max_abs = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    return {"max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_abs / max(scale, 1e-12),
            "probe_tokens": int(ids.numel()), "check_device": device}


def tokenizer_source(run, base: Path) -> Path:
    """The tokenizer training used: saved with the adapter, else the run's data/tokenizer, else the base's."""
    for candidate in (run.adapter, run.tokenizer):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    return base


def run(ctx) -> dict:
    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.progress import progress

    run_dir = ctx.run
    if not (run_dir.adapter / "adapter_config.json").is_file():
        raise ExportError(f"no adapter in {run_dir.adapter}", where=str(run_dir.root), hint="run the train stage first")
    info = read_train_info(run_dir.adapter, required=False)
    base = resolve_merge_base(ctx)
    if info.get("loaded_in_4bit"):
        ctx.log(f"the adapter was trained on a 4-bit base; merging onto the original 16-bit weights in {base}")
    tokenizer_dir = tokenizer_source(run_dir, base)
    ctx.log(f"merging {run_dir.adapter} onto {base} (tokenizer from {tokenizer_dir})")
    with atomic_path(run_dir.merged) as tmp:
        with progress(ctx.console, "merge", None, unit="tensors") as bar:
            metrics = merge_adapter(base, run_dir.adapter, tmp, tokenizer_dir=tokenizer_dir, log=ctx.log,
                                    progress=bar)
        dtype = weight_dtype(tmp)
        ids = probe_ids(tmp, metrics["vocab_size"] or info.get("vocab_size") or 2, heldout_texts(run_dir, limit=2))
        check = compare_logits(base, run_dir.adapter, tmp, ids)
        check["tolerance"] = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
        check["dtype"] = dtype
        ctx.log(f"merged vs base+adapter logits: max abs diff {check['max_abs_logit_diff']:.3g}, "
                f"relative {check['max_rel_logit_diff']:.3g} (tolerance {check['tolerance']:g}, weights in {dtype})")
        if not check["max_rel_logit_diff"] <= check["tolerance"]:
            raise ExportError(f"the merged model's logits differ from base + adapter by {check['max_rel_logit_diff']:.3g} "
                              f"(relative; tolerance {check['tolerance']:g})", where=str(run_dir.adapter),
                              hint="the adapter does not fit this base, or the merge is wrong; merged/ was not written")
    metrics.update(check, base=str(base), headline=["max_abs_logit_diff", "max_rel_logit_diff", "untied", "vocab_size"])
    return metrics
