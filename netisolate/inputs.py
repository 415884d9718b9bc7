"""Files → the objects we judge. Every input form becomes an admission request, so `netisolate check`
runs exactly the code path the webhook runs; offline requests carry no requester.

Judged: Pod; the pod template of Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController,
Job, CronJob, PodTemplate and OpenShift's DeploymentConfig; any other kind whose `spec.template` holds
a pod spec (Argo Rollouts, Knative Services, ...); Namespace; AdmissionReview. Read through: `List`
and every `*List` with `items`. Skipped, and named: every kind that carries no pod (Service,
ConfigMap, CRDs, ...). Any number of these as multi-document YAML or JSON, in files or directories.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
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

# libyaml's parser where PyYAML was built with it (about 4x faster on a large install file).
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "DeploymentConfig": ("spec", "template"),  # OpenShift, apps.openshift.io/v1
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "PodTemplate": ("template",),
}
_GENERIC_TEMPLATE = ("spec", "template")
CHECKABLE = ["Pod", *_TEMPLATE_PATHS, "Namespace", "AdmissionReview", "List"]
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Subject:
    """One object to judge: `name` says which, for messages and multi-document output."""

    name: str
    request: AdmissionRequest


@dataclass(frozen=True)
class Skipped:
    """A document that carries no pod: named in the output, never judged."""

    name: str
    reason: str


@dataclass
class Objects:
    documents: int = 0  # non-empty documents read
    subjects: list[Subject] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # documents that cannot be read, and why


def read_text(path: str) -> str:
    """`-` is standard input."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read: {err}") from None


def manifest_files(path: str) -> list[str]:
    """A file as given; a directory: every .yaml, .yml and .json file below it, in name order."""
    if path == "-" or not os.path.isdir(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(MANIFEST_SUFFIXES)]
    return found


