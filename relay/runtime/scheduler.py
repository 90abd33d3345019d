"""The Ray runtime's scheduler: one run of a graph over items, every batch through the nodes on their hosts.

Batches wait in a queue; at most ``limit`` are active at once, each on one replica of the hosts. A batch's node
is submitted when its parents are done and its host is idle (one step at a time per host, oldest batch first: a
pipeline, not a pile-up). A host that dies is restarted by Ray and probed until it answers; the batches it was
working on, or whose hand-offs it held, are run again from their first node (``max_retries`` times, then split
into single items, then given error records). Every item ends with exactly one record.

Every step has a deadline (:mod:`.deadlines`): the batch's ``timeout`` of running time where the user gave one,
else a generous budget derived from the step's work. A host whose step misses it is restarted (a running forward
cannot be interrupted), also when the step belongs to a batch already abandoned or retried; the batch gets error
records (over ``timeout``) or is retried (past the default deadline: a hung host). A step that has finished is never
failed: every ready result is collected before deadlines are enforced. A finished batch is scored on a small thread
pool (:mod:`.scoring`), so slow scoring (HumanEval runs tests) never holds up the steps of other batches.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from latent_relay.relay.graph import AgentGraph, Edge
from latent_relay.relay.results import ItemResult, ResultWriter
from latent_relay.relay.runtime import cluster
from latent_relay.relay.runtime.deadlines import StepDeadlines
from latent_relay.relay.runtime.errors import LostMessageError, RayRuntimeError, StepTimeoutError, first_line
from latent_relay.relay.runtime.local import batches
from latent_relay.relay.runtime.node import NodeOutput
from latent_relay.relay.runtime.records import RecordBuilder
from latent_relay.relay.runtime.scoring import ScorePool

log = logging.getLogger("relay")

HostSlot = tuple[str, int]  # (host name, replica)


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
class Batch:
    seq: int
    items: list
    index: list[int]  # the items' positions in the run's input
    attempt: int = 0
    replica: int = 0
    key: str = ""
    outputs: dict[str, NodeOutput] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    exports: dict[Edge, Any] = field(default_factory=dict)  # edge -> ObjectRef of its per-item packets
    elapsed: float = 0.0
    finished: bool = False


@dataclass
class Step:
    batch: Batch
    attempt: int
    node: str
    host: HostSlot
    started: float
    work: int = 0  # tokens to process and generate (a high estimate)
    budget: float = math.inf  # seconds it may run without a user's timeout


@dataclass
class Scheduler:
    """Runs ``graph`` over task items on ``hosts`` (host name -> actor handles, one per replica) under ``plan``
    (node -> host name). ``stats`` (the runtime's counters) is updated in place."""

    graph: AgentGraph
    task: Any
    relay: str
    model_name: str
    plan: dict[str, str]
    hosts: dict[str, list[Any]]
    stats: dict[str, int]
    replicas: int = 1
    max_in_flight: int | None = None
    timeout: float | None = None
    deadlines: StepDeadlines | None = None
    max_retries: int = 2
    start_timeout: float = 900.0
    on_step: Callable[[StepEvent], None] | None = None
    writer: ResultWriter | None = None
    on_result: Callable[[ItemResult], None] | None = None
    records: RecordBuilder | None = None  # default: the graph's records with model_name only
    scorers: int = 4

    def __post_init__(self) -> None:
        self.deadlines = self.deadlines or StepDeadlines()
        self.records = self.records or RecordBuilder(self.graph, self.task, self.relay, self.model_name)
        self.run_id = uuid.uuid4().hex[:12]
        self.seq = itertools.count()
        self.limit = self.max_in_flight or 2 * len(set(self.plan.values())) * self.replicas
        self.queue: deque[Batch] = deque()
        self.active: list[Batch] = []
        self.running: dict[Any, Step] = {}  # ObjectRef of a step's output -> the step
        self.busy: set[HostSlot] = set()
        self.results: dict[int, ItemResult] = {}
        self.recovering: dict[HostSlot, float] = {}  # host -> when it failed (no work until it answers)
        self.probes: dict[Any, HostSlot] = {}  # info() calls to recovering hosts
        self.retry_at: dict[HostSlot, float] = {}
        self.dead: dict[HostSlot, str] = {}
        self.incoming = {name: self.graph.incoming(name) for name in self.graph.order}

    # -------------------------------------------------------------- the loop
    def run(self, items: Sequence, batch_size: int) -> list[ItemResult]:
        """Every item's record, in the order of ``items``; each written as its batch ends."""
        items = list(items)
        self.queue.extend(
            Batch(next(self.seq), [items[i] for i in idx], list(idx))
            for idx in batches(range(len(items)), max(1, batch_size))
        )
        for host in set(self.plan.values()):  # a host may still be restarting from an earlier run: ask first
            for r in range(self.replicas):
                self.recover((host, r))
        with ScorePool(self.scorers) as self.scoring:
            while self.queue or self.active or self.scoring.pending:
                while self.queue and len(self.active) < self.limit:
                    self.activate(self.queue.popleft())
                self.probe()  # first: a host given up on here fails its batches in submit_ready
                self.submit_ready()
                if not (self.running or self.probes or self.recovering or self.scoring.pending):
                    if self.queue or self.active:  # every active batch has a runnable node or a step under way
                        raise RayRuntimeError("scheduler stalled with no step running")
                    break
                for ref in self.wait():
                    if ref in self.probes:
                        self.probed(ref)
                    elif ref in self.running:
                        self.collect(ref)
                for b, records, err in self.scoring.done():
                    self.scored(b, records, err)
                self.enforce_deadlines()
        return [self.results[i] for i in range(len(items))]

    def submit_ready(self) -> None:
        """Submit every node whose parents are done and whose host is idle, oldest batch first."""
        for b in sorted(self.active, key=lambda x: x.seq):
            for node in self.graph.order:
                if b.finished or node in b.outputs or node in b.running:
                    continue
                host = (self.plan[node], b.replica)
                if host in self.dead:
                    self.fail(b, f"{self.dead[host]}; node {node!r} cannot run")
                    break
                idle = host not in self.busy and host not in self.recovering
                if idle and all(e.source in b.outputs for e in self.incoming[node]):
                    self.submit(b, node)

    def wait(self) -> list:
        """Every step or probe result that is ready, after waiting at most until the next deadline is due (and
        briefly while batches are being scored). All ready results are taken at once, so that none waits a pass
        while its deadline passes."""
        wait = 0.5 if self.recovering else 1.0
        if self.scoring.pending:
            wait = min(wait, 0.05)
        now = time.monotonic()
        for s in self.running.values():
            wait = min(wait, max(0.0, self.due(s) - now))
        waiting = [*self.running, *self.probes]
        if not waiting:
            time.sleep(wait)
            return []
        ready = cluster.ray.wait(waiting, num_returns=1, timeout=max(wait, 0.01))[0]
        if ready and len(waiting) > 1:
            ready = cluster.ray.wait(waiting, num_returns=len(waiting), timeout=0)[0]
        return ready

    # -------------------------------------------------------------- batches
    def activate(self, b: Batch) -> None:
        load = [sum(1 for a in self.active if a.replica == r) for r in range(self.replicas)]
        b.replica = load.index(min(load))
        b.key = f"{self.run_id}:{b.seq}:{b.attempt}"
        self.active.append(b)

    def submit(self, b: Batch, node: str) -> None:
        host = (self.plan[node], b.replica)
        inputs: list[tuple[Edge, int | None]] = []
        packets = []
        for e in self.incoming[node]:
            if self.plan[e.source] == self.plan[node]:
                inputs.append((e, None))
            else:
                inputs.append((e, len(packets)))
                packets.append(b.exports[e])
        exports = [e for e in self.graph.outgoing(node) if self.plan[e.target] != self.plan[node]]
        handle = self.hosts[self.plan[node]][b.replica]
        questions = [self.graph.node(node).text_of(it) for it in b.items]
        refs = handle.step.options(num_returns=1 + len(exports)).remote(
            b.key, self.graph, node, questions, self.task.answer_format, inputs, exports, *packets
        )
        refs = refs if isinstance(refs, list) else [refs]
        for e, ref in zip(exports, refs[1:]):
            b.exports[e] = ref
        parent_tokens = sum(sum(b.outputs[e.source].output_tokens) for e in self.incoming[node])
        work = self.deadlines.work(self.graph, node, questions, self.task.answer_format, parent_tokens)
        budget = self.deadlines.budget(host[0], work)
        self.running[refs[0]] = Step(b, b.attempt, node, host, time.monotonic(), work, budget)
        self.busy.add(host)
        b.running.add(node)
        self.emit("submit", b, node, host)

    def collect(self, ref) -> None:
        """Take a finished step's output (or its error) into its batch."""
        s = self.running.pop(ref)
        self.busy.discard(s.host)
        b = s.batch
        stale = b.finished or s.attempt != b.attempt
        try:
            out = cluster.ray.get(ref)
        except Exception as err:  # noqa: BLE001 - sorted below
            cause = cluster.remote_cause(err)
            if isinstance(cause, cluster.rex.RayActorError):
                self.recover(s.host)  # Ray restarts it; no more work goes there until it answers
            if stale:
                return
            self.emit("failed", b, s.node, s.host)
            if isinstance(cause, (LostMessageError, *cluster.system_errors())):
                self.retry(b, cause, s.node)
            else:  # the step itself raised: the batch fails, as in the local runtime
                self.fail(b, f"{type(cause).__name__}: {first_line(cause)}")
            return
        if stale:
            return
        b.running.discard(s.node)
        b.outputs[s.node] = out
        b.elapsed += time.monotonic() - s.started
        self.deadlines.observe(s.host[0], s.work, out.seconds)
        self.emit("done", b, s.node, s.host)
        if len(b.outputs) == len(self.graph.order):  # every node ran: score it off this thread
            self.active.remove(b)
            self.scoring.submit(b, self.records.batch, b.items, dict(b.outputs))

    def scored(self, b: Batch, records: list[ItemResult] | None, err: BaseException | None) -> None:
        if err is not None or records is None:
            self.fail(b, f"{type(err).__name__} while scoring: {first_line(err)}")
        else:
            self.finish(b, records)

    def finish(self, b: Batch, records: list[ItemResult], clean: bool = True) -> None:
        b.finished = True
        if b in self.active:  # a batch being scored has left the active ones
            self.active.remove(b)
        self.discard(b, held=not clean)  # a finished batch consumed all its same-host hand-offs
        self.stats["batches"] += 1
        if self.writer is not None:
            self.writer.write(records)
        for i, r in zip(b.index, records):
            self.results[i] = r
            if self.on_result is not None:
                self.on_result(r)

    def fail(self, b: Batch, message: str) -> None:
        log.warning("batch of %d items failed: %s", len(b.items), message)
        self.stats["failed_items"] += len(b.items)
        self.finish(b, [self.records.failed(it, message) for it in b.items], clean=False)

    def retry(self, b: Batch, err: BaseException, node: str) -> None:
        why = f"{type(err).__name__}: {first_line(err)}"
        if b.attempt >= self.max_retries:
            self.fail(b, f"host {self.plan[node]!r} failed {b.attempt + 1} times running node {node!r} ({why})")
            return
        log.warning("batch %d: host %r failed at node %r (%s); running it again", b.seq, self.plan[node], node, why)
        self.stats["retries"] += 1
        b.finished = True
        self.active.remove(b)
        self.discard(b, held=True)
        again = [Batch(b.seq, b.items, b.index, attempt=b.attempt + 1)]
        if b.attempt >= 1 and len(b.items) > 1:  # keeps failing: isolate the item that breaks the host
            self.stats["splits"] += 1
            again = [Batch(next(self.seq), [it], [i], attempt=b.attempt + 1) for it, i in zip(b.items, b.index)]
        self.queue.extendleft(reversed(again))

    def discard(self, b: Batch, held: bool) -> None:
        """Drop the batch's packets; ``held``: also its hand-offs left on hosts (a batch that stopped midway)."""
        b.exports.clear()
        if not held:
            return
        for host in set(self.plan.values()):
            try:
                self.hosts[host][b.replica].discard.remote(b.key)
            except Exception:  # noqa: BLE001 - a dead host holds nothing
                pass

    # -------------------------------------------------------------- deadlines
    def due(self, s: Step) -> float:
        """When step ``s`` is late: the batch's ``timeout`` of running time is used up, or else its budget is."""
        if self.timeout is not None:
            return s.started + self.timeout - s.batch.elapsed
        return s.started + s.budget

    def enforce_deadlines(self) -> None:
        """Restart the host of every step past its deadline, that of an abandoned batch included; a late step that
        has finished (its result is ready, even if not here yet) is collected instead."""
        now = time.monotonic()
        late = [ref for ref, s in self.running.items() if now > self.due(s)]
        if not late:
            return
        finished = set(cluster.ray.wait(late, num_returns=len(late), timeout=0, fetch_local=False)[0])
        for ref in late:
            if ref in finished:
                self.collect(ref)
            elif ref in self.running:
                self.abandon(ref, now)

    def abandon(self, ref, now: float) -> None:
        """Give up on a late step: restart its host (a forward cannot be interrupted) and fail (over ``timeout``)
        or retry (past its default deadline: the host hung) its batch, unless that batch was already given up."""
        s = self.running.pop(ref)
        self.busy.discard(s.host)
        self.stats["timeouts"] += 1
        self.restart(s.host)
        b = s.batch
        if b.finished or s.attempt != b.attempt:
            log.warning("host %r restarted: a step of an abandoned batch ran past its deadline", s.host[0])
            return
        b.running.discard(s.node)
        self.emit("failed", b, s.node, s.host)
        where = f"(at node {s.node!r} on host {s.host[0]!r})"
        if self.timeout is not None:
            spent = b.elapsed + now - s.started
            over = f"the batch ran {spent:.1f}s on hosts, over the {self.timeout:g}s timeout"
            self.fail(b, f"TimeoutError: {over} {where}")
        else:
            late = StepTimeoutError(f"the step ran {now - s.started:.1f}s, past its {s.budget:.1f}s deadline {where}")
            self.retry(b, late, s.node)

    def restart(self, host: HostSlot) -> None:
        """Kill ``host`` for Ray to restart it, and send it no work until it answers."""
        try:
            cluster.ray.kill(self.hosts[host[0]][host[1]], no_restart=False)
        except Exception:  # noqa: BLE001 - already dead: the probe tells whether it comes back
            pass
        self.recover(host)

    def emit(self, kind: str, b: Batch, node: str, host: HostSlot) -> None:
        if self.on_step is not None:
            self.on_step(StepEvent(kind, b.seq, b.attempt, node, host[0], host[1], [str(it.id) for it in b.items]))

    # -------------------------------------------------------------- host recovery
    def recover(self, host: HostSlot) -> None:
        """Hold work back from ``host`` until it answers a probe (Ray is restarting it)."""
        if host not in self.recovering and host not in self.dead:
            self.recovering[host] = time.monotonic()
            self.retry_at[host] = 0.0

    def probe(self) -> None:
        """Ask each recovering host that has no probe out, and give up on those past ``start_timeout`` (also while
        a probe is out: a host whose restart hangs never answers it)."""
        now = time.monotonic()
        for host, since in list(self.recovering.items()):
            if now - since > self.start_timeout:
                self.recovering.pop(host)
                for ref in [r for r, h in self.probes.items() if h == host]:
                    del self.probes[ref]
                self.dead[host] = f"host {host[0]!r} did not come back within {self.start_timeout:.0f}s"
                continue
            if host in self.probes.values() or self.retry_at.get(host, 0.0) > now:
                continue
            self.probes[self.hosts[host[0]][host[1]].info.remote()] = host

    def probed(self, ref) -> None:
        host = self.probes.pop(ref)
        try:
            cluster.ray.get(ref)
        except cluster.rex.ActorDiedError as err:  # out of restarts: nothing more runs there
            self.recovering.pop(host, None)
            self.dead[host] = f"host {host[0]!r} is gone ({first_line(err)})"
        except Exception:  # noqa: BLE001 - still restarting: ask again shortly
            self.retry_at[host] = time.monotonic() + 0.5
        else:
            self.recovering.pop(host, None)
            log.debug("host %r answers", host[0])
