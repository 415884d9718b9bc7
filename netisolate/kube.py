"""Kubernetes API clients: a kubeconfig file when given, else in-cluster configuration, else the
kubeconfig kubectl would use — and the calls netisolate makes of them, as Protocols.

The Protocols name exactly the methods, arguments and fields the code uses, so the type checker
holds every call; each consumer asks only for the calls it makes, so a stand-in needs only those.
The `kubernetes` client satisfies them structurally (tests/test_kube.py). Two things its
annotations do not say: a call with `_preload_content=False` returns the raw HTTP response, not
the model its annotation names (hence `object` and `decoded`), and a request body may be a plain
dict, which the client validates into its model (hence `body: Any`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

from netisolate.model import InputError


class ObjectMeta(Protocol):
    @property
    def labels(self) -> Mapping[str, str] | None: ...


class Namespace(Protocol):
    @property
    def metadata(self) -> ObjectMeta | None: ...


class Secret(Protocol):
    @property
    def data(self) -> Mapping[str, bytes | str] | None: ...  # base64 text, as the API serves it


class ClientConfig(Protocol):
    @property
    def ca_bundle(self) -> bytes | str | None: ...


class ValidatingWebhook(Protocol):
    @property
    def client_config(self) -> ClientConfig: ...


class ValidatingWebhookConfiguration(Protocol):
    @property
    def webhooks(self) -> Sequence[ValidatingWebhook] | None: ...


class Lister(Protocol):
    """A list call: with _preload_content=False (always, here) it returns the raw response; the
    watch calls it with its own arguments on top."""

    def __call__(self, *, field_selector: str | None = ..., _preload_content: bool = ...) -> object: ...


class Listings(Protocol):
    """What the agent's watches list (the audit lists with netisolate.kubelist)."""

    def list_namespace(self, *, field_selector: str | None = ..., _preload_content: bool = ...) -> object: ...
    def list_pod_for_all_namespaces(
        self, *, field_selector: str | None = ..., _preload_content: bool = ...
    ) -> object: ...


class Namespaces(Protocol):
    """What the webhook reads for a pod's isolation floor."""

    def read_namespace(self, name: str) -> Namespace: ...


class Secrets(Protocol):
    """What the webhook's TLS bootstrap reads and writes."""

    def read_namespaced_secret(self, name: str, namespace: str) -> Secret: ...
    def create_namespaced_secret(self, namespace: str, body: Any) -> object: ...


class Events(Protocol):
    """What the agent posts."""

    def create_namespaced_event(self, namespace: str, body: Any) -> object: ...


class EventReader(Protocol):
    """What `netisolate suggest` reads: the agents' ConnectionsObserved events, and pods."""

    def list_event_for_all_namespaces(
        self, *, field_selector: str | None = ..., _preload_content: bool = ...
    ) -> object: ...
    def list_namespaced_event(
        self, namespace: str, *, field_selector: str | None = ..., _preload_content: bool = ...
    ) -> object: ...
    def read_namespaced_pod(self, name: str, namespace: str, *, _preload_content: bool = ...) -> object: ...


class CoreApi(Listings, Namespaces, Secrets, Events, Protocol):
    """Every call netisolate makes of the core API (kubernetes.client.CoreV1Api)."""


class AdmissionApi(Protocol):
    """Every call netisolate makes of kubernetes.client.AdmissionregistrationV1Api."""

    def read_validating_webhook_configuration(self, name: str) -> ValidatingWebhookConfiguration: ...
    def patch_validating_webhook_configuration(self, name: str, body: list[dict[str, Any]]) -> object: ...


class RawResponse(Protocol):
    data: bytes


def decoded(response: object) -> Any:
    """The JSON body of a call made with _preload_content=False (a urllib3 response)."""
    return json.loads(cast(RawResponse, response).data)


def api_clients(kubeconfig: str | None) -> tuple[CoreApi, AdmissionApi]:
    from kubernetes import client, config

    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:  # not in a pod: $KUBECONFIG or ~/.kube/config, as kubectl
                config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as err:
        where = kubeconfig or "the in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise InputError(
            f"cannot load Kubernetes credentials from {where}: {err}; pass --kubeconfig"
        ) from None
    return client.CoreV1Api(), client.AdmissionregistrationV1Api()
