"""The merge stage: ORIGINAL 16-bit base + `adapter/` -> `merged/`, checked against PEFT's logits.

The merged directory is built under a temporary name; it is renamed to `merged/` only after
`merge_check.check_merge` passes: the merge math in fp32 against base + adapter in PEFT (tight),
and the rounding to the stored dtype, reported separately.
"""

from __future__ import annotations

from pathlib import Path

from cpt_kit.errors import ExportError
from cpt_kit.run_files import heldout_texts, read_train_info
from cpt_kit.rundir import atomic_path


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


def tokenizer_source(run, base: Path) -> Path:
    """The tokenizer training used: saved with the adapter, else the run's data/tokenizer, else the base's."""
    for candidate in (run.adapter, run.tokenizer):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    return base


def run(ctx) -> dict:
    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.export.merge_check import check_merge, probe_ids
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
        ids = probe_ids(tmp, metrics["vocab_size"] or info.get("vocab_size") or 2, heldout_texts(run_dir, limit=2))
        check = check_merge(base, run_dir.adapter, tmp, ids)
        math, storage = check["math"], check["storage"]
        share = math["error_vs_adapter_effect"]
        share_text = f"; {share:.2g} of the adapter's own effect" if share is not None else ""
        ctx.log(f"merge math (fp32) vs base+adapter in PEFT: relative logit diff {math['max_rel_logit_diff']:.3g} "
                f"(tolerance {math['tolerance']:g}{share_text})")
        ctx.log(f"stored in {storage['dtype']}: logits move by {storage['max_rel_logit_diff']:.3g} relative "
                f"(tolerance {storage['tolerance']:g}); rounding lost {storage['delta_lost_to_rounding']:.2%} "
                f"of the training's weight change")
        if not math["passed"]:
            raise ExportError(f"the merged weights (fp32, before rounding) give logits that differ from base + adapter "
                              f"by {math['max_rel_logit_diff']:.3g} (relative; tolerance {math['tolerance']:g})",
                              where=str(run_dir.adapter),
                              hint="the adapter does not fit this base, or the merge is wrong; merged/ was not written")
        if not storage["passed"]:
            raise ExportError(f"storing the merged weights in {storage['dtype']} changes the logits by "
                              f"{storage['max_rel_logit_diff']:.3g} (relative; tolerance {storage['tolerance']:g})",
                              where=str(run_dir.adapter),
                              hint="merged values out of this dtype's range (fp16 overflow)? save the base in "
                                   "bfloat16 or float32, point model.base at it and merge again; merged/ was not written")
    metrics.update(merge_check=check, merge_math_rel_diff=math["max_rel_logit_diff"],
                   storage_rel_diff=storage["max_rel_logit_diff"],
                   delta_lost_to_rounding=storage["delta_lost_to_rounding"], base=str(base),
                   headline=["merge_math_rel_diff", "storage_rel_diff", "delta_lost_to_rounding", "untied",
                             "vocab_size"])
    return metrics
