"""Placement: which host runs each graph node, and the share of the cluster's CPUs and GPUs each new host gets.

``"shared"``: one host per model, every node of that model on it; ``"per-node"``: one host per node; or a
mapping node -> host name. A host holds one model, so two nodes of different models never share one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from latent_relay.relay.graph import AgentGraph
from latent_relay.relay.runtime import cluster
from latent_relay.relay.runtime.errors import HostStartError, PlacementError
from latent_relay.relay.runtime.host import HostModel, as_host_model

SHARED = "shared"
PER_NODE = "per-node"

Placement = str | Mapping[str, str]


def node_models(graph: AgentGraph, default: HostModel) -> dict[str, HostModel]:
    """Node -> the model it runs: its own ``model``, or ``default``."""
    return {n.name: as_host_model(n.model) if n.model else default for n in graph.nodes}


def node_hosts(graph: AgentGraph, default: HostModel, placement: Placement) -> dict[str, str]:
    """Node -> host name for ``graph`` under ``placement`` (validated)."""
    models = node_models(graph, default)
    if placement == SHARED:
        labels: dict[HostModel, str] = {}
        for name in graph.order:
            m = models[name]
            if m not in labels:
                labels[m] = SHARED if m == default else f"{SHARED}:{m.label}"
        hosts = {name: labels[models[name]] for name in graph.order}
    elif placement == PER_NODE:
        hosts = {name: name for name in graph.order}
    elif isinstance(placement, Mapping):
        unknown = sorted(set(placement) - set(models))
        if unknown:
            raise PlacementError(f"placement names nodes not in graph {graph.name!r}: {', '.join(unknown)}")
        missing = [n for n in graph.order if n not in placement]
        if missing:
            raise PlacementError(f"placement gives no host to node(s): {', '.join(missing)}")
        hosts = {name: str(placement[name]) for name in graph.order}
        for host in set(hosts.values()):
            if not host or "/" in host:
                raise PlacementError(f"bad host name {host!r}")
    else:
        raise PlacementError(f"placement must be 'shared', 'per-node' or a node -> host mapping, not {placement!r}")
    for host in set(hosts.values()):
        held = {models[n] for n in hosts if hosts[n] == host}
        if len(held) > 1:
            raise PlacementError(f"host {host!r} would hold several models: {', '.join(sorted(m.label for m in held))}")
    return hosts


def share(total: float, n: int, cap: float | None = None) -> float:
    """An even share of ``total`` resources for ``n`` hosts, rounded down to hundredths."""
    part = math.floor(100 * total / max(1, n)) / 100
    return min(part, cap) if cap is not None else part


def host_resources(count: int, device: str) -> tuple[float, float, str]:
    """``(cpus, gpus, device)`` for each of ``count`` new hosts: an even share of what the cluster has free now
    (hosts of other runtimes keep theirs, and nothing waits for room). A CUDA host's device becomes ``"cuda"``, as
    Ray sets ``CUDA_VISIBLE_DEVICES`` for the actor."""
    ray = cluster.ray
    free, total = ray.available_resources(), ray.cluster_resources()
    biggest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    cpus = min(share(free.get("CPU", 0.0), count), biggest)  # a host lives on one node
    gpus = 0.0
    if device.startswith("cuda"):
        if total.get("GPU", 0) <= 0:
            raise HostStartError(f"device {device!r} was asked for but the Ray cluster has no GPU")
        gpus = share(free.get("GPU", 0.0), count, cap=1.0)
        if gpus <= 0:
            raise HostStartError(
                f"no free GPU share for {count} more host(s) ({free.get('GPU', 0):g} of {total['GPU']:g} GPUs free)"
            )
        device = "cuda"
    return cpus, gpus, device
