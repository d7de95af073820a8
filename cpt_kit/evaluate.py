"""The evaluate stage: held-out perplexity and fixed-prompt samples, before and after training.

Perplexity (`cpt_kit.perplexity`: token-weighted, loss computed chunk by chunk over the
sequence) is measured on data/heldout, and on data/replay_heldout when the recipe mixes general
text (forgetting, measured). Each is reported with its token count and a 95% bootstrap interval
over blocks, and the before/after change with its PAIRED interval (same blocks), so a change
inside the noise is not reported as an improvement. The base and the trained model are the same
loaded weights: plain transformers + PEFT (fp32 on CPU, bf16/fp16 on a GPU), the base resized to
the trained vocabulary first, then the adapter loaded on top of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cpt_kit.rundir import atomic_write_json
from cpt_kit.samples import generate_samples


def load_base_for_adapter(base: str, load_kwargs: dict[str, Any], extension: Optional[dict[str, Any]],
                          vocab_size: Optional[int] = None, device: str = "cpu"):
    """The base model as training started from it: fp32 on CPU, vocabulary grown as in training."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_kit.train.embeddings import extend_vocabulary

    dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **load_kwargs).to(device)
    extend_vocabulary(model, extension)
    if vocab_size and model.get_input_embeddings().weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


def _blocks(path: Path, limit: Optional[int]) -> Optional[list[list[int]]]:
    if not path.is_dir():
        return None
    from datasets import load_from_disk
    ds = load_from_disk(str(path))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [list(r) for r in ds["input_ids"]] if len(ds) else None


def run(ctx) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from cpt_kit.model_source import load_kwargs
    from cpt_kit.perplexity import FEW_BLOCKS, describe, describe_change, hf_scores, paired_change
    from cpt_kit.run_files import read_extension, read_train_info

    recipe, run_dir = ctx.recipe, ctx.run
    info = read_train_info(run_dir.adapter)
    device = "cuda" if ctx.hardware.device == "cuda" else "cpu"
    limit = recipe.eval.max_blocks
    heldout = _blocks(run_dir.data / "heldout", limit)
    replay = _blocks(run_dir.data / "replay_heldout", limit)
    if heldout is None:
        from cpt_kit.errors import DataError
        raise DataError(f"{run_dir.data / 'heldout'} is missing or empty", where=str(run_dir.data / "heldout"),
                        hint="run the prepare stage with a larger data.heldout_fraction")
    tokenizer = AutoTokenizer.from_pretrained(run_dir.adapter)
    model = load_base_for_adapter(info["base"], load_kwargs(recipe.model),
                                  read_extension(run_dir.data / "tokenizer_extension.json"),
                                  info.get("vocab_size"), device)
    prompts, max_new = recipe.eval.prompts, recipe.eval.max_new_tokens
    sets = {"heldout": heldout, **({"replay": replay} if replay else {})}
    ctx.log(f"perplexity on {len(heldout)} held-out blocks" + (f" and {len(replay)} replay blocks" if replay else ""))
    before = {name: hf_scores(model, blocks) for name, blocks in sets.items()}
    samples_before = generate_samples(model, tokenizer, prompts, max_new) if max_new else []

    model = PeftModel.from_pretrained(model, str(run_dir.adapter))
    after = {name: hf_scores(model, blocks) for name, blocks in sets.items()}
    samples_after = generate_samples(model, tokenizer, prompts, max_new) if max_new else []

    report: dict[str, Any] = {"device": device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                              "weighting": "token", "interval": "95% bootstrap over blocks (paired for changes)",
                              "sets": {}, "warnings": []}
    for name in sets:
        change = paired_change(before[name], after[name])
        report["sets"][name] = {"base": before[name].report(), "trained": after[name].report(),
                                "change_pct": change["change_pct"], "change_pct_ci95": change["ci95"],
                                "significant": change["significant"]}
        ctx.log(f"{name}: {describe(report['sets'][name]['base'])} -> {describe(report['sets'][name]['trained'])}, "
                f"change {describe_change(change)}")
        if len(before[name].tokens) < FEW_BLOCKS:
            report["warnings"].append(f"{name} perplexity rests on {len(before[name].tokens)} block(s) "
                                      f"({before[name].total_tokens} tokens): too few for a reliable interval; "
                                      "use a larger held-out set")
    for warning in report["warnings"]:
        ctx.log(f"warning: {warning}")
    atomic_write_json(run_dir.eval / "perplexity.json", report)
    atomic_write_json(run_dir.eval / "samples.json", [
        {"prompt": b["prompt"], "before": b["completion"], "after": a["completion"]}
        for b, a in zip(samples_before, samples_after)])
    return _metrics(report)


def _interval_text(ci: Optional[list[float]]) -> Optional[str]:
    return f"{ci[0]:+.1f}%..{ci[1]:+.1f}%" if ci else None


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    held = report["sets"]["heldout"]
    metrics: dict[str, Any] = {
        "ppl_base": round(held["base"]["perplexity"], 4),
        "ppl_trained": round(held["trained"]["perplexity"], 4),
        "ppl_base_ci": held["base"]["ci95"],
        "ppl_trained_ci": held["trained"]["ci95"],
        "ppl_change_pct": round(held["change_pct"], 2),
        "ppl_change_ci95": _interval_text(held["change_pct_ci95"]),
        "ppl_change_significant": held["significant"],
        "heldout_tokens": held["base"]["tokens"],
        "heldout_blocks": held["base"]["blocks"],
        "warnings": report["warnings"],
        "headline": ["ppl_base", "ppl_trained", "ppl_change_pct", "ppl_change_ci95", "heldout_tokens"],
    }
    replay = report["sets"].get("replay")
    if replay:
        metrics.update(replay_ppl_base=round(replay["base"]["perplexity"], 4),
                       replay_ppl_trained=round(replay["trained"]["perplexity"], 4),
                       replay_ppl_base_ci=replay["base"]["ci95"], replay_ppl_trained_ci=replay["trained"]["ci95"],
                       replay_tokens=replay["base"]["tokens"],
                       replay_ppl_change_pct=round(replay["change_pct"], 2),
                       replay_ppl_change_ci95=_interval_text(replay["change_pct_ci95"]))
        metrics["headline"] += ["replay_ppl_base", "replay_ppl_trained"]
    return metrics
