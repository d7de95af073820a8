"""Loading recipes: a recipe module by path, or a recipe stored in a run's manifest.json."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any

from cpt_kit.errors import RecipeError
from cpt_kit.recipe.schema import Recipe
from cpt_kit.recipe.validate import closest_hint, dataclass_in, type_hints


def load_recipe(path: str | Path) -> Recipe:
    """Import a recipe module from a file path and return its RECIPE."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", hint="pass the path of a .py file that defines RECIPE")
    if path.suffix != ".py":
        raise RecipeError(f"{path.name} is not a Python file: a recipe is a .py module that defines RECIPE",
                          where=str(path), hint="start from a shipped recipe, e.g. copy recipes/demo.py and edit it")
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


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a Recipe from `Recipe.to_dict()` output (e.g. a run's manifest.json)."""
    return _from_dict(Recipe, data, "")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = type_hints(cls)
    unknown = set(data) - set(hints)
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(f"unknown key {prefix}{key!r}", hint=closest_hint(key, hints))
    values = {}
    for name, value in data.items():
        nested = dataclass_in(hints[name])
        if nested is not None and isinstance(value, dict):
            value = _from_dict(nested, value, f"{prefix}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)
