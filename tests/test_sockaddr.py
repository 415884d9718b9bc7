"""The socket guard (cgroup BPF, issue 14's route past netfilter's per-packet cost): the assembler
and the maps' contents as pure functions, then the programs in the real kernel on real cgroups:
what is judged, what passes untouched, ownership at bind(), counting, learning, audit, updates."""

from __future__ import annotations

import importlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from netisolate import learning
from netisolate.backends import EnforceError, bpf, run_tool
from netisolate.backends.guarded import GuardedBackend, reserved
from netisolate.learning import Observed
from netisolate.localpod import PEER_IPV4, POD_IPV4, POD_IPV6, LocalPod, as_uid
from netisolate.model import Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.policy import PortRange, pod_policy
from netisolate.rules import Cgroup, PodCgroups, RuleSet, Settings, build_ruleset, ebpf, nft, sockaddr

GOLDEN = Path(__file__).resolve().parent / "golden_guard"


def guarded_pod(
    mode: str = "enforce",
    app: str = "8080, 9000-9100, 9",
    identity: str = "cgroup",
    uids: tuple[int, int, int] = (1000, 1000, 1000),
) -> Pod:
    """app may reach the proxy's 8080 and a range; the proxy declares 8080 and 53/udp; rogue is
    granted nothing. By default all three share a UID: only the cgroup tells them apart."""
    app_user, proxy_user, rogue_user = ({"runAsUser": uid} for uid in uids)
    return parse_pod(
        {
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "annotations": {
                    "netisolate.io/isolation": mode,
                    "netisolate.io/identity": identity,
                    "allow.netisolate.io/app": app,
                },
            },
            "spec": {
                "containers": [
                    {"name": "app", "securityContext": app_user},
                    {
                        "name": "proxy",
                        "securityContext": proxy_user,
                        "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}],
                    },
                    {"name": "rogue", "securityContext": rogue_user},
                ]
            },
        }
    )


def uid_pod(mode: str = "enforce") -> Pod:
    """guarded_pod under UID identity: each container a UID of its own (app 1000, proxy 1001,
    rogue 1002), as admission wants."""
    return guarded_pod(mode, identity="uid", uids=(1000, 1001, 1002))


SEEN = PodCgroups(4, Cgroup(40, "p"), (("app", Cgroup(41, "p/a")), ("proxy", Cgroup(42, "p/b"))))


def ruleset(pod: Pod, cgroups: PodCgroups = SEEN) -> RuleSet:
    rs = build_ruleset(pod_policy(pod, {}), Settings(), cgroups=cgroups)
    assert rs is not None
    return rs


# --- pure -------------------------------------------------------------------------------------


def test_prefixes_cover_a_range_exactly_with_aligned_blocks() -> None:
    rng = random.Random(14)
    cases = [(0, 65535), (1, 65535), (9000, 9100), (8080, 8080), (1, 2)]
    for _ in range(300):
        a, b = rng.randrange(65536), rng.randrange(65536)
        cases.append((min(a, b), max(a, b)))
    for low, high in cases:
        blocks = sockaddr.prefixes(PortRange("tcp", low, high))
        covered: list[int] = []
        for start, bits in blocks:
            size = 1 << (16 - bits)
            assert start % size == 0, (low, high, start, bits)
            covered += range(start, start + size)
        assert covered == list(range(low, high + 1))
        assert len(blocks) <= 30  # at most two blocks per bit length


def test_maps_hold_each_seen_container_by_cgroup_and_leave_the_unseen_out() -> None:
    guard = sockaddr.guard(ruleset(guarded_pod()))
    grants = guard.entries["grants"]
    expected = {(128, 8080)} | {
        (112 + bits, port) for port, bits in sockaddr.prefixes(PortRange("tcp", 9000, 9100))
    }
    # 8080 and the range's blocks; the sentinel's grant left out (dead behind its refusal)
    assert {
        (struct.unpack_from("=I", key)[0], struct.unpack_from(">H", key, 18)[0]) for key in grants
    } == expected
    assert {key[4:18] for key in grants} == {sockaddr.identity_key(0, 41, 6, 0)[:14]}
    assert guard.entries["owned"] == {
        struct.pack(">HH", 6, 8080): b"\1\0\0\0",
        struct.pack(">HH", 17, 53): b"\1\0\0\0",
    }
    assert set(guard.entries["owners"]) == {
        sockaddr.identity_key(0, 42, 6, 8080),
        sockaddr.identity_key(0, 42, 17, 53),
    }
    # rogue not seen yet: nothing names it (nor the pod's own cgroup, 0): UNKNOWN counts them
    assert guard.identities == {sockaddr.UNKNOWN: "", 41: "app", 42: "proxy"}


