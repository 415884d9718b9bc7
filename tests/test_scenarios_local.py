"""The shared scenarios (netisolate/scenarios/, also run on kind by e2e/) on the local node harness:
the same pods and the same expected matrix, both backends, every loopback and pod address."""

from __future__ import annotations

import pytest

from netisolate import scenarios
from netisolate.backends import select_backend
from netisolate.localpod import ALL_ADDRESSES, LocalPod, matrix
from netisolate.policy import pod_policy
from netisolate.rules import Settings, build_ruleset, without_cgroups

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("backend_name", ["nftables", "iptables"])
@pytest.mark.parametrize("name", scenarios.names())
def test_scenario(name: str, backend_name: str) -> None:
    """Cgroup scenarios under iptables get what the agent loads there: no grants, all blocked."""
    scenario = scenarios.load(name)
    policy, settings = pod_policy(scenario.parsed_pod(), scenario.namespace_labels), Settings()
    fail_closed = policy.identity.by_cgroup and backend_name == "iptables"
    if fail_closed:
        policy, settings = without_cgroups(policy, settings, "the iptables backend")
    with LocalPod(scenario.parsed_pod()) as pod:
        assert pod.ns is not None
        for container, ports in scenario.listeners.items():
            pod.listen(container, ports)
        seen = pod.cgroups() if pod.cgroup and not fail_closed else None
        ruleset = build_ruleset(policy, settings, cgroups=seen)
        assert ruleset is not None
        select_backend(backend_name).apply(pod.ns, ruleset)
        got = matrix(pod, scenario.listeners, clients=list(scenario.expect_open))
    wrong = {}
    for (client, target), results in got.items():
        opened = [r == "open" for r in results]
        expected = "blocked" if fail_closed else scenario.expected(client, target)
        if opened != [expected == "open"] * len(ALL_ADDRESSES):
            wrong[f"{client}->{target}"] = (expected, results)
    assert not wrong, wrong


def test_scenarios_are_well_formed() -> None:
    assert {"app-proxy-rogue", "namespace-label", "audit-mode", "udp-grant"} <= set(scenarios.names())
    for name in scenarios.names():
        scenario = scenarios.load(name)
        assert scenario.name == name
        assert scenario.expect_open, "a scenario must say who may reach what"
