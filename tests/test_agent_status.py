"""What the agent says about its pods, through one set of states: the reconciler's, the
`netisolate_pods{state}` gauge, the HTTP endpoints and `netisolate status`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY

from netisolate.agent import endpoints, report
from netisolate.agent.report import record_states
from netisolate.agent.state import NodeStatus, PodState, PodStatus
from netisolate.learning import Observed as LearnedFlow


@dataclass
class Observed:
    healthy: bool = True
    ready: bool = False
    pods: list[PodStatus] = field(default_factory=list)

    def alive(self) -> bool:
        return self.healthy

    def unready(self) -> str:
        return "" if self.ready else "start-up verification running"

    def status(self) -> NodeStatus:
        return {
            "node": "node-a",
            "ready": self.ready,
            "unready": self.unready(),
            "backend": "fake",
            "pods": [p.to_json() for p in self.pods],
        }


def _netisolate(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "netisolate", *args], capture_output=True, text=True, check=True
    ).stdout


def _row(name: str, state: PodState, **extra: Any) -> PodStatus:
    return PodStatus(pod=f"shop/{name}", namespace="shop", name=name, uid=f"uid-{name}", state=state, **extra)


@pytest.mark.parametrize(
    ("path", "observed", "code", "body"),
    [
        ("/healthz", Observed(healthy=True), 200, b"ok"),
        ("/healthz", Observed(healthy=False), 503, b"timer loop stalled"),
        ("/readyz", Observed(ready=True), 200, b"ok"),
        ("/readyz", Observed(ready=False), 503, b"start-up verification running"),
        ("/nothing", Observed(), 404, b"not found"),
    ],
)
def test_probes_answer_what_they_see(path: str, observed: Observed, code: int, body: bytes) -> None:
    assert endpoints.answer(observed, path)[:2] == (code, body)


def test_status_rows_keep_their_json_shape() -> None:
    """`netisolate status -o json` and anything that reads /status depend on these keys."""
    row = _row("web", PodState.HOST_NETWORK, detail="shares", netns=4026531840)
    assert dict(row.to_json()) == {
        "pod": "shop/web",
        "uid": "uid-web",
        "state": "host-network",
        "detail": "shares",
        "netns": "4026531840",
        "namespace": "shop",
        "name": "web",
        "owner": "",
        "observed": [],
        "suggest": {},
    }
    assert _row("new", PodState.PENDING).to_json()["netns"] == ""
    seen = _row(
        "web", PodState.AUDIT, observed=((LearnedFlow("app", "udp", 53), 4),), suggest={"a": "53/udp"}
    )
    assert seen.to_json()["observed"] == [
        {"container": "app", "protocol": "udp", "port": 53, "connections": 4}
    ]


def test_observed_connections_are_a_capped_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "OBSERVED_SERIES_CAP", 2)
    flows = tuple((LearnedFlow("app", "tcp", port), port) for port in (1, 2, 3))
    report.record_observed([_row("a", PodState.AUDIT, observed=flows)])
    value = REGISTRY.get_sample_value
    labels = {"namespace": "shop", "pod": "a", "container": "app", "protocol": "tcp"}
    assert [value("netisolate_observed_connections", {**labels, "port": str(p)}) for p in (1, 2, 3)] == [
        1,
        2,
        None,
    ]
    assert value("netisolate_observed_connections_not_exported") == 1
    report.record_observed([])  # granted since, or gone: the series goes
    assert value("netisolate_observed_connections", {**labels, "port": "1"}) is None


def test_every_state_is_a_gauge_value_zero_included() -> None:
    record_states([_row("a", PodState.ENFORCE, refused={"1002": 7}), _row("b", PodState.ENFORCE)])
    record_states([_row("a", PodState.FAILED, refused={"1002": 9})])  # the next round: both moved on
    value = REGISTRY.get_sample_value
    assert {s: value("netisolate_pods", {"state": s.value}) for s in PodState} == {
        **{s: 0.0 for s in PodState},
        PodState.FAILED: 1.0,
    }
    assert value("netisolate_refused_packets", {"namespace": "shop", "pod": "a", "containers": "1002"}) == 9


def test_status_command_prints_what_the_endpoint_serves() -> None:
    observed = Observed(
        ready=True, pods=[_row("web", PodState.AUDIT, detail="adopted"), _row("db", PodState.OFF)]
    )
    server = endpoints.serve(observed, 0, "127.0.0.1")
    try:
        port = server.server_address[1]
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=5)
        assert missing.value.code == 404
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as metrics:
            assert b"netisolate_pods" in metrics.read()
        out, as_json = (
            _netisolate("status", "--metrics-port", str(port), *how) for how in ([], ["-o", "json"])
        )
    finally:
        server.shutdown()
    assert out.splitlines()[0] == "node node-a (fake, ready)"
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["audit", "shop/web"], ["off", "shop/db"]]
    assert json.loads(as_json) == observed.status()


def test_status_help_names_every_state() -> None:
    out = _netisolate("status", "--help")
    assert all(f"  {state.value} " in out for state in PodState)
