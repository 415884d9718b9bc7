"""The agent running for real against a simulated node (tests/agent_harness.py) and the Kubernetes API
stand-in over HTTP (tests/kube_standin.py).

Gaps of the stand-in that shape these tests: it ignores the field selector (the agent filters by
node itself, and a test asserts the selector is sent) and `timeoutSeconds` (watches here end by a
short client read timeout), and fakes resourceVersions. Both of the agent's watches run against it:
namespaces and this node's pods.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY

from netisolate.agent import endpoints
from netisolate.agent.node import Agent
from netisolate.backends import guarded, run_tool, select_backend
from netisolate.backends.nftables import KEPT
from netisolate.kube import AgentApi
from netisolate.kubeclient import ApiError, Client, Listing
from netisolate.model import parse_pod
from netisolate.policy import pod_policy
from netisolate.rules import Settings, build_ruleset
from tests.agent_harness import SimulatedPod, close_all, pod_manifest
from tests.agent_process import AgentProcess, kubeconfig
from tests.kube_standin import api_client, as_body, declare, ours, put

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]
NODE = "node-a"


class Running:
    """An agent on NODE: the pod list+watch thread and the reconcile loop thread."""

    def __init__(
        self,
        core: client.CoreV1Api,
        backend: str = "nftables",
        *,
        verify_interval: float = 0.3,
        node: str = NODE,
        settings: Settings | None = None,
        api: AgentApi | None = None,
    ) -> None:
        self.agent = Agent(
            node,
            guarded(select_backend("nftables")) if backend == "nftables+guard" else select_backend(backend),
            settings or Settings(),
            api or ours(core),  # the agent's own client, of the server `core` drives
            verify_interval=verify_interval,
            host_netns="/proc/self/ns/net",
            pending_interval=0.05,
        )
        # the agent's own watches, but ending every few seconds (the stand-in ignores timeoutSeconds:
        # the client's read timeout, 2 s past it, ends them), and each new one replays every pod
        self.namespace_watch, self.pod_watch = self.agent.watches(timeout_seconds=1)
        self.threads = [
            self.namespace_watch.start(),
            self.pod_watch.start(),
            threading.Thread(
                target=self.agent.loop,
                args=(self.pod_watch.synced,),
                daemon=True,
            ),
        ]
        self.threads[-1].start()

    def state(self, uid: str) -> str:
        tracked = self.agent.reconciler.pods.get(uid)
        return tracked.state if tracked else "untracked"

    def stop(self) -> None:
        self.agent.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


async def until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def core(kmock: Any) -> AsyncIterator[client.CoreV1Api]:
    declare(kmock)
    put(kmock, "v1/namespaces", {"metadata": {"name": "shop", "labels": {}}})
    yield client.CoreV1Api(api_client(kmock))


def events(kmock: Any, reason: str) -> list[dict[str, Any]]:
    """Events the stand-in stored (not merely received: a rejected create does not count)."""
    stored = [
        dict(obj.raw) for (resource, _, _), obj in list(kmock.objects.items()) if "events" in str(resource)
    ]
    return [event for event in stored if event.get("reason") == reason]


async def create(core: client.CoreV1Api, manifest: dict[str, Any]) -> None:
    await asyncio.to_thread(core.create_namespaced_pod, "shop", as_body(manifest))


async def patch(core: client.CoreV1Api, name: str, annotations: dict[str, str]) -> None:
    await asyncio.to_thread(
        core.patch_namespaced_pod, name, "shop", {"metadata": {"annotations": annotations}}
    )


def probe(pod: SimulatedPod, uid: int, port: int) -> str:
    return pod.local.probe(uid, [("127.0.0.1", port, "tcp")])[0]


@pytest.mark.asyncio
async def test_pod_lifecycle(core: client.CoreV1Api, kmock: Any) -> None:
    manifest = pod_manifest("web", NODE)
    uid = manifest["metadata"]["uid"]
    sim = SimulatedPod(manifest)
    running = Running(core)
    try:
        await create(core, manifest)
        await until(lambda: running.state(uid) == "pending", what="the pod to be tracked")
        await asyncio.to_thread(sim.start_sandbox)  # the sandbox appears after the pod object
        await until(lambda: running.state(uid) == "enforce", what="enforcement")
        await asyncio.to_thread(sim.start_container, "app", ["8080"])
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        assert await asyncio.to_thread(probe, sim, 1001, 8080) == "open"
        await until(lambda: bool(events(kmock, "Enforced")), what="the Enforced event")

        # annotation changed -> new rules
        await patch(core, "web", {"allow.netisolate.io/rogue": "8080"})
        await until(lambda: probe(sim, 1002, 8080) == "open", what="the new grant")

        # the app listens on [::]:8080, which a Service hairpin could reach: reported, naming
        # everyone granted the port (a verification round may have seen it before the new grant)
        def wildcard() -> list[str]:
            return [e["message"] for e in events(kmock, "WildcardListener")]

        await until(
            lambda: any("8080 (granted to proxy, rogue)" in m for m in wildcard()),
            what="the WildcardListener event for the new grant",
        )
        assert all("8080 (granted to proxy" in m for m in wildcard())

        # bad annotation -> fail closed, reported
        await patch(core, "web", {"allow.netisolate.io/proxy": "http"})
        await until(lambda: probe(sim, 1001, 8080) == "refused", what="fail closed")
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        await until(lambda: bool(events(kmock, "PolicyInvalid")), what="the PolicyInvalid event")

        # tampering -> repaired and reported
        assert sim.local.ns is not None
        run_tool(sim.local.ns, ["nft", "insert", "rule", "inet", "netisolate", "loopback", "accept"])
        await until(lambda: bool(events(kmock, "DriftRepaired")), what="the drift repair")
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"

        # deleted -> forgotten, no stale state
        await asyncio.to_thread(core.delete_namespaced_pod, "web", "shop")
        await until(lambda: running.state(uid) == "untracked", what="the pod to be forgotten")
    finally:
        running.stop()
        sim.close()


@pytest.mark.asyncio
async def test_restart_keeps_and_reverifies_rules(core: client.CoreV1Api) -> None:
    manifest = pod_manifest("web", NODE)
    uid = manifest["metadata"]["uid"]
    sim = SimulatedPod(manifest)
    try:
        await asyncio.to_thread(sim.start_sandbox)
        await asyncio.to_thread(sim.start_container, "app", ["8080"])
        await create(core, manifest)
        first = Running(core)
        await until(lambda: first.state(uid) == "enforce", what="enforcement")
        first.stop()  # the agent goes away: the rules stay
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        second = Running(core)
        try:
            await until(second.agent.ready.is_set, what="readiness")
            tracked = second.agent.reconciler.pods[uid]
            assert tracked.state == "enforce" and tracked.detail.startswith("adopted"), (
                "verified, not re-applied"
            )
        finally:
            second.stop()
    finally:
        sim.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
async def test_user_namespaced_pod_enforced_and_adopted(core: client.CoreV1Api, backend: str) -> None:
    """`hostUsers: false`: the agent finds the pod's namespace, writes the pod's own UIDs (from inside
    its user namespace where the backend needs that) and, restarted, reads them back intact."""
    manifest = pod_manifest("userns", NODE)
    manifest["spec"]["hostUsers"] = False
    uid = manifest["metadata"]["uid"]
    sim = SimulatedPod(manifest, user_namespace=True)
    try:
        await asyncio.to_thread(sim.start_sandbox)
        await asyncio.to_thread(sim.start_container, "app", ["8080"])
        await create(core, manifest)
        first = Running(core, backend)
        await until(lambda: first.state(uid) == "enforce", what="enforcement")
        first.stop()
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        assert await asyncio.to_thread(probe, sim, 1001, 8080) == "open"
        second = Running(core, backend)
        try:
            await until(second.agent.ready.is_set, what="readiness")
            assert second.agent.reconciler.pods[uid].detail.startswith("adopted")
        finally:
            second.stop()
    finally:
        sim.close()


@pytest.mark.asyncio
async def test_namespace_label_through_the_watch_turns_isolation_on(core: client.CoreV1Api) -> None:
    annotations = {"allow.netisolate.io/proxy": "8080"}
    manifest = pod_manifest("plain", NODE, annotations)
    del manifest["metadata"]["annotations"]["netisolate.io/isolation"]
    uid = manifest["metadata"]["uid"]
    sim = SimulatedPod(manifest)
    running = Running(core)
    try:
        await asyncio.to_thread(sim.start_sandbox)
        await asyncio.to_thread(sim.start_container, "app", ["8080"])
        await create(core, manifest)
        await until(lambda: running.state(uid) == "off", what="the pod tracked, not isolated")
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "open"
        label = {"metadata": {"labels": {"netisolate.io/isolation": "enforce"}}}
        await asyncio.to_thread(core.patch_namespace, "shop", label)
        await until(lambda: running.state(uid) == "enforce", what="the namespace's floor to apply")
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        assert await asyncio.to_thread(probe, sim, 1001, 8080) == "open"  # the pod's grants still hold
    finally:
        running.stop()
        sim.close()


@pytest.mark.asyncio
async def test_recreated_sandbox_is_found_and_enforced(core: client.CoreV1Api, kmock: Any) -> None:
    """The kubelet recreates a pod's sandbox under the same pod UID: a new network namespace. The
    agent must not keep guarding the old one it still holds open, and must not wait for its next
    verification round to find the new one (here a minute away): the pod's cgroups tell it."""
    manifest = pod_manifest("web", NODE)
    uid = manifest["metadata"]["uid"]
    first, second = SimulatedPod(manifest), SimulatedPod(manifest)
    running = Running(core, verify_interval=60.0)
    try:
        await asyncio.to_thread(first.start_sandbox)
        await create(core, manifest)
        await until(lambda: running.state(uid) == "enforce", what="enforcement")
        # no verification round comes within the test, nor (from here) the pod again by its watch
        running.pod_watch.on_event = lambda kind, obj: None
        # the sandbox, its containers and its namespace go away; the pod's cgroup stays (the
        # kubelet keeps it for the pod's lifetime)...
        await asyncio.to_thread(first.local.close)
        await asyncio.to_thread(second.start_sandbox)  # ...and a new one takes its place
        await asyncio.to_thread(second.start_container, "app", ["8080"])
        assert second.local.ns is not None
        new_inode = second.local.ns.inode

        def moved_on() -> bool:
            tracked = running.agent.reconciler.pods.get(uid)
            return tracked is not None and tracked.ns is not None and tracked.ns.inode == new_inode

        await until(moved_on, what="the new namespace to be found")
        await until(lambda: running.state(uid) == "enforce", what="the new namespace enforced")
        assert await asyncio.to_thread(probe, second, 1002, 8080) == "refused"
        assert await asyncio.to_thread(probe, second, 1001, 8080) == "open"
        assert events(kmock, "SandboxReplaced")
    finally:
        running.stop()
        try:
            second.close()
        finally:
            first.close()  # after: both share the pod's cgroup directories


