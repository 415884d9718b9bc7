"""The reconciler's decisions when things go wrong, with a backend that fails on purpose: failures are
retried with backoff and reported once, an unexpected error never escapes, a pod whose sandbox was
recreated is enforced in its new namespace, and the kernel decides whether a pod is user-namespaced."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from netisolate.agent.reconcile import Reconciler
from netisolate.backends import EnforceError
from netisolate.backends.base import Inspection
from netisolate.model import Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.rules import RuleSet, Settings
from tests.agent_harness import pod_manifest


@dataclass
class Events:
    seen: list[tuple[str, str]] = field(default_factory=list)
    errors: int = 0

    def event(self, pod: Pod, reason: str, message: str, warning: bool = False) -> None:
        self.seen.append((reason, message))

    def applied(self, pod: Pod, seconds: float) -> None:
        pass

    def drift_repaired(self, pod: Pod) -> None:
        pass

    def port_squatted(self, pod: Pod, found: list[str]) -> None:
        self.event(pod, "PortSquatted", "; ".join(found), warning=True)

    def error(self, pod: Pod, kind: str) -> None:
        self.errors += 1

    def reasons(self) -> list[str]:
        return [reason for reason, _ in self.seen]


@dataclass
class Backend:
    """Records what it is asked; fails with `failure` while one is set."""

    failure: Exception | None = None
    applied: list[tuple[int, RuleSet]] = field(default_factory=list)
    updated: list[tuple[int, RuleSet]] = field(default_factory=list)  # element updates (cgroups)
    observed: list[tuple[str, str, int, int]] = field(default_factory=list)  # what inspect lists as learned
    name: str = "fake"
    cgroups: bool = True
    wants_pod_cgroup: bool = False

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        if self.failure is not None:
            raise self.failure
        self.applied.append((ns.inode, ruleset))

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        if self.failure is not None:
            raise self.failure
        self.updated.append((ns.inode, ruleset))

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        return ["nothing installed"]

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        return Inspection([], {}, list(self.observed))

    def installed(self, ns: NetNS) -> bool:
        return False

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        return {}


@pytest.fixture
def here() -> Iterator[NetNS]:
    ns = NetNS.open("/proc/self/ns/net")
    yield ns
    ns.close()


@dataclass
class Sandboxes:
    """found[0] is what discovery returns; moved_away[0] whether the pod's processes have left its
    namespace."""

    found: list[NetNS | None]
    moved_away: list[bool]

    def find(self, pod: Pod) -> NetNS | None:
        return self.found[0]

    def moved(self, pod: Pod, ns: NetNS) -> bool:
        return self.moved_away[0]

    def forget(self, uid: str) -> None:
        pass


def reconciler(backend: Backend, events: Events, find: list[NetNS | None], moved: list[bool]) -> Reconciler:
    return Reconciler(backend, Settings(), events, Sandboxes(find, moved))


def pod() -> Pod:
    return parse_pod(pod_manifest("web", "node-a"))


def test_failures_are_retried_with_backoff_and_reported_once(here: NetNS) -> None:
    backend, events = Backend(failure=EnforceError("nft: Operation not permitted")), Events()
    rec = reconciler(backend, events, [here], [False])
    rec.upsert_pod(pod())
    uid = next(iter(rec.pods))
    assert rec.pods[uid].state == "failed" and rec.unsettled.is_set()
    deadline = time.monotonic() + 1.2
    attempts = 1
    while time.monotonic() < deadline:  # the timer's pace: every 20 ms
        before = rec.pods[uid].failures
        rec.retry_pending()
        attempts += rec.pods[uid].failures - before
        time.sleep(0.02)
    assert 2 <= attempts <= 3, "0.5 s, then 1 s: not every tick"
    assert events.reasons() == ["EnforceFailed"], "one event for one failure, however often retried"
    assert events.errors == attempts, "but every attempt is counted in the metric"
    backend.failure = None
    rec.pods[uid].retry_at = 0.0
    rec.retry_pending()
    assert rec.pods[uid].state == "enforce" and rec.pods[uid].failures == 0
    assert not rec.unsettled.is_set()


def test_an_unexpected_error_is_a_failure_not_a_crash(here: NetNS) -> None:
    backend, events = Backend(failure=RuntimeError("a bug")), Events()
    rec = reconciler(backend, events, [here], [False])
    rec.upsert_pod(pod())  # must not raise into the watch thread
    tracked = next(iter(rec.pods.values()))
    assert tracked.state == "failed" and "a bug" in tracked.detail
    assert rec.unsettled.is_set(), "and it is retried"


def test_a_pending_pod_is_looked_for_often_then_calmly(here: NetNS) -> None:
    find: list[NetNS | None] = [None]
    rec = reconciler(Backend(), Events(), find, [False])
    rec.upsert_pod(pod())
    tracked = next(iter(rec.pods.values()))
    assert tracked.state == "pending" and tracked.retry_at <= time.monotonic()
    tracked.pending_since -= 10  # ten seconds without a sandbox
    rec.retry_pending()
    assert tracked.retry_at - time.monotonic() > 0.4
    find[0] = here
    tracked.retry_at = 0.0
    rec.retry_pending()
    assert tracked.state == "enforce"


def test_a_recreated_sandbox_is_enforced_in_its_new_namespace(here: NetNS) -> None:
    backend, events = Backend(), Events()
    old = NetNS.open("/proc/self/ns/net")
    find: list[NetNS | None] = [old]
    moved = [False]
    rec = reconciler(backend, events, find, moved)
    rec.upsert_pod(pod())
    tracked = next(iter(rec.pods.values()))
    assert tracked.ns is old and len(backend.applied) == 1
    moved[0], find[0] = True, here  # the pod's processes now live elsewhere
    rec.verify_all(fresh=0)
    assert tracked.ns is here and old.fd == -1, "the old namespace is let go"
    assert len(backend.applied) == 2 and "SandboxReplaced" in events.reasons()
    assert events.reasons().count("Enforced") == 2


def test_the_kernel_decides_whether_a_pod_is_user_namespaced(
    here: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod the runtime put in a user namespace without `hostUsers: false` in its spec: its UID 0 is
    its own root, not the node's runtime, so it gets no root exception."""
    backend = Backend()
    rec = reconciler(backend, Events(), [here], [False])
    monkeypatch.setattr(NetNS, "user_namespaced", lambda self: True)
    rec.upsert_pod(pod())
    assert backend.applied and not backend.applied[0][1].allow_root


