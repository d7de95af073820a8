"""Recipes are typed, frozen Python data.

A recipe module builds a `Recipe` and binds it to `RECIPE`; `load_recipe(path)` imports it,
`apply_overrides(recipe, ["train.learning_rate=1e-4"])` changes fields with type checks.
Every field has a docstring (the string literal under it), LitGPT style; field names follow
TRL / transformers / PEFT where the mapping is one-to-one.

Validation happens when a `Recipe` is constructed (types, ranges, cross-field rules), so a
bad recipe fails before any model is loaded. Checks that need the hardware (bf16 on a GPU
without bf16) are in `cpt_kit.hardware.check_recipe_against_hardware`, run by `cpt-kit run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from cpt_kit.errors import RecipeError

QUANT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
               "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("prepare", "train", "evaluate", "merge", "gguf", "modelfile", "verify")


@dataclass(frozen=True)
class Model:
    base: str
    """Base model: a Hugging Face hub id, a local model directory, or a finished run directory."""
    tokenizer: Optional[str] = None
    """Tokenizer to use if not the base model's own (hub id or local directory)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    load_in_4bit: bool = True
    """Load the base in 4-bit (bitsandbytes NF4) for training. CUDA only: on CPU cpt-kit loads 16/32-bit and says so."""
    max_seq_length: int = 2048
    """Length of the packed training blocks and the model's training context."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Weight dtype of the non-quantized parts; auto picks bf16 where supported, else fp16 (fp32 on CPU)."""
    trust_remote_code: bool = False
    """Run code shipped with the model repository. Off unless you trust the repository."""
    hf_token_env: str = "HF_TOKEN"
    """Name of the environment variable holding a hub token (the token itself never goes in a recipe)."""


@dataclass(frozen=True)
class Lora:
    r: int = 128
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    use_rslora: bool = True
    """Rank-stabilised LoRA: scale by alpha / sqrt(r)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Linear layers that get LoRA adapters (all linear layers of a Llama-style block by default)."""
    train_embeddings: bool = True
    """Also train embed_tokens and lm_head as full modules (needed to learn a new language)."""


@dataclass(frozen=True)
class Replay:
    sources: tuple[str, ...]
    """General text mixed in against forgetting: files, directories, globs, JSONL/Parquet or hf:NAME."""
    fraction: float = 0.1
    """Share of the training tokens that come from the replay text."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/dataset rows."""
    heldout_fraction: float = 0.05
    """Share of replay documents kept out of training to measure forgetting."""


@dataclass(frozen=True)
class TokenizerExtension:
    max_new_tokens: int = 256
    """Add at most this many new tokens."""
    min_frequency: int = 5
    """A candidate piece must occur at least this often in the corpus."""
    min_subtokens: int = 3
    """Only pieces the current tokenizer splits into at least this many tokens are candidates."""


@dataclass(frozen=True)
class Data:
    sources: tuple[str, ...] = ()
    """Corpus: text files, directories, globs, .jsonl/.parquet files, local dataset dirs or hf:NAME[:CONFIG]."""
    text_field: str = "text"
    """Field holding the text in JSONL/Parquet/dataset rows."""
    hf_split: str = "train"
    """Split of a Hugging Face dataset source."""
    streaming: bool = False
    """Stream Hugging Face datasets instead of downloading them whole."""
    max_documents: Optional[int] = None
    """Stop reading after this many documents per source (useful with streaming)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Non-UTF-8 bytes: strict stops with the file and byte offset; replace substitutes U+FFFD."""
    min_chars: int = 20
    """Drop documents shorter than this after cleaning."""
    max_chars: Optional[int] = None
    """Drop documents longer than this after cleaning (None: no limit)."""
    dedup_exact: bool = True
    """Drop exact duplicate documents."""
    dedup_near: bool = True
    """Drop near-duplicate documents (MinHash LSH)."""
    near_dup_threshold: float = 0.85
    """Estimated Jaccard similarity above which two documents are near duplicates."""
    heldout_fraction: float = 0.02
    """Share of documents held out for evaluation (split by document, deterministic)."""
    min_train_blocks: int = 8
    """Fewest packed training blocks accepted; a smaller corpus is an error, not a 0-step run."""
    seed: int = 0
    """Seed of the held-out split and mixing."""
    num_proc: int = 2
    """Processes used to tokenize."""
    replay: Optional[Replay] = None
    """General text mixed into training against catastrophic forgetting."""
    extend_tokenizer: Optional[TokenizerExtension] = None
    """Add frequent, badly split corpus pieces to the vocabulary (new-language CPT)."""