@pytest.mark.asyncio
async def test_only_this_nodes_pods_and_the_selector_is_sent(core: client.CoreV1Api, kmock: Any) -> None:
    elsewhere = pod_manifest("other", "node-b")
    running = Running(core)
    try:
        await create(core, elsewhere)
        await until(running.pod_watch.synced.is_set, what="the first list")
        await asyncio.sleep(0.5)
        assert running.state(elsewhere["metadata"]["uid"]) == "untracked"
        selectors = {r.params.get("fieldSelector") for r in kmock if str(r.url.path) == "/api/v1/pods"}
        assert selectors == {f"spec.nodeName={NODE}"}
    finally:
        running.stop()


@pytest.mark.asyncio
async def test_api_server_away_changes_nothing(kmock: Any) -> None:
    """With the API server unreachable the agent keeps retrying with backoff and never touches rules."""
    config = client.Configuration()
    config.host = "http://127.0.0.1:9"  # nothing listens there
    manifest = pod_manifest("web", NODE)
    sim = SimulatedPod(manifest)
    try:
        await asyncio.to_thread(sim.start_sandbox)
        await asyncio.to_thread(sim.start_container, "app", ["8080"])
        backend = select_backend("nftables")
        rs = build_ruleset(pod_policy(parse_pod(manifest), {}), Settings())
        assert rs is not None and sim.local.ns is not None
        backend.apply(sim.local.ns, rs)
        running = Running(client.CoreV1Api(client.ApiClient(config)))
        await asyncio.sleep(2.0)
        assert all(t.is_alive() for t in running.threads[:2]), "the watches keep retrying"
        assert not running.agent.ready.is_set()
        assert backend.verify(sim.local.ns, rs) == []
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        running.stop()
    finally:
        sim.close()


