"""Where a model comes from: hub id, local directory, or a finished cpt-kit run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cpt_kit.errors import RecipeError
from cpt_kit.recipe import Model


TINY_PREFIX = "tiny:"


def resolve_base(model: Model) -> str:
    """A local directory or a hub id. A run directory (has manifest.json) means its merged model.

    `tiny:FOLDER` means a tiny Llama built offline from the .txt files in FOLDER (the demo's base;
    built once and cached, see cpt_kit.tiny_model.cached_tiny_base).
    """
    if model.base.startswith(TINY_PREFIX):
        from cpt_kit.tiny_model import cached_tiny_base
        return str(cached_tiny_base(Path(model.base[len(TINY_PREFIX):]).expanduser()))
    path = Path(model.base).expanduser()
    if (path / "manifest.json").is_file():
        merged = path / "merged"
        if not (merged / "config.json").is_file():
            raise RecipeError(f"run {path} has no merged model yet", where="model.base",
                              hint=f"finish that run first: cpt-kit run <its recipe> --until merge (or cpt-kit export {path})")
        return str(merged)
    if path.exists():
        if not (path / "config.json").is_file():
            raise RecipeError(f"{path} is not a model directory (no config.json)", where="model.base")
        return str(path)
    if model.base.startswith((".", "/", "~")):
        raise RecipeError(f"local model directory {path} does not exist", where="model.base")
    return model.base


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
    if model.base.startswith(TINY_PREFIX):
        return  # built by cpt-kit: a plain Llama
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
    import json

    local = Path(base) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(base, "config.json", revision=model.revision, token=os.environ.get(model.hf_token_env))
    except Exception:  # offline, private or misspelt: the stage that loads the model reports it
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))
