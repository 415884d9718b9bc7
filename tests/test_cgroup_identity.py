"""Identity by cgroup (issue 13): the pure parts (annotation, rules, what the agent reads of
/proc and mountinfo), the reconciler's decisions (element updates, fail closed), and the rules in
a real namespace with real cgroups on this hybrid host: loaded by path, listed back by ID, an ID
change is an element update, drift is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netisolate.agent.cgroups import NodeCgroups, container_ids, named, runtime_name, v2_path
from netisolate.agent.hierarchy import below, v2_mounts
from netisolate.agent.reconcile import PENDING_FAST_S, Reconciler
from netisolate.backends import EnforceError, run_tool, select_backend
from netisolate.backends.kept import KeptSockets
from netisolate.backends.nftables import NftablesBackend
from netisolate.learning import Observed, learned
from netisolate.localpod import LocalPod
from netisolate.model import Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.policy import IdentityMode, Level, parse_identity, pod_policy
from netisolate.rules import Cgroup, PodCgroups, Settings, build_ruleset, nft
from tests.test_reconcile import Backend, Events, Sandboxes

ROOT = Path(__file__).resolve().parent.parent
ID = "0123456789abcdef" * 4
POD_DIR = "unified/kubepods/besteffort/podX"


@pytest.fixture
def here() -> Iterator[NetNS]:
    with NetNS.open("/proc/self/ns/net") as ns:
        yield ns


def shared_uid_pod(identity: str = "cgroup", **annotations: str) -> Pod:
    return parse_pod(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": "11111111-2222-3333-4444-555555555555",
                "annotations": {
                    "netisolate.io/isolation": "enforce",
                    "netisolate.io/identity": identity,
                    "allow.netisolate.io/app": "15001,5353/udp",
                    "allow.netisolate.io/proxy": "8080",
                    **annotations,
                },
            },
            "spec": {
                "nodeName": "node-a",
                "containers": [
                    {
                        "name": "app",
                        "securityContext": {"runAsUser": 1000},
                        "ports": [{"containerPort": 8080}],
                    },
                    {
                        "name": "proxy",
                        "securityContext": {"runAsUser": 1000},
                        "ports": [{"containerPort": 15001}, {"containerPort": 5353, "protocol": "UDP"}],
                    },
                    {"name": "rogue", "securityContext": {"runAsUser": 0}},
                ],
            },
            "status": {"containerStatuses": [{"name": "app", "containerID": f"containerd://{ID}"}]},
        }
    )


SEEN = PodCgroups(
    4,
    Cgroup(100, POD_DIR),
    (("app", Cgroup(101, f"{POD_DIR}/a")), ("proxy", Cgroup(102, f"{POD_DIR}/p"))),
)


# --- pure -----------------------------------------------------------------------------------------


def test_identity_annotation_and_node_default() -> None:
    assert parse_identity("uid+cgroup", "x") is IdentityMode.UID_CGROUP
    assert pod_policy(shared_uid_pod(), {}).identity is IdentityMode.CGROUP
    unannotated = parse_pod({"metadata": {"annotations": {"netisolate.io/isolation": "enforce"}}, "spec": {}})
    assert pod_policy(unannotated, {}).identity is IdentityMode.UID
    assert pod_policy(unannotated, {}, IdentityMode.CGROUP).identity is IdentityMode.CGROUP
    bad = pod_policy(shared_uid_pod("Cgroup"), {})
    assert bad.level is Level.ENFORCE and bad.problems and all(c.grants == () for c in bad.containers)


def test_rules_name_cgroups_by_id_when_listed_and_by_path_when_loaded() -> None:
    rs = build_ruleset(pod_policy(shared_uid_pod(), {}), Settings(), cgroups=SEEN)
    assert rs is not None and rs.cgroups is not None
    listed, loaded = nft.table(rs), nft.create(rs)
    assert "elements = { 101 }" in listed and f"{POD_DIR}/a" not in listed
    assert f'elements = {{ "{POD_DIR}/a" }}' in loaded
    # grants are one lookup in a set keyed by cgroup, protocol and port (rule 8)
    assert "socket cgroupv2 level 4 . meta l4proto . th dport @grants accept" in listed
    assert '101 . tcp . 15001 comment "app"' in listed and '101 . udp . 5353 comment "app"' in listed
    assert f'"{POD_DIR}/a" . tcp . 15001 comment "app"' in loaded
    assert "socket cgroupv2 level 3 @pod goto refuse" in listed
    # the runtime exception comes after everything of the pod's own cgroup is refused
    assert listed.index("@pod goto refuse") < listed.index("meta skuid 0 accept")
    # declared ports: received only by their owners (input), and the UDP one sent only by them
    # on input, every TCP packet but a SYN meets one rule, and the rest two lookups, however many
    # ports are declared (each packet walked a rule per port: 150 cost 44 % of the loopback rate)
    receiving = [line.strip() for line in listed[listed.index("chain input {") :].splitlines()[2:-2]]
    assert receiving == [
        "tcp flags != syn / syn,ack accept",
        "meta l4proto . th dport @owned socket cgroupv2 level 4 . meta l4proto . th dport"
        " != @owners goto refuse",
    ]
    assert set(nft.parse(listed).elements["owned"]) == {"tcp . 8080", "tcp . 15001", "udp . 5353"}
    assert '101 . tcp . 8080 comment "app"' in listed and '102 . udp . 5353 comment "proxy"' in listed
    assert "udp sport 5353 socket cgroupv2 level 4 != @c-proxy goto refuse" in listed
    assert "meta skuid 1000" not in listed  # cgroup alone: a UID means nothing here


def test_uid_and_cgroup_must_both_match() -> None:
    rs = build_ruleset(pod_policy(shared_uid_pod("uid+cgroup"), {}), Settings(), cgroups=SEEN)
    assert rs is not None
    listed = nft.table(rs)
    assert "meta skuid . socket cgroupv2 level 4 . meta l4proto . th dport @grants accept" in listed
    assert '1000 . 101 . tcp . 15001 comment "app"' in listed
    assert "udp sport 5353 meta skuid != 1000 goto refuse" in listed
    assert "tcp sport 8080 meta skuid 1000 accept" in listed  # the serve chain: SYN-ACKs


def test_no_runtime_exception_until_the_pods_cgroup_is_known() -> None:
    policy = pod_policy(shared_uid_pod(), {})
    unseen = build_ruleset(policy, Settings(), cgroups=replace(SEEN, pod=None))
    assert unseen is not None and not unseen.allow_root
    assert "meta skuid 0 accept" not in nft.table(unseen)


def test_an_id_change_is_an_element_update() -> None:
    policy = pod_policy(shared_uid_pod(), {})
    before = build_ruleset(policy, Settings(), cgroups=SEEN)
    restarted = replace(SEEN, containers=(("app", Cgroup(201, f"{POD_DIR}/a2")), SEEN.containers[1]))
    after = build_ruleset(policy, Settings(), cgroups=restarted)
    assert before is not None and after is not None
    assert after.same_but_cgroups(before) and after != before
    regranted = build_ruleset(
        pod_policy(shared_uid_pod(**{"allow.netisolate.io/app": "15002"}), {}), Settings(), cgroups=SEEN
    )
    assert regranted is not None and not regranted.same_but_cgroups(before)
    # the new cgroup first, in its set and the grants (which hold from then), the old one out
    # after; nothing else is touched
    a2, proxy = f'"{POD_DIR}/a2"', f'"{POD_DIR}/p" . tcp . 8080 comment "proxy"'
    app_grants = f'{a2} . tcp . 15001 comment "app", {a2} . udp . 5353 comment "app"'
    # the proxy declares 15001 and 5353/udp, the app 8080: what the input hook checks owners by
    p = f'"{POD_DIR}/p"'
    app_owns, proxy_owns = (
        f'{a2} . tcp . 8080 comment "app"',
        f'{p} . tcp . 15001 comment "proxy", {p} . udp . 5353 comment "proxy"',
    )
    add = f"add element inet netisolate c-app {{ {a2} }}\n"
    owners = f"add element inet netisolate owners {{ {app_owns} }}\n"
    assert nft.elements(after, before) == (
        f"{add}add element inet netisolate grants {{ {app_grants} }}\n{owners}",
        f"flush set inet netisolate c-app\n{add}"
        f"flush set inet netisolate grants\nadd element inet netisolate grants {{ {app_grants}, {proxy} }}\n"
        f"flush set inet netisolate owners\n"
        f"add element inet netisolate owners {{ {app_owns}, {proxy_owns} }}\n",
    )
    gone = replace(SEEN, containers=SEEN.containers[1:])  # the app exited: its set is emptied
    assert nft.elements(build_ruleset(policy, Settings(), cgroups=gone), before) == (  # type: ignore[arg-type]
        "",
        f"flush set inet netisolate c-app\nflush set inet netisolate grants\n"
        f"add element inet netisolate grants {{ {proxy} }}\n"
        f"flush set inet netisolate owners\nadd element inet netisolate owners {{ {proxy_owns} }}\n",
    )


def test_a_policy_change_is_a_refill_of_the_grant_sets_alone() -> None:
    before = build_ruleset(pod_policy(shared_uid_pod(), {}), Settings(), cgroups=SEEN)
    regranted = build_ruleset(
        pod_policy(shared_uid_pod(**{"allow.netisolate.io/app": "15002,6000-6010,5353/udp"}), {}),
        Settings(),
        cgroups=SEEN,
    )
    assert before is not None and regranted is not None
    delta = nft.update(regranted, nft.expected(before))
    app = f'"{POD_DIR}/a"'
    assert delta == (
        "flush set inet netisolate grant_ranges\n"
        f'add element inet netisolate grant_ranges {{ {app} . tcp . 6000-6010 comment "app" }}\n'
        "flush set inet netisolate grants\n"
        f'add element inet netisolate grants {{ {app} . tcp . 15002 comment "app", '
        f'{app} . udp . 5353 comment "app", "{POD_DIR}/p" . tcp . 8080 comment "proxy" }}\n'
    )
    assert nft.update(before, nft.expected(before)) == ""
    audited = build_ruleset(
        pod_policy(shared_uid_pod(**{"netisolate.io/isolation": "audit"}), {}), Settings(), cgroups=SEEN
    )
    assert audited is not None and nft.update(audited, nft.expected(before)) is None  # a new layout


def test_cgroup_paths_under_the_mount_the_agent_sees() -> None:
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "40 30 0:35 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
        "41 30 0:36 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    )
    assert [m.point for m in v2_mounts(mountinfo)] == ["/sys/fs/cgroup/unified"]
    assert v2_path("4:memory:/kubepods/x\n0::/kubepods/podX/abc\n") == "/kubepods/podX/abc"
    # inside the agent's own cgroup namespace both are relative to its root
    assert below("/../../kubepods/podX/abc", "/../..") == ["kubepods", "podX", "abc"]
    assert below("/kubepods/podX/abc", "/") == ["kubepods", "podX", "abc"]
    assert below("/../other", "/") is None
    assert below("/elsewhere/x", "/kubepods") is None


def test_containers_are_named_by_their_whole_runtime_id() -> None:
    ids = container_ids(shared_uid_pod())
    assert ids == {"app": ID}
    entries = [ID, f"cri-containerd-{'f' * 64}.scope", "abc"]
    assert named(entries, ids) == {"app": ID}
    assert named([f"cri-containerd-{ID}.scope"], ids) == {"app": f"cri-containerd-{ID}.scope"}
    assert named([f"{ID}extra", ID[:12]], ids) == {}  # a prefix or a longer name is someone else
    assert named(["abc"], {"app": "abc"}) == {}  # too short to trust


# --- the reconciler -----------------------------------------------------------------------------


@dataclass
class Cgroups:
    seen_now: list[PodCgroups | None]
    reason: str | None = None

    def unavailable(self) -> str | None:
        return self.reason

    def seen(self, pod: Pod) -> PodCgroups | None:
        return self.seen_now[0]

    def unnamed(self, pod: Pod) -> bool:
        return False

    def forget(self, uid: str) -> None:
        pass


def cgroup_reconciler(here: NetNS, cgroups: Cgroups, backend: Backend) -> tuple[Reconciler, Events]:
    events = Events()
    return Reconciler(backend, Settings(), events, Sandboxes([here], [False]), cgroups), events


def test_a_restart_is_an_element_update_not_a_new_ruleset(here: NetNS) -> None:
    backend, cgroups = Backend(), Cgroups([SEEN])
    rec, _ = cgroup_reconciler(here, cgroups, backend)
    pod = shared_uid_pod()
    rec.upsert_pod(pod)
    assert len(backend.applied) == 1 and not backend.updated
    cgroups.seen_now[0] = replace(SEEN, containers=(("app", Cgroup(201, "a2")),))
    rec.cgroups_changed(pod.metadata.uid or "")
    assert len(backend.applied) == 1 and len(backend.updated) == 1
    members = {m.name: m.cgroup for m in backend.updated[0][1].cgroups.members}  # type: ignore[union-attr]
    assert members == {"app": Cgroup(201, "a2"), "proxy": None, "rogue": None}


def test_a_restarted_containers_old_cgroup_still_names_it_to_learning(here: NetNS) -> None:
    backend, cgroups = Backend(), Cgroups([SEEN])
    rec, _ = cgroup_reconciler(here, cgroups, backend)
    pod = shared_uid_pod(**{"netisolate.io/isolation": "audit"})
    rec.upsert_pod(pod)
    # the app (cgroup 101) opened a flow and restarted (now 201) before the agent's next read
    cgroups.seen_now[0] = replace(SEEN, containers=(("app", Cgroup(201, "a2")), SEEN.containers[1]))
    rec.cgroups_changed(pod.metadata.uid or "")
    backend.observed = [
        ("101", "tcp", 9999, 1),  # the app, before its restart
        ("201", "tcp", 9998, 1),  # the app, since
        ("102", "tcp", 9090, 2),  # the proxy
        ("102", "tcp", 8080, 5),  # the proxy's grant (recorded before it came): no news
        ("100", "tcp", 1, 1),  # the pod's own cgroup: no container's
        ("777", "udp", 53, 1),  # a cgroup nobody has named
    ]
    rec.verify_all(fresh=0)
    tracked = rec.pods[pod.metadata.uid or ""]
    assert tracked.observed == {
        Observed("app", "tcp", 9999): 1,
        Observed("app", "tcp", 9998): 1,
        Observed("proxy", "tcp", 9090): 2,
    }
    assert "101" in tracked.former
    backend.observed = []  # the kernel forgot the old cgroup's records: so does the agent
    rec.verify_all(fresh=0)
    assert tracked.former == {} and len(tracked.observed) == 3


@pytest.mark.parametrize("where", ["no cgroup v2", "iptables", "pod not found"])
def test_fail_closed_where_cgroups_cannot_be_matched(here: NetNS, where: str) -> None:
    backend = Backend(cgroups=where != "iptables", name="iptables" if where == "iptables" else "fake")
    reason = "no cgroup2 mount" if where == "no cgroup v2" else None
    cgroups = Cgroups([None if where == "pod not found" else SEEN], reason)
    rec, events = cgroup_reconciler(here, cgroups, backend)
    rec.upsert_pod(shared_uid_pod())
    rec.upsert_pod(shared_uid_pod())  # reported once
    [(_, rs)] = backend.applied
    assert rs.cgroups is None and rs.grants == () and not rs.allow_root
    # a pod's cgroup not found yet is normal for a moment (looked for again at once), not an event
    expected = 0 if where == "pod not found" else 1
    assert events.reasons().count("CgroupIdentityUnavailable") == expected
    assert (rec.next_retry() < float("inf")) == (where == "pod not found")


@pytest.mark.parametrize("guard", [False, True])
def test_under_uid_identity_only_the_socket_guard_looks_for_the_pod_s_cgroup(
    here: NetNS, guard: bool
) -> None:
    backend, cgroups = Backend(wants_pod_cgroup=guard), Cgroups([None])
    rec, events = cgroup_reconciler(here, cgroups, backend)
    pod = shared_uid_pod("uid")
    rec.upsert_pod(pod)
    assert [rs.pod_cgroup for _, rs in backend.applied] == [None]
    assert (rec.next_retry() < float("inf")) == guard  # not there yet: looked for again at once, quietly
    cgroups.seen_now[0] = SEEN
    rec.retry_pending()
    assert [rs.pod_cgroup for _, rs in backend.applied] == [None, SEEN.pod] if guard else [None]
    assert rec.next_retry() == float("inf") and "CgroupIdentityUnavailable" not in events.reasons()


def test_under_uid_identity_the_guard_stops_looking_once_the_pod_is_no_longer_new(here: NetNS) -> None:
    """A pod moves to the guard only before its sockets are opened: past its first seconds, its
    table serves it and its cgroup is no longer worth a look each round."""
    backend, cgroups = Backend(wants_pod_cgroup=True), Cgroups([None])
    rec, _ = cgroup_reconciler(here, cgroups, backend)
    pod = shared_uid_pod("uid")
    rec.upsert_pod(pod)
    tracked = rec.pods[pod.metadata.uid or ""]
    tracked.cgroup_wait_since -= PENDING_FAST_S
    rec.upsert_pod(pod)
    assert tracked.cgroup_sought == here.cookie and rec.next_retry() == float("inf")
    rec.upsert_pod(pod)
    assert rec.next_retry() == float("inf")


# --- the kernel: a real namespace, real cgroups ------------------------------------------------

pytest_kernel = pytest.mark.kernel


@pytest.fixture
def local() -> Iterator[LocalPod]:
    with LocalPod(shared_uid_pod()) as pod:
        yield pod


@pytest_kernel
def test_loaded_by_path_listed_by_id_and_exact(local: LocalPod, monkeypatch: pytest.MonkeyPatch) -> None:
    assert local.ns is not None and local.cgroup is not None
    backend = select_backend("nftables")
    rs = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=local.cgroups())
    assert rs is not None
    backend.apply(local.ns, rs)
    assert backend.verify(local.ns, rs) == []
    # a restart: the app's old cgroup goes, a new one comes; its set is updated, the rest stays
    seen = local.cgroups()
    old_app = dict(seen.containers)["app"]
    (local.cgroup / "app").rmdir()
    fresh = local.cgroup / "app-2"
    fresh.mkdir()
    new_app = NodeCgroups.cgroup_of(str(fresh))
    restarted = replace(seen, containers=tuple((n, new_app if n == "app" else c) for n, c in seen.containers))
    after = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=restarted)
    assert after is not None and after.same_but_cgroups(rs)

    def no_new_table(*args: object) -> None:
        raise AssertionError("an element update must not load a new table")

    monkeypatch.setattr(backend, "apply", no_new_table)
    # someone else's commit in the namespace: what the backend knew is stale, so it reads again
    assert run_tool(local.ns, ["nft", "add", "table", "ip", "someone"]).returncode == 0
    with monkeypatch.context() as no_fork:  # one transaction over the kept socket, no `nft -f`
        no_fork.setattr("netisolate.backends.nftables.run_tool", no_new_table)
        backend.update_cgroups(local.ns, after, rs)
    assert backend.verify(local.ns, after) == []
    drift = backend.verify(local.ns, rs)  # a set's elements are compared as a set
    assert drift == [
        f"missing in set c-app: {old_app.id}",
        f"unexpected in set c-app: {new_app.id}",
        *(
            f'missing in set grants: {old_app.id} . {grant} comment "app"'
            for grant in ("tcp . 15001", "udp . 5353")
        ),
        *(
            f'unexpected in set grants: {new_app.id} . {grant} comment "app"'
            for grant in ("tcp . 15001", "udp . 5353")
        ),
        f'missing in set owners: {old_app.id} . tcp . 8080 comment "app"',
        f'unexpected in set owners: {new_app.id} . tcp . 8080 comment "app"',
    ]
    # a cgroup that vanished meanwhile: over the kept socket its ID goes in (no socket can be in
    # it again); by `nft -f`, which needs its path, the update fails (the agent retries)
    fresh.rmdir()
    gone = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=replace(restarted, containers=()))
    assert gone is not None
    backend.update_cgroups(local.ns, gone, after)
    assert backend.verify(local.ns, gone) == []
    backend.update_cgroups(local.ns, after, gone)
    assert backend.verify(local.ns, after) == []
    without_socket = NftablesBackend(kept=KeptSockets(limit=0))
    with pytest.raises(EnforceError, match="updating"):
        without_socket.update_cgroups(local.ns, after, gone)


LIST_BY_ID = """
import sys
from netisolate.backends.nftables import NftablesBackend
from netisolate.netns import NetNS
with NetNS.open(sys.argv[1]) as ns:
    print(NftablesBackend().listing(ns, by_id=True), end="")
