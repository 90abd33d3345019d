"""The steps a recipe is made of (NVIDIA kvpress style: one small frozen pydantic model per method, parameters
instead of near-copies; the recipe names in :mod:`latent_relay.compression.presets` fix some of them).

- :class:`ScoredEviction`: score the current agent's prompt tokens, keep the top ``budget`` with a selector from
  :data:`latent_relay.compression.selectors.SELECTORS`, optionally fold what was evicted back in with Orthogonal
  Backfill (:class:`Backfill`).
- :class:`GenerationOnly`: drop the current agent's whole prompt region.
- :class:`Quantize`: KIVI-style packing to ``bits`` bits, after any eviction.
- :class:`Zstd`: the edge's packets carry a zstd payload at ``level``; it leaves the memory as it is and is always a
  recipe's last step (the wire encoding of what the steps before it made).

Every step works on a whole (padded) batch; an eviction step returns an :class:`Evicted` that gives the metrics of
the batch or of one of its items.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from latent_relay.compression.backfill import (
    BackfillConfig,
    BackfillResult,
    Solver,
    apply_backfill,
    orthogonal_backfill,
)
from latent_relay.compression.quant import quantize_memory
from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import (
    SELECTORS,
    Selection,
    current_agent_index,
    gather_selection,
    prompt_mask,
    select_generation_only,
)
from latent_relay.relay.memory import KVState, TensorAllocator
from latent_relay.relay.observation import Observation

if TYPE_CHECKING:
    from latent_relay.compression.quant import QuantizedMemory

Metrics = dict[str, Any]

#: Scored-eviction options that belong to a selector (keyword parameters of the selectors that take them).
_SELECTOR_OPTIONS = ("tau",)


class RecipeError(ValueError):
    """A recipe string (or a recipe applied to a memory) is malformed."""


class Method(BaseModel):
    """One step of a recipe; ``kind`` says whether it evicts tokens, quantizes or sets the edge's wire encoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: ClassVar[Literal["evict", "quant", "wire"]] = "evict"

    def options(self) -> dict[str, Any]:
        """The step's parameters as flat recipe options (``budget``, ``rank``, ...)."""
        return self.model_dump()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Method:
        """The step with these flat recipe options (validated; raises pydantic's ``ValidationError``)."""
        return cls.model_validate(options)

    @property
    def name(self) -> str:
        """The recipe name of this step (its preset)."""
        from latent_relay.compression.presets import preset_of  # the presets are built from these classes

        return preset_of(self).name

    @property
    def canonical(self) -> str:
        from latent_relay.compression.presets import preset_of

        return preset_of(self).canonical(self)


@dataclass
class Evicted:
    """What an eviction step made of a batch: the new memory (PAD slots where items differ), the selection on the
    original slot layout, and the backfill solution where the step backfilled."""

    memory: KVState
    selection: Selection
    backfill: BackfillResult | None = None

    def metrics(self, item: int | None = None) -> Metrics:
        """``retained_fraction``, ``prompt_tokens``, ``kept_prompt_tokens`` and the OBF diagnostics, of the whole
        batch or of batch item ``item``."""
        prompt, kept = self.selection.prompt_tokens, self.selection.kept
        if item is not None:
            prompt, kept = prompt[item : item + 1], kept[item : item + 1]
        total = int(prompt.sum())
        metrics: Metrics = {
            "retained_fraction": 1.0 if total == 0 else float(kept.sum()) / total,
            "prompt_tokens": total,
            "kept_prompt_tokens": int(kept.sum()),
        }
        if self.selection.layer is not None:  # ASL: the selection layer L* (-1: none)
            layer = self.selection.layer if item is None else self.selection.layer[item : item + 1]
            metrics["selection_layer"] = int(layer[0]) if layer.numel() == 1 else layer.tolist()
        if self.backfill is not None:
            metrics.update(self.backfill.diagnostics(item))
        return metrics


class Eviction(Method):
    """A step that removes prompt tokens. ``allocate`` (optional) makes the tensors of the memory it builds, e.g.
    inside the packet that will carry it (:meth:`latent_relay.relay.wire.PacketArena.allocate`)."""

    def evict(
        self,
        memory: KVState,
        observation: Observation | None,
        output_proj: Sequence[torch.Tensor] | None = None,
        allocate: TensorAllocator | None = None,
    ) -> Evicted:
        raise NotImplementedError


