"""How a latent thought's last hidden state becomes the next input embedding.

- ``hidden``: LatentMAS (arXiv 2511.20639) without realignment: ``e = h * mu_in / ||h||``.
- ``realign``: LatentMAS with the ridge realignment ``W_a = (W_out^T W_out + lambda I)^-1 W_out^T W_in``,
  ``e = (h W_a) * mu_in / ||h W_a||`` (``mu_in`` = mean row norm of the input embedding), solved once in fp32.
- ``soft``: our option (METHODS.md §1, related to "soft thinking"): the expected input embedding under the
  next-token distribution at a temperature, ``e = softmax(logits / T) @ W_in``; it stays on the embedding manifold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from latent_relay.agents.weights import linear_weight

LatentMode = Literal["soft", "hidden", "realign"]


def realignment_matrix(w_out: torch.Tensor, w_in: torch.Tensor, ridge: float = 1e-5) -> torch.Tensor:
    """Ridge solution ``argmin_W ||W_out W - W_in||^2 + ridge ||W||^2`` (``D x D``, fp32)."""
    w_out = w_out.detach().float()
    w_in = w_in.detach().float()
    gram = w_out.T @ w_out
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, w_out.T @ w_in)


@dataclass
class LatentInput:
    """The hidden-state -> input-embedding map used for latent thoughts (see the module docstring)."""

    mode: LatentMode = "soft"
    temperature: float = 1.0
    ridge: float = 1e-5
    _w_a: torch.Tensor | None = field(default=None, repr=False)
    _mu_in: torch.Tensor | None = field(default=None, repr=False)
    _w_in_float: tuple[tuple, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("soft", "hidden", "realign"):
            raise ValueError(f"unknown latent input mode {self.mode!r}; use soft, hidden or realign")
        if self.temperature <= 0:
            raise ValueError("the soft-token temperature must be positive")

    def variant(self, mode: LatentMode, temperature: float, ridge: float) -> LatentInput:
        """The same map with other settings, sharing this one's fp32 copy of the input embedding (a benchmark grid
        switches settings between runs; each copy of a 151k-token vocabulary's embedding is ~0.9 GB)."""
        other = LatentInput(mode, temperature, ridge)
        other._w_in_float, other._mu_in = self._w_in_float, self._mu_in
        if ridge == self.ridge:  # the realignment matrix depends on the ridge and the weights only
            other._w_a = self._w_a
        return other

    def next_embedding(self, hidden, logits, w_in, w_out) -> torch.Tensor:
        """``[B, D]`` input embedding for the next latent position from the last hidden state / logits.

        ``w_out`` is the output matrix or the output layer itself (plain or quantized; only ``realign`` reads it,
        once, so a quantized head is dequantized only there)."""
        if self.mode == "soft":
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            return (probs @ self._float_embedding(w_in)).to(hidden.dtype)
        if self._mu_in is None:
            self._mu_in = w_in.detach().float().norm(dim=-1).mean()
        h = hidden.float()
        if self.mode == "realign":
            if self._w_a is None:
                matrix = linear_weight(w_out) if isinstance(w_out, nn.Module) else w_out
                self._w_a = realignment_matrix(matrix, w_in, self.ridge).to(h.device)
            h = h @ self._w_a
        return (h * self._mu_in / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(hidden.dtype)

    def _float_embedding(self, w_in: torch.Tensor) -> torch.Tensor:
        """``w_in`` in fp32, converted once per weight tensor: in a bf16 / fp16 model the conversion of a whole
        vocabulary's embedding (151k x 1536 for Qwen2.5-1.5B) at every thought cost more than the thought's forward."""
        if w_in.dtype == torch.float32:
            return w_in
        key = (id(w_in), w_in.data_ptr(), w_in._version, tuple(w_in.shape), w_in.dtype, w_in.device)
        if self._w_in_float is None or self._w_in_float[0] != key:
            self._w_in_float = (key, w_in.detach().float())
        return self._w_in_float[1]
