"""One agent step on a shared model: prefill on received memory -> latent thoughts -> (optional) decoding.

This is the agent loop of LatentMAS (arXiv 2511.20639, METHODS.md §1): the agent's role prompt is prefilled *on
top of* the working memory it received (new positions continue after the largest original position; gaps left
by eviction are fine because cached keys are post-RoPE), then ``m`` latent thoughts feed a continuous input
embedding back instead of a sampled token, and the attention rows of those thoughts are recorded as the
observation that compression scores tokens with (arXiv 2604.13349 §2). The final agent decodes text.

Batches of items share one forward: per-item memories are left-padded into one batch and every forward gets an
explicit 4D additive mask (padding masked for every query, causal inside the new chunk) and explicit position
ids, so padding never leaks into attention; hand-overs are split back per item without padding. While decoding,
an item that finished (end of sequence, a stop string, its task's complete answer) leaves the batch
(:mod:`latent_relay.agents.decode_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch

from latent_relay.agents.cache import read_back, to_cache
from latent_relay.agents.decode_rows import DecodeRows
from latent_relay.agents.decoding import AnswerStop, DecodeConfig, TokenPicker
from latent_relay.agents.latent import LatentInput
from latent_relay.agents.weights import linear_weight
from latent_relay.relay.batch import split_items, split_observation, stack_items
from latent_relay.relay.memory import KVState, Segment, check_same_model
from latent_relay.relay.observation import Observation

SINK_TOKENS = 4


class PromptTooLongError(ValueError):
    """Memory plus prompt plus the tokens to generate would exceed the model's context window."""


@dataclass
class AgentOutput:
    """What one agent step produced: the batch's memory and observation, padded as the step left them (for
    compressing the batch at once), per-item texts and token counts, and per-item memories and observations without
    padding (split from the batch on first use)."""

    batch_memory: KVState
    batch_observation: Observation | None
    texts: list[str] | None
    output_tokens: list[int]

    @cached_property
    def memories(self) -> list[KVState]:
        return split_items(self.batch_memory)

    @cached_property
    def observations(self) -> list[Observation] | None:
        return split_observation(self.batch_observation, self.batch_memory)


