"""Pod UID → network namespace: every cgroup naming scheme, and the real /proc on a simulated node."""

from __future__ import annotations

import os

import pytest

from netisolate.agent import discovery
from netisolate.netns import NetNS
from tests.agent_harness import SimulatedPod, pod_manifest

UID = "1f2e3d4c-5b6a-4789-8abc-def012345678"


@pytest.mark.parametrize(
    "cgroup",
    [
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
        "cri-containerd-0123abcd.scope",
        f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-0123abcd.scope",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
        "crio-conmon-0123abcd.scope",
        f"12:memory:/kubepods/burstable/pod{UID}/0123abcd\n11:pids:/kubepods/burstable/pod{UID}/0123abcd",
        f"4:cpu,cpuacct:/kubepods/pod{UID}/0123abcd",
        # kind nodes: the kubelet's slices nested under kubelet.slice
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-0123abcd.scope",
    ],
)
def test_pod_uid_from_every_layout(cgroup: str) -> None:
    assert discovery.pod_uid_from_cgroup(cgroup) == UID


@pytest.mark.parametrize(
    "cgroup",
    [
        "0::/",
        "0::/system.slice/sshd.service",
        "4:memory:/user.slice/pod-not-a-uid",
        "0::/kubepods.slice/kubepods-besteffort.slice",
    ],
)
def test_processes_outside_pods(cgroup: str) -> None:
    assert discovery.pod_uid_from_cgroup(cgroup) is None


@pytest.mark.kernel
@pytest.mark.parametrize("layout", ["systemd", "cgroupfs"])
def test_finds_the_sandbox_namespace_on_a_simulated_node(layout: str) -> None:
    manifest = pod_manifest("p", "node-a")
    uid = manifest["metadata"]["uid"]
    pod = SimulatedPod(manifest, layout)
    host = NetNS.open(f"/proc/{os.getpid()}/ns/net")
    try:
        pod.start_sandbox()
        pod.start_container("app", ["8080"])
        found = discovery.scan(wanted=[uid])
        assert len(found[uid]) == 2 and found[uid][0] == min(found[uid])
        ns = discovery.find_netns(found[uid], host.inode, {"192.0.2.10"})
        assert ns is not None and pod.local.ns is not None and ns.inode == pod.local.ns.inode
        ns.close()
        assert discovery.find_netns(found[uid], host.inode, {"198.51.100.7"}) is None, (
            "the pod IP must be there"
        )
        assert discovery.find_netns(found[uid], pod.local.ns.inode, set()) is None, (
            "never the host's namespace"
        )
    finally:
        host.close()
        pod.close()


def test_wildcard_listeners_from_proc_net_tcp() -> None:
    from netisolate.agent.listeners import wildcard_ports

    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1\n"
        "   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 2\n"
        "   2: 00000000:0050 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 3\n"
        "   3: 00000000000000000000000000000000:3A98 00000000000000000000000000000000:0000 0A 0 0 0 0 0 4\n"
    )
    assert wildcard_ports(table) == {8080, 15000}  # not the 127.0.0.1 listener, not an established socket