class Backfill(BaseModel):
    """Orthogonal Backfill options of a scored eviction (arXiv 2604.13349): the recipe-facing part of
    :class:`~latent_relay.compression.backfill.BackfillConfig`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rank: int | Literal["all"] = Field(4, description="residual directions p (or all)")
    solver: Solver = Field(
        "subspace",
        description="subspace (batched subspace iteration on the residual Gram matrices), eigh (batched eigen-solve "
        "of the same Gram matrices) or exact (QR + SVD)",
    )
    inject: Literal["uniform", "attention"] = "uniform"
    scale: Literal["ratio", "none", "share"] = "ratio"
    ablation: Literal["none", "no-projection", "naive-aggregation", "no-scaling", "all-components"] = "none"

    def config(self) -> BackfillConfig:
        cfg = BackfillConfig(
            rank=None if self.rank == "all" else self.rank, solver=self.solver, inject=self.inject, scale=self.scale
        )
        return cfg.with_ablation(self.ablation) if self.ablation != "none" else cfg


class ScoredEviction(Eviction):
    """Keep the top-``budget`` prompt tokens of the current agent by latent-query attention (the Orthogonal
    Backfill paper, arXiv 2604.13349), per (layer, KV head) with the ``head`` selector (H), one set per layer
    shared by all KV heads with ``layer`` (L), or one set for the layers after an adaptive selection layer with
    ``asl`` (ASL, arXiv 2601.07667, threshold ``tau``); optionally SnapKV average pooling of the scores (arXiv
    2404.14469), value-aware scores (VATP arXiv 2406.12335, arXiv 2605.08234) and Orthogonal Backfill of the evicted
    values into the kept ones (``backfill``; H-OBF and L-OBF, arXiv 2604.13349)."""

    selector: str = "head"
    budget: int = Field(32, ge=1, description="prompt tokens each head keeps")
    tau: float | None = Field(
        None, gt=0, lt=1, description="ASL stability threshold (selectors with a tau option; their default if unset)"
    )
    pool: int = Field(1, ge=1, description="SnapKV average-pooling kernel along tokens (1 = none)")
    value: Literal["none", "l1", "l2", "wo"] = Field("none", description="value-aware score factor")
    backfill: Backfill | None = None

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, name: str) -> str:
        if name not in SELECTORS:
            raise ValueError(f"unknown selector {name!r} (known: {', '.join(sorted(SELECTORS))})")
        return name

    @model_validator(mode="before")
    @classmethod
    def _selector_options(cls, data: Any) -> Any:
        """A selector option (``tau``) is given only to a selector that takes it, which fills in its default."""
        if not isinstance(data, dict) or data.get("selector", "head") not in SELECTORS:
            return data
        takes = inspect.signature(SELECTORS[data.get("selector", "head")]).parameters
        for option in _SELECTOR_OPTIONS:
            if option not in takes and data.get(option) is not None:
                raise ValueError(f"option {option!r} is not one of selector {data.get('selector', 'head')!r}")
            if option in takes and data.get(option) is None:
                data = {**data, option: takes[option].default}
        return data

    def selector_options(self) -> dict[str, Any]:
        """The options this step hands its selector beyond the budget (``tau`` for ``asl``)."""
        return {option: getattr(self, option) for option in _SELECTOR_OPTIONS if getattr(self, option) is not None}

    def options(self) -> dict[str, Any]:
        backfill = self.backfill.model_dump() if self.backfill is not None else {}
        return {
            "selector": self.selector,
            "budget": self.budget,
            "tau": self.tau,
            "pool": self.pool,
            "value": self.value,
            **backfill,
        }

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ScoredEviction:
        """``options`` may hold the :class:`Backfill` fields flat; ``backfill`` (a dict, possibly empty) turns
        backfill on."""
        flat = dict(options)
        backfill = flat.pop("backfill", None)
        nested = {key: flat.pop(key) for key in list(flat) if key in Backfill.model_fields}
        if nested and backfill is None:
            raise RecipeError(f"options {', '.join(nested)} need backfill")
        if backfill is not None:
            flat["backfill"] = {**backfill, **nested}
        return cls.model_validate(flat)

    def backfill_config(self) -> BackfillConfig | None:
        """The :class:`BackfillConfig` of this step (``None`` without backfill)."""
        if self.backfill is None:
            return None
        rank = self.backfill.rank
        if isinstance(rank, int) and rank < 1:
            raise RecipeError(f"bad value {rank!r} for option 'rank' of {self.name!r}: must be >= 1 or 'all'")
        return self.backfill.config()

    def evict(self, memory, observation, output_proj=None, allocate=None) -> Evicted:
        if observation is None:
            raise RecipeError(f"recipe step {self.name!r} ranks tokens by the agent's observation, but none was given")
        config = self.backfill_config()
        scores = compute_scores(memory, observation, pool=self.pool, value=self.value, output_proj=output_proj)
        prompt = prompt_mask(memory, current_agent_index(memory, observation))
        selection = SELECTORS[self.selector](scores, prompt, self.budget, **self.selector_options())
        if config is None:
            return Evicted(gather_selection(memory, selection, allocate).memory, selection)
        result = orthogonal_backfill(memory, selection, scores, config)
        # gathered after the solve, so that the new memory is still in cache when it is encoded
        gathered = gather_selection(memory, selection, allocate)
        return Evicted(apply_backfill(gathered, result, inplace=True), selection, result)


class GenerationOnly(Eviction):
    """Gen: drop the current agent's whole prompt region; sink, history and thoughts pass (arXiv 2604.13349)."""

    def evict(self, memory, observation, output_proj=None, allocate=None) -> Evicted:
        selection = select_generation_only(prompt_mask(memory, current_agent_index(memory, observation)))
        return Evicted(gather_selection(memory, selection, allocate).memory, selection)


class Quantize(Method):
    """KIVI-style asymmetric quantization, keys per channel, values per token (arXiv 2402.02750), ``bits`` 8 or 4
    (two codes per byte), the last step that changes the memory; the quantization baseline of arXiv 2604.13349,
    here with real packing.

    It takes no tensor allocator: the packed codes are new tensors, so a packet that carries them copies them."""

    kind: ClassVar[Literal["evict", "quant", "wire"]] = "quant"
    bits: Literal[8, 4] = 8

    def quantize(self, memory: KVState) -> tuple[QuantizedMemory, Metrics]:
        return quantize_memory(memory, self.bits), {"bits": self.bits}


class Zstd(Method):
    """The edge's packets carry their payload as one zstd frame at ``level`` (flags bit 0 of the wire format,
    :func:`latent_relay.relay.wire.encode`): the memory is not changed, the sender's encoding is, and relay bytes
    count the compressed packet. A packet whose payload zstd does not shrink stays raw. Always a recipe's last
    step; the receiver needs no option (the packet's flag says it)."""

    kind: ClassVar[Literal["evict", "quant", "wire"]] = "wire"
    level: int = Field(1, ge=1, le=19, description="zstd compression level, 1 (fastest) to 19")
