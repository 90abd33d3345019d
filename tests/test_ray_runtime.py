"""The Ray runtime on a loopback-only cluster: same answers as the local runtime, host faults survived,
timeouts recorded, hung hosts restarted, scoring beside the scheduler, nothing listening beyond the loopback
interface."""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from latent_relay.agents.decoding import DecodeConfig  # noqa: E402
from latent_relay.agents.latent import LatentInput  # noqa: E402
from latent_relay.agents.models import tiny_model  # noqa: E402
from latent_relay.agents.runner import ModelRunner  # noqa: E402
from latent_relay.relay.graph import AgentGraph, Edge, Node, sequential  # noqa: E402
from latent_relay.relay.results import ResultWriter, read_results  # noqa: E402
from latent_relay.relay.runtime.local import LocalRuntime  # noqa: E402
from latent_relay.relay.runtime.node import NodeExecutor  # noqa: E402
from latent_relay.relay.runtime.ray_runtime import HostModel, PlacementError, RayRuntime, start_local_cluster  # noqa: E402
from tests.tiny_agents import ITEMS, ByteTokenizer, FakeTask, Item  # noqa: E402

pytestmark = pytest.mark.ray

ray = None  # imported by the cluster fixture, after the runtime has prepared the loopback-only setting
ARCH, SEED = "llama", 3
DECODE = DecodeConfig(max_new_tokens=8)
LATENT = LatentInput("soft")


def _host_model() -> HostModel:
    return HostModel.tiny(ARCH, SEED, tokenizer=ByteTokenizer())


def _local(graph: AgentGraph, items=ITEMS, batch_size: int = 2):
    loaded = tiny_model(ARCH, SEED)
    runner = ModelRunner.from_loaded(loaded, tokenizer=ByteTokenizer(), latent=LATENT)
    return LocalRuntime(NodeExecutor(runner, DECODE), model_name=loaded.name).run(
        graph, FakeTask(), items, "latent", batch_size=batch_size
    )


def _same(records, reference) -> None:
    assert [r.item_id for r in records] == [r.item_id for r in reference]
    for r, ref in zip(records, reference):
        assert r.error is None, r.error
        assert (r.answer, r.correct, r.output_tokens, r.latent_steps) == (
            ref.answer,
            ref.correct,
            ref.output_tokens,
            ref.latent_steps,
        )
        assert r.edge_bytes == ref.edge_bytes and r.relay_bytes == ref.relay_bytes > 0
        assert r.model == ref.model and set(r.node_seconds) == set(ref.node_seconds)


@pytest.fixture(scope="module")
def cluster():
    """A private Ray cluster that listens on the loopback interface only; shut down afterwards."""
    global ray
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_cluster(num_cpus=2, object_store_memory=128 * 1024**2, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def per_node(cluster):
    rt = RayRuntime(_host_model(), latent=LATENT, decode=DECODE, placement="per-node")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def reference():
    return _local(sequential("latent", latent_steps=4))


def test_sequential_per_node_matches_local(per_node, reference, tmp_path):
    graph = sequential("latent", latent_steps=4)
    out = tmp_path / "results.jsonl"
    seen = []
    records = per_node.run(
        graph, FakeTask(), ITEMS, "latent", batch_size=2, writer=ResultWriter(out), on_result=seen.append
    )
    assert set(per_node.hosts) == {"planner", "critic", "refiner", "judger"}
    _same(records, reference)
    assert sorted(r.item_id for r in seen) == sorted(it.id for it in ITEMS)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["item_id"] for x in lines) == sorted(it.id for it in ITEMS)  # one line per item
    infos = {h: ray.get(handles[0].info.remote()) for h, handles in per_node.hosts.items()}
    pids = {h: info["pid"] for h, info in infos.items()}
    assert len(set(pids.values())) == 4 and os.getpid() not in pids.values()
    glibc = platform.libc_ver()[0] == "glibc"
    assert all(info["allocator_retains_memory"] is glibc for info in infos.values())


