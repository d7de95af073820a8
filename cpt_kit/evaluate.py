"""The evaluate stage: held-out perplexity and fixed-prompt samples, before and after training.

Perplexity is token-weighted: exp(sum of every predicted token's NLL / number of predicted
tokens), never a mean of per-batch means. It is measured on data/heldout, and on
data/replay_heldout when the recipe mixes general text (forgetting, measured). The base and the
trained model are the same loaded weights: plain transformers + PEFT (fp32 on CPU), the base
resized to the trained vocabulary first, then the adapter loaded on top of it. `perplexity` is
reused by the export verify step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from cpt_kit.rundir import atomic_write_json


def perplexity(model: Any, blocks: Iterable[Sequence[int]], batch_size: int = 4) -> dict[str, float]:
    """Token-weighted perplexity of a causal LM over blocks of token ids.

    Each block is scored on its own (position 0 has no prediction): nll = sum over blocks and
    positions 1.. of -log p(token | prefix); ppl = exp(nll / tokens). `batch_size` bounds memory
    (the logits of one batch are batch x length x vocab floats).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    batch: list[list[int]] = []

    def score(rows: list[list[int]]) -> None:
        nonlocal total_nll, total_tokens
        for length in sorted({len(r) for r in rows}):  # blocks are equal-length; tolerate mixed
            same = [r for r in rows if len(r) == length]
            if length < 2:
                continue
            ids = torch.tensor(same, dtype=torch.long, device=device)
            logits = model(input_ids=ids).logits[:, :-1, :].float()
            targets = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()

    with torch.no_grad():
        for block in blocks:
            batch.append([int(i) for i in block])
            if len(batch) == batch_size:
                score(batch)
                batch = []
        if batch:
            score(batch)
    if was_training:
        model.train()
    if total_tokens == 0:
        raise ValueError("no tokens to score (every block is shorter than 2 ids)")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": total_tokens}


def generate_samples(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy continuations of each prompt (only the new text)."""
    import torch

    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
        new = ids[0, enc["input_ids"].shape[1]:]
        out.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True)})
    return out


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


def _change_pct(before: float, after: float) -> float:
    return round(100.0 * (after - before) / before, 2)


def run(ctx) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from cpt_kit.model_source import load_kwargs
    from cpt_kit.train.embeddings import read_extension
    from cpt_kit.train.stage import read_train_info

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
    ctx.log(f"perplexity on {len(heldout)} held-out blocks" + (f" and {len(replay)} replay blocks" if replay else ""))
    before = {"heldout": perplexity(model, heldout)}
    if replay:
        before["replay"] = perplexity(model, replay)
    samples_before = generate_samples(model, tokenizer, prompts, max_new) if max_new else []

    model = PeftModel.from_pretrained(model, str(run_dir.adapter))
    after = {"heldout": perplexity(model, heldout)}
    if replay:
        after["replay"] = perplexity(model, replay)
    samples_after = generate_samples(model, tokenizer, prompts, max_new) if max_new else []

    report: dict[str, Any] = {"device": device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                              "weighting": "token", "sets": {}}
    for name in before:
        report["sets"][name] = {"base": before[name], "trained": after[name],
                                "change_pct": _change_pct(before[name]["perplexity"], after[name]["perplexity"])}
    atomic_write_json(run_dir.eval / "perplexity.json", report)
    atomic_write_json(run_dir.eval / "samples.json", [
        {"prompt": b["prompt"], "before": b["completion"], "after": a["completion"]}
        for b, a in zip(samples_before, samples_after)])
    metrics: dict[str, Any] = {
        "ppl_base": round(before["heldout"]["perplexity"], 4),
        "ppl_trained": round(after["heldout"]["perplexity"], 4),
        "ppl_change_pct": report["sets"]["heldout"]["change_pct"],
        "heldout_tokens": before["heldout"]["tokens"],
        "headline": ["ppl_base", "ppl_trained", "ppl_change_pct"],
    }
    if replay:
        metrics.update(replay_ppl_base=round(before["replay"]["perplexity"], 4),
                       replay_ppl_trained=round(after["replay"]["perplexity"], 4),
                       replay_ppl_change_pct=report["sets"]["replay"]["change_pct"])
        metrics["headline"] += ["replay_ppl_base", "replay_ppl_trained"]
    return metrics
