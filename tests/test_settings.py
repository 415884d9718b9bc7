"""Every knob is checked once, in one place, and has an effect: port and duration flags all go
through the same argparse types, the config holds only keys something reads, and the agent's
flags reach the agent."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netisolate.cli import build_parser, main
from netisolate.commands import common
from netisolate.config import Config, load_config
from netisolate.model import InputError

PACKAGE = Path(__file__).resolve().parent.parent / "netisolate"


def _options() -> list[tuple[str, argparse.Action]]:
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action) for name, sub in subs.choices.items() for action in sub._actions]


def test_every_port_flag_is_validated_by_the_one_port_type() -> None:
    ports = [(name, a) for name, a in _options() if a.dest.endswith("port")]
    assert {(name, a.option_strings[-1]) for name, a in ports} >= {
        ("agent", "--sentinel-port"),
        ("gate", "--port"),
        ("render", "--sentinel-port"),
        ("enforce", "--sentinel-port"),
        ("agent", "--metrics-port"),
        ("status", "--metrics-port"),
    }
    assert all(a.type is common.port for _, a in ports), [
        (n, a.dest) for n, a in ports if a.type is not common.port
    ]


def test_every_duration_flag_is_validated_by_the_one_seconds_type() -> None:
    durations = [(name, a) for name, a in _options() if a.metavar == "SECONDS"]
    assert {(name, a.option_strings[-1]) for name, a in durations} >= {
        ("agent", "--verify-interval"),
        ("gate", "--timeout"),
    }
    assert all(a.type is common.seconds for _, a in durations)


@pytest.mark.parametrize(
    "argv",
    [
        ["gate", "--port", "0"],
        ["gate", "--port", "65536"],
        ["agent", "--sentinel-port", "x"],
        ["agent", "--sentinel-port", "-9"],
        ["agent", "--metrics-port", "70000"],
        ["status", "--metrics-port", "0"],
        ["render", "-f", "-", "--sentinel-port", "0"],
        ["gate", "--timeout", "0"],
        ["agent", "--verify-interval", "-1"],
        ["agent", "--verify-interval", "nan"],
    ],
)
def test_bad_values_are_refused_before_anything_runs(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert argv[-2] in err and ("1 to 65535" in err or "above 0" in err), err


def test_every_config_key_is_read_by_something() -> None:
    """A key in the shipped ConfigMap that nothing reads would be a setting without effect."""
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    unread = [name for name in Config.model_fields if not re.search(rf"\.{name}\b", sources)]
    assert unread == []


def test_a_moved_config_key_says_where_the_setting_lives(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gateRequired: true\nsentinelPort: 9\n")
    with pytest.raises(InputError, match=r"sentinelPort .*--sentinel-port"):
        load_config(path)


_SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_KEYS = st.sampled_from([*(f.alias or n for n, f in Config.model_fields.items()), "sentinelPort", "x"])
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(_KEYS, _VALUES, max_size=4) | _VALUES)
def test_a_config_file_is_loaded_or_refused_with_a_reason(tmp_path: Path, data: object) -> None:
    """Whatever the ConfigMap holds, the webhook and the audit get a Config or an InputError that
    names the file: never a traceback (a mapping, a list or a scalar where a mapping belongs)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path)
    except InputError as err:
        assert str(path) in str(err)


def test_agent_flags_reach_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """--host-netns chose the backend, but the agent itself opened /proc/1/ns/net regardless."""
    import netisolate.agent.node
    import netisolate.commands.agent
    import netisolate.kube

    seen: dict[str, Any] = {}

    class Agent:
        def __init__(self, node: str, backend: object, settings: object, core: object, **kwargs: Any) -> None:
            seen.update(kwargs, node=node, settings=settings)
            self.stop = object()

        def run(self, metrics_port: int) -> None:
            seen["metrics_port"] = metrics_port

    monkeypatch.setattr(netisolate.agent.node, "Agent", Agent)
    monkeypatch.setattr(netisolate.kube, "api_client", lambda kubeconfig, user_agent: None)
    monkeypatch.setattr(netisolate.commands.agent, "select_backend", lambda name, host: object())
    monkeypatch.setattr(netisolate.commands.agent, "setup_logging", lambda: None)
    monkeypatch.setattr("signal.signal", lambda *_: None)
    argv = ["agent", "--node-name", "n1", "--host-netns", "/proc/self/ns/net", "--sentinel-port", "7000"]
    assert main([*argv, "--metrics-port", "9100", "--verify-interval", "5", "--deny-port-forward"]) == 0
    assert seen["host_netns"] == "/proc/self/ns/net" and seen["verify_interval"] == 5.0
    assert seen["metrics_port"] == 9100 and seen["node"] == "n1"
    assert seen["settings"].sentinel_port == 7000 and not seen["settings"].allow_root
