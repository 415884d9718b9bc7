"""Where a pod stands with the agent: one set of states shared by the reconciler, the
`netisolate_pods{state}` gauge, `/status` and `netisolate status`.

Kept apart from the reconciler so that `netisolate status` can name the states without importing
the enforcement machinery."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypedDict


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

    def to_json(self) -> PodStatusJSON:
        return {
            "pod": self.pod,
            "uid": self.uid,
            "state": self.state.value,
            "detail": self.detail,
            "netns": "" if self.netns is None else str(self.netns),
        }


class PodStatusJSON(TypedDict):
    pod: str
    uid: str
    state: str  # a PodState value
    detail: str
    netns: str  # the inode, or "" while the pod has no namespace


class NodeStatus(TypedDict):
    """The body of `/status`, which `netisolate status` prints."""

    node: str
    ready: bool
    unready: str  # why /readyz fails; "" when ready
    backend: str
    pods: list[PodStatusJSON]
