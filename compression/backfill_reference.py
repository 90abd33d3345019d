"""The per-(item, layer, KV head) loop of Orthogonal Backfill's published code (OBF, arXiv 2604.13349;
METHODS.md §3), in plain torch: the reference that the batched solvers of
:mod:`latent_relay.compression.backfill_solvers` are tested and benchmarked against.
"""

from __future__ import annotations

import torch

from latent_relay.compression.backfill import BackfillConfig, injection_scale
from latent_relay.compression.backfill_solvers import use_all_components
from latent_relay.compression.selectors import Selection
from latent_relay.relay.memory import KVState

#: the default configuration (frozen, so one instance serves every call)
_DEFAULT_CONFIG = BackfillConfig()


def backfill_reference_loop(
    memory: KVState, selection: Selection, scores: torch.Tensor, config: BackfillConfig = _DEFAULT_CONFIG
) -> torch.Tensor:
    """Faithful per-(item, layer, head) loop as in the paper's code (QR + SVD per head): ``shift [L, B, H, d]``.

    Slow on purpose; the plain-torch reference the batched solvers are tested and benchmarked against.
    """
    L, b, h, d = memory.num_layers, memory.batch_size, memory.num_kv_heads, memory.head_dim
    shift = torch.zeros(L, b, h, d, device=memory.device)
    keep_all = selection.keep.expand(L, b, h, memory.num_tokens)
    for bi in range(b):
        prompt = selection.prompt[bi]
        for li in range(L):
            for hi in range(h):
                keep = keep_all[li, bi, hi]
                evict = prompt & ~keep
                if not bool(evict.any()):
                    continue
                v = memory.values[li][bi, hi].float()
                w = scores[li, bi, hi].float()
                x, y = v[keep], v[evict]
                q = torch.linalg.qr(x.T).Q
                r_mat = y - y @ q @ q.T if config.project else y
                if float(torch.linalg.norm(r_mat)) <= config.residual_tol * float(torch.linalg.norm(y)):
                    continue
                w_d = w[evict].clamp_min(0)
                if config.aggregate == "mean" or float(w_d.sum()) <= 0:
                    w_hat = torch.full_like(w_d, 1.0 / w_d.numel())
                else:
                    w_hat = w_d / w_d.sum()
                r = w_hat @ r_mat
                if use_all_components(config, d):
                    delta = r
                else:
                    vh = torch.linalg.svd(r_mat, full_matrices=False).Vh
                    c = vh[: config.rank]
                    delta = (r @ c.T) @ c
                a_d, a_s = w[evict].sum(), w[keep].sum()
                alpha = injection_scale(a_d[None], a_s[None], config)[0]
                shift[li, bi, hi] = alpha * delta
    return shift
