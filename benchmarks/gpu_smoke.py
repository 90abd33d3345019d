"""GPU smoke benchmark: text against latent against compressed relay on a random model shaped like Qwen3-4B.

The sequential graph (planner -> critic -> refiner -> judger) of LatentMAS (arXiv 2511.20639) runs through the local
runtime under text relay, full latent relay and compressed latent relay (Orthogonal Backfill, arXiv 2604.13349, and
KIVI-style key/value quantization, arXiv 2402.02750), on one batch of synthetic items, and one table reports per
mode: seconds per problem, output tokens, relay bytes per problem (and their ratio to full latent relay), speed-up
against text relay, and the compression overhead (the hops' own seconds per problem, and their share of its time).

The model is randomly initialised from Qwen3-4B's configuration, in memory: no weights, no download, no tokenizer
(a word-per-token stand-in maps ``t<id>`` words to token ids and back). Its answers are noise, so accuracy means
nothing here: this measures time and bytes only. A random model never stops by itself, so token counts are fixed:
every question is exactly ``--prompt-tokens`` tokens, no token id ends a sequence, and every decoding agent decodes
exactly ``--max-new-tokens`` tokens (text relay: all four agents; latent relay: the judger only).

    python -m latent_relay.benchmarks.gpu_smoke                   # Qwen3-4B shape, cuda, bf16: 3-5 minutes (estimated)
    python -m latent_relay.benchmarks.gpu_smoke --layers 8        # a shallower model, same width
    python -m latent_relay.benchmarks.gpu_smoke --quick           # a tiny model, seconds (on a CPU too)

Time of the default run (an estimate from FLOPs and bytes, not a measurement): 8 items, 200-token questions, 10
thoughts per agent, 128 new tokens, one warm-up and 3 timed rounds of the 4 modes. The model has about 4.0e9
parameters (36 layers of 0.10e9 plus the tied 0.39e9 embedding), so a token costs about 8 GFLOP. Prefill is
negligible: one agent's prompts are about 8 x 230 tokens = 15 TFLOP, well under 0.1 s at a few hundred TFLOP/s.
Decoding a batch of 8 is far from FLOP-bound: a forward reads the 8 GB of bf16 weights (2.4 ms at the H100's
3.35 TB/s; a soft thought also reads the 1.6 GB fp32 copy of the embedding), but transformers' eager decoder
launches some 50 small kernels per layer, about 1,800 per forward, so a forward takes roughly 25-30 ms, bound by
launches. Text relay runs 4 x 128 forwards (about 14 s a round), latent relay 30 thoughts plus 128 tokens (about
5 s), each compressed mode about as much plus its thoughts' eager attention and three compressed hops (about 6 s):
about 30 s a round, 2 minutes for 4 rounds, about 3 minutes with imports, CUDA start-up and building the model;
5 minutes if a forward is twice as slow as guessed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from latent_relay.agents.fingerprint import model_fingerprint
from latent_relay.agents.models import LoadedModel, default_dtype, summarize_config
from latent_relay.agents.runner import ModelRunner
from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import GraphError, sequential
from latent_relay.relay.runtime.local import LocalRuntime
from latent_relay.relay.runtime.node import NodeExecutor

#: Qwen3-4B's configuration (its config.json), what the model is built from.
QWEN3_4B = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 40960,
}
#: ``--quick``: a tiny model of the same kind, for a CPU smoke test in seconds.
TINY = {
    **QWEN3_4B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
}
RECIPES = ("latent+h-obf:budget=64+int8", "latent+l-obf:budget=32+int4")
# option -> (default, --quick default)
DEFAULTS = {
    "items": (8, 2),
    "repeats": (3, 1),
    "prompt_tokens": (200, 80),
    "latent_steps": (10, 3),
    "max_new_tokens": (128, 8),
}


class WordTokenizer:
    """A tokenizer stand-in with exact round trips: one token per word, ``t<id>`` is token ``id`` (other words hash
    to an id), and decoding writes ``t<id>`` words. So text relay hands on exactly the tokens an agent decoded
    (bytes of random ids would not survive UTF-8 decoding as the same number of tokens)."""

    chat_template = None
    pad_token_id = None
    eos_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _id(self, word: str) -> int:
        if word[:1] == "t" and word[1:].isdigit():
            return int(word[1:]) % self.vocab_size
        return zlib.crc32(word.encode()) % self.vocab_size

    def __call__(self, text: str) -> dict:
        return {"input_ids": [self._id(w) for w in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{int(i)}" for i in ids)


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    gold: str = ""


class SyntheticTask:
    """Items of random token ids; a random model's answers are never scored as right."""

    name = "synthetic"
    answer_format = "End with: The answer is <number>."

    def score(self, item: Item, text: str) -> bool:
        return False


