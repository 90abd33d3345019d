"""Step deadlines of the Ray runtime: how long one node step may run on its host before the host counts as hung.

A running forward cannot be interrupted, so a host that misses a deadline is restarted (its batch is retried, or
failed once it has no retries left). Every step has a deadline:

- with a user's ``timeout`` (``--timeout S``: seconds a batch may spend running on hosts), the batch's time left;
- otherwise one derived from the step's work, generous enough that a slow but working host never misses it::

      work   = question bytes + items * (PROMPT_OVERHEAD + latent steps + max_new_tokens if it decodes
                                        + answer format bytes if it is the final node)
               + the tokens its parents generated
      budget = max(min_seconds, work / min_tokens_per_second, SLACK * work / slowest rate measured on the host)

  The estimate is meant to be high: a byte of text counts as a token (a tokenizer's tokens are a byte or more of
  text), and every token is charged at the rate of generating one, though a prompt is processed many tokens per
  forward. ``min_seconds`` (default 300 s) covers a host's first step, which may compile kernels.
  ``min_tokens_per_second`` (default 1) is the throughput floor assumed before anything is measured; each
  finished step measures its host's rate (work / the step's seconds on the host), and the slowest rate seen,
  ``SLACK`` times over, can only lengthen a deadline, never shorten it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from latent_relay.relay.graph import AgentGraph

PROMPT_OVERHEAD = 512  # tokens of role instructions, chat template and parents' section labels, per item
SLACK = 10.0  # a step may take this many times the slowest step its host has run, per token, before it is late
DEFAULT_MAX_NEW_TOKENS = 256  # DecodeConfig's default


@dataclass
class StepDeadlines:
    """Budgets (seconds) for node steps; ``decode`` is the runtime's default decoding (for ``max_new_tokens``)."""

    decode: Any = None
    min_seconds: float = 300.0
    min_tokens_per_second: float = 1.0
    slowest: dict[str, float] = field(default_factory=dict)  # host name -> slowest tokens/s measured there

    def __post_init__(self) -> None:
        if not self.min_seconds > 0:
            raise ValueError(f"min_seconds must be positive, got {self.min_seconds}")
        if not self.min_tokens_per_second > 0:
            raise ValueError(f"min_tokens_per_second must be positive, got {self.min_tokens_per_second}")

    def work(
        self, graph: AgentGraph, node: str, questions: Sequence[str], answer_format: str, parent_tokens: int = 0
    ) -> int:
        """A high estimate of the tokens node ``node`` processes and generates for a batch of ``questions``;
        ``parent_tokens``: the text its parents generated for the batch (all items together)."""
        per_item = PROMPT_OVERHEAD + graph.thinks(node)
        if node == graph.final:
            per_item += len(answer_format.encode("utf-8"))
        if graph.decodes(node):
            decode = graph.node(node).decoding or self.decode
            per_item += getattr(decode, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        prompts = sum(len(q.encode("utf-8")) for q in questions)
        return prompts + per_item * len(questions) + parent_tokens

    def budget(self, host: str, work: int) -> float:
        """Seconds a step of ``work`` tokens may run on ``host``."""
        budget = max(self.min_seconds, work / self.min_tokens_per_second)
        rate = self.slowest.get(host)
        if rate:
            budget = max(budget, SLACK * work / rate)
        return budget

    def observe(self, host: str, work: int, seconds: float) -> None:
        """A step of ``work`` tokens took ``seconds`` on ``host``."""
        if work > 0 and seconds > 0:
            rate = work / seconds
            self.slowest[host] = min(rate, self.slowest.get(host, rate))