def delete_pod(core: client.CoreV1Api, name: str) -> None:
    """A delete that urllib3 retried after the stand-in closed a kept-alive connection under load
    finds the pod gone (404): it was deleted."""
    try:
        core.delete_namespaced_pod(name, "shop")
    except ApiException as err:
        if err.status != 404:
            raise


@pytest.mark.asyncio
@pytest.mark.timeout(600)  # 200 sandboxes: a minute or two on a quiet machine, ~4 min on a loaded one
async def test_churn_leaves_nothing_unenforced_and_nothing_stale(core: client.CoreV1Api) -> None:
    manifests = [pod_manifest(f"churn-{i}", NODE) for i in range(200)]
    sims = [SimulatedPod(m) for m in manifests]
    running = Running(core, verify_interval=5.0)
    starting = asyncio.Semaphore(4)  # pods arrive as on a busy node: several sandboxes at once

    async def start(manifest: dict[str, Any], sim: SimulatedPod) -> None:
        async with starting:
            await asyncio.to_thread(sim.start_sandbox)
            await create(core, manifest)

    try:
        await asyncio.gather(*(start(m, sim) for m, sim in zip(manifests, sims, strict=True)))
        uids = [m["metadata"]["uid"] for m in manifests]
        await until(lambda: all(running.state(u) == "enforce" for u in uids), timeout=60, what="all enforced")
        inodes = {uid: ns.inode for uid in uids if (ns := running.agent.reconciler.pods[uid].ns) is not None}
        assert all(inode in KEPT for inode in inodes.values())
        for manifest in manifests[::2]:
            await asyncio.to_thread(delete_pod, core, manifest["metadata"]["name"])
        await until(lambda: len(running.agent.reconciler.pods) == 100, what="deleted pods forgotten")
        assert all(running.state(u) == "enforce" for u in uids[1::2])
        # the nftables backend keeps a netlink socket per namespace (it pins it): the deleted pods' go
        # (counted by their own namespaces: sockets other tests' agents kept are not this test's)
        deleted = [inodes[u] for u in uids[::2]]
        await until(lambda: not any(i in KEPT for i in deleted), what="the deleted pods' sockets closed")
        assert all(inodes[u] in KEPT for u in uids[1::2]), "the running pods keep theirs"
        running.stop()
        # and a stopped agent holds nothing open: its namespaces, and their sockets, can go
        every = list(inodes.values())
        await until(lambda: not any(i in KEPT for i in every), what="a stopped agent's sockets closed")
    finally:
        running.stop()
        close_all(sims)


