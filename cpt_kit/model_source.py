"""Where a model comes from: hub id, local directory, or a finished cpt-kit run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cpt_kit.errors import RecipeError
from cpt_kit.recipe import Model


TINY_PREFIX = "tiny:"


def resolve_base(model: Model) -> str:
    """A local model directory or a hub id.

    - a finished run directory (has manifest.json): that run's merged/ model;
    - a PEFT adapter folder (adapter_config.json): its base with the adapter merged in, built once
      into the cache (cpt_kit.model_source.merged_adapter_base);
    - a model folder (config.json), or a hub id;
    - `tiny:FOLDER`: a tiny Llama built offline from the .txt files in FOLDER (the demo's base;
      built once and cached, see cpt_kit.tiny_model.cached_tiny_base).
    """
    if model.base.startswith(TINY_PREFIX):
        from cpt_kit.tiny_model import cached_tiny_base
        return str(cached_tiny_base(Path(model.base[len(TINY_PREFIX):]).expanduser()))
    path = Path(model.base).expanduser()
    if (path / "manifest.json").is_file():
        return str(run_merged_model(path))
    if path.exists():
        if (path / "adapter_config.json").is_file():
            return str(merged_adapter_base(path, model))
        if not (path / "config.json").is_file():
            raise RecipeError(f"{path} is not a model directory (no config.json) nor a PEFT adapter "
                              "(no adapter_config.json)", where="model.base")
        return str(path)
    missing_run = missing_run_dir_error(model.base)
    if missing_run:
        raise missing_run
    if model.base.startswith((".", "/", "~")):
        raise RecipeError(f"local model directory {path} does not exist", where="model.base")
    return model.base


def missing_run_dir_error(base: str) -> RecipeError | None:
    """The error for a base that names a run directory (a folder under a `runs/` folder, where
    `cpt-kit run` writes by default) that does not exist yet, else None."""
    path = Path(base).expanduser()
    if path.exists() or path.parent.name != "runs":
        return None
    name = path.name
    return RecipeError(f"{base!r} is a run directory that does not exist yet: the run this recipe builds "
                       "on has not been made", where="model.base",
                       hint=f"run the recipe that writes it first (recipe name {name!r}, e.g. `cpt-kit run "
                            f"recipes/{name}.py`, writes runs/{name}), or point model.base to an existing run, "
                            "model folder or hub id: --set model.base=...")


def run_merged_model(run: Path) -> Path:
    """merged/ of a run directory whose merge stage finished; else an error naming the missing stage
    and the command that finishes it."""
    manifest = read_model_json(run / "manifest.json")
    stages = manifest.get("stages", {})
    merged = run / "merged"
    if stages.get("merge", {}).get("status") == "done" and (merged / "config.json").is_file():
        return merged
    name = manifest.get("recipe", {}).get("name", "RECIPE")
    trained = stages.get("train", {}).get("status") in ("done", "external") and (run / "adapter").is_dir()
    missing = "merge" if trained else "train"
    state = stages.get(missing, {}).get("status", "not run")
    command = (f"cpt-kit export {run}" if trained else
               f"cpt-kit run recipes/{name}.py --output-dir {run} --until merge")
    raise RecipeError(f"run {run} has no merged model: its {missing} stage is {state}", where="model.base",
                      hint=f"finish that run first: {command}")


def merged_adapter_base(adapter_dir: Path, model: Model) -> Path:
    """Base + PEFT adapter merged (cpt_kit.export.merge, onto the 16-bit base), cached by content."""
    import hashlib

    from cpt_kit.export.merge import merge_adapter
    from cpt_kit.manifest import file_sha256
    from cpt_kit.rundir import atomic_path
    from cpt_kit.tiny_model import cache_dir

    config = read_model_json(adapter_dir / "adapter_config.json")
    info_file = adapter_dir / "cpt_kit_train.json"
    info = read_model_json(info_file) if info_file.is_file() else {}
    base_name = info.get("base") or config.get("base_model_name_or_path")
    if not base_name:
        raise RecipeError(f"the adapter {adapter_dir} does not name its base model", where="model.base",
                          hint="set base_model_name_or_path in its adapter_config.json")
    base = resolve_merge_base_for(base_name, model)
    files = sorted(p for p in adapter_dir.iterdir() if p.is_file())
    digest = hashlib.sha256(json.dumps([str(base), [(p.name, file_sha256(p)) for p in files]]).encode()).hexdigest()
    target = cache_dir() / f"adapter-base-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    with atomic_path(target) as tmp:
        merge_adapter(base, adapter_dir, tmp, tokenizer_dir=tokenizer_dir)
    return target


def resolve_merge_base_for(base_name: str, model: Model) -> Path:
    """A local directory with the base's safetensors (downloaded when it is a hub id)."""
    from dataclasses import replace

    resolved = resolve_base(replace(model, base=base_name))
    if Path(resolved).exists():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    kwargs = load_kwargs(model)
    try:
        return Path(snapshot_download(resolved, token=kwargs.get("token"),
                                      allow_patterns=["*.safetensors", "*.json", "tokenizer.model", "*.jinja", "*.txt"]))
    except Exception as exc:
        raise RecipeError(f"cannot download the adapter's base {resolved!r}: {exc}", where="model.base",
                          hint="point model.base to a local copy, or merge the adapter first") from None


