"""Cluster audit: what already runs, judged — pure functions of the listed objects.

Finding IDs (stable):
  webhook-cluster-wide         a mutating webhook that matches pods with no or an empty namespaceSelector
  webhook-reaches-kube-system  a mutating webhook on pods whose namespaceSelector admits kube-system (deny)
  webhook-no-cabundle          a mutating webhook with a service clientConfig and no caBundle
  webhook-failure-ignore       a mutating webhook on pods with failurePolicy: Ignore
  pod-opt-out                  a pod carries a sidecar-injection opt-out annotation or label
  pod-violates-admission       an isolated pod that today's admission rules would deny (created before the
                               webhook, or while it was down) (deny under enforce)
  namespace-label-invalid      a namespace's isolation label is not enforce, audit or off (deny)
  namespace-label-unexpected   a namespace's protected label differs from the value the config expects
                               (expectedNamespaceLabels), e.g. isolation or injection switched off (deny)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netisolate.admission import review_pod
from netisolate.config import Config, Severity
from netisolate.model import InputError, parse_pod
from netisolate.policy import ISOLATION_KEY, Level, PolicyError, effective_level, parse_level

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class AuditFinding:
    rule: str
    severity: Severity
    object: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "severity": self.severity, "object": self.object, "message": self.message}


def selector_matches(selector: Obj | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector against labels; an absent or empty selector matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), set(expr.get("values") or [])
        present = key in labels
        if (op == "In" and not (present and labels[key] in values)) or (
            op == "NotIn" and present and labels[key] in values
        ):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def _touches_pods(hook: Obj) -> bool:
    for rule in hook.get("rules") or []:
        resources = set(rule.get("resources") or [])
        if resources & {"pods", "*", "*/*"} and set(rule.get("operations") or []) & {"CREATE", "*"}:
            return True
    return False


def audit_webhooks(
    configurations: Sequence[Obj], kube_system_labels: Mapping[str, str]
) -> list[AuditFinding]:
    findings = []
    for config in configurations:
        for hook in config.get("webhooks") or []:
            name = f"MutatingWebhookConfiguration {config['metadata']['name']}/{hook.get('name')}"
            on_pods = _touches_pods(hook)
            selector = hook.get("namespaceSelector")
            if on_pods and not (
                selector and (selector.get("matchLabels") or selector.get("matchExpressions"))
            ):
                findings.append(
                    AuditFinding(
                        "webhook-cluster-wide",
                        "warn",
                        name,
                        "matches pods in every namespace: give it a namespaceSelector",
                    )
                )
            if on_pods and selector_matches(selector, kube_system_labels):
                findings.append(
                    AuditFinding(
                        "webhook-reaches-kube-system",
                        "deny",
                        name,
                        "can mutate pods in kube-system: exclude it with a namespaceSelector "
                        "(kubernetes.io/metadata.name NotIn [kube-system])",
                    )
                )
            client = hook.get("clientConfig") or {}
            if client.get("service") and not client.get("caBundle"):
                findings.append(
                    AuditFinding(
                        "webhook-no-cabundle",
                        "warn",
                        name,
                        "has no caBundle: the API server cannot authenticate the injector",
                    )
                )
            if on_pods and hook.get("failurePolicy") == "Ignore":
                findings.append(
                    AuditFinding(
                        "webhook-failure-ignore",
                        "warn",
                        name,
                        "failurePolicy Ignore: when the injector is down, pods start without "
                        "what it injects, silently",
                    )
                )
    return findings


def audit_pods(
    pods: Sequence[Obj], namespace_labels: Mapping[str, Mapping[str, str]], config: Config
) -> list[AuditFinding]:
    findings = []
    for raw in pods:
        meta = raw.get("metadata") or {}
        name = f"Pod {meta.get('namespace')}/{meta.get('name')}"
        try:
            pod = parse_pod(raw, name)
        except InputError as err:
            findings.append(AuditFinding("pod-violates-admission", "warn", name, f"unreadable: {err}"))
            continue
        labels = namespace_labels.get(pod.metadata.namespace or "default", {})
        reviewed = review_pod(pod, labels, config)
        findings += [
            AuditFinding("pod-opt-out", "warn", name, f.message)
            for f in reviewed
            if f.rule == "injection-opt-out"
        ]
        level, _ = effective_level(pod, labels)
        denied = [f for f in reviewed if f.severity == "deny"]
        if level is not Level.OFF and denied:
            severity: Severity = "deny" if level is Level.ENFORCE else "warn"
            detail = "; ".join(f"[{f.rule}] {f.container or 'pod'}: {f.message}" for f in denied)
            findings.append(
                AuditFinding(
                    "pod-violates-admission",
                    severity,
                    name,
                    f"isolated ({level}) but admission would deny it: {detail}",
                )
            )
    return findings


def audit_namespaces(namespaces: Mapping[str, Mapping[str, str]], config: Config) -> list[AuditFinding]:
    findings = []
    for name, labels in sorted(namespaces.items()):
        if ISOLATION_KEY in labels:
            try:
                parse_level(labels[ISOLATION_KEY], f"label {ISOLATION_KEY}")
            except PolicyError as err:
                findings.append(
                    AuditFinding("namespace-label-invalid", "deny", f"Namespace {name}", str(err))
                )
        for key, value in sorted(config.expected_namespace_labels.get(name, {}).items()):
            if labels.get(key) != value:
                findings.append(
                    AuditFinding(
                        "namespace-label-unexpected",
                        "deny",
                        f"Namespace {name}",
                        f"label {key} is {labels.get(key)!r}, expected {value!r}: find out who changed it",
                    )
                )
    return findings


def audit(
    webhooks: Sequence[Obj], namespaces: Mapping[str, Mapping[str, str]], pods: Sequence[Obj], config: Config
) -> list[AuditFinding]:
    kube_system = namespaces.get("kube-system", {"kubernetes.io/metadata.name": "kube-system"})
    return [
        *audit_webhooks(webhooks, kube_system),
        *audit_namespaces(namespaces, config),
        *audit_pods(pods, namespaces, config),
    ]
