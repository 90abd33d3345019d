"""The relay boundary's Triton kernels (gather of surviving tokens; Orthogonal Backfill's residual mean, projection
and injection): their torch twins against independent formulas, the dispatch, and each kernel against its twin
under ``TRITON_INTERPRET=1`` on CPU tensors.

The interpreter flag must be set before triton is imported, so the interpreter checks run this file as a script in a
fresh subprocess (``python tests/test_triton_boundary.py <group>``, as tests/test_kernels.py runs
tests/triton_interp_check.py); it prints ``OK <cases>`` last when every case matched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from latent_relay.kernels import dispatch, reference
from tests.triton_subprocess import run_interpreted

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ test data
def padded_index(b: int, h: int, t: int, budget: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, H, budget]`` int64 of distinct token indices per (item, head), ``-1`` beyond what each can keep: items
    hold ``t``, ``t - 3``, ... real tokens, so a budget larger than that is padded."""
    index = torch.full((b, h, budget), -1, dtype=torch.long)
    for bi in range(b):
        have = max(0, t - 3 * bi)
        for hi in range(h):
            take = min(budget, have)
            index[bi, hi, :take] = torch.randperm(have, generator=gen)[:take].sort().values
    return index


def oracle_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``torch.gather`` along the token axis, padding rows zeroed."""
    b, h, t, d = x.shape
    idx = index.expand(b, h, index.shape[-1])
    if t == 0:
        return x.new_zeros(b, h, idx.shape[-1], d)
    rows = torch.gather(x, 2, idx.clamp_min(0)[..., None].expand(b, h, idx.shape[-1], d))
    return rows.masked_fill((idx < 0)[..., None], 0)


def kept_basis_of(b: int, h: int, k: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``Q^T`` ``[B*H, k, d]`` with orthonormal rows."""
    return torch.linalg.qr(torch.randn(b * h, d, k, generator=gen)).Q.mT.contiguous()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max())) if want.numel() else 0.0


# --------------------------------------------------------------------------- the twins against plain formulas
@pytest.mark.parametrize("shared", [False, True])
def test_gather_twin_is_torch_gather_with_zero_padding(shared):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 23, 16, generator=gen)
    index = padded_index(3, 1 if shared else 2, 23, 30, gen)  # budget 30 > 23, 20 and 17 tokens
    for dtype in DTYPES:
        xt = x.to(dtype)
        got = reference.gather_tokens_ref(xt, index)
        assert torch.equal(got, oracle_gather(xt, index))
        out = torch.full_like(got, 7.0)
        assert reference.gather_tokens_ref(xt, index, out=out) is out and torch.equal(out, got)


def test_gather_twin_without_padding_is_the_plain_index_select():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 37, 8, generator=gen)
    index = torch.randint(0, 37, (2, 3, 11), generator=gen)
    assert torch.equal(reference.gather_tokens_ref(x, index), oracle_gather(x, index))
    empty = reference.gather_tokens_ref(torch.zeros(2, 3, 0, 8), torch.full((2, 1, 4), -1))
    assert empty.shape == (2, 3, 4, 8) and not bool(empty.any())


