"""The Kubernetes API stand-in for tests: kmock's KubernetesEmulator (list/watch/get/create/patch/
delete over real HTTP), with the resources netisolate touches declared.

What it does not model (so tests must not rely on it): server-side field and label selectors are
ignored; resourceVersions are fake; the Namespace resource itself cannot be served (kmock 0.8 reads
/api/v1/namespaces/X as a namespace prefix); no RBAC, no admission, no strategic-merge semantics
(merge patches overwrite whole keys; JSON patches follow RFC 6902 as the real server does).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

RESOURCES = {
    "v1/pods": {"kind": "Pod", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
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
    for resource, info in RESOURCES.items():
        kmock.resources[resource] = info


def api_client(kmock: Any) -> client.ApiClient:
    config = client.Configuration()
    config.host = str(kmock.url).rstrip("/")
    return client.ApiClient(config)


def put(kmock: Any, resource: str, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    kmock.objects[resource, meta.get("namespace"), meta["name"]] = obj
