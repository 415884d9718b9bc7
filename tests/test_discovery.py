"""Pod UID → network namespace: every cgroup naming scheme, and the real /proc on a simulated node."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
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


NO_CGROUPS = "/dev/null"  # a mountinfo without cgroup mounts: a layout the agent does not know


def test_one_scan_serves_a_round_of_lookups(fake_proc: FakeProc) -> None:
    fake_proc.add(10, UID, "/proc/self/ns/net")
    fake_proc.add(11, OTHER, "/proc/self/ns/net")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), NO_CGROUPS)
    for uid in (UID, OTHER, UID):
        ns = sandboxes.find(_pod(uid))
        assert ns is not None
        ns.close()
    assert fake_proc.scans == 1


def test_a_sandbox_that_just_appeared_is_not_hidden_by_the_cache(fake_proc: FakeProc) -> None:
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), NO_CGROUPS)
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
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), NO_CGROUPS)
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
        sandboxes = discovery.Sandboxes(host.inode, str(fake_proc.root), NO_CGROUPS)
        assert sandboxes.find(_pod(UID)) is None
        assert not sandboxes.moved(_pod(UID), host)
    finally:
        host.close()


# --- a pod's own cgroup, where the kubelet puts it ------------------------------------------------

U_ = UID.replace("-", "_")


@pytest.mark.parametrize(
    ("root", "qos", "first"),
    [
        ("/cg/kubepods", "Guaranteed", f"/cg/kubepods/pod{UID}"),
        ("/cg/kubepods", "Burstable", f"/cg/kubepods/burstable/pod{UID}"),
        ("/cg/kubepods", "BestEffort", f"/cg/kubepods/besteffort/pod{UID}"),
        ("/cg/kubepods.slice", "Guaranteed", f"/cg/kubepods.slice/kubepods-pod{U_}.slice"),
        (
            "/cg/kubepods.slice",
            "Burstable",
            f"/cg/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice",
        ),
        (  # kind: the kubelet's slices nested under kubelet.slice
            "/cg/kubelet.slice/kubelet-kubepods.slice",
            "BestEffort",
            "/cg/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{U_}.slice",
        ),
    ],
)
def test_where_the_kubelet_puts_a_pods_cgroup(root: str, qos: str, first: str) -> None:
    dirs = discovery.pod_cgroup_dirs(root, UID, qos)
    assert dirs[0] == first, "the pod's own QoS class is looked at first"
    assert len(set(dirs)) == 3 and discovery.pod_cgroup_dirs(root, UID)[0].count("/") == root.count("/") + 1
    for directory in dirs:  # what the scan would say of a process there: the same pod
        path = "/" + os.path.relpath(directory, "/cg") + "/cri-containerd-0123.scope"
        assert discovery.pod_uid_from_cgroup(f"0::{path}") == UID
        assert discovery.kubepods_root(path) == root.removeprefix("/cg/").split("/")


def test_the_kubepods_root_of_a_cgroup_path() -> None:
    assert discovery.kubepods_root(f"/kubepods/burstable/pod{UID}/abc") == ["kubepods"]
    assert discovery.kubepods_root(f"/custom/root/kubepods/pod{UID}/abc") == ["custom", "root", "kubepods"]
    assert discovery.kubepods_root(f"/../../besteffort/pod{UID}/abc") == ["..", ".."]
    assert discovery.kubepods_root("/system.slice/sshd.service") is None
    assert discovery.kubepods_root(f"/pod{UID}/abc") is None, "a pod cgroup at the very top has no root"


class FakeHierarchies:
    """cgroup hierarchies in a temporary directory: `unified` (v2: no cgroup.events at its top) and
    `pids` (v1: release_agent at its top), and the mountinfo that names them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "unified").mkdir()
        (root / "pids").mkdir()
        (root / "pids" / "release_agent").touch()
        self.mountinfo = root / "mountinfo"
        self.mountinfo.write_text(
            f"30 25 0:26 / {root} rw - tmpfs tmpfs rw\n"
            f"40 30 0:35 / {root / 'unified'} rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
            f"41 30 0:36 / {root / 'pids'} rw,relatime shared:10 - cgroup cgroup rw,pids\n"
        )

    def pod_dir(self, hierarchy: str, driver: str, uid: str = UID) -> Path:
        if driver == "systemd":
            u = uid.replace("-", "_")
            return (
                self.root
                / hierarchy
                / "kubepods.slice/kubepods-besteffort.slice"
                / (f"kubepods-besteffort-pod{u}.slice")
            )
        return self.root / hierarchy / f"kubepods/besteffort/pod{uid}"

    def layout(self, hierarchy: str, driver: str) -> None:
        """The node's kubepods root and QoS levels, as the kubelet makes them before any pod."""
        self.pod_dir(hierarchy, driver).parent.mkdir(parents=True, exist_ok=True)

    def container(self, pod_dir: Path, name: str, pids: list[int]) -> None:
        directory = pod_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.events").write_text(f"populated {int(bool(pids))}\nfrozen 0\n")
        (directory / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))


