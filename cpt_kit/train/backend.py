"""The training-backend interface, and what both backends share.

A backend knows one library (Unsloth, or transformers+PEFT+TRL). It loads the base model with
the tokenizer training uses, resizes the vocabulary when `data/tokenizer_extension.json` asks for
it, adds LoRA (plus embed_tokens/lm_head as full `modules_to_save` weights) and builds a trainer
whose optimizer gives the embeddings their own learning rate. Everything else (data, callbacks,
checkpoints, the adapter's files) is in `cpt_kit.train.stage` and does not care which backend ran.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

from cpt_kit.errors import RecipeError
from cpt_kit.recipe import Recipe

EMBEDDING_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class TrainSetup:
    """Everything a backend needs, resolved for this machine."""

    recipe: Recipe
    base: str
    """Local directory or hub id of the base model."""
    load_kwargs: dict[str, Any] = field(repr=False)
    """revision / token / trust_remote_code for from_pretrained (not in repr: it holds the hub token)."""
    tokenizer_dir: Path
    """The tokenizer training uses (data/tokenizer/)."""
    device: str
    """cuda or cpu."""
    precision: str
    """fp32, fp16 or bf16 (mixed precision of the trainer)."""
    load_in_4bit: bool
    """Whether the base is really loaded in 4-bit (only on CUDA)."""
    optim: str
    """Optimizer name as in transformers."""
    gradient_checkpointing: bool
    """Whether activations are recomputed in the backward pass (train.gradient_checkpointing resolved)."""
    output_dir: Path
    """Where checkpoints go."""
    extension: Optional[dict[str, Any]] = None
    """Contents of data/tokenizer_extension.json, when the vocabulary was extended."""
    train_embeddings: Optional[bool] = None
    """Train embed_tokens/lm_head (default: lora.train_embeddings; SFT forces it for new chat tokens)."""

    @property
    def torch_dtype(self):
        """Weight dtype of the non-quantized parts."""
        import torch
        dtype = self.recipe.model.dtype
        if dtype != "auto":
            return getattr(torch, dtype)
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    @property
    def modules_to_save(self) -> list[str]:
        train = self.recipe.lora.train_embeddings if self.train_embeddings is None else self.train_embeddings
        return list(EMBEDDING_MODULES) if train else []


class Backend(Protocol):
    name: str

    def load_model(self, setup: TrainSetup) -> tuple[Any, Any]:
        """Return (peft model ready to train, tokenizer)."""

    def make_trainer(self, setup: TrainSetup, model: Any, tokenizer: Any, train_dataset: Any,
                     eval_dataset: Any, callbacks: list[Any], data_collator: Any = None) -> Any:
        """Return a transformers Trainer (subclass) with the embedding-LR parameter groups
        (data_collator: None for CPT blocks, else the SFT collator)."""


def unsloth_available() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose_backend(name: str, device: str) -> tuple[str, str]:
    """(backend, why) for train.backend=`name` on `device` (cuda or cpu).

    auto is unsloth on a GPU when it is installed, else hf: on CPU hf is the faster of the two
    (bench/train.py: Unsloth's CPU fallback trains at about a fifth of hf's tokens/s)."""
    if name == "auto":
        if device != "cuda":
            return "hf", "auto: no GPU, hf is faster on CPU"
        if unsloth_available():
            return "unsloth", "auto: GPU and unsloth installed"
        return "hf", "auto: unsloth is not installed"
    if name == "unsloth" and not unsloth_available():
        raise RecipeError("the unsloth backend was requested but unsloth is not installed", where="train.backend",
                          hint='pip install "cpt-kit[unsloth]", or --set train.backend=hf')
    return name, "requested by the recipe"


def preload(name: str, device: str) -> None:
    """Import unsloth now if `name` resolves to it on `device`: call this before anything imports
    transformers (e.g. first thing in `cpt-kit run`), so Unsloth's patches apply to the whole process."""
    if choose_backend(name, device)[0] == "unsloth":
        import unsloth  # noqa: F401


def get_backend(name: str) -> Backend:
    """The backend called `name` (unsloth or hf; resolve "auto" with choose_backend first)."""
    if name == "unsloth":
        from cpt_kit.train.unsloth_backend import UnslothBackend
        return UnslothBackend()
    from cpt_kit.train.hf_backend import HFBackend
    return HFBackend()


def resolve_optim(recipe: Recipe, device: str) -> str:
    if recipe.train.optim != "auto":
        return recipe.train.optim
    # CPU: the fused AdamW kernel (transformers' default optimizer) is much faster than the
    # per-tensor/foreach one on the full embedding matrices (bench/train.py).
    return "adamw_8bit" if device == "cuda" else "adamw_torch_fused"


def trainer_arguments(setup: TrainSetup) -> dict[str, Any]:
    """Keyword arguments of SFTConfig / UnslothTrainingArguments shared by both backends."""
    t = setup.recipe.train
    evaluate = t.eval_steps > 0
    return dict(
        output_dir=str(setup.output_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=setup.optim,
        fp16=setup.precision == "fp16",
        bf16=setup.precision == "bf16",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the NaN guard, not be averaged away
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # blocks are tokenized and packed already
        packing=False,
        max_length=None,
        dataloader_num_workers=0,
        use_cpu=setup.device != "cuda",
        disable_tqdm=True,  # cpt_kit.train.callbacks.TrainProgress shows progress
    )


class BlockCollator:
    """Stack fixed-length blocks; labels are the input ids (the model shifts them)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def embedding_parameters(model: Any) -> list[Any]:
    """Trainable embed_tokens / lm_head weights (PEFT modules_to_save copies, or tied-through ones)."""
    params, seen = [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        leaf = name.removesuffix(".weight").removesuffix(".modules_to_save.default")
        if leaf.rsplit(".", 1)[-1] in EMBEDDING_MODULES:
            params.append(param)
            seen.add(id(param))
    return params


def embedding_param_groups(model: Any, learning_rate: float, embedding_learning_rate: Optional[float],
                           weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: LoRA weights at the LoRA rate first, then embeddings at their own rate."""
    embed_ids = {id(p) for p in embedding_parameters(model)}
    lora = [p for p in model.parameters() if p.requires_grad and id(p) not in embed_ids]
    embed = [p for p in model.parameters() if p.requires_grad and id(p) in embed_ids]
    groups = [{"params": lora, "lr": learning_rate, "weight_decay": weight_decay}]
    if embed:
        groups.append({"params": embed, "lr": embedding_learning_rate or learning_rate, "weight_decay": 0.0,
                       "cpt_kit_embeddings": True})
    return groups
