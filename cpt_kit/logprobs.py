"""Token log-probabilities of a causal LM, chunk by chunk, for a Hugging Face model and for a GGUF.

The one place where cpt-kit turns logits into numbers: perplexity in evaluate and verify
(`cpt_kit.perplexity`) and distribution comparisons between HF and GGUF (e.g. KL divergence per
chunk) are all computed from these iterators.

Memory: full-vocabulary fp32 logits exist for at most `chunk_tokens` positions at a time, never
for [batch, seq, vocab]. The HF side runs the model body once per batch of blocks, then applies
the output head chunk by chunk; the GGUF side decodes each block in batches of `chunk_tokens`
ids and reads llama.cpp's own float32 logits buffer for that batch (no copy into
`Llama.scores`, no float64).

    for chunk in hf_chunks(model, blocks, chunk_tokens=256, rows=True):
        chunk.block, chunk.start      # block index, position of the first scored row in that block
        chunk.targets                 # int64 [n]: ids predicted at positions start .. start+n-1
        chunk.target_logprobs         # float32 [n]: log p(target | prefix)
        chunk.logprobs                # float32 [n, vocab] log-softmax rows (None unless rows=True)

`hf_chunks` and `gguf_chunks` yield the same chunks (same block, start and length, in the same
order) for the same blocks and the same explicit `chunk_tokens`, so
`zip(hf_chunks(m, b, chunk_tokens=c, rows=True), gguf_chunks(p, b, chunk_tokens=c, rows=True))`
pairs rows of the same positions. Position 0 of a block has no prediction; position i predicts
block[i + 1]. Arrays are numpy (on the CPU); `torch.from_numpy` views them without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

CHUNK_BYTES = 256 * 2**20
"""Budget for one chunk's fp32 logits; `chunk_tokens_for(vocab)` turns it into rows."""


@dataclass
class Chunk:
    block: int
    start: int
    targets: np.ndarray
    target_logprobs: np.ndarray
    logprobs: Optional[np.ndarray] = None


def chunk_tokens_for(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Rows of fp32 logits that fit the budget (at least 16): 256 for a 262k vocabulary."""
    return max(16, budget_bytes // (4 * max(1, vocab_size)))


def _spans(length: int, chunk_tokens: int) -> Iterator[tuple[int, int]]:
    for start in range(0, length - 1, chunk_tokens):
        yield start, min(start + chunk_tokens, length - 1)


def _chunk_from_logits(logits, targets, block: int, start: int, rows: bool) -> Chunk:
    """log-softmax of one chunk of logits (torch, [n, vocab]) computed in fp32."""
    import torch

    with torch.no_grad():
        logits = logits.float()
        log_z = torch.logsumexp(logits, dim=-1)
        target_lp = logits.gather(1, targets[:, None])[:, 0] - log_z
        full = (logits - log_z[:, None]).cpu().numpy() if rows else None
    return Chunk(block, start, targets.cpu().numpy().astype(np.int64), target_lp.cpu().numpy(), full)


def _head(model):
    """(decoder body, function hidden -> logits) of a causal LM; a PEFT model's adapters stay active."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return None
    body, head = inner.get_decoder(), inner.get_output_embeddings()
    if body is None or head is None or body is inner:
        return None
    cap = getattr(inner.config, "final_logit_softcapping", None) or \
        getattr(getattr(inner.config, "text_config", None), "final_logit_softcapping", None)

    def logits(hidden):
        out = head(hidden)
        if cap:
            import torch
            out = torch.tanh(out.float() / cap) * cap
        return out
    return body, logits


def _head_matches_model(model, body, logits_fn, ids) -> bool:
    """Whether body + head reproduces the model's own logits on a short prefix (causal: same values)."""
    import torch

    prefix = ids[:1, : min(ids.shape[1], 16)]
    with torch.no_grad():
        expected = model(input_ids=prefix).logits[0].float()
        actual = logits_fn(body(input_ids=prefix).last_hidden_state[0]).float()
    return bool(torch.allclose(actual, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().clamp(min=1))))


