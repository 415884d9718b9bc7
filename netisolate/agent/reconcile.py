"""Keep every isolated pod of this node enforced: desired ruleset from pod + namespace, applied only
when it changes, verified (read and compare) on adoption and periodically, repaired on drift.

Rules are never removed by the agent: not when it stops, crashes or loses the API server, and not
on a bad annotation (that enforces with no grants). They go away with the pod's network namespace.
A pod that validly lowers its own level to `off` keeps its rules until it restarts (reported).

A pod whose sandbox is recreated under the same pod UID gets a new network namespace: the agent
notices that the pod's processes have moved and enforces the new one. Failures are retried with
backoff and reported once per distinct failure, so a broken pod cannot flood the API with events.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from netisolate.agent.listeners import exposed, squatted
from netisolate.agent.state import WAITING, PodState, PodStatus
from netisolate.backends import Backend, EnforceError
from netisolate.learning import EVENT_REASON, Observed, identities, learned, suggested, summary, workload
from netisolate.model import Pod
from netisolate.netns import NetNS, NetNSError
from netisolate.policy import PodPolicy, pod_policy
from netisolate.rules import PodCgroups, RuleSet, Settings, build_ruleset, granted, without_cgroups
from netisolate.rules.nft import OBSERVED_SIZE

log = logging.getLogger(__name__)


class Reporter(Protocol):
    def event(self, pod: Pod, reason: str, message: str, warning: bool = False) -> None: ...
    def applied(self, pod: Pod, seconds: float) -> None: ...
    def drift_repaired(self, pod: Pod) -> None: ...
    def port_squatted(self, pod: Pod, found: list[str]) -> None: ...
    def error(self, pod: Pod, kind: str) -> None: ...


class Sandboxes(Protocol):
    """Where pods' sandboxes are (netisolate.agent.discovery.Sandboxes on a node)."""

    def find(self, pod: Pod) -> NetNS | None:
        """The pod's network namespace, once its sandbox exists."""
        ...

    def moved(self, pod: Pod, ns: NetNS) -> bool:
        """The pod's processes now live in another network namespace than ns."""
        ...

    def forget(self, uid: str) -> None:
        """The pod is gone: stop looking for its sandbox."""
        ...


class Cgroups(Protocol):
    """Containers' cgroups (netisolate.agent.cgroups.NodeCgroups on a node), for cgroup identity
    and, under UID identity, the pod's own for the socket guard."""

    def unavailable(self) -> str | None:
        """Why cgroup identity cannot be enforced on this node, or None."""
        ...

    def seen(self, pod: Pod) -> PodCgroups | None:
        """The pod's cgroups as they are now, or None when its sandbox's cgroup is not found."""
        ...

    def unnamed(self, pod: Pod) -> bool:
        """Whether the last `seen` found a cgroup in use that it could not name yet."""
        ...

    def forget(self, uid: str) -> None: ...


PENDING_FAST_S = 5.0  # a sandbox normally appears within a second or two: look often, then calmly
PENDING_SLOW_S = 0.5
FAILED_BACKOFF_S = (0.5, 30.0)  # first retry, longest wait
EXPOSED_EARLY_ROUNDS, EXPOSED_EVERY_ROUNDS = 3, 10  # listener checks: verification rounds
OBSERVED_PER_POD = OBSERVED_SIZE  # what the agent remembers of a pod is what the kernel can hold
OBSERVED_EVENT_S = 60.0  # at most one ConnectionsObserved event per pod this often


@dataclass
class Tracked:
    pod: Pod
    ns: NetNS | None = None
    applied: RuleSet | None = None
    state: PodState = PodState.PENDING
    detail: str = ""
    problems: tuple[str, ...] = field(default_factory=tuple)
    checked_at: float = 0.0  # when the installed rules were last applied or verified
    refused: dict[str, int] = field(default_factory=dict)  # counters from the last verification
    retry_at: float = 0.0  # pending or failed: not retried by the timer before this
    pending_since: float = 0.0
    failures: int = 0  # in a row
    exposed: tuple[str, ...] = ()  # ports last reported as listening beyond loopback
    squatted: tuple[str, ...] = ()  # declared ports last reported as bound by a non-owner
    rounds: int = 0  # verifications since the rules were applied or adopted
    observed: dict[Observed, int] = field(default_factory=dict)  # learning: not granted, seen
    reported: frozenset[Observed] = frozenset()  # what the last ConnectionsObserved event named
    # learning: identities the rules named before (restarted containers' cgroups) → their containers
    former: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reported_at: float = -OBSERVED_EVENT_S
    sandbox: str = ""  # the sandbox ID the CNI plugin handed `ns` over with, if it did
    preinstalled: tuple[RuleSet, float] | None = None  # loaded into a fresh `ns` outside the lock
    cgroup_problem: str = ""  # why cgroup identity was last unavailable for this pod, if it was
    cgroup_wait_since: float = 0.0  # since when the pod's cgroup is looked for (0: found)
    # UID identity under the guard: the pod's cgroup once found; the namespace (cookie) for which it
    # was looked for long enough in vain
    pod_cgroup: PodCgroups | None = None
    cgroup_sought: int = 0