class ModelRunner:
    """Runs agent steps for one loaded model (weights shared by every agent placed on it)."""

    def __init__(self, model, tokenizer=None, fingerprint: str = "", latent: LatentInput | None = None):
        """A runner for ``model`` (a tiny or hand-built one; a loaded model: :meth:`from_loaded`)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.latent = latent or LatentInput()
        self.config = model.config.get_text_config()
        self.num_layers = self.config.num_hidden_layers
        self.num_kv_heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        self.head_dim = (
            getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        )
        self.group_size = self.config.num_attention_heads // self.num_kv_heads
        self.max_positions = getattr(self.config, "max_position_embeddings", None) or 1 << 30
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.lm_head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.pad_id = self._pad_id()

    @classmethod
    def from_loaded(cls, loaded, *, tokenizer=None, latent: LatentInput | None = None) -> ModelRunner:
        """The runner of a loaded model (:class:`latent_relay.agents.models.LoadedModel`): its weights, its tokenizer
        (or ``tokenizer``, e.g. a stand-in for a tiny model) and its fingerprint."""
        return cls(loaded.model, loaded.tokenizer if tokenizer is None else tokenizer, loaded.fingerprint, latent)

    def output_projections(self) -> list[torch.Tensor]:
        """Every layer's attention output projection ``W_o`` (``[hidden, heads * head_dim]``), for value-aware
        scoring with ``value=wo`` (arXiv 2605.08234). Read from ``self_attn.o_proj`` of each decoder layer, as in
        the Llama, Qwen2 and Qwen3 model classes of transformers."""
        layers = getattr(self.decoder, "layers", None)
        o_projs = [getattr(getattr(layer, "self_attn", None), "o_proj", None) for layer in (layers or [])]
        weights = [None if o is None else linear_weight(o) for o in o_projs]  # dequantized where quantized
        if len(weights) != self.num_layers or any(w is None for w in weights):
            raise ValueError(
                f"value=wo needs each decoder layer's self_attn.o_proj, which {type(self.model).__name__} does not "
                "have; score with value=none, l1 or l2 instead"
            )
        return [w.detach() for w in weights]

    # ------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(
        self,
        memories: Sequence[KVState | None],
        prompts: Sequence[Sequence[int]],
        agent: str,
        thoughts: int = 0,
        decode: DecodeConfig | None = None,
        observe: bool = True,
        answer_stop: AnswerStop | None = None,
    ) -> AgentOutput:
        """Prefill ``prompts`` (token ids, one list per item) on ``memories``, think, and optionally decode; with
        ``answer_stop`` (the task's rule, for the final agent) an item stops as soon as its answer is complete,
        unless ``decode.stop_at_answer`` is off."""
        memory = self._stack(memories)
        self._check_length(memory, prompts, thoughts, decode)
        memory, idx = memory.agent_index(agent)
        cache = to_cache(memory)  # grown in place by every forward below; the memory's tensors track it

        # 1. prefill the role prompt on top of the received memory
        ids, valid = self._left_pad(prompts)
        first_agent = memory.num_tokens == 0 or not bool(memory.valid.any())
        segment = torch.full_like(ids, int(Segment.PROMPT))
        if first_agent:  # the attention sink: first tokens of the first agent, kept once per rollout
            lengths = valid.sum(1, keepdim=True)
            rank = valid.cumsum(1) - 1
            segment = torch.where(valid & (rank < torch.clamp(lengths, max=SINK_TOKENS)), int(Segment.SINK), segment)
        memory, hidden, _ = self._forward(memory, cache, self.embed(ids), valid, segment, idx)
        logits = self.lm_head(hidden)

        # 2. latent thoughts: feed a continuous embedding back, record where each thought looked
        observation = None
        if thoughts > 0:
            rows = []
            with self._eager_attention(observe):
                for _ in range(thoughts):
                    embedding = self.latent.next_embedding(hidden, logits, self.embed.weight, self.lm_head)
                    ones = torch.ones(memory.batch_size, 1, dtype=torch.bool, device=self.device)
                    thought = torch.full_like(ones, int(Segment.THOUGHT), dtype=torch.long)
                    memory, hidden, attn = self._forward(memory, cache, embedding[:, None], ones, thought, idx, observe)
                    logits = self.lm_head(hidden)
                    rows.append(attn)
            if observe:
                observation = self._observation(rows, memory.num_tokens, agent)

        # 3. the final agent (or a text-relay agent) decodes text
        texts, counts = None, [0] * memory.batch_size
        if decode is not None:
            memory, texts, counts = self._decode(memory, cache, logits, decode, idx, answer_stop)

        return AgentOutput(memory, observation, texts, counts)

    @torch.inference_mode()
    def continuation_logprobs(
        self,
        memories: Sequence[KVState | None],
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        agent: str,
    ) -> list[torch.Tensor]:
        """Teacher forcing: prefill ``prompts[b] + continuations[b]`` on ``memories[b]`` (as agent ``agent``) and
        return, per item, the log-probabilities over the vocabulary at each continuation token, ``[len(c), V]``
        float32 (row ``j`` is the distribution the model gives token ``j``, before seeing it)."""
        if any(len(c) == 0 for c in continuations):
            raise ValueError("every continuation needs at least one token")
        memory = self._stack(memories)
        seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
        self._check_length(memory, seqs, 0, None)
        memory, idx = memory.agent_index(agent)
        ids, valid = self._left_pad(seqs)
        segment = torch.full_like(ids, int(Segment.PROMPT))
        cache = to_cache(memory)
        _, hidden, _ = self._forward(memory, cache, self.embed(ids), valid, segment, idx, all_positions=True)
        width = ids.shape[1]
        out = []
        for b, c in enumerate(continuations):  # sequences are right-aligned; position t predicts token t + 1
            rows = hidden[b, width - len(c) - 1 : width - 1]
            out.append(torch.log_softmax(self.lm_head(rows).float(), dim=-1))
        return out

    # -------------------------------------------------------------- pieces
    def _forward(self, memory, cache, embeds, valid, segment, agent_idx, observe=False, all_positions=False):
        """One forward of new positions on ``memory`` (whose tensors live in ``cache``); returns the grown memory,
        the last hidden state (every new position's with ``all_positions``) and, when observing, the new position's
        attention rows ``[B, L, H_kv, T]``."""
        b, q = valid.shape
        start = memory.next_position().to(self.device)
        offset = (valid.cumsum(1) - 1).clamp(min=0)
        position = torch.where(valid, start[:, None] + offset, torch.zeros_like(offset))
        past_valid = memory.valid.to(self.device)
        allowed = torch.cat([past_valid[:, None, :].expand(b, q, -1), valid[:, None, :].expand(b, q, q)], dim=2)
        causal = torch.ones(q, q, dtype=torch.bool, device=self.device).tril()
        allowed[:, :, memory.num_tokens :] &= causal
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]
        out = self.decoder(
            inputs_embeds=embeds.to(self.dtype),
            attention_mask=mask,
            position_ids=position,
            cache=cache,
            use_cache=True,
            output_attentions=observe,
        )
        table_agent = torch.where(valid, agent_idx, -1)
        table_segment = torch.where(valid, segment, int(Segment.PAD))
        grown = read_back(memory, cache, table_segment, table_agent, position)
        if not bool(valid.all()):  # new padded slots hold finite garbage: zero them so nothing of it travels
            pad = ~valid[:, None, :, None]  # only the q new slots: older ones were zeroed when they were new
            for k, v in zip(grown.keys, grown.values):
                k[:, :, -q:].masked_fill_(pad, 0)
                v[:, :, -q:].masked_fill_(pad, 0)
        hidden = out.last_hidden_state if all_positions else out.last_hidden_state[:, -1]
        attn = None
        if observe:
            attn = torch.stack([a[:, :, -1].float() for a in out.attentions], dim=1)  # [B, L, H, T]
            attn = attn.view(b, self.num_layers, self.num_kv_heads, self.group_size, -1).mean(3)
        return grown, hidden, attn

    def _observation(self, rows, num_tokens, agent) -> Observation:
        padded = [torch.nn.functional.pad(r, (0, num_tokens - r.shape[-1])) for r in rows]
        return Observation(torch.stack(padded, dim=3), agent, self.group_size)

    def _decode(self, memory, cache, logits, config: DecodeConfig, agent_idx, answer_stop: AnswerStop | None):
        """Decode every item until it finishes; a finished item leaves the batch, so later forwards run only on
        the others and its memory stays as it was when it finished (:mod:`latent_relay.agents.decode_rows`)."""
        picker = TokenPicker(config, self.tokenizer, memory.batch_size, self._eos_ids(), answer_stop)
        rows = DecodeRows(memory.batch_size)
        for step in range(config.max_new_tokens):
            token = picker.pick(logits, rows.items)
            if all(picker.done[item] for item in rows.items) or step == config.max_new_tokens - 1:
                break  # the last token needs no forward: nothing reads its logits
            memory, keep = rows.leave(memory, picker.done)
            if len(keep) < token.shape[0]:
                cache = to_cache(memory)  # the model's cache of the remaining rows only
                token = token[torch.tensor(keep, device=token.device)]
            ones = torch.ones(len(keep), 1, dtype=torch.bool, device=self.device)
            text = torch.full((len(keep), 1), int(Segment.TEXT), device=self.device)
            memory, hidden, _ = self._forward(memory, cache, self.embed(token[:, None]), ones, text, agent_idx)
            logits = self.lm_head(hidden)
        return rows.whole(memory), picker.texts(), picker.counts()

    # ------------------------------------------------------------- helpers
    def _stack(self, memories: Sequence[KVState | None]) -> KVState:
        parts = []
        for m in memories:
            if m is None:
                m = KVState.empty(1, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device)
                m.fingerprint = self.fingerprint
            else:
                check_same_model(self.fingerprint, m.fingerprint)
            parts.append(m.to(self.device, self.dtype))
        memory = stack_items(parts)
        memory.fingerprint = self.fingerprint
        return memory

    def _left_pad(self, prompts: Sequence[Sequence[int]]):
        width = max(len(p) for p in prompts)
        if width == 0:
            raise ValueError("every agent needs a non-empty prompt")
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"item {i} has an empty prompt")
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            valid[i, width - len(p) :] = True
        return ids, valid

    def _check_length(self, memory, prompts, thoughts, decode):
        need = int(memory.next_position().max()) + max(len(p) for p in prompts) + thoughts
        need += decode.max_new_tokens if decode is not None else 0
        if need > self.max_positions:
            raise PromptTooLongError(
                f"memory + prompt + {thoughts} thoughts + generation need {need} positions; the model has "
                f"{self.max_positions} (shorten the prompt, lower --latent-steps or max tokens, or compress the relay)"
            )

    @contextmanager
    def _eager_attention(self, enabled: bool):
        """Eager attention only for the one-token thought steps, so their attention rows can be read."""
        before = self.model.config._attn_implementation
        if not enabled or before == "eager":
            yield
            return
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if isinstance(cand, int):
                return cand
        return 0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (
            getattr(self.tokenizer, "eos_token_id", None),
            getattr(self.model.generation_config, "eos_token_id", None),
        ):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        return ids
