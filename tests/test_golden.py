"""Golden files: what `netisolate render` prints for every scenario and example, both backends, so a
change to the rules shows as a reviewable diff of tests/golden/.

After a change that is meant to alter the rules, regenerate and review the diff:

    NETISOLATE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py && git diff tests/golden
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from netisolate import scenarios
from netisolate.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("NETISOLATE_UPDATE_GOLDEN") == "1"
BACKENDS = {"nftables": "nft", "iptables": "iptables"}
CGROUP_VARIANTS = ("example-app-with-proxy", "scenario-app-proxy-rogue", "scenario-udp-grant")


def _sources(tmp: Path) -> dict[str, list[str]]:
    """`render` arguments per golden name: every example file, and every scenario's pod with its
    namespace's labels."""
    sources = {f"example-{p.stem}": ["-f", str(p)] for p in sorted((ROOT / "examples").glob("*.yaml"))}
    for name in scenarios.names():
        scenario = scenarios.load(name)
        manifest = tmp / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump(scenario.pod))
        labels = ",".join(f"{k}={v}" for k, v in scenario.namespace_labels.items())
        sources[f"scenario-{name}"] = ["-f", str(manifest), "--namespace-labels", labels]
    for name in CGROUP_VARIANTS:  # the same pods known by their cgroups (the shared-uid scenario is)
        for identity in ("cgroup", "uid+cgroup"):
            sources[f"{name}@{identity}"] = [*sources[name], "--identity", identity]
    return sources


def _render(args: list[str], backend: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["render", *args, "--backend", backend]) == 0
    return capsys.readouterr().out


def test_every_scenario_and_example_has_its_golden_files(tmp_path: Path) -> None:
    expected = {f"{name}.{suffix}" for name in _sources(tmp_path) for suffix in BACKENDS.values()}
    assert {p.name for p in GOLDEN.iterdir()} == expected, (
        "stale or missing golden files: regenerate them (see this module's docstring)"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rendered_rules_match_the_golden_files(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if UPDATE:
        for stale in GOLDEN.glob(f"*.{BACKENDS[backend]}"):
            stale.unlink()
    GOLDEN.mkdir(exist_ok=True)
    for name, args in _sources(tmp_path).items():
        rendered = _render(args, backend, capsys).replace(str(tmp_path) + "/", "")
        golden = GOLDEN / f"{name}.{BACKENDS[backend]}"
        if UPDATE:
            golden.write_text(rendered)
        assert golden.exists(), f"{golden.name} is missing: regenerate (see this module's docstring)"
        assert rendered == golden.read_text(), f"{golden.name} differs: review, then regenerate"
