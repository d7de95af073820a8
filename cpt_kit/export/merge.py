"""Merge a PEFT LoRA adapter onto the ORIGINAL 16-bit base weights, one safetensors shard at a time.

Peak memory is about one tensor plus the adapter: each shard is read tensor by tensor, every
LoRA target in it gets `W + B @ A * scaling` (computed in fp32, written in the tensor's own
dtype), full modules the adapter saved (embed_tokens, lm_head: `modules_to_save`) replace the
base ones, and the shard is written under a temporary name and renamed. Scaling is
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, per module with rank/alpha patterns.

Tied input/output embeddings (no lm_head.weight in the base files) are resolved the way PEFT
computes the adapted model: the output head is the adapter's lm_head if it saved one, else the
trained embedding when the adapter kept the tie (`ensure_weight_tying`), else the base
embedding. If the head then differs from the input embedding, `lm_head.weight` is written and
`tie_word_embeddings` set to false. A grown vocabulary (adapter embeddings with more rows) sets
config `vocab_size`. `merge_check.check_merge` checks the merged model against base + adapter in PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from cpt_kit.errors import ExportError

PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
_LORA_BIAS_RE = re.compile(r"^(?P<module>.+)\.lora_B(\.[^.]+)?\.bias$")
_LORA_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?(\.weight)?$")
_ORIGINAL_RE = re.compile(r"^(?P<module>.+)\.original_module\.(?P<param>weight|bias)$")
_FULL_RE = re.compile(r"^(?P<module>.+?)(\.modules_to_save(\.[^.]+)?)?\.(?P<param>weight|bias)$")


@dataclass
class Adapter:
    """An adapter directory's LoRA pairs and full modules, keyed by base names; tensors loaded on demand."""

    path: Path
    config: dict
    lora: dict[str, dict[str, str]] = field(default_factory=dict)
    """base module name -> {"A": adapter key, "B": adapter key, "embedding": "1" if an Embedding}"""
    full: dict[str, str] = field(default_factory=dict)
    """base tensor name (e.g. model.embed_tokens.weight) -> adapter key of the trained full module"""
    original: dict[str, str] = field(default_factory=dict)
    """base tensor name -> adapter key of the base weight after a vocabulary resize (`original_module`)"""
    lora_bias: dict[str, str] = field(default_factory=dict)
    """base module name -> adapter key of its lora_B bias (PEFT `lora_bias=True`: bias += scaling * lora_B.bias)"""
    _handle: object = None

    def _open(self):
        if self._handle is None:
            from safetensors import safe_open
            self._handle = safe_open(str(self.path / "adapter_model.safetensors"), framework="pt")
        return self._handle

    def tensor(self, key: str):
        return self._open().get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._open()
        return tuple(handle.get_slice(key).get_shape() if hasattr(handle, "get_slice") else handle.get_tensor(key).shape)

    def scaling(self, module: str) -> float:
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


class _DictHandle:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get_tensor(self, key):
        return self.tensors[key]

    def keys(self):
        return list(self.tensors)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches the module name or its dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(adapter_dir: Path) -> Adapter:
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ExportError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)", where=str(adapter_dir))
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"adapter type {config.get('peft_type')!r} is not LoRA", where=str(config_file))
    if config.get("use_dora"):
        raise ExportError("DoRA adapters are not supported by the merge", where=str(config_file))
    adapter = Adapter(adapter_dir, config)
    if (adapter_dir / "adapter_model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
    elif (adapter_dir / "adapter_model.bin").is_file():
        import torch
        adapter._handle = _DictHandle(torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True))
        keys = adapter._handle.keys()
    else:
        raise ExportError(f"{adapter_dir} has no adapter_model.safetensors", where=str(adapter_dir))
    for key in keys:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".base_layer.", ".")  # a trained bias of a LoRA-wrapped layer (bias="all"/"lora_only")
        if "lora_magnitude_vector" in name:
            raise ExportError("DoRA adapters are not supported by the merge", where=str(adapter_dir))
        match = _LORA_BIAS_RE.match(name)
        if match:
            adapter.lora_bias[match["module"]] = key
            continue
        match = _LORA_RE.match(name)
        if match:
            slot = adapter.lora.setdefault(match["module"], {})
            kind = match["kind"]
            slot[kind[-1]] = key
            if kind.startswith("lora_embedding"):
                slot["embedding"] = "1"
            continue
        match = _ORIGINAL_RE.match(name)
        if match:
            adapter.original[f"{match['module']}.{match['param']}"] = key
            continue
        match = _FULL_RE.match(name)
        if not match:
            raise ExportError(f"unexpected tensor {key!r} in the adapter", where=str(adapter_dir))
        adapter.full[f"{match['module']}.{match['param']}"] = key
    for module, slot in adapter.lora.items():
        if "A" not in slot or "B" not in slot:
            raise ExportError(f"LoRA module {module} has only one of lora_A/lora_B", where=str(adapter_dir))
    return adapter


