"""Per-hop compression overhead on random caches shaped like Qwen3-4B (METHODS.md §3, issue 3).

Times one relay hop (score -> select -> backfill) of H, L, and L-OBF / H-OBF with each solver, and the
faithful per-(item, layer, head) loop of OBF as in the paper's code, on the same memory, and prints a table with
ratios to the loop (timed in rounds of loop + every method; medians) plus the relative difference
of the injected delta of each fast solver to exact, by the spectral gap sigma_p / sigma_{p+1} of each problem.
On a CPU the ``/torch`` rows run the fast solver without its compiled kernels (``kernels/cpu_obf.c``), in plain
torch, as on a machine without a C compiler or with ``RELAY_KERNELS=torch``.

    python -m latent_relay.benchmarks.compression_overhead                # 36 layers, 8 KV heads, d=128, batch 4,
                                                                          # 500-token prompts
    python -m latent_relay.benchmarks.compression_overhead --quick        # small shapes, seconds
    python -m latent_relay.benchmarks.compression_overhead --device cuda  # the same comparison on a GPU

Values get a smoothly decaying spectrum (like real value caches). Consecutive singular values of the residuals
stay close (no problem reaches a gap of 1.5 here), the hard case for iterative solvers; where sigma_p and
sigma_{p+1} nearly tie, the top-p subspace itself is barely defined and no solver matches exact there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from latent_relay.compression.backfill import BackfillConfig, orthogonal_backfill
from latent_relay.compression.backfill_reference import backfill_reference_loop
from latent_relay.compression.recipes import compress
from latent_relay.compression.scores import compute_scores
from latent_relay.compression.selectors import (
    current_agent_index,
    gather_tokens,
    prompt_mask,
    select_headwise,
    select_layerwise,
)
from latent_relay.kernels.dispatch import backend_override
from latent_relay.relay.memory import KVState, Segment
from latent_relay.relay.observation import Observation


def random_cache(
    layers: int,
    heads: int,
    head_dim: int,
    batch: int,
    prompt: int,
    thoughts: int,
    history: int,
    dtype: torch.dtype,
    seed: int = 0,
    group_size: int = 4,
) -> tuple[KVState, Observation]:
    """[SINK 4][history of an earlier agent][current prompt (lengths vary by item)][PAD][thoughts]."""
    gen = torch.Generator().manual_seed(seed)
    sink = 4
    t = sink + history + prompt + thoughts
    seg = torch.zeros(batch, t, dtype=torch.int8)
    owner = torch.full((batch, t), -1, dtype=torch.int16)
    for b in range(batch):
        n = prompt - 8 * b  # items differ a little, as a real batch does
        parts = (
            (Segment.SINK, 0, sink),
            (Segment.PROMPT, 0, history),
            (Segment.PROMPT, 1, n),
            (Segment.PAD, -1, prompt - n),
            (Segment.THOUGHT, 1, thoughts),
        )
        j = 0
        for s, a, k in parts:
            seg[b, j : j + k], owner[b, j : j + k] = int(s), a
            j += k
    valid = seg != Segment.PAD
    position = (valid.long().cumsum(1) - 1).clamp_min(0) * valid
    decay = torch.logspace(0, -1.5, head_dim)
    keys, values = [], []
    for _ in range(layers):
        rot = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=gen)).Q
        keys.append(torch.randn(batch, heads, t, head_dim, generator=gen).to(dtype))
        v = (torch.randn(batch, heads, t, head_dim, generator=gen) * decay) @ rot
        values.append(v.to(dtype))
    memory = KVState(keys, values, seg, owner, position, agents=["planner", "critic"])
    logits = torch.randn(batch, layers, heads, thoughts, t, generator=gen) * 2
    logits = logits.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    return memory, Observation(logits.softmax(-1), agent="critic", group_size=group_size)


def spectral_gap(memory: KVState, selection, scores: torch.Tensor, rank: int) -> torch.Tensor:
    """``sigma_p / sigma_{p+1}`` of every problem's residual ``R`` ``[L, B, H]`` (from the eigenvalues of R^T R)."""
    from latent_relay.compression.backfill import _weights_hat
    from latent_relay.compression.backfill_solvers import _prompt_span, kept_basis, layer_residual_gram

    L, b, h, d = memory.num_layers, memory.batch_size, memory.num_kv_heads, memory.head_dim
    keep = selection.keep.expand(L, b, h, memory.num_tokens)
    evict = selection.prompt[None, :, None, :] & ~keep
    w_hat = _weights_hat(scores.float(), evict, "attention")
    k = int(selection.kept.max())
    idx = (~keep).to(torch.int8).argsort(dim=-1, stable=True)[..., :k]
    x = torch.stack([gather_tokens(v, idx[i]) for i, v in enumerate(memory.values)]).float().reshape(-1, k, d)
    kept = selection.kept[None, :, None].expand(L, b, h).reshape(L, b * h)
    x = x.reshape(L, b * h, k, d)
    qt = kept_basis(x.reshape(-1, k, d), kept.reshape(-1)).reshape(L, b * h, k, d)
    lo, hi = _prompt_span(selection.prompt)
    grams = [
        layer_residual_gram(
            v[:, :, lo:hi], evict[i, :, :, lo:hi], w_hat[i, :, :, lo:hi], qt[i], kept_values=(x[i], kept[i])
        )[0]
        for i, v in enumerate(memory.values)
    ]
    lam = torch.linalg.eigvalsh(torch.stack(grams).double()).flip(-1).clamp_min(0).sqrt()  # singular values of R
    return (lam[..., rank - 1] / lam[..., rank].clamp_min(1e-30)).view(L, b, h)