def is_local(model: Model) -> bool:
    return Path(resolve_base(model)).exists()


def load_kwargs(model: Model) -> dict[str, Any]:
    """Keyword arguments for from_pretrained: revision, token (from the named env var), trust_remote_code."""
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.revision:
        kwargs["revision"] = model.revision
    token = os.environ.get(model.hf_token_env)
    if token:
        kwargs["token"] = token
    return kwargs


def check_base(model: Model) -> None:
    """Before any work (and before a run directory exists): the base resolves to a model directory or
    a hub id, and its config does not need code from the model repository unless the recipe allows it."""
    if model.base.startswith(TINY_PREFIX):  # built by cpt-kit (a plain Llama) from a folder of .txt files
        from cpt_kit.tiny_model import tiny_base_digest
        tiny_base_digest(Path(model.base[len(TINY_PREFIX):]).expanduser())  # RecipeError when it has none
        return
    base = resolve_base(model)  # RecipeError for a missing or non-model local directory
    config = _read_config(base, model)
    if config is None or model.trust_remote_code:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if config.get("auto_map") and model_type not in CONFIG_MAPPING_NAMES:
        raise RecipeError(
            f"the base model {model.base!r} needs Python code from its own repository to load "
            f"(model_type {model_type!r} is not built into transformers; its config.json has auto_map)",
            where="model.base",
            hint="only if you trust that repository: run again with --set model.trust_remote_code=true "
                 "(this runs the repository's code on your machine with your user's rights; "
                 "read it first, and pin model.revision to the commit you read)")


def _read_config(base: str, model: Model) -> dict[str, Any] | None:
    """config.json of a local directory, or of a hub id (downloaded or cached; None when unreachable)."""
    local = Path(base) / "config.json"
    if local.is_file():
        return read_model_json(local)
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(base, "config.json", revision=model.revision, token=os.environ.get(model.hf_token_env))
    except Exception:  # offline, private or misspelt: the stage that loads the model reports it
        return None
    return read_model_json(Path(path))


def read_model_json(path: Path) -> dict[str, Any]:
    """A JSON file of the base model (config.json, adapter_config.json, a run's manifest.json); one that
    is not valid JSON is a RecipeError naming the file, line and column."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                          where=f"{path}:{exc.lineno}:{exc.colno} (model.base)",
                          hint="fix that file (a download or copy cut short? fetch the model again), or point "
                               "model.base to another model") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} holds a JSON {type(data).__name__}, not an object", where=f"{path} (model.base)",
                          hint="fix that file, or point model.base to another model")
    return data
