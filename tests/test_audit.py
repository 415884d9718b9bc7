"""`netisolate audit` against the Kubernetes API stand-in over real HTTP (gaps: tests/kube_standin.py;
the Namespace list is served by a kmock reaction, since kmock 0.8 cannot serve that resource)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from netisolate.audit import audit, selector_matches
from netisolate.commands.audit import fetch
from netisolate.config import Config
from tests.kube_standin import api_client, declare, put

FIXTURES = Path(__file__).parent / "fixtures" / "audit"
WEBHOOKS = yaml.safe_load((FIXTURES / "webhooks.yaml").read_text())
CLUSTER = yaml.safe_load((FIXTURES / "cluster.yaml").read_text())


def found(findings: list[Any]) -> set[tuple[str, str, str]]:
    return {(f.rule, f.severity, f.object) for f in findings}


def test_findings_on_realistic_injectors() -> None:
    result = found(audit(WEBHOOKS, CLUSTER["namespaces"], CLUSTER["pods"], Config()))
    dapr = "MutatingWebhookConfiguration dapr-sidecar-injector/sidecar-injector.dapr.io"
    linkerd = (
        "MutatingWebhookConfiguration linkerd-proxy-injector-webhook-config/linkerd-proxy-injector.linkerd.io"
    )
    assert result == {
        ("webhook-cluster-wide", "warn", dapr),
        ("webhook-reaches-kube-system", "deny", dapr),
        ("webhook-no-cabundle", "warn", dapr),
        ("webhook-failure-ignore", "warn", dapr),
        ("webhook-reaches-kube-system", "deny", linkerd),  # NotIn [disabled] admits kube-system
        ("webhook-failure-ignore", "warn", linkerd),
        (
            "webhook-failure-ignore",
            "warn",
            "MutatingWebhookConfiguration vault-agent-injector-cfg/vault.hashicorp.com",
        ),
        ("namespace-label-invalid", "deny", "Namespace legacy"),
        ("pod-violates-admission", "deny", "Pod shop/web-old"),
        ("pod-opt-out", "warn", "Pod batch/job-1"),
    }


def test_namespace_labels_that_differ_from_the_expected_values() -> None:
    config = Config(
        expected_namespace_labels={
            "shop": {"istio-injection": "enabled", "netisolate.io/isolation": "enforce"},
            "batch": {"netisolate.io/isolation": "audit"},
        }
    )
    result = {
        f for f in found(audit([], CLUSTER["namespaces"], [], config)) if f[0] == "namespace-label-unexpected"
    }
    assert result == {("namespace-label-unexpected", "deny", "Namespace batch")}


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        (None, {}, True),
        ({}, {"a": "b"}, True),
        ({"matchLabels": {"a": "b"}}, {"a": "b"}, True),
        ({"matchLabels": {"a": "b"}}, {"a": "c"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["b"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["b"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
    ],
)
def test_selector_semantics(selector: Any, labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(selector, labels) is matches


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_audit_reads_the_cluster_over_http(kmock: Any) -> None:
    declare(kmock)
    for hook in WEBHOOKS:
        put(kmock, "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", hook)
    for pod in CLUSTER["pods"]:
        put(kmock, "v1/pods", pod)
    for name, labels in CLUSTER["namespaces"].items():
        put(kmock, "v1/namespaces", {"metadata": {"name": name, "labels": labels}})
    from kubernetes import client

    api = api_client(kmock)
    webhooks, labels, pods = await asyncio.to_thread(
        fetch, client.CoreV1Api(api), client.AdmissionregistrationV1Api(api)
    )
    assert labels == CLUSTER["namespaces"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["job-1", "web-1", "web-old"]
    result = audit(webhooks, labels, pods, Config())
    assert found(result) == found(audit(WEBHOOKS, CLUSTER["namespaces"], CLUSTER["pods"], Config()))
    assert json.dumps([f.as_dict() for f in result])
