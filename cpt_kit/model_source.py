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
