"""Pydantic models of the Kubernetes objects netisolate reads.

Only the fields we act on are declared; every other field Kubernetes may send is tolerated
(``extra="allow"``). Declared fields are strict: a string where the API wants an integer is an
error naming the field, never a silent coercion, because these values decide who may connect where.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel


class K8s(BaseModel):
    # Only the API's own (camelCase) field names: Kubernetes drops `run_as_user`, so must we.
    model_config = ConfigDict(
        extra="allow", strict=True, alias_generator=to_camel, populate_by_name=False, frozen=True
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """The API server decodes a field set to null (`volumes:` left empty in a Helm chart) as
        if it were not there; so do we, for every field."""
        if isinstance(data, dict) and None in data.values():
            return {key: value for key, value in data.items() if value is not None}
        return data


def _null_values_empty(data: Any) -> Any:
    # In a map of strings, `key:` with no value decodes to the empty string, as the API server does.
    if isinstance(data, dict) and None in data.values():
        return {key: "" if value is None else value for key, value in data.items()}
    return data


StrMap = Annotated[dict[str, str], BeforeValidator(_null_values_empty)]


Uid = Annotated[int, Field(ge=0, le=2**31 - 1)]  # what the API server accepts for runAsUser


class Capabilities(K8s):
    add: list[str] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list)


class WindowsOptions(K8s):
    host_process: bool | None = None


class SecurityContext(K8s):
    run_as_user: Uid | None = None
    run_as_non_root: bool | None = None
    allow_privilege_escalation: bool | None = None
    privileged: bool | None = None
    capabilities: Capabilities | None = None
    windows_options: WindowsOptions | None = None


class PodSecurityContext(K8s):
    run_as_user: Uid | None = None
    run_as_non_root: bool | None = None
    windows_options: WindowsOptions | None = None


class ContainerPort(K8s):
    container_port: int
    host_port: int | None = None
    protocol: str = "TCP"


class VolumeMount(K8s):
    name: str
    mount_path: str
    read_only: bool | None = None


# Kubernetes only admits DNS-1123 labels as container names; holding to that here also means a
# name can never smuggle syntax into a rendered ruleset, where it appears as a comment.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class Container(K8s):
    name: str = Field(pattern=DNS_LABEL)
    image: str | None = None
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    security_context: SecurityContext | None = None
    ports: list[ContainerPort] = Field(default_factory=list)
    volume_mounts: list[VolumeMount] = Field(default_factory=list)
    restart_policy: str | None = None
    target_container_name: str | None = None


# Every source a volume may name (core/v1 VolumeSource); a volume naming none of them is an emptyDir,
# as the API server defaults it.
VOLUME_SOURCES = frozenset(
    {
        "hostPath",
        "emptyDir",
        "gcePersistentDisk",
        "awsElasticBlockStore",
        "gitRepo",
        "secret",
        "nfs",
        "iscsi",
        "glusterfs",
        "persistentVolumeClaim",
        "rbd",
        "flexVolume",
        "cinder",
        "cephfs",
        "flocker",
        "downwardAPI",
        "fc",
        "azureFile",
        "configMap",
        "vsphereVolume",
        "quobyte",
        "azureDisk",
        "photonPersistentDisk",
        "projected",
        "portworxVolume",
        "scaleIO",
        "storageos",
        "csi",
        "ephemeral",
        "image",
    }
)


class Volume(K8s):
    name: str
    host_path: dict[str, Any] | None = None
    empty_dir: dict[str, Any] | None = None

    @property
    def is_empty_dir(self) -> bool:
        if self.empty_dir is not None:
            return True
        return self.host_path is None and not VOLUME_SOURCES.intersection(self.model_extra or {})


class PodOS(K8s):
    name: str


class NodeSelectorRequirement(K8s):
    key: str
    operator: str
    values: list[str] = Field(default_factory=list)


class NodeSelectorTerm(K8s):
    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list)


class NodeSelector(K8s):
    node_selector_terms: list[NodeSelectorTerm] = Field(default_factory=list)


class NodeAffinity(K8s):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None


class Affinity(K8s):
    node_affinity: NodeAffinity | None = None


class PodSpec(K8s):
    containers: list[Container] = Field(default_factory=list)
    init_containers: list[Container] = Field(default_factory=list)
    ephemeral_containers: list[Container] = Field(default_factory=list)
    security_context: PodSecurityContext | None = None
    volumes: list[Volume] = Field(default_factory=list)
    host_network: bool | None = None
    host_pid: bool | None = Field(default=None, alias="hostPID")
    host_ipc: bool | None = Field(default=None, alias="hostIPC")
    host_users: bool | None = None
    share_process_namespace: bool | None = None
    os: PodOS | None = None
    node_name: str | None = None
    node_selector: StrMap = Field(default_factory=dict)
    affinity: Affinity | None = None


class ObjectMeta(K8s):
    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    labels: StrMap = Field(default_factory=dict)
    annotations: StrMap = Field(default_factory=dict)


class PodIP(K8s):
    ip: str


class ContainerStatus(K8s):
    name: str
    container_id: str | None = Field(default=None, alias="containerID")  # `<runtime>://<id>`


class PodStatus(K8s):
    pod_ip: str | None = Field(default=None, alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs")
    phase: str | None = None
    qos_class: str | None = None  # where the kubelet puts its cgroup
    init_container_statuses: list[ContainerStatus] = Field(default_factory=list)
    container_statuses: list[ContainerStatus] = Field(default_factory=list)
    ephemeral_container_statuses: list[ContainerStatus] = Field(default_factory=list)


class Pod(K8s):
    api_version: str | None = None
    kind: str | None = None
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: PodSpec
    status: PodStatus | None = None

    @property
    def ref(self) -> str:
        """`namespace/name` for messages; generateName pods are shown by their prefix."""
        name = self.metadata.name or f"{self.metadata.generate_name or ''}<generated>"
        return f"{self.metadata.namespace or 'default'}/{name}"

    def all_containers(self) -> list[Container]:
        return [*self.spec.init_containers, *self.spec.containers, *self.spec.ephemeral_containers]


class Namespace(K8s):
    api_version: str | None = None
    kind: str | None = None
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)


class InputError(ValueError):
    """Input we cannot read: the message names the object and the field and says what to fix."""


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_validation_error(err: ValidationError, where: str) -> str:
    problems = [f"{_location(e['loc']) or '(root)'}: {e['msg']}" for e in err.errors(include_url=False)]
    return f"{where}: " + "; ".join(problems)


def parse_pod(data: object, where: str = "pod") -> Pod:
    try:
        return Pod.model_validate(data)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, where)) from None


def parse_namespace(data: object, where: str = "namespace") -> Namespace:
    try:
        return Namespace.model_validate(data)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, where)) from None


class UserInfo(K8s):
    username: str = ""
    groups: list[str] = Field(default_factory=list)


class GroupVersionKind(K8s):
    group: str = ""
    version: str = ""
    kind: str = ""


class GroupVersionResource(K8s):
    group: str = ""
    version: str = ""
    resource: str = ""


class AdmissionRequest(K8s):
    """The `request` of an AdmissionReview v1. `user_info` is None only for offline checks."""

    uid: str = Field(min_length=1)
    kind: GroupVersionKind
    resource: GroupVersionResource = Field(default_factory=GroupVersionResource)
    sub_resource: str | None = None
    operation: str
    namespace: str | None = None
    name: str | None = None
    user_info: UserInfo | None = None
    object: dict[str, Any] | None = None
    old_object: dict[str, Any] | None = None
    dry_run: bool | None = None


class AdmissionReview(K8s):
    api_version: str
    kind: str
    request: AdmissionRequest | None = None
