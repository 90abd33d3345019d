"""The phases of one agent step timed from inside it: every forward of :meth:`ModelRunner.step` is stamped, so a
single step gives its prefill, its latent-thought steps and its decoding steps without subtracting one run's time
from another's.

- prefill: the prompt's forward alone (all items at once);
- a thought step: from one thought forward's start to the next forward's start (the forward, the output head over
  the last position and the next latent input embedding);
- a decoding step: from one decoding forward's start to the next (the forward, the output head and the token pick);
  the last one ends when the step returns.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from latent_relay.agents.decoding import DecodeConfig
from latent_relay.agents.runner import ModelRunner


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one step's phases: the prefill, and the mean thought and decoding step (0.0 where it had none)."""

    prefill: float
    thought: float
    decode: float


@contextmanager
def stamped_forwards(runner: ModelRunner):
    """Within the block, ``runner``'s forwards append their start and end times to the yielded list."""
    stamps: list[tuple[float, float]] = []
    plain = runner._forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = plain(*args, **kwargs)
        stamps.append((start, time.perf_counter()))
        return out

    runner._forward = timed
    try:
        yield stamps
    finally:
        del runner._forward  # the instance attribute goes; the class's method is back


def random_prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``length`` token ids, drawn from ids every bundled tokenizer has."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 5000, (length,), generator=gen).tolist() for _ in range(batch)]


def time_step(runner: ModelRunner, prompts: list[list[int]], thoughts: int, tokens: int) -> StepTimes:
    """One step: prefill ``prompts``, ``thoughts`` latent thoughts (no observation, as plain latent relay runs them),
    then ``tokens`` greedy tokens with end of sequence ignored (``tokens`` >= 2 for a decoding time)."""
    runner._eos_ids = set  # decode every token: random prompts may otherwise stop at EOS early
    decode = DecodeConfig(max_new_tokens=tokens, stop_at_answer=False) if tokens > 0 else None
    with stamped_forwards(runner) as stamps:
        runner.step([None] * len(prompts), prompts, "a", thoughts=thoughts, decode=decode, observe=False)
        end = time.perf_counter()
    starts = [s for s, _ in stamps] + [end]
    prefill = stamps[0][1] - stamps[0][0]
    thought_steps = [starts[i + 1] - starts[i] for i in range(1, 1 + thoughts)]
    decode_steps = [starts[i + 1] - starts[i] for i in range(1 + thoughts, len(stamps))]
    return StepTimes(prefill, _mean(thought_steps), _mean(decode_steps))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