@dataclass(frozen=True)
class Train:
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    """Training library: unsloth, hf (transformers+PEFT+TRL), or auto (unsloth when importable)."""
    objective: Literal["cpt"] = "cpt"
    """Training objective: cpt (causal LM on packed raw text)."""
    learning_rate: float = 5e-5
    """Learning rate of the LoRA adapters."""
    embedding_learning_rate: Optional[float] = 5e-6
    """Learning rate of embed_tokens/lm_head (usually 2-10x smaller); needs lora.train_embeddings."""
    per_device_train_batch_size: int = 2
    """Blocks per device per step."""
    gradient_accumulation_steps: int = 8
    """Steps accumulated per optimizer update."""
    num_train_epochs: float = 1.0
    """Passes over the training blocks (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use num_train_epochs)."""
    warmup_ratio: float = 0.1
    """Share of the steps spent warming up the learning rate."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    optim: str = "auto"
    """Optimizer name as in transformers (auto: adamw_8bit on CUDA, adamw_torch on CPU)."""
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Mixed precision: auto picks bf16 where supported, else fp16 on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory."""
    logging_steps: int = 1
    """Log loss, lr, tokens/s and memory every N steps to logs/train.jsonl."""
    eval_steps: int = 50
    """Evaluate held-out loss every N steps (0: only at the end)."""
    save_steps: int = 100
    """Save a resumable checkpoint every N steps."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    seed: int = 3407
    """Training seed."""


@dataclass(frozen=True)
class Eval:
    prompts: tuple[str, ...] = ()
    """Fixed prompts generated from before and after training."""
    max_new_tokens: int = 48
    """Tokens generated per prompt (greedy)."""
    max_blocks: Optional[int] = 256
    """Evaluate perplexity on at most this many held-out blocks (None: all)."""


@dataclass(frozen=True)
class ModelfileSpec:
    template: str = "auto"
    """Chat template: auto (from the tokenizer's own template), none (plain completion), a family name from modelfiles/, or a file path."""
    system: Optional[str] = None
    """SYSTEM prompt written into the Modelfile."""
    temperature: Optional[float] = None
    """Sampling temperature (PARAMETER temperature)."""
    top_p: Optional[float] = None
    """Nucleus sampling (PARAMETER top_p)."""
    top_k: Optional[int] = None
    """Top-k sampling (PARAMETER top_k)."""
    repeat_penalty: Optional[float] = None
    """Repetition penalty (PARAMETER repeat_penalty)."""
    num_ctx: Optional[int] = None
    """Context window Ollama allocates (default: model.max_seq_length)."""
    extra_stops: tuple[str, ...] = ()
    """Stop strings added to those found in the tokenizer."""


@dataclass(frozen=True)
class Export:
    outtype: Literal["f16", "bf16"] = "f16"
    """Type of the unquantized GGUF the quantizations start from."""
    quantizations: tuple[str, ...] = ("Q4_K_M", "Q8_0")
    """llama.cpp quantization types to produce."""
    modelfile_quant: Optional[str] = None
    """Which GGUF the Modelfile's FROM points to (default: the first quantization)."""
    modelfile: ModelfileSpec = field(default_factory=ModelfileSpec)
    """Ollama Modelfile settings."""
    adapter_modelfile: bool = False
    """Also write a LoRA-adapter GGUF and a Modelfile with ADAPTER over the base GGUF."""
    max_f16_ppl_delta: float = 0.01
    """Verification fails if the F16 GGUF's perplexity differs from the HF model's by more than this share."""


@dataclass(frozen=True)
class Recipe:
    name: str
    """Run name: outputs go to runs/<name>/."""
    model: Model
    """Base model and how to load it."""
    lora: Lora = field(default_factory=Lora)
    """LoRA adapter settings."""
    data: Data = field(default_factory=Data)
    """Corpus and its preparation."""
    train: Train = field(default_factory=Train)
    """Training settings."""
    eval: Eval = field(default_factory=Eval)
    """Evaluation settings."""
    export: Export = field(default_factory=Export)
    """Merge, GGUF, quantization, Modelfile and verification settings."""

    def __post_init__(self) -> None:
        _check_types(self, "")
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (tuples become lists), as stored in manifest.json."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------- validation

def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(sys.modules[__name__]))


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_describe(typing.get_args(tp)[0])}"
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


def _check_types(obj: Any, prefix: str) -> None:
    for name, tp in _type_hints(type(obj)).items():
        value = getattr(obj, name)
        key = f"{prefix}{name}"
        if isinstance(value, list) and typing.get_origin(tp) is tuple:
            raise RecipeError(f"expected a tuple, got a list {value!r}", where=key,
                              hint="write it as a tuple: (" + ", ".join(repr(v) for v in value) + ",)")
        if not _matches(value, tp):
            raise RecipeError(f"expected {_describe(tp)}, got {type(value).__name__} {value!r}", where=key)
        if dataclasses.is_dataclass(value):
            _check_types(value, key + ".")


def _require(ok: bool, key: str, message: str, hint: str | None = None) -> None:
    if not ok:
        raise RecipeError(message, where=key, hint=hint)


