"""Quantization recipes, one per file, registered by key.

A *variant* names a recipe, optionally after structured pruning: ``int8``,
``pruned50-int8`` (remove 50% of the channels of every hidden layer, fine-tune, then
apply ``int8``). The ``onnx`` recipes make ``.onnx`` files for ONNX Runtime instead of
``.tflite`` (``onnx``, ``onnx-int8``, ``pruned50-onnx``...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgefl.errors import UnknownRecipeError
from edgefl.quantize.recipes.base import Recipe, Thresholds
from edgefl.quantize.recipes.fp16 import Fp16Recipe
from edgefl.quantize.recipes.fp32 import Fp32Recipe
from edgefl.quantize.recipes.int8 import Int8StaticRecipe
from edgefl.quantize.recipes.int8_dynamic import Int8DynamicRecipe
from edgefl.quantize.recipes.int8_wo import Int8WeightOnlyRecipe
from edgefl.quantize.recipes.onnx import OnnxInt8DynamicRecipe, OnnxRecipe

__all__ = [
    "DEFAULT_VARIANTS",
    "Recipe",
    "Thresholds",
    "Variant",
    "get_recipe",
    "parse_variants",
    "recipe_keys",
    "register_recipe",
]

_REGISTRY: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Add a recipe class to the registry; a second class with the same key is an error."""
    if cls.key in _REGISTRY:
        raise ValueError(f"recipe key {cls.key!r} is already registered by {_REGISTRY[cls.key]}")
    _REGISTRY[cls.key] = cls
    return cls


for _cls in (
    Fp32Recipe,
    Fp16Recipe,
    Int8WeightOnlyRecipe,
    Int8StaticRecipe,
    Int8DynamicRecipe,
    OnnxRecipe,
    OnnxInt8DynamicRecipe,
):
    register_recipe(_cls)

DEFAULT_VARIANTS = ("fp32", "fp16", "int8-wo", "int8", "pruned50-fp32", "pruned50-int8")

_VARIANT = re.compile(r"^(?:pruned(?P<pct>\d{1,2})-)?(?P<recipe>[a-z0-9][a-z0-9-]*)$")


def recipe_keys() -> list[str]:
    """All registered recipe keys, in registration order."""
    return list(_REGISTRY)


def get_recipe(key: str) -> Recipe:
    """An instance of the recipe registered under ``key``.

    Raises:
        UnknownRecipeError: No such recipe; the message lists the known ones.
    """
    try:
        return _REGISTRY[key]()
    except KeyError:
        raise UnknownRecipeError(
            f"unknown recipe {key!r}",
            hint=f"recipes: {', '.join(_REGISTRY)}; prefix prunedNN- to prune NN% first",
        ) from None


@dataclass(frozen=True)
class Variant:
    """One artifact to build: an optional pruning ratio and a recipe."""

    name: str
    recipe: str
    prune_ratio: float | None


def parse_variants(text: str) -> list[Variant]:
    """Parse ``"fp32,int8,pruned50-int8"`` into variants, validating every name.

    Raises:
        UnknownRecipeError: An unknown recipe, a malformed name, a pruning percentage
            outside 1..95, a duplicate, or an empty list.
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UnknownRecipeError(
            "no recipes given", hint=f"e.g. --recipes {','.join(DEFAULT_VARIANTS)}"
        )
    variants: list[Variant] = []
    for name in names:
        match = _VARIANT.match(name)
        if match is None:
            raise UnknownRecipeError(
                f"malformed variant {name!r}",
                hint="use RECIPE or prunedNN-RECIPE, e.g. pruned50-int8",
            )
        get_recipe(match["recipe"])
        pct = match["pct"]
        ratio = None
        if pct is not None:
            if not 1 <= int(pct) <= 95:
                raise UnknownRecipeError(f"pruning percentage in {name!r} must be 1..95")
            ratio = int(pct) / 100
        if any(v.name == name for v in variants):
            raise UnknownRecipeError(f"variant {name!r} given twice")
        variants.append(Variant(name=name, recipe=match["recipe"], prune_ratio=ratio))
    return variants
