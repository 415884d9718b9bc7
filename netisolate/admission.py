"""Admission rules (DESIGN.md, "Admission findings") as pure functions → findings.

The webhook and `netisolate check` both call `review_pod`, `review_ephemeral` and
`review_namespace`; nothing here touches the network.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from netisolate.config import Config, Severity, image_matches
from netisolate.model import (
    AdmissionRequest,
    Container,
    InputError,
    Namespace,
    NodeSelectorTerm,
    Pod,
    PodSpec,
    parse_namespace,
    parse_pod,
)
from netisolate.policy import (
    GRANT_PREFIX,
    ISOLATION_KEY,
    ContainerKind,
    Level,
    PolicyError,
    PortRange,
    all_grants,
    containers_with_kind,
    declared_ports,
    effective_level,
    effective_uid,
    parse_level,
    pod_identity,
)
from netisolate.rules import DEFAULT_SENTINEL_PORT

GATE_LABEL = "netisolate.io/gate"


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: Severity
    container: str | None
    message: str

    def as_dict(self) -> dict[str, str | None]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "container": self.container,
            "message": self.message,
        }


@dataclass(frozen=True)
class Requester:
    username: str = ""
    groups: tuple[str, ...] = field(default_factory=tuple)


def allowed(findings: list[Finding]) -> bool:
    return all(f.severity != "deny" for f in findings)


def _exempt(requester: Requester | None, config: Config) -> bool:
    # Offline there is no requester, and no requester is exempt.
    return requester is not None and bool(set(requester.groups) & set(config.exempt_groups))


# --- isolation rules: only for isolated pods, deny under enforce and warn under audit ---------


def _uid_rules(pod: Pod, severity: Severity) -> Iterator[Finding]:
    entries = containers_with_kind(pod)
    # Per UID, the containers declared so far that are still running when a later one starts:
    # every regular, native sidecar and ephemeral container, and (for a classic init container) the
    # native sidecars declared before it. One pass, so a pod of thousands of containers stays cheap.
    running: dict[int, list[str]] = {}
    sidecars: dict[int, list[str]] = {}
    for container, kind in entries:
        uid = effective_uid(pod, container)
        if uid is None:
            yield Finding(
                "uid-missing",
                severity,
                container.name,
                "no runAsUser: set securityContext.runAsUser to a UID unique to this container "
                "(the agent keys its rules on it)",
            )
            continue
        if uid == 0:
            yield Finding(
                "uid-root",
                severity,
                container.name,
                "runs as UID 0: set securityContext.runAsUser to a unique non-zero UID",
            )
        overlapping = sidecars.get(uid, []) if kind is ContainerKind.INIT else running.get(uid, [])
        if overlapping:
            others = f" and {len(overlapping) - 1} more" if len(overlapping) > 1 else ""
            yield Finding(
                "uid-shared",
                severity,
                container.name,
                f"shares UID {uid} with {overlapping[0]!r}{others}, which can run at the same time: give "
                "each container its own runAsUser, or they cannot be told apart",
            )
        if kind is not ContainerKind.INIT:
            running.setdefault(uid, []).append(container.name)
        if kind is ContainerKind.SIDECAR:
            sidecars.setdefault(uid, []).append(container.name)


def _capability_names(names: list[str]) -> set[str]:
    return {name.upper().removeprefix("CAP_") for name in names}


def _container_rules(
    pod: Pod, container: Container, kind: ContainerKind, config: Config, severity: Severity
) -> Iterator[Finding]:
    sc = container.security_context
    if sc is None or sc.allow_privilege_escalation is not False:
        yield Finding(
            "privilege-escalation",
            severity,
            container.name,
            "set securityContext.allowPrivilegeEscalation: false (setuid binaries could change the UID)",
        )
    trusted_init = kind is ContainerKind.INIT and image_matches(container.image, config.trusted_init_images)
    caps = sc.capabilities if sc else None
    # The runtimes match "ALL" literally (any case) and prefix every other name with CAP_, so
    # "CAP_ALL" drops nothing; for additions, any spelling of a name counts as that capability.
    drops_all = caps is not None and any(name.upper() == "ALL" for name in caps.drop)
    added = _capability_names(caps.add) - {"NET_BIND_SERVICE"} if caps else set()
    if not trusted_init and (not drops_all or added):
        fixes = [] if drops_all else ["set securityContext.capabilities.drop: [ALL]"]
        fixes += [f"remove {sorted(added)} from securityContext.capabilities.add"] if added else []
        yield Finding(
            "capabilities",
            severity,
            container.name,
            f"{' and '.join(fixes)} (only NET_BIND_SERVICE may be added)",
        )
    if container.ports and any(p.host_port for p in container.ports):
        yield Finding(
            "host-namespaces",
            severity,
            container.name,
            "remove hostPort: it exposes the container on the node's network",
        )
    if sc and sc.windows_options and sc.windows_options.host_process:
        yield Finding(
            "platform",
            severity,
            container.name,
            "windowsOptions.hostProcess: Windows nodes have no netfilter, isolation cannot be enforced",
        )


def _pod_rules(pod: Pod, severity: Severity) -> Iterator[Finding]:
    spec = pod.spec
    for flag, value in (
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ):
        if value:
            yield Finding(
                "host-namespaces", severity, None, f"set {flag}: false (it shares a node namespace)"
            )
    if _targets_windows(spec):
        yield Finding(
            "platform",
            severity,
            None,
            "the pod targets Windows, which has no netfilter: isolation cannot be enforced there",
        )


CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroupfs_rule(pod: Pod, severity: Severity) -> Iterator[Finding]:
    """With cgroup identity, a container that can write the node's cgroupfs can move its
    processes into another container's cgroup, and so take its identity."""
    volumes = {v.name: v for v in pod.spec.volumes if v.host_path is not None}
    for container in pod.all_containers():
        for mount in container.volume_mounts:
            volume = volumes.get(mount.name)
            if volume is None or mount.read_only:
                continue
            path = posixpath.normpath("/" + str((volume.host_path or {}).get("path", "")).lstrip("/"))
            # the cgroupfs itself, a directory in it, or one above it (/, /sys, /sys/fs)
            if path == "/" or f"{CGROUP_ROOT}/".startswith(f"{path}/") or path.startswith(f"{CGROUP_ROOT}/"):
                yield Finding(
                    "cgroupfs-mount",
                    severity,
                    container.name,
                    f"volume {mount.name} mounts the node's {path} writable, which holds the cgroups "
                    "that identify containers: set readOnly: true on the mount or drop the volume",
                )


