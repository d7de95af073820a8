"""The token blocks the exported GGUFs are measured on, shared by the gguf stage (quality of each
quantization vs the unquantized GGUF) and verify (perplexity of each GGUF vs the HF model): the run's
held-out blocks (data/heldout), at most MAX_BLOCKS and eval.max_blocks of them, or, for a run without
held-out data (`cpt-kit export --adapter`), blocks cut from the verify probe texts."""

from __future__ import annotations

MAX_BLOCKS = 32
"""At most this many held-out blocks (also bounded by eval.max_blocks): llama.cpp evaluates each per format."""


def heldout_blocks(run, limit: int | None) -> list[list[int]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(run.data / "heldout"))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [list(map(int, row)) for row in dataset.select(range(n))["input_ids"]]


def probe_blocks(tokenizer, texts: list[str], length: int, limit: int) -> list[list[int]]:
    """Blocks cut from the probe texts, for runs without held-out data (`cpt-kit export --adapter`)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    length = max(8, min(length, len(ids)))
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:limit]


def comparison_blocks(run, recipe, tokenizer) -> tuple[list[list[int]], str]:
    """(blocks, "heldout" or "probe_texts"): what the GGUFs of this run are compared on.

    Reads eval.max_blocks and model.max_seq_length (the latter only without held-out data)."""
    from cpt_kit.export.verify import probe_texts
    from cpt_kit.run_files import heldout_texts

    limit = min(MAX_BLOCKS, recipe.eval.max_blocks or MAX_BLOCKS)
    if (run.data / "heldout").is_dir():
        return heldout_blocks(run, limit), "heldout"
    texts, _ = probe_texts(tokenizer, heldout_texts(run))
    return probe_blocks(tokenizer, texts, min(recipe.model.max_seq_length, 128), limit), "probe_texts"