@pytest.mark.asyncio
async def test_gate_holds_the_pod_until_its_rules_are_live(core: client.CoreV1Api) -> None:
    """The simulated kubelet runs the gate first and starts the app only when it exits 0."""
    manifest = pod_manifest("gated", NODE)
    sim = SimulatedPod(manifest)
    running: Running | None = None
    try:
        await asyncio.to_thread(sim.start_sandbox)
        gate = sim.local.spawn([sys.executable, "-m", "netisolate", "gate", "--timeout", "30"])
        await asyncio.sleep(1.0)
        assert gate.poll() is None, "no rules yet: the gate must keep the pod waiting"
        await create(core, manifest)
        running = Running(core)
        await until(lambda: gate.poll() is not None, timeout=30, what="the gate to open")
        assert gate.returncode == 0
        applied = running.agent.reconciler.pods[manifest["metadata"]["uid"]].applied
        assert sim.local.ns is not None and applied is not None
        assert select_backend("nftables").verify(sim.local.ns, applied) == []
        await asyncio.to_thread(sim.start_container, "app", ["8080"])  # only now does the app start
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
    finally:
        if running:
            running.stop()
        sim.close()


def test_gate_times_out_without_rules() -> None:
    started = time.monotonic()
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "netisolate", "gate", "--timeout", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "no rules" in result.stderr
    assert time.monotonic() - started < 10


