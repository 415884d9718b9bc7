"""Cluster audit: what already runs, judged — pure functions of the listed objects.

Finding IDs (stable):
  webhook-cluster-wide         a mutating webhook on pods whose namespaceSelector a new, unlabelled
                               namespace matches: none, empty, or opt-out (NotIn, DoesNotExist)
  webhook-reaches-kube-system  a mutating webhook on pods whose namespaceSelector admits kube-system
                               (deny; warn when its objectSelector matches no pod there now)
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


_POD_RESOURCES = {"pods", "pods/*", "pods/ephemeralcontainers", "*", "*/*"}


def _touches_pods(hook: Obj) -> bool:
    """Whether a webhook can change a pod's containers: pods or their ephemeral containers, created
    or updated, in the core API group."""
    for rule in hook.get("rules") or []:
        if (
            set(rule.get("apiGroups") or []) & {"", "*"}
            and rule.get("scope", "*") != "Cluster"
            and set(rule.get("resources") or []) & _POD_RESOURCES
            and set(rule.get("operations") or []) & {"CREATE", "UPDATE", "*"}
        ):
            return True
    return False


NEW_NAMESPACE = {"kubernetes.io/metadata.name": "a-namespace-created-tomorrow"}


def audit_webhooks(
    configurations: Sequence[Obj],
    kube_system_labels: Mapping[str, str],
    kube_system_pods: Sequence[Mapping[str, str]] = (),
) -> list[AuditFinding]:
    """kube_system_pods: the labels of the pods running in kube-system (an objectSelector that
    matches none of them, nor a pod without labels, cannot reach kube-system as things stand)."""
    findings = []
    for config in configurations:
        for hook in config.get("webhooks") or []:
            name = f"MutatingWebhookConfiguration {config['metadata']['name']}/{hook.get('name')}"
            on_pods = _touches_pods(hook)
            selector = hook.get("namespaceSelector")
            if on_pods and selector_matches(selector, NEW_NAMESPACE):  # opt-out selectors too
                findings.append(
                    AuditFinding(
                        "webhook-cluster-wide",
                        "warn",
                        name,
                        "matches pods in every namespace, new ones included: select the namespaces "
                        "it serves by a label they must carry (In, Exists), not by one they may lack",
                    )
                )
            if on_pods and selector_matches(selector, kube_system_labels):
                objects = hook.get("objectSelector")
                reaches = any(selector_matches(objects, labels) for labels in [*kube_system_pods, {}])
                findings.append(
                    AuditFinding(
                        "webhook-reaches-kube-system",
                        "deny" if reaches else "warn",
                        name,
                        "can mutate pods in kube-system"
                        + ("" if reaches else " that match its objectSelector (none running now)")
                        + ": exclude it with a namespaceSelector (kubernetes.io/metadata.name NotIn "
                        "[kube-system])",
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
        except InputError as err:  # what admission would refuse outright: deny where enforced
            asked = [
                namespace_labels.get(meta.get("namespace") or "default", {}).get(ISOLATION_KEY),
                (meta.get("annotations") or {}).get(ISOLATION_KEY),
            ]
            findings.append(
                AuditFinding(
                    "pod-violates-admission",
                    "deny" if "enforce" in asked else "warn",
                    name,
                    f"unreadable: {err}",
                )
            )
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
    system_pods = [
        (p.get("metadata") or {}).get("labels") or {}
        for p in pods
        if (p.get("metadata") or {}).get("namespace") == "kube-system"
    ]
    return [
        *audit_webhooks(webhooks, kube_system, system_pods),
        *audit_namespaces(namespaces, config),
        *audit_pods(pods, namespaces, config),
    ]