OS_LABELS = ("kubernetes.io/os", "beta.kubernetes.io/os")  # the beta label is still set by kubelets


def _term_admits_windows(term: NodeSelectorTerm) -> bool:
    return any(
        req.key in OS_LABELS
        and (
            (req.operator == "In" and "windows" in req.values)
            or (req.operator == "NotIn" and "linux" in req.values)
        )
        for req in term.match_expressions
    )


def _targets_windows(spec: PodSpec) -> bool:
    """spec.os, an OS nodeSelector, a required node affinity any of whose terms admits Windows, or
    a pod-level hostProcess."""
    affinity = spec.affinity.node_affinity if spec.affinity else None
    required = affinity.required_during_scheduling_ignored_during_execution if affinity else None
    return (
        (spec.os is not None and spec.os.name == "windows")
        or any(spec.node_selector.get(label) == "windows" for label in OS_LABELS)
        or (required is not None and any(_term_admits_windows(t) for t in required.node_selector_terms))
        or bool(
            spec.security_context
            and spec.security_context.windows_options
            and spec.security_context.windows_options.host_process
        )
    )


def _isolation_rules(pod: Pod, level: Level, config: Config) -> Iterator[Finding]:
    severity: Severity = "deny" if level is Level.ENFORCE else "warn"
    identity, _ = pod_identity(pod)
    if identity.by_uid:
        yield from _uid_rules(pod, severity)
    if identity.by_cgroup:
        yield from _cgroupfs_rule(pod, severity)
    yield from _pod_rules(pod, severity)
    for container, kind in containers_with_kind(pod):
        yield from _container_rules(pod, container, kind, config, severity)
        if container.security_context and container.security_context.privileged:
            yield Finding(
                "privileged",
                severity,
                container.name,
                "remove privileged: true (a privileged container can rewrite the pod's rules)",
            )


# --- injection guard: every pod, configurable severities --------------------------------------


