"""Compression recipes: short strings naming what happens to a memory on a relay edge.

Grammar: ``step(+step)*`` with ``step = method[:option=value(,option=value)*]``, e.g. ``h:budget=32``,
``l-obf:budget=32,rank=4``, ``h-obf:budget=32,rank=2+int8``, ``gen``. At most one eviction method, at most one
quantization step, quantization last. Every method is one small pydantic model in :data:`REGISTRY` (NVIDIA
kvpress style) whose docstring names its paper; :func:`parse_recipe` turns a string into a :class:`Recipe` and
raises :class:`RecipeError` with a one-line message naming the bad part; ``Recipe.canonical`` round-trips.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latent_relay.compression.backfill import ABLATIONS, BackfillConfig, Solver, apply_backfill, orthogonal_backfill
from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import (
    Selection,
    current_agent_index,
    gather_selection,
    prompt_mask,
    select_generation_only,
    select_headwise,
    select_layerwise,
)
from latent_relay.relay.memory import KVState, TensorAllocator
from latent_relay.relay.observation import Observation


class RecipeError(ValueError):
    """A recipe string (or a recipe applied to a memory) is malformed."""


Metrics = dict[str, Any]


class Method(BaseModel):
    """One step of a recipe. Subclasses set ``name`` and ``kind`` and implement :meth:`apply`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str] = ""
    kind: ClassVar[Literal["evict", "quant"]] = "evict"
    #: Options always written in the canonical form (the rest only when they differ from the default).
    always_shown: ClassVar[tuple[str, ...]] = ()

    def apply(
        self, memory, observation: Observation | None, output_proj, allocate: TensorAllocator | None = None
    ) -> tuple[Any, Metrics]:
        """The step's memory and metrics. ``allocate`` (only given to a recipe's last step) makes the tensors of
        the memory it returns, where the step builds a new one (see :func:`compress`)."""
        raise NotImplementedError

    @property
    def canonical(self) -> str:
        opts = []
        for key, info in type(self).model_fields.items():
            value = getattr(self, key)
            if key in self.always_shown or value != info.default:
                opts.append(f"{key}={_fmt(value)}")
        return self.name + (":" + ",".join(opts) if opts else "")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _prompt_metrics(selection: Selection) -> Metrics:
    return {
        "retained_fraction": selection.retained_fraction,
        "prompt_tokens": int(selection.prompt_tokens.sum()),
        "kept_prompt_tokens": int(selection.kept.sum()),
    }


class _Scored(Method):
    budget: int = Field(32, ge=1, description="prompt tokens each head keeps")
    pool: int = Field(1, ge=1, description="SnapKV average-pooling kernel along tokens (1 = none)")
    value: Literal["none", "l1", "l2", "wo"] = Field("none", description="value-aware score factor")
    always_shown: ClassVar[tuple[str, ...]] = ("budget",)

    def select(self, scores: torch.Tensor, prompt: torch.Tensor) -> Selection:
        raise NotImplementedError

    def backfill_config(self) -> BackfillConfig | None:
        return None

    def apply(
        self, memory: KVState, observation: Observation | None, output_proj, allocate: TensorAllocator | None = None
    ) -> tuple[KVState, Metrics]:
        if observation is None:
            raise RecipeError(f"recipe step {self.name!r} ranks tokens by the agent's observation, but none was given")
        scores = compute_scores(memory, observation, pool=self.pool, value=self.value, output_proj=output_proj)
        selection = self.select(scores, prompt_mask(memory, current_agent_index(memory, observation)))
        metrics = _prompt_metrics(selection)
        cfg = self.backfill_config()
        if cfg is None:
            return gather_selection(memory, selection, allocate).memory, metrics
        result = orthogonal_backfill(memory, selection, scores, cfg)
        metrics.update(result.diagnostics())
        # gathered after the solve, so that the new memory is still in cache when it is encoded
        return apply_backfill(gather_selection(memory, selection, allocate), result, inplace=True), metrics


class Headwise(_Scored):
    """H: per (layer, KV head) keep the top-``budget`` prompt tokens by latent-query attention
    (Orthogonal Backfill paper's headwise selector, arXiv 2604.13349; pooling: SnapKV arXiv 2404.14469;
    value-aware scores: VATP arXiv 2406.12335, arXiv 2605.08234)."""

    name: ClassVar[str] = "h"

    def select(self, scores, prompt):
        return select_headwise(scores, prompt, self.budget)