def test_isolation_off_then_on_again_is_reported_as_enforced(here: NetNS) -> None:
    rec = reconciler(Backend(), Events(), [here], [False])
    manifest = pod_manifest("web", "node-a")
    rec.upsert_pod(parse_pod(manifest))
    manifest["metadata"]["annotations"]["netisolate.io/isolation"] = "off"
    rec.upsert_pod(parse_pod(manifest))
    tracked = next(iter(rec.pods.values()))
    assert tracked.state == "off"
    manifest["metadata"]["annotations"]["netisolate.io/isolation"] = "enforce"
    rec.upsert_pod(parse_pod(manifest))
    assert tracked.state == "enforce", "the same rules are in place again: say so"


def test_a_failed_repair_is_not_reported_as_repaired(here: NetNS) -> None:
    backend, events = Backend(), Events()
    rec = reconciler(backend, events, [here], [False])
    rec.upsert_pod(pod())
    backend.inspect = lambda ns, ruleset: Inspection(["missing: a rule"], {})  # type: ignore[method-assign]
    backend.failure = EnforceError("nft: busy")
    assert rec.verify_all(fresh=0) == 1
    assert "DriftRepaired" not in events.reasons() and "EnforceFailed" in events.reasons()


def test_one_pods_trouble_does_not_end_the_round(here: NetNS) -> None:
    backend, checked = Backend(), []

    class Buggy(Sandboxes):
        def moved(self, pod: Pod, ns: NetNS) -> bool:
            checked.append(pod.metadata.name)
            if len(checked) == 1:
                raise RuntimeError("a bug")
            return False

    rec = Reconciler(backend, Settings(), Events(), Buggy([here], [False]))
    for name in ("a", "b"):
        rec.upsert_pod(parse_pod(pod_manifest(name, "node-a")))
    checked.clear()
    rec.verify_all(fresh=0)
    assert len(checked) == 2, "the second pod is still verified"
    assert sorted(t.state for t in rec.pods.values()) == ["enforce", "failed"]


