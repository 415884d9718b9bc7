"""Every admission rule of DESIGN.md, firing and not firing."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest

from netisolate.admission import (
    MAX_FINDINGS_PER_RULE,
    Finding,
    Requester,
    allowed,
    review_namespace,
    review_pod,
    review_request,
)
from netisolate.config import Config, image_matches
from netisolate.model import AdmissionRequest, InputError, parse_namespace, parse_pod

Obj = dict[str, Any]


HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def hardened(name: str, uid: int, image: str = "registry.example.com/team/app:1.0", **extra: Any) -> Obj:
    return {
        "name": name,
        "image": image,
        "securityContext": {
            "runAsUser": uid,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        **extra,
    }


def good_pod(level: str = "enforce") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {"netisolate.io/isolation": level}},
        "spec": {"containers": [hardened("app", 1000), hardened("helper", 1001)]},
    }


def findings(
    pod: Obj,
    labels: dict[str, str] | None = None,
    config: Config | None = None,
    requester: Requester | None = None,
) -> list[Finding]:
    return review_pod(parse_pod(pod), labels or {}, config or Config(), requester)


def rules(found: list[Finding]) -> set[tuple[str, str, str | None]]:
    return {(f.rule, f.severity, f.container) for f in found}


def mutated(change: Callable[[Obj], None], level: str = "enforce") -> Obj:
    pod = copy.deepcopy(good_pod(level))
    change(pod)
    return pod


def container(pod: Obj, index: int = 0) -> Obj:
    c: Obj = pod["spec"]["containers"][index]
    return c


def test_the_good_pod_passes_clean() -> None:
    assert findings(good_pod()) == []


ISOLATION_CASES: dict[str, tuple[Callable[[Obj], None], str, str | None]] = {
    "uid-missing": (lambda p: container(p)["securityContext"].pop("runAsUser"), "uid-missing", "app"),
    "uid-root": (lambda p: container(p)["securityContext"].update(runAsUser=0), "uid-root", "app"),
    "uid-shared": (
        lambda p: container(p, 1)["securityContext"].update(runAsUser=1000),
        "uid-shared",
        "helper",
    ),
    "escalation-unset": (
        lambda p: container(p)["securityContext"].pop("allowPrivilegeEscalation"),
        "privilege-escalation",
        "app",
    ),
    "escalation-true": (
        lambda p: container(p)["securityContext"].update(allowPrivilegeEscalation=True),
        "privilege-escalation",
        "app",
    ),
    "no-drop-all": (
        lambda p: container(p)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "capabilities",
        "app",
    ),
    "add-net-admin": (
        lambda p: container(p)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
        "capabilities",
        "app",
    ),
    "drop-cap-all": (  # the runtimes match "ALL" literally: "CAP_ALL" drops nothing
        lambda p: container(p)["securityContext"]["capabilities"].update(drop=["CAP_ALL"]),
        "capabilities",
        "app",
    ),
    "add-cap-prefixed": (
        lambda p: container(p)["securityContext"]["capabilities"].update(add=["CAP_SYS_ADMIN"]),
        "capabilities",
        "app",
    ),
    "privileged": (lambda p: container(p)["securityContext"].update(privileged=True), "privileged", "app"),
    "host-network": (lambda p: p["spec"].update(hostNetwork=True), "host-namespaces", None),
    "host-pid": (lambda p: p["spec"].update(hostPID=True), "host-namespaces", None),
    "host-ipc": (lambda p: p["spec"].update(hostIPC=True), "host-namespaces", None),
    "host-port": (
        lambda p: container(p).update(ports=[{"containerPort": 80, "hostPort": 80}]),
        "host-namespaces",
        "app",
    ),
    "windows": (lambda p: p["spec"].update(os={"name": "windows"}), "platform", None),
    "windows-node-selector": (
        lambda p: p["spec"].update(nodeSelector={"kubernetes.io/os": "windows"}),
        "platform",
        None,
    ),
    "host-process": (
        lambda p: container(p)["securityContext"].update(windowsOptions={"hostProcess": True}),
        "platform",
        "app",
    ),
}


@pytest.mark.parametrize("case", ISOLATION_CASES)
def test_isolation_rule_denies_under_enforce(case: str) -> None:
    change, rule, where = ISOLATION_CASES[case]
    found = findings(mutated(change))
    assert (rule, "deny", where) in rules(found)
    assert not allowed(found)


@pytest.mark.parametrize("case", ISOLATION_CASES)
def test_isolation_rule_warns_under_audit(case: str) -> None:
    change, rule, where = ISOLATION_CASES[case]
    # the injection guard denies privileged containers on its own; relax it to see the isolation rule
    found = findings(mutated(change, "audit"), config=Config(severities={"privileged": "warn"}))
    assert (rule, "warn", where) in rules(found)


@pytest.mark.parametrize("case", [c for c in ISOLATION_CASES if c != "privileged"])
def test_isolation_rules_are_silent_when_off(case: str) -> None:
    change, _, _ = ISOLATION_CASES[case]
    assert findings(mutated(change, "off")) == []


def test_namespace_label_turns_the_rules_on() -> None:
    pod = mutated(lambda p: container(p)["securityContext"].pop("runAsUser"), "off")
    found = findings(pod, labels={"netisolate.io/isolation": "enforce"})
    assert ("uid-missing", "deny", "app") in rules(found)


def test_net_bind_service_may_be_added() -> None:
    pod = mutated(lambda p: container(p)["securityContext"]["capabilities"].update(add=["NET_BIND_SERVICE"]))
    assert findings(pod) == []


def test_trusted_init_images_may_add_capabilities() -> None:
    init = hardened("istio-init", 1337, image="docker.io/istio/proxyv2:1.22.0")
    init["securityContext"]["capabilities"] = {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    pod = mutated(lambda p: p["spec"].update(initContainers=[init]))
    assert ("capabilities", "deny", "istio-init") in rules(findings(pod))
    trusted = Config(trusted_init_images=["docker.io/istio/proxyv2"])
    assert "capabilities" not in {f.rule for f in findings(pod, config=trusted)}


def test_pod_level_uid_counts_as_the_containers() -> None:
    def change(p: Obj) -> None:
        p["spec"]["securityContext"] = {"runAsUser": 4000}
        for c in p["spec"]["containers"]:
            c["securityContext"].pop("runAsUser")

    assert ("uid-shared", "deny", "helper") in rules(findings(mutated(change)))


# --- uid-shared: the exact concurrency rule ---------------------------------------------------


def uid_pod(init: list[Obj], regular: list[Obj], ephemeral: list[Obj] | None = None) -> Obj:
    pod = good_pod()
    pod["spec"] = {"initContainers": init, "containers": regular, "ephemeralContainers": ephemeral or []}
    return pod


def sidecar(name: str, uid: int) -> Obj:
    return hardened(name, uid, restartPolicy="Always")


@pytest.mark.parametrize(
    ("pod", "shared"),
    [
        # classic init containers run one at a time, before the regular containers
        (uid_pod([hardened("i1", 1000), hardened("i2", 1000)], [hardened("app", 1000)]), set()),
        # two regular containers run together
        (uid_pod([], [hardened("a", 1000), hardened("b", 1000)]), {"b"}),
        # a native sidecar runs alongside the regular containers
        (uid_pod([sidecar("side", 1000)], [hardened("app", 1000)]), {"app"}),
        # ... and alongside every init container declared after it
        (uid_pod([sidecar("side", 1000), hardened("later", 1000)], [hardened("app", 2000)]), {"later"}),
        # ... but not with init containers declared before it (they finished before it started)
        (uid_pod([hardened("earlier", 1000), sidecar("side", 1000)], [hardened("app", 2000)]), set()),
        # two native sidecars overlap each other
        (uid_pod([sidecar("s1", 1000), sidecar("s2", 1000)], [hardened("app", 2000)]), {"s2"}),
        # ephemeral containers overlap regular containers, sidecars and each other
        (uid_pod([], [hardened("app", 1000)], [hardened("dbg", 1000)]), {"dbg"}),
        (uid_pod([sidecar("side", 1000)], [hardened("app", 2000)], [hardened("dbg", 1000)]), {"dbg"}),
        (uid_pod([], [hardened("app", 2000)], [hardened("d1", 1000), hardened("d2", 1000)]), {"d2"}),
        # ... but never a classic init container
        (uid_pod([hardened("init", 1000)], [hardened("app", 2000)], [hardened("dbg", 1000)]), set()),
    ],
)
def test_uid_shared_concurrency(pod: Obj, shared: set[str]) -> None:
    found = {f.container for f in findings(pod) if f.rule == "uid-shared"}
    assert found == shared


def test_uid_missing_covers_every_kind_of_container() -> None:
    bare = {
        "name": "x",
        "image": "i",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    pod = uid_pod([dict(bare, name="init")], [dict(bare, name="app")], [dict(bare, name="dbg")])
    assert {f.container for f in findings(pod) if f.rule == "uid-missing"} == {"init", "app", "dbg"}


# --- annotation-invalid: always deny ----------------------------------------------------------


@pytest.mark.parametrize(
    "annotations",
    [
        {"netisolate.io/isolation": "strict"},
        {"netisolate.io/isolation": "off", "allow.netisolate.io/app": "8080-80"},
        {"allow.netisolate.io/app": "70000"},
        {"allow.netisolate.io/nobody": "80"},
    ],
)
def test_annotation_invalid_always_denies(annotations: dict[str, str]) -> None:
    pod = good_pod()
    pod["metadata"]["annotations"] = annotations
    found = findings(pod)
    assert "annotation-invalid" in {f.rule for f in found if f.severity == "deny"}


def test_valid_grants_raise_nothing() -> None:
    pod = good_pod()
    pod["metadata"]["annotations"]["allow.netisolate.io/app"] = "8080, 9000-9001/udp"
    container(pod, 1)["ports"] = [{"containerPort": 8080}, {"containerPort": 9001, "protocol": "UDP"}]
    assert findings(pod) == []


@pytest.mark.parametrize("level", ["enforce", "audit"])
def test_a_grant_to_a_port_nobody_declares_warns(level: str) -> None:
    """Only a declared port is owned (served by its container alone): a grant to an undeclared one,
    or to one declared for the other protocol, can be taken by whoever listens there first."""
    pod = good_pod(level)
    pod["metadata"]["annotations"]["allow.netisolate.io/app"] = "8080, 53/udp, 9000-9100, 7000"
    container(pod, 1)["ports"] = [{"containerPort": 9050}, {"containerPort": 53}]
    found = [f for f in findings(pod) if f.rule == "grant-port-undeclared"]
    assert {(f.severity, f.container) for f in found} == {("warn", "app")}
    assert [f.message.split(",")[0] for f in found] == [
        "is granted 7000",
        "is granted 8080",
        "is granted 53/udp",
    ]
    assert "containerPort (protocol UDP)" in found[2].message
    off = good_pod("off")
    off["metadata"]["annotations"]["allow.netisolate.io/app"] = "8080"
    assert findings(off) == []


# --- injection guard --------------------------------------------------------------------------


def test_privileged_is_denied_even_when_isolation_is_off() -> None:
    pod = mutated(lambda p: container(p)["securityContext"].update(privileged=True), "off")
    assert rules(findings(pod)) == {("privileged", "deny", "app")}
    relaxed = Config(severities={"privileged": "warn"})
    assert rules(findings(pod, config=relaxed)) == {("privileged", "warn", "app")}


def test_hostpath_warns() -> None:
    def change(p: Obj) -> None:
        p["spec"]["volumes"] = [{"name": "root", "hostPath": {"path": "/"}}, {"name": "tmp", "emptyDir": {}}]
        container(p)["volumeMounts"] = [{"name": "root", "mountPath": "/host"}]

    assert rules(findings(mutated(change, "off"))) == {("hostpath", "warn", "app")}
    assert findings(mutated(lambda p: p["spec"].update(volumes=[{"name": "t", "emptyDir": {}}]), "off")) == []


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("docker.io/istio/proxyv2@sha256:" + "a" * 64, set()),
        ("docker.io/istio/proxyv2:1.22.0", {"sidecar-digest"}),
        ("evil.example.com/istio/proxyv2@sha256:" + "a" * 64, {"sidecar-image"}),
        ("docker.io/istio/proxyv2-evil:1.0", {"sidecar-image", "sidecar-digest"}),
    ],
)
def test_known_sidecar_images(image: str, expected: set[str]) -> None:
    pod = mutated(lambda p: p["spec"]["containers"].append(hardened("istio-proxy", 1337, image=image)))
    assert {f.rule for f in findings(pod)} == expected


def test_unknown_container_names_are_not_sidecars() -> None:
    pod = mutated(lambda p: p["spec"]["containers"].append(hardened("my-proxy", 1337, image="x:latest")))
    assert findings(pod) == []


def test_image_prefixes_match_on_a_repository_boundary() -> None:
    assert image_matches("ghcr.io/org/img:1", ["ghcr.io/org/img"])
    assert image_matches("ghcr.io/org/img", ["ghcr.io/org/img"])
    assert not image_matches("ghcr.io/org/img2:1", ["ghcr.io/org/img"])
    assert image_matches("ghcr.io/org/anything:1", ["ghcr.io/org/"])
    assert not image_matches(None, ["ghcr.io/org/"])


OPT_OUT = {"sidecar.istio.io/inject": "false"}


def test_opt_out_warns_unless_requester_is_exempt() -> None:
    pod = mutated(lambda p: p["metadata"]["annotations"].update(OPT_OUT), "off")
    assert rules(findings(pod)) == {("injection-opt-out", "warn", None)}
    assert rules(findings(pod, requester=Requester("dev", ("developers",)))) == {
        ("injection-opt-out", "warn", None)
    }
    assert findings(pod, requester=Requester("admin", ("netisolate:platform",))) == []
    inject = mutated(
        lambda p: p["metadata"]["annotations"].update({"sidecar.istio.io/inject": "true"}), "off"
    )
    assert findings(inject) == []


@pytest.mark.parametrize(
    ("labels", "annotations", "fires"),
    [
        ({"sidecar.istio.io/inject": "false"}, {"sidecar.istio.io/inject": "true"}, True),  # the label
        ({}, {"sidecar.istio.io/inject": "False"}, True),
        ({}, {"sidecar.istio.io/inject": "no"}, True),
        ({}, {"sidecar.istio.io/inject": "off"}, True),
        ({}, {"sidecar.istio.io/inject": "yes"}, False),
        ({}, {"linkerd.io/inject": "ingress"}, False),
        ({}, {"linkerd.io/inject": "Disabled"}, True),
        ({"dapr.io/enabled": "FALSE"}, {}, True),
    ],
)
def test_opt_out_in_every_spelling_and_place(
    labels: dict[str, str], annotations: dict[str, str], fires: bool
) -> None:
    def set_meta(p: Obj) -> None:
        p["metadata"].setdefault("labels", {}).update(labels)
        p["metadata"]["annotations"].update(annotations)

    found = {f.rule for f in findings(mutated(set_meta, "off"))}
    assert ("injection-opt-out" in found) is fires


def _namespace(labels: dict[str, str]) -> Any:
    return parse_namespace(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": labels}}
    )


def test_protected_namespace_labels() -> None:
    old = _namespace({"istio-injection": "enabled", "team": "a"})
    dev = Requester("dev", ("developers",))
    assert review_namespace(_namespace({"istio-injection": "enabled", "team": "b"}), old, Config(), dev) == []
    changed = review_namespace(_namespace({"istio-injection": "disabled"}), old, Config(), dev)
    assert rules(changed) == {("namespace-label-protected", "deny", None)}
    removed = review_namespace(_namespace({}), old, Config(), dev)
    assert rules(removed) == {("namespace-label-protected", "deny", None)}
    admin = Requester("root", ("system:masters",))
    assert review_namespace(_namespace({"istio-injection": "disabled"}), old, Config(), admin) == []
    created = review_namespace(_namespace({"netisolate.io/isolation": "enforce"}), None, Config(), None)
    assert rules(created) == {("namespace-label-protected", "deny", None)}


def test_namespace_isolation_label_must_be_valid() -> None:
    admin = Requester("root", ("system:masters",))
    found = review_namespace(_namespace({"netisolate.io/isolation": "on"}), None, Config(), admin)
    assert rules(found) == {("annotation-invalid", "deny", None)}


# --- gate-missing ------------------------------------------------------------------------------

GATE = hardened("netisolate-gate", 65000, image="ghcr.io/netisolate/netisolate:0.1.0", args=["gate"])


@pytest.mark.parametrize(
    ("init", "labels", "config", "fires"),
    [
        ([], {}, Config(), False),  # not asked for
        ([], {"netisolate.io/gate": "required"}, Config(), True),
        ([], {}, Config(gate_required=True), True),
        ([GATE], {}, Config(gate_required=True), False),
        ([hardened("setup", 1500), GATE], {}, Config(gate_required=True), True),
        (
            [hardened("setup", 1500, image="mirror.example.com/init:1"), GATE],
            {},
            Config(gate_required=True, trusted_init_images=["mirror.example.com/init"]),
            False,
        ),
        ([dict(GATE, args=["sleep"])], {}, Config(gate_required=True), True),
        # only the documented form counts: not as a native sidecar, not behind another command
        ([dict(GATE, restartPolicy="Always")], {}, Config(gate_required=True), True),
        ([dict(GATE, command=["sh", "-c", "exit 0"], args=["gate"])], {}, Config(gate_required=True), True),
        ([dict(GATE, args=["--timeout", "5", "gate"])], {}, Config(gate_required=True), True),
        ([dict(GATE, args=["gate", "--timeout", "120"])], {}, Config(gate_required=True), False),
    ],
)
def test_gate_missing(init: list[Obj], labels: dict[str, str], config: Config, fires: bool) -> None:
    pod = mutated(lambda p: p["spec"].update(initContainers=init))
    assert ("gate-missing" in {f.rule for f in findings(pod, labels, config)}) is fires


# --- hardening warnings -----------------------------------------------------------------------


def test_shared_process_namespace_and_emptydir_warn() -> None:
    def change(p: Obj) -> None:
        p["spec"]["shareProcessNamespace"] = True
        p["spec"]["volumes"] = [{"name": "sock", "emptyDir": {}}]
        for c in p["spec"]["containers"]:
            c["volumeMounts"] = [{"name": "sock", "mountPath": "/run/sock"}]

    found = findings(mutated(change))
    assert rules(found) == {("shared-process-namespace", "warn", None), ("shared-emptydir", "warn", None)}
    assert allowed(found)
    assert findings(mutated(change, "off")) == []


def test_targeted_ephemeral_container_warns() -> None:
    dbg = hardened("dbg", 3000, targetContainerName="app")
    assert ("shared-process-namespace", "warn", "dbg") in rules(
        findings(mutated(lambda p: p["spec"].update(ephemeralContainers=[dbg])))
    )


# --- admission requests -----------------------------------------------------------------------


def request(**fields: Any) -> AdmissionRequest:
    return AdmissionRequest.model_validate({"uid": "1", "operation": "UPDATE", **fields})


def test_ephemeral_update_judges_only_the_new_container() -> None:
    old = good_pod()
    old["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True  # pre-existing
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox"}]  # as root, no hardening
    req = request(
        kind={"kind": "Pod"},
        subResource="ephemeralcontainers",
        object=new,
        oldObject=old,
        userInfo={"username": "dev", "groups": ["developers"]},
    )
    found = review_request(req, {}, Config())
    assert {f.container for f in found} == {"debugger"}
    assert {"uid-missing", "privilege-escalation", "capabilities"} <= {f.rule for f in found}
    assert not allowed(found)


def test_ephemeral_update_sharing_a_uid_is_caught_whatever_the_order() -> None:
    """The new debugger takes the UID of an earlier one; listing it first must not hide that."""
    old = good_pod()
    old["spec"]["ephemeralContainers"] = [hardened("dbg1", 2000)]
    for order in ("new-first", "new-last"):
        new = copy.deepcopy(old)
        dbg2 = hardened("dbg2", 2000)
        new["spec"]["ephemeralContainers"] = (
            [dbg2, *old["spec"]["ephemeralContainers"]]
            if order == "new-first"
            else [*old["spec"]["ephemeralContainers"], dbg2]
        )
        req = request(kind={"kind": "Pod"}, subResource="ephemeralcontainers", object=new, oldObject=old)
        found = review_request(req, {}, Config())
        assert ("uid-shared", "deny", "dbg2") in rules(found), order


def test_namespace_requests_use_the_requester_groups() -> None:
    old = {"metadata": {"name": "shop", "labels": {"istio-injection": "enabled"}}}
    new = {"metadata": {"name": "shop", "labels": {}}}

    def review(groups: list[str]) -> list[Finding]:
        req = request(
            kind={"kind": "Namespace"},
            object=new,
            oldObject=old,
            userInfo={"username": "u", "groups": groups},
        )
        return review_request(req, {}, Config())

    assert not allowed(review(["developers"]))
    assert allowed(review(["netisolate:platform"]))


def test_unreadable_objects_raise_input_errors_naming_the_field() -> None:
    bad = good_pod()
    bad["spec"]["containers"][0]["securityContext"]["runAsUser"] = "1000"
    with pytest.raises(InputError, match=r"spec\.containers\[0\]\.securityContext\.runAsUser"):
        review_request(request(kind={"kind": "Pod"}, object=bad), {}, Config())
    with pytest.raises(InputError, match="not Deployment"):
        review_request(request(kind={"kind": "Deployment"}, object={}), {}, Config())
    with pytest.raises(InputError, match="object"):
        review_request(request(kind={"kind": "Pod"}), {}, Config())


@pytest.mark.parametrize("uid", [-1, 2**31, 2**64])
def test_uids_the_api_server_would_refuse_are_input_errors(uid: int) -> None:
    bad = good_pod()
    bad["spec"]["containers"][0]["securityContext"]["runAsUser"] = uid
    with pytest.raises(InputError, match=r"securityContext\.runAsUser"):
        parse_pod(bad, "pod")


def test_field_names_the_api_server_ignores_are_ignored_here_too() -> None:
    """Kubernetes drops `run_as_user` (not its field name), so the container runs as the image's
    user: the offline check must not credit it with a UID."""
    pod = good_pod()
    sc = pod["spec"]["containers"][0]["securityContext"]
    sc["run_as_user"] = sc.pop("runAsUser")
    assert ("uid-missing", "deny", "app") in rules(findings(pod))


# --- identity by cgroup (issue 13) ------------------------------------------------------------


def cgroup_pod(identity: str) -> Obj:
    """Two containers sharing UID 1000 and one root container, all otherwise hardened."""
    pod = good_pod()
    pod["metadata"]["annotations"]["netisolate.io/identity"] = identity
    pod["spec"]["containers"] = [hardened("app", 1000), hardened("proxy", 1000), hardened("tool", 0)]
    return pod


def test_under_cgroup_identity_the_uid_rules_do_not_apply() -> None:
    assert findings(cgroup_pod("cgroup")) == []
    assert {r for r, _, _ in rules(findings(cgroup_pod("uid+cgroup")))} == {"uid-shared", "uid-root"}
    assert {r for r, _, _ in rules(findings(cgroup_pod("uid")))} == {"uid-shared", "uid-root"}


@pytest.mark.parametrize(
    "change",
    [
        lambda c: c["securityContext"].update(privileged=True),
        lambda c: c["securityContext"].update(allowPrivilegeEscalation=True),
        lambda c: c["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]}),
    ],
)
def test_under_cgroup_identity_the_hardening_rules_still_deny(change: Callable[[Obj], None]) -> None:
    pod = cgroup_pod("cgroup")
    change(container(pod, 2))
    assert not allowed(findings(pod))


CGROUPFS_PATHS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/", "/sys", "/", "//sys/fs/cgroup/")


@pytest.mark.parametrize("path", [*CGROUPFS_PATHS, "/sys/./fs/cgroup"])
@pytest.mark.parametrize("identity", ["cgroup", "uid+cgroup"])
def test_a_writable_cgroupfs_mount_is_denied(path: str, identity: str) -> None:
    pod = (
        cgroup_pod(identity)
        if identity == "cgroup"
        else mutated(lambda p: p["metadata"]["annotations"].update({"netisolate.io/identity": identity}))
    )
    pod["spec"]["volumes"] = [{"name": "cg", "hostPath": {"path": path}}]
    container(pod)["volumeMounts"] = [{"name": "cg", "mountPath": "/host"}]
    assert ("cgroupfs-mount", "deny", "app") in rules(findings(pod))
    container(pod)["volumeMounts"][0]["readOnly"] = True
    assert "cgroupfs-mount" not in {r for r, _, _ in rules(findings(pod))}


def test_other_hostpaths_and_uid_identity_raise_no_cgroupfs_finding() -> None:
    pod = cgroup_pod("cgroup")
    pod["spec"]["volumes"] = [{"name": "v", "hostPath": {"path": "/sys/fs/cgroupfoo"}}]
    container(pod)["volumeMounts"] = [{"name": "v", "mountPath": "/host"}]
    assert "cgroupfs-mount" not in {r for r, _, _ in rules(findings(pod))}
    uid_pod = good_pod()
    uid_pod["spec"]["volumes"] = [{"name": "cg", "hostPath": {"path": "/sys/fs/cgroup"}}]
    container(uid_pod)["volumeMounts"] = [{"name": "cg", "mountPath": "/host"}]
    assert "cgroupfs-mount" not in {r for r, _, _ in rules(findings(uid_pod))}


def test_an_unknown_identity_is_an_invalid_annotation() -> None:
    pod = cgroup_pod("cgroups")
    assert ("annotation-invalid", "deny", None) in rules(findings(pod))


# --- issue 16: real manifests -----------------------------------------------------------------


def test_uid_shared_is_linear_one_finding_per_container_and_capped() -> None:
    """2,000 containers on one pod-level UID: one finding per container, never one per pair, and
    the answer holds MAX_FINDINGS_PER_RULE of them plus one that counts the rest."""
    pod = good_pod()
    pod["spec"] = {
        "securityContext": {"runAsUser": 4000},
        "containers": [
            {"name": f"c{i}", "image": "app:1", "securityContext": dict(HARDENED)} for i in range(2000)
        ],
    }
    parsed = parse_pod(pod)
    started = time.perf_counter()
    found = [f for f in review_pod(parsed, {}, Config()) if f.rule == "uid-shared"]
    elapsed = time.perf_counter() - started
    assert len(found) == MAX_FINDINGS_PER_RULE + 1
    assert found[0].container == "c1" and "'c0'" in found[0].message
    assert found[1].container == "c2" and "'c0' and 1 more" in found[1].message
    rest = found[-1]
    assert rest.container is None and rest.severity == "deny"
    assert rest.message.startswith(f"{1999 - MAX_FINDINGS_PER_RULE} more findings of this rule")
    assert elapsed < 2.0  # quadratic took 26 s here


def test_the_cap_never_hides_the_container_an_ephemeral_update_adds() -> None:
    old = good_pod()
    old["spec"]["containers"] = [hardened(f"c{i}", 5000 + i) for i in range(30)]
    for c in old["spec"]["containers"]:
        c["securityContext"].pop("allowPrivilegeEscalation")
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox"}]
    req = request(kind={"kind": "Pod"}, subResource="ephemeralcontainers", object=new, oldObject=old)
    found = review_request(req, {}, Config())
    assert ("privilege-escalation", "deny", "debugger") in rules(found)


def test_capabilities_message_when_drop_already_holds_all() -> None:
    pod = mutated(lambda p: container(p)["securityContext"]["capabilities"].update(add=["NET_ADMIN"]))
    (cap,) = [f for f in findings(pod) if f.rule == "capabilities"]
    assert "drop: [ALL]" not in cap.message and "remove ['NET_ADMIN']" in cap.message
    pod = mutated(lambda p: container(p)["securityContext"]["capabilities"].update(drop=[]))
    (cap,) = [f for f in findings(pod) if f.rule == "capabilities"]
    assert "set securityContext.capabilities.drop: [ALL]" in cap.message and "remove" not in cap.message


@pytest.mark.parametrize("grant", ["9", "1-100", "9/udp", "8080, 5-10/tcp"])
def test_a_grant_of_the_sentinel_port_is_invalid(grant: str) -> None:
    pod = mutated(lambda p: p["metadata"]["annotations"].update({"allow.netisolate.io/app": grant}))
    found = findings(pod)
    assert any(f.rule == "annotation-invalid" and "sentinel" in f.message for f in found)
    assert not allowed(found)


@pytest.mark.parametrize(
    "spec_change",
    [
        {"nodeSelector": {"beta.kubernetes.io/os": "windows"}},
        {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                            {
                                "matchExpressions": [
                                    {"key": "kubernetes.io/os", "operator": "In", "values": ["windows"]}
                                ]
                            },
                        ]
                    }
                }
            }
        },
        {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "beta.kubernetes.io/os", "operator": "NotIn", "values": ["linux"]}
                                ]
                            }
                        ]
                    }
                }
            }
        },
    ],
)
def test_windows_by_beta_label_or_required_node_affinity(spec_change: Obj) -> None:
    found = findings(mutated(lambda p: p["spec"].update(spec_change)))
    assert ("platform", "deny", None) in rules(found)


def test_linux_node_affinity_is_not_windows() -> None:
    linux = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}
                            ]
                        }
                    ]
                }
            }
        },
        "nodeSelector": {"kubernetes.io/os": "linux"},
    }
    assert findings(mutated(lambda p: p["spec"].update(linux))) == []


def test_duplicate_container_names_are_denied_at_any_level() -> None:
    pod = mutated(lambda p: p["spec"].update(initContainers=[hardened("app", 3000)]), "off")
    assert rules(findings(pod)) == {("container-name-duplicate", "deny", "app")}


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("istio-proxy", "registry.istio.io/release/proxyv2:1.26.0"),
        ("istio-validation", "registry.istio.io/release/proxyv2:1.26.0"),
        ("daprd", "daprio/dapr:1.14.4"),
        ("daprd", "docker.io/daprio/dapr:1.14.4"),
        ("linkerd-init", "cr.l5d.io/linkerd/proxy-init:v2.4.1"),
        ("linkerd-debug", "cr.l5d.io/linkerd/debug:edge-24.1.1"),
        ("vault-agent-init", "hashicorp/vault:1.17.2"),
    ],
)
def test_current_injector_images_are_known(name: str, image: str) -> None:
    pod = mutated(lambda p: p["spec"]["containers"].append(hardened(name, 1337, image=image)))
    assert {f.rule for f in findings(pod)} == {"sidecar-digest"}


@pytest.mark.parametrize("name", ["istio-validation", "linkerd-init", "vault-agent-init", "linkerd-debug"])
def test_injected_init_containers_get_image_checks(name: str) -> None:
    pod = mutated(lambda p: p["spec"].update(initContainers=[hardened(name, 1337, image="evil.example/x:1")]))
    assert {"sidecar-image", "sidecar-digest"} <= {f.rule for f in findings(pod)}


def test_shared_emptydir_ignores_classic_init_containers() -> None:
    def change(p: Obj, restart: str | None) -> None:
        p["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
        init = hardened("setup", 3000, volumeMounts=[{"name": "work", "mountPath": "/w"}])
        if restart:
            init["restartPolicy"] = restart
        p["spec"]["initContainers"] = [init]
        container(p)["volumeMounts"] = [{"name": "work", "mountPath": "/w"}]

    assert findings(mutated(lambda p: change(p, None))) == []
    native = findings(mutated(lambda p: change(p, "Always")))
    assert ("shared-emptydir", "warn", None) in rules(native)


def test_a_volume_with_no_source_is_an_emptydir() -> None:
    def change(p: Obj) -> None:
        p["spec"]["volumes"] = [{"name": "work"}, {"name": "cfg", "configMap": None}]
        for c in p["spec"]["containers"]:
            c["volumeMounts"] = [{"name": "work", "mountPath": "/w"}, {"name": "cfg", "mountPath": "/c"}]

    found = [f for f in findings(mutated(change)) if f.rule == "shared-emptydir"]
    assert len(found) == 2


@pytest.mark.parametrize(
    "where",
    [
        ("metadata", "annotations"),
        ("metadata", "labels"),
        ("spec", "volumes"),
        ("spec", "initContainers"),
        ("spec", "nodeSelector"),
        ("spec", "securityContext"),
        ("spec", "containers", 0, "ports"),
        ("spec", "containers", 0, "command"),
        ("spec", "containers", 0, "volumeMounts"),
        ("spec", "containers", 0, "securityContext", "capabilities", "add"),
    ],
)
def test_null_is_absent(where: tuple[str | int, ...]) -> None:
    pod = good_pod()
    pod["metadata"]["labels"] = {"app": "web"}
    pod["spec"]["securityContext"] = {"runAsNonRoot": True}
    node: Any = pod
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = None
    assert findings(pod) == []  # (with no annotations the pod is not isolated: nothing to find either)


def test_null_values_in_string_maps_are_empty_strings() -> None:
    pod = good_pod()
    pod["metadata"]["annotations"]["sidecar.istio.io/inject"] = None
    pod["metadata"]["labels"] = {"tier": None}
    parsed = parse_pod(pod)
    assert parsed.metadata.annotations["sidecar.istio.io/inject"] == ""
    assert parsed.metadata.labels == {"tier": ""}