@pytest.mark.asyncio
async def test_status_endpoint(core: client.CoreV1Api) -> None:
    running = Running(core)
    server = endpoints.serve(running.agent, 0, "127.0.0.1")
    try:
        await until(running.agent.ready.is_set, what="readiness")
        port = server.server_address[1]
        out = subprocess.run(
            [sys.executable, "-m", "netisolate", "status", "--metrics-port", str(port), "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out)["ready"] is True
    finally:
        server.shutdown()
        running.stop()


class Outage:
    """A TCP relay in front of the API stand-in that can be cut and restored: an API server outage."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").partition(":")
        self.target = (host, int(port))
        self.up = True
        self.open: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.server = server
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        if not self.up:  # cut while this connection was being opened: it must not outlive the cut
            up_writer.close()
            writer.close()
            return
        self.open += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for writer in self.open:
            writer.close()
        self.open.clear()


@pytest.mark.asyncio
async def test_api_outage_enforcement_continues_and_resumes(core: client.CoreV1Api, kmock: Any) -> None:
    outage = Outage(str(kmock.url))
    config = client.Configuration()
    config.host = await outage.start()
    first, second = pod_manifest("before", NODE), pod_manifest("during", NODE)
    sims = [SimulatedPod(first), SimulatedPod(second)]
    running = Running(client.CoreV1Api(client.ApiClient(config)))
    try:
        await asyncio.to_thread(sims[0].start_sandbox)
        await asyncio.to_thread(sims[0].start_container, "app", ["8080"])
        await create(core, first)
        await until(lambda: running.state(first["metadata"]["uid"]) == "enforce", what="enforcement")

        outage.cut()  # the API server is gone
        ns = sims[0].local.ns
        assert ns is not None
        run_tool(ns, ["nft", "insert", "rule", "inet", "netisolate", "loopback", "accept"])
        applied = running.agent.reconciler.pods[first["metadata"]["uid"]].applied
        assert applied is not None
        await until(
            lambda: select_backend("nftables").verify(ns, applied) == [], what="repair without the API"
        )
        assert await asyncio.to_thread(probe, sims[0], 1002, 8080) == "refused"
        await asyncio.to_thread(sims[1].start_sandbox)
        await create(core, second)  # created while the agent cannot see it
        await asyncio.sleep(1.0)
        assert running.state(second["metadata"]["uid"]) == "untracked"

        outage.up = True  # the API server is back: the watch reconnects and catches up
        await until(
            lambda: running.state(second["metadata"]["uid"]) == "enforce", timeout=45, what="resumption"
        )
    finally:
        running.stop()
        outage.server.close()
        close_all(sims)


class NamespacesDown(Client):
    """The API server answers everything but the Namespace list/watch, until `down` is cleared."""

    down = True

    def list(self, path: str, *, field_selector: str | None = None) -> Listing:
        if self.down and path == "/api/v1/namespaces":
            raise ApiError("GET", path, 500, "namespaces unavailable")
        return super().list(path, field_selector=field_selector)


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.asyncio
async def test_pod_annotation_is_a_floor_while_the_namespace_watch_fails(kmock: Any) -> None:
    """A pod's own `enforce` is acted on at once although the namespace labels never arrive; the
    failing watch shows in /readyz and the metrics, and once it recovers the agent is ready."""
    declare(kmock)
    put(kmock, "v1/namespaces", {"metadata": {"name": "shop", "labels": {}}})
    core = client.CoreV1Api(api_client(kmock))
    down = NamespacesDown(ours(kmock).endpoint)
    manifest = pod_manifest("web", NODE)
    sim = SimulatedPod(manifest)
    running = Running(core, api=down)
    server = endpoints.serve(running.agent, 0, "127.0.0.1")
    port = server.server_address[1]
    try:
        await asyncio.to_thread(sim.start_sandbox)
        await asyncio.to_thread(sim.start_container, "app", ["8080"])
        await create(core, manifest)
        await until(
            lambda: running.state(manifest["metadata"]["uid"]) == "enforce", timeout=5, what="enforce"
        )
        assert await asyncio.to_thread(probe, sim, 1002, 8080) == "refused"
        await until(running.agent.ready.is_set, timeout=5, what="the start-up verification")
        code, body = await asyncio.to_thread(readyz, port)
        assert code == 503 and "namespace list/watch failing: API error 500" in body, body
        assert REGISTRY.get_sample_value("netisolate_watch_up", {"resource": "namespaces"}) == 0
        assert (
            REGISTRY.get_sample_value("netisolate_watch_errors_total", {"resource": "namespaces"}) or 0
        ) > 0

        down.down = False  # the namespace list works again (after the watch's backoff)
        await until(lambda: readyz(port)[0] == 200, timeout=20, what="readiness after recovery")
        assert REGISTRY.get_sample_value("netisolate_watch_up", {"resource": "namespaces"}) == 1
    finally:
        server.shutdown()
        running.stop()
        sim.close()


@pytest.mark.asyncio
async def test_agent_process_takes_the_host_namespace_it_is_given(core: client.CoreV1Api, kmock: Any) -> None:
    """`netisolate agent --host-netns`: here PID 1's namespace cannot be opened, so the agent
    starts at all only when every part of it (backend choice and Agent) uses the one it is given."""
    agent = AgentProcess(str(kmock.url), NODE, "nftables").start()
    try:
        await asyncio.to_thread(agent.wait, lambda: agent.status().get("ready") is True, 20, "readiness")
    finally:
        agent.close()


def test_agent_ends_with_the_reason_when_the_host_namespace_cannot_be_opened(tmp_path: Any) -> None:
    config = kubeconfig("http://127.0.0.1:9", tmp_path)
    argv = [
        "agent",
        "--node-name",
        NODE,
        "--kubeconfig",
        str(config),
        "--host-netns",
        str(tmp_path / "no-such-netns"),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "netisolate", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot open network namespace {tmp_path / 'no-such-netns'}" in result.stderr
    assert "--host-netns" in result.stderr, "says what to do"