def base_files(base_dir: Path) -> tuple[dict[str, str], Optional[dict]]:
    """(tensor name -> shard file name, index json or None) of a safetensors model directory."""
    base_dir = Path(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise ExportError(f"the base at {base_dir} is a {method} checkpoint; merging onto quantized weights loses quality",
                          where="model.base", hint="point model.base to the original 16-bit model the adapter was trained from")
    index_file = base_dir / INDEX
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        return dict(index["weight_map"]), index
    single = base_dir / "model.safetensors"
    if not single.is_file():
        raise ExportError(f"{base_dir} has no safetensors weights", where=str(base_dir),
                          hint="save the base with save_pretrained(safe_serialization=True) first")
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as handle:
        return {k: "model.safetensors" for k in handle.keys()}, None


def _add_lora(adapter: Adapter, module: str, out) -> None:
    """out += B @ A * scaling, in place (out is fp32)."""
    import torch

    slot = adapter.lora[module]
    a = adapter.tensor(slot["A"]).to(torch.float32)
    b = adapter.tensor(slot["B"]).to(torch.float32)
    transposed = bool(slot.get("embedding") or adapter.config.get("fan_in_fan_out"))
    shape = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    if tuple(out.shape) != shape:
        raise ExportError(f"LoRA delta of {module} has shape {shape}, base weight {tuple(out.shape)}",
                          where=str(adapter.path), hint="the adapter was trained on another base model")
    if transposed:
        out.add_((b @ a).T, alpha=adapter.scaling(module))
    else:
        out.addmm_(b, a, alpha=adapter.scaling(module))


class _Base:
    """Base tensors of one shard: the adapter's resized copy (PEFT `original_module`) where it saved one."""

    def __init__(self, adapter: Adapter, handle):
        self.adapter, self.handle = adapter, handle

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape = self.handle.meta(name)
        for table in (self.adapter.full, self.adapter.original):
            if name in table:
                shape = self.adapter.shape(table[name])
                break
        return dtype, shape

    def get(self, name: str):
        if name in self.adapter.original:
            return self.adapter.tensor(self.adapter.original[name])
        return self.handle.get_tensor(name)


def _merged(adapter: Adapter, base: _Base, name: str):
    """The merged value of base tensor `name`: unchanged, replaced by a full module, or W + LoRA delta (fp32)."""
    import torch

    if name in adapter.full:
        return adapter.tensor(adapter.full[name])
    if name.endswith(".bias") and name[: -len(".bias")] in adapter.lora_bias:
        module = name[: -len(".bias")]
        out = base.get(name).to(torch.float32)
        return out.add_(adapter.tensor(adapter.lora_bias[module]).to(torch.float32), alpha=adapter.scaling(module))
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if module not in adapter.lora:
        return base.get(name)
    out = base.get(name).to(torch.float32)
    _add_lora(adapter, module, out)
    return out


def _counted(progress, tensor):
    """`tensor`, after advancing `progress` (if any) by one."""
    if progress is not None:
        progress.advance()
    return tensor


def _tied_head(adapter: Adapter, base: _Base, embed_key: str):
    """For a tied base: a function giving the output head, or None when it stays tied to the merged embedding."""
    import torch

    if "lm_head.weight" in adapter.full:
        def head():
            return adapter.tensor(adapter.full["lm_head.weight"])
    elif "lm_head" in adapter.lora:
        def head():
            out = base.get(embed_key).to(torch.float32)
            _add_lora(adapter, "lm_head", out)
            return out
    elif adapter.config.get("ensure_weight_tying") or not _embedding_changed(adapter):
        return None
    else:  # PEFT kept the original (tied) weight as lm_head while embed_tokens was trained
        def head():
            return base.get(embed_key)
    same = torch.equal(head().to(torch.float32), _merged(adapter, base, embed_key).to(torch.float32))
    return None if same else head


def _shard_entries(adapter: Adapter, base: _Base, names: list[str], tied_embed_key: Optional[str],
                   progress=None) -> list:
    """The merged tensors of one shard as lazy `Entry`s, plus `lm_head.weight` after the embedding when a
    tied base (`tied_embed_key` given) gets an output head that differs from its merged embedding;
    `progress` (if any) advances once per base tensor produced."""
    from cpt_kit.export.safetensors_io import Entry

    entries = []
    for name in names:
        dtype, shape = base.meta(name)
        entries.append(Entry(name, dtype, shape, lambda name=name: _counted(progress, _merged(adapter, base, name))))
        if name == tied_embed_key:
            head = _tied_head(adapter, base, name)
            if head is not None:
                head_shape = (adapter.shape(adapter.full["lm_head.weight"]) if "lm_head.weight" in adapter.full
                              else shape)
                entries.append(Entry("lm_head.weight", dtype, head_shape, head))
    return entries


def changed_tensors(base_dir: Path, adapter_dir: Path) -> Iterator[tuple[str, object, object]]:
    """(name, merged value before rounding to the stored dtype, base value or None) for every tensor the
    adapter changes, one at a time: the exact result of the merge math, for checking it."""
    from cpt_kit.export.safetensors_io import Reader

    adapter = load_adapter(adapter_dir)
    weight_map, _index = base_files(base_dir)
    embed_key = next((k for k in ("model.embed_tokens.weight", "transformer.wte.weight") if k in weight_map), None)
    tied_embed_key = embed_key if "lm_head.weight" not in weight_map else None
    changed = {f"{m}.weight" for m in adapter.lora} | set(adapter.full) | set(adapter.original)
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        with Reader(Path(base_dir) / shard) as handle:
            base = _Base(adapter, handle)
            for entry in _shard_entries(adapter, base, names, tied_embed_key):
                if entry.name in weight_map and entry.name not in changed:
                    continue
                source = embed_key if entry.name not in weight_map else entry.name
                reference = base.get(source)
                yield entry.name, entry.produce(), reference if tuple(reference.shape) == tuple(entry.shape) else None


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, *, tokenizer_dir: Optional[Path] = None,
                  log: Callable[[str], None] = lambda message: None, progress=None) -> dict:
    """Write base + adapter as a complete model directory into `out_dir` (which must be a fresh path).

    progress: a cpt_kit.progress.Progress, advanced once per base tensor written."""
    from cpt_kit.export.safetensors_io import Reader, write_safetensors

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    adapter = load_adapter(adapter_dir)
    weight_map, index = base_files(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    embed_key = next((k for k in ("model.embed_tokens.weight", "transformer.wte.weight") if k in weight_map), None)
    head_key = "lm_head.weight"
    tied_base = head_key not in weight_map and embed_key is not None
    known = set(weight_map) | ({head_key} if tied_base else set())
    unknown = [m for m in adapter.lora if f"{m}.weight" not in known] + \
              [n for n in (*adapter.full, *adapter.original, *(f"{m}.bias" for m in adapter.lora_bias)) if n not in known]
    if unknown:
        raise ExportError(f"adapter weights not found in the base: {', '.join(sorted(unknown)[:5])}", where=str(adapter_dir),
                          hint="the adapter was trained on another base model")
    out_dir.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress.update(total=len(weight_map))
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    new_map: dict[str, str] = {}
    total = largest = 0
    tied_out = tied_base
    vocab = None
    for shard, names in shards.items():
        largest = max(largest, (base_dir / shard).stat().st_size)
        with Reader(base_dir / shard) as handle:
            entries = _shard_entries(adapter, _Base(adapter, handle), names, embed_key if tied_base else None,
                                     progress)
            if embed_key in names:
                vocab = next(e.shape[0] for e in entries if e.name == embed_key)
                tied_out = tied_out and not any(e.name == head_key for e in entries)
            tmp = out_dir / f".{shard}.partial"
            total += write_safetensors(tmp, entries)
        os.replace(tmp, out_dir / shard)
        new_map.update({entry.name: shard for entry in entries})
        log(f"merged {shard} ({len(entries)} tensors)")
    if index is not None:
        index = {**index, "metadata": {**index.get("metadata", {}), "total_size": total},
                 "weight_map": dict(sorted(new_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    base_vocab = config.get("vocab_size")
    if vocab is not None:
        config["vocab_size"] = vocab
    untie_reason = None
    if tied_base and not tied_out:
        config["tie_word_embeddings"] = False
        untie_reason = ("embed_tokens and lm_head were trained to different values"
                        if "lm_head.weight" in adapter.full or "lm_head" in adapter.lora else
                        "embed_tokens was trained while lm_head kept the base embedding (PEFT without ensure_weight_tying)")
        log(f"{untie_reason}: the merged model has untied input/output embeddings (tie_word_embeddings=false)")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copied = copy_model_files(base_dir, out_dir, tokenizer_dir or adapter_dir)
    return {"shards": len(shards), "largest_shard_bytes": largest, "merged_bytes": total,
            "lora_modules": len(adapter.lora), "full_modules": sorted(adapter.full),
            "scaling": "rslora" if adapter.config.get("use_rslora") else "alpha/r",
            "tied_base": tied_base, "tied_merged": tied_out, "untied": tied_base and not tied_out, "untie_reason": untie_reason,
            "base_vocab_size": base_vocab, "vocab_size": vocab, "tokenizer_files": copied}


def _embedding_changed(adapter: Adapter) -> bool:
    return any(k.endswith("embed_tokens.weight") or k.endswith("wte.weight") for k in adapter.full) or \
        any(m.endswith(("embed_tokens", "wte")) for m in adapter.lora)


def copy_model_files(base_dir: Path, out_dir: Path, tokenizer_dir: Path) -> list[str]:
    """generation_config.json from the base; tokenizer files from `tokenizer_dir`, the base filling gaps."""
    base_dir, tokenizer_dir = Path(base_dir), Path(tokenizer_dir)
    if (base_dir / "generation_config.json").is_file():
        shutil.copyfile(base_dir / "generation_config.json", out_dir / "generation_config.json")
    has_own = (tokenizer_dir / "tokenizer_config.json").is_file()
    copied = []
    for name in TOKENIZER_FILES:
        source = tokenizer_dir / name if has_own and (tokenizer_dir / name).is_file() else None
        if source is None and (not has_own or name == "tokenizer.model") and (base_dir / name).is_file():
            source = base_dir / name
        if source is not None:
            shutil.copyfile(source, out_dir / name)
            copied.append(name)
    if "tokenizer_config.json" not in copied:
        raise ExportError(f"no tokenizer found in {tokenizer_dir} or {base_dir}", where=str(tokenizer_dir),
                          hint="save the tokenizer with the adapter (tokenizer.save_pretrained(adapter_dir))")
    return copied