def test_under_uid_identity_the_maps_name_each_uid_where_a_cgroup_goes() -> None:
    """Counters and the record read as cgroup identity's do: who is the UID, the UID slot 0."""
    rs = ruleset(uid_pod(), PodCgroups(2, Cgroup(40, "p")))
    guard = sockaddr.guard(rs)
    assert sockaddr.unfit(rs) is None
    assert {key[4:18] for key in guard.entries["grants"]} == {sockaddr.identity_key(0, 1000, 6, 0)[:14]}
    assert set(guard.entries["owners"]) == {
        sockaddr.identity_key(0, 1001, 6, 8080),
        sockaddr.identity_key(0, 1001, 17, 53),
    }
    assert guard.identities == {sockaddr.UNKNOWN: "", 1000: "app", 1001: "proxy", 1002: "rogue"}
    # a container that runs as root owns root's counter, and no one else's refusals land there
    root = sockaddr.guard(ruleset(guarded_pod(identity="uid", uids=(0, 1001, 1002)), SEEN))
    assert root.identities == {sockaddr.UNKNOWN: "", 0: "app", 1001: "proxy", 1002: "rogue"}
    # without the pod's cgroup (what an agent without --socket-guard builds) there is nowhere to attach
    assert sockaddr.unfit(ruleset(uid_pod(), PodCgroups(2))) == "the pod's cgroup is not known yet"
    assert ruleset(uid_pod(), PodCgroups(2)).pod_cgroup is None
    # a user-namespaced pod: the helpers' UIDs are the node's, and port-forward cannot pass anyway
    userns = build_ruleset(pod_policy(uid_pod(), {}), Settings(), True, PodCgroups(2, Cgroup(40, "p")))
    assert userns is not None and (sockaddr.unfit(userns) or "").startswith("the runtime's port-forward")


def test_the_assembler_resolves_labels_wide_loads_and_unsigned_immediates() -> None:
    program = [
        ebpf.load_map(ebpf.R1, "m"),
        ebpf.jump(ebpf.R2, "==", 0xFFFF0000, "end", low32=True),
        ebpf.goto("end"),
        ebpf.Label("end"),
        *ebpf.exit_with(1),
    ]
    code = ebpf.encode(program, {"m": 7})
    insns = [struct.unpack_from("<BBhi", code, i) for i in range(0, len(code), 8)]
    assert insns[0] == (0x18, 0x11, 0, 7) and insns[1] == (0, 0, 0, 0)  # two slots, the map's fd
    assert insns[2] == (0x16, 0x02, 1, -65536)  # JMP32 JEQ, over the goto
    assert insns[3] == (0x05, 0, 0, 0)
    with pytest.raises(ValueError, match="twice"):
        ebpf.encode([ebpf.Label("x"), ebpf.Label("x")], {})
    with pytest.raises(ValueError, match="sign-extended"):  # a 64-bit compare would never match it
        ebpf.encode([ebpf.jump(ebpf.R2, "==", 0xFFFF0000, "x"), ebpf.Label("x")], {})


