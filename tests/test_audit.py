"""`netisolate audit`: the pure judgement over the upstream injectors' real webhook configurations
(tests/fixtures/audit/SOURCES.md says where each came from), and the command against the
Kubernetes API stand-in over real HTTP (gaps: tests/kube_standin.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netisolate.audit import AuditFinding, audit
from netisolate.cli import main
from netisolate.config import Config
from netisolate.matchconditions import evaluate, pod_request
from netisolate.selector import SelectorError, parse_selector
from netisolate.webhookconfig import read_configurations
from tests.kube_standin import declare, put

FIXTURES = Path(__file__).parent / "fixtures" / "audit"
UPSTREAM = {
    path.stem: yaml.safe_load(path.read_text()) for path in sorted((FIXTURES / "upstream").glob("*.yaml"))
}
WEBHOOKS = [config for configs in UPSTREAM.values() for config in configs]
CLUSTER = yaml.safe_load((FIXTURES / "cluster.yaml").read_text())
MWC = "MutatingWebhookConfiguration "


def found(findings: Iterable[AuditFinding]) -> set[tuple[str, str, str]]:
    return {(f.rule, f.severity, f.object) for f in findings}


def of(findings: Iterable[AuditFinding], obj: str) -> set[tuple[str, str]]:
    return {(f.rule, f.severity) for f in findings if f.object == obj}


def run_audit(config: Config | None = None, webhooks: Any = None, **kw: Any) -> list[AuditFinding]:
    hooks = WEBHOOKS if webhooks is None else webhooks
    return audit(
        hooks,
        kw.get("namespaces", CLUSTER["namespaces"]),
        kw.get("pods", CLUSTER["pods"]),
        config or Config(),
    )


def injected(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configurations once every controller has patched its caBundle in."""
    configs = copy.deepcopy(configs)
    for config in configs:
        for hook in config["webhooks"]:
            hook["clientConfig"]["caBundle"] = "Q0EK"
    return configs


# --- the upstream injectors ---------------------------------------------------------------------


def test_the_upstream_injectors_after_ca_injection() -> None:
    """Every webhook finding over the ten projects' published configurations, caBundles injected."""
    result = {(r, s, o.removeprefix(MWC)) for r, s, o in found(run_audit(webhooks=injected(WEBHOOKS)))}
    webhooks = {f for f in result if f[0].startswith("webhook-")}
    reach = {"webhook-reaches-kube-system", "webhook-reaches-netisolate"}
    every_namespace = {("webhook-cluster-wide", "warn"), *((r, "deny") for r in reach)}
    fails_open = {("webhook-failure-ignore", "warn")}
    labelled_pods_only = {("webhook-cluster-wide", "warn"), *((r, "warn") for r in reach)}
    expected = {
        "dapr-sidecar-injector/sidecar-injector.dapr.io": every_namespace | fails_open,
        "vault-agent-injector-cfg/vault.hashicorp.com": every_namespace | fails_open,  # chart default
        "gatekeeper-mutating-webhook-configuration/mutation.gatekeeper.sh": every_namespace | fails_open,
        "pod-identity-webhook/pod-identity-webhook.amazonaws.com": every_namespace | fails_open,
        "opentelemetry-operator-mutating-webhook-configuration/mpod.kb.io": every_namespace | fails_open,
        # Linkerd and Kyverno leave kube-system out now, but not netisolate's namespace
        "linkerd-proxy-injector-webhook-config/linkerd-proxy-injector.linkerd.io": {
            ("webhook-cluster-wide", "warn"),
            ("webhook-reaches-netisolate", "deny"),
        }
        | fails_open,
        "linkerd-tap-injector-webhook-config/tap-injector.linkerd.io": {
            ("webhook-cluster-wide", "warn"),
            ("webhook-reaches-netisolate", "deny"),
        }
        | fails_open,
        "kyverno-resource-mutating-webhook-cfg/mutate.kyverno.svc-fail": {
            ("webhook-cluster-wide", "warn"),
            ("webhook-reaches-netisolate", "deny"),
        },
        "aws-load-balancer-webhook/mpod.elbv2.k8s.aws": fails_open,
        "aws-load-balancer-webhook/alb-target-control.object.elbv2.k8s.aws": labelled_pods_only,
        "istio-sidecar-injector-1-24/rev.object.sidecar-injector.istio.io": labelled_pods_only,
        "istio-revision-tag-default/rev.object.sidecar-injector.istio.io": labelled_pods_only,
        "istio-revision-tag-default/object.sidecar-injector.istio.io": labelled_pods_only,
        "istio-revision-tag-prod/rev.object.sidecar-injector.istio.io": labelled_pods_only,
    }
    assert webhooks == {(r, s, o) for o, pairs in expected.items() for r, s in pairs}


