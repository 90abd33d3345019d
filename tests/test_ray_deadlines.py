"""The Ray scheduler's deadlines and scoring, on a fake Ray with a fake clock: no cluster, exact timings.

A fake host runs each step for a scripted number of (fake) seconds, forever (hung), or fails it as a dead actor
would; ``ray.kill`` ends its running steps and the host answers probes again, as Ray's restart does. Fetching a
result costs the driver time (a step's output 5 ms, a probe's 1 ms), so results are collected one after another.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import pytest

rex = pytest.importorskip("ray.exceptions")

from latent_relay.relay.graph import AgentGraph, Edge, Node, sequential  # noqa: E402
from latent_relay.relay.runtime import cluster  # noqa: E402
from latent_relay.relay.runtime import scheduler as scheduler_module  # noqa: E402
from latent_relay.relay.runtime.deadlines import PROMPT_OVERHEAD, StepDeadlines  # noqa: E402
from latent_relay.relay.runtime.node import NodeOutput  # noqa: E402
from latent_relay.relay.runtime.scheduler import Scheduler  # noqa: E402
from tests.tiny_agents import ITEMS, FakeTask  # noqa: E402

FETCH_SECONDS = 0.001  # driver time to fetch a probe's answer
FETCH_STEP_SECONDS = 0.005  # and a step's output
POLL_SECONDS = 0.05  # the scheduler polls this often while batches are being scored
GIVE_UP_AT = 100_000.0  # fake seconds: a run still going then has stalled


class Stalled(AssertionError):
    pass


class FakeClock:
    """Stands in for the scheduler module's ``time``."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        if self.now > GIVE_UP_AT:
            raise Stalled(f"the run was still going after {GIVE_UP_AT:g} fake seconds")
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        yield_to_scorers(seconds)


def yield_to_scorers(seconds: float) -> None:
    """A short real sleep while the scheduler polls its scoring threads, so that they run (fake time flies)."""
    if seconds <= POLL_SECONDS:
        time.sleep(0.0005)


@dataclass(eq=False)
class FakeRef:
    ready_at: float
    value: object = None
    error: BaseException | None = None
    fetch: float = FETCH_SECONDS


class FakeMethod:
    def __init__(self, fn):
        self.fn = fn

    def options(self, num_returns: int = 1):
        return FakeMethod(lambda *args: self.fn(*args, num_returns=num_returns))

    def remote(self, *args):
        return self.fn(*args)


@dataclass(eq=False)
class FakeHost:
    """``script(call) -> seconds``: how long its ``call``-th step takes (``math.inf``: it hangs; a negative number:
    it dies after that many seconds). ``comes_back``: whether it answers again after a restart."""

    name: str
    clock: FakeClock
    script: object = lambda call: 1.0
    comes_back: bool = True
    calls: list = field(default_factory=list)
    running: list = field(default_factory=list)
    restarts: int = 0

    def __post_init__(self):
        self.step = FakeMethod(self._step)
        self.info = FakeMethod(self._info)
        self.discard = FakeMethod(lambda key: FakeRef(self.clock.now, 0))

    def _step(self, key, graph, node, questions, answer_format, inputs, exports, *packets, num_returns=1):
        seconds = self.script(len(self.calls))
        self.calls.append((key, node))
        n = len(questions)
        out = NodeOutput(texts=list(questions), output_tokens=[1] * n, seconds=seconds)
        if seconds < 0:
            ref = FakeRef(self.clock.now - seconds, error=rex.RayActorError())
        else:
            ref = FakeRef(self.clock.now + seconds, out, fetch=FETCH_STEP_SECONDS)
        self.running.append(ref)
        sent = [FakeRef(ref.ready_at, [b""] * n) for _ in exports]
        return [ref, *sent] if num_returns > 1 else ref

    def _info(self) -> FakeRef:
        answers = self.comes_back or not self.restarts
        return FakeRef(self.clock.now if answers else math.inf, {"host": self.name})

    def kill(self) -> None:
        self.restarts += 1
        for ref in self.running:
            if ref.ready_at > self.clock.now:
                ref.ready_at, ref.error = self.clock.now, rex.RayActorError()


