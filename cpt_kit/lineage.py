"""Where a run's base model came from: base -> CPT run -> ... -> this run, for the manifest and report.

`manifest.json["lineage"]` lists the ancestors of a run oldest first; the first one's `base` is
the original model (a run from a hub model or plain folder has no ancestors: []). Each is
- {"kind": "run", "path", "recipe", "objective", "base", "merged_sha256"}: a cpt-kit run whose merged/ is the base
- {"kind": "adapter", "path", "name", "base", "adapter_sha256"}: a PEFT adapter folder merged onto its base
`merged_sha256` is the content hash of the ancestor's merged weights (all safetensors files, in
name order), so a report can tell whether the ancestor was re-run since.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cpt_kit.recipe import Model


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the safetensors files of a model directory (names and contents, in name order).

    Cached in the cpt-kit cache by path, size and modification time (hashing GBs twice is slow)."""
    from cpt_kit.manifest import file_sha256
    from cpt_kit.tiny_model import cache_dir

    files = sorted(Path(model_dir).glob("*.safetensors"))
    stamp = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    cache = cache_dir() / "weights-sha256" / (hashlib.sha256(stamp.encode()).hexdigest()[:24] + ".txt")
    if cache.is_file():
        return cache.read_text().strip()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
    value = digest.hexdigest()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(value)
    return value


def lineage(model: Model) -> list[dict[str, Any]]:
    """The ancestor runs/adapters of a run whose recipe has `model`, oldest first."""
    from cpt_kit.manifest import file_sha256
    from cpt_kit.model_source import resolve_base

    path = Path(model.base).expanduser()
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        recipe = manifest.get("recipe", {})
        parent_base = recipe.get("model", {}).get("base", "")
        earlier = manifest["lineage"] if "lineage" in manifest else lineage(Model(base=parent_base))
        return earlier + [{"kind": "run", "path": str(path.resolve()), "recipe": recipe.get("name"),
                           "objective": recipe.get("train", {}).get("objective", "cpt"), "base": parent_base,
                           "merged_sha256": weights_sha256(Path(resolve_base(model)))}]
    if (path / "adapter_config.json").is_file():
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        info_file = path / "cpt_kit_train.json"
        info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
        base = info.get("base") or config.get("base_model_name_or_path", "")
        weights = sorted(path.glob("*.safetensors"))
        return lineage(Model(base=base)) + [{"kind": "adapter", "path": str(path.resolve()), "name": path.name,
                                             "base": base,
                                             "adapter_sha256": file_sha256(weights[0]) if weights else None}]
    return []


def record_lineage(manifest, model: Model) -> list[dict[str, Any]]:
    """Store the lineage in the manifest (saved at once) and return it."""
    chain = lineage(model)
    manifest.data["lineage"] = chain
    manifest.save()
    return chain


def describe(chain: list[dict[str, Any]]) -> str:
    """"base -> cpt run 'language' (merged 3f2a...) -> ..." for logs."""
    parts = [str(chain[0]["base"])] if chain else []
    for item in chain:
        if item["kind"] == "adapter":
            parts.append(f"adapter {item['name']}")
        else:
            parts.append(f"{item['objective']} run {item['recipe']!r} (merged {item['merged_sha256'][:12]})")
    return " -> ".join(parts)
