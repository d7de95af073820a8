"""`--set key=value` overrides: parse a command-line string into a typed recipe field."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

from cpt_kit.errors import RecipeError
from cpt_kit.recipe.schema import Recipe
from cpt_kit.recipe.validate import closest_hint, dataclass_in, describe, type_hints


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
    hints = type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        prefix = full_key[: len(full_key) - len(".".join(parts))]
        raise RecipeError(f"unknown key {full_key!r}", where="--set",
                          hint=closest_hint(prefix + name, [prefix + k for k in hints]))
    current = getattr(obj, name)
    if len(parts) == 1:
        value = parse_value(raw, hints[name], full_key)
    else:
        if current is None:
            nested = dataclass_in(hints[name])
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
                          hint=closest_hint(raw, [str(a) for a in args]))
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
    raise RecipeError(f"cannot set a value of type {describe(tp)} from the command line", where=key)


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
