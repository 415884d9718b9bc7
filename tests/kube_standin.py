"""The Kubernetes API stand-in for tests: kmock's KubernetesEmulator (list/watch/get/create/patch/
delete over real HTTP), with the resources netisolate touches declared.

What it does not model (so tests must not rely on it): server-side field and label selectors and
`timeoutSeconds` are ignored; resourceVersions are fake; `metadata.generateName` is ignored (a
second nameless create in a namespace is a 409 — the agent names its events as client-go does); no
RBAC, no admission, no strategic-merge semantics (merge patches overwrite whole keys; JSON patches
follow RFC 6902 as the real server does).

kmock 0.8 reads /api/v1/namespaces[/X] as a namespace prefix rather than as the Namespace resource
(listing namespaces answers HTTP 500). `declare` teaches it those two paths, the only ones where
the real API server means the Namespace itself, so namespaces are listed, watched and read over
HTTP like every other resource.
"""

from __future__ import annotations

from typing import Any

from kmock._internal import parsing
from kubernetes import client

from netisolate.kubeclient import Client
from netisolate.kubeconfig import Endpoint

RESOURCES = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "v1/pods": {"kind": "Pod", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "admissionregistration.k8s.io/v1/validatingwebhookconfigurations": {
        "kind": "ValidatingWebhookConfiguration",
        "namespaced": False,
    },
    "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations": {
        "kind": "MutatingWebhookConfiguration",
        "namespaced": False,
    },
}


def declare(kmock: Any) -> None:
    _serve_namespaces()
    for resource, info in RESOURCES.items():
        kmock.resources[resource] = info


def _serve_namespaces() -> None:
    original = parsing.parse_path
    if getattr(original, "serves_namespaces", False):
        return

    def parse_path(path: str) -> Any:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            name = parts[3] if len(parts) == 4 else None
            return parsing.ParsedPath("", "v1", "namespaces", None, name, None)
        return original(path)

    parse_path.serves_namespaces = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path


def api_client(kmock: Any) -> client.ApiClient:
    config = client.Configuration()
    config.host = str(kmock.url).rstrip("/")
    return client.ApiClient(config)


def ours(server: Any) -> Client:
    """netisolate's own client (what the agent and the webhook run with) of the stand-in `server`
    (kmock, or the kubernetes client the test drives it with). The tests create and patch objects
    with the kubernetes client: another client than the one under test."""
    if isinstance(server, client.CoreV1Api | client.AdmissionregistrationV1Api):
        return Client(Endpoint(str(server.api_client.configuration.host)))
    return Client(Endpoint(str(server.url).rstrip("/")))


def as_body(manifest: dict[str, Any]) -> Any:
    """A manifest as a request body: the client validates a plain dict into the model its
    annotation names (V1Pod, ...), so the dict is what the tests send."""
    return manifest


def put(kmock: Any, resource: str, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    kmock.objects[resource, meta.get("namespace"), meta["name"]] = obj
