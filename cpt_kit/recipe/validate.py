"""Validation of a recipe: types of every field, value ranges and cross-field rules.

Checks that need the hardware (bf16 on a GPU without bf16) are in
`cpt_kit.hardware.check_recipe_against_hardware`, run by `cpt-kit run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from cpt_kit.data.text_files import SPLIT_KEYWORDS, separator_pattern
from cpt_kit.errors import DataError, RecipeError
from cpt_kit.export.quant_gate import parse_limit_items
from cpt_kit.recipe import schema
from cpt_kit.recipe.schema import ALL_LINEAR, QUANT_TYPES, Recipe


def validate_recipe(recipe: Recipe) -> None:
    """Raise RecipeError (naming the key) for the first wrong type or value in `recipe`."""
    check_types(recipe, "")
    check_values(recipe)


def type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a recipe dataclass."""
    return typing.get_type_hints(cls, globalns=vars(schema))


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_types(obj: Any, prefix: str) -> None:
    for name, tp in type_hints(type(obj)).items():
        value = getattr(obj, name)
        key = f"{prefix}{name}"
        if isinstance(value, list) and typing.get_origin(tp) is tuple:
            raise RecipeError(f"expected a tuple, got a list {value!r}", where=key,
                              hint="write it as a tuple: (" + ", ".join(repr(v) for v in value) + ",)")
        if not _matches(value, tp):
            raise RecipeError(f"expected {describe(tp)}, got {type(value).__name__} {value!r}", where=key)
        if dataclasses.is_dataclass(value):
            check_types(value, key + ".")


def _require(ok: bool, key: str, message: str, hint: str | None = None) -> None:
    if not ok:
        raise RecipeError(message, where=key, hint=hint)