@dataclass
class Handover:
    """A sandbox's network namespace the runtime handed over (CNI ADD), and what was loaded into
    it before the answer. `ready`: the sandbox may start on this alone (its rules hold, or it is
    not isolated); otherwise the answer waits for take_over."""

    pod: Pod
    ns: NetNS
    sandbox: str
    preinstalled: tuple[RuleSet, float] | None
    ready: bool


def _same_sandbox(ns: NetNS, held: str, sandbox: str, inode: int | None) -> bool:
    """Whether a DEL (sandbox ID, namespace inode if it sent one) names the sandbox we hold."""
    return ns.inode == inode or (inode is None and bool(sandbox) and held == sandbox)


def _waiting(tracked: Tracked) -> bool:
    """Retried by the timer: pending, failed, or enforced closed while its cgroup is looked for."""
    return tracked.state in WAITING or bool(tracked.cgroup_wait_since)


class Reconciler:
    def __init__(
        self,
        backend: Backend,
        settings: Settings,
        reporter: Reporter,
        sandboxes: Sandboxes,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.backend, self.settings, self.reporter, self.sandboxes = backend, settings, reporter, sandboxes
        self.cgroups = cgroups
        self.pods: dict[str, Tracked] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.handovers: dict[str, Handover] = {}  # by pod UID: answered, not taken over yet
        self.lock = threading.RLock()
        self.workers = 8
        self.observed_event_s = OBSERVED_EVENT_S
        # Set while some pod waits for its sandbox or a retry: only then do the timers poll fast.
        self.unsettled = threading.Event()
        self.closed = False  # the agent stopped (close)

    # --- inputs from the watches ------------------------------------------------------------

    def upsert_pod(self, pod: Pod) -> None:
        uid = pod.metadata.uid or pod.ref
        with self.lock:
            if self.closed:
                return
            if pod.status and pod.status.phase in ("Succeeded", "Failed"):
                self.forget(uid)
                return
            tracked = self.pods.setdefault(uid, Tracked(pod))
            tracked.pod = pod
            self._sync(tracked)

    def forget(self, uid: str) -> None:
        with self.lock:
            pending = self.handovers.pop(uid, None)
            if pending is not None:
                pending.ns.close()
            tracked = self.pods.pop(uid, None)
            if tracked and tracked.ns:
                tracked.ns.close()
            self.sandboxes.forget(uid)
            if self.cgroups is not None:
                self.cgroups.forget(uid)

    def close(self) -> None:
        """The agent stops: every namespace handle it holds is closed (the rules stay where they
        are), so nothing it kept open, a netlink socket included, outlives it; a pod or sandbox
        that arrives afterwards is not taken on."""
        with self.lock:
            self.closed = True
            for uid in [*self.pods, *self.handovers]:
                self.forget(uid)

    def cgroups_changed(self, uid: str) -> None:
        """A pod's cgroups came or went: a container restarted (its sets follow), or the sandbox
        a pending pod waits for appeared."""
        with self.lock:
            tracked = self.pods.get(uid)
            if tracked is not None:
                self._sync(tracked)

    def replace_pods(self, pods: list[Pod]) -> None:
        """A full list (start-up, relist after 410 Gone): adopt these, forget the rest. Pods are
        synced in parallel: adopting one is mostly waiting on a netfilter tool, not CPU."""
        with self.lock:
            if self.closed:
                return
            keep = {p.metadata.uid or p.ref for p in pods}
            for uid in set(self.pods) - keep:
                self.forget(uid)
            live = [p for p in pods if not (p.status and p.status.phase in ("Succeeded", "Failed"))]
            tracked = []
            for pod in live:
                entry = self.pods.setdefault(pod.metadata.uid or pod.ref, Tracked(pod))
                entry.pod = pod
                tracked.append(entry)
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                list(pool.map(self._sync, tracked))

    def set_namespace(self, name: str, labels: dict[str, str]) -> None:
        with self.lock:
            if self.namespaces.get(name) == labels:
                return
            self.namespaces[name] = labels
            for tracked in list(self.pods.values()):
                if (tracked.pod.metadata.namespace or "default") == name:
                    self._sync(tracked)

    # --- inputs from the CNI plugin: a sandbox before its first container ----------------------

    def enforce_sandbox(self, pod: Pod, ns: NetNS, sandbox: str) -> tuple[PodState, str]:
        """The runtime is creating `sandbox` for the pod, in network namespace `ns` (a handle the
        reconciler now owns), and starts no container before we answer: decide and apply now.
        Returns the pod's (state, detail) afterwards."""
        return self.take_over(self.hand_over(pod, ns, sandbox))

    def hand_over(self, pod: Pod, ns: NetNS, sandbox: str) -> Handover:
        """The first half of enforce_sandbox, without the lock: the pod's rules loaded into `ns`.
        When the handover is `ready` the sandbox may start at once, and take_over does the
        bookkeeping after the runtime has its answer: an answer never waits behind a verification
        round or a /proc scan holding the lock. The namespace is new and no one else knows it
        yet, and sandboxes created at once (a node starting up) are enforced at once."""
        uid = pod.metadata.uid or pod.ref
        # (a dict read: atomic, no lock needed; set_namespace replaces, never mutates, a value)
        # with cgroup identity: empty sets and no runtime exception until the sync below sees them
        labels = self.namespaces.get(pod.metadata.namespace or "default", {})
        policy = pod_policy(pod, labels, self.settings.identity)
        desired = build_ruleset(policy, self.settings, ns.user_namespaced()) if policy.isolated else None
        handover = Handover(pod, ns, sandbox, None, desired is None or bool(pod.spec.host_network))
        if not handover.ready:
            started = time.perf_counter()
            with contextlib.suppress(EnforceError):  # tried again, and reported, under the lock
                assert desired is not None
                self.backend.apply(ns, desired)
                handover.preinstalled, handover.ready = (desired, time.perf_counter() - started), True
        self.handovers[uid] = handover  # (atomic) a DEL before take_over lets the namespace go
        return handover

    def take_over(self, handover: Handover) -> tuple[PodState, str]:
        """The second half: the handed-over namespace becomes the pod's, under the lock, and the
        pod is synced (a failed preinstall is retried here). Returns the pod's (state, detail)."""
        pod, ns = handover.pod, handover.ns
        uid = pod.metadata.uid or pod.ref
        with self.lock:
            if self.closed or self.handovers.get(uid) is not handover:  # released, forgotten or superseded
                ns.close()
                return PodState.PENDING, "the sandbox was torn down before its rules were taken over"
            del self.handovers[uid]
            tracked = self.pods.setdefault(uid, Tracked(pod))
            tracked.pod = pod
            if tracked.ns is not None and tracked.ns.inode != ns.inode:  # a new sandbox
                if tracked.applied is not None:
                    self.reporter.event(
                        pod, "SandboxReplaced", "the pod's sandbox was recreated; enforcing the new one", True
                    )
                tracked.ns.close()
                tracked.ns, tracked.applied = None, None
            fresh = tracked.ns is None
            if fresh:
                tracked.ns, tracked.preinstalled = ns, handover.preinstalled
            else:
                ns.close()
            tracked.sandbox = handover.sandbox
            self._sync(tracked, adopt=not fresh)
            tracked.preinstalled = None
            return tracked.state, tracked.detail

    def release_sandbox(self, uid: str, sandbox: str, inode: int | None) -> None:
        """The runtime tore the sandbox down (CNI DEL): let its namespace go. Nothing happens for
        a sandbox we do not hold (another one of the pod, or a pod we never saw)."""
        with self.lock:
            pending = self.handovers.get(uid)
            if pending is not None and _same_sandbox(pending.ns, pending.sandbox, sandbox, inode):
                del self.handovers[uid]
                pending.ns.close()
            tracked = self.pods.get(uid)
            if tracked is None or tracked.ns is None:
                return
            if not _same_sandbox(tracked.ns, tracked.sandbox, sandbox, inode):
                return
            tracked.ns.close()
            tracked.ns, tracked.applied, tracked.sandbox = None, None, ""
            self._sync(tracked)  # pending until a new sandbox appears, or the pod goes

    def check_sandbox(self, uid: str, inode: int) -> list[str]:
        """CNI CHECK: what is wrong with the sandbox's rules ([] when they hold, or the pod is
        not isolated)."""
        with self.lock:
            tracked = self.pods.get(uid)
            if tracked is None or tracked.ns is None or tracked.ns.inode != inode:
                return ["the agent does not hold this sandbox's network namespace"]
            if tracked.state in (PodState.OFF, PodState.HOST_NETWORK):
                return []
            if tracked.applied is None:
                return [f"rules not installed: {tracked.detail or tracked.state}"]
            try:
                return self.backend.verify(tracked.ns, tracked.applied)
            except EnforceError as err:
                return [str(err)]

    # --- timers --------------------------------------------------------------------------------

    def next_retry(self) -> float:
        """When the earliest waiting pod is due (monotonic clock); infinity when none waits."""
        with self.lock:
            return min((t.retry_at for t in self.pods.values() if _waiting(t)), default=float("inf"))

    def retry_pending(self) -> None:
        with self.lock:
            now = time.monotonic()
            for tracked in [t for t in self.pods.values() if _waiting(t) and t.retry_at <= now]:
                self._sync(tracked)
            if not any(_waiting(t) for t in self.pods.values()):
                self.unsettled.clear()

    def verify_all(self, fresh: float = 1.0) -> int:
        """Read and compare every enforced pod's rules (but those checked within `fresh` seconds);
        repair drift. Returns how many drifted. The lock is taken pod by pod, so pod events and
        new sandboxes are not held up by a whole round."""
        drifted = 0
        with self.lock:
            snapshot = list(self.pods.items())
        for uid, tracked in snapshot:
            with self.lock:
                if self.pods.get(uid) is not tracked:  # forgotten or replaced meanwhile
                    continue
                try:
                    drifted += self._verify(tracked, fresh)
                except Exception as err:  # one pod's trouble never ends the round for the others
                    log.exception("verification failed", extra={"pod": tracked.pod.ref})
                    self._failed(tracked, "VerifyFailed", f"unexpected error: {err}")
        return drifted

    def _verify(self, tracked: Tracked, fresh: float) -> int:
        if tracked.ns is None or tracked.applied is None or time.monotonic() - tracked.checked_at < fresh:
            return 0
        tracked.checked_at = time.monotonic()
        if self.sandboxes.moved(tracked.pod, tracked.ns):
            tracked.sandbox = ""  # recreated without a word from the runtime: found in /proc
            self._sync(tracked)  # finds and enforces the pod's new namespace
            return 0
        try:
            inspection = self.backend.inspect(tracked.ns, tracked.applied)
        except EnforceError as err:  # an unreadable namespace is a failure to retry
            self._failed(tracked, "VerifyFailed", str(err))
            return 0
        tracked.refused = inspection.refused
        self._learn(tracked, tracked.applied, inspection.observed)
        tracked.rounds += 1
        # Containers listen after their rules are in: look at the first rounds, then now and then.
        if tracked.rounds <= EXPOSED_EARLY_ROUNDS or tracked.rounds % EXPOSED_EVERY_ROUNDS == 0:
            self._check_listeners(tracked, tracked.applied)
        if not inspection.drift:
            return 0
        self._apply(tracked, tracked.applied)
        if tracked.state is not PodState.FAILED:
            self.reporter.drift_repaired(tracked.pod)
            self.reporter.event(
                tracked.pod,
                "DriftRepaired",
                "rules were changed behind the agent's back and have been restored: "
                + "; ".join(inspection.drift[:5]),
                warning=True,
            )
        return 1

    # --- the decision ----------------------------------------------------------------------------

    def _sync(self, tracked: Tracked, adopt: bool = True) -> None:
        """adopt: rules found in the namespace may be kept as they are (after an agent restart);
        a namespace the runtime has just created holds none, and is not read first."""
        try:
            self._decide(tracked, adopt)
        except Exception as err:  # whatever it was: reported and retried with backoff, rules untouched
            log.exception("reconciling failed", extra={"pod": tracked.pod.ref})
            self._failed(tracked, "EnforceFailed", f"unexpected error: {err}")

    def _decide(self, tracked: Tracked, adopt: bool = True) -> None:
        pod = tracked.pod
        if pod.spec.host_network:
            tracked.state, tracked.detail = PodState.HOST_NETWORK, PodState.HOST_NETWORK.meaning
            return
        policy = pod_policy(
            pod, self.namespaces.get(pod.metadata.namespace or "default", {}), self.settings.identity
        )
        if policy.problems != tracked.problems:
            tracked.problems = policy.problems
            if policy.problems:
                self.reporter.event(
                    pod,
                    "PolicyInvalid",
                    "enforced with no grants (fail closed): " + "; ".join(policy.problems),
                    warning=True,
                )
        if not policy.isolated:
            if tracked.applied is not None and tracked.state is not PodState.OFF:
                self.reporter.event(
                    pod,
                    "IsolationOff",
                    "isolation was turned off; the current rules stay until "
                    "the pod restarts (the agent never opens a running pod)",
                )
            tracked.state = PodState.OFF
            return
        ns = self._namespace(tracked)
        if ns is None:
            return
        settings, seen = self.settings, None
        if policy.identity.by_cgroup:
            policy, settings, seen = self._by_cgroup(tracked, policy)
        elif self.backend.wants_pod_cgroup:
            seen = self._pod_cgroup(tracked)
        desired = build_ruleset(policy, settings, ns.user_namespaced(), seen)
        assert desired is not None  # isolated
        if tracked.applied == desired and tracked.state is not PodState.FAILED:
            tracked.state = PodState(desired.mode)  # also back from off with the same rules still in place
            return
        fresh = tracked.state is not PodState.FAILED
        if tracked.applied is not None and fresh and desired.same_but_cgroups(tracked.applied):
            self._update_cgroups(tracked, desired)
            return
        if tracked.applied is None and adopt and self._intact(tracked, desired):
            tracked.applied, tracked.state = desired, PodState(desired.mode)
            tracked.detail = "adopted: rules verified intact"
            tracked.failures = tracked.rounds = 0
            return
        self._apply(tracked, desired)

    def _by_cgroup(
        self, tracked: Tracked, policy: PodPolicy
    ) -> tuple[PodPolicy, Settings, PodCgroups | None]:
        """The pod's cgroups; where they cannot be matched, the pod is enforced with no grants
        and no runtime exception under UID rules (fail closed), and an event says why."""
        pod = tracked.pod
        reason = None
        if not self.backend.cgroups:
            reason = f"the {self.backend.name} backend cannot match cgroups; run the agent with nftables"
        elif self.cgroups is None or (reason := self.cgroups.unavailable()) is not None:
            reason = reason or "the agent has no view of the node's cgroups"
        else:
            seen = self.cgroups.seen(pod)
            if seen is not None:
                tracked.cgroup_problem = ""
                if self.cgroups.unnamed(pod):  # its runtime's record shows up a moment later
                    self._cgroup_soon(tracked)
                else:
                    tracked.cgroup_wait_since = 0.0
                return policy, self.settings, seen
            reason = "the pod's cgroup is not in the cgroup v2 hierarchy the agent sees"
            if self._cgroup_soon(tracked):  # a sandbox joins its cgroups a moment after it starts
                return (*without_cgroups(policy, self.settings, reason), None)
        if tracked.cgroup_problem != reason:  # once per distinct reason
            tracked.cgroup_problem = reason
            message = f"enforced with no grants (fail closed): {reason}"
            self.reporter.event(pod, "CgroupIdentityUnavailable", message, warning=True)
        return (*without_cgroups(policy, self.settings, reason), None)

    def _pod_cgroup(self, tracked: Tracked) -> PodCgroups | None:
        """UID identity, where the backend attaches to the pod's cgroup (the socket guard): where
        it is. Looked for as often as for cgroup identity while the pod is new (its sandbox joins
        its cgroup a moment after the CNI ADD), then no more: a pod moves to the guard only before
        its sockets are opened, and meanwhile its table serves it."""
        if tracked.pod_cgroup is not None:  # a pod's own cgroup is the pod's for its lifetime
            return tracked.pod_cgroup
        if self.cgroups is None or self.cgroups.unavailable() is not None or tracked.ns is None:
            return None
        seen = self.cgroups.seen(tracked.pod)
        if seen is not None and seen.pod is not None:
            tracked.cgroup_wait_since, tracked.pod_cgroup = 0.0, PodCgroups(seen.level, seen.pod)
        elif tracked.cgroup_sought != tracked.ns.cookie and not self._cgroup_soon(tracked):
            tracked.cgroup_sought, tracked.cgroup_wait_since = (
                tracked.ns.cookie,
                0.0,
            )  # (a new sandbox: again)
        return tracked.pod_cgroup

    def _cgroup_soon(self, tracked: Tracked) -> bool:
        """Look for the pod's cgroup again shortly; True while that is still normal (no event)."""
        now = time.monotonic()
        tracked.cgroup_wait_since = tracked.cgroup_wait_since or now
        young = now - tracked.cgroup_wait_since < PENDING_FAST_S
        tracked.retry_at = now + (0.0 if young else PENDING_SLOW_S)
        self.unsettled.set()
        return young

    def _update_cgroups(self, tracked: Tracked, desired: RuleSet) -> None:
        """Same rules, other cgroups (a container restarted): an element update, ~1 ms."""
        assert tracked.ns is not None
        started = time.perf_counter()
        try:
            assert tracked.applied is not None
            self.backend.update_cgroups(tracked.ns, desired, tracked.applied)
        except EnforceError as err:
            self._failed(tracked, "EnforceFailed", str(err))
            return
        self.reporter.applied(tracked.pod, time.perf_counter() - started)
        tracked.former.update(identities(tracked.applied))  # what they recorded is still theirs
        tracked.applied, tracked.checked_at = desired, time.monotonic()

    def _namespace(self, tracked: Tracked) -> NetNS | None:
        """The pod's current network namespace (found again if its sandbox was recreated), or None
        while it has none yet."""
        # A namespace the runtime handed over (CNI) is the sandbox's by its word; the next
        # sandbox will be handed over too. Only namespaces found in /proc are looked after.
        if tracked.ns is not None and not tracked.sandbox and self.sandboxes.moved(tracked.pod, tracked.ns):
            self.reporter.event(
                tracked.pod,
                "SandboxReplaced",
                "the pod's network namespace was recreated; enforcing the new one",
                warning=True,
            )
            tracked.ns.close()
            tracked.ns, tracked.applied = None, None
        if tracked.ns is None:
            tracked.ns = self.sandboxes.find(tracked.pod)
            if tracked.ns is not None and tracked.state is PodState.PENDING and tracked.pending_since:
                waited = round(1000 * (time.monotonic() - tracked.pending_since), 1)
                log.info("sandbox found", extra={"pod": tracked.pod.ref, "waited_ms": waited})
        if tracked.ns is None:
            now = time.monotonic()
            if tracked.state is not PodState.PENDING or not tracked.pending_since:
                tracked.pending_since = now
            tracked.state, tracked.detail = PodState.PENDING, "network namespace not found yet"
            calm = now - tracked.pending_since > PENDING_FAST_S
            tracked.retry_at = now + (PENDING_SLOW_S if calm else 0.0)
            self.unsettled.set()
        return tracked.ns

    def _intact(self, tracked: Tracked, desired: RuleSet) -> bool:
        """After an agent restart the rules are usually there already: a read, not a re-apply."""
        assert tracked.ns is not None
        try:
            return self.backend.verify(tracked.ns, desired) == []
        except EnforceError:
            return False

    def _apply(self, tracked: Tracked, desired: RuleSet) -> None:
        assert tracked.ns is not None
        pre, tracked.preinstalled = tracked.preinstalled, None
        if pre is not None and pre[0] == desired:  # what enforce_sandbox loaded is what we want
            seconds = pre[1]
        else:
            started = time.perf_counter()
            try:
                self.backend.apply(tracked.ns, desired)
            except EnforceError as err:
                self._failed(tracked, "EnforceFailed", str(err))
                return
            seconds = time.perf_counter() - started
        self.reporter.applied(tracked.pod, seconds)
        announce = tracked.applied is None or tracked.state is PodState.FAILED
        tracked.applied, tracked.state, tracked.detail = desired, PodState(desired.mode), ""
        tracked.failures = tracked.rounds = 0
        tracked.checked_at = time.monotonic()
        self._check_listeners(tracked, desired)
        if announce:
            grants = ", ".join(f"{who}→{','.join(str(p) for p in ports)}" for who, ports in granted(desired))
            self.reporter.event(
                tracked.pod,
                "Enforced",
                f"{desired.mode} with {self.backend.name}; grants: {grants or 'none'}",
            )

    def _check_listeners(self, tracked: Tracked, desired: RuleSet) -> None:
        """Checked on every apply and on some verifications (containers start listening after their
        rules are in); each finding is reported once for each new set of ports."""
        assert tracked.ns is not None
        try:
            found = tuple(exposed(tracked.ns, tracked.pod, desired))
            squats = tuple(squatted(tracked.ns, desired))
        except (OSError, NetNSError):
            return
        if squats != tracked.squatted:
            tracked.squatted = squats
            if squats:
                self.reporter.port_squatted(tracked.pod, list(squats))
        if found == tracked.exposed:
            return
        tracked.exposed = found
        if found:
            self.reporter.event(
                tracked.pod,
                "WildcardListener",
                "ports that look meant for loopback listen beyond it, so other containers reach "
                "them by hairpin through a Service, where loopback rules do not apply: "
                + ", ".join(found)
                + "; bind them to 127.0.0.1 or ::1 (or declare a containerPort if they are served)",
                warning=True,
            )

    def _failed(self, tracked: Tracked, reason: str, message: str) -> None:
        self.reporter.error(tracked.pod, reason)
        if tracked.state is not PodState.FAILED or tracked.detail != message:  # once per distinct failure
            self.reporter.event(tracked.pod, reason, message, warning=True)
            log.error(
                "enforcement failed", extra={"pod": tracked.pod.ref, "reason": reason, "error": message}
            )
        first, longest = FAILED_BACKOFF_S
        tracked.failures += 1
        tracked.retry_at = time.monotonic() + min(first * 2 ** (tracked.failures - 1), longest)
        tracked.state, tracked.detail = PodState.FAILED, message
        self.unsettled.set()

    # --- learning ---------------------------------------------------------------------------------

    def _learn(self, tracked: Tracked, applied: RuleSet, seen: list[tuple[str, str, int, int]]) -> None:
        """Keep what the kernel recorded as not granted (bounded like the kernel's set: new entries
        beyond it are dropped), forget what is granted by now, and tell the pod's Events when there
        is something new, at most every OBSERVED_EVENT_S. A former identity is kept while the
        kernel lists something it recorded (at most OBSERVED_SIZE of them)."""
        tracked.observed = learned(applied, tracked.observed, seen, OBSERVED_PER_POD, tracked.former)
        listed = {identity for identity, *_ in seen}
        tracked.former = {i: names for i, names in tracked.former.items() if i in listed}
        now = time.monotonic()
        keys = frozenset(tracked.observed)
        if keys - tracked.reported and now - tracked.reported_at >= self.observed_event_s:
            tracked.reported, tracked.reported_at = keys, now
            self.reporter.event(
                tracked.pod,
                EVENT_REASON,
                summary(tracked.observed, self.suggestion(tracked), applied.mode, _owner(tracked.pod)),
            )

    def suggestion(self, tracked: Tracked) -> dict[str, str]:
        """The grant annotations that would allow what was observed, on top of the current grants."""
        policy = pod_policy(tracked.pod, self.namespaces.get(tracked.pod.metadata.namespace or "default", {}))
        return suggested({c.name: c.grants for c in policy.containers}, tracked.observed)

    def status(self) -> list[PodStatus]:
        """Every tracked pod, by UID: what /status shows and the gauges count."""
        with self.lock:
            return [
                PodStatus(
                    pod=t.pod.ref,
                    namespace=t.pod.metadata.namespace or "default",
                    name=t.pod.metadata.name or "",
                    uid=uid,
                    state=t.state,
                    detail=t.detail,
                    netns=t.ns.inode if t.ns else None,
                    refused=dict(t.refused),
                    observed=tuple(sorted(t.observed.items())),
                    suggest=self.suggestion(t) if t.observed else {},
                    owner=_owner(t.pod),
                )
                for uid, t in sorted(self.pods.items())
            ]


def _owner(pod: Pod) -> str:
    found = workload(pod)
    return f"{found[0]}/{found[1]}" if found else ""