"""


@pytest_kernel
def test_cgroup_rules_are_listed_by_id_without_cap_sys_chroot(local: LocalPod) -> None:
    """The DaemonSet grants CAP_SYS_ADMIN but not CAP_SYS_CHROOT, which entering a mount
    namespace (setns) would need: the listing by ID must not (in the image it failed so)."""
    assert local.ns is not None
    rs = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=local.cgroups())
    assert rs is not None
    select_backend("nftables").apply(local.ns, rs)
    argv = ["setpriv", "--bounding-set=-sys_chroot", sys.executable, "-c", LIST_BY_ID, local.ns.path]
    listed = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    assert nft.drift(rs, nft.parse(listed.stdout)) == []


@pytest_kernel
def test_a_container_reaches_only_its_grants_whatever_its_uid(local: LocalPod) -> None:
    """app and proxy share UID 1000; the rogue is root: each is told apart by its cgroup."""
    assert local.ns is not None
    local.listen("proxy", ["15001", "15002"])
    rs = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=local.cgroups())
    assert rs is not None
    select_backend("nftables").apply(local.ns, rs)
    targets = [("127.0.0.1", 15001, "tcp"), ("127.0.0.1", 15002, "tcp")]
    assert local.probe(1000, targets, container="app") == ["open", "refused"]
    assert local.probe(1000, targets, container="proxy") == ["refused", "refused"]  # the app's UID
    assert local.probe(0, targets, container="rogue") == ["refused", "refused"]
    assert local.probe(0, targets) == ["open", "open"]  # root outside the pod's cgroup: the runtime
    # a container whose new cgroup the agent has not seen yet is refused, as root too
    assert local.cgroup is not None
    (local.cgroup / "app-restarted").mkdir()
    assert local.probe(0, targets, container="app-restarted") == ["refused", "refused"]
    assert local.probe(1000, targets, container="app-restarted") == ["refused", "refused"]
    # what was refused is recorded by cgroup ID, only for the pod's own cgroups; never drift
    inspection = select_backend("nftables").inspect(local.ns, rs)
    assert inspection.drift == []
    ids = {name: str(c.id) for name, c in local.cgroups().containers}
    ids["app-restarted"] = str(NodeCgroups.cgroup_of(str(local.cgroup / "app-restarted")).id)
    refused = {
        ("app", 15002),
        *((name, port) for name in ("proxy", "rogue", "app-restarted") for port in (15001, 15002)),
    }
    assert {(i, proto, port) for i, proto, port, _ in inspection.observed} == {
        (ids[name], "tcp", port) for name, port in refused
    }
    # learning names the containers it knows; the unnamed cgroup waits until the agent names it
    assert set(learned(rs, {}, inspection.observed, cap=10)) == {
        Observed(name, "tcp", port) for name, port in refused if name != "app-restarted"
    }


@pytest_kernel
def test_a_declared_port_is_received_only_by_its_owners(local: LocalPod) -> None:
    """The input hook's two lookups: a squatter on the proxy's 15001 never completes the app's
    connection; the proxy itself, on the same port, does."""
    assert local.ns is not None
    rs = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=local.cgroups())
    assert rs is not None
    select_backend("nftables").apply(local.ns, rs)
    target = [("127.0.0.1", 15001, "tcp")]
    local.listen("rogue", ["15001"])
    assert local.probe(1000, target, container="app") == ["refused"]
    squatter = local.processes.pop()
    squatter.kill()
    squatter.wait()
    local.listen("proxy", ["15001"])
    assert local.probe(1000, target, container="app") == ["open"]
    assert select_backend("nftables").verify(local.ns, rs) == []


@pytest_kernel
@pytest.mark.parametrize("identity", ["cgroup", "uid+cgroup"])
def test_a_policy_change_is_an_element_update(identity: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalPod(shared_uid_pod(identity)) as local:
        changed_in_place(local, monkeypatch)


def changed_in_place(local: LocalPod, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grants move from 15001 to 15002 (and a range) in the same table, over the kept socket:
    no new table (what was learned stays), no process, exact afterwards, and the app reaches only
    its new grant; and back, the range deleted by ID."""
    assert local.ns is not None
    local.listen("proxy", ["15001", "15002", "6005", "6011"])
    backend, cgroups = select_backend("nftables"), local.cgroups()
    rs = build_ruleset(pod_policy(local.pod, {}), Settings(), cgroups=cgroups)
    assert rs is not None
    backend.apply(local.ns, rs)
    targets = [("127.0.0.1", port, "tcp") for port in (15001, 15002, 6005, 6011)]
    assert local.probe(1000, targets, container="app") == ["open", "refused", "refused", "refused"]
    annotations = {
        **(local.pod.metadata.annotations or {}),
        "allow.netisolate.io/app": "15002,6000-6010,5353/udp",
    }
    regranted = local.pod.model_copy(
        update={"metadata": local.pod.metadata.model_copy(update={"annotations": annotations})}
    )
    after = build_ruleset(pod_policy(regranted, {}), Settings(), cgroups=cgroups)
    assert after is not None

    def no_new_table(*args: object) -> str:
        raise AssertionError("a policy change must not load a new table")

    monkeypatch.setattr(nft, "replace", no_new_table)
    monkeypatch.setattr(nft, "create", no_new_table)
    monkeypatch.setattr("netisolate.backends.nftables.run_tool", no_new_table)  # nor fork nft
    backend.apply(local.ns, after)
    assert backend.verify(local.ns, after) == []
    assert local.probe(1000, targets, container="app") == ["refused", "open", "open", "refused"]
    assert local.probe(1000, targets, container="proxy") == ["refused"] * 4  # the app's grants only
    observed = backend.inspect(local.ns, after).observed
    assert (str(dict(cgroups.containers)["app"].id), "tcp", 15002) in {o[:3] for o in observed}
    backend.apply(local.ns, rs)
    assert backend.verify(local.ns, rs) == []
    assert local.probe(1000, targets, container="app") == ["open", "refused", "refused", "refused"]


