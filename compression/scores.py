"""Token scores for eviction: how much the agent's latent thoughts looked at each cached slot.

All scores are float32 ``[layers, batch, kv_heads, tokens]`` on the memory's slot layout; padding scores 0.

- **Latent-query attention** (the Orthogonal Backfill paper, arXiv 2604.13349, METHODS.md §2): the attention rows
  of the ``m`` latent thoughts, summed over thoughts, GQA query heads summed within each KV head's group.
- **Pooling** (SnapKV, arXiv 2404.14469): average pooling along tokens (stride 1, ``kernel // 2`` padding) so a
  token's neighbours lend it mass and selected evidence stays in contiguous clumps; in a padded batch over each
  item's real tokens only, so an item scores the same in any batch.
- **Value-aware scores** (VATP, arXiv 2406.12335; value-aware diagnostics, arXiv 2605.08234, METHODS.md §5):
  attention times ``||v||_1``, ``||v||_2`` or ``||W_o v||_1`` (output projection of the query heads that read the
  KV head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from latent_relay.relay.memory import KVState, MemoryError_
from latent_relay.relay.observation import Observation

ValueNorm = Literal["none", "l1", "l2", "wo"]

#: Tokens per chunk when applying the output projection (bounds the ``[.., tokens, hidden]`` temporary).
_WO_CHUNK = 256


def latent_attention_scores(observation: Observation, memory: KVState | None = None) -> torch.Tensor:
    """Observation attention summed over thoughts, as GQA-group sums: ``[L, B, H_kv, T]`` float32.

    ``Observation`` stores the group *mean*; multiplying by ``group_size`` gives the sums of METHODS.md §2
    (the ranking is the same either way).
    """
    att = observation.attention
    if att.dim() != 5:
        raise MemoryError_(f"observation attention must be [B, L, H_kv, thoughts, T], got {tuple(att.shape)}")
    if memory is not None:
        expected = (memory.batch_size, memory.num_layers, memory.num_kv_heads)
        if tuple(att.shape[:3]) != expected or att.shape[4] != memory.num_tokens:
            raise MemoryError_(
                f"observation {tuple(att.shape)} does not match the memory (batch, layers, kv heads) "
                f"{expected} with {memory.num_tokens} tokens"
            )
    scores = att.float().sum(dim=3) * float(observation.group_size)
    scores = scores.permute(1, 0, 2, 3).contiguous()
    if memory is not None:
        scores = scores * memory.valid[None, :, None, :].to(scores.dtype)
    return scores


def pool_scores(scores: torch.Tensor, kernel: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SnapKV average pooling along the token axis (stride 1, zero padding ``kernel // 2``, same length).

    With ``valid`` (bool ``[B, T]``, the real slots of a padded batch) each item's real tokens are pooled as one
    sequence, as if its PAD slots were removed, so a batch scores every item exactly as that item alone; PAD slots
    score 0 (they must score 0 on input too)."""
    if kernel <= 1:
        return scores
    if valid is None or bool(valid.all()):
        return _avg_pool(scores, kernel)
    index = (~valid).to(torch.int8).argsort(dim=1, stable=True)  # [B, T]: real slots first, in order, then PAD
    index = index[None, :, None, :].expand_as(scores)
    pooled = _avg_pool(scores.gather(-1, index), kernel)
    return torch.zeros_like(pooled).scatter_(-1, index, pooled) * valid[None, :, None, :].to(pooled.dtype)


def _avg_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    shape = scores.shape
    if scores.numel() == 0:
        return scores
    flat = scores.reshape(-1, 1, shape[-1])
    pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled[..., : shape[-1]].reshape(shape)


def value_norms(memory: KVState, kind: Literal["l1", "l2"]) -> torch.Tensor:
    """``||v||_1`` or ``||v||_2`` of every slot's value, ``[L, B, H_kv, T]`` float32."""
    p = 1 if kind == "l1" else 2
    return torch.stack([torch.linalg.vector_norm(v.float(), ord=p, dim=-1) for v in memory.values])


def output_value_norms(memory: KVState, output_proj: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_{q in group(h)} ||W_o[:, q] v||_1`` per slot, ``[L, B, H_kv, T]`` float32.

    ``output_proj[l]`` is layer ``l``'s attention output projection ``[hidden, H * d]``; query head ``q`` owns the
    column block ``q*d:(q+1)*d``. A KV head's value reaches the output through every query head of its GQA
    group, so the per-query-head L1 norms are summed over the group.
    """
    if len(output_proj) != memory.num_layers:
        raise MemoryError_(f"{len(output_proj)} output projections for {memory.num_layers} layers")
    d, h_kv = memory.head_dim, memory.num_kv_heads
    out = []
    for w, v in zip(output_proj, memory.values):
        hidden, cols = w.shape
        if cols % (d * h_kv):
            raise MemoryError_(f"output projection {tuple(w.shape)} is not [hidden, heads * {d}] for {h_kv} KV heads")
        g = cols // (d * h_kv)
        # [H_kv, d, g * hidden]: for KV head h, the stacked (transposed) column blocks of its g query heads.
        wg = w.float().reshape(hidden, h_kv, g, d).permute(1, 3, 2, 0).reshape(h_kv, d, g * hidden)
        wg = wg.to(v.device)
        parts = []
        for start in range(0, v.shape[2], _WO_CHUNK):
            chunk = v[:, :, start : start + _WO_CHUNK].float()  # [B, H, t, d]
            proj = torch.einsum("bhtd,hdk->bhtk", chunk, wg)  # [B, H, t, g * hidden]
            parts.append(proj.abs().sum(dim=-1))
        out.append(torch.cat(parts, dim=-1) if parts else v.new_zeros(v.shape[:3], dtype=torch.float32))
    return torch.stack(out)


def compute_scores(
    memory: KVState,
    observation: Observation,
    *,
    pool: int = 1,
    value: ValueNorm = "none",
    output_proj: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Selection scores ``[L, B, H_kv, T]``: latent-query attention, pooled (over each item's real tokens), then
    value-weighted; PAD slots score 0."""
    scores = pool_scores(latent_attention_scores(observation, memory), pool, memory.valid)
    if value in ("l1", "l2"):
        scores = scores * value_norms(memory, value)
    elif value == "wo":
        if output_proj is None:
            raise MemoryError_("value=wo needs the output projection of every layer (output_proj)")
        scores = scores * output_value_norms(memory, output_proj)
    elif value != "none":
        raise MemoryError_(f"unknown value norm {value!r}; expected none, l1, l2 or wo")
    return scores * memory.valid[None, :, None, :].to(scores.dtype)
