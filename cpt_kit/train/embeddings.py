"""Grow the vocabulary for an extended tokenizer, and what happens to tied input/output embeddings.

Tied embeddings keep one meaning in both backends: a base whose lm_head IS embed_tokens (tied,
common in small models) stays tied. embed_tokens is trained as one full matrix that lm_head
keeps sharing (PEFT `ensure_weight_tying`), so the merged model and its GGUF have the base's
size and layout; untying would train two copies and add a vocab x hidden matrix to every
exported file (e.g. +54 MiB at F16 for a 49k-vocabulary 135M model, +320 MiB for 262k x 640).

`data/tokenizer_extension.json` (written by the prepare stage) lists each added token with the
ids it used to be split into (`init_ids`). Each new row of embed_tokens AND of lm_head starts as
the mean of those old rows, so a new token begins as "what its pieces meant" instead of noise.
A token with `"init": "mean"` instead (a chat template's control token, added by the SFT
prepare) starts as the mean of all existing rows.
This happens before LoRA is added; the evaluate and merge steps call the same function so the
base they load matches the one training started from.
"""

from __future__ import annotations

from typing import Any, Optional

from cpt_kit.errors import DataError


def target_vocab_size(extension: Optional[dict[str, Any]], current: int) -> int:
    if not extension or not extension.get("added"):
        return current
    return max(current, max(int(item["id"]) for item in extension["added"]) + 1)


def embeddings_tied(model: Any) -> bool:
    """True when lm_head and embed_tokens share one weight tensor."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def keeps_tie(model: Any) -> bool:
    """True for a base with tied embeddings: training keeps lm_head tied to the trained embed_tokens."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    return bool(getattr(config, "tie_word_embeddings", False)) and embeddings_tied(model)


def tie_record(model: Any, tied_base: bool) -> dict[str, Any]:
    """What happened to the tie, for adapter/cpt_kit_train.json and the run summary.

    `embedding_tie`: "kept" (tied base, still one matrix), "untied" (tied base, now two) or "none"
    (the base has two matrices); `embedding_matrix_mib`: one vocab x hidden matrix at 16 bits,
    what a separate lm_head adds to the merged model and to an F16 GGUF."""
    weight = model.get_input_embeddings().weight
    tie = ("kept" if embeddings_tied(model) else "untied") if tied_base else "none"
    return {"tied_base": tied_base, "embedding_tie": tie,
            "embedding_matrix_mib": round(int(weight.shape[0]) * int(weight.shape[1]) * 2 / 2**20, 1)}


def tie_summary(record: dict[str, Any]) -> str:
    """What happened to the tie and its size cost, in a few words for the run summary."""
    mib = record.get("embedding_matrix_mib")
    return {"kept": f"kept (untying would add {mib} MiB F16)",
            "untied": f"untied: lm_head adds {mib} MiB F16"}.get(record.get("embedding_tie"), "base not tied")


def extend_vocabulary(model: Any, extension: Optional[dict[str, Any]]) -> int:
    """Resize to the extended vocabulary and initialise new rows from their sub-token means.

    Returns the number of rows initialised (0 when there is nothing to do).
    """
    import torch

    old_size = model.get_input_embeddings().weight.shape[0]
    new_size = target_vocab_size(extension, old_size)
    if new_size == old_size and not (extension and extension.get("added")):
        return 0
    if new_size != old_size:
        # mean_resizing=False: we set the new rows ourselves (below), from the right sub-tokens.
        model.resize_token_embeddings(new_size, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and not embeddings_tied(model):
        matrices.append(output.weight)
    count = 0
    with torch.no_grad():
        for item in extension["added"]:
            new_id = int(item["id"])
            if item.get("init") == "mean":
                for weight in matrices:
                    weight[new_id] = weight[:old_size].float().mean(dim=0).to(weight.dtype)
                count += 1
                continue
            init = torch.tensor([int(i) for i in item["init_ids"]], dtype=torch.long)
            if int(init.max()) >= old_size:
                raise DataError(f"token {item['token']!r} is initialised from id {int(init.max())}, beyond the base "
                                f"vocabulary ({old_size})", where="data/tokenizer_extension.json",
                                hint="init_ids must be ids of the base tokenizer")
            for weight in matrices:
                init_dev = init.to(weight.device)
                weight[new_id] = weight[init_dev].float().mean(dim=0).to(weight.dtype)
            count += 1
    return count