def test_missing_ca_bundles_before_injection() -> None:
    """Fresh installs: the message says what the API server does without one, and names a pending
    cert-manager injection."""
    result = [f for f in run_audit() if f.rule == "webhook-no-cabundle"]
    names = {f.object.removeprefix(MWC).split("/")[0] for f in result}
    assert names == {
        "istio-sidecar-injector-1-24",
        "istio-revision-tag-default",
        "istio-revision-tag-prod",
        "vault-agent-injector-cfg",
        "dapr-sidecar-injector",
        "cert-manager-webhook",
        "gatekeeper-mutating-webhook-configuration",
        "pod-identity-webhook",
        "opentelemetry-operator-mutating-webhook-configuration",
    }  # Linkerd, Kyverno and the AWS controller carry theirs from the start
    assert all("system trust roots" in f.message for f in result)
    cert_manager = next(f for f in result if "cert-manager-webhook" in f.object)
    assert "cert-manager is asked to inject it (cert-manager.io/inject-ca-from-secret" in cert_manager.message
    assert "cainjector" in cert_manager.message
    vault = next(f for f in result if "vault" in f.object)
    assert "cert-manager" not in vault.message


def test_an_object_selector_opt_in_is_described_as_the_pods_it_selects() -> None:
    istio = MWC + "istio-revision-tag-default/object.sidecar-injector.istio.io"
    (finding,) = [f for f in run_audit() if f.object == istio and f.rule == "webhook-cluster-wide"]
    assert "pods labelled sidecar.istio.io/inject=true,!istio.io/rev in every namespace" in finding.message
    dapr = MWC + "dapr-sidecar-injector/sidecar-injector.dapr.io"
    (finding,) = [f for f in run_audit() if f.object == dapr and f.rule == "webhook-cluster-wide"]
    assert finding.message.startswith("matches pods in every namespace")


# --- pods: what admission says about each running pod -------------------------------------------


def test_every_pod_in_a_watched_namespace_is_judged_not_only_isolated_ones() -> None:
    result = run_audit()
    rogue, cni = "Pod default/cart-7c9d-rogue", "Pod istio-system/istio-cni-node-8hj2k"
    assert of(result, rogue) == {("pod-violates-admission", "deny"), ("pod-admission-warn", "warn")}
    (warned,) = [f for f in result if f.object == rogue and f.rule == "pod-admission-warn"]
    assert (
        "[sidecar-image] istio-proxy" in warned.message and "[sidecar-digest] istio-proxy" in warned.message
    )
    assert ("pod-violates-admission", "deny") in of(result, cni)
    (warned,) = [f for f in result if f.object == cni and f.rule == "pod-admission-warn"]
    assert "[hostpath] install-cni" in warned.message
    assert of(result, "Pod shop/web-old") == {("pod-violates-admission", "deny")}
    assert of(result, "Pod shop/web-1") == set()
    # kube-system and netisolate's own namespace are outside its webhook: not judged
    assert not [f for f in result if f.object.startswith(("Pod kube-system/", "Pod netisolate-system/"))]


def test_an_audit_level_pod_is_told_what_enforce_would_deny() -> None:
    result = run_audit()
    assert of(result, "Pod payments/api-1") == {("pod-enforce-would-deny", "warn")}
    (finding,) = [f for f in result if f.object == "Pod payments/api-1"]
    assert "[uid-missing] api" in finding.message
    assert "privilege-escalation" not in finding.message  # what it already does right is not listed


