"""Cluster audit: what already runs, judged — pure functions of the objects the API server listed.

Finding IDs (stable; docs/design.md, "Audit findings"):
  webhook-cluster-wide         a mutating webhook that can change pods reaches a new, unlabelled
                               namespace (no namespaceSelector, an empty one, or an opt-out)
  webhook-reaches-kube-system  ... can change pods in kube-system (deny; warn when its objectSelector
                               matches no pod there now)
  webhook-reaches-netisolate   ... can change pods in netisolate's own namespace (same severities)
  webhook-no-cabundle          a mutating webhook served by a Service carries no caBundle
  webhook-failure-ignore       a mutating webhook that can change pods fails open
  object-unreadable            a listed object the audit cannot read (deny: it cannot be vouched for)
  pod-violates-admission       a running pod in a watched namespace that admission would deny today
  pod-enforce-would-deny       a pod at `audit` level that admission would deny under `enforce`
  pod-admission-warn           what admission would warn about a running pod today
  pod-opt-out                  a pod opts out of an injection that an installed webhook would do
  namespace-label-invalid      a namespace's isolation label is not enforce, audit or off (deny)
  namespace-label-unexpected   a namespace's switch differs from expectedNamespaceLabels (deny)
  namespace-missing            a namespace expectedNamespaceLabels names does not exist

A finding is `uncertain` when it depends on a webhook's matchConditions that cannot be decided offline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from netisolate.admission import Finding, opt_outs, review_pod
from netisolate.config import Config, Severity
from netisolate.matchconditions import Truth, all_true, pod_request
from netisolate.model import InputError, Pod, parse_pod
from netisolate.policy import ISOLATION_KEY, Level, PolicyError, effective_level, parse_level
from netisolate.webhookconfig import VALIDATING, Hook, read_configurations

DEFAULT_NETISOLATE_NAMESPACE = "netisolate-system"
NEW_NAMESPACE = "a-namespace-created-tomorrow"
# namespace switches the injector reads from the namespace's annotations, not its labels
ANNOTATION_SWITCHES = frozenset({"linkerd.io/inject"})


@dataclass(frozen=True)
class AuditFinding:
    rule: str
    severity: Severity
    object: str
    message: str
    uncertain: bool = False

    def as_dict(self) -> dict[str, str | bool]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "object": self.object,
            "message": self.message,
            "uncertain": self.uncertain,
        }


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]

    @classmethod
    def unlisted(cls, name: str) -> Namespace:
        """A namespace as the API server labels every one, for names the list lacks."""
        return cls(name, {"kubernetes.io/metadata.name": name}, {})


def _string_map(value: object) -> dict[str, str] | None:
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return value
    return None


def read_namespaces(items: Sequence[object]) -> tuple[dict[str, Namespace], list[AuditFinding]]:
    namespaces, findings = {}, []
    for index, item in enumerate(items):
        meta = item.get("metadata") if isinstance(item, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        labels = _string_map(meta.get("labels")) if isinstance(meta, dict) else None
        annotations = _string_map(meta.get("annotations")) if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            findings.append(_unreadable(f"Namespace #{index + 1}", "its metadata has no name"))
            continue
        if labels is None or annotations is None:
            findings.append(_unreadable(f"Namespace {name}", "labels or annotations that are not strings"))
            continue
        namespaces[name] = Namespace(name, labels, annotations)
    return namespaces, findings


def _unreadable(what: str, reason: str) -> AuditFinding:
    return AuditFinding(
        "object-unreadable",
        "deny",
        what,
        f"cannot be read ({reason}), so the audit cannot vouch for it: look at it with "
        "`kubectl get -o yaml` and fix or remove it",
    )


# --- webhooks ----------------------------------------------------------------------------------


def _conditions(hook: Hook, namespace: Namespace, labels: Mapping[str, str] | None) -> Truth:
    return all_true(hook.conditions, pod_request(namespace.name, namespace.labels, labels))


def _uncertain_note(truth: Truth, hook: Hook) -> str:
    if truth is not None:
        return ""
    names = ", ".join(name for name, _ in hook.conditions)
    return f" (uncertain: its matchConditions {names} cannot all be decided offline, and may exclude these)"


def _reach(
    hook: Hook, namespace: Namespace, running: Sequence[Mapping[str, str]], why: str
) -> AuditFinding | None:
    """Whether the webhook can change pods in a namespace that must stay out of every injector's reach."""
    truth = _conditions(hook, namespace, None)
    if not hook.namespace_selector.matches(namespace.labels) or truth is False:
        return None
    # a pod created there tomorrow may carry no labels at all
    reaches = any(hook.object_selector.matches(labels) for labels in [*running, {}])
    rule = "webhook-reaches-kube-system" if namespace.name == "kube-system" else "webhook-reaches-netisolate"
    return AuditFinding(
        rule,
        "deny" if reaches else "warn",
        hook.object,
        f"can change pods in {namespace.name} ({why})"
        + ("" if reaches else f" that match its objectSelector {hook.object_selector.describe()} (none now)")
        + _uncertain_note(truth, hook)
        + f": exclude it with a namespaceSelector (kubernetes.io/metadata.name NotIn [{namespace.name}])",
        truth is None,
    )


