"""The Ray runtime: graph nodes placed on model hosts (Ray actors), many item batches in flight at once.

A :class:`ModelHost` actor (:mod:`.host`) holds one model and a :class:`~latent_relay.relay.runtime.node.NodeExecutor`
and runs node steps for batches of items. :class:`RayRuntime` places the graph's nodes on hosts (all on one, one
per node, or a user's map: :mod:`.placement`) and a :class:`~.scheduler.Scheduler` takes every batch through the
graph in topological order:

- a message between two hosts travels as encoded packets (:func:`latent_relay.relay.wire.encode`) through Ray's object
  store, straight from the producing host to the consuming one (the driver only handles object references);
- a hand-off inside one host stays in the host's memory (no serialization), and its ``edge_bytes`` still
  report the packet size it would have cost (the executor measures every message);
- each host runs one step at a time on a whole batch; different hosts work on different batches at once
  (a per-node placement is a pipeline), and ``replicas`` copies of every host run batches side by side.

Faults: a host that dies (process crash, node loss, ``ray.kill``) is restarted by Ray (``max_restarts``) and
every batch it was working on, or whose hand-offs it held, is run again from its first node; a batch that
keeps failing is split into single items, and an item that still fails gets one record with ``error`` set. Every
step has a deadline (:mod:`.deadlines`): a host whose step misses it is restarted, since a running forward cannot
be interrupted. With ``timeout`` (seconds a batch may run on hosts) the batch then gets error records; without it
the deadline is a generous budget derived from the step's work, and a batch whose host hung is run again. Every
item ends with exactly one record; records are written (and flushed) as their batch ends, scored off the
scheduler's thread.

The package :mod:`latent_relay.relay.runtime` is the only one of the project that imports ``ray``
(through :mod:`.cluster`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from latent_relay.relay.graph import AgentGraph, GraphError
from latent_relay.relay.results import ItemResult, ResultWriter
from latent_relay.relay.runtime import cluster
from latent_relay.relay.runtime.cluster import start_local_cluster
from latent_relay.relay.runtime.deadlines import StepDeadlines
from latent_relay.relay.runtime.errors import (
    HostStartError,
    LostMessageError,
    PlacementError,
    RayRuntimeError,
    StepTimeoutError,
    first_line,
)
from latent_relay.relay.runtime.host import HostModel, ModelHost, as_host_model, out_of_band
from latent_relay.relay.runtime.placement import PER_NODE, SHARED, host_resources, node_hosts, node_models
from latent_relay.relay.runtime.records import RecordBuilder
from latent_relay.relay.runtime.scheduler import Scheduler, StepEvent

log = logging.getLogger("relay")


class RayRuntime:
    """Runs graphs over task items on Ray model hosts; the same results as :class:`LocalRuntime`.

    ``model``: the default model (reference or :class:`HostModel`); nodes naming their own ``model`` get hosts
    of that model. ``placement``: ``"shared"`` (one host per model, all roles on it), ``"per-node"`` (one host
    per node), or a mapping node -> host name. ``address``: a Ray cluster (``"auto"`` inside ``ray job
    submit``); without it a loopback-only local cluster is started (and stopped by :meth:`close`).
    ``replicas`` copies of each host share the batches; at most ``max_in_flight`` batches run at once.
    ``timeout``: seconds a batch may spend running on hosts (queueing excluded) before it gets error records.
    Without it each step's deadline is derived from its work (:mod:`.deadlines`): at least ``min_step_seconds``,
    and at least its tokens to process and generate at ``min_tokens_per_second``; a host that misses it is
    restarted and the batch run again.
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
        min_step_seconds: float = 300.0,
        min_tokens_per_second: float = 1.0,
        max_retries: int = 2,
        max_restarts: int = 16,
        num_cpus: int | None = None,
        object_store_memory: int | None = 512 * 1024**2,
        start_timeout: float = 900.0,
        on_step: Callable[[StepEvent], None] | None = None,
    ):
        self.model = as_host_model(model)
        self.latent = latent
        self.decode = decode
        self.device = device
        self.placement = placement
        if replicas < 1:
            raise RayRuntimeError(f"replicas must be at least 1, got {replicas}")
        if timeout is not None and timeout <= 0:
            raise RayRuntimeError(f"timeout must be positive seconds, got {timeout}")
        if not min_step_seconds > 0 or not min_tokens_per_second > 0:
            raise RayRuntimeError(
                f"min_step_seconds and min_tokens_per_second must be positive, got {min_step_seconds} and "
                f"{min_tokens_per_second}"
            )
        if max_retries < 0:
            raise RayRuntimeError(f"max_retries must be >= 0, got {max_retries}")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise RayRuntimeError(f"device must be cpu or cuda, got {device!r}")
        self.replicas = replicas
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.deadlines = StepDeadlines(decode, min_step_seconds, min_tokens_per_second)
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.on_step = on_step
        self.hosts: dict[str, list[Any]] = {}  # host name -> actor handles (one per replica)
        self.host_models: dict[str, HostModel] = {}
        self.host_info: dict[str, dict] = {}
        self.stats = {"batches": 0, "retries": 0, "splits": 0, "timeouts": 0, "failed_items": 0}
        self._started_ray = cluster.connect(address, num_cpus, object_store_memory)

    def close(self) -> None:
        """Stop the hosts (and the local cluster this runtime started)."""
        ray = cluster.ray
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

    def plan(self, graph: AgentGraph) -> dict[str, str]:
        """Node -> host name for ``graph`` under this runtime's placement (validated)."""
        return node_hosts(graph, self.model, self.placement)

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
        scheduler = Scheduler(
            graph,
            task,
            relay,
            self._model_name(graph, plan),
            plan,
            self.hosts,
            self.stats,
            replicas=self.replicas,
            max_in_flight=self.max_in_flight,
            timeout=self.timeout,
            deadlines=self.deadlines,
            max_retries=self.max_retries,
            start_timeout=self.start_timeout,
            on_step=self.on_step,
            writer=writer,
            on_result=on_result,
            records=self.record_builder(graph, task, relay),
        )
        return scheduler.run(items, batch_size)

    def record_builder(self, graph: AgentGraph, task, relay: str) -> RecordBuilder:
        """The builder of this runtime's records for ``graph`` over ``task`` under ``relay``: the answering model's
        name and fingerprint (from its host, started here if need be), latent input and default decoding included
        (what ``--resume`` matches records on)."""
        plan = self.plan(graph)
        self._ensure_hosts(plan, graph)
        fingerprint = str(self.host_info.get(plan[graph.final], {}).get("fingerprint") or "")
        model = self._model_name(graph, plan)
        return RecordBuilder(graph, task, relay, model, fingerprint, self.latent, self.decode)

    # -------------------------------------------------------------- hosts
    def _ensure_hosts(self, plan: dict[str, str], graph: AgentGraph) -> None:
        """Start the hosts ``plan`` (node -> host name) needs and this runtime lacks, and wait until they answer."""
        ray, rex = cluster.ray, cluster.rex
        models = node_models(graph, self.model)
        wanted = {host: models[node] for node, host in plan.items()}
        for host, model in wanted.items():  # a host name reused for another model gets a fresh actor
            if host in self.host_models and self.host_models[host] != model:
                for h in self.hosts.pop(host):
                    ray.kill(h, no_restart=True)
                del self.host_models[host]
                self.deadlines.slowest.pop(host, None)
        new = [h for h in wanted if h not in self.hosts]
        if not new:
            return
        cpus, gpus, device = host_resources(len(new) * self.replicas, self.device)
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
                    f"host {host!r} could not load {wanted[host].label}: {type(cause).__name__}: {first_line(cause)}"
                ) from None
            except cluster.system_errors() as err:
                self._drop_host(host)
                raise HostStartError(f"host {host!r} died while starting: {first_line(err)}") from None
            self.host_info[host] = infos[0]
            log.info(
                "host %s: %s on %s (pid %s)", host, infos[0].get("model"), infos[0].get("device"), infos[0].get("pid")
            )

    def _drop_host(self, host: str) -> None:
        for h in self.hosts.pop(host, []):
            cluster.ray.kill(h, no_restart=True)
        self.host_models.pop(host, None)

    def _model_name(self, graph: AgentGraph, plan: dict[str, str]) -> str:
        info = self.host_info.get(plan[graph.final], {})
        return str(info.get("model") or self.model.label)


__all__ = [
    "PER_NODE",
    "SHARED",
    "GraphError",
    "HostModel",
    "HostStartError",
    "LostMessageError",
    "ModelHost",
    "PlacementError",
    "RayRuntime",
    "RayRuntimeError",
    "StepEvent",
    "StepTimeoutError",
    "out_of_band",
    "start_local_cluster",
]
