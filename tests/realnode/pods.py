"""The shared scenarios' pods (netisolate/scenarios/) placed on the real node, and how a measured
matrix compares with a scenario's expectation — the same comparison the local harness makes."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from netisolate import scenarios
from netisolate.policy import pod_policy

NODE_NAME = "real-node"  # the kubelet stand-in's node: pods bound to it run on the real node


def scenario_pod(name: str, pod_name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    """The scenario's pod, with a fresh UID, bound to NODE_NAME."""
    manifest = copy.deepcopy(scenarios.load(name).pod)
    meta = manifest["metadata"]
    meta["uid"] = str(uuid.uuid4())
    meta["name"] = pod_name or meta["name"]
    meta["namespace"] = namespace or meta.get("namespace") or "default"
    manifest["spec"]["nodeName"] = NODE_NAME
    return manifest


def fails_closed(scenario: scenarios.Scenario, backend: str) -> bool:
    """Cgroup identity under iptables, which has none: the agent loads no grants, all blocked."""
    policy = pod_policy(scenario.parsed_pod(), scenario.namespace_labels)
    return policy.identity.by_cgroup and backend == "iptables"


def mismatches(
    scenario: scenarios.Scenario, got: dict[tuple[str, str], list[str]], fail_closed: bool = False
) -> dict[str, tuple[str, list[str]]]:
    """{"client->target": (expected, results per address)} for every cell that is not as expected
    at every address; `fail_closed`: the pod got no grants (cgroup identity where the backend has
    none), so every cell is expected blocked."""
    wrong = {}
    for (client, target), results in got.items():
        expected = "blocked" if fail_closed else scenario.expected(client, target)
        if results != [expected] * len(results):
            wrong[f"{client}->{target}"] = (expected, results)
    return wrong
