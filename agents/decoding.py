"""Text decoding for the final agent (judger / summarizer) and text-relay agents: greedy by default,
optional temperature / top-p sampling, max new tokens, end-of-sequence ids and stop strings. The settings are
:class:`~latent_relay.relay.decode_config.DecodeConfig` (a node setting of the graph)."""

from __future__ import annotations

import torch

from latent_relay.relay.decode_config import DecodeConfig


class TokenPicker:
    """Chooses next tokens for a batch and tracks which items finished (EOS, stop string, or length)."""

    def __init__(self, config: DecodeConfig, tokenizer, batch_size: int, eos_ids: set[int]):
        self.config = config
        self.tokenizer = tokenizer
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.finished = torch.zeros(batch_size, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(config.seed)

    def pick(self, logits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
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
            token = torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)
        self.finished = self.finished.to(token.device)
        for b in range(token.shape[0]):
            if not bool(alive[b]):
                continue
            t = int(token[b])
            if self.eos.numel() and t in self.eos.tolist():
                self.finished[b] = True
                continue
            self.tokens[b].append(t)
            if self.config.stop and self.tokenizer is not None:
                tail = self.tokenizer.decode(self.tokens[b][-32:], skip_special_tokens=True)
                if any(s in tail for s in self.config.stop):
                    self.finished[b] = True
        return token

    def texts(self) -> list[str]:
        if self.tokenizer is None:
            return [" ".join(map(str, t)) for t in self.tokens]
        out = []
        for toks in self.tokens:
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            for s in self.config.stop:
                if s in text:
                    text = text[: text.index(s) + len(s)]
            out.append(text)
        return out

    def counts(self) -> list[int]:
        return [len(t) for t in self.tokens]