def _guard_rules(pod: Pod, config: Config, requester: Requester | None) -> Iterator[Finding]:
    for container in pod.all_containers():
        if container.security_context and container.security_context.privileged:
            yield Finding(
                "privileged",
                config.severity("privileged"),
                container.name,
                "privileged container: remove privileged: true, or find out which injector added it",
            )
        prefixes = config.sidecar_images.get(container.name)
        if prefixes is None:
            continue
        if not image_matches(container.image, prefixes):
            yield Finding(
                "sidecar-image",
                config.severity("sidecar-image"),
                container.name,
                f"image {container.image!r} is not one of the allowed images for {container.name} "
                f"({', '.join(prefixes)}): check the injector, or add the image to sidecarImages",
            )
        if "@sha256:" not in (container.image or ""):
            yield Finding(
                "sidecar-digest",
                config.severity("sidecar-digest"),
                container.name,
                f"image {container.image!r} is not pinned: reference it by @sha256: digest",
            )
    mounts: dict[str, list[str]] = {}
    for container in pod.all_containers():
        for mount in container.volume_mounts:
            mounts.setdefault(mount.name, []).append(container.name)
    for volume in pod.spec.volumes:
        if volume.host_path is not None:
            users = ",".join(mounts.get(volume.name, [])) or None
            yield Finding(
                "hostpath",
                config.severity("hostpath"),
                users,
                f"hostPath volume {volume.name!r} ({volume.host_path.get('path', '?')}): "
                "use a projected, configMap or emptyDir volume instead",
            )
    if not _exempt(requester, config):
        for where, key, value in opt_outs(pod, config):
            yield Finding(
                "injection-opt-out",
                config.severity("injection-opt-out"),
                None,
                f"{where} {key}: {value!r} opts the pod out of sidecar injection; only "
                f"members of {config.exempt_groups} may set it",
            )


def opt_outs(pod: Pod, config: Config) -> list[tuple[str, str, str]]:
    """The pod's opt-outs from injection as (label|annotation, key, value), sorted by key. Labels and
    annotations apart: injectors read both, and either may win. (The audit asks this too.)"""
    return [
        (where, key, meta[key])
        for key, off in sorted(config.opt_out_annotations.items())
        for where, meta in (("label", pod.metadata.labels), ("annotation", pod.metadata.annotations))
        if key in meta and _opts_out(meta[key], off)
    ]


_NO = {"false", "no", "n", "off", "0", "disabled"}
_STILL_ON = {"", "true", "yes", "y", "on", "1", "enabled", "ingress"}  # ingress: Linkerd's other mode


def _opts_out(value: str, off: str) -> bool:
    """The configured opt-out value in any case and, where that value is a "no", anything the
    injectors do not read as "inject" (Istio skips injection for every value but y/yes/true/on)."""
    value, off = value.strip().lower(), off.strip().lower()
    return value == off or (off in _NO and value not in _STILL_ON)


# --- hardening warnings and the gate ----------------------------------------------------------


def _hardening_warnings(pod: Pod) -> Iterator[Finding]:
    if pod.spec.share_process_namespace:
        yield Finding(
            "shared-process-namespace",
            "warn",
            None,
            "shareProcessNamespace: true lets containers reach each other's sockets and fds",
        )
    for container in pod.spec.ephemeral_containers:
        if container.target_container_name:
            yield Finding(
                "shared-process-namespace",
                "warn",
                container.name,
                f"targets {container.target_container_name!r}: it can reach that container's sockets and fds",
            )
    users: dict[str, list[str]] = {}
    empty_dirs = {v.name for v in pod.spec.volumes if v.is_empty_dir}
    # A classic init container has exited before the others start: no live channel through it.
    for container, kind in containers_with_kind(pod):
        if kind is ContainerKind.INIT:
            continue
        for mount in container.volume_mounts:
            if mount.name in empty_dirs and container.name not in users.setdefault(mount.name, []):
                users[mount.name].append(container.name)
    for volume, names in sorted(users.items()):
        if len(names) > 1:
            yield Finding(
                "shared-emptydir",
                "warn",
                None,
                f"emptyDir {volume!r} is mounted by {', '.join(names)}: Unix sockets in it "
                "bypass network isolation; mount it in one container, or accept the channel",
            )


