"""`netisolate check` on real published manifests (tests/corpus/README.md says where each came from):
whole install files, injectors' golden outputs, Pod Security Admission's fixtures, the docs' examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netisolate.cli import main

CORPUS = Path(__file__).parent / "corpus"
ENFORCE = ("--namespace-labels", "netisolate.io/isolation=enforce")
# The one invalid file in the corpus (the API server refuses it too), and the field it names.
INVALID = {"k8s-docs/pod-with-node-affinity.yaml": "requiredDuringSchedulingIgnoredDuringExecution"}


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["check", *args, "-o", "json"])
    return code, json.loads(capsys.readouterr().out)


def manifests() -> list[str]:
    return sorted(
        str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.suffix in (".yaml", ".yml", ".json")
    )


@pytest.mark.parametrize("name", manifests())
def test_every_real_file_is_read_and_judged(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    for labels in ((), ENFORCE):
        code, result = check(capsys, "-f", str(CORPUS / name), *labels)
        if name in INVALID:
            assert code == 2 and INVALID[name] in result["errors"][0]["message"]
            continue
        assert code in (0, 1) and result["errors"] == [], result["errors"]
        assert result["findings"] or result["skipped"] or code == 0
        assert (code == 0) == result["allowed"]


@pytest.mark.parametrize(
    ("install", "code", "judged", "skipped"),
    [
        (
            "argo-cd-install.yaml",
            1,  # its containers share the image's UID: uid-missing
            {
                f"Deployment argocd-{n}"
                for n in (
                    "applicationset-controller",
                    "dex-server",
                    "notifications-controller",
                    "redis",
                    "repo-server",
                    "server",
                )
            }
            | {"StatefulSet argocd-application-controller"},
            {
                "CustomResourceDefinition applications.argoproj.io",
                "Service argocd-server",
                "ConfigMap argocd-cm",
            },
        ),
        (
            "ingress-nginx-cloud-deploy.yaml",
            0,  # runAsUser 101 / 65532, drop ALL, no escalation: it would run isolated as it is
            {
                "Namespace ingress-nginx",
                "Deployment ingress-nginx/ingress-nginx-controller",
                "Job ingress-nginx/ingress-nginx-admission-create",
                "Job ingress-nginx/ingress-nginx-admission-patch",
            },
            {
                "ValidatingWebhookConfiguration ingress-nginx-admission",
                "Service ingress-nginx/ingress-nginx-controller",
            },
        ),
        (
            "kube-flannel.yml",
            1,
            {"Namespace kube-flannel", "DaemonSet kube-flannel/kube-flannel-ds"},
            {"ClusterRole flannel", "ConfigMap kube-flannel/kube-flannel-cfg"},
        ),
    ],
)
def test_install_files_judge_their_workloads_and_name_the_rest(
    install: str, code: int, judged: set[str], skipped: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code, result = check(capsys, "-f", str(CORPUS / "installs" / install), *ENFORCE)
    assert exit_code == code
    assert {f["object"] for f in result["findings"]} <= judged
    assert skipped <= {s["object"] for s in result["skipped"]}
    assert all(s["reason"] == "carries no pod" for s in result["skipped"])


def test_flannel_is_seen_for_what_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    _, result = check(capsys, "-f", str(CORPUS / "installs" / "kube-flannel.yml"), *ENFORCE)
    found = {(f["rule"], f["container"]) for f in result["findings"]}
    assert ("host-namespaces", None) in found  # hostNetwork
    assert ("capabilities", "kube-flannel") in found  # NET_ADMIN, NET_RAW
    assert any(rule == "hostpath" for rule, _ in found)


# PSA restricted fixtures that fail on a field netisolate's isolation rules also hold, and the rule.
CLAIMED = {
    "allowprivilegeescalation": "privilege-escalation",
    "capabilities_restricted": "capabilities",
    "capabilities_baseline": "capabilities",
    "hostnamespaces": "host-namespaces",
    "hostports": "host-namespaces",
    "privileged": "privileged",
    "runasuser": "uid-root",
    "windowshostprocess": "platform",
}
PSA_FAIL = sorted(
    p for p in (CORPUS / "psa" / "restricted").glob("*/fail/*.yaml") if p.stem.rstrip("0123456789") in CLAIMED
)


@pytest.mark.parametrize("fixture", PSA_FAIL, ids=lambda p: p.name)
def test_at_least_as_strict_as_psa_restricted_on_the_fields_it_claims(
    fixture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = check(capsys, "-f", str(fixture), *ENFORCE)
    assert code == 1
    assert CLAIMED[fixture.stem.rstrip("0123456789")] in {
        f["rule"] for f in result["findings"] if f["severity"] == "deny"
    }


def test_the_injectors_golden_files_are_all_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    for injector, minimum in (("istio", 100), ("linkerd", 30)):
        code, result = check(capsys, "-f", str(CORPUS / injector), *ENFORCE)
        assert code == 1 and result["errors"] == []
        objects = {f["object"] for f in result["findings"]}
        assert len(objects) >= minimum
        proxy = "istio-proxy" if injector == "istio" else "linkerd-proxy"
        assert any(f["container"] == proxy for f in result["findings"])
