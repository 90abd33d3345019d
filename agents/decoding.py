"""Text decoding for the final agent (judger / summarizer) and text-relay agents: greedy by default,
optional temperature / top-p sampling, max new tokens, end-of-sequence ids, stop strings and the task's answer
stop. The settings are :class:`~latent_relay.relay.decode_config.DecodeConfig` (a node setting of the graph); the
answer stop is an :class:`~latent_relay.relay.decode_config.AnswerStop` the runtime hands to the final node.

The picker sees only the rows of the items still decoding (finished items leave the batch, see
:mod:`latent_relay.agents.decode_rows`), so each item samples from a random stream of its own, seeded by the
config's seed and the item's place in the batch: what an item draws never depends on which others still run."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from latent_relay.relay.decode_config import AnswerStop, DecodeConfig

__all__ = ["AnswerStop", "DecodeConfig", "TokenPicker", "item_seed"]


def item_seed(seed: int, item: int) -> int:
    """The seed of item ``item``'s random stream under the config's ``seed``."""
    return (seed * 1_000_003 + item) % (1 << 63)


class TokenPicker:
    """Chooses next tokens for the items still decoding and tracks which finished (EOS, stop string, a complete
    answer, or length)."""

    def __init__(
        self,
        config: DecodeConfig,
        tokenizer,
        batch_size: int,
        eos_ids: set[int],
        answer_stop: AnswerStop | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.answer_stop = answer_stop if config.stop_at_answer else None
        self.answer_checks = 0  # times the answer rule ran (its cost is measured per token in tests/benchmarks)
        self._triggers: dict[int, bool] = {}  # token id -> whether its text holds one of the rule's triggers
        self.generators = None
        if not config.greedy:
            self.generators = [torch.Generator().manual_seed(item_seed(config.seed, b)) for b in range(batch_size)]

    @property
    def finished(self) -> torch.Tensor:
        """Bool ``[batch]``: the items that stopped."""
        return torch.tensor(self.done, dtype=torch.bool)

    def pick(self, logits: torch.Tensor, items: Sequence[int] | None = None) -> torch.Tensor:
        """The next token of each row of ``logits`` ``[rows, V]``; row ``i`` belongs to item ``items[i]`` (every
        item in order when None), which must still be decoding."""
        items = range(logits.shape[0]) if items is None else items
        logits = logits.float()
        if self.config.greedy:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / self.config.temperature, dim=-1)
            if self.config.top_p < 1.0:
                sorted_p, order = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > self.config.top_p
                sorted_p = sorted_p.masked_fill(drop, 0)
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs.cpu()
            draws = [torch.multinomial(probs[i], 1, generator=self.generators[b]) for i, b in enumerate(items)]
            token = torch.cat(draws).to(logits.device)
        for b, t in zip(items, token.tolist(), strict=True):
            if t in self.eos:
                self.done[b] = True
                continue
            self.tokens[b].append(t)
            if self.config.stop and self.tokenizer is not None:
                tail = self.tokenizer.decode(self.tokens[b][-32:], skip_special_tokens=True)
                if any(s in tail for s in self.config.stop):
                    self.done[b] = True
            if self.answer_stop is not None and not self.done[b] and self._answer_complete(b, t):
                self.done[b] = True
        return token

    def _answer_complete(self, b: int, token: int) -> bool:
        """Whether item ``b``'s text is a complete answer; asked only when ``token`` holds one of the triggers."""
        triggers = self.answer_stop.triggers
        if triggers:
            hit = self._triggers.get(token)
            if hit is None:
                piece = self._text([token])
                hit = self._triggers[token] = any(c in piece for c in triggers)
            if not hit:
                return False
        self.answer_checks += 1
        return self.answer_stop(self._text(self.tokens[b]))

    def _text(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def texts(self) -> list[str]:
        if self.tokenizer is None:
            return [self._text(t) for t in self.tokens]
        out = []
        for toks in self.tokens:
            text = self._text(toks)
            for s in self.config.stop:
                if s in text:
                    text = text[: text.index(s) + len(s)]
            out.append(text)
        return out

    def counts(self) -> list[int]:
        return [len(t) for t in self.tokens]