@pytest.mark.parametrize(
    ("identity", "body"),
    [
        *(("cgroup", b) for b in ("judge4", "judge6", "bind", "create")),
        ("uid+cgroup", "judge4"),
        *(("uid", b) for b in ("judge4", "bind")),
    ],
)
def test_programs_match_their_golden_files(identity: str, body: str) -> None:
    """A change to the programs shows as a diff; regenerate with NETISOLATE_UPDATE_GOLDEN=1."""
    pod = uid_pod() if identity == "uid" else guarded_pod(identity=identity)
    text = ebpf.text(sockaddr.guard(ruleset(pod)).programs[body]) + "\n"
    golden = GOLDEN / f"{body}{'' if identity == 'cgroup' else '@' + identity}.txt"
    if os.environ.get("NETISOLATE_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


# --- in the kernel ----------------------------------------------------------------------------

kernel = pytest.mark.kernel


class Guarded:
    def __init__(self, local: LocalPod, mode: str = "enforce") -> None:
        assert local.ns is not None and local.cgroup is not None
        self.local, self.rs = local, ruleset(local.pod, local.cgroups())
        self.guard = sockaddr.guard(self.rs)
        self.installed = bpf.install(str(local.cgroup), self.guard, *bpf.local_addresses(local.ns))

    def probe(self, container: str, *targets: tuple[str, int, str]) -> list[str]:
        return self.local.probe(1000, list(targets), container=container)


@pytest.fixture
def guarded() -> Iterator[Guarded]:
    with LocalPod(guarded_pod()) as local:
        g = Guarded(local)
        try:
            yield g
        finally:
            g.installed.detach()


LOOPBACKS = ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", POD_IPV4, POD_IPV6]


@kernel
def test_grants_by_cgroup_on_every_local_address(guarded: Guarded) -> None:
    guarded.local.listen("proxy", ["8080", "9050"])
    granted = [(a, 8080, "tcp") for a in LOOPBACKS if not a.startswith("127.9")] + [
        ("127.0.0.1", 9050, "tcp")
    ]
    assert guarded.probe("app", *granted) == ["open"] * len(granted)
    # the same UID in other containers: refused before a packet leaves, on every local address
    judged = [(a, 8080, "tcp") for a in LOOPBACKS] + [("127.0.0.1", 9050, "tcp")]
    assert guarded.probe("rogue", *judged) == ["eperm"] * len(judged)
    assert guarded.probe("app", ("127.0.0.1", 9101, "tcp"), ("::1", 8081, "tcp")) == ["eperm", "eperm"]
    # the sentinel, even where granted, answers as the table's does (what the gate waits for);
    # UDP is judged too, and not granted
    assert guarded.probe("app", ("127.0.0.1", 9, "tcp"), ("127.0.0.1", 53, "udp")) == ["unreachable", "eperm"]
    assert guarded.probe("rogue", ("::1", 9, "tcp")) == ["unreachable"]
    # beyond the pod: untouched (the peer answers with a reset)
    assert guarded.probe("rogue", (PEER_IPV4, 8080, "tcp")) == ["refused"]


SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for a in sys.argv[1:]:
    try:
        s.sendto(b"x", (a, 5000))
        print("sent")
    except OSError as e:
        print(e.errno)
"""
BIND = """
import socket
TCP, UDP = socket.SOCK_STREAM, socket.SOCK_DGRAM
for kind, port in ((TCP, 8080), (UDP, 53), (TCP, 8081), (TCP, 0)):
    s = socket.socket(socket.AF_INET6, kind)
    try:
        s.bind(("::", port))
        print("bound")
    except OSError as e:
        print(e.errno)
"""


def _python(local: LocalPod, container: str, script: str, *args: str, uid: int | None = None) -> list[str]:
    """What a script printed, run in the container's cgroup (as root, where no UID is given: cgroup
    identity knows no UID)."""
    argv = ["/usr/bin/python3", "-c", script, *args]
    proc = local.spawn(argv if uid is None else as_uid(uid, argv), container=container)
    out, _ = proc.communicate(timeout=10)
    local.processes.remove(proc)
    return out.split()


@kernel
def test_unconnected_udp_multicast_and_broadcast_are_judged(guarded: Guarded) -> None:
    targets = ["127.0.0.1", "224.0.0.251", "255.255.255.255", "192.0.2.255", PEER_IPV4]
    # EPERM (1) for what stays in the pod: the subnet's broadcast too, as the local table says
    assert _python(guarded.local, "rogue", SEND, *targets) == ["1", "1", "1", "1", "sent"]
    targets6 = ["::1", "ff02::1", "::ffff:127.0.0.1", POD_IPV6, "2001:db8::1"]
    assert _python(guarded.local, "rogue", SEND.replace("AF_INET,", "AF_INET6,"), *targets6) == [
        *["1"] * 4,
        "sent",
    ]


UDPLITE = """
import socket
V4, V6, DGRAM, STREAM = socket.AF_INET, socket.AF_INET6, socket.SOCK_DGRAM, socket.SOCK_STREAM
for family, kind, protocol in ((V4, DGRAM, 136), (V6, DGRAM, 136), (V4, DGRAM, 0), (V6, STREAM, 0)):
    try:
        socket.socket(family, kind, protocol).close()
        print("made")
    except OSError as e:
        print(e.errno)
