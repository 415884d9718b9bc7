"""Pod UID → network namespace: every cgroup naming scheme, and the real /proc on a simulated node."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from netisolate.agent import discovery
from netisolate.agent.discovery import Process
from netisolate.model import Pod, parse_pod
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


def test_sockets_beyond_loopback() -> None:
    from netisolate.agent.listeners import Bound, Socket, beyond_loopback

    bound = [
        Bound(protocol, address, port, 1000)
        for protocol, address, port in [
            ("tcp", "0.0.0.0", 8080),
            ("tcp", "127.0.0.1", 15001),
            ("tcp", "127.0.0.53", 53),
            ("tcp", "192.0.2.10", 8081),  # the pod's own IP
            ("tcp", "::", 15000),
            ("tcp", "::1", 15002),
            ("tcp", "::ffff:192.0.2.10", 8082),
            ("tcp", "::ffff:127.0.0.1", 8083),  # loopback, IPv4-mapped
            ("udp", "0.0.0.0", 53),
            ("udp", "127.0.0.1", 5353),
        ]
    ]
    bound.append(Bound("udp", "0.0.0.0", 5300, 1000, connected=True))  # takes only its peer's datagrams
    assert beyond_loopback(bound) == {
        Socket("tcp", 8080),
        Socket("tcp", 8081),
        Socket("tcp", 15000),
        Socket("tcp", 8082),
        Socket("udp", 53),
    }


class FakeProc:
    """A /proc of pod processes: each PID's cgroup names its pod, its stat its start time, and its
    ns/net links to whatever file stands for its network namespace."""

    def __init__(self, root: Path) -> None:
        self.root, self.scans = root, 0

    def add(self, pid: int, pod_uid: str, netns: str, start: int = 100) -> None:
        proc = self.root / str(pid)
        (proc / "ns").mkdir(parents=True)
        (proc / "cgroup").write_text(f"0::/kubepods.slice/kubepods-pod{pod_uid.replace('-', '_')}.slice/x\n")
        (proc / "stat").write_text(f"{pid} (sleep) S " + " ".join(["0"] * 18 + [str(start)] + ["0"] * 10))
        (proc / "ns" / "net").symlink_to(netns)

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeProc:
    fake = FakeProc(tmp_path)
    real_scan = discovery.scan

    def counted(proc_root: str = "/proc", wanted: Iterable[str] | None = None) -> dict[str, list[Process]]:
        fake.scans += 1
        return real_scan(proc_root, wanted)

    monkeypatch.setattr(discovery, "scan", counted)
    return fake


def _pod(uid: str) -> Pod:
    manifest = pod_manifest("p", "node-a", uid=uid)
    manifest["status"] = {"phase": "Running"}  # no pod IP: the namespace is not confirmed by address
    return parse_pod(manifest)


OTHER = "2a2e3d4c-5b6a-4789-8abc-def012345678"
HOST_INODE = 1  # no real namespace has it: every test namespace counts as a pod's


def test_one_scan_serves_a_round_of_lookups(fake_proc: FakeProc) -> None:
    fake_proc.add(10, UID, "/proc/self/ns/net")
    fake_proc.add(11, OTHER, "/proc/self/ns/net")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root))
    for uid in (UID, OTHER, UID):
        ns = sandboxes.find(_pod(uid))
        assert ns is not None
        ns.close()
    assert fake_proc.scans == 1


def test_a_sandbox_that_just_appeared_is_not_hidden_by_the_cache(fake_proc: FakeProc) -> None:
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root))
    assert sandboxes.find(_pod(UID)) is None
    fake_proc.add(10, UID, "/proc/self/ns/net")
    time.sleep(2 * discovery.RESCAN_MISSING_S)
    ns = sandboxes.find(_pod(UID))
    assert ns is not None, "a pod the cached scan lacks is looked for in a fresh one"
    ns.close()
    assert fake_proc.scans == 2


def test_moved_sees_a_recreated_sandbox_through_a_stale_scan(fake_proc: FakeProc, tmp_path: Path) -> None:
    elsewhere = tmp_path / "new-netns"  # stands for the new sandbox's namespace: only its inode counts
    elsewhere.touch()
    fake_proc.add(10, UID, "/proc/self/ns/net")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root))
    ns = sandboxes.find(_pod(UID))
    assert ns is not None
    try:
        assert not sandboxes.moved(_pod(UID), ns)
        fake_proc.remove(10)  # the sandbox is recreated: new processes, a new namespace
        fake_proc.add(20, UID, str(elsewhere))
        assert sandboxes.moved(_pod(UID), ns), "the cached scan shows only dead processes: scan again"
        fake_proc.remove(20)
        assert not sandboxes.moved(_pod(UID), ns), "no process left is no evidence of a move"
    finally:
        ns.close()


def test_processes_in_the_host_namespace_are_never_the_pods(fake_proc: FakeProc) -> None:
    """CRI-O's conmon sits in the pod's cgroup but the host's namespace."""
    host = NetNS.open("/proc/self/ns/net")
    fake_proc.add(10, UID, "/proc/self/ns/net")
    try:
        sandboxes = discovery.Sandboxes(host.inode, str(fake_proc.root))
        assert sandboxes.find(_pod(UID)) is None
        assert not sandboxes.moved(_pod(UID), host)
    finally:
        host.close()