def test_mixed_placement_and_text_edges_match_local(per_node):
    """Same-host and cross-host hand-offs in one graph, latent and text edges, a node with two parents."""
    graph = AgentGraph(
        name="diamond",
        nodes=[Node(name=n) for n in ("planner", "critic", "refiner", "judger")],
        edges=[
            Edge(source="planner", target="critic"),
            Edge(source="planner", target="refiner", relay="text"),
            Edge(source="critic", target="judger"),
            Edge(source="refiner", target="judger", relay="text"),
        ],
        latent_steps=3,
    )
    reference = _local(graph, ITEMS[:5], batch_size=3)
    per_node.placement = {"planner": "planner", "critic": "planner", "refiner": "judger", "judger": "judger"}
    try:
        records = per_node.run(graph, FakeTask(), ITEMS[:5], "latent", batch_size=3)
    finally:
        per_node.placement = "per-node"
    _same(records, reference)
    assert ray.get(per_node.hosts["planner"][0].held.remote()) == 0  # no hand-off left behind
    with pytest.raises(PlacementError, match="no host"):
        RayRuntime(_host_model(), placement={"planner": "a"}).plan(graph)


def test_failing_step_gives_error_records_without_retries(per_node, reference):
    """A step that raises (a prompt past the context window) fails its batch only, as in the local runtime."""
    long = Item("long", "Count the apples. " * 80, "0")
    retries = per_node.stats["retries"]
    records = per_node.run(
        sequential("latent", latent_steps=4), FakeTask(), [long, ITEMS[0], ITEMS[0]], "latent", batch_size=1
    )
    assert [r.item_id for r in records] == ["long", "q0", "q0"]
    assert records[0].error and records[0].error.startswith("PromptTooLongError")
    assert records[1].error is None and records[1].answer == records[2].answer == reference[0].answer
    assert per_node.stats["retries"] == retries


def test_killed_host_retries_without_loss_or_duplicates(per_node, reference, tmp_path):
    """All roles on one host (as with placement="shared"); the host dies while batch 1 is under way: its
    items, and the hand-offs it held, are run again."""
    rt, killed = per_node, []
    victim = rt.hosts["critic"][0]

    def on_step(event):
        if event.kind == "submit" and event.batch == 1 and event.node == "critic" and not killed:
            killed.append(ray.get(victim.info.remote())["pid"])
            ray.kill(victim, no_restart=False)

    rt.placement, rt.on_step = dict.fromkeys(("planner", "critic", "refiner", "judger"), "critic"), on_step
    retries = rt.stats["retries"]
    out = tmp_path / "results.jsonl"
    try:
        records = rt.run(
            sequential("latent", latent_steps=4), FakeTask(), ITEMS, "latent", batch_size=2, writer=ResultWriter(out)
        )
    finally:
        rt.placement, rt.on_step = "per-node", None
    assert killed and rt.stats["retries"] > retries
    assert ray.get(victim.info.remote())["pid"] != killed[0]  # restarted
    _same(records, reference)
    written = read_results(out)
    assert sorted(r.item_id for r in written) == sorted(it.id for it in ITEMS)  # none lost, none duplicated


def test_shared_placement_plan(cluster):
    rt = RayRuntime(_host_model(), placement="shared")
    assert set(rt.plan(sequential()).values()) == {"shared"} and not rt.hosts
    graph = AgentGraph(
        nodes=[Node(name="a"), Node(name="b", model="smollm2-135m")], edges=[Edge(source="a", target="b", relay="text")]
    )
    assert rt.plan(graph) == {"a": "shared", "b": "shared:smollm2-135m"}
    with pytest.raises(PlacementError, match="several models"):
        RayRuntime(_host_model(), placement={"a": "h", "b": "h"}).plan(graph)


def test_timeout_gives_error_records(per_node):
    per_node.timeout = 0.05
    try:
        records = per_node.run(sequential("latent", latent_steps=200), FakeTask(), ITEMS[:2], "latent", batch_size=2)
    finally:
        per_node.timeout = None
    assert [r.item_id for r in records] == ["q0", "q1"]
    assert all(r.error and "timeout" in r.error for r in records)
    # the host it abandoned was restarted and serves the next run
    again = per_node.run(sequential("latent", latent_steps=4), FakeTask(), ITEMS[:2], "latent", batch_size=2)
    assert all(r.error is None for r in again)