def test_an_unreadable_pod_is_what_admission_refuses() -> None:
    pods = [{"metadata": {"name": "bad", "namespace": "default"}, "spec": {"containers": "not a list"}}]
    assert found(run_audit(webhooks=[], pods=pods, namespaces=[])) == {
        ("pod-violates-admission", "deny", "Pod default/bad")
    }


SHIPPED = yaml.safe_load((Path(__file__).parent.parent / "daemonset/base/validatingwebhook.yaml").read_text())
CALICO = {
    "metadata": {"name": "calico-node-p9x8z", "namespace": "calico-system", "labels": {"k8s-app": "calico"}},
    "spec": {
        "containers": [
            {"name": "node", "image": "calico/node:v3.28", "securityContext": {"privileged": True}}
        ]
    },
}


def test_the_pods_judged_are_the_ones_the_installed_webhook_reviews() -> None:
    """A cluster that leaves its CNI's namespace out of netisolate's webhook (as the README advises)
    is not told that admission would refuse the CNI's pods: admission never sees them."""
    calico_system = {"name": "calico-system", "labels": {"kubernetes.io/metadata.name": "calico-system"}}
    namespaces = [*CLUSTER["namespaces"], {"metadata": calico_system}]
    pods = [*CLUSTER["pods"], CALICO]
    calico = "Pod calico-system/calico-node-p9x8z"
    shipped = audit([], namespaces, pods, Config(), validating=[SHIPPED])
    assert ("pod-violates-admission", "deny") in of(shipped, calico)
    assert found(shipped) == found(audit([], namespaces, pods, Config()))  # the same as without it
    leaves_out_calico = copy.deepcopy(SHIPPED)
    leaves_out_calico["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"].append(
        "calico-system"
    )
    assert of(audit([], namespaces, pods, Config(), validating=[leaves_out_calico]), calico) == set()
    unreadable = {
        "metadata": {"name": "netisolate"},
        "webhooks": [{"name": "pods.netisolate.io", "rules": {}}],
    }
    assert ("object-unreadable", "deny", "ValidatingWebhookConfiguration netisolate") in found(
        audit([], namespaces, pods, Config(), validating=[unreadable])
    )


# --- opt-outs: one finding per pod, only where an installed injector would act -------------------


def test_one_opt_out_finding_per_pod_where_an_injector_would_act() -> None:
    result = [f for f in run_audit() if f.rule == "pod-opt-out"]
    assert {f.object for f in result} == {
        "Pod istio-system/istiod-1-24-6b8f7d9c4-q2w3e",  # Istio's rev.object webhook selects istiod
        "Pod web/frontend-1",  # its namespace is annotated linkerd.io/inject: enabled
    }  # not dapr.io/enabled "false" (Dapr injects only on "true"), not Linkerd where it does not inject
    istiod = next(f for f in result if "istiod" in f.object)
    assert "label sidecar.istio.io/inject: 'false' and annotation sidecar.istio.io/inject: 'false'" in (
        istiod.message
    )
    assert "istio-sidecar-injector-1-24/rev.object.sidecar-injector.istio.io" in istiod.message


def test_without_the_injectors_installed_no_opt_out_matters() -> None:
    linkerdless = [c for c in WEBHOOKS if "linkerd" not in c["metadata"]["name"]]
    assert "Pod web/frontend-1" not in {
        f.object for f in run_audit(webhooks=linkerdless) if f.rule == "pod-opt-out"
    }


def test_the_config_exempts_control_plane_pods() -> None:
    config = Config(opt_out_exempt_pods=["istio-system/istiod-*"])
    result = {f.object for f in run_audit(config) if f.rule == "pod-opt-out"}
    assert result == {"Pod web/frontend-1"}


def test_an_opt_out_key_no_known_injector_reads_is_still_reported() -> None:
    config = Config(opt_out_annotations={"sidecar.example.com/inject": "false"})
    pods = [
        {
            "metadata": {
                "name": "p",
                "namespace": "default",
                "annotations": {"sidecar.example.com/inject": "no"},
            },
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        }
    ]
    (finding,) = [f for f in run_audit(config, pods=pods) if f.rule == "pod-opt-out"]
    assert "no injector the audit knows reads it" in finding.message


# --- namespaces ----------------------------------------------------------------------------------