def timed(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, object]:
    """Seconds of one call of ``fn`` and its result (medians are taken over rounds by the caller); on a GPU the
    clock stops when the device has finished the work."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda _: None)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (4 layers, batch 2, 120-token prompts)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (the reference loop, then every method)")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=500)
    ap.add_argument("--thoughts", type=int, default=40)
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu", help="where the cache lives and every method runs (cpu | cuda)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if args.quick:
        args.layers, args.batch, args.prompt, args.history, args.thoughts = 4, 2, 120, 40, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    memory, obs = random_cache(
        args.layers,
        args.heads,
        args.head_dim,
        args.batch,
        args.prompt,
        args.thoughts,
        args.history,
        getattr(torch, args.dtype),
    )
    memory = memory.to(device)
    obs = Observation(obs.attention.to(device), obs.agent, obs.group_size)
    n_problems = args.layers * args.batch * args.heads
    print(
        f"cache: {args.layers} layers x {args.heads} KV heads x d={args.head_dim}, batch {args.batch}, "
        f"{memory.num_tokens} slots ({args.prompt}-token prompts, {args.thoughts} thoughts, {args.history} "
        f"history), {args.dtype}, {memory.nbytes / 2**20:.0f} MiB; budget {args.budget}; {n_problems} OBF "
        f"problems per hop; "
        + (f"torch threads {torch.get_num_threads()}" if device.type == "cpu" else torch.cuda.get_device_name(device))
    )

    b = args.budget
    # (recipe, selection kind, backfill config of its OBF solve, kernels); the recipes' default solver is "subspace";
    # "torch" runs the fast solver without the compiled CPU kernels (kernels/cpu_obf.c), its plain-torch twin
    lobf = (f"l-obf:budget={b},rank=4,solver=subspace", "l", BackfillConfig(rank=4, solver="subspace"))
    hobf = (f"h-obf:budget={b},rank=2,solver=subspace", "h", BackfillConfig(rank=2, solver="subspace"))
    methods = {
        "H": (f"h:budget={b}", None, None, "auto"),
        "L": (f"l:budget={b}", None, None, "auto"),
        "L-OBF exact": (f"l-obf:budget={b},rank=4,solver=exact", "l", BackfillConfig(rank=4, solver="exact"), "auto"),
        "L-OBF subspace": (*lobf, "auto"),
        "H-OBF subspace": (*hobf, "auto"),
    }
    if device.type == "cpu":
        methods["L-OBF subspace/torch"] = (*lobf, "torch")
        methods["H-OBF subspace/torch"] = (*hobf, "torch")
    scores = compute_scores(memory, obs)
    prompt = prompt_mask(memory, current_agent_index(memory, obs))
    selections = {"l": select_layerwise(scores, prompt, b), "h": select_headwise(scores, prompt, b)}

    # Timed in rounds: each round runs the paper's loop once, then every method's hop and OBF solve once, so that
    # each ratio compares runs made seconds apart (a shared VM drifts by 20% over minutes); the table shows medians
    # over rounds, the ratios being medians of per-round ratios. The exact solver is timed once, before the rounds.
    def hop_fn(name: str) -> Callable[[], object]:
        recipe, _, _, kernels = methods[name]

        def hop():
            with backend_override(kernels):
                return compress(memory, obs, recipe)

        return hop

    def solve_fn(name: str) -> Callable[[], object]:
        _, kind, cfg, kernels = methods[name]

        def solve():
            with backend_override(kernels):
                return orthogonal_backfill(memory, selections[kind], scores, cfg)

        return solve

    def loop_fn() -> torch.Tensor:
        return backfill_reference_loop(memory, selections["l"], scores, BackfillConfig(rank=4))

    shifts: dict[str, object] = {}
    print("timing L-OBF exact (one run) ...", flush=True)
    exact_hop, _ = timed(hop_fn("L-OBF exact"), device)
    exact_s, shifts["L-OBF exact"] = timed(solve_fn("L-OBF exact"), device)
    hops: dict[str, list[float]] = {name: [] for name in methods if name != "L-OBF exact"}
    solves: dict[str, list[float]] = {name: [] for name in hops if methods[name][2] is not None}
    loop_times: list[float] = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}: the per-head loop (paper), then every method ...", flush=True)
        t, loop_shift = timed(loop_fn, device)
        loop_times.append(t)
        for name in hops:
            hops[name].append(timed(hop_fn(name), device)[0])
            if name in solves:
                t, shifts[name] = timed(solve_fn(name), device)
                solves[name].append(t)
    loop_hops = [lh + lp for lh, lp in zip(hops["L"], loop_times, strict=True)]  # the L hop, backfilled by the loop

    def per_round(times: list[float], base: list[float]) -> list[float]:
        return [b / t for b, t in zip(base, times, strict=True)]

    # name -> (hop s, hop x, solve s, solve x, (lowest, highest) per-round solve x)
    table: dict[str, tuple] = {
        "L-OBF exact": (
            exact_hop,
            statistics.median(loop_hops) / exact_hop,
            exact_s,
            statistics.median(loop_times) / exact_s,
            None,
        )
    }
    for name, ts in hops.items():
        s = solves.get(name)
        solve_x = per_round(s, loop_times) if s else None
        table[name] = (
            statistics.median(ts),
            statistics.median(per_round(ts, loop_hops)),
            statistics.median(s) if s else None,
            statistics.median(solve_x) if s else None,
            (min(solve_x), max(solve_x)) if s else None,
        )
    table["L-OBF loop (paper)"] = (statistics.median(loop_hops), 1.0, statistics.median(loop_times), 1.0, None)
    print()
    print(
        f"{'method':<20} {'hop s':>9} {'x vs loop':>10} {'OBF solve s':>12} {'solve x vs loop':>16} "
        f"{'per-round solve x':>18}"
    )
    for name in (*methods, "L-OBF loop (paper)"):
        hop, hop_x, solve, solve_x, spread = table[name]
        solve_cols = f"{solve:>12.3f} {solve_x:>16.1f}" if solve is not None else f"{'-':>12} {'-':>16}"
        spread_col = f"{spread[0]:.1f}-{spread[1]:.1f}" if spread else "-"
        print(f"{name:<20} {hop:>9.3f} {hop_x:>10.1f} {solve_cols} {spread_col:>18}")
    print(
        f"(medians of {args.rounds} rounds; each ratio the median of per-round ratios to the loop; loop solve per "
        f"round: {', '.join(f'{t:.2f}' for t in loop_times)} s)"
    )

    def rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return (a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)

    exact = shifts["L-OBF exact"]
    applied = exact.applied
    print()
    print(f"relative |delta| difference to exact over the {int(applied.sum())} injected (layer, item, head) problems")
    print(f"  exact vs loop: max {float(rel(exact.shift, loop_shift)[applied].max()):.2e}")
    h_exact = orthogonal_backfill(memory, selections["h"], scores, BackfillConfig(rank=2, solver="exact"))
    for prefix, kind, rank, ref in (("L-OBF", "l", 4, exact), ("H-OBF", "h", 2, h_exact)):
        gap = spectral_gap(memory, selections[kind], scores, rank)
        print(f"  {prefix} (rank {rank}), by the gap sigma_{rank}/sigma_{rank + 1} of each problem's residual:")
        for name in solves:
            if not name.startswith(prefix):
                continue
            err = rel(shifts[name].shift, ref.shift)
            cells = []
            for floor in (1.0, 1.02, 1.1, 1.5):
                mask = ref.applied & (gap > floor)
                n = int(mask.sum())
                cells.append(f"gap>{floor:g} ({n}): " + (f"max {float(err[mask].max()):.1e}" if n else "-"))
            median = float(err[ref.applied].median())
            print(f"    {name.split(' ', 1)[1]:<14} median {median:.1e} | " + " | ".join(cells))
    print(f"  OBF diagnostics (L-OBF subspace): {shifts['L-OBF subspace'].diagnostics()}")


if __name__ == "__main__":
    main()