class HangingTokenizer(ByteTokenizer):
    """Hangs, as a stuck forward would, the first time any host tokenizes a question with ``HANG`` in it (the
    marker file remembers it across host restarts)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, text: str) -> dict:
        if "HANG" in text and not os.path.exists(self.marker):
            Path(self.marker).touch()
            time.sleep(3600)
        return super().__call__(text)


def test_hung_host_is_restarted_by_the_default_deadline(cluster, tmp_path):
    """No --timeout: a host stuck in a step is restarted at the step's default deadline and the batch runs again."""
    marker = tmp_path / "hung"
    model = HostModel.tiny(ARCH, SEED, tokenizer=HangingTokenizer(str(marker)))
    items = [Item("stuck", "HANG " + ITEMS[0].question, ITEMS[0].gold), ITEMS[1]]
    with RayRuntime(model, latent=LATENT, decode=DECODE, min_step_seconds=8.0, min_tokens_per_second=1e6) as rt:
        records = rt.run(sequential("latent", latent_steps=4), FakeTask(), items, "latent", batch_size=1)
        pid = ray.get(rt.hosts["shared"][0].info.remote())["pid"]
        assert pid != rt.host_info["shared"]["pid"]  # restarted
    assert marker.exists()
    assert [r.error for r in records] == [None, None]
    assert rt.stats["timeouts"] == 1 and rt.stats["retries"] == 1


class SlowTask(FakeTask):
    """Scoring the first item takes 3 s (as HumanEval's tests may); records when each scoring ran."""

    def __init__(self):
        self.scoring: dict[str, tuple[float, float]] = {}

    def score(self, item, text: str) -> bool:
        start = time.monotonic()
        if item.id == "q0":
            time.sleep(3.0)
        self.scoring[item.id] = (start, time.monotonic())
        return super().score(item, text)


def test_slow_scoring_does_not_hold_up_steps(per_node, reference):
    """While the first batch is being scored, the pipeline's other batches go on: their steps are collected."""
    task, done = SlowTask(), []
    per_node.on_step = lambda event: done.append(time.monotonic()) if event.kind == "done" else None
    try:
        records = per_node.run(sequential("latent", latent_steps=4), task, ITEMS, "latent", batch_size=2)
    finally:
        per_node.on_step = None
    _same(records, reference)
    start, end = task.scoring["q0"]
    assert end - start >= 3.0
    assert any(start < t < end for t in done), "no step was collected while a batch was being scored"


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _sockets(args: list[str], pids: set[int]) -> list[tuple[str, str, int]]:
    """(local, peer, pid) of every socket ``ss`` lists for one of ``pids``."""
    out = subprocess.run(["ss", *args], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        for chunk in line.split("pid=")[1:]:
            pid = int(chunk.split(",")[0])
            if pid in pids:
                found.append((cols[3], cols[4], pid))
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_cluster_listens_on_loopback_only(per_node):
    ray.get([h[0].info.remote() for h in per_node.hosts.values()])  # cluster and hosts are up
    pids = _descendants(os.getpid())
    listening = _sockets(["-ltnpH"], pids)
    assert len({pid for _, _, pid in listening}) >= 3, listening  # gcs, raylet, workers at least
    exposed = [s for s in listening if not _is_loopback(s[0])]
    assert not exposed, f"Ray processes listen beyond loopback: {exposed}"
    connected = _sockets(["-tnpH", "state", "established"], pids)
    outside = [s for s in connected if not (_is_loopback(s[0]) and _is_loopback(s[1]))]
    assert not outside, f"Ray processes talk to non-loopback addresses: {outside}"
    assert not _is_loopback("0.0.0.0:80") and not _is_loopback("[::]:80")
    assert _is_loopback("[::ffff:127.0.0.1]:9") and _is_loopback("127.0.0.1:6379")