def check_values(r: Recipe) -> None:
    _require(bool(r.name) and "/" not in r.name and r.name not in (".", ".."), "name",
             f"run name {r.name!r} must be a non-empty name without '/'")
    _require(bool(r.model.base), "model.base", "the base model is empty", "set a hub id or a local directory")
    _require(r.model.max_seq_length > 0, "model.max_seq_length",
             f"must be > 0, got {r.model.max_seq_length}", "typical values: 512, 1024, 2048")
    _require(r.lora.r > 0, "lora.r", f"must be > 0, got {r.lora.r}")
    _require(r.lora.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {r.lora.lora_alpha}")
    _require(0 <= r.lora.lora_dropout < 1, "lora.lora_dropout", f"must be in [0, 1), got {r.lora.lora_dropout}")
    _require(bool(r.lora.target_modules), "lora.target_modules", "no target modules",
             f"use the default all-linear set {ALL_LINEAR}")
    for m in ("embed_tokens", "lm_head"):
        _require(m not in r.lora.target_modules, "lora.target_modules",
                 f"{m} is trained as a full module, not a LoRA target", "remove it and set lora.train_embeddings=True")
    d = r.data
    _require(0 < d.heldout_fraction < 1, "data.heldout_fraction", f"must be in (0, 1), got {d.heldout_fraction}")
    _require(d.heldout_min_blocks >= 1, "data.heldout_min_blocks", f"must be >= 1, got {d.heldout_min_blocks}")
    _require(d.heldout_min_tokens >= 0, "data.heldout_min_tokens", f"must be >= 0, got {d.heldout_min_tokens}")
    _require(0 < d.heldout_max_share <= 0.5, "data.heldout_max_share", f"must be in (0, 0.5], got {d.heldout_max_share}")
    _require(d.long_document_chars >= 1000, "data.long_document_chars",
             f"must be >= 1000, got {d.long_document_chars}")
    if d.split_by not in SPLIT_KEYWORDS:
        try:
            separator_pattern(d.split_by)
        except DataError as exc:
            _require(False, "data.split_by", exc.message, exc.hint)
    _require(d.min_chars >= 0, "data.min_chars", f"must be >= 0, got {d.min_chars}")
    _require(d.max_chars is None or d.max_chars > d.min_chars, "data.max_chars",
             f"must be larger than data.min_chars ({d.min_chars}), got {d.max_chars}")
    _require(0 < d.near_dup_threshold <= 1, "data.near_dup_threshold", f"must be in (0, 1], got {d.near_dup_threshold}")
    _require(d.min_train_blocks >= 1, "data.min_train_blocks", f"must be >= 1, got {d.min_train_blocks}")
    _require(d.num_proc >= 1, "data.num_proc", f"must be >= 1, got {d.num_proc}")
    _require(d.max_documents is None or d.max_documents > 0, "data.max_documents", "must be > 0 or None")
    if d.replay is not None:
        _require(bool(d.replay.sources), "data.replay.sources", "replay has no sources",
                 "list general-text files, or set data.replay=None")
        _require(0 < d.replay.fraction < 1, "data.replay.fraction", f"must be in (0, 1), got {d.replay.fraction}")
        _require(0 < d.replay.heldout_fraction < 1, "data.replay.heldout_fraction",
                 f"must be in (0, 1), got {d.replay.heldout_fraction}")
    if d.extend_tokenizer is not None:
        _require(d.extend_tokenizer.max_new_tokens > 0, "data.extend_tokenizer.max_new_tokens", "must be > 0")
        _require(d.extend_tokenizer.min_subtokens >= 2, "data.extend_tokenizer.min_subtokens", "must be >= 2")
        _require(r.lora.train_embeddings, "data.extend_tokenizer",
                 "new tokens need trainable embeddings", "set lora.train_embeddings=True")
    t = r.train
    _require(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if t.embedding_learning_rate is not None:
        _require(r.lora.train_embeddings, "train.embedding_learning_rate",
                 "an embedding learning rate is set but the embeddings are not trained",
                 "set lora.train_embeddings=True, or train.embedding_learning_rate=None")
        _require(t.embedding_learning_rate > 0, "train.embedding_learning_rate", "must be > 0")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                "save_total_limit"):
        _require(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    _require(t.eval_steps >= 0, "train.eval_steps", f"must be >= 0, got {t.eval_steps}")
    _require(t.max_steps == -1 or t.max_steps > 0, "train.max_steps", f"must be -1 or > 0, got {t.max_steps}")
    _require(t.max_steps > 0 or t.num_train_epochs > 0, "train.num_train_epochs", "must be > 0 when max_steps is -1")
    _require(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
    check_sft(r)
    _require(r.eval.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0")
    _require(r.eval.max_blocks is None or r.eval.max_blocks > 0, "eval.max_blocks", "must be > 0 or None")
    e = r.export
    for q in e.quantizations:
        _require(q in QUANT_TYPES, "export.quantizations", f"unknown quantization {q!r}",
                 closest_hint(q.upper(), QUANT_TYPES))
    if e.modelfile_quant is not None:
        _require(e.modelfile_quant in e.quantizations + (e.outtype.upper(),), "export.modelfile_quant",
                 f"{e.modelfile_quant!r} is not produced by this recipe",
                 f"pick one of {list(e.quantizations) + [e.outtype.upper()]}")
    _require(e.max_f16_ppl_delta > 0, "export.max_f16_ppl_delta", "must be > 0")
    for key in ("quant_max_ppl_delta", "quant_max_kl"):
        try:
            limits = parse_limit_items(getattr(e, key), f"export.{key}")
        except ValueError as exc:
            raise RecipeError(str(exc).split(": ", 1)[1], where=f"export.{key}",
                              hint='items like "Q4_K_M=0.3" or "Q4_K_M=none"') from None
        for q in limits:
            _require(q in QUANT_TYPES, f"export.{key}", f"unknown quantization {q!r}", closest_hint(q, QUANT_TYPES))
    _require(e.imatrix_tokens >= 512, "export.imatrix_tokens", f"must be >= 512, got {e.imatrix_tokens}")
    _require(e.modelfile.num_ctx is None or e.modelfile.num_ctx > 0, "export.modelfile.num_ctx", "must be > 0")
    if r.safety is not None:
        check_safety(r.safety)


def check_safety(s) -> None:
    _require(bool(s.languages), "safety.languages", "no languages to probe", "e.g. ('en',) or ('en', 'eo')")
    _require(bool(s.formats) and set(s.formats) <= {"hf", "gguf"}, "safety.formats",
             f"must be hf and/or gguf, got {s.formats}")
    for key in ("min_pass_rate", "min_category_pass_rate"):
        _require(0 <= getattr(s, key) <= 1, f"safety.{key}", f"must be in [0, 1], got {getattr(s, key)}")
    _require(s.max_new_tokens > 0, "safety.max_new_tokens", f"must be > 0, got {s.max_new_tokens}")


def check_sft(r: Recipe) -> None:
    """train.objective="sft": the sft section's names, and CPT-only fields that would be ignored."""
    from cpt_kit.sft.templates import training_families

    s = r.sft
    choices = ("auto",) + training_families()
    _require(s.chat_template in choices, "sft.chat_template", f"unknown chat template {s.chat_template!r}",
             closest_hint(s.chat_template, choices))
    for key in ("messages_field", "conversations_field", "question_field", "answer_field"):
        _require(bool(getattr(s, key)), f"sft.{key}", "must not be empty")
    _require(s.system_prompt is None or bool(s.system_prompt.strip()), "sft.system_prompt",
             "is empty", "set None for no system prompt")
    if r.train.objective != "sft":
        _require(not r.train.packing, "train.packing", "packing of conversations needs train.objective='sft'",
                 "CPT blocks are packed already; set train.packing=False")
        return
    _require(r.data.replay is None, "data.replay", "replay text is for CPT; SFT trains on chat data only",
             "set data.replay=None")
    _require(r.data.extend_tokenizer is None, "data.extend_tokenizer", "extend the vocabulary in the CPT run",
             "set data.extend_tokenizer=None (the chat template's control tokens are added by the sft prepare)")
    template = r.export.modelfile.template
    if s.chat_template != "auto" and template not in ("auto", s.chat_template):
        raise RecipeError(f"the Modelfile template {template!r} differs from the template the model is trained "
                          f"with ({s.chat_template!r})", where="export.modelfile.template",
                          hint="leave export.modelfile.template='auto' (it follows the trained tokenizer)")


def closest_hint(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else "valid: " + ", ".join(options)


def dataclass_in(tp: Any) -> type | None:
    """The recipe section class inside a field type such as Optional[Replay], or None."""
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