def test_linkerd_is_switched_by_a_namespace_annotation_and_missing_namespaces_are_named() -> None:
    config = Config(
        expected_namespace_labels={
            "payments": {"linkerd.io/inject": "enabled", "netisolate.io/isolation": "audit"},
            "web": {"linkerd.io/inject": "enabled"},
            "shop": {"istio.io/rev": "prod", "netisolate.io/isolation": "enforce"},
            "billing": {"netisolate.io/isolation": "enforce"},
        }
    )
    result = [f for f in run_audit(config) if f.rule.startswith("namespace-")]
    assert found(result) == {
        ("namespace-label-unexpected", "deny", "Namespace payments"),
        ("namespace-missing", "warn", "Namespace billing"),
        ("namespace-label-invalid", "deny", "Namespace legacy"),
    }
    payments = next(f for f in result if f.object == "Namespace payments")
    assert payments.message.startswith("annotation linkerd.io/inject is 'disabled', expected 'enabled'")


# --- selectors, rules and matchConditions, exactly ------------------------------------------------


def hook(rule: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    webhook = {
        "name": "h.example.com",
        "clientConfig": {"service": {"name": "s", "namespace": "x"}, "caBundle": "Q0EK"},
        "rules": [{"apiVersions": ["v1"], **(PODS if rule is None else rule)}],
        **fields,
    }
    return {"metadata": {"name": "c"}, "webhooks": [webhook]}


PODS = {"apiGroups": [""], "operations": ["CREATE"], "resources": ["pods"]}
HOOK = MWC + "c/h.example.com"


def webhook_rules(config: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> set[tuple[str, str]]:
    return of(audit([config], CLUSTER["namespaces"], pods or [], Config()), HOOK)


@pytest.mark.parametrize(
    ("rule", "touches"),
    [
        (PODS, True),
        ({**PODS, "resources": ["pods/*"], "operations": ["UPDATE"]}, True),
        ({**PODS, "resources": ["pods/ephemeralcontainers"], "operations": ["UPDATE"]}, True),  # debug
        ({**PODS, "resources": ["*/ephemeralcontainers"], "operations": ["UPDATE"]}, True),  # debug, too
        ({**PODS, "resources": ["*/ephemeralcontainers"], "operations": ["CREATE"]}, False),
        ({**PODS, "resources": ["*/*"], "operations": ["*"]}, True),
        ({**PODS, "operations": ["UPDATE"]}, True),
        ({**PODS, "apiGroups": ["*"], "resources": ["*"]}, True),
        ({**PODS, "apiGroups": ["apps"], "resources": ["*"]}, False),  # Deployments, not pods
        ({**PODS, "resources": ["*"], "scope": "Cluster"}, False),
        ({**PODS, "resources": ["pods/status"], "operations": ["UPDATE"]}, False),
        ({**PODS, "operations": ["DELETE"]}, False),
        ({**PODS, "apiVersions": ["v2"]}, False),
    ],
)
def test_which_webhooks_can_change_pods(rule: dict[str, Any], touches: bool) -> None:
    assert (("webhook-reaches-kube-system", "deny") in webhook_rules(hook(rule))) is touches


def test_a_kube_system_pod_that_matches_the_object_selector_makes_the_reach_a_deny() -> None:
    asks = {"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]}]}
    istio = hook(objectSelector=asks)
    assert ("webhook-reaches-kube-system", "warn") in webhook_rules(istio)
    labelled = {
        "metadata": {"name": "p", "namespace": "kube-system", "labels": {"sidecar.istio.io/inject": "true"}}
    }
    assert ("webhook-reaches-kube-system", "deny") in webhook_rules(istio, [labelled])


def test_the_netisolate_namespace_is_the_one_the_command_names() -> None:
    excludes = {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-system", "netisolate-system"],
            }
        ]
    }
    assert webhook_rules(hook(namespaceSelector=excludes)) == {("webhook-cluster-wide", "warn")}
    elsewhere = audit([hook(namespaceSelector=excludes)], [], [], Config(), netisolate_namespace="isolation")
    assert ("webhook-reaches-netisolate", "deny", HOOK) in found(elsewhere)


@pytest.mark.parametrize(
    ("expression", "reaches_kube_system", "uncertain"),
    [
        ("request.namespace != 'kube-system'", False, False),
        ("!(request.namespace in ['kube-system', 'kube-public'])", False, False),
        ("!request.namespace.startsWith('kube-')", False, False),
        ('object.metadata.namespace != "kube-system"', False, False),
        ("namespaceObject.metadata.name == 'kube-system' || request.namespace == 'other'", True, False),
        (
            "request.userInfo.username != 'system:serviceaccount:kube-system:replicaset-controller'",
            True,
            True,
        ),
        ("request.namespace.size() > 3", True, True),  # outside the subset
    ],
)
def test_match_conditions_are_decided_or_the_finding_says_it_is_uncertain(
    expression: str, reaches_kube_system: bool, uncertain: bool
) -> None:
    config = hook(matchConditions=[{"name": "exclude-system", "expression": expression}])
    reach = [
        f
        for f in audit([config], CLUSTER["namespaces"], [], Config())
        if f.rule == "webhook-reaches-kube-system"
    ]
    assert bool(reach) is reaches_kube_system
    if reach:
        assert reach[0].uncertain is uncertain
        assert ("uncertain: its matchConditions exclude-system" in reach[0].message) is uncertain


def test_the_cel_subset() -> None:
    context = pod_request("shop", {"team": "a"}, {"app": "web"}, {})
    assert evaluate("has(object.metadata.labels.app) && object.metadata.labels['app'] == 'web'", context)
    assert evaluate("'app' in object.metadata.labels", context) is True
    assert evaluate("has(object.metadata.labels.tier)", context) is False
    assert evaluate("object.metadata.labels['tier'] == 'x'", context) is None  # CEL: an error
    assert evaluate(
        "namespaceObject.metadata.labels.team == 'a' || request.userInfo.username == 'x'", context
    )
    assert evaluate("false && request.userInfo.username == 'x'", context) is False
    assert evaluate("request.userInfo.username == 'x'", context) is None
    assert evaluate("'shop'", context) is None  # not a boolean
    assert evaluate("(((", context) is None


# --- never crash ---------------------------------------------------------------------------------


GOOD = hook()


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        ({"metadata": {"name": "c"}, "webhooks": ["not a mapping"]}, "webhooks[0] must be a mapping"),
        (hook(rule=None, rules={"apiGroups": [""]}), "rules must be a list"),
        (hook(rules={}), "rules must be a list"),  # empty, yet not a list
        (hook(namespaceSelector={"matchLabels": []}), "matchLabels must map strings"),
        (hook(namespaceSelector={"matchExpressions": {"key": "a"}}), "matchExpressions must be a list"),
        (hook(objectSelector="app=web"), "objectSelector must be a mapping"),
        (hook(namespaceSelector={"matchExpressions": [None]}), "matchExpressions[0] must be a mapping"),
        (hook(namespaceSelector={"matchExpressions": [{"key": "a", "operator": "Has"}]}), "operator 'Has'"),
        (hook(namespaceSelector={"matchLabels": {"a": 1}}), "matchLabels must map strings"),
        (hook(matchConditions=[{"name": "x"}]), "matchConditions[0] needs"),
        (hook(failurePolicy="Sometimes"), "failurePolicy 'Sometimes'"),
        (hook(clientConfig="https://x"), "clientConfig must be a mapping"),
        ({"metadata": {"name": "c"}, "webhooks": {"name": "h"}}, "webhooks must be a list"),
    ],
)
def test_an_unreadable_webhook_entry_is_a_finding_and_the_rest_is_still_judged(
    broken: Any, says: str
) -> None:
    rest = copy.deepcopy(GOOD)
    rest["metadata"]["name"] = "good"
    result = audit([broken, rest], [], [], Config())
    unreadable = [f for f in result if f.rule == "object-unreadable"]
    assert len(unreadable) == 1 and unreadable[0].severity == "deny"
    assert says in unreadable[0].message and unreadable[0].object == MWC + "c"
    assert ("webhook-reaches-kube-system", "deny", MWC + "good/h.example.com") in found(result)