def _string(value: object, where: str, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InputError(f"{where}: {what} must be a string, not {type(value).__name__}")


def _mapping(value: object, where: str, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: {what} must be a mapping, not {type(value).__name__}")
    return value


def _dig(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            return None
        node = node[key]
    return dict(node)


def _offline_request(
    kind: str, obj: dict[str, Any], namespace: str | None, name: str | None, where: str
) -> AdmissionRequest:
    try:
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
    except ValidationError as err:
        raise InputError(describe_validation_error(err, where)) from None


def _template_pod(
    template: dict[str, Any], namespace: str | None, name: str | None, where: str
) -> dict[str, Any]:
    meta = dict(_mapping(template.get("metadata"), where, "the pod template's metadata"))
    # The controller creates the pods in the workload's namespace, whatever the template says.
    if namespace is not None:
        meta["namespace"] = namespace
    meta.setdefault("name", name)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec")}


def _collect(doc: object, where: str, out: Objects) -> None:
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected a Kubernetes object (a mapping), got {type(doc).__name__}")
    kind = _string(doc.get("kind"), where, "kind")
    if not kind:
        raise InputError(
            f"{where}: the object has no kind; give a Kubernetes object ({', '.join(CHECKABLE)})"
        )
    metadata = _mapping(doc.get("metadata"), where, "metadata")
    name = _string(metadata.get("name"), where, "metadata.name")
    namespace = _string(metadata.get("namespace"), where, "metadata.namespace")
    label = f"{kind} {namespace + '/' if namespace else ''}{name or '<unnamed>'}"
    if kind.endswith("List") and "items" in doc:
        items = doc["items"] if doc["items"] is not None else []
        if not isinstance(items, list):
            raise InputError(f"{where}: the items of a {kind} must be a list")
        for i, item in enumerate(items):
            if item is not None:  # `- null`, as `linkerd inject` prints for what it dropped
                _collect(item, f"{where} item {i}", out)
        return
    if kind == "AdmissionReview":
        try:
            review = AdmissionReview.model_validate(doc)
        except ValidationError as err:
            raise InputError(describe_validation_error(err, where)) from None
        if review.request is None:
            raise InputError(f"{where}: the AdmissionReview has no request")
        out.subjects.append(Subject(f"AdmissionReview {review.request.uid}", review.request))
        return
    if kind in ("Pod", "Namespace"):
        out.subjects.append(Subject(label, _offline_request(kind, doc, namespace, name, where)))
        return
    path = _TEMPLATE_PATHS.get(kind, _GENERIC_TEMPLATE)
    template = _dig(doc, path)
    if kind not in _TEMPLATE_PATHS and not (
        template is not None and isinstance(template.get("spec"), dict) and "containers" in template["spec"]
    ):
        out.skipped.append(Skipped(label, "carries no pod"))
        return
    if template is None:
        raise InputError(f"{where}: {kind} has no pod template at {'.'.join(path)}")
    if kind not in _TEMPLATE_PATHS:
        label += f" (pod template at {'.'.join(path)})"
    pod = _template_pod(template, namespace, name, where)
    out.subjects.append(Subject(label, _offline_request("Pod", pod, namespace, name, where)))


def _yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's messages span lines; ours are one line, with the place."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


_STR, _NULL, _SEQ, _MAP = (f"tag:yaml.org,2002:{t}" for t in ("str", "null", "seq", "map"))
_MERGE = "tag:yaml.org,2002:merge"
_POD_KINDS = {"Pod", "Namespace", "AdmissionReview", *_TEMPLATE_PATHS}


class _MergedError(Exception):
    """A mapping on the way uses a merge key (`<<`): only building it says what it holds."""


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value of `key` in a mapping node: the last one, as the safe loader (and the API server's
    decoder) keeps the last of duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return None
    found: yaml.Node | None = None
    for key_node, value in node.value:
        if key_node.tag == _MERGE:
            raise _MergedError
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            found = value
    return found


def _text_of(node: yaml.Node | None) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) and node.tag == _STR else None


def _skipped_unbuilt(node: yaml.Node) -> Skipped | None:
    """A document seen to carry no pod before it is built into Python objects: most of a large
    install file is CRDs and RBAC, and building them is most of the time. None: build and read it."""
    try:
        return _skipped_by_nodes(node)
    except _MergedError:
        return None


def _skipped_by_nodes(node: yaml.Node) -> Skipped | None:
    kind = _text_of(_child(node, "kind"))
    if kind is None or kind in _POD_KINDS or (kind.endswith("List") and _child(node, "items") is not None):
        return None
    if _child(_child(_child(_child(node, "spec"), "template"), "spec"), "containers") is not None:
        return None
    metadata = _child(node, "metadata")
    name, namespace = _text_of(_child(metadata, "name")), _text_of(_child(metadata, "namespace"))
    if metadata is not None and not isinstance(metadata, yaml.MappingNode):
        return None  # built, so that the error says what is wrong
    return Skipped(f"{kind} {namespace + '/' if namespace else ''}{name or '<unnamed>'}", "carries no pod")


def _build(loader: yaml.SafeLoader, node: yaml.Node, built: dict[int, Any]) -> Any:
    """A node's Python value, as SafeLoader's constructor makes it (a node met twice through an
    alias is the same object), in a plain recursion that takes a third of its time: building is
    most of a large file's cost. Merge keys and explicit tags go to the constructor itself."""
    if id(node) in built:
        return built[id(node)]
    if isinstance(node, yaml.ScalarNode):
        return node.value if node.tag == _STR else loader.construct_object(node)
    if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
        items: list[Any] = []
        built[id(node)] = items
        items += [_build(loader, child, built) for child in node.value]
        return items
    if (
        isinstance(node, yaml.MappingNode)
        and node.tag == _MAP
        and all(k.tag != _MERGE for k, _ in node.value)
    ):
        mapping: dict[Any, Any] = {}
        built[id(node)] = mapping
        for key_node, value_node in node.value:
            key, value = _build(loader, key_node, built), _build(loader, value_node, built)
            try:
                mapping[key] = value
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "found an unhashable key", key_node.start_mark
                ) from None
        return mapping
    return loader.construct_object(node, deep=True)


def load_objects(text: str, source: str) -> Objects:
    """Every object in a (multi-document) YAML or JSON text; empty documents are skipped."""
    loader = _LOADER(text)
    try:
        return _read(loader, source)
    finally:
        loader.dispose()


def _read(loader: yaml.SafeLoader, source: str) -> Objects:
    nodes: list[yaml.Node] = []
    try:
        while loader.check_node():
            node: yaml.Node | None = loader.get_node()  # (typed Any in the stubs)
            if node is not None and node.tag != _NULL:  # empty documents
                nodes.append(node)
    except yaml.YAMLError as err:
        raise InputError(f"{source}: not valid YAML or JSON: {_yaml_error(err)}") from None
    except RecursionError:
        raise InputError(f"{source}: nested too deeply to be a Kubernetes object") from None
    out = Objects(documents=len(nodes))
    for i, node in enumerate(nodes, 1):
        where = f"{source} document {i}" if len(nodes) > 1 else source
        skipped = _skipped_unbuilt(node)
        if skipped is not None:
            out.skipped.append(skipped)
            continue
        try:
            _collect(_build(loader, node, {}), where, out)
        except yaml.YAMLError as err:
            out.errors.append(f"{where}: not valid YAML or JSON: {_yaml_error(err)}")
        except InputError as err:
            out.errors.append(str(err))
        except RecursionError:
            out.errors.append(f"{where}: nested too deeply to be a Kubernetes object")
    return out


def load_subjects(text: str, source: str) -> list[Subject]:
    """The objects of a text that are judged (what carries no pod is left out); raises the first
    document's error, if one cannot be read."""
    objects = load_objects(text, source)
    if objects.errors:
        raise InputError(objects.errors[0])
    if not objects.documents:
        raise InputError(f"{source}: no Kubernetes object in it")
    return objects.subjects


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
