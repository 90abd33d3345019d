"""kernels/obf.py and kernels/native.py: the compiled OBF kernels against their plain-torch twins."""

from __future__ import annotations

import os
import platform
import shutil
import warnings

import pytest
import torch

from latent_relay.kernels import native
from latent_relay.kernels.obf import (
    evicted_gram,
    evicted_gram_ref,
    project_gram,
    project_gram_ref,
    top_directions_native,
)

needs_native = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not {"avx2", "fma", "f16c"} <= native._cpu_flags()
    or shutil.which(os.environ.get("CC", "cc")) is None,
    reason="the compiled CPU kernels need x86-64 with AVX2/FMA/F16C and a C compiler",
)


@needs_native
def test_the_kernels_build_and_load_where_they_can():
    assert native.load("cpu_obf") is not None  # else every fast OBF solve here silently takes the slower torch path


def _problem(b, h, t_total, span, d, dtype, seed=0, p_evict=0.8):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(b, h, t_total, d, generator=gen).to(dtype)
    v = values[:, :, span[0] : span[1]]  # a strided view, as the backfill passes the prompt span
    t = v.shape[2]
    evict = torch.rand(b, h, t, generator=gen) < p_evict
    w = torch.rand(b, h, t, generator=gen) * evict
    return v, evict, w


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("b", "h", "d", "span"), [(2, 3, 128, (5, 200)), (1, 1, 16, (0, 7)), (3, 2, 64, (9, 70))])
def test_native_matches_the_torch_reference(dtype, b, h, d, span):
    v, evict, w = _problem(b, h, span[1] + 4, span, d, dtype)
    evict[-1, -1] = True  # every row evicted
    empty = b * h > 1
    if empty:
        evict[0, 0] = False  # nothing evicted: S = 0, u = 0
    w = w * evict
    s, u = evicted_gram(v, evict, w, backend="native")
    s_ref, u_ref = evicted_gram_ref(v, evict, w)
    scale = float(s_ref.abs().max())
    assert float((s - s_ref).abs().max()) <= 1e-5 * scale
    assert float((u - u_ref).abs().max()) <= 1e-5 * max(1.0, float(u_ref.abs().max()))
    assert torch.equal(s, s.mT)  # mirrored exactly
    assert not empty or (not bool(s[0].any()) and not bool(u[0].any()))


@needs_native
def test_native_result_does_not_depend_on_the_thread_count():
    v, evict, w = _problem(4, 8, 300, (10, 290), 128, torch.bfloat16, seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = evicted_gram(v, evict, w, backend="native")
        torch.set_num_threads(2)
        two = evicted_gram(v, evict, w, backend="native")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_native
def test_native_writes_into_out():
    v, evict, w = _problem(2, 2, 50, (0, 50), 32, torch.float32)
    out = torch.full((4, 32, 32), float("nan"))
    s, _ = evicted_gram(v, evict, w, backend="native", out=out)
    assert s.data_ptr() == out.data_ptr() and torch.allclose(out, evicted_gram_ref(v, evict, w)[0], atol=1e-4)
    with pytest.raises(ValueError, match="contiguous float32"):
        evicted_gram(v, evict, w, backend="native", out=torch.empty(4, 32, 31))


def test_native_refuses_what_it_cannot_run_and_auto_falls_back():
    v, evict, w = _problem(2, 2, 20, (0, 20), 24, torch.float32)  # d = 24: not a multiple of 16
    with pytest.raises(native.NativeKernelUnavailable):
        evicted_gram(v, evict, w, backend="native")
    s, u = evicted_gram(v, evict, w)
    s_ref, u_ref = evicted_gram_ref(v, evict, w)
    assert torch.equal(s, s_ref) and torch.equal(u, u_ref)


def test_torch_backend_and_environment_force_the_reference(monkeypatch):
    v, evict, w = _problem(2, 2, 40, (0, 40), 32, torch.float32)

    def no_library(name):
        raise AssertionError("the compiled kernel must not be loaded")

    monkeypatch.setattr(native, "load", no_library)
    s_ref, u_ref = evicted_gram_ref(v, evict, w)
    assert torch.equal(evicted_gram(v, evict, w, backend="torch")[0], s_ref)
    monkeypatch.setenv("RELAY_KERNELS", "torch")
    assert torch.equal(evicted_gram(v, evict, w)[1], u_ref)


def test_bad_arguments_give_clear_errors():
    v, evict, w = _problem(2, 2, 40, (0, 40), 32, torch.float32)
    with pytest.raises(ValueError, match="must both be"):
        evicted_gram(v, evict[:, :, :-1], w)
    with pytest.raises(ValueError, match="kernel backend"):
        evicted_gram(v, evict, w, backend="cuda")


def test_a_missing_compiler_warns_once_and_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("RELAY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    native.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.load("cpu_obf") is None
        assert len(caught) == 1 and "using torch" in str(caught[0].message)
        v, evict, w = _problem(1, 2, 30, (0, 30), 32, torch.float32)
        assert torch.equal(evicted_gram(v, evict, w)[0], evicted_gram_ref(v, evict, w)[0])
    finally:
        native.load.cache_clear()


@needs_native
def test_the_build_is_cached_and_keyed(monkeypatch, tmp_path):
    monkeypatch.setenv("RELAY_CACHE_DIR", str(tmp_path))
    first = native.build("cpu_obf")
    assert first.parent == tmp_path / "kernels" and first.exists() and native.record_path(first).exists()
    mtime = first.stat().st_mtime_ns
    assert native.build("cpu_obf") == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    stale = first.with_name("cpu_obf-0000000000000000.so")
    stale.write_bytes(b"an older build")
    native.record_path(stale).write_text(f"{'0' * 64}  {stale.name}\n")
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DRELAY_TEST_REBUILD"))
    second = native.build("cpu_obf")
    assert second != first and second.exists() and not first.exists() and not stale.exists()
    assert native.record_path(second).exists()
    assert not native.record_path(first).exists() and not native.record_path(stale).exists()


def _psd(n, d, decay, seed=0, rank=None):
    gen = torch.Generator().manual_seed(seed)
    lam = decay ** torch.arange(d, dtype=torch.float64)
    if rank is not None:
        lam[rank:] = 0
    q = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64)).Q
    return ((q * lam) @ q.mT).float(), q


