"""The agent as a process on the real node, both backends: the shared scenarios with real
containers as clients (the same matrices as on the local harness), and what a node does to pods —
a container restarts, a sandbox is recreated, the agent is killed and restarted with pods running,
a pod is deleted, a namespace label turns isolation on, the Namespace list fails."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from netisolate import scenarios
from tests.agent_process import AgentProcess
from tests.kube_standin import put
from tests.realnode import pods
from tests.realnode.kubelet import Kubelet, RunningPod
from tests.realnode.probe import matrix, probe, wait_listening

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(300)]
ISOLATED = ("enforce", "audit")


@pytest.fixture(params=["nftables", "iptables"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def agent(kmock: Any, backend: str) -> AsyncIterator[AgentProcess]:
    """The agent for the real node, not started yet (tests start it where their story needs it)."""
    process = AgentProcess(str(kmock.url), pods.NODE_NAME, backend)
    try:
        yield process
    finally:
        await asyncio.to_thread(process.close)


def namespace(kmock: Any, name: str, labels: dict[str, str] | None = None) -> None:
    put(
        kmock,
        "v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}},
    )


async def run_pods(kubelet: Kubelet, kmock: Any, manifests: list[dict[str, Any]]) -> list[RunningPod]:
    for manifest in manifests:
        put(kmock, "v1/pods", manifest)
    started = {p.uid: p for p in await asyncio.to_thread(kubelet.sync)}
    return [started[m["metadata"]["uid"]] for m in manifests]


async def until_state(
    agent: AgentProcess, pod: RunningPod, states: tuple[str, ...], timeout: float = 20
) -> None:
    def reached() -> bool:
        return agent.pods().get(pod.uid, {}).get("state") in states

    await asyncio.to_thread(agent.wait, reached, timeout, f"{pod.name} in {states}")


async def check_matrix(
    kubelet: Kubelet, pod: RunningPod, scenario: scenarios.Scenario, backend: str = "nftables"
) -> None:
    """Cgroup scenarios under iptables get what the agent loads there: no grants, all blocked."""
    await asyncio.to_thread(wait_listening, pod, scenario.listeners)
    got = await asyncio.to_thread(matrix, kubelet, pod, scenario.listeners, list(scenario.expect_open))
    wrong = pods.mismatches(scenario, got, pods.fails_closed(scenario, backend))
    assert not wrong, f"{scenario.name}: {wrong}"


def netns_inode(pod: RunningPod) -> str:
    return str(os.stat(f"/proc/{pod.pid}/ns/net").st_ino)


def events(kmock: Any, reason: str) -> list[dict[str, Any]]:
    stored = [
        dict(obj.raw) for (resource, _, _), obj in list(kmock.objects.items()) if "events" in str(resource)
    ]
    return [event for event in stored if event.get("reason") == reason]


@pytest.mark.asyncio
async def test_shared_scenarios_on_real_containers(
    kubelet: Kubelet, kmock: Any, agent: AgentProcess, backend: str
) -> None:
    """Every scenario's pod on containerd, its rules from the agent, probed from inside its
    containers over 127.0.0.1, 127.0.0.53, ::1 and both pod addresses."""
    names = scenarios.names()
    for name in names:
        scenario = scenarios.load(name)
        namespace(kmock, scenario.pod["metadata"]["namespace"], scenario.namespace_labels)
    running = await run_pods(kubelet, kmock, [pods.scenario_pod(n) for n in names])
    agent.start()
    for pod in running:
        await until_state(agent, pod, ISOLATED)
    for name, pod in zip(names, running, strict=True):
        await check_matrix(kubelet, pod, scenarios.load(name), backend)


@pytest.mark.asyncio
async def test_restart_recreate_delete(kubelet: Kubelet, kmock: Any, agent: AgentProcess) -> None:
    scenario = scenarios.load("app-proxy-rogue")
    namespace(kmock, "demo")
    [pod] = await run_pods(kubelet, kmock, [pods.scenario_pod("app-proxy-rogue")])
    agent.start()
    await until_state(agent, pod, ("enforce",))

    # a container restarts: a new container ID in the same namespace; its grant works, rules hold
    await asyncio.to_thread(kubelet.restart_container, pod, "app")
    await check_matrix(kubelet, pod, scenario)

    # the sandbox is recreated: a new network namespace, found and enforced
    await asyncio.to_thread(kubelet.recreate_sandbox, pod)
    new_ns = netns_inode(pod)
    await asyncio.to_thread(
        agent.wait, lambda: agent.pods().get(pod.uid, {}).get("netns") == new_ns, 20, "the new namespace"
    )
    await until_state(agent, pod, ("enforce",))
    await check_matrix(kubelet, pod, scenario)
    await asyncio.to_thread(agent.wait, lambda: bool(events(kmock, "SandboxReplaced")), 10, "SandboxReplaced")

    # the pod is deleted: forgotten
    await asyncio.to_thread(kubelet.delete, pod)
    await asyncio.to_thread(agent.wait, lambda: pod.uid not in agent.pods(), 20, "the pod forgotten")


@pytest.mark.asyncio
async def test_agent_killed_and_restarted_with_pods_running(
    kubelet: Kubelet, kmock: Any, agent: AgentProcess
) -> None:
    """SIGKILL, then a new agent: every pod adopted (its rules read back, none re-applied), and a
    container probing all along never gets through."""
    namespace(kmock, "demo")
    manifests = [pods.scenario_pod("app-proxy-rogue", f"shop-{i}") for i in range(3)]
    running = await run_pods(kubelet, kmock, manifests)
    agent.start()
    for pod in running:
        await until_state(agent, pod, ("enforce",))
    await asyncio.to_thread(wait_listening, running[0], {"app": ["8080"]})

    results: list[str] = []
    done = threading.Event()

    def keep_probing() -> None:  # rogue -> app:8080, over and over, while the agent dies and returns
        while not done.is_set():
            results.extend(probe(kubelet, running[0], "rogue", [("127.0.0.1", 8080, "tcp")]))

    prober = threading.Thread(target=keep_probing)
    prober.start()
    try:
        await asyncio.to_thread(agent.kill)
        await asyncio.sleep(1.0)
        agent.start()
        await asyncio.to_thread(agent.wait, lambda: agent.status().get("ready") is True, 20, "readiness")
    finally:
        done.set()
        await asyncio.to_thread(prober.join)
    rows = agent.pods()
    assert all(
        rows[p.uid]["state"] == "enforce" and rows[p.uid]["detail"].startswith("adopted") for p in running
    ), rows
    assert agent.metric("netisolate_apply_seconds_count") == 0, "nothing re-applied"
    assert len(results) >= 5 and set(results) == {"blocked"}, results


@pytest.mark.asyncio
async def test_namespace_label_turns_isolation_on(kubelet: Kubelet, kmock: Any, agent: AgentProcess) -> None:
    namespace(kmock, "plain")
    manifest = pods.scenario_pod("app-proxy-rogue", namespace="plain")
    del manifest["metadata"]["annotations"]["netisolate.io/isolation"]
    [pod] = await run_pods(kubelet, kmock, [manifest])
    agent.start()
    await until_state(agent, pod, ("off",))
    await asyncio.to_thread(wait_listening, pod, {"app": ["8080"]})
    assert await asyncio.to_thread(probe, kubelet, pod, "rogue", [("127.0.0.1", 8080, "tcp")]) == ["open"]

    await asyncio.to_thread(
        kubelet.core.patch_namespace,
        "plain",
        {"metadata": {"labels": {"netisolate.io/isolation": "enforce"}}},
    )
    await until_state(agent, pod, ("enforce",))
    await check_matrix(kubelet, pod, scenarios.load("app-proxy-rogue"))


@pytest.mark.asyncio
async def test_enforced_at_once_while_the_namespace_list_fails(
    kubelet: Kubelet, kmock: Any, agent: AgentProcess
) -> None:
    """The pod's own `enforce` is a floor: enforced although the namespace labels never arrive;
    /readyz says why it is not ready until the list works again."""
    down = {"namespaces": True}
    kmock["get /api/v1/namespaces"][lambda _: down["namespaces"]] << 500
    namespace(kmock, "demo")
    [pod] = await run_pods(kubelet, kmock, [pods.scenario_pod("app-proxy-rogue")])
    agent.start()
    await until_state(agent, pod, ("enforce",), timeout=10)
    await check_matrix(kubelet, pod, scenarios.load("app-proxy-rogue"))
    code, body = await asyncio.to_thread(agent.get, "/readyz")
    assert code == 503 and "namespace list/watch failing" in body, body
    assert agent.metric("netisolate_watch_up", 'resource="namespaces"') == 0

    down["namespaces"] = False
    await asyncio.to_thread(
        agent.wait, lambda: agent.get("/readyz")[0] == 200, 40, "readiness after recovery"
    )
