"""Mutating and validating webhook configurations as listed by the API server → what the audit judges.

Reads each webhook entry on its own: an entry (or a whole configuration) that is not shaped as the
API server would store it becomes an `Unreadable` naming what is wrong, and the others are still
read. Nothing here raises on any JSON value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netisolate.selector import Selector, SelectorError, absent_as, parse_selector

MUTATING, VALIDATING = "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"
# cert-manager's cainjector fills caBundle from these annotations on the configuration
CA_INJECTION_ANNOTATIONS = (
    "cert-manager.io/inject-ca-from",
    "cert-manager.io/inject-ca-from-secret",
    "cert-manager.io/inject-apiserver-ca",
)


@dataclass(frozen=True)
class Unreadable:
    object: str
    reason: str


@dataclass(frozen=True)
class Hook:
    kind: str
    configuration: str
    name: str
    on_pods: bool  # it can change a pod's containers (create, update, ephemeral containers)
    namespace_selector: Selector
    object_selector: Selector
    conditions: tuple[tuple[str, str], ...]  # (name, CEL expression)
    failure_policy: str
    service: str | None  # namespace/name of the Service it is served by, if any
    ca_bundle: bool
    ca_injection: str | None  # "annotation: value" when cert-manager is asked to inject the CA

    @property
    def object(self) -> str:
        return f"{self.kind} {self.configuration}/{self.name}"


class _ShapeError(ValueError):
    pass


def _strings(rule: Mapping[str, Any], field: str, where: str) -> set[str]:
    value = rule.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _ShapeError(f"{where}.{field} must be a list of strings, not {value!r}")
    return set(value)


def _rule_touches_pods(rule: object, where: str) -> bool:
    """Pods are changed through `pods` (CREATE, UPDATE) and the `pods/ephemeralcontainers`
    subresource (UPDATE: `kubectl debug`), in the core group, version v1, namespaced."""
    if not isinstance(rule, dict):
        raise _ShapeError(f"{where} must be a mapping, not {rule!r}")
    groups, versions, operations, resources = (
        _strings(rule, field, where) for field in ("apiGroups", "apiVersions", "operations", "resources")
    )
    scope = rule.get("scope", "*")
    if scope not in ("*", "Namespaced", "Cluster"):
        raise _ShapeError(f"{where}.scope {scope!r} is not *, Namespaced or Cluster")
    if not (groups & {"", "*"} and versions & {"v1", "*"}) or scope == "Cluster":
        return False
    writes_pods = bool(resources & {"pods", "*", "*/*"}) and bool(operations & {"CREATE", "UPDATE", "*"})
    debugs = bool(resources & {"pods/ephemeralcontainers", "pods/*", "*/ephemeralcontainers", "*/*"})
    return writes_pods or (debugs and bool(operations & {"UPDATE", "*"}))


def _conditions(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _ShapeError(f"{where}.matchConditions must be a list, not {raw!r}")
    conditions = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("expression"), str):
            raise _ShapeError(f"{where}.matchConditions[{i}] needs a name and a string expression")
        conditions.append((str(item.get("name", i)), item["expression"]))
    return tuple(conditions)


def _hook(kind: str, configuration: str, annotations: Mapping[str, Any], raw: object, where: str) -> Hook:
    if not isinstance(raw, dict):
        raise _ShapeError(f"{where} must be a mapping, not {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _ShapeError(f"{where} has no name")
    rules = absent_as(raw.get("rules"), [])
    if not isinstance(rules, list):
        raise _ShapeError(f"{where}.rules must be a list, not {rules!r}")
    client = absent_as(raw.get("clientConfig"), {})
    if not isinstance(client, dict):
        raise _ShapeError(f"{where}.clientConfig must be a mapping, not {client!r}")
    service = client.get("service")
    if service is not None and not isinstance(service, dict):
        raise _ShapeError(f"{where}.clientConfig.service must be a mapping, not {service!r}")
    failure_policy = raw.get("failurePolicy", "Fail")  # the v1 default
    if failure_policy not in ("Fail", "Ignore"):
        raise _ShapeError(f"{where}.failurePolicy {failure_policy!r} is not Fail or Ignore")
    try:
        namespaces = parse_selector(raw.get("namespaceSelector"), f"{where}.namespaceSelector")
        objects = parse_selector(raw.get("objectSelector"), f"{where}.objectSelector")
    except SelectorError as err:
        raise _ShapeError(str(err)) from None
    injection = next(
        (f"{key}: {annotations[key]}" for key in CA_INJECTION_ANNOTATIONS if key in annotations), None
    )
    return Hook(
        kind=kind,
        configuration=configuration,
        name=name,
        on_pods=any([_rule_touches_pods(rule, f"{where}.rules[{i}]") for i, rule in enumerate(rules)]),
        namespace_selector=namespaces,
        object_selector=objects,
        conditions=_conditions(raw.get("matchConditions"), where),
        failure_policy=failure_policy,
        service=f"{service.get('namespace')}/{service.get('name')}" if service else None,
        ca_bundle=bool(client.get("caBundle")),
        ca_injection=injection,
    )


def read_configurations(items: object, kind: str = MUTATING) -> tuple[list[Hook], list[Unreadable]]:
    """Every webhook of every configuration that can be read, and what could not be."""
    hooks: list[Hook] = []
    unreadable: list[Unreadable] = []
    if not isinstance(items, list):
        return hooks, [Unreadable(f"{kind} list", f"the list is not a list of objects: {items!r:.80}")]
    for index, config in enumerate(items):
        meta = config.get("metadata") if isinstance(config, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            unreadable.append(Unreadable(f"{kind} #{index + 1}", "it has no metadata.name"))
            continue
        annotations = meta.get("annotations") if isinstance(meta, dict) else None
        entries = absent_as(config.get("webhooks"), []) if isinstance(config, dict) else []
        if not isinstance(entries, list):
            unreadable.append(Unreadable(f"{kind} {name}", f"webhooks must be a list, not {entries!r:.80}"))
            continue
        for i, entry in enumerate(entries):
            try:
                hooks.append(
                    _hook(
                        kind,
                        name,
                        annotations if isinstance(annotations, dict) else {},
                        entry,
                        f"webhooks[{i}]",
                    )
                )
            except _ShapeError as err:
                unreadable.append(Unreadable(f"{kind} {name}", str(err)[:300]))
    return hooks, unreadable
