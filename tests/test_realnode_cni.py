"""netisolate's CNI plugin chained on the real node (containerd 1.6 + runc + CNI bridge): what the
runtime does with it, both backends."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from kubernetes import client

from netisolate.backends.guarded import GuardedBackend
from netisolate.cni import conflist
from netisolate.netns import NetNS
from tests.kube_standin import api_client, declare, put
from tests.realnode.cni import (
    EagerKubelet,
    first_attempt,
    loaded_chain,
    new_agent,
    race_pod,
    serve,
    unchain,
    until_loaded,
)
from tests.realnode.kubelet import RunningPod
from tests.realnode.node import RealNode
from tests.realnode.pods import NODE_NAME
from tests.test_agent import Running

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(300)]


class Chained:
    """The agent on the real node with its plugin chained; kubelet runs pods the API holds."""

    def __init__(self, node: RealNode, core: client.CoreV1Api, backend: str) -> None:
        self.node, self.core, self.backend = node, core, backend
        self.stop = threading.Event()
        self.agent = new_agent(core, backend)
        self.service = serve(node, self.agent, core, self.stop)
        self.kubelet = EagerKubelet(node, core, NODE_NAME)

    def run(self, manifest: dict[str, Any]) -> RunningPod:
        meta = manifest["metadata"]
        put_pod(self.core, manifest)
        assert meta["uid"]
        return self.kubelet.run(manifest)

    def refused_sandbox(self, manifest: dict[str, Any]) -> str:
        """RunPodSandbox fails: the runtime's error (which carries the plugin's message)."""
        put_pod(self.core, manifest)
        with pytest.raises(grpc.RpcError) as failure:
            self.kubelet.run(manifest)
        self.kubelet.pods.pop(manifest["metadata"]["uid"], None)
        return str(failure.value.details())

    def agent_down(self) -> None:
        self.service.close()
        os.unlink(self.service.server.server_address)  # type: ignore[arg-type]

    def agent_up(self) -> None:
        from netisolate.agent.cni import CniHandler
        from netisolate.agent.cni_server import CniServer
        from tests.kube_standin import ours
        from tests.realnode.cni import options

        server = CniServer(options(self.node).socket, CniHandler(self.agent.reconciler, ours(self.core)))
        server.start()
        self.service.server = server

    def close(self) -> None:
        try:
            self.kubelet.close()
        finally:
            unchain(self.node, self.service, self.stop)
            for tracked in list(self.agent.reconciler.pods.values()):
                if tracked.ns is not None:
                    tracked.ns.close()
            self.agent.host.close()


def put_pod(core: client.CoreV1Api, manifest: dict[str, Any]) -> None:
    core.create_namespaced_pod(manifest["metadata"]["namespace"], manifest)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def core(kmock: Any) -> AsyncIterator[client.CoreV1Api]:
    declare(kmock)
    for name in ("shop", "kube-system"):
        put(kmock, "v1/namespaces", {"metadata": {"name": name, "labels": {}}})
    yield client.CoreV1Api(api_client(kmock))


@pytest_asyncio.fixture(params=["nftables", "iptables"])
async def chained(
    node: RealNode, core: client.CoreV1Api, request: pytest.FixtureRequest
) -> AsyncIterator[Chained]:
    running = await asyncio.to_thread(Chained, node, core, request.param)
    try:
        yield running
    finally:
        await asyncio.to_thread(running.close)


@pytest.mark.asyncio
async def test_every_first_attempt_is_refused(chained: Chained) -> None:
    """The rogue container connects the moment the app listens: refused every time, because the
    rules were in before the sandbox's first container started (the plugin answered first)."""
    results = []
    for i in range(8):
        pod = await asyncio.to_thread(chained.run, race_pod(f"race-{i}", NODE_NAME))
        results.append(await asyncio.to_thread(first_attempt, chained.kubelet, pod))
        tracked = chained.agent.reconciler.pods[pod.uid]
        assert tracked.ns is not None and tracked.ns.inode == os.stat(f"/proc/{pod.pid}/ns/net").st_ino
    assert results == ["refused"] * 8


@pytest.mark.asyncio
async def test_agent_down_holds_isolated_pods_back_and_lets_exempt_ones_start(chained: Chained) -> None:
    running = await asyncio.to_thread(chained.run, race_pod("before", NODE_NAME))
    await asyncio.to_thread(chained.agent_down)
    waiting = race_pod("while-down", NODE_NAME)
    error = await asyncio.to_thread(chained.refused_sandbox, waiting)
    assert "shop/while-down may be isolated and cannot be checked" in error, error
    assert "Start the netisolate agent" in error
    exempt = await asyncio.to_thread(chained.run, race_pod("dns", NODE_NAME, "kube-system", isolated=False))
    assert await asyncio.to_thread(first_attempt, chained.kubelet, exempt) == "open", (
        "exempt: no rules at all"
    )
    # DEL with the agent down: the runtime tears sandboxes down all the same
    await asyncio.to_thread(chained.kubelet.delete, running)
    assert running.sandbox_id not in {s.id for s in chained.kubelet.cri.sandboxes()}
    await asyncio.to_thread(chained.agent_up)
    retried = await asyncio.to_thread(chained.kubelet.run, waiting)  # the kubelet's next attempt
    assert await asyncio.to_thread(first_attempt, chained.kubelet, retried) == "refused"