def test_metadata_without_a_name_is_a_finding() -> None:
    result = audit(
        [{"metadata": {}}, None], [{"metadata": {"labels": {}}}, "x"], [{"metadata": None}], Config()
    )
    assert found(f for f in result if f.rule == "object-unreadable") == {
        ("object-unreadable", "deny", MWC + "#1"),
        ("object-unreadable", "deny", MWC + "#2"),
        ("object-unreadable", "deny", "Namespace #1"),
        ("object-unreadable", "deny", "Namespace #2"),
    }
    assert ("pod-violates-admission", "deny", "Pod default/#1") in found(result)


KEYS = [
    "metadata", "name", "webhooks", "rules", "apiGroups", "apiVersions", "operations", "resources",
    "scope", "namespaceSelector", "objectSelector", "matchExpressions", "matchLabels", "key", "operator",
    "values", "matchConditions", "expression", "clientConfig", "service", "caBundle", "failurePolicy",
    "labels", "annotations", "namespace",
]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["", "pods", "*", "v1", "In", "NotIn", "x"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(JSON, max_size=3),
    st.lists(JSON, max_size=2),
    st.lists(JSON, max_size=2),
    st.lists(JSON, max_size=2),
)
def test_fuzz_the_audit_never_raises(
    webhooks: list[Any], namespaces: list[Any], pods: list[Any], validating: list[Any]
) -> None:
    hooks, unreadable = read_configurations(webhooks)
    assert len(hooks) + len(unreadable) >= sum(1 for w in webhooks if not isinstance(w, dict))
    for finding in audit(webhooks, namespaces, pods, Config(), validating=validating):
        assert json.dumps(finding.as_dict())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc.'\"[]()!=&|, _inhasrequest", max_size=60))