def hf_chunks(model: Any, blocks: Sequence[Sequence[int]], *, chunk_tokens: Optional[int] = None,
              batch_size: int = 4, rows: bool = False) -> Iterator[Chunk]:
    """Chunks of a transformers (or PEFT) causal LM over `blocks`, on the model's device and dtype.

    The body runs on `batch_size` blocks of one length at a time (hidden states only); the head
    runs on `chunk_tokens` positions of one block at a time. Models whose logits are not
    head(body output) (checked once on a 16-token prefix) are scored one block at a time instead.
    """
    import torch

    device = next(model.parameters()).device
    split = _head(model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    chunk_tokens = chunk_tokens or chunk_tokens_for(vocab or 2**18)
    verified = False
    was_training = model.training
    model.eval()
    no_grad = torch.no_grad()  # entered per step, never across a yield (the caller's code runs in between)
    try:
        order = [i for i, b in enumerate(blocks) if len(b) >= 2]
        for first in range(0, len(order), batch_size):
            by_length: dict[int, list[int]] = {}
            for i in order[first:first + batch_size]:
                by_length.setdefault(len(blocks[i]), []).append(i)
            for length, group in sorted(by_length.items()):
                ids = torch.tensor([list(map(int, blocks[i])) for i in group], dtype=torch.long, device=device)
                if split is not None and not verified:
                    split, verified = (split if _head_matches_model(model, *split, ids) else None), True
                if split is None:  # score block by block with the model's own forward
                    for row, i in enumerate(group):
                        with no_grad:
                            logits = model(input_ids=ids[row:row + 1]).logits[0]
                        for start, stop in _spans(length, chunk_tokens):
                            yield _chunk_from_logits(logits[start:stop], ids[row, start + 1:stop + 1], i, start, rows)
                        del logits
                    continue
                body, logits_fn = split
                with no_grad:
                    hidden = body(input_ids=ids).last_hidden_state
                for row, i in enumerate(group):
                    for start, stop in _spans(length, chunk_tokens):
                        with no_grad:
                            logits = logits_fn(hidden[row, start:stop])
                        yield _chunk_from_logits(logits, ids[row, start + 1:stop + 1], i, start, rows)
                        del logits
                del hidden
    finally:
        if was_training:
            model.train()


def gguf_chunks(gguf: Path | Any, blocks: Sequence[Sequence[int]], *, chunk_tokens: Optional[int] = None,
                rows: bool = False, n_threads: Optional[int] = None) -> Iterator[Chunk]:
    """Chunks of a GGUF model (a path, or an open `llama_cpp.Llama` whose n_batch >= chunk_tokens).

    Each block is decoded from an empty KV cache in batches of `chunk_tokens` ids with logits for
    every id; log-softmax is computed in float32 straight from llama.cpp's logits buffer.
    """
    import llama_cpp

    length = max(len(b) for b in blocks)
    if isinstance(gguf, (str, Path)):
        from llama_cpp import Llama

        probe = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        chunk_tokens = min(chunk_tokens or chunk_tokens_for(probe.n_vocab()), max(1, length - 1))
        del probe
        llm = Llama(model_path=str(gguf), n_ctx=length, n_batch=chunk_tokens, n_ubatch=chunk_tokens,
                    logits_all=False, n_threads=n_threads, verbose=False)
    else:
        llm = gguf
        if chunk_tokens and chunk_tokens > llm.n_batch:
            raise ValueError(f"chunk_tokens={chunk_tokens} is larger than this Llama's n_batch ({llm.n_batch})")
        chunk_tokens = chunk_tokens or min(chunk_tokens_for(llm.n_vocab()), llm.n_batch)
    vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(chunk_tokens, 0, 1)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    try:
        for index, block in enumerate(blocks):
            if len(block) < 2:
                continue
            llama_cpp.llama_memory_clear(memory, True)
            ids = np.asarray(block, dtype=np.int64)
            for start, stop in _spans(len(ids), chunk_tokens):
                n = stop - start
                batch.n_tokens = n
                for j in range(n):
                    batch.token[j] = int(ids[start + j])
                    batch.pos[j] = start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1
                code = llama_cpp.llama_decode(llm.ctx, batch)
                if code != 0:
                    raise RuntimeError(f"llama_decode failed with code {code} on block {index} at position {start}")
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n, vocab))
                peak = logits.max(axis=1)
                shifted = logits - peak[:, None]
                log_z = np.log(np.exp(shifted).sum(axis=1, dtype=np.float32)) + peak
                targets = ids[start + 1:stop + 1]
                target_lp = logits[np.arange(n), targets] - log_z
                full = None
                if rows:
                    shifted += peak[:, None]
                    shifted -= log_z[:, None]
                    full = shifted
                yield Chunk(index, start, targets, target_lp.astype(np.float32), full)
    finally:
        llama_cpp.llama_batch_free(batch)
        if llm is not gguf:
            llm.close()
