"""Recipe strings and their parsed form.

Grammar: ``step(+step)*`` with ``step = method[:option=value(,option=value)*]``, e.g. ``h:budget=32``,
``l-obf:budget=32,rank=4``, ``h-obf:budget=32,rank=2+int8``, ``gen``, ``h-obf:budget=32+int8+zstd``. At most one
eviction method, then at most one quantization step, then at most one ``zstd`` step (the edge's packets carry a
zstd payload), in that order. Method names are the presets of :mod:`latent_relay.compression.presets`;
:func:`parse_recipe` turns a string into a :class:`Recipe` and raises :class:`RecipeError` with a one-line message
naming the bad part; ``Recipe.canonical`` round-trips.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from latent_relay.compression.methods import Eviction, Method, Quantize, RecipeError, ScoredEviction, Zstd
from latent_relay.compression.presets import REGISTRY, available_methods


class Recipe(BaseModel):
    """A parsed recipe: at most one eviction step, then at most one quantization step, then at most one ``zstd``
    step (how the edge's packets are encoded)."""

    model_config = ConfigDict(frozen=True)
    steps: tuple[Method, ...]

    @property
    def canonical(self) -> str:
        return "+".join(step.canonical for step in self.steps)

    def __str__(self) -> str:
        return self.canonical

    @property
    def eviction(self) -> Eviction | None:
        return next((s for s in self.steps if isinstance(s, Eviction)), None)

    @property
    def quantization(self) -> Quantize | None:
        return next((s for s in self.steps if isinstance(s, Quantize)), None)

    @property
    def zstd_level(self) -> int | None:
        """The zstd level of the edge's packets (:func:`latent_relay.relay.wire.encode`), ``None`` for a raw payload."""
        step = next((s for s in self.steps if isinstance(s, Zstd)), None)
        return step.level if step is not None else None

    @property
    def takes_allocator(self) -> bool:
        """Whether the packed memory is built by an eviction step, which can build it inside the packet that will
        carry it (a tensor allocator); a recipe that quantizes last makes new tensors, which the packet copies, and
        a zstd packet holds the compressed payload, not the memory."""
        return self.eviction is not None and self.quantization is None and self.zstd_level is None

    @property
    def needs_output_proj(self) -> bool:
        """Whether a step scores with ``value=wo``, which needs the model's attention output projections."""
        return any(getattr(step, "value", None) == "wo" for step in self.steps)

    @property
    def bits(self) -> int | None:
        return self.quantization.bits if self.quantization is not None else None


def _parse_step(text: str, recipe: str) -> Method:
    name, colon, body = text.partition(":")
    name = name.strip().lower()
    if not name:
        raise RecipeError(f"missing method name in step {text!r} of recipe {recipe!r}")
    preset = REGISTRY.get(name)
    if preset is None:
        raise RecipeError(f"unknown method {name!r} in recipe {recipe!r} (known: {', '.join(available_methods())})")
    options: dict[str, str] = {}
    if colon and not body.strip():
        raise RecipeError(f"no options after ':' in step {text!r} of recipe {recipe!r}")
    for part in body.split(",") if body.strip() else []:
        key, eq, value = (s.strip() for s in part.partition("="))
        if not key:
            raise RecipeError(f"empty option in step {text!r} of recipe {recipe!r}")
        if key not in preset.options:
            known = ", ".join(preset.options) or "none"
            raise RecipeError(f"unknown option {key!r} for method {name!r} (options: {known})")
        if not eq or not value:
            raise RecipeError(f"option {key!r} of method {name!r} needs a value ({key}=...)")
        if key in options:
            raise RecipeError(f"option {key!r} given twice for method {name!r}")
        options[key] = value.lower()
    try:
        return preset.build(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = next((str(part) for part in err["loc"] if part in preset.options), "?")
        raise RecipeError(
            f"bad value {options.get(key)!r} for option {key!r} of method {name!r}: {err['msg']}"
        ) from None


def parse_recipe(recipe: str | Recipe) -> Recipe:
    """Parse ``"h-obf:budget=32,rank=2+int8"`` into a :class:`Recipe`; raise :class:`RecipeError` if malformed.
    A :class:`Recipe` is returned as it is."""
    if isinstance(recipe, Recipe):
        return recipe
    if not isinstance(recipe, str):
        raise RecipeError(f"a recipe is a string like 'h:budget=32', got {type(recipe).__name__}")
    if not recipe.strip():
        raise RecipeError("empty recipe (expected e.g. 'h:budget=32' or 'l-obf:budget=32,rank=4+int8')")
    steps: list[Method] = []
    for text in recipe.split("+"):
        if not text.strip():
            raise RecipeError(f"empty step in recipe {recipe!r} (stray '+')")
        step = _parse_step(text.strip(), recipe)
        if any(s.name == step.name for s in steps):
            raise RecipeError(f"duplicated step {step.name!r} in recipe {recipe!r}")
        if any(s.kind == "wire" for s in steps):
            raise RecipeError(f"step {step.name!r} after {steps[-1].name!r} in recipe {recipe!r}: zstd comes last")
        if step.kind != "wire" and any(s.kind == "quant" for s in steps):
            raise RecipeError(f"step {step.name!r} after quantization in recipe {recipe!r}: quantization comes last")
        if step.kind == "evict" and any(s.kind == "evict" for s in steps):
            first = next(s.name for s in steps if s.kind == "evict")
            raise RecipeError(f"two eviction methods {first!r} and {step.name!r} in recipe {recipe!r}; use one")
        steps.append(step)
    for step in steps:
        if isinstance(step, ScoredEviction):
            step.backfill_config()  # validates rank
    return Recipe(steps=tuple(steps))