def test_exposed_ports_are_looked_for_on_verification_and_reported_once(
    here: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    rec = reconciler(Backend(), events, [here], [False])
    listening: list[str] = []
    monkeypatch.setattr("netisolate.agent.reconcile.exposed", lambda ns, pod, rs: list(listening))
    rec.upsert_pod(pod())  # applied before any container listens
    listening.append("15000 (no container declares it)")
    rec.verify_all(fresh=0)
    rec.verify_all(fresh=0)
    assert events.reasons().count("WildcardListener") == 1


def test_squatted_ports_are_reported_once_for_each_new_set(
    here: NetNS, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = Events()
    rec = reconciler(Backend(), events, [here], [False])
    squats: list[str] = []
    monkeypatch.setattr("netisolate.agent.reconcile.squatted", lambda ns, rs: list(squats))
    rec.upsert_pod(pod())
    squats.append("15001 declared by proxy, bound by rogue (UID 1002)")
    for _ in range(3):
        rec.verify_all(fresh=0)
    squats.append("5300/udp declared by proxy, bound by rogue (UID 1002)")
    for _ in range(7):  # after the first rounds, every tenth looks again
        rec.verify_all(fresh=0)
    assert [m for r, m in events.seen if r == "PortSquatted"] == [
        squats[0],
        "; ".join(squats),
    ]


def test_a_squat_is_an_event_and_a_metric() -> None:
    from prometheus_client import REGISTRY

    from netisolate.agent.report import Reporter

    web = pod()
    labels = {"namespace": web.metadata.namespace or "", "pod": web.metadata.name or ""}
    before = REGISTRY.get_sample_value("netisolate_port_squats_total", labels) or 0.0
    Reporter(None, "node-a").port_squatted(web, ["15001 declared by proxy, bound by rogue (UID 1002)"])
    assert REGISTRY.get_sample_value("netisolate_port_squats_total", labels) == before + 1
    assert REGISTRY.get_sample_value("netisolate_events_total", {"reason": "PortSquatted"})


def test_pods_wait_for_the_namespace_labels() -> None:
    """At start-up, an audit pod in an enforce namespace must never be judged without the label."""
    from netisolate.agent.node import Agent

    backend = Backend()
    agent = Agent("node-a", backend, Settings(), None, host_netns="/proc/self/ns/net")
    here = NetNS.open("/proc/self/ns/net")
    agent.reconciler.sandboxes = Sandboxes([here], [False])
    manifest = pod_manifest("web", "node-a", {"netisolate.io/isolation": "audit"})
    waiter = threading.Thread(target=agent.on_pod_list, args=([manifest],))
    waiter.start()
    time.sleep(0.3)
    assert not agent.reconciler.pods, "no pod judged before the namespaces are known"
    shop = {"metadata": {"name": "shop", "labels": {"netisolate.io/isolation": "enforce"}}}
    agent.on_namespace_list([shop])
    waiter.join(timeout=5)
    assert [rs.mode for _, rs in backend.applied] == ["enforce"]
    agent.stop.set()
    here.close()


def test_a_closed_reconciler_holds_nothing_and_takes_nothing_on() -> None:
    """The agent stops: every namespace handle is closed, and a pod event or a full list still in
    flight does not take a new one."""
    ns = NetNS.open("/proc/self/ns/net")
    rec = reconciler(Backend(), Events(), [ns], [False])
    rec.upsert_pod(pod())
    assert ns.fd >= 0 and len(rec.pods) == 1
    rec.close()
    assert ns.fd < 0 and rec.pods == {}
    rec.upsert_pod(pod())
    rec.replace_pods([pod()])
    assert rec.pods == {}