def _check_values(r: Recipe) -> None:
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
    _require(r.eval.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0")
    _require(r.eval.max_blocks is None or r.eval.max_blocks > 0, "eval.max_blocks", "must be > 0 or None")
    e = r.export
    for q in e.quantizations:
        _require(q in QUANT_TYPES, "export.quantizations", f"unknown quantization {q!r}",
                 _closest_hint(q.upper(), QUANT_TYPES))
    if e.modelfile_quant is not None:
        _require(e.modelfile_quant in e.quantizations + (e.outtype.upper(),), "export.modelfile_quant",
                 f"{e.modelfile_quant!r} is not produced by this recipe",
                 f"pick one of {list(e.quantizations) + [e.outtype.upper()]}")
    _require(e.max_f16_ppl_delta > 0, "export.max_f16_ppl_delta", "must be > 0")
    _require(e.modelfile.num_ctx is None or e.modelfile.num_ctx > 0, "export.modelfile.num_ctx", "must be > 0")


def _closest_hint(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else "valid: " + ", ".join(options)


# ----------------------------------------------------------------------------- loading

def load_recipe(path: str | Path) -> Recipe:
    """Import a recipe module from a file path and return its RECIPE."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", hint="pass the path of a .py file that defines RECIPE")
    module_name = f"cpt_kit_recipe_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # lets a recipe import its sibling recipes
    try:
        spec.loader.exec_module(module)
    except RecipeError as exc:
        raise RecipeError(exc.message, where=f"{_recipe_line(path, exc)}: {exc.where}", hint=exc.hint) from None
    except SyntaxError as exc:
        raise RecipeError(f"syntax error: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    except Exception as exc:  # the user's module raised: show where in their file
        raise RecipeError(f"{type(exc).__name__}: {exc}", where=_recipe_line(path, exc),
                          hint="fix the recipe module so that it imports cleanly") from None
    finally:
        sys.path.pop(0)
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        found = "nothing" if recipe is None else type(recipe).__name__
        raise RecipeError(f"RECIPE must be a cpt_kit.recipe.Recipe, found {found}", where=str(path),
                          hint="end the module with RECIPE = Recipe(...)")
    return recipe


def _recipe_line(path: Path, exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


# ----------------------------------------------------------------------------- overrides

def apply_overrides(recipe: Recipe, assignments: typing.Iterable[str]) -> Recipe:
    """Apply `a.b=value` assignments; unknown keys and wrong types raise RecipeError."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {assignment!r} is not KEY=VALUE", hint="e.g. --set train.learning_rate=1e-4")
        recipe = _set(recipe, key.split("."), raw.strip(), key)
    return recipe


def _set(obj: Any, parts: list[str], raw: str, full_key: str) -> Any:
    hints = _type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        prefix = full_key[: len(full_key) - len(".".join(parts))]
        raise RecipeError(f"unknown key {full_key!r}", where="--set",
                          hint=_closest_hint(prefix + name, [prefix + k for k in hints]))
    current = getattr(obj, name)
    if len(parts) == 1:
        value = parse_value(raw, hints[name], full_key)
    else:
        if current is None:
            nested = _dataclass_in(hints[name])
            if nested is None:
                raise RecipeError(f"{name!r} is not a section", where=full_key)
            try:
                current = nested()
            except TypeError:
                raise RecipeError(f"{full_key.rsplit('.', 1)[0]} is not set", where="--set",
                                  hint="set it in the recipe first (it has required fields)") from None
        if not dataclasses.is_dataclass(current):
            raise RecipeError(f"{name!r} is a value, not a section", where=full_key)
        value = _set(current, parts[1:], raw, full_key)
    # sections are validated as a whole when the enclosing Recipe is rebuilt (Recipe.__post_init__)
    return dataclasses.replace(obj, **{name: value})


def _dataclass_in(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """Parse a command-line string into a value of type `tp`, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arg, key)
            except RecipeError as exc:
                errors.append(exc.message)
        raise RecipeError("; ".join(errors), where=key)
    if origin is Literal:
        if raw in args:
            return raw
        raise RecipeError(f"{raw!r} is not one of {', '.join(map(repr, args))}", where=key,
                          hint=_closest_hint(raw, [str(a) for a in args]))
    if origin is tuple:
        items = _parse_list(raw, key)
        return tuple(parse_value(i if isinstance(i, str) else json.dumps(i), args[0], key) for i in items)
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise RecipeError(f"expected true or false, got {raw!r}", where=key)
    if tp in (int, float):
        try:
            number = float(raw) if tp is float else int(raw)
        except ValueError:
            raise RecipeError(f"expected {tp.__name__}, got {raw!r}", where=key) from None
        return number
    if tp is str:
        return raw
    if dataclasses.is_dataclass(tp):
        raise RecipeError(f"{key} is a section; set its fields, e.g. {key}.<field>=...", where="--set")
    raise RecipeError(f"cannot set a value of type {_describe(tp)} from the command line", where=key)


def _parse_list(raw: str, key: str) -> list:
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"invalid JSON list {raw!r}: {exc.msg}", where=key) from None
        if not isinstance(items, list):
            raise RecipeError(f"expected a list, got {raw!r}", where=key)
        return items
    return [part.strip() for part in raw.split(",") if part.strip()]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a recipe dataclass (for `cpt-kit show --docs`)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a Recipe from `Recipe.to_dict()` output (e.g. a run's manifest.json)."""
    return _from_dict(Recipe, data, "")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(f"unknown key {prefix}{key!r}", hint=_closest_hint(key, hints))
    values = {}
    for name, value in data.items():
        nested = _dataclass_in(hints[name])
        if nested is not None and isinstance(value, dict):
            value = _from_dict(nested, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)
