"""The calls netisolate makes of the Kubernetes API, as Protocols, and the client that makes them.

Each consumer asks only for the calls it makes (the webhook reads namespaces, the agent lists,
watches and posts events, ...), so the type checker holds every call and a stand-in needs only
those. netisolate.kubeclient.Client satisfies them all; objects are the API's own JSON (camelCase
dicts), as the rest of netisolate reads pods."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Protocol

from netisolate.kubeclient import Client, KubeError, Listing, Obj, WatchEvent
from netisolate.kubeconfig import endpoint
from netisolate.model import InputError


class Reader(Protocol):
    def get(self, path: str, *, timeout: float | None = ...) -> Obj: ...


class Lister(Protocol):
    def list(self, path: str, *, field_selector: str | None = ...) -> Listing: ...


class Watcher(Lister, Protocol):
    """What the agent's list+watch loops use."""

    def watch(
        self,
        path: str,
        *,
        resource_version: str | None,
        field_selector: str | None = ...,
        timeout_seconds: int = ...,
    ) -> Iterator[WatchEvent]: ...


class Creator(Protocol):
    def create(self, path: str, body: Obj) -> Obj: ...


class Patcher(Protocol):
    def patch(self, path: str, operations: list[Obj]) -> Obj: ...


class Namespaces(Reader, Protocol):
    """What the webhook reads for a pod's isolation floor."""


class Secrets(Reader, Creator, Protocol):
    """What the webhook's TLS bootstrap reads and writes."""


class WebhookConfigurations(Reader, Patcher, Protocol):
    """What the webhook's TLS bootstrap reads and patches (its own caBundle)."""


class Events(Creator, Protocol):
    """What the agent posts."""


class EventReader(Reader, Lister, Protocol):
    """What `netisolate suggest` reads: the agents' ConnectionsObserved events, and pods."""


class AgentApi(Watcher, Events, Reader, Protocol):
    """Every call the agent makes."""


class WebhookApi(Namespaces, Secrets, WebhookConfigurations, Protocol):
    """Every call the webhook makes."""


def resource_path(
    api_version: str, plural: str, namespace: str | None = None, name: str | None = None
) -> str:
    """`/api/v1/namespaces/shop/pods/web` from ("v1", "pods", "shop", "web"); groups under /apis."""
    root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [*(("namespaces", namespace) if namespace else ()), plural, *((name,) if name else ())]
    return "/".join([root, *(urllib.parse.quote(part, safe="") for part in parts)])


def api_client(kubeconfig: str | None, user_agent: str = "netisolate") -> Client:
    """A client of the API server `kubeconfig` names, else in-cluster, else kubectl's kubeconfig;
    InputError says what is missing."""
    try:
        return Client(endpoint(kubeconfig), user_agent=user_agent)
    except (OSError, KubeError) as err:  # an unreadable CA or key pair, a server that is no URL
        raise InputError(f"cannot use the Kubernetes credentials: {err}; pass --kubeconfig") from None