"""


@kernel
def test_udp_lite_sockets_are_refused_since_no_connect_of_theirs_is_judged(guarded: Guarded) -> None:
    """The kernel runs no connect program for UDP-Lite: a connected one would send to any port of
    the pod unjudged (the table drops those datagrams), so the guard refuses making one at all."""
    assert _python(guarded.local, "app", UDPLITE) == ["1", "1", "made", "made"]


@kernel
def test_bind_keeps_a_declared_port_to_its_owner(guarded: Guarded) -> None:
    assert _python(guarded.local, "rogue", BIND) == ["1", "1", "bound", "bound"]
    assert _python(guarded.local, "proxy", BIND) == ["bound", "bound", "bound", "bound"]
    assert guarded.installed.refused(guarded.guard)["rogue"] == 2


@kernel
def test_refusals_are_counted_and_recorded_by_container(guarded: Guarded) -> None:
    guarded.probe("rogue", ("127.0.0.1", 8080, "tcp"), ("127.0.0.1", 8080, "tcp"), ("::1", 5353, "udp"))
    guarded.probe("app", ("127.0.0.1", 8081, "tcp"), ("127.0.0.1", 9, "tcp"))  # the sentinel is not a refusal
    refused = guarded.installed.refused(guarded.guard)
    assert refused == {"": 0, "app": 1, "proxy": 0, "rogue": 3}
    ids = {name: c.id for name, c in guarded.local.cgroups().containers}
    observed = {
        key: struct.unpack("=Q", value)[0]
        for key, value in guarded.installed.maps["observed"].items().items()
    }
    assert observed == {
        sockaddr.identity_key(0, ids["rogue"], 6, 8080): 2,
        sockaddr.identity_key(0, ids["rogue"], 17, 5353): 1,
        sockaddr.identity_key(0, ids["app"], 6, 8081): 1,
    }


@kernel
def test_a_process_of_the_pod_in_no_container_is_granted_nothing(guarded: Guarded) -> None:
    assert guarded.local.cgroup is not None
    procs = guarded.local.cgroup / "cgroup.procs"
    argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), "/usr/bin/python3"]
    argv += ["-m", "netisolate.workload.probe", "127.0.0.1", "8080", "tcp"]
    proc = guarded.local.spawn(argv)
    out, _ = proc.communicate(timeout=10)
    guarded.local.processes.remove(proc)
    assert out.split() == ["eperm"]
    assert guarded.installed.refused(guarded.guard)[""] == 1


@kernel
def test_a_changed_policy_is_an_element_update_of_the_attached_guard(guarded: Guarded) -> None:
    guarded.local.listen("proxy", ["8080", "8081"])
    changed = sockaddr.guard(ruleset(guarded_pod(app="8081"), guarded.local.cgroups()))
    before = {point: bpf.attached(_fd(guarded), point) for point, _ in sockaddr.ATTACH}
    guarded.installed.update(changed, *bpf.local_addresses(guarded.local.ns))  # type: ignore[arg-type]
    assert guarded.probe("app", ("127.0.0.1", 8080, "tcp"), ("127.0.0.1", 8081, "tcp")) == ["eperm", "open"]
    assert {point: bpf.attached(_fd(guarded), point) for point, _ in sockaddr.ATTACH} == before
    assert set(guarded.installed.maps["grants"].items()) == set(changed.entries["grants"])


@kernel
def test_uid_and_cgroup_must_both_match() -> None:
    with LocalPod(guarded_pod(identity="uid+cgroup")) as local:
        g = Guarded(local)
        try:
            local.listen("proxy", ["8080"])
            target = [("127.0.0.1", 8080, "tcp")]
            assert local.probe(1000, target, container="app") == ["open"]
            assert local.probe(1001, target, container="app") == ["eperm"]  # the app's cgroup, not its UID
        finally:
            g.installed.detach()


@kernel
def test_under_uid_identity_the_caller_s_uid_is_judged_and_root_is_no_exception() -> None:
    with LocalPod(uid_pod(), with_cgroups=True) as local:
        g = Guarded(local)
        try:
            local.listen("proxy", ["8080"])  # the proxy's UID owns it: its bind passes
            target = [("127.0.0.1", 8080, "tcp"), ("::1", 8080, "tcp")]
            assert g.local.probe(1000, target, container="app") == ["open", "open"]
            assert g.local.probe(1002, target, container="rogue") == ["eperm", "eperm"]
            assert g.local.probe(1000, target[:1], container="rogue") == ["open"]  # the UID, not the cgroup
            # root inside the pod is not the runtime the table lets through: it is granted nothing
            assert g.local.probe(0, target[:1], container="app") == ["eperm"]
            assert g.local.probe(1002, [("127.0.0.1", 9, "tcp")], container="rogue") == ["unreachable"]
            assert _python(local, "rogue", BIND, uid=1002) == ["1", "1", "bound", "bound"]
            assert _python(local, "proxy", BIND, uid=1001)[1:] == ["bound", "bound", "bound"]  # 8080 is taken
            assert g.installed.refused(g.guard) == {"": 1, "app": 0, "proxy": 0, "rogue": 4}
            observed = {key for key in g.installed.maps["observed"].items()}
            assert observed == {sockaddr.identity_key(0, 1002, 6, 8080), sockaddr.identity_key(0, 0, 6, 8080)}
        finally:
            g.installed.detach()


@kernel
def test_a_gone_cgroup_s_counter_is_folded_into_the_pod_s(guarded: Guarded) -> None:
    guarded.probe("app", ("127.0.0.1", 8081, "tcp"))
    restarted = replace(guarded.local.cgroups(), containers=())  # every container gone
    gone = sockaddr.guard(ruleset(guarded.local.pod, restarted))
    guarded.installed.update(gone, set(), set())
    assert guarded.installed.refused(gone) == {"": 1}
    assert len(guarded.installed.maps["refused"].items()) == 1


def test_no_capability_for_maps_is_the_node_s_not_the_pod_s(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(command: int, attr: bytes, what: str, buffer: object = None) -> int:
        raise bpf.GuardError(f"{what}: Operation not permitted", 1)

    monkeypatch.setattr(bpf, "_bpf", refused)
    with pytest.raises(bpf.LoadError, match="creating the map grants"):
        bpf.Map.create(sockaddr.MAPS[0])


@kernel
def test_a_full_map_is_replaced_extra_first() -> None:
    small = bpf.Map.create(sockaddr.MapSpec("test", "hash", 4, 4, 4))
    try:
        keys = [struct.pack("=I", i) for i in range(6)]
        small.replace(dict.fromkeys(keys[:3], b"\1\0\0\0"))
        small.replace(dict.fromkeys(keys[3:], b"\1\0\0\0"))  # 6 would not fit at once
        assert set(small.keys()) == set(keys[3:])
        with pytest.raises(bpf.GuardError, match="do not fit"):
            small.replace(dict.fromkeys(keys, b"\1\0\0\0"))
    finally:
        os.close(small.fd)


@kernel
def test_audit_lets_through_and_still_counts() -> None:
    with LocalPod(guarded_pod("audit")) as local:
        g = Guarded(local)
        try:
            local.listen("proxy", ["8080"])
            assert g.probe("rogue", ("127.0.0.1", 8080, "tcp"), ("127.0.0.1", 9, "tcp")) == [
                "open",
                "unreachable",
            ]
            assert g.installed.refused(g.guard)["rogue"] == 1
        finally:
            g.installed.detach()


@kernel
def test_attached_by_name_and_detached_whole() -> None:
    with LocalPod(guarded_pod()) as local:
        g = Guarded(local)
        fd = _fd(g)
        assert [name for _, name in bpf.attached(fd, "connect4")] == ["ni_connect4"]
        g.installed.detach()
        assert all(bpf.attached(fd, point) == [] for point, _ in sockaddr.ATTACH)
        assert local.probe(1000, [("127.0.0.1", 8080, "tcp")], container="rogue") == ["refused"]


def _fd(g: Guarded) -> int:
    """The pod cgroup's directory, open for queries (closed with the test process)."""
    return os.open(str(g.local.cgroup), os.O_RDONLY | os.O_DIRECTORY)