class Layerwise(_Scored):
    """L: per layer one top-``budget`` prompt set shared by all KV heads (head-summed latent-query attention;
    arXiv 2604.13349)."""

    name: ClassVar[str] = "l"

    def select(self, scores, prompt):
        return select_layerwise(scores, prompt, self.budget)


class _Backfilled(_Scored):
    rank: int | Literal["all"] = Field(4, description="residual directions p (or all)")
    solver: Solver = Field(
        "subspace",
        description="subspace (batched subspace iteration on the residual Gram matrices), eigh (batched eigen-solve "
        "of the same Gram matrices) or exact (QR + SVD)",
    )
    inject: Literal["uniform", "attention"] = "uniform"
    scale: Literal["ratio", "none", "share"] = "ratio"
    ablation: Literal["none", "no-projection", "naive-aggregation", "no-scaling", "all-components"] = "none"
    always_shown: ClassVar[tuple[str, ...]] = ("budget", "rank")

    def backfill_config(self) -> BackfillConfig:
        if isinstance(self.rank, int) and self.rank < 1:
            raise RecipeError(f"bad value {self.rank!r} for option 'rank' of {self.name!r}: must be >= 1 or 'all'")
        cfg = BackfillConfig(
            rank=None if self.rank == "all" else self.rank,
            solver=self.solver,
            inject=self.inject,
            scale=self.scale,
        )
        if self.ablation != "none":
            cfg = cfg.with_ablation(self.ablation)
        return cfg


class HeadwiseOBF(_Backfilled):
    """H-OBF: headwise eviction + Orthogonal Backfill of rank 2 (arXiv 2604.13349)."""

    name: ClassVar[str] = "h-obf"
    rank: int | Literal["all"] = Field(2, description="residual directions p (or all)")

    def select(self, scores, prompt):
        return select_headwise(scores, prompt, self.budget)


class LayerwiseOBF(_Backfilled):
    """L-OBF: layerwise eviction + Orthogonal Backfill of rank 4 (arXiv 2604.13349)."""

    name: ClassVar[str] = "l-obf"

    def select(self, scores, prompt):
        return select_layerwise(scores, prompt, self.budget)


class GenerationOnly(Method):
    """Gen: drop the current agent's whole prompt region; sink, history and thoughts pass (arXiv 2604.13349)."""

    name: ClassVar[str] = "gen"

    def apply(
        self, memory: KVState, observation: Observation | None, output_proj, allocate: TensorAllocator | None = None
    ) -> tuple[KVState, Metrics]:
        selection = select_generation_only(prompt_mask(memory, current_agent_index(memory, observation)))
        return gather_selection(memory, selection, allocate).memory, _prompt_metrics(selection)


class _Quantize(Method):
    kind: ClassVar[Literal["evict", "quant"]] = "quant"
    bits: ClassVar[int] = 8

    def apply(
        self, memory: KVState, observation: Observation | None, output_proj, allocate: TensorAllocator | None = None
    ) -> tuple[Any, Metrics]:
        from latent_relay.compression.quant import quantize_memory  # written alongside; imported lazily

        return quantize_memory(memory, self.bits), {"bits": self.bits}


class Int8(_Quantize):
    """int8: KIVI-style asymmetric quantization, keys per channel, values per token (arXiv 2402.02750), applied
    last; the quantization baseline of arXiv 2604.13349, here with real packing."""

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8


class Int4(_Quantize):
    """int4: as int8 with two codes per byte (KIVI, arXiv 2402.02750)."""

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4


REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (Headwise, Layerwise, HeadwiseOBF, LayerwiseOBF, GenerationOnly, Int8, Int4)
}


def available_methods() -> list[str]:
    """Names of the registered recipe methods."""
    return sorted(REGISTRY)


class Recipe(BaseModel):
    """A parsed recipe: at most one eviction step, then at most one quantization step."""

    model_config = ConfigDict(frozen=True)
    steps: tuple[Method, ...]

    @property
    def canonical(self) -> str:
        return "+".join(step.canonical for step in self.steps)

    def __str__(self) -> str:
        return self.canonical

    @property
    def needs_output_proj(self) -> bool:
        """Whether a step scores with ``value=wo``, which needs the model's attention output projections."""
        return any(getattr(step, "value", None) == "wo" for step in self.steps)

    @property
    def bits(self) -> int | None:
        quant = [s for s in self.steps if s.kind == "quant"]
        return quant[0].bits if quant else None


