"""Grow the vocabulary for an extended tokenizer, and say whether input/output embeddings are tied.

`data/tokenizer_extension.json` (written by the prepare stage) lists each added token with the
ids it used to be split into (`init_ids`). Each new row of embed_tokens AND of lm_head starts as
the mean of those old rows, so a new token begins as "what its pieces meant" instead of noise.
This happens before LoRA is added; the evaluate and merge steps call the same function so the
base they load matches the one training started from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from cpt_kit.errors import DataError


def read_extension(path: Path) -> Optional[dict[str, Any]]:
    """The tokenizer extension record, or None when the vocabulary was not extended."""
    path = Path(path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    for i, item in enumerate(record.get("added", [])):
        if not item.get("init_ids"):
            raise DataError(f"added token {item.get('token')!r} has no init_ids", where=f"{path}: added[{i}]",
                            hint="rerun the prepare stage (cpt-kit run ... --stage prepare --force)")
    return record


def target_vocab_size(extension: Optional[dict[str, Any]], current: int) -> int:
    if not extension or not extension.get("added"):
        return current
    return max(current, max(int(item["id"]) for item in extension["added"]) + 1)


def embeddings_tied(model: Any) -> bool:
    """True when lm_head and embed_tokens share one weight tensor."""
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


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
