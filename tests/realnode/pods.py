"""The shared scenarios' pods (netisolate/scenarios/) placed on the real node, and how a measured
matrix compares with a scenario's expectation — the same comparison the local harness makes."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from netisolate import scenarios

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


def mismatches(
    scenario: scenarios.Scenario, got: dict[tuple[str, str], list[str]]
) -> dict[str, tuple[str, list[str]]]:
    """{"client->target": (expected, results per address)} for every cell that is not as expected
    at every address."""
    wrong = {}
    for (client, target), results in got.items():
        expected = scenario.expected(client, target)
        if results != [expected] * len(results):
            wrong[f"{client}->{target}"] = (expected, results)
    return wrong
