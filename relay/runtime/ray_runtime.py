"""The Ray runtime: graph nodes placed on model hosts (Ray actors), many item batches in flight at once.

A :class:`ModelHost` actor holds one model and a :class:`~latent_relay.relay.runtime.node.NodeExecutor` and runs node
steps for batches of items. :class:`RayRuntime` places the graph's nodes on hosts (all on one, one per node, or a
user's map) and schedules every batch through the graph in topological order:

- a message between two hosts travels as encoded packets (:func:`latent_relay.relay.wire.encode`) through Ray's object
  store, straight from the producing host to the consuming one (the driver only handles object references);
- a hand-off inside one host stays in the host's memory (no serialization), and its ``edge_bytes`` still
  report the packet size it would have cost (the executor measures every message);
- each host runs one step at a time on a whole batch; different hosts work on different batches at once
  (a per-node placement is a pipeline), and ``replicas`` copies of every host run batches side by side.

Faults: a host that dies (process crash, node loss, ``ray.kill``) is restarted by Ray (``max_restarts``) and
every batch it was working on, or whose hand-offs it held, is run again from its first node; a batch that
keeps failing is split into single items, and an item that still fails gets one record with ``error`` set. A
batch that runs longer than ``timeout`` seconds on hosts is abandoned with an error record (its host is
restarted, since a running forward cannot be interrupted). Every item ends with exactly one record; records
are written (and flushed) as their batch ends.

This is the only module of the project that imports ``ray``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from latent_relay.relay.graph import AgentGraph, GraphError
from latent_relay.relay.results import ItemResult, ResultWriter
from latent_relay.relay.runtime.local import batches

log = logging.getLogger("relay")

SHARED = "shared"
PER_NODE = "per-node"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

ray: Any = None  # imported by _import_ray: a loopback cluster needs LOOPBACK_ENV set before Ray is imported
rex: Any = None


def _import_ray(loopback: bool):
    """Import Ray; ``loopback``: this process will start (or use) a cluster bound to 127.0.0.1 only.

    Ray decides at import time whether a process may use a non-loopback address (``ray_constants.
    ENABLE_RAY_CLUSTER`` from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``); with the variable unset, a local cluster
    binds its gRPC servers and agents to every interface even with ``_node_ip_address="127.0.0.1"``. The
    variable is set before the import (the cluster's own processes inherit it), and the driver's constant is
    corrected when Ray was imported earlier."""
    global ray, rex
    if loopback:
        os.environ[LOOPBACK_ENV] = "0"
    import ray as ray_module
    import ray.exceptions as exceptions_module

    if loopback:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    ray, rex = ray_module, exceptions_module
    return ray


def start_local_cluster(
    num_cpus: int | None = None, object_store_memory: int | None = 512 * 1024**2, **init_options
) -> None:
    """Start a private Ray cluster in this process that listens on the loopback interface only."""
    _import_ray(loopback=True)
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        **{"logging_level": logging.WARNING, **init_options},
    )


# ------------------------------------------------------------------------------------------------ errors
class RayRuntimeError(RuntimeError):
    """The Ray runtime cannot do what it was asked (cluster, hosts, placement)."""


class PlacementError(RayRuntimeError, ValueError):
    """A placement that does not fit the graph (unknown node, node without host, two models on one host)."""


class HostStartError(RayRuntimeError):
    """A model host could not start (its model failed to load, or the cluster has no room for it)."""


class LostMessageError(RuntimeError):
    """A same-host hand-off is gone from its host: the host restarted since the message was left there."""


# ------------------------------------------------------------------------------------------------ models
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

    @classmethod
    def tiny(cls, arch: str = "llama", seed: int = 0, tokenizer: Any = None) -> HostModel:
        return cls(tiny_arch=arch, tiny_seed=seed, tokenizer=tokenizer)

    @property
    def label(self) -> str:
        return f"tiny-{self.tiny_arch}-seed{self.tiny_seed}" if self.tiny_arch else self.ref

    def load(self, device: str):
        if self.tiny_arch:
            import torch

            from latent_relay.agents.models import tiny_model

            loaded = tiny_model(self.tiny_arch, self.tiny_seed)
            if device != "cpu":
                loaded.model.to(torch.device(device))
        else:
            from latent_relay.agents.models import resolve_model

            loaded = resolve_model(self.ref, device=device, dtype=self.dtype)
        tokenizer = self.tokenizer if self.tokenizer is not None else loaded.tokenizer
        return loaded, tokenizer


def _as_host_model(model: str | HostModel) -> HostModel:
    if isinstance(model, HostModel):
        return model
    if isinstance(model, str) and model.strip():
        return HostModel(ref=model.strip())
    raise RayRuntimeError(f"a host model is a model reference or a HostModel, not {model!r}")


# ------------------------------------------------------------------------------------------------ host
class ModelHost:
    """One model and its executor; runs node steps for batches of items (a Ray actor in :class:`RayRuntime`).

    ``step`` takes the batch's inbox per in-edge (parents in topological order): a same-host hand-off left in
    this host's store, or the packets another host produced (resolved by Ray from the object store), and
    returns the step's measurements plus one list of per-item packets per edge to another host.
    """

    def __init__(
        self, name: str, model: HostModel, latent=None, decode=None, device: str = "cpu", threads: int | None = None
    ):
        self.name = name
        self.error: BaseException | None = None
        self.store: dict[str, list] = {}
        self.info_: dict[str, Any] = {"host": name, "pid": os.getpid(), "device": device}
        try:  # a load failure is reported by info(), with its own type, instead of killing the actor
            import torch

            from latent_relay.agents.runner import ModelRunner
            from latent_relay.relay.runtime.allocator import retain_freed_memory
            from latent_relay.relay.runtime.node import NodeExecutor

            self.info_["allocator_retains_memory"] = retain_freed_memory()  # packet memory reused hop to hop
            if threads:
                torch.set_num_threads(threads)
            loaded, tokenizer = model.load(device)
            runner = ModelRunner(loaded.model, tokenizer, loaded.fingerprint, latent)
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
        inputs: list[tuple[str, Any]],
        exports: list[str],
        *packets: list,
    ):
        """Run node ``name`` for one batch. ``inputs[i]`` is ``("local", edge)`` or ``("remote", j)``: the
        edge's messages are in this host's store, or are ``packets[j]``. Returns ``(meta, *packet_lists)``,
        one packet list per edge in ``exports`` (packets as numpy views, see :func:`out_of_band`); other
        out-edges are kept here for the next same-host step."""
        from latent_relay.relay.wire import decode

        if self.error is not None:
            raise self.error
        fingerprint = self.executor.runner.fingerprint or None
        n = len(questions)
        inboxes: list[list] = [[] for _ in range(n)]
        for kind, ref in inputs:
            if kind == "local":
                messages = self.store.pop(f"{run_key}/{ref}", None)
                if messages is None:
                    raise LostMessageError(f"host {self.name!r} no longer holds the hand-off {ref}")
            else:
                messages = [decode(p, expect_fingerprint=fingerprint) for p in packets[ref]]
            if len(messages) != n:
                raise RayRuntimeError(f"edge {ref!r} brought {len(messages)} messages for {n} items")
            for b, m in enumerate(messages):
                inboxes[b].append(m)
        out = self.executor.run(graph, name, questions, inboxes, answer_format, keep_packets=exports)
        meta = {
            "texts": out.texts,
            "output_tokens": out.output_tokens,
            "thoughts": out.thoughts,
            "seconds": out.seconds,
            "edge_bytes": out.edge_bytes,
            "edge_metrics": out.edge_metrics,
            "host": self.name,
            "pid": os.getpid(),
        }
        sent = []
        for key, messages in out.outgoing.items():
            if key in exports:
                continue
            self.store[f"{run_key}/{key}"] = messages
        for key in exports:
            sent.append([out_of_band(p) for p in out.packets[key]])
        return (meta, *sent) if sent else meta

    def discard(self, run_key: str) -> int:
        """Drop the hand-offs a failed or abandoned batch left here."""
        stale = [k for k in self.store if k.startswith(run_key + "/")]
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


# ------------------------------------------------------------------------------------------------ scheduling
@dataclass
class StepEvent:
    """Progress of one node step (for ``on_step``): ``kind`` is ``submit``, ``done`` or ``failed``."""

    kind: str
    batch: int
    attempt: int
    node: str
    host: str
    replica: int
    items: list[str]


@dataclass
class _Batch:
    seq: int
    items: list
    index: list[int]  # the items' positions in the run's input
    attempt: int = 0
    replica: int = 0
    key: str = ""
    metas: dict[str, dict] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    exports: dict[str, Any] = field(default_factory=dict)  # edge key -> ObjectRef of per-item packets
    elapsed: float = 0.0
    finished: bool = False


@dataclass
class _Step:
    batch: _Batch
    attempt: int
    node: str
    host: tuple[str, int]
    started: float


def _system_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a lost worker, actor, node or object: the step did not fail by itself."""
    names = (
        "RayActorError",
        "ObjectLostError",
        "WorkerCrashedError",
        "NodeDiedError",
        "LocalRayletDiedError",
        "RaySystemError",
        "ObjectFetchTimedOutError",
        "ReferenceCountingAssertionError",
        "OutOfMemoryError",
    )
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _cause(err: BaseException) -> BaseException:
    """The exception a remote call raised (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) if isinstance(err, rex.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else err


def _share(total: float, n: int, cap: float | None = None) -> float:
    """An even share of ``total`` resources for ``n`` hosts, rounded down to hundredths."""
    share = math.floor(100 * total / max(1, n)) / 100
    return min(share, cap) if cap is not None else share


# ------------------------------------------------------------------------------------------------ runtime
class RayRuntime:
    """Runs graphs over task items on Ray model hosts; the same results as :class:`LocalRuntime`.

    ``model``: the default model (reference or :class:`HostModel`); nodes naming their own ``model`` get hosts
    of that model. ``placement``: ``"shared"`` (one host per model, all roles on it), ``"per-node"`` (one host
    per node), or a mapping node -> host name. ``address``: a Ray cluster (``"auto"`` inside ``ray job
    submit``); without it a loopback-only local cluster is started (and stopped by :meth:`close`).
    ``replicas`` copies of each host share the batches; at most ``max_in_flight`` batches run at once.
    ``timeout``: seconds a batch may spend running on hosts (queueing excluded) before it gets error records.
    ``max_retries``: reruns of a batch after host failures (then split into single items, then error records).
    """

    def __init__(
        self,
        model: str | HostModel,
        *,
        latent=None,
        decode=None,
        device: str = "cpu",
        address: str | None = None,
        placement: str | Mapping[str, str] = SHARED,
        replicas: int = 1,
        max_in_flight: int | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_restarts: int = 16,
        num_cpus: int | None = None,
        object_store_memory: int | None = 512 * 1024**2,
        start_timeout: float = 900.0,
        on_step: Callable[[StepEvent], None] | None = None,
    ):
        self.model = _as_host_model(model)
        self.latent = latent
        self.decode = decode
        self.device = device
        self.placement = placement
        if replicas < 1:
            raise RayRuntimeError(f"replicas must be at least 1, got {replicas}")
        if timeout is not None and timeout <= 0:
            raise RayRuntimeError(f"timeout must be positive seconds, got {timeout}")
        if max_retries < 0:
            raise RayRuntimeError(f"max_retries must be >= 0, got {max_retries}")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise RayRuntimeError(f"device must be cpu or cuda, got {device!r}")
        self.replicas = replicas
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.on_step = on_step
        self.hosts: dict[str, list[Any]] = {}  # host name -> actor handles (one per replica)
        self.host_models: dict[str, HostModel] = {}
        self.host_info: dict[str, dict] = {}
        self.stats = {"batches": 0, "retries": 0, "splits": 0, "timeouts": 0, "failed_items": 0}
        self._started_ray = False
        self._connect(address, num_cpus, object_store_memory)

    # -------------------------------------------------------------- cluster
    def _connect(self, address, num_cpus, object_store_memory) -> None:
        _import_ray(loopback=not address)
        if ray.is_initialized():
            return
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            start_local_cluster(num_cpus, object_store_memory)
        self._started_ray = True

    def close(self) -> None:
        """Stop the hosts (and the local cluster this runtime started)."""
        for handles in self.hosts.values():
            for h in handles:
                try:
                    ray.kill(h, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.hosts.clear()
        self.host_models.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- placement
    def plan(self, graph: AgentGraph) -> dict[str, str]:
        """Node -> host name for ``graph`` under this runtime's placement (validated)."""
        models = {n.name: _as_host_model(n.model) if n.model else self.model for n in graph.nodes}
        if self.placement == SHARED:
            labels: dict[HostModel, str] = {}
            for name in graph.order:
                m = models[name]
                if m not in labels:
                    labels[m] = SHARED if m == self.model else f"{SHARED}:{m.label}"
            plan = {name: labels[models[name]] for name in graph.order}
        elif self.placement == PER_NODE:
            plan = {name: name for name in graph.order}
        elif isinstance(self.placement, Mapping):
            unknown = sorted(set(self.placement) - set(models))
            if unknown:
                raise PlacementError(f"placement names nodes not in graph {graph.name!r}: {', '.join(unknown)}")
            missing = [n for n in graph.order if n not in self.placement]
            if missing:
                raise PlacementError(f"placement gives no host to node(s): {', '.join(missing)}")
            plan = {name: str(self.placement[name]) for name in graph.order}
            for host in set(plan.values()):
                if not host or "/" in host:
                    raise PlacementError(f"bad host name {host!r}")
        else:
            raise PlacementError(
                f"placement must be 'shared', 'per-node' or a node -> host mapping, not {self.placement!r}"
            )
        for host in set(plan.values()):
            held = {models[n] for n in plan if plan[n] == host}
            if len(held) > 1:
                raise PlacementError(
                    f"host {host!r} would hold several models: {', '.join(sorted(m.label for m in held))}"
                )
        return plan

    def _ensure_hosts(self, plan: dict[str, str], graph: AgentGraph) -> None:
        models = {n.name: _as_host_model(n.model) if n.model else self.model for n in graph.nodes}
        wanted = {host: models[node] for node, host in plan.items()}
        for host, model in wanted.items():  # a host name reused for another model gets a fresh actor
            if host in self.host_models and self.host_models[host] != model:
                for h in self.hosts.pop(host):
                    ray.kill(h, no_restart=True)
                del self.host_models[host]
        new = [h for h in wanted if h not in self.hosts]
        if not new:
            return
        # an even share of what is free now: hosts of other runtimes keep theirs, and nothing waits for room
        free, total = ray.available_resources(), ray.cluster_resources()
        count = len(new) * self.replicas
        biggest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        cpus = min(_share(free.get("CPU", 0.0), count), biggest)  # a host lives on one node
        gpus = 0.0
        device = self.device
        if device.startswith("cuda"):
            if total.get("GPU", 0) <= 0:
                raise HostStartError(f"device {device!r} was asked for but the Ray cluster has no GPU")
            gpus = _share(free.get("GPU", 0.0), count, cap=1.0)
            if gpus <= 0:
                raise HostStartError(
                    f"no free GPU share for {count} more host(s) ({free.get('GPU', 0):g} of {total['GPU']:g} GPUs free)"
                )
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES for the actor
        threads = max(1, int(cpus))
        remote = ray.remote(ModelHost)
        for host in new:
            self.hosts[host] = [
                remote.options(
                    num_cpus=cpus,
                    num_gpus=gpus,
                    max_restarts=self.max_restarts,
                    max_task_retries=0,  # whole batches are rerun instead: a host's hand-offs die with it
                    max_concurrency=1,
                ).remote(host, wanted[host], self.latent, self.decode, device, threads)
                for _ in range(self.replicas)
            ]
            self.host_models[host] = wanted[host]
        pending = {host: [h.info.remote() for h in self.hosts[host]] for host in new}
        for host, refs in pending.items():
            try:
                infos = ray.get(refs, timeout=self.start_timeout)
            except rex.GetTimeoutError:
                self._drop_host(host)
                raise HostStartError(
                    f"host {host!r} did not start within {self.start_timeout:.0f}s (does the cluster have room for it?)"
                ) from None
            except rex.RayTaskError as err:
                self._drop_host(host)
                cause = err.cause if isinstance(err.cause, BaseException) else err
                if isinstance(cause, (ValueError, OSError, LookupError)):
                    raise cause from None  # e.g. an unknown model reference: the CLI's one-line error
                raise HostStartError(
                    f"host {host!r} could not load {wanted[host].label}: {type(cause).__name__}: {_first_line(cause)}"
                ) from None
            except _system_errors() as err:
                self._drop_host(host)
                raise HostStartError(f"host {host!r} died while starting: {_first_line(err)}") from None
            self.host_info[host] = infos[0]
            log.info(
                "host %s: %s on %s (pid %s)", host, infos[0].get("model"), infos[0].get("device"), infos[0].get("pid")
            )

    def _drop_host(self, host: str) -> None:
        for h in self.hosts.pop(host, []):
            ray.kill(h, no_restart=True)
        self.host_models.pop(host, None)

    # -------------------------------------------------------------- run
    def run(
        self,
        graph: AgentGraph,
        task,
        items: Sequence,
        relay: str,
        batch_size: int = 4,
        writer: ResultWriter | None = None,
        on_result: Callable[[ItemResult], None] | None = None,
    ) -> list[ItemResult]:
        """Run ``graph`` over ``items``; every item gets exactly one record, written as its batch ends.

        Returns the records in the order of ``items``."""
        items = list(items)
        if not items:
            return []
        plan = self.plan(graph)
        self._ensure_hosts(plan, graph)
        model_name = self._model_name(graph, plan)
        run_id = uuid.uuid4().hex[:12]
        seq = itertools.count()
        queue = deque(
            _Batch(next(seq), [items[i] for i in idx], list(idx))
            for idx in batches(range(len(items)), max(1, batch_size))
        )
        n_hosts = len(set(plan.values()))
        limit = self.max_in_flight or 2 * n_hosts * self.replicas
        active: list[_Batch] = []
        running: dict[Any, _Step] = {}
        busy: set[tuple[str, int]] = set()
        results: dict[int, ItemResult] = {}
        parents = {name: [e.source for e in graph.incoming(name)] for name in graph.order}

        def emit(kind: str, step_batch: _Batch, node: str, host: tuple[str, int]) -> None:
            if self.on_step is not None:
                self.on_step(
                    StepEvent(
                        kind,
                        step_batch.seq,
                        step_batch.attempt,
                        node,
                        host[0],
                        host[1],
                        [str(it.id) for it in step_batch.items],
                    )
                )

        def activate(b: _Batch) -> None:
            load = [sum(1 for a in active if a.replica == r) for r in range(self.replicas)]
            b.replica = load.index(min(load))
            b.key = f"{run_id}:{b.seq}:{b.attempt}"
            active.append(b)

        def finish(b: _Batch, records: list[ItemResult], clean: bool = True) -> None:
            b.finished = True
            active.remove(b)
            self._discard(plan, b, held=not clean)  # a finished batch consumed all its same-host hand-offs
            self.stats["batches"] += 1
            if writer is not None:
                writer.write(records)
            for i, r in zip(b.index, records):
                results[i] = r
                if on_result is not None:
                    on_result(r)

        def fail(b: _Batch, message: str) -> None:
            log.warning("batch of %d items failed: %s", len(b.items), message)
            self.stats["failed_items"] += len(b.items)
            finish(b, [self._failed(graph, task, it, relay, model_name, message) for it in b.items], clean=False)

        def retry(b: _Batch, err: BaseException, node: str) -> None:
            why = f"{type(err).__name__}: {_first_line(err)}"
            if b.attempt >= self.max_retries:
                fail(b, f"host {plan[node]!r} failed {b.attempt + 1} times running node {node!r} ({why})")
                return
            log.warning("batch %d: host %r failed at node %r (%s); running it again", b.seq, plan[node], node, why)
            self.stats["retries"] += 1
            b.finished = True
            active.remove(b)
            self._discard(plan, b, held=True)
            again = [_Batch(b.seq, b.items, b.index, attempt=b.attempt + 1)]
            if b.attempt >= 1 and len(b.items) > 1:  # keeps failing: isolate the item that breaks the host
                self.stats["splits"] += 1
                again = [_Batch(next(seq), [it], [i], attempt=b.attempt + 1) for it, i in zip(b.items, b.index)]
            queue.extendleft(reversed(again))

        def submit(b: _Batch, node: str) -> None:
            host = (plan[node], b.replica)
            inputs, packets = [], []
            for src in parents[node]:
                key = f"{src}->{node}"
                if plan[src] == plan[node]:
                    inputs.append(("local", key))
                else:
                    inputs.append(("remote", len(packets)))
                    packets.append(b.exports[key])
            exports = [f"{node}->{e.target}" for e in graph.outgoing(node) if plan[e.target] != plan[node]]
            handle = self.hosts[plan[node]][b.replica]
            questions = [it.question for it in b.items]
            refs = handle.step.options(num_returns=1 + len(exports)).remote(
                b.key, graph, node, questions, task.answer_format, inputs, exports, *packets
            )
            refs = refs if isinstance(refs, list) else [refs]
            for key, ref in zip(exports, refs[1:]):
                b.exports[key] = ref
            running[refs[0]] = _Step(b, b.attempt, node, host, time.monotonic())
            busy.add(host)
            b.running.add(node)
            emit("submit", b, node, host)

        recovering: dict[tuple[str, int], float] = {}  # host -> when it failed (no work until it answers)
        probes: dict[Any, tuple[str, int]] = {}  # info() calls to recovering hosts
        retry_at: dict[tuple[str, int], float] = {}
        dead: dict[tuple[str, int], str] = {}

        def recover(host: tuple[str, int]) -> None:
            if host not in recovering and host not in dead:
                recovering[host] = time.monotonic()
                retry_at[host] = 0.0

        def probe() -> None:
            now = time.monotonic()
            for host, since in list(recovering.items()):
                if host in probes.values() or retry_at.get(host, 0.0) > now:
                    continue
                if now - since > self.start_timeout:
                    recovering.pop(host)
                    dead[host] = f"host {host[0]!r} did not come back within {self.start_timeout:.0f}s"
                    continue
                probes[self.hosts[host[0]][host[1]].info.remote()] = host

        def probed(ref) -> None:
            host = probes.pop(ref)
            try:
                ray.get(ref)
            except rex.ActorDiedError as err:  # out of restarts: nothing more runs there
                recovering.pop(host, None)
                dead[host] = f"host {host[0]!r} is gone ({_first_line(err)})"
            except Exception:  # noqa: BLE001 - still restarting: ask again shortly
                retry_at[host] = time.monotonic() + 0.5
            else:
                recovering.pop(host, None)
                log.debug("host %r answers", host[0])

        for host_name in set(plan.values()):  # a host may still be restarting from an earlier run: ask first
            for r in range(self.replicas):
                recover((host_name, r))
        while queue or active:
            while queue and len(active) < limit:
                activate(queue.popleft())
            for b in sorted(active, key=lambda x: x.seq):  # oldest batch first: a pipeline, not a pile-up
                for node in graph.order:
                    if b.finished or node in b.metas or node in b.running:
                        continue
                    host = (plan[node], b.replica)
                    if host in dead:
                        fail(b, f"{dead[host]}; node {node!r} cannot run")
                        break
                    idle = host not in busy and host not in recovering
                    if idle and all(p in b.metas for p in parents[node]):
                        submit(b, node)
            probe()
            if not running and not probes and not recovering:
                if queue or active:  # every active batch has a runnable node or a step under way
                    raise RayRuntimeError("scheduler stalled with no step running")
                break
            wait = 0.5 if recovering else 1.0
            if self.timeout is not None:
                now = time.monotonic()
                for s in running.values():
                    if not s.batch.finished and s.attempt == s.batch.attempt:
                        wait = min(wait, max(0.0, self.timeout - s.batch.elapsed - (now - s.started)))
            waiting = [*running, *probes]
            ready = ray.wait(waiting, num_returns=1, timeout=max(wait, 0.01))[0] if waiting else []
            if not waiting:
                time.sleep(wait)
            for ref in ready:
                if ref in probes:
                    probed(ref)
                    continue
                s = running.pop(ref)
                busy.discard(s.host)
                b = s.batch
                stale = b.finished or s.attempt != b.attempt
                try:
                    meta = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - sorted below
                    cause = _cause(err)
                    if isinstance(cause, rex.RayActorError):
                        recover(s.host)  # Ray restarts it; no more work goes there until it answers
                    if stale:
                        continue
                    emit("failed", b, s.node, s.host)
                    if isinstance(cause, (LostMessageError, *_system_errors())):
                        retry(b, cause, s.node)
                    else:  # the step itself raised: the batch fails, as in the local runtime
                        fail(b, f"{type(cause).__name__}: {_first_line(cause)}")
                    continue
                if stale:
                    continue
                b.running.discard(s.node)
                b.metas[s.node] = meta
                b.elapsed += time.monotonic() - s.started
                emit("done", b, s.node, s.host)
                if len(b.metas) == len(graph.order):
                    finish(b, self._records(graph, task, b, relay, model_name))
            if self.timeout is not None:
                for host in self._enforce_timeout(running, fail):
                    recover(host)
        return [results[i] for i in range(len(items))]

    def _enforce_timeout(self, running: dict[Any, _Step], fail: Callable[[_Batch, str], None]) -> list:
        """Fail batches over their time; returns the hosts restarted to stop them."""
        now = time.monotonic()
        killed = []
        for s in list(running.values()):
            b = s.batch
            if b.finished or s.attempt != b.attempt:
                continue
            spent = b.elapsed + now - s.started
            if spent > self.timeout:
                self.stats["timeouts"] += 1
                # a forward cannot be interrupted: restart the host (its step then ends with an actor error)
                ray.kill(self.hosts[s.host[0]][s.host[1]], no_restart=False)
                killed.append(s.host)
                fail(
                    b,
                    f"TimeoutError: the batch ran {spent:.1f}s on hosts, over the {self.timeout:g}s "
                    f"timeout (at node {s.node!r} on host {s.host[0]!r})",
                )
        return killed

    def _discard(self, plan: dict[str, str], b: _Batch, held: bool) -> None:
        """Drop the batch's packets; ``held``: also its hand-offs left on hosts (a batch that stopped midway)."""
        b.exports.clear()
        if not held:
            return
        for host in set(plan.values()):
            try:
                self.hosts[host][b.replica].discard.remote(b.key)
            except Exception:  # noqa: BLE001 - a dead host holds nothing
                pass

    def _model_name(self, graph: AgentGraph, plan: dict[str, str]) -> str:
        info = self.host_info.get(plan[graph.final], {})
        return str(info.get("model") or self.model.label)

    @staticmethod
    def _records(graph: AgentGraph, task, b: _Batch, relay: str, model_name: str) -> list[ItemResult]:
        """The batch's records, assembled exactly as :meth:`LocalRuntime.run_batch` does."""
        n = len(b.items)
        records = [
            ItemResult(
                item_id=str(it.id), task=task.name, graph=graph.name, relay=relay, model=model_name, gold=str(it.gold)
            )
            for it in b.items
        ]
        final_texts: list[str] = [""] * n
        for name in graph.order:
            out = b.metas[name]
            for i, r in enumerate(records):
                r.node_seconds[name] = out["seconds"] / n
                r.output_tokens += out["output_tokens"][i]
                r.latent_steps += out["thoughts"]
                for key, sizes in out["edge_bytes"].items():
                    r.edge_bytes[key] = sizes[i]
                    if out["edge_metrics"][key][i]:
                        r.edge_metrics[key] = out["edge_metrics"][key][i]
            if name == graph.final:
                final_texts = out["texts"] or final_texts
        for item, r, text in zip(b.items, records, final_texts):
            r.answer = text
            r.correct = bool(task.score(item, text))
            r.seconds = sum(r.node_seconds.values())
            r.relay_bytes = sum(r.edge_bytes.values())
        return records

    @staticmethod
    def _failed(graph, task, item, relay, model_name, message: str) -> ItemResult:
        return ItemResult(
            item_id=str(item.id),
            task=task.name,
            graph=graph.name,
            relay=relay,
            model=model_name,
            gold=str(item.gold),
            error=message,
        )


__all__ = [
    "GraphError",
    "HostModel",
    "HostStartError",
    "LostMessageError",
    "ModelHost",
    "PlacementError",
    "RayRuntime",
    "RayRuntimeError",
    "StepEvent",
    "start_local_cluster",
]
