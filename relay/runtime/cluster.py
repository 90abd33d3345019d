"""The Ray cluster: importing Ray for a loopback-only cluster, starting one, and sorting Ray's errors.

The Ray runtime's modules reach Ray through this one (``cluster.ray``, ``cluster.rex``), set when
:func:`import_ray` first runs: a loopback cluster needs :data:`LOOPBACK_ENV` set before Ray is imported.

A private cluster also requires Ray's token authentication (``RAY_AUTH_MODE=token``): every gRPC call to its GCS,
raylets and workers must carry the cluster's token, so another local user (or a process of this user that was not
given the token) cannot submit work to it through the loopback ports. Each cluster gets a fresh random token
(256 bits) that lives only in this process's environment (``RAY_AUTH_TOKEN``, which the cluster's processes
inherit; ``/proc/<pid>/environ`` is readable by this user only) and is never written to a file: Ray would
otherwise keep one token for every cluster in ``~/.ray/auth_token``.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # "token": every RPC must carry the cluster's token
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"  # the token itself (Ray reads it before RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token)
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

ray: Any = None  # the ray module, once import_ray has run
rex: Any = None  # ray.exceptions


def import_ray(loopback: bool):
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


def use_fresh_token() -> None:
    """Token authentication with a new random token for the cluster this process is about to start (and for this
    process's own calls to it). Ray caches its configuration and the token it loaded: both are read again."""
    os.environ[AUTH_MODE_ENV] = "token"
    os.environ[AUTH_TOKEN_ENV] = secrets.token_hex(32)
    os.environ.pop(AUTH_TOKEN_PATH_ENV, None)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # the mode (RayConfig reads RAY_AUTH_MODE when initialised); before the token, as Ray does
    AuthenticationTokenLoader.instance().reset_cache()


def start_local_cluster(
    num_cpus: int | None = None, object_store_memory: int | None = 512 * 1024**2, **init_options
) -> None:
    """Start a private Ray cluster in this process that listens on the loopback interface only and requires a
    fresh token (see the module's doc)."""
    import_ray(loopback=True)
    if ray.is_initialized():  # before the token changes under the cluster this process is connected to
        raise RuntimeError("Ray is already initialised in this process: call ray.shutdown() first")
    use_fresh_token()
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        **{"logging_level": logging.WARNING, **init_options},
    )


def connect(address: str | None, num_cpus: int | None, object_store_memory: int | None) -> bool:
    """Join the cluster at ``address`` or start a loopback-only local one, unless Ray is already initialised in
    this process. Returns whether this call started or joined one (so its caller shuts it down)."""
    import_ray(loopback=not address)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        start_local_cluster(num_cpus, object_store_memory)
    return True


def system_errors() -> tuple[type[BaseException], ...]:
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


def remote_cause(err: BaseException) -> BaseException:
    """The exception a remote call raised (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) if isinstance(err, rex.RayTaskError) else None
    return cause if isinstance(cause, BaseException) else err