class FakeRay:
    def __init__(self, clock: FakeClock):
        self.clock = clock

    def wait(self, refs, num_returns=1, timeout=None, fetch_local=True):
        ready = [r for r in refs if r.ready_at <= self.clock.now]
        if len(ready) < num_returns and timeout:
            later = sorted(r.ready_at for r in refs if r.ready_at > self.clock.now)
            need = num_returns - len(ready)
            until = self.clock.now + timeout
            if len(later) >= need:
                until = min(until, later[need - 1])
            yield_to_scorers(until - self.clock.now)
            self.clock.now = until
            ready = [r for r in refs if r.ready_at <= self.clock.now]
        ready = ready[:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):
        self.clock.now += ref.fetch
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, handle, no_restart=True):
        handle.kill()


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(cluster, "ray", FakeRay(clock))
    monkeypatch.setattr(cluster, "rex", rex)
    monkeypatch.setattr(scheduler_module, "time", clock)
    return clock


def _scheduler(graph, plan, hosts, task=None, **options) -> Scheduler:
    stats = dict.fromkeys(("batches", "retries", "splits", "timeouts", "failed_items"), 0)
    handles = {name: (h if isinstance(h, list) else [h]) for name, h in hosts.items()}
    return Scheduler(graph, task or FakeTask(), "latent", "fake", plan, handles, stats, **options)


ALONE = AgentGraph(name="alone", nodes=[Node(name="judger")], edges=[])
DIAMOND = AgentGraph(
    name="diamond",
    nodes=[Node(name=n) for n in ("planner", "critic", "refiner", "judger")],
    edges=[
        Edge(source="planner", target="critic"),
        Edge(source="planner", target="refiner"),
        Edge(source="critic", target="judger"),
        Edge(source="refiner", target="judger"),
    ],
)


@pytest.mark.parametrize("limit", ["timeout", "default"])
def test_step_finishing_as_its_deadline_passes_is_not_failed(clock, limit):
    """Two replicas each run a batch's one step; the second finishes exactly at its deadline, while the driver is
    still fetching the first one's output: it is collected after its deadline passed, but it finished, so it is not
    failed."""
    hosts = [FakeHost("h", clock), FakeHost("h", clock)]
    default = StepDeadlines(min_seconds=1.0, min_tokens_per_second=1e9)
    options = {"timeout": 1.0} if limit == "timeout" else {"deadlines": default}
    s = _scheduler(ALONE, {"judger": "h"}, {"h": hosts}, replicas=2, **options)
    records = s.run(ITEMS[:2], batch_size=1)
    assert [r.error for r in records] == [None, None]
    assert s.stats["timeouts"] == 0 and not any(h.restarts for h in hosts)


@pytest.mark.parametrize("retries", [1, 0])
def test_hung_host_is_restarted_by_the_default_deadline(clock, retries):
    """No timeout given: a host whose first step never ends is restarted once its step is past the default
    deadline; the batch is run again (and succeeds), or fails with a record that says so when no retry is left."""
    host = FakeHost("shared", clock, script=lambda call: math.inf if call == 0 else 1.0)
    deadlines = StepDeadlines(min_seconds=60.0, min_tokens_per_second=1e9)
    graph = sequential("latent", latent_steps=2)
    s = _scheduler(graph, dict.fromkeys(graph.order, "shared"), {"shared": host}, deadlines=deadlines)
    s.max_retries = retries
    records = s.run(ITEMS[:2], batch_size=2)
    assert host.restarts == 1 and s.stats["timeouts"] == 1
    assert 60.0 < clock.now < 100.0  # restarted at the deadline, not before nor much after
    if retries:
        assert [r.error for r in records] == [None, None] and s.stats["retries"] == 1
    else:
        assert all("StepTimeoutError" in r.error and "past its 60.0s deadline" in r.error for r in records)
        assert "node 'planner'" in records[0].error


def test_host_that_does_not_come_back_fails_its_batches(clock):
    """A hung host restarted at its deadline whose restart hangs too: given up after ``start_timeout``."""
    host = FakeHost("shared", clock, script=lambda call: math.inf, comes_back=False)
    deadlines = StepDeadlines(min_seconds=10.0, min_tokens_per_second=1e9)
    s = _scheduler(ALONE, {"judger": "shared"}, {"shared": host}, deadlines=deadlines, start_timeout=50.0)
    records = s.run(ITEMS[:2], batch_size=1)
    assert all("did not come back within 50s" in r.error for r in records)
    assert host.restarts == 1 and clock.now < 100.0