def test_fuzz_match_conditions_never_raise(expression: str) -> None:
    assert evaluate(expression, pod_request("ns", {}, None)) in (True, False, None)


@given(JSON)
def test_fuzz_selectors_parse_or_say_why(raw: Any) -> None:
    try:
        parse_selector(raw, "s").matches({"a": "b"})
    except SelectorError as err:
        assert str(err).startswith("s")


# --- the client: paging, and the command over HTTP ------------------------------------------------


def serve_cluster(kmock: Any, webhooks: list[dict[str, Any]] = WEBHOOKS) -> None:
    declare(kmock)
    put(kmock, "admissionregistration.k8s.io/v1/validatingwebhookconfigurations", SHIPPED)
    for config in webhooks:
        put(kmock, "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", config)
    for pod in CLUSTER["pods"]:
        put(kmock, "v1/pods", pod)
    for namespace in CLUSTER["namespaces"]:
        put(kmock, "v1/namespaces", namespace)


def kubeconfig(tmp_path: Path, server: str, user: dict[str, Any]) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return str(path)


def tokens_seen(kmock: Any) -> set[str]:
    return {request.headers.get("Authorization") for request in kmock}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_audit_reads_the_cluster_over_http(
    kmock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_cluster(kmock)
    config = kubeconfig(tmp_path, str(kmock.url).rstrip("/"), {"token": "t0ken"})
    code, out, _ = await asyncio.to_thread(cli, capsys, "--kubeconfig", config, "-o", "json")
    assert code == 1
    report = json.loads(out)
    assert report["denied"] is True
    over_http = {(f["rule"], f["severity"], f["object"]) for f in report["findings"]}
    assert over_http == found(run_audit())
    assert tokens_seen(kmock) == {"Bearer t0ken"}


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_an_exec_credential_plugin_supplies_the_token(
    kmock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve_cluster(kmock, [])
    plugin = tmp_path / "credential"
    status = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "from-exec"},
    }
    plugin.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(status)}\nEOF\n")
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin)}}
    config = kubeconfig(tmp_path, str(kmock.url).rstrip("/"), user)
    code, _, _ = await asyncio.to_thread(cli, capsys, "--kubeconfig", config)
    assert code == 1
    assert tokens_seen(kmock) == {"Bearer from-exec"}