@pytest.fixture
def hierarchies(tmp_path: Path) -> FakeHierarchies:
    (tmp_path / "cg").mkdir()
    return FakeHierarchies(tmp_path / "cg")


def test_the_mounts_that_show_a_hierarchy_whole(hierarchies: FakeHierarchies) -> None:
    from netisolate.agent.hierarchy import whole_mounts

    (hierarchies.root / "nested").mkdir()
    (hierarchies.root / "nested" / "cgroup.events").touch()  # a cgroup below the root: not whole
    with hierarchies.mountinfo.open("a") as info:
        info.write(f"42 30 0:35 /x {hierarchies.root / 'nested'} rw - cgroup2 cgroup2 rw\n")
        info.write(f"43 30 0:37 / {hierarchies.root / 'gone'} rw - cgroup cgroup rw,name=systemd\n")
    mounts = whole_mounts(hierarchies.mountinfo.read_text())
    assert [(m.point, sorted(m.controllers)) for m in mounts] == [
        (str(hierarchies.root / "unified"), []),
        (str(hierarchies.root / "pids"), ["pids"]),
    ]


@pytest.mark.parametrize(
    ("where", "driver"),
    [
        (("unified",), "systemd"),  # cgroup v2, systemd driver
        (("unified",), "cgroupfs"),  # cgroup v2, cgroupfs driver
        (("pids",), "cgroupfs"),  # cgroup v1
        (("unified", "pids"), "cgroupfs"),  # hybrid, this machine: the pod in both
        (("pids", "unified"), "systemd"),  # hybrid, the processes only in v1 (v2's cgroup empty)
    ],
)
def test_a_pods_processes_come_from_its_own_cgroup(
    fake_proc: FakeProc, hierarchies: FakeHierarchies, where: tuple[str, ...], driver: str
) -> None:
    """No /proc scan at all: not while the pod's cgroup does not exist yet, not while it is empty,
    not once its sandbox is in it."""
    fake_proc.add(10, UID, "/proc/self/ns/net")
    fake_proc.add(11, OTHER, "/proc/self/ns/net")  # another pod's process: never looked at
    for hierarchy in where:
        hierarchies.layout(hierarchy, driver)
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), str(hierarchies.mountinfo))
    assert sandboxes.find(_pod(UID)) is None, "no cgroup yet: pending"
    for hierarchy in where:
        hierarchies.container(hierarchies.pod_dir(hierarchy, driver), "sandbox", [])
    assert sandboxes.find(_pod(UID)) is None, "an empty cgroup: still pending"
    hierarchies.container(hierarchies.pod_dir(where[0], driver), "sandbox", [10])
    ns = sandboxes.find(_pod(UID))
    assert ns is not None
    ns.close()
    assert sandboxes.cgroup(_pod(UID)) == f"/kubepods.slice/kubepods-pod{U_}.slice/x"  # FakeProc's
    assert not sandboxes.moved(_pod(UID), NetNS.open("/proc/self/ns/net"))
    assert fake_proc.scans == 0