def test_a_new_cgroup_is_named_by_its_runtime_bundle(tmp_path: Path) -> None:
    """containerd's layout: the container's first process is a child of the pod's shim, which runs
    in the sandbox's bundle; the container's bundle lies beside it."""
    pod_uid, sandbox, cid = "pod-uid-1", "a" * 64, "b" * 64
    state = tmp_path / "k8s.io"
    for bundle, notes in (
        (sandbox, {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-uid": pod_uid}),
        (cid, {"io.kubernetes.cri.container-name": "app", "io.kubernetes.cri.sandbox-uid": pod_uid}),
    ):
        (state / bundle).mkdir(parents=True)
        config = {"annotations": notes, "linux": {"cgroupsPath": f"/kubepods/pod{pod_uid}/{bundle}"}}
        (state / bundle / "config.json").write_text(json.dumps(config))
    proc = tmp_path / "proc"
    for pid, ppid in ((200, 100), (100, 1)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (x y) S {ppid} 0 0\n")
    (proc / "100" / "cwd").symlink_to(state / sandbox)
    cgroup = tmp_path / "cg" / cid
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.procs").write_text("")
    assert runtime_name(str(cgroup), {pod_uid}, str(proc)) is None  # nobody in it yet
    (cgroup / "cgroup.procs").write_text("200\n")
    assert runtime_name(str(cgroup), {pod_uid}, str(proc)) == "app"
    assert runtime_name(str(cgroup), {"another-pod"}, str(proc)) == ""  # never another pod's
    sandbox_cgroup = tmp_path / "cg" / sandbox
    sandbox_cgroup.mkdir()
    (sandbox_cgroup / "cgroup.procs").write_text("200\n")
    assert runtime_name(str(sandbox_cgroup), {pod_uid}, str(proc)) == ""  # the sandbox: no container
    assert runtime_name(str(tmp_path / "cg" / "not-a-container"), {pod_uid}, str(proc)) is None
