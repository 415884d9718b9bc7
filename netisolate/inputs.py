"""Files → the objects we judge. Every input form becomes an admission request, so `netisolate check`
runs exactly the code path the webhook runs; offline requests carry no requester.

Accepted: Pod; the pod template of Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob;
Namespace; AdmissionReview; a `kind: List`; any number of these as multi-document YAML or JSON.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from netisolate.model import (
    AdmissionRequest,
    AdmissionReview,
    InputError,
    Pod,
    describe_validation_error,
    parse_pod,
)

_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
CHECKABLE = ["Pod", *_TEMPLATE_PATHS, "Namespace", "AdmissionReview", "List"]


@dataclass(frozen=True)
class Subject:
    """One object to judge: `name` says which, for messages and multi-document output."""

    name: str
    request: AdmissionRequest


def read_text(path: str) -> str:
    """`-` is standard input."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from None


def _dig(doc: dict[str, Any], path: tuple[str, ...], where: str) -> dict[str, Any]:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            raise InputError(f"{where}: no pod template at {'.'.join(path)}")
        node = node[key]
    return dict(node)


def _offline_request(
    kind: str, obj: dict[str, Any], namespace: str | None, name: str | None
) -> AdmissionRequest:
    return AdmissionRequest.model_validate(
        {
            "uid": "offline",
            "kind": {"version": "v1", "kind": kind},
            "operation": "CREATE",
            "namespace": namespace,
            "name": name,
            "object": obj,
        }
    )


def _subjects(doc: object, where: str) -> list[Subject]:
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected a Kubernetes object (a mapping), got {type(doc).__name__}")
    kind = doc.get("kind")
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    name, namespace = metadata.get("name"), metadata.get("namespace")
    label = f"{kind} {namespace + '/' if namespace else ''}{name or '<unnamed>'}"
    if kind == "List":
        items = doc.get("items")
        if not isinstance(items, list):
            raise InputError(f"{where}: a List needs items")
        return [s for i, item in enumerate(items) for s in _subjects(item, f"{where} item {i}")]
    if kind == "AdmissionReview":
        try:
            review = AdmissionReview.model_validate(doc)
        except ValidationError as err:
            raise InputError(describe_validation_error(err, where)) from None
        if review.request is None:
            raise InputError(f"{where}: the AdmissionReview has no request")
        return [Subject(f"AdmissionReview {review.request.uid}", review.request)]
    if kind in ("Pod", "Namespace"):
        return [Subject(label, _offline_request(kind, doc, namespace, name))]
    if kind in _TEMPLATE_PATHS:
        template = _dig(doc, _TEMPLATE_PATHS[kind], where)
        template_meta = dict(template.get("metadata") or {})
        template_meta.setdefault("namespace", namespace)
        template_meta.setdefault("name", name)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template_meta, "spec": template.get("spec")}
        return [Subject(label, _offline_request("Pod", pod, namespace, name))]
    raise InputError(f"{where}: cannot check kind {kind!r}; give one of {', '.join(CHECKABLE)}")


def load_subjects(text: str, source: str) -> list[Subject]:
    """Every object in a (multi-document) YAML or JSON text; empty documents are skipped."""
    try:
        docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as err:
        raise InputError(f"{source}: not valid YAML or JSON: {err}") from None
    if not docs:
        raise InputError(f"{source}: no Kubernetes object in it")
    many = len(docs) > 1
    return [
        s
        for i, doc in enumerate(docs, 1)
        for s in _subjects(doc, f"{source} document {i}" if many else source)
    ]


def load_pods(text: str, source: str) -> list[tuple[str, Pod]]:
    """The pods (or pod templates) of a file, for the commands that render or enforce rules."""
    pods = []
    for subject in load_subjects(text, source):
        if subject.request.kind.kind != "Pod":
            continue
        pods.append((subject.name, parse_pod(subject.request.object, subject.name)))
    if not pods:
        raise InputError(f"{source}: no Pod or pod template in it")
    return pods