def test_late_step_of_a_retried_batch_still_has_a_deadline(clock):
    """The critic's host dies while the refiner's hangs: the batch is run again, and the refiner's host, still
    busy with the abandoned batch's step, is restarted at that step's deadline so the new attempt can run."""
    a = FakeHost("a", clock)
    b = FakeHost("b", clock, script=lambda call: -0.5 if call == 0 else 1.0)  # dies during its first step
    c = FakeHost("c", clock, script=lambda call: math.inf if call == 0 else 1.0)  # hangs in its first step
    plan = {"planner": "a", "critic": "b", "refiner": "c", "judger": "a"}
    deadlines = StepDeadlines(min_seconds=30.0, min_tokens_per_second=1e9)
    s = _scheduler(DIAMOND, plan, {"a": a, "b": b, "c": c}, deadlines=deadlines)
    records = s.run(ITEMS[:1], batch_size=1)
    assert records[0].error is None
    assert s.stats["retries"] == 1 and s.stats["timeouts"] == 1 and c.restarts == 1
    assert [node for _, node in c.calls] == ["refiner", "refiner"]  # the abandoned attempt's, then the retry's


def test_user_timeout_applies_to_a_retried_batch_late_step(clock):
    """The same with a user's ``timeout``: the abandoned step is held to it too."""
    a, b = FakeHost("a", clock), FakeHost("b", clock, script=lambda call: -0.5 if call == 0 else 1.0)
    c = FakeHost("c", clock, script=lambda call: math.inf if call == 0 else 1.0)
    plan = {"planner": "a", "critic": "b", "refiner": "c", "judger": "a"}
    s = _scheduler(DIAMOND, plan, {"a": a, "b": b, "c": c}, timeout=20.0)
    records = s.run(ITEMS[:1], batch_size=1)
    assert records[0].error is None and c.restarts == 1 and s.stats["timeouts"] == 1


class GatedTask(FakeTask):
    """Scoring the first item waits (real seconds) until the test opens the gate."""

    def __init__(self):
        self.gate = threading.Event()
        self.opened: list[bool] = []

    def score(self, item, text: str) -> bool:
        if item.id == "q0":
            self.opened.append(self.gate.wait(timeout=3.0))
        return super().score(item, text)


def test_scoring_does_not_block_collecting_steps(clock):
    """Batch 0's scoring waits for a step of batch 1 to be collected: it is, because scoring runs off the
    scheduler's thread (inline, the gate would never open)."""
    task = GatedTask()
    collected: list = []

    def on_step(event):
        if event.kind == "done":
            collected.append((event.batch, event.node))
            if event.batch == 1:
                task.gate.set()

    host = FakeHost("shared", clock)
    graph = sequential("latent", latent_steps=2)
    s = _scheduler(graph, dict.fromkeys(graph.order, "shared"), {"shared": host}, task=task, on_step=on_step)
    records = s.run(ITEMS[:2], batch_size=1)
    assert task.opened == [True]
    assert [r.error for r in records] == [None, None]
    assert sorted(collected) == sorted((b, n) for b in (0, 1) for n in graph.order)


def test_scoring_error_fails_only_its_batch(clock):
    class Broken(FakeTask):
        def score(self, item, text):
            if item.id == "q1":
                raise ValueError("no answer here")
            return super().score(item, text)

    host = FakeHost("h", clock)
    records = _scheduler(ALONE, {"judger": "h"}, {"h": host}, task=Broken()).run(ITEMS[:3], batch_size=1)
    assert records[0].error is None and records[2].error is None
    assert records[1].error == "ValueError while scoring: no answer here"


def test_default_budget_grows_with_the_work():
    graph = sequential("latent", latent_steps=7)
    d = StepDeadlines(min_seconds=300.0, min_tokens_per_second=1.0)
    planner = d.work(graph, "planner", ["abcd", "ef"], "fmt")
    assert planner == 6 + 2 * (PROMPT_OVERHEAD + 7)  # no answer format nor decoding: it only thinks
    judger = d.work(graph, "judger", ["abcd"], "fmt", parent_tokens=40)
    assert judger == 4 + PROMPT_OVERHEAD + 3 + 256 + 40  # decodes max_new_tokens (DecodeConfig's default)
    assert d.budget("h", 10) == 300.0 and d.budget("h", 5000) == 5000.0
    d.observe("h", 1000, 50.0)  # 20 tokens/s measured: 10x slack is still under the floor's budget
    assert d.budget("h", 5000) == 5000.0
    d.observe("h", 1000, 2000.0)  # 0.5 tokens/s: the host is slower than the floor; its deadlines grow
    assert d.budget("h", 5000) == 10 * 5000 / 0.5 and d.budget("other", 5000) == 5000.0
    with pytest.raises(ValueError, match="min_seconds"):
        StepDeadlines(min_seconds=0)
