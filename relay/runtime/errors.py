"""What the Ray runtime raises: a cluster, host or placement it cannot use, a hand-off lost with its host, a step
that ran past its deadline."""

from __future__ import annotations


class RayRuntimeError(RuntimeError):
    """The Ray runtime cannot do what it was asked (cluster, hosts, placement)."""


class PlacementError(RayRuntimeError, ValueError):
    """A placement that does not fit the graph (unknown node, node without host, two models on one host)."""


class HostStartError(RayRuntimeError):
    """A model host could not start (its model failed to load, or the cluster has no room for it)."""


class LostMessageError(RuntimeError):
    """A same-host hand-off is gone from its host: the host restarted since the message was left there."""


class StepTimeoutError(RayRuntimeError, TimeoutError):
    """A node step ran past its deadline: its host was restarted (a running forward cannot be interrupted)."""


def first_line(err: BaseException) -> str:
    """An error's first line of text (its type name when it has none), for one-line records and messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
