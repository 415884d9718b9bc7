"""`netisolate audit` against the Kubernetes API stand-in over real HTTP (gaps: tests/kube_standin.py;
the Namespace list is served by a kmock reaction, since kmock 0.8 cannot serve that resource)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from netisolate.audit import audit, audit_webhooks, selector_matches
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
        ("webhook-cluster-wide", "warn", linkerd),  # an opt-out selector: new namespaces match
        ("webhook-reaches-kube-system", "deny", linkerd),  # NotIn [disabled] admits kube-system
        ("webhook-failure-ignore", "warn", linkerd),
        (
            "webhook-cluster-wide",
            "warn",
            "MutatingWebhookConfiguration vault-agent-injector-cfg/vault.hashicorp.com",
        ),
        (
            "webhook-failure-ignore",
            "warn",
            "MutatingWebhookConfiguration vault-agent-injector-cfg/vault.hashicorp.com",
        ),
        ("namespace-label-invalid", "deny", "Namespace legacy"),
        ("pod-violates-admission", "deny", "Pod shop/web-old"),
        ("pod-opt-out", "warn", "Pod batch/job-1"),
    }


def hook(rule: dict[str, Any], **fields: Any) -> dict[str, Any]:
    webhook = {
        "name": "h.example.com",
        "clientConfig": {"service": {"name": "s", "namespace": "x"}, "caBundle": "Q0EK"},
        "rules": [{"apiVersions": ["v1"], **rule}],
        **fields,
    }
    return {"metadata": {"name": "c"}, "webhooks": [webhook]}


PODS = {"apiGroups": [""], "operations": ["CREATE"], "resources": ["pods"]}
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}


@pytest.mark.parametrize(
    ("rule", "touches"),
    [
        (PODS, True),
        ({**PODS, "resources": ["pods/*"]}, True),
        ({**PODS, "resources": ["pods/ephemeralcontainers"], "operations": ["UPDATE"]}, True),  # debug
        ({**PODS, "operations": ["UPDATE"]}, True),
        ({**PODS, "apiGroups": ["*"], "resources": ["*"]}, True),
        ({**PODS, "apiGroups": ["apps"], "resources": ["*"]}, False),  # Deployments, not pods
        ({**PODS, "resources": ["*"], "scope": "Cluster"}, False),
        ({**PODS, "operations": ["DELETE"]}, False),
    ],
)
def test_which_webhooks_can_change_pods(rule: dict[str, Any], touches: bool) -> None:
    found = {f.rule for f in audit_webhooks([hook(rule)], KUBE_SYSTEM)}
    assert ("webhook-reaches-kube-system" in found) is touches


def test_istio_shaped_selectors() -> None:
    """Istio's object-level webhook: every namespace without the labels, but only pods that ask."""
    opt_out = {"matchExpressions": [{"key": "istio-injection", "operator": "DoesNotExist"}]}
    asks = {"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]}]}
    istio = hook(PODS, namespaceSelector=opt_out, objectSelector=asks)
    found = found_in(audit_webhooks([istio], KUBE_SYSTEM))
    assert {("webhook-cluster-wide", "warn"), ("webhook-reaches-kube-system", "warn")} == found
    labelled = [{"sidecar.istio.io/inject": "true"}]  # a kube-system pod that does ask
    found = found_in(audit_webhooks([istio], KUBE_SYSTEM, labelled))
    assert ("webhook-reaches-kube-system", "deny") in found
    opt_in = {"matchExpressions": [{"key": "istio-injection", "operator": "In", "values": ["enabled"]}]}
    assert audit_webhooks([hook(PODS, namespaceSelector=opt_in)], KUBE_SYSTEM) == []


def found_in(findings: list[Any]) -> set[tuple[str, str]]:
    return {(f.rule, f.severity) for f in findings}


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
