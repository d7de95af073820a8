"""Perplexity with its token count and a 95% interval, for HF models and GGUFs (evaluate, verify).

Perplexity is token-weighted: exp(sum of every predicted token's NLL / number of predicted
tokens), never a mean of per-batch means. Its uncertainty comes from a bootstrap over blocks
(resample the blocks with replacement, recompute the token-weighted perplexity, take the 2.5
and 97.5 percentiles). Two models scored on the same blocks are compared PAIRED: the same
resampled blocks for both, so the interval of the change reflects how consistently one model
beats the other block by block, not the spread of the text's difficulty. A change whose
interval contains 0 is not a measured improvement (or degradation).

Blocks are cut from consecutive text, so neighbouring blocks of one long document are not fully
independent; with few blocks the interval is optimistic. Fewer than `MIN_BLOCKS` blocks give no
interval at all (null) and a warning from the callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from cpt_kit.logprobs import Chunk, gguf_chunks, hf_chunks

BOOTSTRAP_SAMPLES = 2000
MIN_BLOCKS = 2
"""An interval needs at least this many blocks (with one block, resampling changes nothing)."""
FEW_BLOCKS = 16
"""Callers warn below this many blocks: the interval rests on too few independent pieces of text."""


@dataclass(frozen=True)
class BlockScores:
    """Summed NLL (nats) and predicted-token count per block, in block order."""

    nll: np.ndarray
    tokens: np.ndarray

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def nll_per_token(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    def report(self) -> dict[str, Any]:
        """{perplexity, nll_per_token, tokens, blocks, ci95: [low, high] or None}."""
        return {"perplexity": self.perplexity, "nll_per_token": self.nll_per_token, "tokens": self.total_tokens,
                "blocks": len(self.tokens), "ci95": _interval(self, None, _perplexity_of)}


def _perplexity_of(nll, tokens, _other_nll, _other_tokens):
    return np.exp(nll / tokens)


def block_scores(chunks: Iterable[Chunk], n_blocks: int,
                 advance: Optional[Callable[[int], Any]] = None) -> BlockScores:
    """Sum chunk NLLs per block (float64); blocks with no scored token (shorter than 2 ids) are left out.
    `advance(1)` is called once per block as its first chunk arrives (progress)."""
    nll = np.zeros(n_blocks, dtype=np.float64)
    tokens = np.zeros(n_blocks, dtype=np.int64)
    for chunk in chunks:
        if advance is not None and chunk.start == 0:
            advance(1)
        nll[chunk.block] -= chunk.target_logprobs.astype(np.float64).sum()
        tokens[chunk.block] += len(chunk.targets)
    keep = tokens > 0
    if not keep.any():
        raise ValueError("no tokens to score (every block is shorter than 2 ids)")
    return BlockScores(nll[keep], tokens[keep])


def hf_scores(model: Any, blocks: Sequence[Sequence[int]], batch_size: int = 4,
              chunk_tokens: Optional[int] = None, advance: Optional[Callable[[int], Any]] = None) -> BlockScores:
    return block_scores(hf_chunks(model, blocks, batch_size=batch_size, chunk_tokens=chunk_tokens), len(blocks),
                        advance)


def gguf_scores(gguf: Path, blocks: Sequence[Sequence[int]], n_threads: Optional[int] = None,
                chunk_tokens: Optional[int] = None, advance: Optional[Callable[[int], Any]] = None) -> BlockScores:
    return block_scores(gguf_chunks(gguf, blocks, n_threads=n_threads, chunk_tokens=chunk_tokens), len(blocks),
                        advance)


def perplexity(model: Any, blocks: Sequence[Sequence[int]], batch_size: int = 4) -> dict[str, Any]:
    """The report of `hf_scores` (perplexity, nll_per_token, tokens, blocks, ci95)."""
    return hf_scores(model, blocks, batch_size).report()


def _interval(a: BlockScores, b: Optional[BlockScores], statistic) -> Optional[list[float]]:
    """95% percentile interval of statistic(nll_a, tokens_a, nll_b, tokens_b) over block resamples."""
    n = len(a.tokens)
    if n < MIN_BLOCKS:
        return None
    rng = np.random.default_rng(0)
    samples = np.empty(BOOTSTRAP_SAMPLES)
    step = max(1, 2_000_000 // n)  # bound the index matrix to ~16 MB
    for first in range(0, BOOTSTRAP_SAMPLES, step):
        idx = rng.integers(0, n, size=(min(step, BOOTSTRAP_SAMPLES - first), n))
        nll_a, tok_a = a.nll[idx].sum(1), a.tokens[idx].sum(1)
        nll_b, tok_b = (b.nll[idx].sum(1), b.tokens[idx].sum(1)) if b is not None else (None, None)
        samples[first:first + len(idx)] = statistic(nll_a, tok_a, nll_b, tok_b)
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def paired_change(before: BlockScores, after: BlockScores) -> dict[str, Any]:
    """Relative perplexity change after vs before on the same blocks, in percent, with its paired interval.

    {"change_pct", "ci95": [low, high] or None, "significant": the interval excludes 0 (None without one)}.
    """
    if len(before.tokens) != len(after.tokens) or not np.array_equal(before.tokens, after.tokens):
        raise ValueError("a paired comparison needs the same blocks (token counts differ)")

    def change(nll_b, tok_b, nll_a, _tok_a):
        return 100.0 * np.expm1((nll_a - nll_b) / tok_b)

    value = 100.0 * math.expm1(after.nll_per_token - before.nll_per_token)
    ci = _interval(before, after, change)
    return {"change_pct": value, "ci95": ci, "significant": None if ci is None else bool(ci[0] > 0 or ci[1] < 0)}


def describe(report: dict[str, Any]) -> str:
    """'34.7 [33.1, 36.4] on 8,160 tokens (32 blocks)' for logs and summaries."""
    ci = report.get("ci95")
    interval = f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else " (no interval: 1 block)"
    return f"{report['perplexity']:.4g}{interval} on {report['tokens']:,} tokens ({report['blocks']} blocks)"


def describe_change(change: dict[str, Any]) -> str:
    """'-94.2% [-95.0%, -93.1%]' (the 95% interval of a paired change)."""
    ci = change.get("ci95")
    return f"{change['change_pct']:+.2f}%" + (f" [{ci[0]:+.2f}%, {ci[1]:+.2f}%]" if ci else " (no interval)")


def load_scoring_model(model_dir: Path, fp32_share: float = 0.5):
    """A merged model for reference scoring: on the GPU when there is one (fp32 when that takes at most
    `fp32_share` of the free GPU memory, else the checkpoint's 16-bit dtype), else fp32 on the CPU."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    from safetensors import safe_open

    params = 0
    for shard in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                params += math.prod(handle.get_slice(key).get_shape())
    free, _total = torch.cuda.mem_get_info()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"), torch.bfloat16)
    dtype = torch.float32 if 4 * params <= fp32_share * free else stored
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": "cuda"})
