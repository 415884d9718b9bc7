"""Learning: what the kernel recorded as not granted (the `observed` set, see netisolate.rules,
rule 9) → per container, the grants that would allow exactly that, and the commands that apply
them. Pure: the agent feeds it, `netisolate suggest` prints it.

At `audit` a pod's connections all pass, so what is recorded is what enforcement would refuse; at
`enforce` it is what was refused. Either way, the grants suggested are the pod's current grants
plus what was seen, so applying them changes nothing else.

The kernel records a socket's identity: its UID, or under cgroup identity its container's cgroup ID,
which the agent maps back through the cgroups it tracks — the current ones, and a restarted
container's former ones for as long as the kernel still lists them.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from netisolate.model import Pod
from netisolate.policy import GRANT_PREFIX, ISOLATION_KEY, PortRange, Protocol, format_grants
from netisolate.rules import RuleSet, granted

EVENT_REASON = "ConnectionsObserved"


@dataclass(frozen=True, order=True)
class Observed:
    """A container opened (or tried to open) a loopback flow to this port, and no grant allowed it."""

    container: str
    protocol: Protocol
    port: int

    def __str__(self) -> str:
        return f"{self.container}→{self.port}/{self.protocol}"


def identities(rs: RuleSet) -> dict[str, tuple[str, ...]]:
    """Each identity as the kernel lists it in the record → the containers it names: a UID, or
    under cgroup identity a container's cgroup ID (those the agent has named so far)."""
    if rs.cgroups is not None:
        return {str(m.cgroup.id): (m.name,) for m in rs.cgroups.usable() if m.cgroup is not None}
    return {str(i.uid): tuple(i.containers.split(",")) for i in rs.identities}


def observations(
    rs: RuleSet, seen: Iterable[tuple[str, str, int, int]], former: Mapping[str, tuple[str, ...]]
) -> dict[Observed, int]:
    """The kernel's elements (identity, protocol, port, packets) by container; `former`: identities
    the ruleset no longer names (a restarted container's old cgroup). Sockets of no known container
    (the node's, an unmapped UID, a cgroup not named yet) name nobody to grant; what the ruleset
    grants by now (applied since it was recorded) is no longer news."""
    names = {**former, **identities(rs)}
    found: dict[Observed, int] = {}
    for identity, protocol, port, packets in seen:
        if protocol not in ("tcp", "udp"):
            continue
        for name in names.get(identity, ()):
            key = Observed(name, "tcp" if protocol == "tcp" else "udp", port)
            if not _granted(rs, key):
                found[key] = found.get(key, 0) + packets
    return found


def learned(
    rs: RuleSet,
    remembered: Mapping[Observed, int],
    seen: Iterable[tuple[str, str, int, int]],
    cap: int,
    former: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[Observed, int]:
    """What the agent keeps: what it remembered, less what is granted by now or names a container
    that is gone, plus what the kernel lists now (at most `cap` entries: beyond, new ones are
    dropped). Counts are the highest seen: the kernel's counter restarts when its element expires."""
    names = _containers(rs)
    kept = {o: n for o, n in remembered.items() if o.container in names and not _granted(rs, o)}
    for o, count in observations(rs, seen, former or {}).items():
        if o in kept or len(kept) < cap:
            kept[o] = max(count, kept.get(o, 0))
    return kept


def _containers(rs: RuleSet) -> set[str]:
    """The containers the rules can name, seen or not (a cgroup the agent has not named yet)."""
    if rs.cgroups is not None:
        return {m.name for m in rs.cgroups.usable()}
    return {name for i in rs.identities for name in i.containers.split(",")}


def _granted(rs: RuleSet, o: Observed) -> bool:
    return any(
        o.container in who.split(",")
        and any(p.protocol == o.protocol and p.low <= o.port <= p.high for p in ports)
        for who, ports in granted(rs)
    )


def suggested(current: Mapping[str, tuple[PortRange, ...]], observed: Iterable[Observed]) -> dict[str, str]:
    """`allow.netisolate.io/<container>` → its value: the container's current grants and every port
    it was seen opening, for each container that was seen."""
    wanted: dict[str, set[PortRange]] = {}
    for o in observed:
        wanted.setdefault(o.container, set(current.get(o.container, ()))).add(
            PortRange(o.protocol, o.port, o.port)
        )
    return {
        GRANT_PREFIX + name: format_grants(tuple(sorted(ports))) for name, ports in sorted(wanted.items())
    }


def workload(pod: Pod) -> tuple[str, str] | None:
    """(kind, name) of what makes the pod, where a patch of its template is the lasting fix: a
    ReplicaSet's Deployment (its name less the pod-template-hash), a StatefulSet, a DaemonSet, a Job."""
    extra = pod.metadata.model_extra or {}
    for ref in extra.get("ownerReferences") or []:
        if not isinstance(ref, dict) or not ref.get("controller"):
            continue
        kind, name = str(ref.get("kind", "")), str(ref.get("name", ""))
        suffix = pod.metadata.labels.get("pod-template-hash")
        if kind == "ReplicaSet" and suffix and name.endswith(f"-{suffix}"):
            return "Deployment", name.removesuffix(f"-{suffix}")
        if kind in ("StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            return kind, name
    return None


def commands(
    namespace: str, name: str, *, annotations: Mapping[str, str], owner: str = "", enforce: bool = False
) -> list[str]:
    """`kubectl annotate` for the running pod (the agent applies it at once) and, when the pod has a
    workload (`Kind/name`), the patch of its template for the pods it makes next."""
    wanted = {**annotations, **({ISOLATION_KEY: "enforce"} if enforce else {})}
    pairs = " ".join(shlex.quote(f"{k}={v}") for k, v in wanted.items())
    out = [f"kubectl annotate pod -n {namespace} {name} --overwrite {pairs}"]
    if owner:
        kind, _, workload_name = owner.partition("/")
        patch = shlex.quote(json.dumps({"spec": {"template": {"metadata": {"annotations": wanted}}}}))
        out.append(f"kubectl patch {kind.lower()} -n {namespace} {workload_name} --type merge -p {patch}")
    return out


def summary(observed: Mapping[Observed, int], annotations: Mapping[str, str], mode: str, owner: str) -> str:
    """The Event message: what was seen (most frequent first, as many as fit) and, last and whole,
    the annotations that allow it, which `netisolate suggest --from events` reads back."""
    what = "seen at audit, enforce would refuse" if mode == "audit" else "refused"
    tail = f"; to allow: {' '.join(f'{k}={v}' for k, v in annotations.items())}"
    tail += f"; workload: {owner}" if owner else ""
    seen = sorted(observed.items(), key=lambda item: (-item[1], item[0]))
    head = f"loopback connections not granted ({what}): "
    listed: list[str] = []
    for o, count in seen:
        if len(head) + len(", ".join([*listed, f"{o} x{count}"])) + len(tail) > 1000:
            listed.append(f"and {len(seen) - len(listed)} more")
            break
        listed.append(f"{o} x{count}")
    return head + ", ".join(listed) + tail


_ALLOW = re.compile(r"(allow\.netisolate\.io/[a-z0-9-]+)=([0-9a-z,/-]*)")
_OWNER = re.compile(r"; workload: (\S+)$")


def parse_summary(message: str) -> tuple[dict[str, str], str]:
    """The annotations and the workload an Event `summary` names."""
    annotations = {key: value for key, value in _ALLOW.findall(message.partition("; to allow: ")[2])}
    owner = _OWNER.search(message)
    return annotations, owner[1] if owner else ""
