"""Training inputs for train.objective="sft": the prepared conversations, optional packing, collator.

data/train and data/heldout hold one conversation per row (`input_ids`, `labels` with -100 on
everything but assistant turns), of varying length. Without packing, a batch is padded to its
longest row (pad id distinct from EOS/end-of-turn; padded labels are -100). With
`train.packing`, TRL's best-fit-decreasing packer puts several conversations into rows of up to
`model.max_seq_length` tokens and TRL's padding-free collator flattens them with position ids
that restart at 0 for each conversation: attention does not cross conversation boundaries
(transformers builds the block-diagonal mask from the position ids) and no token is predicted
from another conversation (the label at each restart is -100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt_kit.errors import DataError


def load_conversations(data_dir: Path):
    """data/train and data/heldout as datasets with input_ids/labels rows (in memory: conversations are
    small, and packing or a trainer's preprocessing then writes no cache file into the run)."""
    from cpt_kit.run_files import load_prepared_split

    sets = []
    for name in ("train", "heldout"):
        path, ds = load_prepared_split(data_dir, name, in_memory=True)
        if "labels" not in ds.column_names:
            raise DataError(f"{path} holds CPT blocks, not conversations (columns: {ds.column_names})",
                            where="train.objective", hint="rerun the prepare stage for train.objective='sft'")
        sets.append(ds.select_columns(["input_ids", "labels"]))
    if len(sets[0]) == 0:
        raise DataError("no training conversations", where=str(Path(data_dir) / "train"),
                        hint="add conversations to data.sources")
    return sets[0], sets[1]


def training_inputs(model: Any, tokenizer: Any, train_dataset: Any, recipe: Any, backend: str):
    """(train rows, collator, mean real tokens per row) for the trainer; packs when train.packing,
    after checking that this model keeps packed conversations apart."""
    from cpt_kit.errors import TrainingError

    packing = recipe.train.packing
    if packing:
        if not packing_isolated(model, tokenizer.pad_token_id):
            raise TrainingError(f"the {backend} backend lets packed conversations attend to each other on this "
                                "model", where="train.packing", hint="set train.packing=False (or train.backend=hf)")
        train_dataset = pack(train_dataset, recipe.model.max_seq_length)
    row_tokens = sum(map(len, train_dataset["input_ids"])) / len(train_dataset)
    return train_dataset, collator(tokenizer.pad_token_id, packing), row_tokens


def pack(dataset: Any, max_length: int):
    """Conversations packed into rows of at most max_length tokens (TRL's BFD packer; adds seq_lengths)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, max_length, strategy="bfd")


def collator(pad_token_id: int, packing: bool):
    """TRL's language-modeling collator: labels as prepared, padding-free when packing."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=packing)


def packing_isolated(model: Any, pad_token_id: int, tolerance: float = 1e-3) -> bool:
    """Whether this model, as it will train, keeps packed conversations apart: the logits of a
    conversation packed after another equal its logits alone. (It does not when the model builds
    a KV cache in training, `config.use_cache=True`: transformers then ignores the position-id
    boundaries and attends across conversations.)"""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    first = [int(i) % vocab for i in range(7, 19)]
    second = [int(i) % vocab for i in range(31, 40)]
    batch = collator(pad_token_id, packing=True)([{"input_ids": first, "labels": first},
                                                  {"input_ids": second, "labels": second}])
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.train()  # the mode the trainer runs it in (dropout is 0 in the recipes' LoRA by default)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)).logits
        alone = model(input_ids=torch.tensor([second], device=device)).logits
    model.train(was_training)
    difference = (packed[0, len(first):].float() - alone[0].float()).abs().max().item()
    return difference <= tolerance * max(1.0, alone.float().abs().max().item())


def padding_share(dataset: Any, batch_size: int, packed: bool, max_length: int) -> float:
    """Share of the tokens in the model's input that are padding, batching rows in order.

    Without packing a batch is padded to its longest row; packed rows are flattened into one
    sequence per batch (padding-free), so only the real tokens are computed."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        real += sum(chunk)
        padded += sum(chunk) if packed else max(chunk) * len(chunk)
    return round(1 - real / padded, 4) if padded else 0.0