def _parse_step(text: str, recipe: str) -> Method:
    name, colon, body = text.partition(":")
    name = name.strip().lower()
    if not name:
        raise RecipeError(f"missing method name in step {text!r} of recipe {recipe!r}")
    cls = REGISTRY.get(name)
    if cls is None:
        raise RecipeError(f"unknown method {name!r} in recipe {recipe!r} (known: {', '.join(available_methods())})")
    options: dict[str, str] = {}
    if colon and not body.strip():
        raise RecipeError(f"no options after ':' in step {text!r} of recipe {recipe!r}")
    for part in body.split(",") if body.strip() else []:
        key, eq, value = (s.strip() for s in part.partition("="))
        if not key:
            raise RecipeError(f"empty option in step {text!r} of recipe {recipe!r}")
        if key not in cls.model_fields:
            known = ", ".join(cls.model_fields) or "none"
            raise RecipeError(f"unknown option {key!r} for method {name!r} (options: {known})")
        if not eq or not value:
            raise RecipeError(f"option {key!r} of method {name!r} needs a value ({key}=...)")
        if key in options:
            raise RecipeError(f"option {key!r} given twice for method {name!r}")
        options[key] = value.lower()
    try:
        return cls.model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        raise RecipeError(
            f"bad value {options.get(key)!r} for option {key!r} of method {name!r}: {err['msg']}"
        ) from None


def parse_recipe(recipe: str | Recipe) -> Recipe:
    """Parse ``"h-obf:budget=32,rank=2+int8"`` into a :class:`Recipe`; raise :class:`RecipeError` if malformed."""
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
        if any(s.kind == "quant" for s in steps):
            raise RecipeError(f"step {step.name!r} after quantization in recipe {recipe!r}: quantization comes last")
        if step.kind == "evict" and any(s.kind == "evict" for s in steps):
            first = next(s.name for s in steps if s.kind == "evict")
            raise RecipeError(f"two eviction methods {first!r} and {step.name!r} in recipe {recipe!r}; use one")
        steps.append(step)
    parsed = Recipe(steps=tuple(steps))
    for step in parsed.steps:
        if isinstance(step, _Backfilled):
            step.backfill_config()  # validates rank
    return parsed


def compress(
    memory: KVState,
    observation: Observation | None,
    recipe: str | Recipe,
    output_proj: Sequence[torch.Tensor] | None = None,
    *,
    allocate: TensorAllocator | None = None,
) -> tuple[Any, Metrics]:
    """Apply a recipe to a memory (sender side of a relay edge).

    ``allocate`` (optional) makes the tensors of the packed memory where the recipe's last step builds it by
    eviction: a sender passes :meth:`latent_relay.relay.wire.PacketArena.allocate` so that the memory is built inside
    the packet that will carry it and encoding does not copy it. The result is the same with or without it.

    Returns the packed memory (a :class:`KVState`, or the quantized memory when the recipe quantizes) and per-hop
    metrics: ``bytes_before``, ``bytes_after`` (real packed size), ``seconds``, ``retained_fraction`` (kept prompt
    tokens / prompt tokens), and for OBF ``obf_residual_ratio`` (||R||/||Y||) and ``obf_injected_norm``.
    """
    parsed = parse_recipe(recipe)
    sync = memory.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(memory.device)
    start = time.perf_counter()
    metrics: Metrics = {"recipe": parsed.canonical, "bytes_before": memory.nbytes, "retained_fraction": 1.0}
    packed: Any = memory
    last = len(parsed.steps) - 1
    for i, step in enumerate(parsed.steps):
        packed, step_metrics = step.apply(packed, observation, output_proj, allocate if i == last else None)
        metrics.update(step_metrics)
    if sync:
        torch.cuda.synchronize(memory.device)
    metrics["seconds"] = time.perf_counter() - start
    metrics["bytes_after"] = int(packed.nbytes)
    metrics["compression_ratio"] = metrics["bytes_before"] / max(metrics["bytes_after"], 1)
    return packed, metrics


__all__ = [
    "ABLATIONS",
    "REGISTRY",
    "Method",
    "Recipe",
    "RecipeError",
    "available_methods",
    "compress",
    "parse_recipe",
]