def test_a_pending_pod_never_scans_proc_while_its_cgroup_is_known(
    fake_proc: FakeProc, hierarchies: FakeHierarchies
) -> None:
    """The reconciler retries a pending pod every 20 ms; each retry must be a look at the pod's
    own cgroup, not a scan of every process on the node (46-104 ms with hundreds of them)."""
    from netisolate.agent.reconcile import Reconciler
    from netisolate.rules import Settings
    from tests.test_reconcile import Backend, Events

    hierarchies.layout("unified", "cgroupfs")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), str(hierarchies.mountinfo))
    backend = Backend()
    rec = Reconciler(backend, Settings(), Events(), sandboxes)
    rec.upsert_pod(_pod(UID))
    for _ in range(50):
        rec.retry_pending()
    assert rec.pods[UID].state == "pending" and fake_proc.scans == 0
    fake_proc.add(10, UID, "/proc/self/ns/net")
    hierarchies.container(hierarchies.pod_dir("unified", "cgroupfs"), "sandbox", [10])
    rec.retry_pending()
    assert rec.pods[UID].state == "enforce" and backend.applied
    assert fake_proc.scans == 0


def test_unknown_layouts_fall_back_to_scanning_proc_and_learn_the_root(
    fake_proc: FakeProc, hierarchies: FakeHierarchies, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A kubelet with a cgroup root of its own: the pod's cgroup is not where the default layout
    puts it. After FALLBACK_AFTER_S a scan finds it, and its root is looked in directly after."""
    hierarchies.layout("unified", "systemd")
    custom = hierarchies.root / "unified" / "kubelet.slice" / "kubelet-kubepods.slice"
    proc_dir = custom / "kubelet-kubepods-besteffort.slice" / f"kubelet-kubepods-besteffort-pod{U_}.slice"
    hierarchies.container(proc_dir, "sandbox", [10])
    fake_proc.add(10, UID, "/proc/self/ns/net")
    cgroup_line = f"0::/{proc_dir.relative_to(hierarchies.root / 'unified')}/sandbox\n"
    (fake_proc.root / "10" / "cgroup").write_text(cgroup_line)
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), str(hierarchies.mountinfo))
    assert sandboxes.find(_pod(UID)) is None and fake_proc.scans == 0, "not scanned at once"
    monkeypatch.setattr(discovery, "FALLBACK_AFTER_S", 0.0)
    ns = sandboxes.find(_pod(UID))
    assert ns is not None and fake_proc.scans == 1
    ns.close()
    assert str(custom) in sandboxes.roots()
    other = "3a2e3d4c-5b6a-4789-8abc-def012345678"
    fake_proc.add(20, other, "/proc/self/ns/net")
    other_dir = (
        custom
        / f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{other.replace('-', '_')}.slice"
    )
    hierarchies.container(other_dir, "sandbox", [20])
    ns = sandboxes.find(_pod(other))
    assert ns is not None and fake_proc.scans == 1, "the learned root is looked in directly"
    ns.close()


def test_a_node_without_kubepods_is_scanned(fake_proc: FakeProc, hierarchies: FakeHierarchies) -> None:
    fake_proc.add(10, UID, "/proc/self/ns/net")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), str(hierarchies.mountinfo))
    ns = sandboxes.find(_pod(UID))
    assert ns is not None and fake_proc.scans == 1
    ns.close()


def test_a_pending_pod_is_woken_when_its_cgroup_appears(
    fake_proc: FakeProc, hierarchies: FakeHierarchies
) -> None:
    """inotify: the QoS level's directory until the pod's cgroup exists, then the pod's cgroup
    and its containers' (a process written into cgroup.procs), also once the sandbox is found."""
    hierarchies.layout("unified", "cgroupfs")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), str(hierarchies.mountinfo))
    woken: list[str] = []
    wake = threading.Event()

    def on_change(uid: str) -> None:
        woken.append(uid)
        wake.set()

    sandboxes.on_change(on_change)

    def step(action: Callable[[], None]) -> None:
        wake.clear()
        action()
        assert wake.wait(5), "no wake-up"
        assert sandboxes.find(_pod(UID)) is None or woken

    pod_dir = hierarchies.pod_dir("unified", "cgroupfs")
    assert sandboxes.find(_pod(UID)) is None
    step(pod_dir.mkdir)
    step(lambda: hierarchies.container(pod_dir, "sandbox", []))
    fake_proc.add(10, UID, "/proc/self/ns/net")
    step(lambda: hierarchies.container(pod_dir, "sandbox", [10]))
    assert set(woken) == {UID}
    ns = sandboxes.find(_pod(UID))
    assert ns is not None
    ns.close()
    # found, it stays watched (a recreated sandbox is new cgroups), until the pod is gone
    assert sandboxes._watch.watching(UID) == {str(pod_dir), str(pod_dir / "sandbox")}
    sandboxes.forget(UID)
    assert sandboxes._watch.watching(UID) == set(), "gone: no longer watched"


