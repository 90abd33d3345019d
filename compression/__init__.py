"""Pure tensor transforms of a working memory on a relay edge: scores, selectors, Orthogonal Backfill,
quantization, and the recipe strings that chain them (see :mod:`compression.recipes`)."""

from compression.backfill import BackfillConfig, BackfillResult, orthogonal_backfill
from compression.recipes import (
    REGISTRY,
    Method,
    Recipe,
    RecipeError,
    available_methods,
    compress,
    parse_recipe,
)

__all__ = [
    "REGISTRY",
    "BackfillConfig",
    "BackfillResult",
    "Method",
    "Recipe",
    "RecipeError",
    "available_methods",
    "compress",
    "orthogonal_backfill",
    "parse_recipe",
]
