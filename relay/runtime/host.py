"""A model host: one model and its node executor in a Ray actor, running node steps for batches of items.

Hand-offs to a node on the same host stay in the host's store (no serialization); hand-offs to another host
leave as encoded packets, returned as numpy views (:func:`out_of_band`) so that Ray moves them through its object
store straight to the consuming host. What the driver gets back is the step's
:class:`~latent_relay.relay.runtime.node.NodeOutput` without its messages and packets.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from latent_relay.relay.graph import AgentGraph, Edge
from latent_relay.relay.runtime.errors import LostMessageError, RayRuntimeError


@dataclass(frozen=True)
class HostModel:
    """What a host loads: a model reference (:func:`latent_relay.agents.models.resolve_model`) or a tiny random model.

    ``tokenizer`` replaces the model's own tokenizer (tiny models have none; tests give a stand-in). It must
    be picklable, as it travels to the host.
    """

    ref: str = ""
    tiny_arch: str | None = None
    tiny_seed: int = 0
    tokenizer: Any = None
    dtype: str | None = None
    weights: str | None = None  # a setting of latent_relay.agents.weights.SETTINGS (dtype or quantized layers)

    @classmethod
    def tiny(cls, arch: str = "llama", seed: int = 0, tokenizer: Any = None) -> HostModel:
        return cls(tiny_arch=arch, tiny_seed=seed, tokenizer=tokenizer)

    @property
    def label(self) -> str:
        return f"tiny-{self.tiny_arch}-seed{self.tiny_seed}" if self.tiny_arch else self.ref

    def load(self, device: str):
        """The loaded model (:class:`latent_relay.agents.models.LoadedModel`) on ``device``."""
        if self.tiny_arch:
            import torch

            from latent_relay.agents.models import tiny_model

            loaded = tiny_model(self.tiny_arch, self.tiny_seed)
            if device != "cpu":
                loaded.model.to(torch.device(device))
            return loaded
        from latent_relay.agents.models import resolve_model

        return resolve_model(self.ref, device=device, dtype=self.dtype, weights=self.weights)


def as_host_model(model: str | HostModel) -> HostModel:
    if isinstance(model, HostModel):
        return model
    if isinstance(model, str) and model.strip():
        return HostModel(ref=model.strip())
    raise RayRuntimeError(f"a host model is a model reference or a HostModel, not {model!r}")


class ModelHost:
    """One model and its executor; runs node steps for batches of items (a Ray actor in the Ray runtime).

    ``step`` takes the batch's inbox per in-edge: a same-host hand-off left in this host's store, or the packets
    another host produced (resolved by Ray from the object store), and returns the step's output without messages
    plus one list of per-item packets per edge to another host.
    """

    def __init__(
        self, name: str, model: HostModel, latent=None, decode=None, device: str = "cpu", threads: int | None = None
    ):
        self.name = name
        self.error: BaseException | None = None
        self.store: dict[tuple[str, Edge], list] = {}  # (batch run key, edge) -> per-item messages
        self.info_: dict[str, Any] = {"host": name, "pid": os.getpid(), "device": device}
        try:  # a load failure is reported by info(), with its own type, instead of killing the actor
            import torch

            from latent_relay.agents.runner import ModelRunner
            from latent_relay.relay.runtime.allocator import retain_freed_memory
            from latent_relay.relay.runtime.node import NodeExecutor

            self.info_["allocator_retains_memory"] = retain_freed_memory()  # packet memory reused hop to hop
            if threads:
                torch.set_num_threads(threads)
            loaded = model.load(device)
            runner = ModelRunner.from_loaded(loaded, tokenizer=model.tokenizer, latent=latent)
            self.executor = NodeExecutor(runner, decode)
            self.info_.update(model=loaded.name, fingerprint=loaded.fingerprint, device=str(runner.device))
        except Exception as err:  # noqa: BLE001 - re-raised by info()
            self.error = err

    def info(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return dict(self.info_)

    def step(
        self,
        run_key: str,
        graph: AgentGraph,
        name: str,
        questions: list[str],
        answer_format: str,
        inputs: list[tuple[Edge, int | None]],
        exports: list[Edge],
        *packets: list,
    ):
        """Run node ``name`` for one batch. ``inputs`` pairs each in-edge with ``None`` (its messages are in this
        host's store) or ``j`` (they are ``packets[j]``). Returns the :class:`NodeOutput` without messages and
        packets, followed by one packet list per edge in ``exports`` (packets as numpy views, see
        :func:`out_of_band`); the other out-edges' messages are kept here for the next same-host step."""
        from latent_relay.relay.wire import decode

        if self.error is not None:
            raise self.error
        fingerprint = self.executor.runner.fingerprint or None
        n = len(questions)
        inbox: dict[Edge, list] = {}
        for edge, j in inputs:
            if j is None:
                messages = self.store.pop((run_key, edge), None)
                if messages is None:
                    raise LostMessageError(f"host {self.name!r} no longer holds the hand-off {edge.key}")
            else:
                messages = [decode(p, expect_fingerprint=fingerprint) for p in packets[j]]
            if len(messages) != n:
                raise RayRuntimeError(f"edge {edge.key!r} brought {len(messages)} messages for {n} items")
            inbox[edge] = messages
        out = self.executor.run(graph, name, questions, inbox, answer_format, exports=exports)
        for edge, messages in out.outgoing.items():
            if edge not in exports:
                self.store[(run_key, edge)] = messages
        sent = [[out_of_band(p) for p in out.packets[edge]] for edge in exports]
        summary = dataclasses.replace(out, outgoing={}, packets={})
        return (summary, *sent) if sent else summary

    def discard(self, run_key: str) -> int:
        """Drop the hand-offs a failed or abandoned batch left here."""
        stale = [k for k in self.store if k[0] == run_key]
        for k in stale:
            del self.store[k]
        return len(stale)

    def held(self) -> int:
        return len(self.store)


def out_of_band(packet: bytes | bytearray):
    """A packet as a numpy view of its bytes (no copy). Ray keeps numpy arrays out of its pickle stream: the array
    is copied into the object store once and the receiving host gets a read-only view of the store's memory,
    which :func:`latent_relay.relay.wire.decode` reads in place; ``bytes`` would be copied out of the store again
    (``benchmarks/ray_transport.py`` times both)."""
    import numpy

    return numpy.frombuffer(packet, dtype=numpy.uint8)
