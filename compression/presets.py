"""Recipe names as presets of the methods in :mod:`latent_relay.compression.methods` (the way NVIDIA kvpress
composes presses instead of multiplying classes): ``h``, ``l``, ``h-obf`` and ``l-obf`` are one
:class:`~latent_relay.compression.methods.ScoredEviction` with a selector and, for OBF, a backfill of rank 2 (H-OBF)
or 4 (L-OBF) (arXiv 2604.13349); ``asl`` and ``asl-obf`` the same with the adaptive-selection-layer selector
(ASL, arXiv 2601.07667: threshold ``tau``, SnapKV pooling kernel 7 by default as in the paper; OBF rank 2, as
H-OBF, since the layers up to the selection layer select per head); ``gen`` is generation-only eviction; ``int8``
and ``int4`` one :class:`~latent_relay.compression.methods.Quantize` (KIVI, arXiv 2402.02750); ``zstd`` (option
``level``, 1 by default) the edge's wire encoding, :class:`~latent_relay.compression.methods.Zstd`.

A preset fixes every parameter of its method except the recipe options it lists; a step's name is the preset
whose fixed parameters it has, so a step built by hand prints the same canonical form as a parsed one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from latent_relay.compression.methods import Backfill, GenerationOnly, Method, Quantize, ScoredEviction, Zstd


@dataclass(frozen=True)
class Preset:
    """A recipe name: ``method`` with the parameters ``fixed``; a recipe may set the ``options`` (flat names, in
    canonical order), whose defaults are the method's except ``defaults``. The canonical form writes an option
    when it is in ``always_shown`` or differs from its default."""

    name: str
    method: type[Method]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    always_shown: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.method.kind

    def build(self, options: Mapping[str, Any] | None = None) -> Method:
        """The step with these recipe options (validated: raises pydantic's ``ValidationError``)."""
        return self.method.from_options({**self.fixed, **self.defaults, **(options or {})})

    @cached_property
    def default(self) -> Method:
        return self.build()

    def matches(self, step: Method) -> bool:
        """Whether ``step`` is this preset with some options set: same method, same parameters, fixed ones equal."""
        if type(step) is not self.method:
            return False
        mine, theirs = self.default.options(), step.options()
        return mine.keys() == theirs.keys() and all(theirs[k] == v for k, v in mine.items() if k not in self.options)

    def canonical(self, step: Method) -> str:
        values, default = step.options(), self.default.options()
        shown = [k for k in self.options if k in self.always_shown or values[k] != default[k]]
        return self.name + (":" + ",".join(f"{k}={_fmt(values[k])}" for k in shown) if shown else "")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


#: Recipe names -> presets.
REGISTRY: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Make ``preset`` a recipe name (e.g. an ASL selector's ``asl``)."""
    if preset.name in REGISTRY and REGISTRY[preset.name] != preset:
        raise ValueError(f"a different preset is already registered as {preset.name!r}")
    REGISTRY[preset.name] = preset
    return preset


def available_methods() -> list[str]:
    """Names of the registered recipe methods."""
    return sorted(REGISTRY)


def preset_of(step: Method) -> Preset:
    """The preset a step is an instance of (raises ``LookupError`` for a step no recipe name describes)."""
    for preset in REGISTRY.values():
        if preset.matches(step):
            return preset
    raise LookupError(f"no recipe name for the step {step!r}")


_SCORING = ("budget", "pool", "value")
_BACKFILL = tuple(Backfill.model_fields)  # rank, solver, inject, scale, ablation
for _preset in (
    Preset("h", ScoredEviction, {"selector": "head"}, _SCORING, always_shown=("budget",)),
    Preset("l", ScoredEviction, {"selector": "layer"}, _SCORING, always_shown=("budget",)),
    Preset(
        "h-obf",
        ScoredEviction,
        {"selector": "head", "backfill": {}},
        _SCORING + _BACKFILL,
        {"rank": 2},
        ("budget", "rank"),
    ),
    Preset(
        "l-obf",
        ScoredEviction,
        {"selector": "layer", "backfill": {}},
        _SCORING + _BACKFILL,
        {"rank": 4},
        ("budget", "rank"),
    ),
    Preset("asl", ScoredEviction, {"selector": "asl"}, ("tau", *_SCORING), {"pool": 7}, ("tau", "budget")),
    Preset(
        "asl-obf",
        ScoredEviction,
        {"selector": "asl", "backfill": {}},
        ("tau", *_SCORING, *_BACKFILL),
        {"pool": 7, "rank": 2},
        ("tau", "budget", "rank"),
    ),
    Preset("gen", GenerationOnly),
    Preset("int8", Quantize, {"bits": 8}),
    Preset("int4", Quantize, {"bits": 4}),
    Preset("zstd", Zstd, options=("level",)),
):
    register_preset(_preset)
