"""Presets (`netisolate.io/preset`): what each expands to, that the expansion is rendered and
checked like hand-written grants, and that a name nobody knows opens nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from netisolate.admission import review_pod
from netisolate.cli import main
from netisolate.config import Config
from netisolate.model import parse_pod
from netisolate.policy import Level, format_grants, pod_policy, preset_grants
from netisolate.presets import PRESETS

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mesh-preset.yaml"
HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def pod(preset: str, sidecar: str | None, extra: dict[str, str] | None = None) -> Any:
    containers: list[dict[str, Any]] = [
        {"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 5353, "protocol": "UDP"}]},
        {"name": "shipper"},
    ]
    if sidecar:
        containers.append({"name": sidecar})
    for uid, c in enumerate(containers, 1000):
        c["securityContext"] = {"runAsUser": uid, **HARDENED}
    annotations = {"netisolate.io/isolation": "enforce", "netisolate.io/preset": preset, **(extra or {})}
    return parse_pod(
        {
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {
                "initContainers": [{"name": "init", "securityContext": {"runAsUser": 999, **HARDENED}}],
                "containers": containers,
            },
        }
    )


EXPANDED = {
    "istio": {
        "app": "15001,15053,15053/udp",
        "shipper": "15001,15053,15053/udp",
        "istio-proxy": "8080,15000,15090,5353/udp",
    },
    "linkerd": {"app": "4140", "shipper": "4140", "linkerd-proxy": "4191,8080,5353/udp"},
    "dapr": {"app": "3500,50001", "shipper": "3500,50001", "daprd": "8080,5353/udp"},
}


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_grants_the_documented_ports(name: str) -> None:
    grants, problems = preset_grants(pod(name, PRESETS[name].sidecar))
    assert problems == []
    assert {c: format_grants(r) for c, r in grants.items()} == EXPANDED[name]
    assert "init" not in grants, "classic init containers run alone: a preset grants them nothing"


def test_presets_combine_with_each_other_and_with_hand_written_grants() -> None:
    both = pod("istio, dapr", "istio-proxy", {"allow.netisolate.io/app": "9999"})
    both.spec.containers.append(parse_pod({"spec": {"containers": [{"name": "daprd"}]}}).spec.containers[0])
    policy = {c.name: format_grants(c.grants) for c in pod_policy(both, {}).containers}
    assert policy["app"] == "3500,9999,15001,15053,50001,15053/udp"
    assert policy["daprd"].startswith("8080,15001")  # daprd is a container the mesh captures too


def test_without_its_sidecar_a_preset_grants_nothing() -> None:
    assert preset_grants(pod("istio", None)) == ({}, [])


def test_an_unknown_preset_fails_closed_and_is_denied() -> None:
    bad = pod("istio, consul", "istio-proxy", {"allow.netisolate.io/app": "9999"})
    policy = pod_policy(bad, {})
    assert policy.level is Level.ENFORCE and all(c.grants == () for c in policy.containers)
    assert "'consul' is not a preset" in policy.problems[0]
    findings = review_pod(bad, {}, Config())
    assert [(f.rule, f.severity) for f in findings if "consul" in f.message] == [
        ("annotation-invalid", "deny")
    ]


def test_preset_grants_are_checked_like_hand_written_ones() -> None:
    """grant-port-undeclared: the app is granted 15001 and friends, which nobody declares here."""
    findings = review_pod(pod("istio", "istio-proxy"), {}, Config())
    undeclared = {
        (f.container, f.message.split(",")[0]) for f in findings if f.rule == "grant-port-undeclared"
    }
    assert ("app", "is granted 15001") in undeclared
    assert not [f for f in review_pod(parse_pod(yaml.safe_load(EXAMPLE.read_text())), {}, Config())]


def test_render_lists_the_presets_and_what_one_grants(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(f"netisolate.io/preset: {name}" in listed for name in PRESETS)
    assert main(["render", "-f", str(EXAMPLE)]) == 0
    assert "# netisolate.io/preset grants cart: 15001,15053,15053/udp" in capsys.readouterr().out
    assert main(["render"]) == 2