@pytest.mark.timeout(60)
@pytest.mark.asyncio
@pytest.mark.parametrize("user", [{"token": "t"}, {"username": "u", "password": "p"}], ids=["token", "basic"])
async def test_a_refused_list_is_exit_2_with_an_error_object(
    kmock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], user: dict[str, str]
) -> None:
    serve_cluster(kmock)
    forbidden = {
        "kind": "Status",
        "code": 403,
        "message": 'pods is forbidden: User "dev" cannot list resource "pods"',
    }
    kmock["get /api/v1/pods"] << 403 << forbidden
    config = kubeconfig(tmp_path, str(kmock.url).rstrip("/"), user)
    code, out, err = await asyncio.to_thread(cli, capsys, "--kubeconfig", config, "-o", "json")
    assert code == 2
    assert json.loads(out) == {"error": json.loads(out)["error"]}
    assert "HTTP 403" in json.loads(out)["error"] and "cannot list resource" in json.loads(out)["error"]
    assert "cannot read the cluster" in err


def test_an_unreachable_cluster_and_a_bad_kubeconfig_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = kubeconfig(tmp_path, "http://127.0.0.1:9", {"token": "t"})  # the discard port: refused
    code, out, err = cli(capsys, "--kubeconfig", config, "-o", "json")
    assert code == 2 and "error" in json.loads(out) and "cannot read the cluster" in err
    code, out, err = cli(capsys, "--kubeconfig", str(tmp_path / "absent"), "-o", "json")
    assert code == 2 and "cannot load Kubernetes credentials" in json.loads(out)["error"]


def test_anything_unexpected_is_exit_2_never_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import netisolate.commands.audit as command

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(command, "fetch", broken)
    config = kubeconfig(tmp_path, "http://127.0.0.1:9", {"token": "t"})
    code, out, _ = cli(capsys, "--kubeconfig", config, "-o", "json")
    assert code == 2
    assert json.loads(out) == {"error": "internal error, please report it: ZeroDivisionError: a bug"}


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_the_command_starts_without_the_kubernetes_client(kmock: Any, tmp_path: Path) -> None:
    """Start time: neither the kubernetes client nor other commands' servers are imported."""
    serve_cluster(kmock)
    config = kubeconfig(tmp_path, str(kmock.url).rstrip("/"), {"token": "t"})
    script = (
        "import sys; from netisolate.cli import main; code = main(['audit', '--kubeconfig', sys.argv[1]]); "
        "heavy = sorted(m for m in ('kubernetes', 'aiohttp', 'cryptography') if m in sys.modules); "
        "print(code, heavy)"
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script, config],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBERNETES_SERVICE_HOST": ""},
        check=False,
    )
    assert done.stdout.strip().splitlines()[-1] == "1 []", done.stderr