def _sentinel_grants(grants: Mapping[str, tuple[PortRange, ...]]) -> Iterator[str]:
    # The agent's documented default: admission cannot know a node's --sentinel-port.
    port = DEFAULT_SENTINEL_PORT
    for name, ranges in sorted(grants.items()):
        if any(r.low <= port <= r.high for r in ranges):
            yield (
                f"annotation {GRANT_PREFIX}{name} grants port {port}, the gate's sentinel, which is "
                "never grantable (every connection to it is refused): drop it from the grant"
            )


def _duplicate_names(pod: Pod) -> Iterator[Finding]:
    seen: set[str] = set()
    for container in pod.all_containers():
        if container.name in seen:
            yield Finding(
                "container-name-duplicate",
                "deny",
                container.name,
                "two containers of the pod have this name (the API server refuses that, and one grant "
                "would cover both): rename one",
            )
        seen.add(container.name)


def _undeclared_grant_rule(pod: Pod) -> Iterator[Finding]:
    """Only a declared port (containerPort + protocol) is owned: served by its container's UID
    alone. A granted port that nobody declares may be served by whoever binds it first."""
    grants, _ = all_grants(pod)  # preset grants are checked like hand-written ones
    declared = [port for c in pod.all_containers() for port in declared_ports(c)]
    for name, ranges in sorted(grants.items()):
        for r in ranges:
            if not any(d.protocol == r.protocol and r.low <= d.low <= r.high for d in declared):
                yield Finding(
                    "grant-port-undeclared",
                    "warn",
                    name,
                    f"is granted {r}, which no container declares: while its server is down any "
                    "container can listen there and take the connections; declare it as a "
                    f"containerPort (protocol {r.protocol.upper()}) of the container that serves it",
                )


def _is_gate(container: Container, config: Config) -> bool:
    """Exactly the documented form: our image, its own entrypoint running `gate`, as a classic init
    container (a native sidecar, restartPolicy Always, would not hold the others back)."""
    return (
        image_matches(container.image, config.gate_images)
        and not container.command
        and container.args[:1] == ["gate"]
        and container.restart_policy != "Always"
    )


def _gate_rule(pod: Pod, config: Config, namespace_labels: Mapping[str, str]) -> Iterator[Finding]:
    if not (config.gate_required or namespace_labels.get(GATE_LABEL) == "required"):
        return
    for container in pod.spec.init_containers:
        if _is_gate(container, config):
            return
        if not image_matches(container.image, config.trusted_init_images):
            break
    yield Finding(
        "gate-missing",
        "deny",
        None,
        "the first init container must be the netisolate gate (`netisolate gate`), so no container "
        "starts before the pod's rules hold; only trusted init images may precede it",
    )


# --- entry points -----------------------------------------------------------------------------


def _merge(findings: Iterator[Finding]) -> list[Finding]:
    """One finding per (rule, container): the stricter severity wins (privileged has two sources)."""
    merged: dict[tuple[str, str | None, str], Finding] = {}
    for finding in findings:
        key = (finding.rule, finding.container, finding.message if finding.rule != "privileged" else "")
        kept = merged.get(key)
        if kept is None or (kept.severity == "warn" and finding.severity == "deny"):
            merged[key] = finding
    return list(merged.values())


MAX_FINDINGS_PER_RULE = 20


def _capped(findings: list[Finding]) -> list[Finding]:
    """At most MAX_FINDINGS_PER_RULE findings of a rule, then one that counts the rest: a pod of
    thousands of containers gets an answer of bounded size (a webhook denial is one message)."""
    shown: dict[str, int] = {}
    rest: dict[str, list[Finding]] = {}
    out = []
    for finding in findings:
        if shown.get(finding.rule, 0) < MAX_FINDINGS_PER_RULE:
            shown[finding.rule] = shown.get(finding.rule, 0) + 1
            out.append(finding)
        else:
            rest.setdefault(finding.rule, []).append(finding)
    for rule, hidden in rest.items():
        severity: Severity = "deny" if any(f.severity == "deny" for f in hidden) else "warn"
        out.append(
            Finding(
                rule,
                severity,
                None,
                f"{len(hidden)} more findings of this rule (the next one: {hidden[0].container or 'pod'}: "
                f"{hidden[0].message})",
            )
        )
    return out