@pytest.mark.asyncio
async def test_del_for_a_pod_the_agent_never_saw_succeeds(chained: Chained) -> None:
    pod = await asyncio.to_thread(chained.run, race_pod("forgotten", NODE_NAME))
    chained.agent.reconciler.forget(pod.uid)  # as a restarted agent that has not met it yet
    await asyncio.to_thread(chained.kubelet.delete, pod)
    assert pod.sandbox_id not in {s.id for s in chained.kubelet.cri.sandboxes()}


@pytest.mark.asyncio
async def test_a_rewritten_conflist_is_chained_again_within_two_seconds(chained: Chained) -> None:
    path = chained.node.cni_conf / "10-netisolate.conflist"
    delays = []
    for _ in range(5):
        plain = json.loads(path.read_text())
        plain["plugins"] = [p for p in plain["plugins"] if p["type"] != conflist.PLUGIN_TYPE]
        partial = path.with_name(".rewrite.partial")
        partial.write_text(json.dumps(plain))
        started = time.monotonic()
        os.replace(partial, path)  # as the node's CNI installer writes it
        while json.loads(path.read_text())["plugins"][-1]["type"] != conflist.PLUGIN_TYPE:
            assert time.monotonic() - started < 2.0, "not back in the file within 2 s"
            await asyncio.sleep(0.005)
        delays.append(time.monotonic() - started)
        await asyncio.to_thread(until_loaded, chained.node, True, 2.0)
    assert max(delays) < 2.0 and loaded_chain(chained.node)[-1] == conflist.PLUGIN_TYPE
    pod = await asyncio.to_thread(chained.run, race_pod("after-rewrite", NODE_NAME))
    assert await asyncio.to_thread(first_attempt, chained.kubelet, pod) == "refused"


@pytest.mark.asyncio
async def test_a_recreated_sandbox_is_enforced_before_its_containers_start_again(chained: Chained) -> None:
    """Without the plugin the agent meets a recreated sandbox only at its next verification round;
    with it, the runtime hands the new namespace over before the containers start again."""
    pod = await asyncio.to_thread(chained.run, race_pod("recreated", NODE_NAME))
    assert await asyncio.to_thread(first_attempt, chained.kubelet, pod) == "refused"
    old = os.stat(f"/proc/{pod.pid}/ns/net").st_ino
    # held open so the kernel cannot hand the old namespace's inode number to the new one
    held = os.open(f"/proc/{pod.pid}/ns/net", os.O_RDONLY)
    try:
        await asyncio.to_thread(chained.kubelet.recreate_sandbox, pod)
        new = os.stat(f"/proc/{pod.pid}/ns/net").st_ino
    finally:
        os.close(held)
    assert new != old
    assert await asyncio.to_thread(first_attempt, chained.kubelet, pod) == "refused"
    tracked = chained.agent.reconciler.pods[pod.uid]
    assert tracked.ns is not None and tracked.ns.inode == new and tracked.state == "enforce"


@pytest.mark.asyncio
@pytest.mark.parametrize("identity", ["uid", "cgroup"])
async def test_the_socket_guard_takes_over_a_chained_pod_from_its_table(
    node: RealNode, core: client.CoreV1Api, kmock: Any, identity: str
) -> None:
    """--socket-guard with the plugin chained and the agent's loop running: the CNI ADD's table
    holds the sandbox back and refuses the rogue's first attempt; once the sandbox's cgroup is
    seen, before its containers open a socket, the guard takes over (race pods of either
    identity: under UID identity the agent looks up the pod's cgroup for the guard alone)."""
    running = Running(core, "nftables+guard", node=NODE_NAME, verify_interval=0.5)
    stop = threading.Event()
    service = await asyncio.to_thread(serve, node, running.agent, core, stop)
    kubelet = EagerKubelet(node, core, NODE_NAME)
    backend = running.agent.reconciler.backend
    assert isinstance(backend, GuardedBackend)
    try:
        taken = []
        for i in range(8):
            manifest = race_pod(f"guard-race-{i}", NODE_NAME)
            manifest["metadata"]["annotations"]["netisolate.io/identity"] = identity
            put(kmock, "v1/pods", manifest)  # (the client's create would wait behind the agent's watches)
            pod = await asyncio.to_thread(kubelet.run, manifest)
            assert await asyncio.to_thread(first_attempt, kubelet, pod) == "refused"
            with NetNS.open(f"/proc/{pod.pid}/ns/net") as ns:
                taken.append(not await asyncio.to_thread(backend.inner.installed, ns))
        print(f"\nchained {identity} identity pods the guard took over: {sum(taken)} of {len(taken)}")
        assert all(taken)
    finally:
        await asyncio.to_thread(kubelet.close)
        await asyncio.to_thread(unchain, node, service, stop)
        await asyncio.to_thread(running.stop)