def test_residual_mean_twin_matches_the_per_problem_formula():
    gen = torch.Generator().manual_seed(2)
    b, h, t, d, k = 2, 3, 29, 16, 5
    v = torch.randn(b, h, t, d, generator=gen)
    evict = torch.rand(b, h, t, generator=gen) < 0.6
    w = torch.rand(b, h, t, generator=gen) * evict
    qt = kept_basis_of(b, h, k, d, gen)
    r, r2, y2 = reference.residual_mean_ref(v, evict, w, qt)
    r0, r20, y20 = reference.residual_mean_ref(v, evict, w, None)
    for n in range(b * h):
        bi, hi = divmod(n, h)
        y = v[bi, hi][evict[bi, hi]]
        q = qt[n].T  # d x k
        res = y - y @ q @ q.T
        wd = w[bi, hi][evict[bi, hi]]
        torch.testing.assert_close(r[n], wd @ res, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r2[n], res.square().sum(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(y2[n], y.square().sum(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(r0[n], wd @ y, atol=1e-5, rtol=1e-5)  # no projection: R = Y
        assert torch.equal(r20[n], y20[n])


def test_backfill_shift_twin_matches_the_per_problem_formula():
    gen = torch.Generator().manual_seed(3)
    n, p, d = 7, 2, 16
    r = torch.randn(n, d, generator=gen)
    c = torch.linalg.qr(torch.randn(n, d, p, generator=gen)).Q.mT
    alpha = torch.rand(n, generator=gen)
    applied = torch.tensor([1, 1, 0, 1, 1, 0, 1]).bool()
    full = torch.tensor([0, 1, 0, 0, 1, 0, 0]).bool()
    got = reference.backfill_shift_ref(r, c, alpha, applied, full)
    for i in range(n):
        delta = r[i] if full[i] else (c[i] @ r[i]) @ c[i]
        want = alpha[i] * delta if applied[i] else torch.zeros(d)
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-5)
    every = reference.backfill_shift_ref(r, None, alpha, applied)
    assert torch.equal(every, torch.where(applied[:, None], alpha[:, None] * r, 0.0))


def test_inject_twin_adds_to_the_slots_in_fp32_and_rounds_once():
    gen = torch.Generator().manual_seed(4)
    b, h, t, d, k = 2, 3, 19, 8, 4
    slots = torch.tensor([[2, 5, 11, 17], [4, 6, -1, -1]])[:, None, :]
    shift = torch.randn(b, h, d, generator=gen)
    scale = torch.rand(b, h, k, generator=gen)
    for dtype in DTYPES:
        v = torch.randn(b, h, t, d, generator=gen).to(dtype)
        want = v.clone()
        for bi, hi, j in ((bi, hi, j) for bi in range(b) for hi in range(h) for j in range(k)):
            s = int(slots[bi, 0, j])
            if s >= 0:
                want[bi, hi, s] = (v[bi, hi, s].float() + shift[bi, hi] * scale[bi, hi, j]).to(dtype)
        got = reference.inject_rows_ref(v.clone(), slots, shift, scale)
        assert torch.equal(got, want)
        none = torch.full((b, 1, k), -1)
        assert torch.equal(reference.inject_rows_ref(v.clone(), none, shift, scale), v)


# ------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_takes_the_twins_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 9, 16, generator=gen)
    index = padded_index(2, 2, 9, 12, gen)
    assert torch.equal(dispatch.gather_tokens(x, index), reference.gather_tokens_ref(x, index))
    evict = torch.rand(2, 2, 9, generator=gen) < 0.5
    qt = kept_basis_of(2, 2, 3, 16, gen)
    for a, b in zip(
        dispatch.residual_mean(x, evict, evict.float(), qt), reference.residual_mean_ref(x, evict, evict.float(), qt)
    ):
        assert torch.equal(a, b)
    shift, scale = torch.randn(2, 2, 16, generator=gen), torch.ones(2, 2, 12)
    want = reference.inject_rows_ref(x.clone(), index, shift, scale)
    assert torch.equal(dispatch.inject_rows(x.clone(), index, shift, scale), want)


def test_dispatch_validates_shapes():
    x = torch.zeros(2, 3, 5, 4)
    with pytest.raises(ValueError, match="B, H or 1"):
        dispatch.gather_tokens(x, torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        dispatch.gather_tokens(x, torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="does not fit"):
        dispatch.gather_tokens(x, torch.zeros(2, 1, 3, dtype=torch.long), out=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="evict"):
        dispatch.residual_mean(x, torch.zeros(2, 3, 4, dtype=torch.bool), torch.zeros(2, 3, 5), None)
    with pytest.raises(ValueError, match="qt"):
        dispatch.residual_mean(x, torch.zeros(2, 3, 5, dtype=torch.bool), torch.zeros(2, 3, 5), torch.zeros(6, 2, 3))
    with pytest.raises(ValueError, match="alpha"):
        dispatch.backfill_shift(torch.zeros(3, 4), None, torch.zeros(2), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="contiguous"):
        slots = torch.zeros(2, 1, 1, dtype=torch.long)
        dispatch.inject_rows(x.transpose(2, 3), slots, torch.zeros(2, 3, 5), torch.zeros(2, 3, 1))


# ------------------------------------------------------------------------- the kernels under the interpreter
GROUPS = ("gather", "residual", "shift", "inject", "compression")


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("group", GROUPS)
def test_triton_kernels_match_their_twins_under_the_interpreter(group):
    run_interpreted(Path(__file__).resolve(), group)


#: (B, H, T, d, budget, index shared by the heads): odd token counts, budgets above the tokens (padded with -1), no
#: tokens at all, an empty budget, head dims 64, 128 and two that are not powers of two
GATHER_SHAPES = [
    (2, 3, 23, 64, 9, False),
    (1, 2, 37, 128, 50, True),
    (3, 2, 50, 64, 64, False),
    (2, 1, 5, 80, 8, True),
    (2, 2, 0, 64, 3, False),
    (2, 2, 17, 24, 0, False),
]


def _check_gather() -> int:
    gen = torch.Generator().manual_seed(10)
    cases = 0
    for b, h, t, d, budget, shared in GATHER_SHAPES:
        x = torch.randn(b, h, t, d, generator=gen)
        index = padded_index(b, 1 if shared else h, t, budget, gen)
        for dtype in DTYPES:
            xt = x.to(dtype)
            want = oracle_gather(xt, index)
            got = dispatch.gather_tokens(xt, index, backend="triton")
            assert got.dtype == dtype and torch.equal(got, want), ("gather", b, h, t, d, budget, dtype)
            assert torch.equal(got, reference.gather_tokens_ref(xt, index))
            # strided source (a slice of a longer token axis) into a given output
            wide = torch.randn(b, h, t + 6, d, generator=gen).to(dtype)
            out = torch.full((b, h, budget, d), 3.0, dtype=dtype)
            view = wide[:, :, 3 : 3 + t]
            assert dispatch.gather_tokens(view, index, out=out, backend="triton") is out
            assert torch.equal(out, oracle_gather(view, index))
            assert torch.equal(dispatch.gather_tokens(xt, index.int(), backend="triton"), want)  # int32 indices
            cases += 1
    return cases


def _check_residual() -> int:
    gen = torch.Generator().manual_seed(11)
    cases = 0
    for b, h, t, d, k in [(2, 3, 23, 64, 5), (1, 2, 37, 128, 20), (2, 2, 50, 64, 0), (1, 1, 19, 80, 3)]:
        wide = torch.randn(b, h, t + 4, d, generator=gen)
        evict = torch.rand(b, h, t, generator=gen) < 0.6
        evict[0, 0] = False  # a problem with nothing evicted
        w = torch.rand(b, h, t, generator=gen) * evict
        qt = kept_basis_of(b, h, k, d, gen)
        for dtype in DTYPES:
            v = wide.to(dtype)[:, :, 2 : 2 + t]  # strided, as a layer's prompt span
            for q in (qt, None):
                got = dispatch.residual_mean(v, evict, w, q, backend="triton")
                want = reference.residual_mean_ref(v, evict, w, q)
                for name, a, ref in zip(("r", "r2", "y2"), got, want):
                    assert a.dtype == torch.float32 and a.shape == ref.shape
                    assert rel_err(a, ref) < 2e-5, ("residual", name, b, h, t, d, k, dtype, q is None, rel_err(a, ref))
                assert float(got[2][0]) == 0.0 and float(got[0][0].abs().max()) == 0.0
                cases += 1
    return cases


def _check_shift() -> int:
    gen = torch.Generator().manual_seed(12)
    cases = 0
    for n, p, d in [(1, 2, 64), (23, 2, 64), (37, 4, 128), (17, 1, 80)]:
        r = torch.randn(n, d, generator=gen)
        c = torch.linalg.qr(torch.randn(n, d, p, generator=gen)).Q.mT.contiguous()
        alpha = torch.rand(n, generator=gen) * 3
        applied = torch.rand(n, generator=gen) < 0.8
        full = torch.rand(n, generator=gen) < 0.3
        for cc, ff in ((c, full), (c, None), (None, None)):
            got = dispatch.backfill_shift(r, cc, alpha, applied, ff, backend="triton")
            want = reference.backfill_shift_ref(r, cc, alpha, applied, ff)
            assert rel_err(got, want) < 1e-6, ("shift", n, p, d, cc is None, ff is None, rel_err(got, want))
            assert bool((got[~applied] == 0).all())
            cases += 1
    return cases


def _check_inject() -> int:
    gen = torch.Generator().manual_seed(13)
    cases = 0
    for b, h, t, d, k, shared in [(2, 3, 23, 64, 9, True), (1, 2, 37, 128, 40, False), (3, 2, 50, 64, 33, True),
                                  (2, 1, 11, 80, 11, False)]:  # fmt: skip
        slots = padded_index(b, 1 if shared else h, t, k, gen)
        shift = torch.randn(b, h, d, generator=gen)
        scale = torch.rand(b, h, k, generator=gen) * 2
        base = torch.randn(b, h, t, d, generator=gen)
        for dtype in DTYPES:
            v = base.to(dtype)
            got = dispatch.inject_rows(v.clone(), slots, shift, scale, backend="triton")
            want = reference.inject_rows_ref(v.clone(), slots, shift, scale)
            assert got.dtype == dtype and torch.equal(got, want), ("inject", b, h, t, d, k, dtype)
            cases += 1
    return cases


def _check_compression() -> int:
    """The wired compression path on CPU tensors, forced onto the kernels (``RELAY_KERNELS=triton``), against the
    same path on the torch twins: eviction and injection bit-identical, the shifts to fp32 rounding."""
    from latent_relay.compression.backfill import BackfillConfig, apply_backfill, orthogonal_backfill
    from latent_relay.compression.scores import compute_scores
    from latent_relay.compression.selectors import gather_selection, prompt_mask, select_headwise, select_layerwise
    from latent_relay.kernels import triton_backfill, triton_gather
    from tests.compression_fixtures import Layout, build_memory

    calls: dict[str, int] = {}

    def counted(module, name):
        kernel = getattr(module, name)

        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args)

        setattr(module, name, run)

    counted(triton_gather, "gather_tokens_triton")
    counted(triton_backfill, "backfill_shift_triton")
    counted(triton_backfill, "inject_rows_triton")
    cases = 0
    for dtype, head_dim, budget, layerwise, inject in [
        (torch.float32, 64, 5, False, "uniform"),
        (torch.bfloat16, 64, 40, True, "attention"),  # budget larger than every prompt
        (torch.float16, 128, 9, True, "uniform"),
    ]:
        memory, obs = build_memory(Layout(head_dim=head_dim, prompts=(23, 9)), dtype=dtype)
        scores = compute_scores(memory, obs)
        select = select_layerwise if layerwise else select_headwise
        selection = select(scores, prompt_mask(memory, 1), budget)
        config = BackfillConfig(rank=2, solver="exact", inject=inject)
        with dispatch.backend_override("torch"):
            plain = gather_selection(memory, selection)
            result = orthogonal_backfill(memory, selection, scores, config)
            want = apply_backfill(plain, result)
        with dispatch.backend_override("triton"):
            gathered = gather_selection(memory, selection)
            kernel_result = orthogonal_backfill(memory, selection, scores, config)
            got = apply_backfill(gathered, result)
        for part in ("keys", "values"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(gathered.memory, part), getattr(plain.memory, part)))
        assert all(torch.equal(a, b) for a, b in zip(got.values, want.values)), ("inject", dtype)
        assert torch.equal(kernel_result.applied, result.applied)
        assert rel_err(kernel_result.shift, result.shift) < 1e-5, (
            "shift",
            dtype,
            rel_err(kernel_result.shift, result.shift),
        )
        cases += 1
    # the compression code took the kernels: per case, two gathers a layer plus the kept values, one shift, one
    # injection a layer
    assert calls.get("gather_tokens_triton", 0) >= 3 * 2 * 2 and calls.get("backfill_shift_triton") == 3
    assert calls.get("inject_rows_triton") == 3 * 2, calls
    return cases


CHECKS = {
    "gather": _check_gather,
    "residual": _check_residual,
    "shift": _check_shift,
    "inject": _check_inject,
    "compression": _check_compression,
}


def main(groups: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running these checks")
        return 2
    torch.manual_seed(0)
    cases = sum(CHECKS[group]() for group in groups or CHECKS)
    print(f"OK {cases}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
