"""GPU benchmark of the relay boundary's Triton kernels and of the whole compression hop, against their torch twins.

The cache crossing between agents is pruned (the selectors of the Orthogonal Backfill paper, arXiv 2604.13349),
backfilled (Orthogonal Backfill, OBF, same paper), quantized (KIVI-style, arXiv 2402.02750) and packed into wire
packets (:mod:`latent_relay.relay.wire`). Its tensor steps run as Triton kernels on CUDA tensors
(:mod:`latent_relay.kernels.dispatch`); this script times each kernel against its torch twin
(:mod:`latent_relay.kernels.reference`) on synthetic caches shaped like real models, and times the whole hop.

    python -m latent_relay.benchmarks.kernels_gpu                       # both shapes on cuda
    python -m latent_relay.benchmarks.kernels_gpu --shapes qwen3-4b     # one shape
    python -m latent_relay.benchmarks.kernels_gpu --quick               # tiny shapes on CPU, torch paths, seconds

Shapes: ``qwen3-4b`` (36 layers, 8 KV heads, head dim 128) and ``qwen3-32b`` (64 layers, 8 KV heads, head dim 128,
also Qwen2.5-32B's KV shape); batch 4, a 500-token prompt region per item (items 0, 8, 16, 24 tokens short, the
rest PAD), 40 latent thoughts, bf16 (``--batch``, ``--prompt``, ``--thoughts``, ``--history``, ``--dtype``). The
caches and observations are :func:`latent_relay.benchmarks.compression_overhead.random_cache`'s. The kernels' inputs
come from the pipeline itself where it has them: the headwise selection of the scores at ``--budget`` gives the
gather indices, the evicted slots and the injection slots.

The kernel table (one row per kernel; each kernel runs once over a whole hop's data, every layer folded into its
leading axis, so that its time is the kernel's and not the launch's; the hop launches it per layer or per item):

- ``gather``: the survivors of every layer's keys and values, ``[2L*B, H, T] -> [2L*B, H, J]`` rows of ``d``.
- ``residual mean``: OBF's ``r = w^T (Y - Y Q^T Q)``, ``||R||``, ``||Y||`` over the evicted prompt rows of every
  layer's values, ``Q^T`` ``--budget`` orthonormal rows (a random basis).
- ``backfill shift``: OBF's projection ``alpha * (r C^T) C`` onto ``--rank`` directions, ``L*B*H`` problems.
- ``injection``: the shift added in place to the kept prompt rows of every layer's evicted values.
- ``quantize-pack int8/int4``: KIVI row quantization + bit packing of every layer's values, one row per token
  (what a hop's ``+int8`` step quantizes when nothing is evicted), no padding mask.
- ``unpack-dequantize int8/int4``: the inverse, back to the cache dtype.

Columns: ``workload`` the tensor shape; ``MB`` the bytes the operation must move, read + written (each input
element read once, each output element written once, only the rows the kernel touches; 1 MB = 1e6 bytes), computed
from the shapes, not from what the implementation moves (so an extra pass, such as the quantizer's bf16 -> fp32
conversion, shows as lower GB/s); ``1st s`` the first call (Triton JIT compile + run; 0 when the kernel was
compiled before in this process or found in Triton's cache); ``triton ms`` (named after the kernel path) the median
time of one call; ``GB/s`` = MB / ms; ``% copy`` that rate over the device's copy bandwidth (``torch.Tensor.copy_``
of a ``--copy-mib`` buffer, read + written, measured first); ``torch ms`` the twin's median on the same inputs;
``x torch`` = torch ms / ms; ``check`` the kernel's output against the twin's, once: ``exact`` (equal bits), ``ok``
(within the tolerance, max error / max |twin| shown) or ``FAIL``; ``target`` the issue's targets, ``met`` or
``MISSED``. Tolerances: gather, injection and quantize-pack exact (their contract is bit for bit; the packed codes,
scales and zeros compared); residual mean ``|a - b| <= 1e-4 |b| + 1e-4 max|b|`` (fp32 sums in another order);
backfill shift the same with 1e-5; unpack-dequantize ``|a - b| <= eps(dtype) |b| + 1e-6 max|b|`` (a fused
multiply-add in the kernel can move the result by one fp32 rounding, hence one rounding of the output dtype).

Timing: after warm-up (``--warmup`` calls), each of ``--repeats`` samples times a run of back-to-back calls (as many
as fill about a millisecond) between two ``torch.cuda.Event``s and divides by their count; the table shows the median
sample. A call that is cheaper than its launch (the backfill shift) is thus timed as the launch costs it.

The hop table: :func:`latent_relay.compression.recipes.compress_batch` with each ``--recipes`` recipe (default
``h-obf:budget=64+int8`` and ``l-obf:budget=64+int4``) on the synthetic batch memory and observation, then
:func:`latent_relay.relay.wire.encode` of each item's packet (which copies the packed memory to the host and
checksums it), wall time with the device synchronised before and after; ``compress ms`` and ``encode ms`` its parts,
``hop ms`` the median total over ``--hop-repeats`` after two warm-up hops, with the kernel path (``RELAY_KERNELS=
triton``) and with the torch twins (``RELAY_KERNELS=torch``); ``packet MB`` the packets' bytes.

Targets (the issue): quantize-pack and unpack-dequantize at least 60% of the copy bandwidth; the backfill projection
at least 5x its torch twin; the whole hop at most 50 ms for the qwen3-4b shape (batch 4, 500-token prompts, 40
thoughts).

Time on one H100 (an estimate, not a measurement): imports and CUDA start-up about 15 s; building each synthetic
cache on the host and copying it over about 5 s (qwen3-4b, 0.32 GB of bf16 keys and values) and 10 s (qwen3-32b,
0.57 GB); the Triton JIT compile, once (later runs find the kernels in Triton's cache): 8 kernels in the table and
perhaps as many more specializations in the hops (other strides and sizes), 1-3 s each, so 15-50 s; the kernel
table, 8 kernels x 2 paths x (3 warm-up calls + 20 samples of about a millisecond or one call), a few seconds per
shape (the slowest calls, the twins of the residual mean and the quantizer on the 32B shape, take a few
milliseconds); the hops, 2 recipes x 2 paths x 7 hops of 0.05-0.3 s, up to 15 s per shape. About 2 minutes in all,
4 minutes if everything is twice as slow as guessed: inside the 5 minutes the issue allows.

After the tables: every failed check and every missed target, one line each; the exit status is 1 when a check
failed (a missed target does not change it).

``--quick`` runs both shapes scaled down (2 layers, 2 KV heads, head dim 32, batch 2, 24-token prompts, budget 8) on
the CPU through the torch paths (kernel path ``auto``: the torch twins, and in the hop the compiled CPU kernels of
OBF's solver; the Triton kernels need a GPU, or ``TRITON_INTERPRET=1`` with ``--backend triton`` for a correctness
run), through the same code that builds the inputs and the tables, in seconds: a smoke test, whose
numbers mean nothing. Without a GPU and without ``--quick`` the script stops with a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from latent_relay.benchmarks.compression_overhead import random_cache
from latent_relay.compression.recipes import compress_batch, parse_recipe
from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import (
    Selection,
    current_agent_index,
    gather_selection,
    prompt_mask,
    select_headwise,
    survivor_order,
)
from latent_relay.kernels import dispatch
from latent_relay.kernels.dispatch import backend_override
from latent_relay.kernels.reference import packed_width
from latent_relay.relay import wire
from latent_relay.relay.memory import KVState
from latent_relay.relay.messages import LatentMessage
from latent_relay.relay.observation import Observation


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    heads: int  # KV heads
    head_dim: int
    query_heads: int  # only the observation's GQA group size depends on it


SHAPES = {
    "qwen3-4b": Shape("qwen3-4b", 36, 8, 128, 32),
    "qwen3-32b": Shape("qwen3-32b", 64, 8, 128, 64),  # Qwen2.5-32B: the same KV shape, 40 query heads
}
QUICK = {"layers": 2, "heads": 2, "head_dim": 32, "query_heads": 4}
#: option -> (default, --quick default)
DEFAULTS = {
    "batch": (4, 2),
    "prompt": (500, 24),
    "thoughts": (40, 4),
    "budget": (64, 8),
    "repeats": (20, 3),
    "warmup": (3, 1),
    "hop_repeats": (5, 1),
    "copy_mib": (1024, 8),
}
HOP_TARGET_S = {"qwen3-4b": 0.050}
SAMPLE_S = 1e-3  # a timing sample lasts about this long (back-to-back calls)
MAX_CALLS = 200


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_seconds(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds per call over ``repeats`` samples after ``warmup`` calls (see the module docstring)."""
    for _ in range(warmup):
        fn()
    sync(device)
    one = sample_seconds(fn, 1, device)
    calls = max(1, min(MAX_CALLS, math.ceil(SAMPLE_S / max(one, 1e-9))))
    return statistics.median(sample_seconds(fn, calls, device) for _ in range(repeats))


