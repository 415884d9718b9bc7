"""daemonset/ as a cluster would receive it: rendered by kustomize, validated against the Kubernetes
schemas of 1.29 through the newest that kubernetes-validate ships, and held to our own rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from netisolate.cli import build_parser, main
from netisolate.config import DEFAULT_SEVERITIES, load_config

ROOT = Path(__file__).parent.parent
VERSIONS = [v for v in all_versions() if tuple(int(p) for p in v.split(".")[:2]) >= (1, 29)]


@cache
def rendered(target: str) -> tuple[dict[str, Any], ...]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is missing: it renders daemonset/ (kubectl >= 1.27 ships kustomize); install it")
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / target)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def find(kind: str, name: str, target: str = "daemonset") -> dict[str, Any]:
    return next(o for o in rendered(target) if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("target", ["daemonset", "daemonset/overlays/cert-manager"])
def test_every_object_validates_against_every_schema_version(target: str) -> None:
    assert len(VERSIONS) >= 5, VERSIONS
    checked = 0
    for obj in rendered(target):
        if obj["apiVersion"].startswith("cert-manager.io/"):
            continue  # a CRD: not in the Kubernetes schemas
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked >= 14


def test_agent_daemonset_holds_only_what_it_needs() -> None:
    ds = find("DaemonSet", "netisolate-agent")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork")
    assert sc.get("privileged") is False
    assert set(sc["capabilities"]["add"]) == set(AGENT_CAPABILITIES)
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    assert {"operator": "Exists"} in pod["tolerations"]
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {
        "cni-conf": "/etc/cni/net.d",
        "cni-bin": "/opt/cni/bin",
        "cni-socket": "/var/run/netisolate",
        "cgroup": "/sys/fs/cgroup",
    }
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["cgroup"]["readOnly"] is True  # cgroup identity reads the node's cgroups, never writes


def test_agent_daemonset_serves_the_cni_plugin_where_the_host_finds_it() -> None:
    """The paths the agent is given are mounts of the node's CNI dirs, and the socket it writes
    into the conflist (which the runtime's plugin dials on the host) is the same path on both sides."""
    pod = find("DaemonSet", "netisolate-agent")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in agent["args"] if a.startswith("--cni-"))
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host[mounts[args["cni-conf-dir"]]] == "/etc/cni/net.d"
    assert host[mounts[args["cni-bin-dir"]]] == "/opt/cni/bin"
    socket_dir = args["cni-socket"].rsplit("/", 1)[0]
    assert host[mounts[socket_dir]] == socket_dir, "the plugin dials the host path the agent listens on"
    exempt = set(args["cni-exempt-namespaces"].split(","))
    assert {"kube-system", find("Namespace", "netisolate-system")["metadata"]["name"]} <= exempt
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    parsed = build_parser().parse_args(agent["args"])
    assert parsed.cni_conf_dir is not None and parsed.cni_bin_dir is not None


AGENT_CAPABILITIES = ("NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE")


@pytest.mark.kernel
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_agents_capabilities_are_enough_and_each_is_needed(backend: str, tmp_path: Path) -> None:
    """Enforce and verify for real with only the DaemonSet's capabilities (as its UID 0 has them);
    then without the one the backend cannot do without."""
    from netisolate import scenarios
    from netisolate.localpod import LocalPod

    pod = scenarios.load("app-proxy-rogue")
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod.pod))

    def run(command: str, capabilities: tuple[str, ...], netns: str) -> subprocess.CompletedProcess[str]:
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
        argv = [shutil.which("setpriv") or "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all"]
        argv += [sys.executable, "-m", "netisolate", command, "-f", str(manifest), "--netns", netns]
        return subprocess.run([*argv, "--backend", backend], capture_output=True, text=True, check=False)

    with LocalPod(pod.parsed_pod()) as local:
        assert local.ns is not None
        for command in ("enforce", "verify"):
            result = run(command, AGENT_CAPABILITIES, local.ns.path)
            assert result.returncode == 0, result.stderr
        needed = "NET_RAW" if backend == "iptables" else "NET_ADMIN"
        fewer = tuple(c for c in AGENT_CAPABILITIES if c != needed)
        assert run("enforce", fewer, local.ns.path).returncode == 1