def _cluster_wide(hook: Hook) -> AuditFinding | None:
    tomorrow = Namespace.unlisted(NEW_NAMESPACE)
    truth = _conditions(hook, tomorrow, None)
    if not hook.namespace_selector.matches(tomorrow.labels) or truth is False:
        return None
    if hook.object_selector.matches({}):
        what = "pods in every namespace, new ones included"
        fix = (
            "select the namespaces it serves by a label they must carry (In, Exists), not by one "
            "they may lack"
        )
    else:
        what = f"pods labelled {hook.object_selector.describe()} in every namespace, new ones included"
        fix = (
            "whoever may create a pod anywhere can have it injected by that label; if that is not "
            "meant, also select the namespaces it serves by a label they must carry"
        )
    return AuditFinding(
        "webhook-cluster-wide",
        "warn",
        hook.object,
        f"matches {what}{_uncertain_note(truth, hook)}: {fix}",
        truth is None,
    )


def _no_ca_bundle(hook: Hook) -> AuditFinding:
    pending = (
        f"; cert-manager is asked to inject it ({hook.ca_injection}) and has not: check that its "
        "cainjector runs and that the Certificate named there is Ready"
        if hook.ca_injection
        else ""
    )
    return AuditFinding(
        "webhook-no-cabundle",
        "warn",
        hook.object,
        "has no caBundle, so the API server checks the certificate of Service "
        f"{hook.service} against its own system trust roots, which a certificate issued inside the "
        "cluster does not chain to: calls fail (under failurePolicy Ignore they are skipped, and "
        f"pods go without what it injects); set caBundle to the CA that signs that certificate{pending}",
    )


def audit_webhooks(
    hooks: Sequence[Hook],
    protected: Sequence[tuple[Namespace, Sequence[Mapping[str, str]], str]],
) -> list[AuditFinding]:
    """protected: namespaces no injector may reach, with the labels of the pods running there and why."""
    findings: list[AuditFinding | None] = []
    for hook in hooks:
        if hook.service and not hook.ca_bundle:
            findings.append(_no_ca_bundle(hook))
        if not hook.on_pods:
            continue
        findings.append(_cluster_wide(hook))
        findings += [_reach(hook, namespace, running, why) for namespace, running, why in protected]
        if hook.failure_policy == "Ignore":
            findings.append(
                AuditFinding(
                    "webhook-failure-ignore",
                    "warn",
                    hook.object,
                    "failurePolicy Ignore: when the injector is down, pods start without what it "
                    "injects, silently",
                )
            )
    return [f for f in findings if f is not None]


# --- opt-outs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Injector:
    """How an injector reads its opt-out key (from its own code and charts)."""

    name: str
    webhook_suffix: str  # the names its webhooks end with
    reads: frozenset[str]  # where on the pod it reads the key: label, annotation
    injects: Callable[[Namespace], bool]  # whether it injects, in its webhook's scope, unasked


INJECTORS = {
    # Istio injects every pod its namespace-level webhooks select (objectSelector NotIn [false]);
    # the injector also skips a pod whose annotation says false.
    "sidecar.istio.io/inject": Injector(
        "Istio", "sidecar-injector.istio.io", frozenset({"label", "annotation"}), lambda ns: True
    ),
    # Linkerd injects where the namespace (or the pod) is annotated enabled or ingress.
    "linkerd.io/inject": Injector(
        "Linkerd",
        "linkerd-proxy-injector.linkerd.io",
        frozenset({"annotation"}),
        lambda ns: ns.annotations.get("linkerd.io/inject") in ("enabled", "ingress"),
    ),
    # Dapr injects only pods annotated dapr.io/enabled: "true": "false" changes nothing.
    "dapr.io/enabled": Injector(
        "Dapr", "sidecar-injector.dapr.io", frozenset({"annotation"}), lambda ns: False
    ),
}