def first_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    begin = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - begin


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` (read + written) for a ``mib``-MiB buffer."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, max(repeats, 5), 2)
    return 2 * src.numel() / seconds


# -------------------------------------------------------------------------------------------- correctness
Tolerance = tuple[float, float] | None  # (rtol, atol as a fraction of max |twin|); None: equal bits


def compare(got: object, want: object, tol: Tolerance) -> tuple[bool, str]:
    """``got`` (a tensor or a tuple of tensors) against the twin's ``want``: (ok, the check column's text)."""
    pairs = list(zip(got, want, strict=True)) if isinstance(want, tuple) else [(got, want)]
    worst = 0.0
    for a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, f"FAIL ({tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype})"
        if torch.equal(a, b):
            continue
        if tol is None:
            return False, f"FAIL ({int((a != b).sum())}/{a.numel()} differ)"
        af, bf = a.double(), b.double()
        top = float(bf.abs().max())
        diff = (af - bf).abs()
        bad = int((~(diff <= tol[0] * bf.abs() + tol[1] * top)).sum())  # NaN counts as bad
        if bad:
            return False, f"FAIL ({bad}/{a.numel()} beyond tol)"
        worst = max(worst, float(diff.max()) / max(top, 1e-30))
    return True, "exact" if worst == 0.0 else f"ok ({worst:.0e})"


# ------------------------------------------------------------------------------------------------ kernels
@dataclass
class Case:
    """One kernel: ``run(backend)`` calls it through :mod:`latent_relay.kernels.dispatch` on prepared inputs."""

    name: str
    workload: str
    nbytes: int
    run: Callable[[str], object]
    tol: Tolerance = None
    target: str = ""  # "copy" (>= 60% of copy bandwidth) or "speedup" (>= 5x the twin)
    outputs: Callable[[str], tuple[object, object]] | None = None  # (kernel's, twin's) where run() edits in place

    def results(self, fast: str) -> tuple[object, object]:
        return self.outputs(fast) if self.outputs is not None else (self.run(fast), self.run("torch"))


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, B, ...]`` tensors stacked and folded to ``[L*B, ...]``."""
    x = torch.stack(list(tensors))
    return x.reshape(-1, *x.shape[2:])


def gather_case(memory: KVState, selection: Selection) -> Case:
    order, _ = survivor_order(memory, selection)  # [L, B, H, J]: headwise selections differ per layer and head
    x = _stack([*memory.keys, *memory.values])  # [2L*B, H, T, d]
    index = torch.cat([order, order]).reshape(-1, *order.shape[2:]).contiguous()
    rows = index.numel() * x.shape[-1] * x.element_size()
    return Case(
        "gather",
        f"{_shape(x)} -> J={index.shape[-1]}",
        2 * rows + index.numel() * index.element_size(),
        lambda backend: dispatch.gather_tokens(x, index, backend=backend),
    )


def _orthonormal_rows(n: int, k: int, d: int, device: torch.device, seed: int) -> torch.Tensor:
    """``[n, k, d]`` float32 with orthonormal rows (a random basis)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, d, k, generator=gen)).Q.mT.contiguous().to(device)


def _prompt_span(selection: Selection) -> tuple[int, int]:
    cols = selection.prompt.any(dim=0).nonzero()
    return (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)


def residual_case(memory: KVState, selection: Selection, scores: torch.Tensor, budget: int) -> Case:
    lo, hi = _prompt_span(selection)
    v = _stack(memory.values)[:, :, lo:hi]  # a strided view, as the solvers pass a layer's prompt span
    evict = selection.evict[..., lo:hi].expand(memory.num_layers, -1, memory.num_kv_heads, -1)
    evict = evict.reshape(v.shape[:3]).contiguous()
    w = torch.where(evict, scores[..., lo:hi].reshape(v.shape[:3]).float(), 0.0).contiguous()
    n, d = v.shape[0] * v.shape[1], v.shape[-1]
    qt = _orthonormal_rows(n, min(budget, d), d, v.device, seed=1)
    read = int(evict.sum()) * d * v.element_size() + evict.numel() * (1 + 4) + qt.numel() * 4
    return Case(
        "residual mean",
        f"{_shape(v)}, Q^T {_shape(qt)}",
        read + n * (d + 2) * 4,
        lambda backend: dispatch.residual_mean(v, evict, w, qt, backend=backend),
        tol=(1e-4, 1e-4),
    )


def shift_case(memory: KVState, rank: int) -> Case:
    n, d = memory.num_layers * memory.batch_size * memory.num_kv_heads, memory.head_dim
    gen = torch.Generator().manual_seed(2)
    dev = memory.device
    r = torch.randn(n, d, generator=gen).to(dev)
    c = _orthonormal_rows(n, min(rank, d), d, dev, seed=3)
    alpha = torch.rand(n, generator=gen).to(dev)
    applied = (torch.rand(n, generator=gen) < 0.9).to(dev)
    full = (torch.rand(n, generator=gen) < 0.05).to(dev)
    return Case(
        "backfill shift",
        f"r {_shape(r)}, C {_shape(c)}",
        (r.numel() + c.numel() + n) * 4 + 2 * n + r.numel() * 4,
        lambda backend: dispatch.backfill_shift(r, c, alpha, applied, full, backend=backend),
        tol=(1e-5, 1e-5),
        target="speedup",
    )


def inject_case(memory: KVState, selection: Selection) -> Case:
    gathered = gather_selection(memory, selection)
    v = _stack(gathered.memory.values).contiguous()  # [L*B, H, T_out, d]
    lb, h, _, d = v.shape
    slots = torch.where(gathered.prompt_slots_valid, gathered.prompt_slots, -1)[:, None, :]  # [B, 1, k]
    slots = slots.repeat(memory.num_layers, 1, 1).contiguous()  # row l*B + b is item b's
    k = slots.shape[-1]
    gen = torch.Generator().manual_seed(4)
    shift = (torch.randn(lb, h, d, generator=gen) * 1e-2).to(v.device)
    scale = torch.rand(lb, h, k, generator=gen).to(v.device)
    real = int((slots >= 0).sum()) * h
    small = slots.numel() * slots.element_size() + (shift.numel() + scale.numel()) * 4

    def outputs(fast: str) -> tuple[torch.Tensor, torch.Tensor]:
        mine, twin = v.clone(), v.clone()
        return (
            dispatch.inject_rows(mine, slots, shift, scale, backend=fast),
            dispatch.inject_rows(twin, slots, shift, scale, backend="torch"),
        )

    return Case(
        "injection",
        f"{_shape(v)}, k={k}",
        2 * real * d * v.element_size() + small,
        lambda backend: dispatch.inject_rows(v, slots, shift, scale, backend=backend),  # in place: v drifts, harmless
        outputs=outputs,
    )


def quant_cases(memory: KVState) -> list[Case]:
    """Quantize-pack and unpack-dequantize, int8 and int4, of every layer's values (one row per token)."""
    x = torch.stack(memory.values).reshape(-1, memory.head_dim)
    rows, n = x.shape
    out: list[Case] = []
    for bits in (8, 4):
        width = packed_width(n, bits)
        packed = rows * (width + 4)  # codes + fp16 scale and zero
        out.append(
            Case(
                f"quantize-pack int{bits}",
                _shape(x),
                x.numel() * x.element_size() + packed,
                lambda backend, bits=bits: dispatch.quantize_pack(x, None, bits, backend=backend),
                target="copy",
            )
        )
        codes, scale, zero = dispatch.quantize_pack(x, None, bits, backend="torch")
        out.append(
            Case(
                f"unpack-dequantize int{bits}",
                f"{_shape(codes)} -> {x.dtype}".replace("torch.", ""),
                packed + x.numel() * x.element_size(),
                lambda backend, bits=bits, c=codes, s=scale, z=zero: dispatch.unpack_dequantize(
                    c, s, z, bits, n, x.dtype, backend=backend
                ),
                tol=(torch.finfo(x.dtype).eps, 1e-6),
                target="copy",
            )
        )
    return out


def kernel_cases(memory: KVState, observation: Observation, budget: int, rank: int) -> list[Case]:
    scores = compute_scores(memory, observation)
    selection = select_headwise(scores, prompt_mask(memory, current_agent_index(memory, observation)), budget)
    return [
        gather_case(memory, selection),
        residual_case(memory, selection, scores, budget),
        shift_case(memory, rank),
        inject_case(memory, selection),
        *quant_cases(memory),
    ]


@dataclass
class KernelRow:
    name: str
    workload: str
    nbytes: int
    target: str
    first_s: float
    fast_s: float
    torch_s: float
    check: str


def bench_kernel(case: Case, fast: str, device: torch.device, repeats: int, warmup: int) -> KernelRow:
    first = first_call_seconds(lambda: case.run(fast), device)
    check = compare(*case.results(fast), case.tol)[1]
    fast_s = median_seconds(lambda: case.run(fast), device, repeats, warmup)
    torch_s = median_seconds(lambda: case.run("torch"), device, repeats, warmup)
    return KernelRow(case.name, case.workload, case.nbytes, case.target, first, fast_s, torch_s, check)


def target_text(row: KernelRow, copy_bps: float) -> str:
    if row.target == "copy":
        return ">=60% copy: " + ("met" if row.nbytes / row.fast_s >= 0.6 * copy_bps else "MISSED")
    if row.target == "speedup":
        return ">=5x torch: " + ("met" if row.torch_s / row.fast_s >= 5 else "MISSED")
    return ""


def kernel_table(rows: Sequence[KernelRow], copy_bps: float, fast: str) -> list[str]:
    head = ["kernel", "workload", "MB", "1st s", f"{fast} ms", "GB/s", "% copy", "torch ms", "x torch", "check"]
    body = []
    for r in rows:
        rate = r.nbytes / r.fast_s
        body.append(
            [
                r.name,
                r.workload,
                f"{r.nbytes / 1e6:.1f}",
                f"{r.first_s:.2f}",
                f"{r.fast_s * 1e3:.4f}",
                f"{rate / 1e9:.0f}",
                f"{rate / copy_bps:.0%}",
                f"{r.torch_s * 1e3:.4f}",
                f"{r.torch_s / r.fast_s:.1f}",
                r.check,
                target_text(r, copy_bps),
            ]
        )
    return aligned([*head, "target"], body, left=(0, 1, 9, 10))


# -------------------------------------------------------------------------------------------------- hop
@dataclass
class HopRow:
    recipe: str
    backend: str
    compress_s: float
    encode_s: float
    hop_s: float
    packet_bytes: int


def one_hop(memory: KVState, observation: Observation, recipe: str, device: torch.device) -> tuple[float, float, int]:
    """(compress s, encode s, packet bytes) of one hop: ``compress_batch`` then one packet per item."""
    sync(device)
    begin = time.perf_counter()
    packed, _ = compress_batch(memory, observation, recipe)
    sync(device)
    compressed = time.perf_counter()
    canonical = parse_recipe(recipe).canonical
    packets = [wire.encode(LatentMessage(observation.agent, p, recipe=canonical)) for p in packed]
    sync(device)
    return compressed - begin, time.perf_counter() - compressed, sum(wire.packet_size(p) for p in packets)


def bench_hop(
    memory: KVState, observation: Observation, recipe: str, backend: str, device: torch.device, repeats: int
) -> HopRow:
    with backend_override(backend):
        for _ in range(2):  # warm-up: JIT compile, allocator, solver workspaces
            one_hop(memory, observation, recipe, device)
        runs = [one_hop(memory, observation, recipe, device) for _ in range(repeats)]
    comp, enc, size = (statistics.median(column) for column in zip(*runs))
    return HopRow(recipe, backend, comp, enc, statistics.median(c + e for c, e, _ in runs), int(size))


def hop_target(row: HopRow, shape: str) -> str:
    limit = HOP_TARGET_S.get(shape)
    if limit is None or row.backend == "torch":
        return ""
    return f"<={limit * 1e3:.0f} ms: " + ("met" if row.hop_s <= limit else "MISSED")


def hop_table(rows: Sequence[HopRow], shape: str) -> list[str]:
    head = ["recipe", "kernels", "compress ms", "encode ms", "hop ms", "x torch", "packet MB", "target"]
    torch_s = {r.recipe: r.hop_s for r in rows if r.backend == "torch"}
    body = [
        [
            r.recipe,
            r.backend,
            f"{r.compress_s * 1e3:.1f}",
            f"{r.encode_s * 1e3:.1f}",
            f"{r.hop_s * 1e3:.1f}",
            f"{torch_s[r.recipe] / r.hop_s:.1f}" if r.recipe in torch_s else "-",
            f"{r.packet_bytes / 1e6:.2f}",
            hop_target(r, shape),
        ]
        for r in rows
    ]
    return aligned(head, body, left=(0, 1, 7))


# ------------------------------------------------------------------------------------------------ output
def aligned(head: Sequence[str], body: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Lines of a table: columns as wide as their widest cell, ``left`` columns left-aligned, others right."""
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(head))
    return [line(head), rule, *(line(row) for row in body)]


def versions() -> str:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    return f"torch {torch.__version__}, triton {triton}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# -------------------------------------------------------------------------------------------------- main
def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", help="cuda (default) or cpu; --quick: cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU through the torch paths, seconds")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument(
        "--backend",
        choices=["auto", "triton"],
        default="auto",
        help="the kernel path timed against the torch twins; auto: triton on a GPU, on a CPU the torch twins (and "
        "the compiled CPU kernels of OBF's solver in the hop); triton on a CPU needs TRITON_INTERPRET=1",
    )
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--history", type=int, default=0, help="tokens of an earlier agent's region before the prompt")
    for name, (full, quick) in DEFAULTS.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {full} (--quick {quick})")
    ap.add_argument("--rank", type=int, default=4, help="residual directions of the backfill shift kernel")
    ap.add_argument("--recipes", nargs="+", help="hop recipes (default h-obf:budget=B+int8 l-obf:budget=B+int4)")
    args = ap.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.history < 0 or args.rank < 1:
        fail("--history must be >= 0 and --rank >= 1")
    args.recipes = args.recipes or [f"h-obf:budget={args.budget}+int8", f"l-obf:budget={args.budget}+int4"]
    for recipe in args.recipes:
        try:
            parse_recipe(recipe)
        except ValueError as err:
            fail(f"--recipes {recipe!r}: {err}")
    return args


def pick_device(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cpu" if args.quick else "cuda")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        fail(f"--device {name}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}); --quick runs on the CPU")
    if device.type not in ("cuda", "cpu"):
        fail(f"--device {name}: use cuda or cpu")
    return device


def synthetic(shape: Shape, args: argparse.Namespace, device: torch.device) -> tuple[KVState, Observation]:
    memory, obs = random_cache(
        shape.layers,
        shape.heads,
        shape.head_dim,
        args.batch,
        args.prompt,
        args.thoughts,
        args.history,
        getattr(torch, args.dtype),
        group_size=shape.query_heads // shape.heads,
    )
    return memory.to(device), Observation(obs.attention.to(device), obs.agent, obs.group_size)


def run_shape(
    shape: Shape, args: argparse.Namespace, device: torch.device, fast: str, copy_bps: float
) -> tuple[list[str], list[str]]:
    """Print the shape's header, kernel table and hop table; return (failed checks, missed targets)."""
    memory, observation = synthetic(shape, args, device)
    print(
        f"\n== {shape.name}: {shape.layers} layers x {shape.heads} KV heads x d={shape.head_dim}, batch "
        f"{args.batch}, {args.prompt}-token prompts, {args.thoughts} thoughts, {args.history} history, "
        f"{memory.num_tokens} slots, {args.dtype} ({memory.nbytes / 1e9:.2f} GB); budget {args.budget}, rank "
        f"{args.rank} | {device_name(device)} | {versions()} | copy {copy_bps / 1e9:,.0f} GB/s | kernels: {fast}",
        flush=True,
    )
    cases = kernel_cases(memory, observation, args.budget, args.rank)
    rows = [bench_kernel(case, fast, device, args.repeats, args.warmup) for case in cases]
    del cases
    print("\n".join(kernel_table(rows, copy_bps, fast)), flush=True)
    hops = [
        bench_hop(memory, observation, recipe, backend, device, args.hop_repeats)
        for recipe in args.recipes
        for backend in (fast, "torch")
    ]
    print(f"\nhop: compress_batch + wire.encode of {args.batch} packets, wall time, device synchronised")
    print("\n".join(hop_table(hops, shape.name)), flush=True)
    failed = [f"{shape.name} {r.name}: {r.check}" for r in rows if r.check.startswith("FAIL")]
    targets = [(r.name, target_text(r, copy_bps)) for r in rows]
    targets += [(f"hop {r.recipe} ({r.backend})", hop_target(r, shape.name)) for r in hops]
    return failed, [f"{shape.name} {what} ({text[: -len(': MISSED')]})" for what, text in targets if "MISSED" in text]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args)
    fast = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "auto")
    if fast == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        fail("--backend triton on the CPU needs TRITON_INTERPRET=1 (correctness only, not timing)")
    begin = time.perf_counter()
    copy_bps = copy_bandwidth(device, args.copy_mib, args.repeats)
    print(
        f"{device_name(device)}, {versions()}; copy bandwidth {copy_bps / 1e9:,.0f} GB/s (copy_ of "
        f"{args.copy_mib} MiB, read + written); medians of {args.repeats} samples after {args.warmup} warm-up calls; "
        f"hops: medians of {args.hop_repeats} after 2 warm-ups"
    )
    failed, missed = [], []
    for name in args.shapes:
        shape = replace(SHAPES[name], **QUICK) if args.quick else SHAPES[name]
        f, m = run_shape(shape, args, device, fast, copy_bps)
        failed += f
        missed += m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print("\n".join(f"FAIL {line}" for line in failed) or "checks: every kernel matches its torch twin")
    print("\n".join(f"MISSED {line}" for line in missed) or "targets: all met")
    note = " (--quick: tiny shapes, a smoke test; the numbers and targets mean nothing)" if args.quick else ""
    print(f"total {time.perf_counter() - begin:.1f} s{note}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