def _pod_findings(
    pod: Pod, namespace_labels: Mapping[str, str], config: Config, requester: Requester | None
) -> list[Finding]:
    level, level_problems = effective_level(pod, namespace_labels)
    grants, grant_problems = all_grants(pod)  # an unknown netisolate.io/preset name among them
    _, identity_problems = pod_identity(pod)

    def all_findings() -> Iterator[Finding]:
        for problem in [*level_problems, *grant_problems, *identity_problems, *_sentinel_grants(grants)]:
            yield Finding("annotation-invalid", "deny", None, problem)
        yield from _duplicate_names(pod)
        if level is not Level.OFF:
            yield from _isolation_rules(pod, level, config)
            yield from _hardening_warnings(pod)
            yield from _undeclared_grant_rule(pod)
            yield from _gate_rule(pod, config, namespace_labels)
        yield from _guard_rules(pod, config, requester)

    return _merge(all_findings())


def review_pod(
    pod: Pod, namespace_labels: Mapping[str, str], config: Config, requester: Requester | None = None
) -> list[Finding]:
    return _capped(_pod_findings(pod, namespace_labels, config, requester))


def review_ephemeral(
    pod: Pod,
    old: Pod | None,
    namespace_labels: Mapping[str, str],
    config: Config,
    requester: Requester | None = None,
) -> list[Finding]:
    """`kubectl debug`: judge only the ephemeral containers this update adds, against the running ones."""
    before = {c.name for c in old.spec.ephemeral_containers} if old else set()
    added = {c.name for c in pod.spec.ephemeral_containers} - before
    # The running ones first: a pair finding names the later container, so it names the new one
    # whatever order the request lists them in.
    ephemeral = sorted(pod.spec.ephemeral_containers, key=lambda c: c.name in added)
    pod = pod.model_copy(update={"spec": pod.spec.model_copy(update={"ephemeral_containers": ephemeral})})
    # Capped after the filter: a cap first could leave the added container's finding out.
    found = _pod_findings(pod, namespace_labels, config, requester)
    return _capped([f for f in found if f.container in added])


def review_namespace(
    namespace: Namespace, old: Namespace | None, config: Config, requester: Requester | None = None
) -> list[Finding]:
    findings = []
    labels = namespace.metadata.labels
    if ISOLATION_KEY in labels:
        try:
            parse_level(labels[ISOLATION_KEY], f"namespace label {ISOLATION_KEY}")
        except PolicyError as err:
            findings.append(Finding("annotation-invalid", "deny", None, str(err)))
    if not _exempt(requester, config):
        before = old.metadata.labels if old else {}
        for key in config.protected_namespace_labels:
            if labels.get(key) != before.get(key):
                findings.append(
                    Finding(
                        "namespace-label-protected",
                        config.severity("namespace-label-protected"),
                        None,
                        f"label {key} changes from {before.get(key)!r} to {labels.get(key)!r}: "
                        f"only members of {config.exempt_groups} may change it",
                    )
                )
    return findings


def _requester(request: AdmissionRequest) -> Requester | None:
    if request.user_info is None:
        return None
    return Requester(request.user_info.username, tuple(request.user_info.groups))


def review_request(
    request: AdmissionRequest,
    namespace_labels: Mapping[str, str],
    config: Config,
    where: str | None = None,
) -> list[Finding]:
    """Dispatch an admission request (or an offline document wrapped as one) to its rules.

    Raises InputError when the objects in it cannot be read, saying where: `where` (offline: the
    file's object; default: the request's kind, namespace, name, operation), then which object.
    """
    where = (
        where or f"{request.kind.kind} {request.namespace or '-'}/{request.name or '-'} ({request.operation})"
    )
    new_where, old_where = f"{where} object", f"{where} oldObject"
    requester = _requester(request)
    if request.kind.kind == "Namespace":
        namespace = parse_namespace(request.object, new_where)
        old_ns = parse_namespace(request.old_object, old_where) if request.old_object else None
        return review_namespace(namespace, old_ns, config, requester)
    if request.kind.kind != "Pod":
        raise InputError(f"{where}: netisolate reviews Pods and Namespaces, not {request.kind.kind}")
    pod = parse_pod(request.object, new_where)
    if request.sub_resource == "ephemeralcontainers":
        old = parse_pod(request.old_object, old_where) if request.old_object else None
        return review_ephemeral(pod, old, namespace_labels, config, requester)
    return review_pod(pod, namespace_labels, config, requester)
