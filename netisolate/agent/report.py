"""What the agent tells operators: Kubernetes Events on pods, Prometheus metrics, JSON logs."""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter, Gauge, Histogram

from netisolate.agent.state import PodState, PodStatus
from netisolate.kube import Events, resource_path
from netisolate.model import Pod

log = logging.getLogger("netisolate.agent")

APPLY_SECONDS = Histogram(
    "netisolate_apply_seconds",
    "Time to install a pod's ruleset",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
DRIFT_REPAIRS = Counter("netisolate_drift_repairs_total", "Rulesets found changed and restored")
ERRORS = Counter("netisolate_errors_total", "Enforcement errors", ["reason"])
PODS = Gauge("netisolate_pods", "Pods on this node by state", ["state"])
REFUSED = Gauge(
    "netisolate_refused_packets",
    "Connection attempts refused (audit: would be refused)",
    ["namespace", "pod", "containers"],
)
OBSERVED_SERIES_CAP = 2000  # observed-connection series this node exports at most; the rest are counted
OBSERVED = Gauge(
    "netisolate_observed_connections",
    "Loopback connections a container opened that no grant allows (audit: would be refused; "
    "enforce: refused), by what it reached, as counted at the last verification",
    ["namespace", "pod", "container", "port", "protocol"],
)
OBSERVED_OVER_CAP = Gauge(
    "netisolate_observed_connections_not_exported",
    f"Observed (container, port, protocol) left out of netisolate_observed_connections (at most "
    f"{OBSERVED_SERIES_CAP} series); /status and the events still have them",
)
EVENTS = Counter("netisolate_events_total", "Kubernetes events emitted", ["reason"])
PORT_SQUATS = Counter(
    "netisolate_port_squats_total",
    "Sockets found bound to a declared port by a UID that does not own it",
    ["namespace", "pod"],
)
WATCH_ERRORS = Counter("netisolate_watch_errors_total", "List/watch requests that failed", ["resource"])
WATCH_UP = Gauge("netisolate_watch_up", "1 while the list/watch works, 0 while it fails", ["resource"])


class Reporter:
    """Events go out on a small thread pool: the API server being slow or down never stalls enforcement."""

    def __init__(self, core: Events | None, node: str) -> None:
        self.core, self.node = core, node
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="events")

    def event(self, pod: Pod, reason: str, message: str, warning: bool = False) -> None:
        EVENTS.labels(reason).inc()
        log.log(
            logging.WARNING if warning else logging.INFO, message, extra={"pod": pod.ref, "reason": reason}
        )
        if self.core is not None:
            self.pool.submit(self._post, self.core, pod, reason, message, warning)

    def _post(self, core: Events, pod: Pod, reason: str, message: str, warning: bool) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat()
        body = {
            "metadata": {  # named as client-go's event recorder names them: object.<time in hex>
                "name": f"{pod.metadata.name}.{time.time_ns():x}",
                "namespace": pod.metadata.namespace,
            },
            "involvedObject": {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": pod.metadata.name,
                "namespace": pod.metadata.namespace,
                "uid": pod.metadata.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "netisolate-agent", "host": self.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            core.create(resource_path("v1", "events", pod.metadata.namespace or "default"), body)
        except Exception as err:  # best effort: an event lost is logged, never fatal
            log.warning("could not post event", extra={"pod": pod.ref, "reason": reason, "error": str(err)})

    def applied(self, pod: Pod, seconds: float) -> None:
        APPLY_SECONDS.observe(seconds)
        log.info("rules applied", extra={"pod": pod.ref, "ms": round(seconds * 1000, 2)})

    def port_squatted(self, pod: Pod, found: list[str]) -> None:
        PORT_SQUATS.labels(pod.metadata.namespace, pod.metadata.name).inc(len(found))
        self.event(
            pod,
            "PortSquatted",
            "a container listens on a port another declares; the rules refuse its answers from "
            "there, but what is sent to it still arrives: "
            + "; ".join(found)
            + ". Find out why that container binds the port, and remove it from the pod if it "
            "should not",
            warning=True,
        )

    def drift_repaired(self, pod: Pod) -> None:
        DRIFT_REPAIRS.inc()

    def error(self, pod: Pod, kind: str) -> None:
        ERRORS.labels(kind).inc()


def record_states(pods: Iterable[PodStatus]) -> None:
    """The gauges from one look at every pod: how many are in each state (every state is set, zero
    included, so a state that empties drops to 0) and each pod's refused packets."""
    states = Tally[PodState]()
    for pod in pods:
        states[pod.state] += 1
        for containers, packets in pod.refused.items():
            REFUSED.labels(pod.namespace, pod.name, containers or "unknown-uid").set(packets)
    for state in PodState:
        PODS.labels(state.value).set(states[state])


def record_observed(pods: Iterable[PodStatus]) -> None:
    """The observed-connections gauge from one look at every pod: rebuilt whole, so what a pod no
    longer has (granted since, or the pod gone) disappears; at most OBSERVED_SERIES_CAP series."""
    OBSERVED.clear()
    exported = left_out = 0
    for pod in pods:
        for o, connections in pod.observed:
            if exported >= OBSERVED_SERIES_CAP:
                left_out += 1
                continue
            OBSERVED.labels(pod.namespace, pod.name, o.container, str(o.port), o.protocol).set(connections)
            exported += 1
    OBSERVED_OVER_CAP.set(left_out)
