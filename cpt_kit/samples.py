"""Greedy continuations of prompts: evaluate's before/after samples and compare's side-by-side answers
(a shared helper, so neither stage imports the other)."""

from __future__ import annotations

from typing import Any, Sequence


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
