"""Pod spec + namespace labels → the isolation policy of each container. Pure and total.

Annotation grammar (DESIGN.md, "Pod contract"):

    netisolate.io/isolation: enforce | audit | off          (also a namespace label)
    netisolate.io/identity: uid | cgroup | uid+cgroup       (the agent's --identity when absent)
    allow.netisolate.io/<container>: "8080, 9000-9100/tcp, 53/udp"
    netisolate.io/preset: istio | linkerd | dapr                (netisolate.presets)

Anything that does not parse never opens a port: the policy is then `enforce` with no grants at all
and `problems` says why (fail closed).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from netisolate.model import Container, Pod
from netisolate.presets import PRESET_KEY, PRESETS

ISOLATION_KEY = "netisolate.io/isolation"
IDENTITY_KEY = "netisolate.io/identity"
GRANT_PREFIX = "allow.netisolate.io/"

Protocol = Literal["tcp", "udp"]


class Level(enum.IntEnum):
    """Data-plane mode; the order is strictness, so `max` picks the stricter."""

    OFF = 0
    AUDIT = 1
    ENFORCE = 2

    def __str__(self) -> str:
        return self.name.lower()


class PolicyError(ValueError):
    """An annotation or label value that does not parse; the message says what is accepted."""


def parse_level(value: str, where: str) -> Level:
    """Exactly `enforce`, `audit` or `off`: a near miss such as `Enforce` is an error, not a guess."""
    for level in Level:
        if value == str(level):
            return level
    raise PolicyError(f"{where}: {value!r} is not an isolation level; use enforce, audit or off")


class IdentityMode(enum.Enum):
    """What the rules know a container by: its UID, its cgroup (v2), or both at once."""

    UID = "uid"
    CGROUP = "cgroup"
    UID_CGROUP = "uid+cgroup"

    def __str__(self) -> str:
        return self.value

    @property
    def by_uid(self) -> bool:
        return self is not IdentityMode.CGROUP

    @property
    def by_cgroup(self) -> bool:
        return self is not IdentityMode.UID


def parse_identity(value: str, where: str) -> IdentityMode:
    for identity in IdentityMode:
        if value == identity.value:
            return identity
    raise PolicyError(f"{where}: {value!r} is not an identity; use uid, cgroup or uid+cgroup")


def pod_identity(pod: Pod, default: IdentityMode = IdentityMode.UID) -> tuple[IdentityMode, list[str]]:
    """The pod's identity annotation, else the node's default. An unreadable value keeps the
    default and is a problem (the policy then grants nothing)."""
    value = pod.metadata.annotations.get(IDENTITY_KEY)
    if value is None:
        return default, []
    try:
        return parse_identity(value, f"annotation {IDENTITY_KEY}"), []
    except PolicyError as err:
        return default, [str(err)]


@dataclass(frozen=True, order=True)
class PortRange:
    protocol: Protocol
    low: int
    high: int

    def __str__(self) -> str:
        ports = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return ports if self.protocol == "tcp" else f"{ports}/{self.protocol}"


_GRANT = re.compile(r"^([0-9]{1,5})(?:\s*-\s*([0-9]{1,5}))?(?:\s*/\s*([A-Za-z]+))?$")


def _port(text: str, item: str) -> int:
    if len(text) > 1 and text.startswith("0"):
        raise PolicyError(f"{item!r}: write ports without leading zeros")
    port = int(text)
    if not 1 <= port <= 65535:
        raise PolicyError(f"{item!r}: port {port} is outside 1-65535")
    return port


def _parse_item(item: str) -> PortRange:
    match = _GRANT.match(item)
    if match is None:
        raise PolicyError(f"{item!r} is not PORT or LOW-HIGH, optionally followed by /tcp or /udp")
    low = _port(match[1], item)
    high = _port(match[2], item) if match[2] else low
    protocol = (match[3] or "tcp").lower()
    if protocol not in ("tcp", "udp"):
        raise PolicyError(f"{item!r}: protocol must be tcp or udp, not {match[3]!r}")
    if low > high:
        raise PolicyError(f"{item!r}: range starts above its end; write {high}-{low}")
    return PortRange("tcp" if protocol == "tcp" else "udp", low, high)


def parse_grants(text: str) -> tuple[PortRange, ...]:
    """Parse a grant list; the result is sorted and free of duplicates (a canonical form)."""
    if not text.strip():
        return ()
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise PolicyError(f"{text!r} has an empty item; separate ports with single commas")
    return tuple(sorted({_parse_item(item) for item in items}))


def format_grants(grants: tuple[PortRange, ...]) -> str:
    return ",".join(str(grant) for grant in grants)


class ContainerKind(enum.Enum):
    INIT = "init"
    SIDECAR = "sidecar"  # initContainer with restartPolicy: Always (native sidecar)
    REGULAR = "regular"
    EPHEMERAL = "ephemeral"


@dataclass(frozen=True)
class ContainerPolicy:
    name: str
    kind: ContainerKind
    uid: int | None
    grants: tuple[PortRange, ...]
    declared: tuple[PortRange, ...] = ()  # its containerPorts (TCP and UDP): the ports it serves


@dataclass(frozen=True)
class PodPolicy:
    pod: str
    level: Level
    containers: tuple[ContainerPolicy, ...]
    problems: tuple[str, ...]
    user_namespaced: bool = False  # hostUsers: false — the pod's UIDs, 0 included, are not the node's
    identity: IdentityMode = IdentityMode.UID

    @property
    def isolated(self) -> bool:
        return self.level is not Level.OFF


def effective_uid(pod: Pod, container: Container) -> int | None:
    if container.security_context and container.security_context.run_as_user is not None:
        return container.security_context.run_as_user
    if pod.spec.security_context:
        return pod.spec.security_context.run_as_user
    return None


def containers_with_kind(pod: Pod) -> list[tuple[Container, ContainerKind]]:
    """Every container in declaration order: init (and native sidecars), regular, ephemeral."""
    out = [
        (c, ContainerKind.SIDECAR if c.restart_policy == "Always" else ContainerKind.INIT)
        for c in pod.spec.init_containers
    ]
    out += [(c, ContainerKind.REGULAR) for c in pod.spec.containers]
    out += [(c, ContainerKind.EPHEMERAL) for c in pod.spec.ephemeral_containers]
    return out


def effective_level(pod: Pod, namespace_labels: Mapping[str, str]) -> tuple[Level, list[str]]:
    """The stricter of namespace label and pod annotation; an unreadable value counts as enforce."""
    level, problems = Level.OFF, []
    sources = (
        (namespace_labels.get(ISOLATION_KEY), f"namespace label {ISOLATION_KEY}"),
        (pod.metadata.annotations.get(ISOLATION_KEY), f"annotation {ISOLATION_KEY}"),
    )
    for value, where in sources:
        if value is None:
            continue
        try:
            level = max(level, parse_level(value, where))
        except PolicyError as err:
            problems.append(str(err))
            level = Level.ENFORCE
    return level, problems


def grant_annotations(pod: Pod) -> dict[str, str]:
    return {
        key.removeprefix(GRANT_PREFIX): value
        for key, value in pod.metadata.annotations.items()
        if key.startswith(GRANT_PREFIX)
    }


def parse_pod_grants(pod: Pod) -> tuple[dict[str, tuple[PortRange, ...]], list[str]]:
    names = {c.name for c in pod.all_containers()}
    grants: dict[str, tuple[PortRange, ...]] = {}
    problems: list[str] = []
    for name, text in sorted(grant_annotations(pod).items()):
        key = GRANT_PREFIX + name
        if name not in names:
            problems.append(f"annotation {key} names no container of the pod (containers: {sorted(names)})")
            continue
        try:
            grants[name] = parse_grants(text)
        except PolicyError as err:
            problems.append(f"annotation {key}: {err}")
    return grants, problems


def preset_grants(pod: Pod) -> tuple[dict[str, tuple[PortRange, ...]], list[str]]:
    """What the pod's `netisolate.io/preset` grants each container (see netisolate.presets), and
    what cannot be read: an unknown preset name is a problem, never a guess."""
    value = pod.metadata.annotations.get(PRESET_KEY)
    if value is None:
        return {}, []
    grants: dict[str, set[PortRange]] = {}
    problems = []
    containers = containers_with_kind(pod)
    for name in [item.strip() for item in value.split(",")]:
        preset = PRESETS.get(name)
        if preset is None:
            problems.append(
                f"annotation {PRESET_KEY}: {name!r} is not a preset; use {', '.join(PRESETS)} "
                "(several separated by commas), or write allow.netisolate.io/<container> grants"
            )
            continue
        if not any(c.name == preset.sidecar for c, _ in containers):
            continue  # not injected: there is nothing to reach
        others = [c for c, kind in containers if c.name != preset.sidecar and kind in _PRESET_KINDS]
        for c in others:
            grants.setdefault(c.name, set()).update(parse_grants(preset.capture))
        sidecar = grants.setdefault(preset.sidecar, set())
        sidecar.update(parse_grants(preset.own), *(declared_ports(c) for c in others))
    return {name: tuple(sorted(ranges)) for name, ranges in grants.items()}, problems


_PRESET_KINDS = (ContainerKind.REGULAR, ContainerKind.SIDECAR)  # init and ephemeral: no grants


def all_grants(pod: Pod) -> tuple[dict[str, tuple[PortRange, ...]], list[str]]:
    """Hand-written grants and preset grants together, and the problems of both."""
    grants, problems = parse_pod_grants(pod)
    presets, preset_problems = preset_grants(pod)
    for name, ranges in presets.items():
        grants[name] = tuple(sorted({*grants.get(name, ()), *ranges}))
    return grants, [*problems, *preset_problems]


def declared_ports(container: Container) -> tuple[PortRange, ...]:
    """The TCP and UDP ports a container declares it serves (its containerPorts), sorted."""
    declared = set()
    for p in container.ports:
        protocol = p.protocol.lower()
        if protocol in ("tcp", "udp") and 1 <= p.container_port <= 65535:
            declared.add(PortRange("tcp" if protocol == "tcp" else "udp", p.container_port, p.container_port))
    return tuple(sorted(declared))


def pod_policy(
    pod: Pod, namespace_labels: Mapping[str, str], default_identity: IdentityMode = IdentityMode.UID
) -> PodPolicy:
    level, problems = effective_level(pod, namespace_labels)
    grants, grant_problems = all_grants(pod)
    identity, identity_problems = pod_identity(pod, default_identity)
    problems += grant_problems + identity_problems
    if problems:  # fail closed: isolated, and nobody is granted anything
        level, grants = Level.ENFORCE, {}
    containers = tuple(
        ContainerPolicy(c.name, kind, effective_uid(pod, c), grants.get(c.name, ()), declared_ports(c))
        for c, kind in containers_with_kind(pod)
    )
    return PodPolicy(pod.ref, level, containers, tuple(problems), pod.spec.host_users is False, identity)


def without_grants(policy: PodPolicy, problem: str) -> PodPolicy:
    """The policy enforced with no grants at all, for a reason found outside the pod spec (fail
    closed, as for an unreadable annotation)."""
    containers = tuple(replace(c, grants=()) for c in policy.containers)
    return replace(policy, level=Level.ENFORCE, containers=containers, problems=(*policy.problems, problem))
