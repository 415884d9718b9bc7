"""The agent on one node: watches → reconciler, and timers for new sandboxes and drift. It hands
the reconciler the node's sandboxes (netisolate.agent.discovery) and serves what it is doing
through netisolate.agent.endpoints."""

from __future__ import annotations

import logging
import threading
import time

from netisolate.agent import discovery, endpoints
from netisolate.agent.cgroups import NodeCgroups
from netisolate.agent.reconcile import Reconciler
from netisolate.agent.report import Reporter, record_observed, record_states
from netisolate.agent.state import NodeStatus
from netisolate.agent.watch import ListWatch
from netisolate.backends import Backend
from netisolate.kube import AgentApi, resource_path
from netisolate.kubeclient import Obj
from netisolate.model import InputError, Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.rules import Settings

log = logging.getLogger("netisolate.agent")
NAMESPACE_GRACE_S = 2.0  # how long pods wait for a namespace list that is in flight, not failing


class Agent:
    def __init__(
        self,
        node: str,
        backend: Backend,
        settings: Settings,
        core: AgentApi | None,
        *,
        proc_root: str = "/proc",
        host_netns: str = "/proc/1/ns/net",
        verify_interval: float = 30.0,
        pending_interval: float = 0.02,
    ) -> None:
        self.node, self.core = node, core
        self.verify_interval, self.pending_interval = verify_interval, pending_interval
        self.host = NetNS.open(host_netns)  # the node's own namespace (PID 1's): never a pod's
        self.sandboxes = discovery.Sandboxes(self.host.inode, proc_root)
        self.cgroups = NodeCgroups(self.sandboxes.cgroup)
        self.reconciler = Reconciler(backend, settings, Reporter(core, node), self.sandboxes, self.cgroups)
        self.cgroups.on_change(self.reconciler.cgroups_changed)
        self.sandboxes.on_change(self.reconciler.cgroups_changed)  # a pending pod's sandbox appeared
        self.heartbeat = time.monotonic()  # the timer loop's last round: /healthz fails when it stalls
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.namespaces_known = threading.Event()  # the first namespace list has arrived
        self.namespace_watch: ListWatch | None = None  # once watches() made it

    # --- watch callbacks ---------------------------------------------------------------------------

    def _pod(self, obj: Obj) -> Pod | None:
        try:
            pod = parse_pod(
                obj, f"pod {obj.get('metadata', {}).get('namespace')}/{obj.get('metadata', {}).get('name')}"
            )
        except InputError as err:
            log.error("unreadable pod skipped", extra={"error": str(err)})
            return None
        return pod if pod.spec.node_name == self.node else None  # the server filters too; trust, but verify

    def _namespace_labels_or_failure(self) -> bool:
        """Pods wait for the first namespace list while it is merely in flight (a few ms), so that
        a restarted agent does not weaken an `audit` pod in an `enforce` namespace to audit for a
        moment. They never wait on a failing one: a pod's own annotation is a floor, enforced at
        once; the namespace's label can only raise it once it is known."""
        deadline = time.monotonic() + NAMESPACE_GRACE_S
        while not self.namespaces_known.wait(0.05):
            failing = self.namespace_watch is not None and self.namespace_watch.failing
            if failing or self.stop.is_set() or time.monotonic() > deadline:
                return not self.stop.is_set()
        return True

    def on_pod_list(self, items: list[Obj]) -> None:
        if self._namespace_labels_or_failure():
            started = time.monotonic()
            self.reconciler.replace_pods([p for p in map(self._pod, items) if p is not None])
            log.info(
                "pod list adopted",
                extra={"pods": len(items), "ms": round(1000 * (time.monotonic() - started), 1)},
            )

    def on_pod_event(self, kind: str, obj: Obj) -> None:
        if kind == "DELETED":
            self.reconciler.forget((obj.get("metadata") or {}).get("uid", ""))
            return
        pod = self._pod(obj)
        if pod is not None and self._namespace_labels_or_failure():
            self.reconciler.upsert_pod(pod)

    def on_namespace_list(self, items: list[Obj]) -> None:
        for obj in items:
            self.on_namespace_event("ADDED", obj)
        self.namespaces_known.set()

    def on_namespace_event(self, kind: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        self.reconciler.set_namespace(
            meta.get("name", ""), {} if kind == "DELETED" else dict(meta.get("labels") or {})
        )

    # --- running -----------------------------------------------------------------------------------

    def watches(self, timeout_seconds: int = 240) -> tuple[ListWatch, ListWatch]:
        """Namespaces (labels can raise a pod's level) and this node's pods."""
        assert self.core is not None
        self.namespace_watch = ListWatch(
            "namespaces",
            self.core,
            resource_path("v1", "namespaces"),
            self.on_namespace_list,
            self.on_namespace_event,
            stop=self.stop,
            timeout_seconds=timeout_seconds,
        )
        pods = ListWatch(
            "pods",
            self.core,
            resource_path("v1", "pods"),
            self.on_pod_list,
            self.on_pod_event,
            stop=self.stop,
            timeout_seconds=timeout_seconds,
            field_selector=f"spec.nodeName={self.node}",
        )
        return self.namespace_watch, pods

    def loop(self, pods_synced: threading.Event) -> None:
        """Timers: new sandboxes are looked for every pending_interval, drift every verify_interval.
        They start with the first pod list, whatever the namespace watch does."""
        while not pods_synced.wait(0.5) and not self.stop.is_set():
            self.heartbeat = time.monotonic()  # alive, waiting for the API server
        self.reconciler.verify_all()  # start-up: everything re-verified before we call ourselves ready
        self.ready.set()
        log.info("agent ready", extra={"node": self.node, "pods": len(self.reconciler.pods)})
        next_verify = time.monotonic() + self.verify_interval
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                # Idle, the loop sleeps until a pod becomes unsettled (or ~2 wake-ups a second to see
                # `stop`); while one waits for its sandbox or a retry, it polls every pending_interval.
                if self.reconciler.unsettled.wait(min(0.5, max(0.0, next_verify - time.monotonic()))):
                    due = self.reconciler.next_retry() - time.monotonic()  # backing-off pods wait
                    if self.stop.wait(min(max(self.pending_interval, due), 0.5)):
                        break
                    self.reconciler.retry_pending()
                if time.monotonic() >= next_verify:
                    next_verify = time.monotonic() + self.verify_interval
                    self.reconciler.verify_all()
                    self.update_gauges()
            except Exception:  # a bug must not end enforcement: log it and go on with the next round
                log.exception("agent loop round failed")
                self.stop.wait(1.0)
        self.reconciler.close()

    def alive(self) -> bool:
        """The timer loop still turns (a verification round included); /healthz says so."""
        return time.monotonic() - self.heartbeat < max(60.0, 3 * self.verify_interval)

    def unready(self) -> str:
        """Why /readyz fails ("" when ready): the start-up verification has not finished, or the
        namespace labels are not known (pods are enforced at their own level meanwhile)."""
        if not self.ready.is_set():
            return "start-up verification running"
        failing = self.namespace_watch.failing if self.namespace_watch else ""
        if failing or not self.namespaces_known.is_set():
            return (
                f"namespace list/watch {'failing: ' + failing if failing else 'not listed yet'}; pods "
                "are enforced at their own annotation's level, namespace labels cannot raise it meanwhile"
            )
        return ""

    def status(self) -> NodeStatus:
        """What /status serves and `netisolate status` prints."""
        return {
            "node": self.node,
            "ready": self.ready.is_set(),
            "unready": self.unready(),
            "backend": self.reconciler.backend.name,
            "pods": [pod.to_json() for pod in self.reconciler.status()],
        }

    def update_gauges(self) -> None:
        pods = self.reconciler.status()
        record_states(pods)
        record_observed(pods)

    def run(self, metrics_port: int) -> None:
        server = endpoints.serve(self, metrics_port)
        log.info("agent running", extra={"node": self.node, "backend": self.reconciler.backend.name})
        namespaces, pods = self.watches()
        namespaces.start()
        pods.start()
        try:
            self.loop(pods.synced)
        finally:
            self.stop.set()
            server.shutdown()  # rules stay: the agent never removes them on its way out