def _certificate(name: str, key: Any, issuer: tuple[Any, Any] | None, *, ca: bool = False) -> Any:
    """A certificate for name (127.0.0.1 as an IP address), signed by issuer (cert, key) or itself."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: Any = None, key: Any = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if cert is not None:
        return bytes(cert.public_bytes(serialization.Encoding.PEM))
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def test_the_api_server_is_authenticated_and_authenticates_us_over_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real TLS both ways: the server's certificate checked against certificate-authority-data,
    ours (client-certificate-data) required by the server; a wrong CA is exit 2."""
    import base64
    import ssl
    from http.server import BaseHTTPRequestHandler

    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.json_server import serve_json

    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "server", "client", "other")}
    ca = _certificate("test-ca", keys["ca"], None, ca=True)
    other_ca = _certificate("other-ca", keys["other"], None, ca=True)
    (tmp_path / "server.pem").write_bytes(_pem(_certificate("127.0.0.1", keys["server"], (ca, keys["ca"]))))
    (tmp_path / "server.key").write_bytes(_pem(key=keys["server"]))
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    clients: list[str] = []

    def answer(request: BaseHTTPRequestHandler) -> bytes:
        peer = request.connection.getpeercert()
        clients.append(str(dict(x[0] for x in peer["subject"])["commonName"]))
        return b'{"kind": "List", "metadata": {}, "items": []}'

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    context.load_verify_locations(tmp_path / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    server = serve_json(answer, context)
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        client = _certificate("audit-user", keys["client"], (ca, keys["ca"]))
        user = {
            "client-certificate-data": base64.b64encode(_pem(client)).decode(),
            "client-key-data": base64.b64encode(_pem(key=keys["client"])).decode(),
        }
        config = kubeconfig(tmp_path, url, user)
        document = yaml.safe_load(Path(config).read_text())
        document["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(_pem(ca)).decode()
        Path(config).write_text(yaml.safe_dump(document))
        assert cli(capsys, "--kubeconfig", config)[:2] == (0, "no findings\n")
        assert clients and set(clients) == {"audit-user"}
        document["clusters"][0]["cluster"]["tls-server-name"] = "api.example"  # the name to check
        Path(config).write_text(yaml.safe_dump(document))
        code, _, err = cli(capsys, "--kubeconfig", config)
        assert code == 2 and "CERTIFICATE_VERIFY_FAILED" in err and "api.example" in err
        del document["clusters"][0]["cluster"]["tls-server-name"]
        document["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(
            _pem(other_ca)
        ).decode()
        Path(config).write_text(yaml.safe_dump(document))
        code, _, err = cli(capsys, "--kubeconfig", config)
        assert code == 2 and "CERTIFICATE_VERIFY_FAILED" in err
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_credentials_only_the_kubernetes_client_reads_go_through_it(
    kmock: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several files in $KUBECONFIG (as auth-provider plugins) are read by the kubernetes client's
    loader; the requests are still ours: same lists, same verdict."""
    serve_cluster(kmock)
    config = kubeconfig(tmp_path, str(kmock.url).rstrip("/"), {"username": "admin", "password": "s3cret"})
    other = tmp_path / "more"
    other.mkdir()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{config}{os.pathsep}{kubeconfig(other, 'http://127.0.0.1:9', {})}")
    code, out, err = await asyncio.to_thread(cli, capsys, "-o", "json")
    assert code == 1, err
    assert {(f["rule"], f["severity"], f["object"]) for f in json.loads(out)["findings"]} == found(
        run_audit()
    )
    assert tokens_seen(kmock) == {"Basic YWRtaW46czNjcmV0"}


def test_credentials_from_files_the_in_cluster_account_and_what_goes_to_the_kubernetes_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from netisolate import kubeconfig as credentials

    (tmp_path / "token").write_text("file-token\n")
    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "c.pem").write_bytes(b"CERT")
    (tmp_path / "c.key").write_bytes(b"KEY")
    user = {"tokenFile": "token", "client-certificate": "c.pem", "client-key": "c.key"}
    config = kubeconfig(tmp_path, "https://api.example:6443/", user)
    document = yaml.safe_load(Path(config).read_text())
    document["clusters"][0]["cluster"]["certificate-authority"] = "ca.pem"  # relative to the file
    Path(config).write_text(yaml.safe_dump(document))
    endpoint = credentials.load_endpoint(config)
    assert endpoint == credentials.Endpoint(
        server="https://api.example:6443",
        ca_pem=b"CA",
        token_file=tmp_path / "token",
        client_pem=(b"CERT", b"KEY"),
    )
    assert endpoint.authorization() == "Bearer file-token"
    document["clusters"][0]["cluster"].update({"proxy-url": "http://proxy:3128", "tls-server-name": "api"})
    Path(config).write_text(yaml.safe_dump(document))
    endpoint = credentials.load_endpoint(config)
    assert (endpoint.proxy, endpoint.server_name) == ("http://proxy:3128", "api")
    document["users"][0]["user"] = {"auth-provider": {"name": "oidc", "config": {}}}
    Path(config).write_text(yaml.safe_dump(document))
    with pytest.raises(credentials.NeedsClientError):
        credentials.load_endpoint(config)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", f"{config}{os.pathsep}{config}")
    with pytest.raises(credentials.NeedsClientError):  # several files: kubectl merges them
        credentials.load_endpoint(None)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("sa-token")
    (account / "ca.crt").write_bytes(b"SA-CA")
    monkeypatch.setattr(credentials, "SERVICE_ACCOUNT", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert credentials.load_endpoint(None) == credentials.Endpoint(
        "https://[fd00::1]:443", b"SA-CA", token_file=account / "token"
    )
