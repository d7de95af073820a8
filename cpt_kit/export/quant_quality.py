"""How close each quantized GGUF is to the unquantized one (F16/BF16), measured the way llama.cpp's own
quantization comparisons (`llama-perplexity --kl-divergence`) report it: perplexity, the mean KL
divergence KL(P_ref || P_quant) of the next-token distributions, its 99th percentile, and how often
both pick the same top token.

Memory stays bounded whatever the vocabulary: every model evaluates the same block in lockstep, chunk
by chunk, and only that chunk's logits are held (llama.cpp's output buffer of `decode_rows x vocab`
float32 per model, read in place); the log-softmax is taken in float32 over at most `numpy_rows` rows
at a time. Nothing of shape [sequence, vocabulary] and nothing in float64 is ever built.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

DECODE_BYTES = 2**27
"""Upper bound of one model's logits buffer (decode_rows x vocab x 4 bytes): 128 MiB."""
NUMPY_BYTES = 2**25
"""Upper bound of one float32 [rows, vocab] temporary in the KL arithmetic: 32 MiB."""


def row_budget(n_vocab: int, budget_bytes: int, low: int, high: int) -> int:
    """Rows of `n_vocab` float32 logits that fit in `budget_bytes`, clamped to [low, high]."""
    return max(low, min(high, budget_bytes // (4 * n_vocab)))


def log_softmax(logits):
    """float32 log-softmax over the last axis (one temporary of the input's size)."""
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float32))
    return shifted


def vocab_size(path: Path) -> int:
    """Vocabulary size of a GGUF, from its header (no model load)."""
    from cpt_kit.export.gguf_header import read_header

    n_vocab = read_header(path)["n_vocab"]
    if n_vocab is None:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens")
    return n_vocab


class ChunkedEvaluator:
    """One GGUF loaded for chunked evaluation: `chunks(block)` yields, per decoded chunk, a float32 view
    [rows, vocab] of the logits of positions start..start+rows-1 (valid until the next decode)."""

    def __init__(self, path: Path, n_ctx: int, decode_rows: int, n_threads: Optional[int] = None):
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        self.path = Path(path)
        self.decode_rows = decode_rows
        with suppress_stdout_stderr(disable=False):  # context-size notes llama.cpp prints even with verbose=False
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=decode_rows, n_ubatch=decode_rows,
                                       n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self._batch = llama_cpp.llama_batch_init(decode_rows, 0, 1)

    def chunks(self, block: Sequence[int]) -> Iterator[tuple[int, "object"]]:
        import llama_cpp
        import numpy as np

        ctx = self.llm.ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        batch = self._batch
        for start in range(0, len(block), self.decode_rows):
            chunk = block[start:start + self.decode_rows]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = int(token)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            code = llama_cpp.llama_decode(ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code} for {self.path.name}")
            pointer = llama_cpp.llama_get_logits(ctx)
            yield start, np.ctypeslib.as_array(pointer, shape=(len(chunk), self.n_vocab))

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(self._batch)
        self.llm.close()


class _Tally:
    """Running sums for one model: NLL of the next token, and (quantized models) KL and top-1 agreement."""

    def __init__(self):
        self.nll, self.tokens, self.same_top, self.kl = 0.0, 0, 0, []

    def summary(self, reference: Optional["_Tally"] = None) -> dict:
        import numpy as np

        ppl = math.exp(self.nll / self.tokens) if self.tokens else float("nan")
        out = {"perplexity": ppl, "tokens": self.tokens}
        if reference is not None:
            kl = np.concatenate(self.kl) if self.kl else np.zeros(0, dtype=np.float32)
            ref_ppl = math.exp(reference.nll / reference.tokens)
            out.update(ppl_delta=(ppl - ref_ppl) / ref_ppl, mean_kl=float(kl.mean(dtype=np.float64)),
                       kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                       same_top_token=self.same_top / self.tokens)
        return out


def compare_to_reference(reference: Path, quantized: dict[str, Path], blocks: Sequence[Sequence[int]],
                         n_threads: Optional[int] = None) -> dict:
    """Perplexity of `reference` and, per quantized GGUF, perplexity, its change, KL divergence and top-1 agreement.

    Returns {"reference": {"perplexity", "tokens"}, "quantized": {name: {..., "mean_kl", "kl_p99", ...}},
    "decode_rows", "numpy_rows"}. KL is in nats per token, averaged over every predicted position.
    """
    import numpy as np

    length = max(len(b) for b in blocks)
    n_vocab = vocab_size(reference)
    decode_rows = row_budget(n_vocab, DECODE_BYTES, 8, 512)
    numpy_rows = row_budget(n_vocab, NUMPY_BYTES, 1, decode_rows)
    ref = ChunkedEvaluator(reference, length, decode_rows, n_threads)
    quants = {name: ChunkedEvaluator(path, length, decode_rows, n_threads) for name, path in quantized.items()}
    try:
        for name, ev in quants.items():
            if ev.n_vocab != n_vocab:
                raise ValueError(f"{name} has {ev.n_vocab} tokens, {reference.name} has {n_vocab}")
        ref_tally, tallies = _Tally(), {name: _Tally() for name in quants}
        for block in blocks:
            targets = np.asarray(block[1:], dtype=np.int64)
            streams = [ev.chunks(block) for ev in quants.values()]
            for start, ref_logits in ref.chunks(block):
                quant_logits = [next(s)[1] for s in streams]
                for lo in range(0, len(ref_logits), numpy_rows):
                    hi = min(lo + numpy_rows, len(ref_logits), len(targets) - start)
                    if hi <= lo:
                        break
                    rows = np.arange(hi - lo)
                    want = targets[start + lo:start + hi]
                    ref_lp = log_softmax(ref_logits[lo:hi])
                    ref_tally.nll -= float(ref_lp[rows, want].sum(dtype=np.float64))
                    ref_tally.tokens += hi - lo
                    ref_p = np.exp(ref_lp)
                    ref_top = ref_lp.argmax(axis=-1)
                    for tally, logits in zip(tallies.values(), quant_logits):
                        q_lp = log_softmax(logits[lo:hi])
                        tally.nll -= float(q_lp[rows, want].sum(dtype=np.float64))
                        tally.tokens += hi - lo
                        tally.same_top += int((q_lp.argmax(axis=-1) == ref_top).sum())
                        q_lp -= ref_lp  # in place: log q - log p
                        tally.kl.append(np.maximum(-(ref_p * q_lp).sum(axis=-1), 0.0))
            for s in streams:
                s.close()
    finally:
        ref.close()
        for ev in quants.values():
            ev.close()
    return {"reference": ref_tally.summary(), "quantized": {n: t.summary(ref_tally) for n, t in tallies.items()},
            "decode_rows": decode_rows, "numpy_rows": numpy_rows}
