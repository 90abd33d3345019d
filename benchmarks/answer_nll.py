"""Fidelity of a weight setting: the negative log-likelihood a model gives GSM8K's reference solutions, teacher
forced after the single agent's prompt (role, problem, the task's answer format, in the chat template).

The reference is the data's ``answer`` written as the prompt asks: calculator annotations (``<<48/2=24>>``) taken
out and the ``#### N`` line written as ``So the final answer is \\boxed{N}.``. Settings are compared item by item
against float32 (a paired difference with a bootstrap interval over items), and by how often the most likely
token at each reference position is float32's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latent_relay.agents.prompts import agent_message, chat_ids
from latent_relay.agents.runner import ModelRunner
from latent_relay.tasks.registry import get_task

_ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class ReferenceItem:
    prompt: list[int]
    answer: list[int]


@dataclass(frozen=True)
class AnswerScore:
    """One item under one setting: the summed NLL of its reference tokens, their count, and the model's most
    likely token at each reference position."""

    nll: float
    tokens: int
    top1: torch.Tensor

    @property
    def per_token(self) -> float:
        return self.nll / self.tokens


def written_solution(solution: str) -> str:
    """A GSM8K solution as the single agent's prompt asks for it (see the module docstring)."""
    work, answer = solution.rsplit("####", 1)
    return f"{_ANNOTATION.sub('', work).strip()}\nSo the final answer is \\boxed{{{answer.strip()}}}."


def reference_items(tokenizer, n: int, data_dir=None) -> list[ReferenceItem]:
    """The first ``n`` GSM8K test items as (prompt ids, reference answer ids)."""
    task = get_task("gsm8k")
    out = []
    for item in task.load(n, data_dir):
        message = agent_message("solver", item.question, answer_format=task.answer_format)
        answer = tokenizer(written_solution(item.raw["answer"]), add_special_tokens=False)["input_ids"]
        out.append(ReferenceItem(chat_ids(tokenizer, message), list(answer)))
    return out


def score_answers(runner: ModelRunner, items: Sequence[ReferenceItem], chunk: int = 4) -> list[AnswerScore]:
    """Each item's :class:`AnswerScore` under ``runner``'s model, ``chunk`` items per forward."""
    scores = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        rows = runner.continuation_logprobs([None] * len(part), [i.prompt for i in part], [i.answer for i in part], "a")
        for item, logprobs in zip(part, rows, strict=True):
            target = torch.tensor(item.answer)
            nll = -logprobs.gather(1, target[:, None]).sum().item()
            scores.append(AnswerScore(nll, len(item.answer), logprobs.argmax(-1)))
    return scores


def mean_per_token(scores: Sequence[AnswerScore]) -> float:
    """NLL per token over all items' reference tokens together."""
    return sum(s.nll for s in scores) / sum(s.tokens for s in scores)


def top1_agreement(scores: Sequence[AnswerScore], base: Sequence[AnswerScore]) -> float:
    """Share of reference positions where the most likely token is the same as under ``base``."""
    same = sum(int((s.top1 == b.top1).sum()) for s, b in zip(scores, base, strict=True))
    return same / sum(s.tokens for s in scores)


def paired_difference(
    scores: Sequence[AnswerScore], base: Sequence[AnswerScore], resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over items of (per-token NLL - base's), and its 95% bootstrap interval (items resampled)."""
    diffs = [s.per_token - b.per_token for s, b in zip(scores, base, strict=True)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    return sum(diffs) / n, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]
