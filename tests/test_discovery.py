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
        # cgroup v2 + cgroupfs driver, read from inside the agent's own cgroup namespace
        f"0::/../../../besteffort/pod{UID}/0123abcd",
        f"0::/../../pod{UID}/0123abcd",
    ],
)
def test_pod_uid_from_every_layout(cgroup: str) -> None:
    assert discovery.pod_uid_from_cgroup(cgroup) == UID


def test_static_pods_are_named_by_their_config_hash() -> None:
    config_hash = "0123456789abcdef0123456789abcdef"
    assert discovery.pod_uid_from_cgroup(f"0::/kubepods.slice/kubepods-pod{config_hash}.slice/x.scope") == (
        config_hash
    )


@pytest.mark.parametrize(
    "cgroup",
    [
        "0::/",
        "0::/system.slice/sshd.service",
        "4:memory:/user.slice/pod-not-a-uid",
        "0::/kubepods.slice/kubepods-besteffort.slice",
        f"0::/user.slice/user-1000.slice/pod{UID}/x",  # not under kubepods: not a pod's
        f"0::/kubepods/besteffort/notapod{UID}/x",  # the name must be a whole path part
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


def test_sockets_beyond_loopback_from_proc_net() -> None:
    from netisolate.agent.listeners import Socket, beyond_loopback

    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    tcp = header + (
        "   0: 00000000:1F90 00000000:0000 0A 0 0 0 0 1000 0 1\n"  # 0.0.0.0:8080
        "   1: 0100007F:3A99 00000000:0000 0A 0 0 0 0 1001 0 2\n"  # 127.0.0.1
        "   2: 00000000:0050 0100007F:C350 01 0 0 0 0 1000 0 3\n"  # established
        "   3: 0A0200C0:1F91 00000000:0000 0A 0 0 0 0 1000 0 4\n"  # 192.0.2.10
        "   4: 3500007F:0035 00000000:0000 0A 0 0 0 0 0 5\n"  # 127.0.0.53
    )
    tcp6 = header + (
        "   0: 00000000000000000000000000000000:3A98 00000000000000000000000000000000:0000 0A 0 0 0 0 0 6\n"
        "   1: 00000000000000000000000001000000:3A9A 00000000000000000000000000000000:0000 0A 0 0 0 0 0 7\n"
        "   2: 0000000000000000FFFF00000A0200C0:1F92 00000000000000000000000000000000:0000 0A 0 0 0 0 0 8\n"
        "   3: 0000000000000000FFFF00000100007F:1F93 00000000000000000000000000000000:0000 0A 0 0 0 0 0 9\n"
    )
    udp = header + (
        "   0: 00000000:0035 00000000:0000 07 0 0 0 0 0 10\n"  # unconnected, 0.0.0.0:53
        "   1: 00000000:A000 0100007F:0035 01 0 0 0 0 0 11\n"  # a connected client
    )
    assert beyond_loopback(tcp, "tcp") == {Socket("tcp", 8080), Socket("tcp", 8081)}
    assert beyond_loopback(tcp6, "tcp") == {Socket("tcp", 15000), Socket("tcp", 8082)}
    assert beyond_loopback(udp, "udp") == {Socket("udp", 53)}