def test_agent_rbac_reads_pods_and_namespaces_and_writes_events_only() -> None:
    rules = find("ClusterRole", "netisolate-agent")["rules"]
    granted = {
        (group, resource, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }
    reads = {("", res, verb) for res in ("pods", "namespaces") for verb in ("get", "list", "watch")}
    writes = {(group, "events", verb) for group in ("", "events.k8s.io") for verb in ("create", "patch")}
    assert granted == reads | writes


def test_webhook_configuration() -> None:
    vwc = find("ValidatingWebhookConfiguration", "netisolate")
    paths = {}
    for hook in vwc["webhooks"]:
        assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] <= 10 and hook["admissionReviewVersions"] == ["v1"]
        excluded = hook["namespaceSelector"]["matchExpressions"][0]
        assert excluded["operator"] == "NotIn" and set(excluded["values"]) == {
            "kube-system",
            "netisolate-system",
        }
        (rule,) = hook["rules"]
        paths[hook["clientConfig"]["service"]["path"]] = (tuple(rule["resources"]), tuple(rule["operations"]))
    assert paths == {
        "/validate/pods": (("pods",), ("CREATE",)),
        "/validate/pods-ephemeralcontainers": (("pods/ephemeralcontainers",), ("UPDATE",)),
        "/validate/namespaces": (("namespaces",), ("CREATE", "UPDATE")),
    }
    from netisolate.webhook.review import PATHS

    assert set(paths) == set(PATHS), "the server serves exactly the configured paths"


def test_webhook_rbac_is_restricted_by_resource_names() -> None:
    role = find("Role", "netisolate-webhook-tls")["rules"]
    assert role[0]["resourceNames"] == ["netisolate-webhook-tls"] and role[0]["verbs"] == ["get"]
    assert role[1]["verbs"] == ["create"] and "resourceNames" not in role[1]
    cluster = find("ClusterRole", "netisolate-webhook")["rules"]
    assert cluster[0]["resourceNames"] == ["netisolate"] and cluster[0]["verbs"] == ["get", "patch"]


def test_webhook_deployment_is_ha_and_restricted() -> None:
    deploy = find("Deployment", "netisolate-webhook")
    assert deploy["spec"]["replicas"] == 2
    assert find("PodDisruptionBudget", "netisolate-webhook")["spec"]["minAvailable"] == 1
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    quota = find("ResourceQuota", "netisolate-critical-pods")["spec"]["scopeSelector"]["matchExpressions"][0]
    assert set(quota["values"]) == {"system-node-critical", "system-cluster-critical"}


def test_cert_manager_overlay() -> None:
    target = "daemonset/overlays/cert-manager"
    vwc = find("ValidatingWebhookConfiguration", "netisolate", target)
    assert (
        vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        == "netisolate-system/netisolate-webhook"
    )
    args = find("Deployment", "netisolate-webhook", target)["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert "--no-bootstrap-tls" in args and "--tls-cert-file=/tls/tls.crt" in args
    # the caBundle is a CA of our own that outlives the serving certificate's renewals
    serving = find("Certificate", "netisolate-webhook", target)["spec"]
    issuer = find("Issuer", serving["issuerRef"]["name"], target)["spec"]
    assert find("Certificate", "netisolate-webhook-ca", target)["spec"]["isCA"] is True
    assert issuer == {"ca": {"secretName": "netisolate-webhook-ca"}}
    # cert-manager's pods never wait for this webhook, and nothing bootstraps: no Secret, no patching
    for hook in vwc["webhooks"]:
        assert "cert-manager" in hook["namespaceSelector"]["matchExpressions"][0]["values"]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered(target)}
    assert ("Role", "netisolate-webhook-tls") not in kinds
    cluster = find("ClusterRole", "netisolate-webhook", target)["rules"]
    assert all("validatingwebhookconfigurations" not in rule["resources"] for rule in cluster)


def test_configmap_matches_the_config_model(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(find("ConfigMap", "netisolate-config")["data"]["config.yaml"])
    shipped, defaults = load_config(str(path)), load_config(None)
    assert shipped.model_dump(exclude={"severities"}) == defaults.model_dump(exclude={"severities"})
    assert {r: shipped.severity(r) for r in DEFAULT_SEVERITIES} == {
        r: defaults.severity(r) for r in DEFAULT_SEVERITIES
    }


def _pod_file(tmp_path: Path, kind: str, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(find(kind, name)))
    return str(path)


def test_the_webhook_pod_passes_our_own_check(tmp_path: Path) -> None:
    path = _pod_file(tmp_path, "Deployment", "netisolate-webhook")
    assert main(["check", "-f", path, "--namespace-labels", "netisolate.io/isolation=enforce"]) == 0


def test_the_agent_pod_is_the_documented_exception(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _pod_file(tmp_path, "DaemonSet", "netisolate-agent")
    assert main(["check", "-f", path, "--namespace-labels", "netisolate.io/isolation=enforce"]) == 1
    out = capsys.readouterr().out
    assert {"uid-root", "capabilities", "host-namespaces"} <= {
        line.split()[1] for line in out.splitlines()[1:]
    }
