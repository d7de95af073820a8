"""Recipes are typed, frozen Python data.

A recipe module builds a `Recipe` and binds it to `RECIPE`; `load_recipe(path)` imports it,
`apply_overrides(recipe, ["train.learning_rate=1e-4"])` changes fields with type checks.

    schema.py     the dataclasses, one docstring per field
    validate.py   types, ranges and cross-field rules (run when a Recipe is built)
    load.py       a recipe module by path; a recipe back from manifest.json
    overrides.py  `--set key=value` parsing
"""

from cpt_kit.recipe.schema import (ALL_LINEAR, QUANT_TYPES, Data, Eval, Export, Lora, Model,
                                   ModelfileSpec, Recipe, Replay, Safety, Sft, TokenizerExtension, Train, field_docs)
from cpt_kit.recipe.load import load_recipe, recipe_from_dict
from cpt_kit.recipe.overrides import apply_overrides, parse_value

__all__ = ["ALL_LINEAR", "QUANT_TYPES", "Data", "Eval", "Export", "Lora", "Model", "ModelfileSpec",
           "Recipe", "Replay", "Safety", "Sft", "TokenizerExtension", "Train", "apply_overrides", "field_docs", "load_recipe",
           "parse_value", "recipe_from_dict"]