# --- the agent's backend under --socket-guard --------------------------------------------------


def _table(local: LocalPod) -> bool:
    assert local.ns is not None
    return run_tool(local.ns, ["nft", "list", "table", "inet", nft.TABLE]).returncode == 0


def _ours(local: LocalPod, point: str = "connect4") -> list[str]:
    fd = os.open(str(local.cgroup), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [name for _, name in bpf.attached(fd, point)]
    finally:
        os.close(fd)


Served = tuple[LocalPod, GuardedBackend, RuleSet]


@pytest.fixture
def served() -> Iterator[Served]:
    with LocalPod(guarded_pod()) as local:
        backend = GuardedBackend()
        rs = ruleset(local.pod, local.cgroups())
        try:
            yield local, backend, rs
        finally:
            if local.cgroup is not None:
                for point, _ in sockaddr.ATTACH:  # whatever a test left attached
                    _detach_all(local, point)


def _started(local: LocalPod) -> RuleSet:
    """The pod as the agent sees it when its sandbox starts: its cgroup, no container's yet."""
    return ruleset(local.pod, replace(local.cgroups(), containers=()))


def _detach_all(local: LocalPod, point: str) -> None:
    fd = os.open(str(local.cgroup), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog_id, _ in bpf.attached(fd, point):
            program = bpf.open_program(prog_id)
            try:
                bpf.detach(fd, program, point)
            finally:
                os.close(program)
    finally:
        os.close(fd)


@kernel
def test_the_guard_replaces_the_table_and_verification_is_exact(served: Served) -> None:
    local, backend, rs = served
    assert local.ns is not None
    # the CNI ADD's table: the pod's cgroup is not known yet, so nftables serves it
    early = ruleset(local.pod, PodCgroups(rs.cgroups.level if rs.cgroups else 0))
    backend.apply(local.ns, early)
    assert _table(local) and _ours(local) == []
    backend.update_cgroups(local.ns, _started(local), early)  # the sandbox's cgroup: the guard takes over
    assert not _table(local) and _ours(local) == ["ni_connect4"]
    backend.update_cgroups(local.ns, rs, _started(local))  # its containers start: the maps follow
    assert backend.verify(local.ns, rs) == []
    local.listen("proxy", ["8080"])
    assert local.probe(1000, [("127.0.0.1", 8080, "tcp")], container="app") == ["open"]
    assert local.probe(1000, [("127.0.0.1", 8080, "tcp")], container="rogue") == ["eperm"]
    inspection = backend.inspect(local.ns, rs)
    assert inspection.drift == [] and inspection.refused["rogue"] == 1
    rogue = dict(local.cgroups().containers)["rogue"].id
    assert inspection.observed == [(str(rogue), "tcp", 8080, 1)]
    # tampering is drift, and the next apply settles it
    _detach_all(local, "bind6")
    drift = backend.verify(local.ns, rs)
    assert drift == [f"the socket guard's bind6 program is not attached to {local.cgroup}"]
    backend.apply(local.ns, rs)
    assert backend.verify(local.ns, rs) == []


@kernel
def test_a_uid_identity_pod_moves_to_the_guard_once_its_cgroup_is_known() -> None:
    with LocalPod(uid_pod(), with_cgroups=True) as local:
        assert local.ns is not None
        backend, rs = GuardedBackend(), ruleset(local.pod, local.cgroups())
        try:
            backend.apply(local.ns, ruleset(local.pod, PodCgroups(2)))  # the CNI ADD's: no cgroup yet
            assert _table(local) and _ours(local) == []
            backend.apply(local.ns, rs)
            assert (
                not _table(local) and _ours(local) == ["ni_connect4"] and backend.verify(local.ns, rs) == []
            )
            assert reserved(local.ns) >= {8080, 53}
            local.listen("proxy", ["8080"])
            assert local.probe(1002, [("127.0.0.1", 8080, "tcp")], container="rogue") == ["eperm"]
            inspection = backend.inspect(local.ns, rs)
            assert inspection.drift == [] and inspection.refused["rogue"] == 1
            assert learning.observations(rs, inspection.observed, {}) == {Observed("rogue", "tcp", 8080): 1}
        finally:
            for point, _ in sockaddr.ATTACH:
                _detach_all(local, point)


@kernel
def test_nat_in_the_pod_hands_it_back_to_its_table(served: Served) -> None:
    local, backend, rs = served
    assert local.ns is not None
    backend.apply(local.ns, _started(local))
    nat = "add table ip meshnat\nadd chain ip meshnat out { type nat hook output priority -100; }\n"
    assert run_tool(local.ns, ["nft", "-f", "-"], nat).returncode == 0
    assert backend.verify(local.ns, rs)[-1].endswith("needs its table: an nftables nat chain")
    backend.apply(local.ns, rs)
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, rs) == []
    local.listen("proxy", ["8080"])
    assert local.probe(1000, [("127.0.0.1", 8080, "tcp")], container="rogue") == ["refused"]  # nftables'


@kernel
def test_a_restarted_agent_puts_its_guard_beside_the_old_then_removes_it(served: Served) -> None:
    local, backend, rs = served
    assert local.ns is not None
    backend.apply(local.ns, _started(local))
    restarted = GuardedBackend()
    assert restarted.verify(local.ns, rs) == ["table inet netisolate is missing"]  # it knows no guard
    restarted.apply(local.ns, rs)
    assert all(_ours(local, point) == [f"ni_{point}"] for point, _ in sockaddr.ATTACH)
    assert restarted.verify(local.ns, rs) == []


@kernel
def test_what_the_guard_cannot_serve_keeps_its_table() -> None:
    with LocalPod(guarded_pod(app="8080, 53/udp")) as local:
        assert local.ns is not None
        backend = GuardedBackend()
        rs = ruleset(local.pod, local.cgroups())
        assert sockaddr.unfit(rs) == "the pod grants UDP or is at audit: replies need conntrack"
        backend.apply(local.ns, rs)
        assert _table(local) and _ours(local) == [] and backend.verify(local.ns, rs) == []


AUTOBIND = """
import socket
for _ in range(5):
    s = socket.socket()
    try:
        s.listen()
        print(s.getsockname()[1])
    except OSError as e:
        print(e.errno)
    s.close()
"""


@kernel
def test_the_kernel_never_hands_a_declared_port_to_an_unbound_socket(served: Served) -> None:
    """The ephemeral range narrowed to the proxy's 8080: an unbound listen() gets it, until the
    guard reserves it (then the kernel has no port to give: EADDRINUSE)."""
    local, backend, _rs = served
    assert local.ns is not None
    assert run_tool(local.ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=8080 8080"]).returncode == 0
    assert run_tool(local.ns, ["sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=7000"]).returncode == 0
    assert set(_python(local, "rogue", AUTOBIND)) == {"8080"}  # what a squatter could be handed
    backend.apply(local.ns, _started(local))
    assert reserved(local.ns) == {7000, 53, 8080}  # the pod's own reservation kept
    assert set(_python(local, "rogue", AUTOBIND)) == {"98"}  # EADDRINUSE
    assert run_tool(local.ns, ["sysctl", "-qw", "net.ipv4.ip_local_reserved_ports=7000"]).returncode == 0
    assert backend.verify(local.ns, _started(local)) == [
        "declared port 53 is not reserved in the namespace",
        "declared port 8080 is not reserved in the namespace",
    ]


SYSCTL_WRITE = """
import threading
from netisolate.backends import sysctl
PATH = "/proc/sys/net/ipv4/ip_local_reserved_ports"
thread = threading.Thread(target=sysctl.write, args=(PATH, "4242"))
thread.start()
thread.join()
print(open(PATH).read().strip())
try:
    open(PATH, "w").write("1")
except OSError as e:
    print(e.errno)
"""


@kernel
def test_a_sysctl_is_written_where_the_container_mounts_proc_sys_read_only() -> None:
    """As the agent's container: /proc/sys read-only. The writing thread remounts it in a mount
    namespace of its own; the process's stays read-only (EROFS, 30)."""
    readonly = 'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"'
    argv = ["unshare", "-m", "-n", "sh", "-c", readonly, "sh", sys.executable, "-c", SYSCTL_WRITE]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert result.stdout.split() == ["4242", "30"], result.stderr


@kernel
def test_the_local_routes_are_what_ip_lists(guarded: Guarded) -> None:
    """The rtnetlink dump against `ip route show table local` (the image has no `ip`)."""
    assert guarded.local.ns is not None
    expected: tuple[set[bytes], set[bytes]] = (set(), set())
    for index, (flag, family) in enumerate((("-4", socket.AF_INET), ("-6", socket.AF_INET6))):
        argv = ["ip", flag, "-j", "route", "show", "table", "local"]
        for route in json.loads(run_tool(guarded.local.ns, argv).stdout):
            if route["type"] in ("local", "broadcast", "multicast"):
                address, _, bits = route["dst"].partition("/")
                width = 32 if family == socket.AF_INET else 128
                expected[index].add(struct.pack("=I", int(bits or width)) + socket.inet_pton(family, address))
    assert bpf.local_addresses(guarded.local.ns) == expected
    assert struct.pack("=I", 32) + socket.inet_aton(POD_IPV4) in expected[0]


@kernel
def test_a_guard_that_fails_to_go_in_leaves_the_pod_on_its_table(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, backend, _rs = served
    assert local.ns is not None

    def refused(*args: object) -> bpf.Installed:
        raise bpf.GuardError("attaching connect4: Operation not permitted", 1)

    monkeypatch.setattr(bpf, "install", refused)
    backend.apply(local.ns, _started(local))
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, _started(local)) == []


@kernel
def test_a_kernel_that_refuses_the_programs_is_asked_once(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verifier refusal (a kernel without bpf_set_retval, say) is the same for every pod: the
    first pod's says so, once, and no pod tries again."""
    local, backend, _rs = served
    assert local.ns is not None
    loads: list[str] = []

    def refused(name: str, *args: object, **kwargs: object) -> int:
        loads.append(name)
        raise bpf.LoadError("loading connect4: Invalid argument; the verifier said: unknown func", 22)

    monkeypatch.setattr(bpf, "load", refused)
    for _ in range(3):
        backend.apply(local.ns, _started(local))
    assert loads == ["connect4"]
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, _started(local)) == []
    assert (backend.unfit(local.ns, _started(local)) or "").startswith(
        "the kernel refuses the socket guard's"
    )


@kernel
def test_a_table_that_fails_to_go_in_leaves_the_guard(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, backend, _rs = served
    assert local.ns is not None
    backend.apply(local.ns, _started(local))
    udp = ruleset(guarded_pod(app="8080, 53/udp"), local.cgroups())  # unfit: back to a table

    def broken(*args: object) -> None:
        raise EnforceError("nft -f failed")

    monkeypatch.setattr(backend.inner, "apply", broken)
    with pytest.raises(EnforceError):
        backend.apply(local.ns, udp)
    assert _ours(local) == ["ni_connect4"]  # never neither
    monkeypatch.undo()
    backend.apply(local.ns, udp)
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, udp) == []


@kernel
def test_a_stale_guard_is_drift_and_goes_once_the_table_holds(served: Served) -> None:
    """An earlier agent's guard, on a pod that now needs its table (a UDP grant)."""
    local, backend, _rs = served
    assert local.ns is not None
    GuardedBackend().apply(local.ns, _started(local))
    udp = ruleset(guarded_pod(app="8080, 53/udp"), local.cgroups())
    backend.inner.apply(local.ns, udp)
    assert backend.verify(local.ns, udp)[-1].startswith(
        "a socket guard is attached, but the pod needs its table"
    )
    backend.apply(local.ns, udp)
    assert _ours(local) == [] and backend.verify(local.ns, udp) == []


@kernel
def test_a_changed_identity_mode_reinstalls_the_programs(served: Served) -> None:
    local, backend, _rs = served
    assert local.ns is not None
    backend.apply(local.ns, _started(local))
    both = ruleset(guarded_pod(identity="uid+cgroup"), local.cgroups())
    assert backend.verify(local.ns, both)[-1] == "the socket guard's programs are not the policy's"
    backend.apply(local.ns, both)
    assert backend.verify(local.ns, both) == [] and _ours(local) == ["ni_connect4"]
    local.listen("proxy", ["8080"])
    assert local.probe(1000, [("127.0.0.1", 8080, "tcp")], container="app") == ["open"]


@kernel
def test_another_program_judging_connects_keeps_the_table(served: Served) -> None:
    """A socket load-balancer's connect4 (here one that lets everything through) would rewrite
    what ours judged: while it is attached the pod keeps its table."""
    local, backend, rs = served
    assert local.ns is not None and local.cgroup is not None
    program = bpf.load("connect4", "connect4", ebpf.exit_with(1), {}, named="lb_connect4")
    fd = os.open(str(local.cgroup), os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf.attach(fd, program, "connect4")
        assert (
            backend.unfit(local.ns, rs) == "another program judges the pod's connects (connect4: lb_connect4)"
        )
        backend.apply(local.ns, rs)
        assert _table(local) and _ours(local) == ["lb_connect4"]
        bpf.detach(fd, program, "connect4")
        backend.apply(local.ns, _started(local))
        assert not _table(local) and _ours(local) == ["ni_connect4"]
    finally:
        os.close(fd)
        os.close(program)


@kernel
def test_a_pod_with_sockets_opened_before_the_guard_keeps_its_table(served: Served) -> None:
    """The guard judges a socket when it binds or connects, the table every packet: a socket
    opened under the table (here a squatter on the proxy's port, which the table lets bind but
    never receive) must never be left to the guard, so the pod keeps its table. It is asked once
    the guard is attached, so none slips in between, and only once per namespace."""
    local, backend, rs = served
    assert local.ns is not None
    early = ruleset(local.pod, PodCgroups(rs.cgroups.level if rs.cgroups else 0))
    backend.apply(local.ns, early)  # the CNI ADD's table
    local.listen("rogue", ["8080"])
    backend.apply(local.ns, rs)
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, rs) == []
    assert backend.unfit(local.ns, rs) == "the namespace holds what the guard never judged (tcp [::]:8080)"
    assert local.probe(1000, [("127.0.0.1", 8080, "tcp")], container="app") == ["refused"]  # the table's


def _listen_then_move(served: Served) -> None:
    """The proxy opens a socket, the pod is given its table, then the backend is asked to serve it."""
    local, backend, rs = served
    assert local.ns is not None
    local.listen("proxy", ["8080"])
    backend.inner.apply(local.ns, rs)
    backend.apply(local.ns, rs)


@kernel
def test_a_recreated_sandbox_s_namespace_is_asked_as_a_move(served: Served) -> None:
    """Our guard for the sandbox's earlier namespace judged the new one's sockets with the old
    one's local addresses (a UDP socket connected to the new pod address passed it): the new
    namespace is asked as any move is."""
    local, backend, rs = served
    assert local.ns is not None
    backend.apply(local.ns, rs)
    assert not _table(local)
    [entry] = backend._guards.values()
    # what names a namespace: never another's, as an inode number may be once its namespace is gone
    assert local.ns.dup().cookie == entry.cookie != NetNS.open("/proc/self/ns/net").cookie
    entry.cookie += 1  # as if attached for the sandbox's earlier namespace
    _listen_then_move(served)  # (the table: the CNI ADD's in the new namespace)
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, rs) == []


@kernel
def test_an_earlier_guard_missing_a_program_is_no_proof_and_the_move_is_asked(served: Served) -> None:
    local, backend, rs = served
    assert local.ns is not None
    GuardedBackend().apply(local.ns, rs)  # an earlier agent's guard
    _detach_all(local, "sock_create")  # (as one from before that program was)
    _listen_then_move(served)
    assert _table(local) and _ours(local) == [] and backend.verify(local.ns, rs) == []


@kernel
def test_what_the_backend_noted_of_a_gone_pod_is_forgotten(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, backend, rs = served
    assert local.ns is not None
    monkeypatch.setattr(importlib.import_module("netisolate.backends.guarded"), "SWEEP_S", 0.0)
    with LocalPod(guarded_pod()) as gone:
        assert gone.ns is not None
        backend.apply(gone.ns, ruleset(gone.pod, gone.cgroups()))
        assert len(backend._guards) == len(backend._pods) == 1
    backend.apply(local.ns, rs)
    assert list(backend._guards) == [str(local.cgroup)] and list(backend._pods) == [local.ns.cookie]


@kernel
def test_before_linux_6_8_a_pod_moves_only_while_no_container_was_made(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older kernels list no TCP socket that is only bound: there the pod's cgroup tells, and a
    second populated cgroup beside the sandbox's means a container was made."""
    local, backend, rs = served
    assert local.ns is not None
    monkeypatch.setattr(importlib.import_module("netisolate.backends.guarded"), "BOUND_LISTED", False)
    sleepers = [local.spawn(["sleep", "60"], container=c) for c in ("app", "proxy")]
    backend.apply(local.ns, rs)
    assert _table(local) and _ours(local) == []
    assert backend.unfit(local.ns, rs) == (
        "the namespace holds what the guard never judged "
        "(1 containers made before it, whose bound sockets Linux < 6.8 cannot list)"
    )
    sleepers[1].kill()
    sleepers[1].wait()
    fresh = GuardedBackend()  # (the first remembers its refusal for the namespace)
    fresh.apply(local.ns, rs)  # the app's process alone: the sandbox's place
    assert not _table(local) and _ours(local) == ["ni_connect4"]


@kernel
def test_a_guard_of_ours_on_the_cgroup_already_judged_every_socket_and_the_pod_moves(served: Served) -> None:
    """A restarted agent: the earlier agent's guard held the pod from its start, so the sockets
    opened since met it, and the new guard takes over beside it."""
    local, backend, rs = served
    assert local.ns is not None
    GuardedBackend().apply(local.ns, rs)
    _listen_then_move(served)  # (a table too, as a pod that moved back and forth has)
    assert not _table(local) and _ours(local) == ["ni_connect4"] and backend.verify(local.ns, rs) == []


@kernel
def test_a_pod_moving_between_table_and_guard_has_one_at_every_moment(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """design.md's invariant: the guard goes in while the table still holds, and the table while
    the guard still holds."""
    local, backend, rs = served
    assert local.ns is not None
    seen: list[tuple[str, bool, list[str]]] = []
    install, inner_apply = bpf.install, backend.inner.apply

    def watched_install(*args: object, **kwargs: object) -> bpf.Installed:
        seen.append(("install", _table(local), _ours(local)))
        return install(*args, **kwargs)  # type: ignore[arg-type]

    def watched_apply(ns: NetNS, ruleset: RuleSet) -> None:
        seen.append(("table", _table(local), _ours(local)))
        inner_apply(ns, ruleset)

    monkeypatch.setattr(bpf, "install", watched_install)
    monkeypatch.setattr(backend.inner, "apply", watched_apply)
    early = ruleset(local.pod, PodCgroups(rs.cgroups.level if rs.cgroups else 0))
    backend.apply(local.ns, early)  # the CNI ADD's table
    backend.apply(local.ns, _started(local))  # the guard, while the table holds
    backend.apply(
        local.ns, ruleset(guarded_pod(app="8080, 53/udp"), local.cgroups())
    )  # the table, under the guard
    assert seen == [("table", False, []), ("install", True, []), ("table", False, ["ni_connect4"])]
