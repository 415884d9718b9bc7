"""The real node's teardown leaves the machine as it was: after a clean run, after a test that
failed half-way, and after containerd was SIGKILLed with pods running (its shims, containers and
network namespaces outlive it). Its own module: each test starts a node of its own."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from kubernetes import client

from tests.kube_standin import api_client, declare, put
from tests.realnode.kubelet import Kubelet
from tests.realnode.node import MachineState, RealNode, exclusive, real_node
from tests.realnode.pods import NODE_NAME, scenario_pod

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(180)]


async def run_pods(node: RealNode, kmock: Any, count: int = 2) -> list[int]:
    """Pods with running containers, the kubelet's way; returns their sandbox PIDs."""
    declare(kmock)
    kubelet = Kubelet(node, client.CoreV1Api(api_client(kmock)), NODE_NAME)
    for i in range(count):
        put(kmock, "v1/pods", scenario_pod("app-proxy-rogue", f"teardown-{i}"))
    pods = await asyncio.to_thread(kubelet.sync)
    assert len(pods) == count
    return [p.pid for p in pods]


def assert_clean(node: RealNode, before: MachineState, pids: list[int]) -> None:
    assert node.leftovers() == []
    assert before.differences(MachineState.take()) == []
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")], "sandbox processes survived"


@pytest.mark.asyncio
async def test_teardown_after_sigkill_of_containerd(kmock: Any) -> None:
    with exclusive():
        before = MachineState.take()
        node = RealNode()
        try:
            node.start()
            pids = await run_pods(node, kmock)
            node.kill_containerd()  # shims, pause and containers live on
            assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
        finally:
            node.close()
        assert_clean(node, before, pids)


@pytest.mark.asyncio
async def test_teardown_after_a_failing_test(kmock: Any) -> None:
    """The pods are still running when the test fails: no kubelet cleanup, only the node's."""
    before = MachineState.take()
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), real_node() as node:
        pids = await run_pods(node, kmock)
        raise RuntimeError("the test failed")
    with exclusive():
        assert_clean(node, before, pids)