def _acting(
    key: str, injector: Injector, hooks: Sequence[Hook], pod: Pod, namespace: Namespace
) -> tuple[list[Hook], Truth]:
    """The injector's webhooks that would act on the pod if it did not opt out."""
    labels = {k: v for k, v in pod.metadata.labels.items() if k != key}
    acting: list[Hook] = []
    truth: Truth = False
    for hook in hooks:
        if not (
            hook.on_pods
            and hook.name.endswith(injector.webhook_suffix)
            and injector.injects(namespace)
            and hook.namespace_selector.matches(namespace.labels)
            and hook.object_selector.matches(labels)
        ):
            continue
        called = all_true(hook.conditions, pod_request(namespace.name, namespace.labels, labels))
        if called is not False:
            acting.append(hook)
            truth = True if truth is True or called is True else None
    return acting, truth if acting else False


def _opt_out(
    pod: Pod, name: str, namespace: Namespace, hooks: Sequence[Hook], config: Config
) -> AuditFinding | None:
    if any(fnmatchcase(f"{namespace.name}/{pod.metadata.name}", p) for p in config.opt_out_exempt_pods):
        return None
    by_key: dict[str, list[str]] = {}
    for where, key, value in opt_outs(pod, config):
        injector = INJECTORS.get(key)
        if injector is None or where in injector.reads:
            by_key.setdefault(key, []).append(f"{where} {key}: {value!r}")
    effects, uncertain = [], False
    for key, settings in by_key.items():
        injector = INJECTORS.get(key)
        if injector is None:
            effects.append(f"{' and '.join(settings)} (no injector the audit knows reads it: it may matter)")
            continue
        acting, truth = _acting(key, injector, hooks, pod, namespace)
        if acting:
            uncertain = uncertain or truth is None
            webhooks = ", ".join(h.object.removeprefix("MutatingWebhookConfiguration ") for h in acting)
            effects.append(f"{' and '.join(settings)} stops {injector.name} ({webhooks})")
    if not effects:
        return None
    return AuditFinding(
        "pod-opt-out",
        config.severity("injection-opt-out"),
        name,
        f"opts out of injection: {'; '.join(effects)}: only members of {config.exempt_groups} may set "
        "it; a control-plane pod meant to run without the sidecar goes in the config's optOutExemptPods",
        uncertain,
    )


# --- pods --------------------------------------------------------------------------------------


def _listing(findings: Sequence[Finding]) -> str:
    return "; ".join(f"[{f.rule}] {f.container or 'pod'}: {f.message}" for f in findings)


def _judged(pod: Pod, name: str, namespace: Namespace, config: Config) -> list[AuditFinding]:
    """What admission says about the pod today, and for an `audit`-level pod what `enforce` adds."""
    today = [f for f in review_pod(pod, namespace.labels, config) if f.rule != "injection-opt-out"]
    denied = [f for f in today if f.severity == "deny"]
    findings = []
    if denied:
        findings.append(
            AuditFinding(
                "pod-violates-admission", "deny", name, f"admission would deny it today: {_listing(denied)}"
            )
        )
    seen = {(f.rule, f.container) for f in denied}
    level, _ = effective_level(pod, namespace.labels)
    if level is Level.AUDIT:
        enforced = review_pod(pod, {**namespace.labels, ISOLATION_KEY: "enforce"}, config)
        would = [f for f in enforced if f.severity == "deny" and (f.rule, f.container) not in seen]
        seen |= {(f.rule, f.container) for f in would}
        if would:
            findings.append(
                AuditFinding(
                    "pod-enforce-would-deny",
                    "warn",
                    name,
                    f"isolation is at audit; under enforce admission would deny it: {_listing(would)}",
                )
            )
    warned = [f for f in today if f.severity == "warn" and (f.rule, f.container) not in seen]
    if warned:
        findings.append(
            AuditFinding("pod-admission-warn", "warn", name, f"admission warns: {_listing(warned)}")
        )
    return findings