def synthetic_items(n: int, tokens: int, vocab_size: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    return [Item(f"s{i}", " ".join(f"t{rng.randrange(vocab_size)}" for _ in range(tokens))) for i in range(n)]


def random_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """A randomly initialised Qwen3 model of ``config``, built directly on ``device`` in ``dtype``, that never ends
    a sequence by itself (no end-of-sequence ids)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**config), dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # decoding stops at --max-new-tokens only
    fingerprint = model_fingerprint(model, None)
    return LoadedModel(f"random-qwen3-seed{seed}", model, None, fingerprint, summarize_config(model), "random")


@dataclass
class ModeRun:
    seconds: list[float]  # per problem, one per repeat
    tokens: float  # output tokens per problem
    relay_bytes: float  # per problem
    compress_seconds: list[float]  # per problem, one per repeat


def run_mode(runtime: LocalRuntime, task, items: list[Item], mode: str, latent_steps: int, device) -> tuple:
    """One batch of ``items`` under ``mode``: (wall seconds per problem, records); a failed batch raises."""
    graph = sequential(mode, latent_steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _=None: None)
    sync(device)
    start = time.perf_counter()
    records = runtime.run(graph, task, items, mode, batch_size=len(items))
    sync(device)
    seconds = (time.perf_counter() - start) / len(items)
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{mode}: {failed[0]}")
    return seconds, records


def table(runs: dict[str, ModeRun]) -> list[str]:
    text_s = statistics.median(runs["text"].seconds)
    latent_bytes = runs["latent"].relay_bytes
    w = max(len(mode) for mode in runs)
    head = (
        f"{'mode':<{w}} {'s/problem':>10} {'min-max':>15} {'vs text':>8} {'out tok':>8} {'relay bytes':>12} "
        f"{'/ latent':>9} {'compress s':>11} {'share':>7}"
    )
    lines = [head, "-" * len(head)]
    for mode, run in runs.items():
        s = statistics.median(run.seconds)
        spread = f"{min(run.seconds):.3f}-{max(run.seconds):.3f}"
        if mode in ("text", "latent"):
            comp = f"{'-':>11} {'-':>7}"
        else:
            c = statistics.median(run.compress_seconds)
            comp = f"{c:>11.4f} {c / s:>7.1%}"
        lines.append(
            f"{mode:<{w}} {s:>10.3f} {spread:>15} {text_s / s:>7.2f}x {run.tokens:>8.0f} {run.relay_bytes:>12,.0f} "
            f"{run.relay_bytes / latent_bytes:>9.3f} {comp}"
        )
    return lines


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if torch sees one, else cpu)")
    ap.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto", help="auto: bf16 on a GPU"
    )
    ap.add_argument("--items", type=int, help="items in the batch (8; --quick 2)")
    ap.add_argument("--repeats", type=int, help="timed batches per mode after one warm-up batch (3; --quick 1)")
    ap.add_argument("--prompt-tokens", type=int, help="tokens of every question (200; --quick 80)")
    ap.add_argument("--latent-steps", type=int, help="latent thoughts per agent (10; --quick 3)")
    ap.add_argument("--max-new-tokens", type=int, help="tokens every decoding agent decodes (128; --quick 8)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"compressed modes (default: {RECIPES})")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers (36; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="a tiny Qwen3 (2 layers, hidden 64, vocab 256), few tokens")
    ap.add_argument("--out", type=Path, help="also write the header and table to this file")
    args = ap.parse_args(argv)

    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in ("items", "repeats", "prompt_tokens", "latent_steps", "max_new_tokens", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        fail(f"--device {args.device}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA device(s) here")
    if device.type not in ("cuda", "cpu"):
        fail(f"--device {args.device}: use cuda or cpu")
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    modes = ["text", "latent", *args.recipes]
    for mode in modes[2:]:
        try:
            if not mode.startswith("latent+"):
                raise GraphError(f"{mode!r} is not a compressed mode latent+<recipe>")
            sequential(mode, args.latent_steps)
        except GraphError as err:
            fail(f"--recipes: {err}")
    if len(set(modes)) != len(modes):
        fail("--recipes: a mode is listed twice")

    config = dict(TINY if args.quick else QWEN3_4B)
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    print(f"building a random Qwen3 ({config['num_hidden_layers']} layers) on {device} ...", flush=True)
    loaded = random_model(config, device, dtype)
    tokenizer = WordTokenizer(config["vocab_size"])
    runner = ModelRunner.from_loaded(loaded, tokenizer=tokenizer)
    assert not runner._eos_ids(), "a random model must not stop by itself"
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens, stop_at_answer=False)
    runtime = LocalRuntime(NodeExecutor(runner, decode), model_name=loaded.name)
    task = SyntheticTask()
    items = synthetic_items(args.items, args.prompt_tokens, config["vocab_size"])

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    c, params = config, loaded.config_summary["num_parameters"]
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    header = (
        f"{where}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}; random Qwen3 "
        f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads x {c['head_dim']}, vocab {c['vocab_size']} "
        f"({size} params); {args.items} items x {args.prompt_tokens} "
        f"question tokens, {args.latent_steps} thoughts/agent, {args.max_new_tokens} new tokens/decoding agent; "
        f"median of {args.repeats} after 1 warm-up"
    )
    print(header, flush=True)

    runs: dict[str, ModeRun] = {}
    for r in range(args.repeats + 1):  # rounds over every mode, so each mode's repeats meet the same drift
        label = "warm-up" if r == 0 else f"repeat {r}/{args.repeats}"
        print(f"{label}: {', '.join(modes)} ...", flush=True)
        for mode in modes:
            try:
                seconds, records = run_mode(runtime, task, items, mode, args.latent_steps, device)
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(1)
            if r == 0:
                continue
            n = len(records)
            compress = sum(sum(m.get("seconds", 0.0) for m in rec.edge_metrics.values()) for rec in records) / n
            run = runs.setdefault(mode, ModeRun([], 0.0, 0.0, []))
            run.seconds.append(seconds)
            run.compress_seconds.append(compress)
            run.tokens = sum(rec.output_tokens for rec in records) / n
            run.relay_bytes = sum(rec.relay_bytes for rec in records) / n

    lines = ["", header, *table(runs)]
    lines.append(
        "s/problem: wall seconds of the batch / items (median; min-max over repeats); vs text: text's s/problem / "
        "this one's; relay bytes: wire bytes of the 3 hand-overs per problem; compress s: the hops' own seconds per "
        "problem, share: of s/problem"
    )
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines[1:]) + "\n")


if __name__ == "__main__":
    main()
