"""The real node itself (tests/realnode/): containerd runs pods through CRI as the kubelet asks,
with the identity and hardening the pod spec gives each container, on the CNI bridge network."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from netisolate import scenarios
from tests.kube_standin import put
from tests.realnode import pods
from tests.realnode.kubelet import Kubelet, RunningPod
from tests.realnode.node import SUBNET_V4, SUBNET_V6
from tests.realnode.probe import matrix, wait_listening

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(180)]


def scenario_pod(name: str) -> tuple[scenarios.Scenario, dict[str, Any]]:
    return scenarios.load(name), pods.scenario_pod(name)


async def start(kubelet: Kubelet, kmock: Any, manifest: dict[str, Any]) -> RunningPod:
    put(kmock, "v1/pods", manifest)
    started = await asyncio.to_thread(kubelet.sync)
    return next(p for p in started if p.uid == manifest["metadata"]["uid"])


async def exec_out(kubelet: Kubelet, pod: RunningPod, container: str, script: str) -> str:
    result = await asyncio.to_thread(kubelet.exec, pod, container, ["sh", "-c", script])
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.mark.asyncio
async def test_pod_runs_as_the_kubelet_runs_it(kubelet: Kubelet, kmock: Any) -> None:
    _, manifest = scenario_pod("app-proxy-rogue")
    pod = await start(kubelet, kmock, manifest)

    # identity and hardening, seen from inside the container
    status = await exec_out(
        kubelet, pod, "app", "id -u; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status"
    )
    uid, *fields = status.split("\n")
    assert uid == "1000"
    assert dict(f.split(":\t") for f in fields if f) == {
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "CapEff": "0000000000000000",
    }

    # the sandbox sits in the pod's cgroup, as the agent's discovery expects
    cgroups = Path(f"/proc/{pod.pid}/cgroup").read_text()
    assert f"/kubepods/besteffort/pod{pod.uid}/" in cgroups
    assert os.stat(f"/proc/{pod.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino

    # dual-stack addresses from the fixture's subnets, written back into the pod's status
    v4, v6 = (ipaddress.ip_address(ip) for ip in pod.ips)
    assert v4 in ipaddress.ip_network(SUBNET_V4) and v6 in ipaddress.ip_network(SUBNET_V6)
    stored = dict(kmock.objects["v1/pods", "demo", manifest["metadata"]["name"]].raw)
    assert stored["status"]["podIPs"] == [{"ip": ip} for ip in pod.ips]
    assert {s["containerID"] for s in stored["status"]["containerStatuses"]} == {
        f"containerd://{cid}" for cid in pod.containers.values()
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["app-proxy-rogue", "udp-grant"])
async def test_without_rules_every_port_is_open(kubelet: Kubelet, kmock: Any, name: str) -> None:
    """The baseline the agent must change: the scenarios' listeners (TCP by busybox nc, UDP by
    socat on port 53, bindable unprivileged as on containerd 2) reach every client everywhere."""
    scenario, manifest = scenario_pod(name)
    pod = await start(kubelet, kmock, manifest)
    await asyncio.to_thread(wait_listening, pod, scenario.listeners)
    got = await asyncio.to_thread(matrix, kubelet, pod, scenario.listeners, ["rogue"])
    assert all(r == "open" for results in got.values() for r in results), got


@pytest.mark.asyncio
async def test_restart_recreate_delete(kubelet: Kubelet, kmock: Any) -> None:
    _, manifest = scenario_pod("app-proxy-rogue")
    pod = await start(kubelet, kmock, manifest)
    old_id, old_ns = pod.containers["app"], os.stat(f"/proc/{pod.pid}/ns/net").st_ino

    new_id = await asyncio.to_thread(kubelet.restart_container, pod, "app")
    assert new_id != old_id
    stored = dict(kmock.objects["v1/pods", "demo", pod.name].raw)
    app = next(s for s in stored["status"]["containerStatuses"] if s["name"] == "app")
    assert app["containerID"] == f"containerd://{new_id}" and app["restartCount"] == 1

    # held open so the kernel cannot hand the old namespace's inode number to the new one
    held = os.open(f"/proc/{pod.pid}/ns/net", os.O_RDONLY)
    try:
        await asyncio.to_thread(kubelet.recreate_sandbox, pod)
        assert os.stat(f"/proc/{pod.pid}/ns/net").st_ino != old_ns
    finally:
        os.close(held)
    assert await exec_out(kubelet, pod, "proxy", "id -u") == "1001\n"

    sandbox = pod.sandbox_id
    await asyncio.to_thread(kubelet.delete, pod)
    assert sandbox not in {s.id for s in kubelet.cri.sandboxes()}