def audit_pods(
    pods: Sequence[object],
    namespaces: Mapping[str, Namespace],
    hooks: Sequence[Hook],
    config: Config,
    watched: Watched,
) -> list[AuditFinding]:
    """Every pod netisolate's webhook reviews."""
    findings: list[AuditFinding | None] = []
    for index, raw in enumerate(pods):
        meta = raw.get("metadata") if isinstance(raw, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        namespace_name = meta.get("namespace")
        namespace_name = namespace_name if isinstance(namespace_name, str) else "default"
        namespace = namespaces.get(namespace_name) or Namespace.unlisted(namespace_name)
        if not watched(namespace, _string_map(meta.get("labels")) or {}):
            continue
        name = f"Pod {namespace_name}/{meta.get('name') or f'#{index + 1}'}"
        try:
            pod = parse_pod(raw, name)
        except InputError as err:  # what admission would refuse outright
            findings.append(
                AuditFinding("pod-violates-admission", "deny", name, f"admission would refuse it: {err}")
            )
            continue
        findings += _judged(pod, name, namespace, config)
        findings.append(_opt_out(pod, name, namespace, hooks, config))
    return [f for f in findings if f is not None]


# --- namespaces --------------------------------------------------------------------------------


def audit_namespaces(namespaces: Mapping[str, Namespace], config: Config) -> list[AuditFinding]:
    findings = []
    for name, namespace in sorted(namespaces.items()):
        labels = namespace.labels
        if ISOLATION_KEY in labels:
            try:
                parse_level(labels[ISOLATION_KEY], f"label {ISOLATION_KEY}")
            except PolicyError as err:
                findings.append(
                    AuditFinding("namespace-label-invalid", "deny", f"Namespace {name}", str(err))
                )
    for name, expected in sorted(config.expected_namespace_labels.items()):
        present = namespaces.get(name)
        if present is None:
            findings.append(
                AuditFinding(
                    "namespace-missing",
                    "warn",
                    f"Namespace {name}",
                    "expectedNamespaceLabels names it but it does not exist: nothing checks the "
                    "labels it will be created with; create it with them, or take it out of the config",
                )
            )
            continue
        for key, value in sorted(expected.items()):
            where, actual = (
                ("annotation", present.annotations.get(key))
                if key in ANNOTATION_SWITCHES
                else ("label", present.labels.get(key))
            )
            if actual != value:
                findings.append(
                    AuditFinding(
                        "namespace-label-unexpected",
                        "deny",
                        f"Namespace {name}",
                        f"{where} {key} is {actual!r}, expected {value!r}: find out who changed it",
                    )
                )
    return findings


# --- the whole audit ---------------------------------------------------------------------------


Watched = Callable[[Namespace, Mapping[str, str]], bool]  # (pod's namespace, pod's labels)
POD_WEBHOOK = "pods.netisolate.io"  # daemonset/base/validatingwebhook.yaml


def watched_by(validating: Sequence[Hook], netisolate_namespace: str) -> Watched:
    """Which pods netisolate's admission webhook reviews: its installed namespaceSelector,
    objectSelector and matchConditions decide (a cluster may leave out its CNI's namespace, say);
    without it installed, the shipped exclusions (kube-system and netisolate's own namespace)."""
    ours = [h for h in validating if h.name == POD_WEBHOOK]
    if not ours:
        return lambda namespace, labels: namespace.name not in ("kube-system", netisolate_namespace)
    return lambda namespace, labels: any(
        h.namespace_selector.matches(namespace.labels)
        and h.object_selector.matches(labels)
        and _conditions(h, namespace, labels) is not False
        for h in ours
    )


def audit(
    webhooks: object,
    namespaces: Sequence[object],
    pods: Sequence[object],
    config: Config,
    *,
    netisolate_namespace: str = DEFAULT_NETISOLATE_NAMESPACE,
    validating: object = None,
) -> list[AuditFinding]:
    """webhooks (mutating), namespaces, pods and validating (webhook configurations): the `items`
    of the API server's lists, as JSON."""
    hooks, unreadable = read_configurations(webhooks)
    reviewers, unreadable_reviewers = read_configurations(
        [] if validating is None else validating, VALIDATING
    )
    listed, unreadable_namespaces = read_namespaces(namespaces)
    protected = []
    reasons = {"kube-system": "the cluster's own components"}
    reasons.setdefault(
        netisolate_namespace,
        "netisolate's agent and webhook: an injector there changes what enforces isolation",
    )
    for name, why in reasons.items():
        running = [
            labels
            for p in pods
            if isinstance(p, dict)
            and isinstance(meta := p.get("metadata"), dict)
            and meta.get("namespace") == name
            and (labels := _string_map(meta.get("labels"))) is not None
        ]
        protected.append((listed.get(name) or Namespace.unlisted(name), running, why))
    return [
        *[_unreadable(u.object, u.reason) for u in [*unreadable, *unreadable_reviewers]],
        *unreadable_namespaces,
        *audit_webhooks(hooks, protected),
        *audit_namespaces(listed, config),
        *audit_pods(pods, listed, hooks, config, watched_by(reviewers, netisolate_namespace)),
    ]
