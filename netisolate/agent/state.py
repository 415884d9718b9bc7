"""Where a pod stands with the agent: one set of states shared by the reconciler, the
`netisolate_pods{state}` gauge, `/status` and `netisolate status`.

Kept apart from the reconciler so that `netisolate status` can name the states without importing
the enforcement machinery."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypedDict

from netisolate.learning import Observed


class PodState(StrEnum):
    PENDING = "pending"
    ENFORCE = "enforce"
    AUDIT = "audit"
    FAILED = "failed"
    OFF = "off"
    HOST_NETWORK = "host-network"

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    PodState.PENDING: "isolated, but its network namespace has not been found yet",
    PodState.ENFORCE: "rules installed: connections its grants do not allow are refused",
    PodState.AUDIT: "rules installed: connections its grants do not allow are counted, not refused",
    PodState.FAILED: "installing or verifying its rules failed; retried with backoff (see its events)",
    PodState.OFF: "not isolated (rules installed before it was turned off stay until it restarts)",
    PodState.HOST_NETWORK: "shares the node's network namespace: not isolated",
}
WAITING = frozenset({PodState.PENDING, PodState.FAILED})  # retried by the agent's timer


@dataclass(frozen=True)
class PodStatus:
    """One row of `/status`: what the agent knows of one pod right now."""

    pod: str  # namespace/name, as messages name it
    namespace: str
    name: str
    uid: str
    state: PodState
    detail: str = ""
    netns: int | None = None  # the inode of the namespace its rules are in
    refused: Mapping[str, int] = field(default_factory=dict)  # containers → packets, last verification
    # learning: (container, protocol, port) seen and not granted → connections, and the
    # annotations that would allow them; the pod's workload (`Kind/name`), for the patch
    observed: tuple[tuple[Observed, int], ...] = ()
    suggest: Mapping[str, str] = field(default_factory=dict)
    owner: str = ""

    def to_json(self) -> PodStatusJSON:
        return {
            "pod": self.pod,
            "uid": self.uid,
            "state": self.state.value,
            "detail": self.detail,
            "netns": "" if self.netns is None else str(self.netns),
            "namespace": self.namespace,
            "name": self.name,
            "owner": self.owner,
            "observed": [
                {"container": o.container, "protocol": o.protocol, "port": o.port, "connections": n}
                for o, n in self.observed
            ],
            "suggest": dict(self.suggest),
        }


class ObservedJSON(TypedDict):
    container: str
    protocol: str
    port: int
    connections: int  # opening packets the kernel counted (TCP SYNs, UDP datagrams)


class PodStatusJSON(TypedDict):
    pod: str
    uid: str
    state: str  # a PodState value
    detail: str
    netns: str  # the inode, or "" while the pod has no namespace
    namespace: str
    name: str
    owner: str  # the pod's workload, `Kind/name`, or ""
    observed: list[ObservedJSON]  # learning: seen and not granted (audit), or refused (enforce)
    suggest: dict[str, str]  # the grant annotations that would allow what was observed


class NodeStatus(TypedDict):
    """The body of `/status`, which `netisolate status` prints."""

    node: str
    ready: bool
    unready: str  # why /readyz fails; "" when ready
    backend: str
    pods: list[PodStatusJSON]
