"""Model shapes for the planner, read from a config.json (no weights loaded).

A shape is what memory and FLOPs depend on: hidden size, layers, heads, MLP width, vocabulary
and whether input and output embeddings are tied. `shape_for_base(base)` finds the base's
config.json (a local model directory, a run directory's merged model or its own base, a hub
model's config.json already in the local Hugging Face cache), or, for the hub models the shipped
recipes name, a small table of their published configs, so `cpt-kit plan` works offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_kit.errors import RecipeError


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    attention_bias: bool = False
    norms_per_layer: int = 2
    """RMSNorm vectors of width hidden per layer (Gemma-3 has 4)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k (Gemma-3, Qwen3)."""

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block, by module name."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        i = self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def block_linear_params(self) -> int:
        """Weights of the linear layers of all blocks (what 4-bit quantizes)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        if self.attention_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return per_layer * self.num_layers

    @property
    def norm_params(self) -> int:
        per_layer = self.norms_per_layer * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return per_layer * self.num_layers + self.hidden_size

    @property
    def total_params(self) -> int:
        """Parameter count as the config defines it (lm_head counted once more when untied)."""
        heads = 1 if self.tied_embeddings else 2
        return heads * self.embedding_params + self.block_linear_params + self.norm_params

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        shapes = self.linear_shapes()
        return r * sum(a + b for name, (a, b) in shapes.items() if name in targets) * self.num_layers


def shape_from_config(config: dict[str, Any], name: str = "config") -> ModelShape:
    """A ModelShape from a transformers config.json dict (Llama, Qwen2/3, Mistral, Gemma-2/3, Phi-3 style)."""
    config = config.get("text_config", config)  # multimodal wrappers (Gemma-3 4B+) keep the LM in text_config
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        model_type = str(config.get("model_type", ""))
        return ModelShape(
            name=name,
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", model_type.startswith("gemma"))),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            qk_norm=model_type.startswith(("gemma3", "qwen3")),
        )
    except KeyError as exc:
        raise RecipeError(f"{name} has no {exc.args[0]!r}: not a decoder-only language model config cpt-kit "
                          "can plan for", where=name) from None


# Published configs of the hub models the shipped recipes (and their common alternatives) name.
# Values are the config.json fields the planner reads; parameter counts are tested against the
# models' published totals.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B": dict(model_type="llama", hidden_size=3072, num_hidden_layers=28,
                                    num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                                    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                    intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                              tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                              tie_word_embeddings=True),
    "google/gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, num_hidden_layers=18,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                intermediate_size=2048, vocab_size=262144, tie_word_embeddings=True),
    "google/gemma-3-1b-pt": dict(model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                 intermediate_size=6912, vocab_size=262144, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                       vocab_size=49152, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M": dict(model_type="llama", hidden_size=960, num_hidden_layers=32,
                                       num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560,
                                       vocab_size=49152, tie_word_embeddings=True),
    "mistralai/Mistral-7B-v0.3": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                      intermediate_size=14336, vocab_size=32768, tie_word_embeddings=False),
}

# Re-uploads with the same weights' shapes (Unsloth's mirrors, instruct variants, 4-bit uploads).
_ALIASES = {"unsloth/llama-3.2-1b": "meta-llama/Llama-3.2-1B", "unsloth/llama-3.2-3b": "meta-llama/Llama-3.2-3B",
            "unsloth/meta-llama-3.1-8b": "meta-llama/Llama-3.1-8B", "unsloth/qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
            "unsloth/qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B", "unsloth/gemma-3-270m": "google/gemma-3-270m",
            "unsloth/gemma-3-1b-pt": "google/gemma-3-1b-pt", "unsloth/smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
            "unsloth/smollm2-360m": "HuggingFaceTB/SmolLM2-360M", "unsloth/mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3"}


def known_shape(hub_id: str) -> ModelShape | None:
    """The table's shape for a hub id (case-insensitive; -Instruct/-it/-bnb-4bit suffixes ignored)."""
    key = hub_id.lower()
    for suffix in ("-bnb-4bit", "-unsloth", "-instruct", "-it"):
        key = key.removesuffix(suffix)
    table = {k.lower(): k for k in KNOWN_CONFIGS}
    name = table.get(key) or table.get(key + "-pt") or _ALIASES.get(key) or _ALIASES.get(key + "-pt")
    return shape_from_config(KNOWN_CONFIGS[name], name) if name else None


class UnknownShape(RecipeError):
    """The base's shape cannot be found offline: no local config.json, none in the Hugging Face cache,
    not in the table. `cpt-kit plan` stops on it; `cpt-kit run` warns and goes on."""


def shape_for_base(base: str, revision: str | None = None) -> ModelShape:
    """The shape of a recipe's `model.base`: local dir, run dir (merged model or its base), tiny:, hub id
    (its config.json in the local Hugging Face cache, else the table)."""
    path = Path(base).expanduser()
    if (path / "manifest.json").is_file():
        merged = path / "merged" / "config.json"
        if merged.is_file():
            return read_config(merged)
        recipe = json.loads((path / "manifest.json").read_text()).get("recipe", {})
        parent = recipe.get("model", {}).get("base")
        if parent:
            return shape_for_base(parent)
    if (path / "config.json").is_file():
        return read_config(path / "config.json")
    if base.startswith("tiny:"):
        return _tiny_shape(Path(base[len("tiny:"):]).expanduser())
    from cpt_kit.model_source import missing_run_dir_error

    missing_run = missing_run_dir_error(base)
    if missing_run:
        raise missing_run
    cached = cached_hub_config(base, revision)
    if cached:
        return read_config(cached)
    shape = known_shape(base)
    if shape is None:
        raise UnknownShape(f"no config.json for {base!r} here or in the Hugging Face cache, and it is not in the "
                           "planner's table of known shapes", where="model.base",
                           hint="download the model's config.json (it is small) into a folder and plan with "
                                "`cpt-kit plan RECIPE --config FOLDER/config.json`")
    return shape


def cached_hub_config(repo_id: str, revision: str | None = None) -> Path | None:
    """config.json of a hub model if the local Hugging Face cache has it (no network: the cache only)."""
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id: not a hub model
        return None
    return Path(found) if isinstance(found, str) else None


def read_config(path: Path) -> ModelShape:
    try:
        return shape_from_config(json.loads(path.read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None


def _tiny_shape(text_folder: Path) -> ModelShape:
    """The demo's tiny base: its cached config when built, else the builder's defaults."""
    import inspect

    from cpt_kit.tiny_model import DEMO_BASE, build_tiny_model, cache_dir, tiny_base_digest

    built = cache_dir() / f"tiny-base-{tiny_base_digest(text_folder)}" / "config.json"
    if built.is_file():
        return read_config(built)
    d = {k: p.default for k, p in inspect.signature(build_tiny_model).parameters.items()}
    return shape_from_config(dict(model_type="llama", hidden_size=d["hidden_size"], num_hidden_layers=d["num_layers"],
                                  num_attention_heads=d["num_heads"], intermediate_size=d["intermediate_size"],
                                  vocab_size=DEMO_BASE["vocab_size"], tie_word_embeddings=d["tie_word_embeddings"]),
                             "tiny demo model")