def test_a_running_pods_other_cgroup_files_wake_no_one(
    fake_proc: FakeProc, hierarchies: FakeHierarchies
) -> None:
    """Found, the pod stays watched, but only a change of who is in its cgroups wakes the
    reconciler: memory.events under pressure, or a systemd reload's rewrites, do not."""
    hierarchies.layout("unified", "cgroupfs")
    sandboxes = discovery.Sandboxes(HOST_INODE, str(fake_proc.root), str(hierarchies.mountinfo))
    wake = threading.Event()
    sandboxes.on_change(lambda uid: wake.set())
    pod_dir = hierarchies.pod_dir("unified", "cgroupfs")
    pod_dir.mkdir(parents=True)
    hierarchies.container(pod_dir, "sandbox", [10])
    fake_proc.add(10, UID, "/proc/self/ns/net")
    ns = sandboxes.find(_pod(UID))
    assert ns is not None
    try:
        wake.clear()
        (pod_dir / "sandbox" / "memory.events").write_text("high 1\n")
        assert not wake.wait(0.5), "a memory event woke the reconciler"
        (pod_dir / "sandbox" / "cgroup.procs").write_text("10\n11\n")  # a process joined
        assert wake.wait(5), "a process joining woke no one"
    finally:
        ns.close()
        sandboxes.forget(UID)


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 198.18.0.0/24 2 0 2
           |-- 198.18.0.0
              /24 link UNICAST
           |-- 198.18.0.7
              /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 198.18.0.7
              /32 host LOCAL
"""
IF_INET6 = (
    "00000000000000000000000000000001 01 80 10 80       lo\n"
    "fd000198001800000000000000000007 02 40 00 80     eth0\n"
)


def test_a_namespaces_own_addresses_from_its_proc_net() -> None:
    assert discovery.local_addresses(FIB_TRIE, IF_INET6) == {
        "127.0.0.1",
        "198.18.0.7",
        "::1",
        "fd00:198:18::7",
    }
    assert discovery.local_addresses("", "") == set()
    manifest = pod_manifest("p", "node-a")
    manifest["status"]["podIPs"] = [{"ip": "fd00:198:18:0::7"}, {"ip": "not-an-ip"}, {"ip": "198.18.0.7"}]
    assert discovery.pod_addresses(parse_pod(manifest)) == {"fd00:198:18::7", "198.18.0.7"}


def test_a_directory_several_pods_wait_on_wakes_each(tmp_path: Path) -> None:
    """One inotify watch per directory, several keys on it: removing one key keeps the others'."""
    from netisolate.agent.hierarchy import IN_CREATE, Watch

    watch, woken, wake = Watch("test-watch"), set[str](), threading.Event()

    def on_change(key: str) -> None:
        woken.add(key)
        wake.set()

    watch.callback = on_change
    watch.add("a", str(tmp_path), IN_CREATE)
    watch.add("b", str(tmp_path), IN_CREATE)
    (tmp_path / "one").mkdir()
    assert wake.wait(5)
    deadline = time.monotonic() + 5
    while woken != {"a", "b"} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert woken == {"a", "b"}
    watch.remove("a")
    woken.clear()
    wake.clear()
    (tmp_path / "two").mkdir()
    assert wake.wait(5) and woken == {"b"}
    assert watch.watching("a") == set() and watch.watching("b") == {str(tmp_path)}