def _start(d, width):
    from latent_relay.compression.backfill_solvers import _start_block

    return _start_block(d, width, 0, "cpu", torch.float32).mT


@needs_native
@pytest.mark.parametrize(("d", "p", "decay"), [(128, 4, 0.9), (64, 2, 0.8), (16, 4, 0.7)])
def test_native_top_directions_match_the_eigenvectors_and_the_torch_twin(d, p, decay):
    from latent_relay.compression.backfill import BackfillConfig
    from latent_relay.compression.backfill_solvers import top_directions_subspace

    gram, q = _psd(24, d, decay)
    width = min(d, p + 10)
    c, steep = top_directions_native(gram, p, _start(d, width), 6, 1e-2, backend="native")
    top = q[..., :p].mT.float()
    assert float(torch.linalg.matrix_norm(c.mT @ c - top.mT @ top).max()) < 1e-3
    assert torch.allclose(c @ c.mT, torch.eye(p).expand(24, p, p), atol=1e-5)
    assert not bool(steep.any())
    twin = top_directions_subspace(gram, p, BackfillConfig(rank=p), backend="torch")
    assert float(torch.linalg.matrix_norm(c.mT @ c - twin.mT @ twin).max()) < 1e-3


@needs_native
def test_native_top_directions_flag_rank_deficient_and_steep_problems():
    gram, _ = _psd(3, 32, 0.9, rank=2)  # rank 2 < p = 4
    gram = torch.cat([gram, torch.zeros(1, 32, 32), _psd(1, 32, 0.01)[0]])  # a zero matrix, a very steep spectrum
    c, steep = top_directions_native(gram, 4, _start(32, 14), 6, 1e-2, backend="native")
    assert bool(torch.isfinite(c).all()) and steep.tolist() == [True, True, True, False, True]
    assert not bool(c[3].any())  # nothing to find in a zero matrix (and nothing for eigh to add)
    norms = torch.linalg.vector_norm(c, dim=-1)
    assert bool(((norms - 1).abs() < 1e-5).logical_or(norms == 0).all())  # orthonormal rows, or zero rows


@needs_native
def test_native_top_directions_do_not_depend_on_the_thread_count():
    gram, _ = _psd(10, 64, 0.95, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = top_directions_native(gram, 4, _start(64, 14), 6, 1e-2, backend="native")
        torch.set_num_threads(2)
        two = top_directions_native(gram, 4, _start(64, 14), 6, 1e-2, backend="native")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_native_top_directions_leave_unsupported_inputs_to_torch():
    gram, _ = _psd(2, 24, 0.9)
    assert top_directions_native(gram, 2, _start(24, 12), 6, 1e-2) is None  # d = 24: the torch path
    assert top_directions_native(gram.double(), 2, _start(24, 12), 6, 1e-2) is None
    with pytest.raises(native.NativeKernelUnavailable):
        top_directions_native(gram, 2, _start(24, 12), 6, 1e-2, backend="native")
    assert top_directions_native(_psd(2, 32, 0.9)[0], 2, _start(32, 12), 6, 1e-2, backend="torch") is None


@needs_native
@pytest.mark.parametrize(("d", "k"), [(128, 32), (64, 5), (16, 16), (32, 0)])
def test_native_projection_matches_the_torch_twin_and_stays_symmetric(d, k):
    gen = torch.Generator().manual_seed(k)
    y = torch.randn(6, 3 * d, d, generator=gen)
    s = y.mT @ y
    s = 0.5 * (s + s.mT)
    qt = torch.linalg.qr(torch.randn(6, d, max(k, 1), generator=gen)).Q.mT[:, :k].contiguous()
    if k > 1:
        qt[0, -1] = 0  # a zero row (a kept slot beyond that item's count)
    want = project_gram_ref(s.clone(), qt)
    got = project_gram(s.clone(), qt, backend="native")
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert torch.equal(got, got.mT)
    p = torch.eye(d) - qt.mT @ qt  # against P S P formed explicitly
    assert torch.allclose(got, p @ s @ p, atol=1e-4 * float(s.abs().max()))


def test_projection_leaves_unsupported_inputs_to_the_torch_twin():
    s = torch.eye(24).expand(2, 24, 24).contiguous()
    qt = torch.eye(24)[:3].expand(2, 3, 24).contiguous()
    assert torch.equal(project_gram(s.clone(), qt), project_gram_ref(s.clone(), qt))  # d = 24
    with pytest.raises(native.NativeKernelUnavailable):
        project_gram(s.clone(), qt, backend="native")
