"""Learning, end to end on real namespaces and processes: a pod at audit makes connections, the
agent records them (kernel set, /status, metric, Event), `netisolate suggest` prints the grants,
and once they are applied and the pod switched to enforce exactly those connections stay open."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import REGISTRY

from netisolate.agent import endpoints
from netisolate.learning import EVENT_REASON, Observed, commands, learned, parse_summary, suggested, summary
from netisolate.model import parse_pod
from netisolate.policy import PortRange, pod_policy
from netisolate.rules import Settings, build_ruleset
from tests.agent_harness import SimulatedPod, close_all, pod_manifest
from tests.agent_process import kubeconfig
from tests.test_agent import NODE, Running, core, create, events, patch, until
from tests.test_cgroup_identity import SEEN, shared_uid_pod

__all__ = ["core"]  # the fixture, shared with test_agent

# --- the pure part -------------------------------------------------------------------------------

POD = parse_pod(
    {
        "metadata": {
            "name": "p",
            "annotations": {"netisolate.io/isolation": "audit", "allow.netisolate.io/app": "15001"},
        },
        "spec": {
            "containers": [
                {"name": "app", "securityContext": {"runAsUser": 1000}},
                {"name": "proxy", "securityContext": {"runAsUser": 1001}},
            ]
        },
    }
)
_RS = build_ruleset(pod_policy(POD, {}), Settings())
assert _RS is not None
RS = _RS


def test_what_the_kernel_saw_is_kept_per_container_bounded_and_without_what_is_granted() -> None:
    seen = [
        ("1000", "tcp", 15002, 3),
        ("1000", "tcp", 15001, 1),
        ("1001", "udp", 53, 2),
        ("4242", "tcp", 1, 9),
    ]
    kept = learned(RS, {}, seen, cap=10)
    # 15001 is granted (recorded before the grant came), 4242 is nobody's UID
    assert kept == {Observed("app", "tcp", 15002): 3, Observed("proxy", "udp", 53): 2}
    # the counter restarts when the kernel's element expires: the highest count stays
    assert learned(RS, kept, [("1000", "tcp", 15002, 1)], cap=10)[Observed("app", "tcp", 15002)] == 3
    assert len(learned(RS, kept, [("1000", "tcp", p, 1) for p in range(20000, 20100)], cap=5)) == 5


@pytest.mark.parametrize("identity", ["cgroup", "uid+cgroup"])
def test_cgroup_identity_is_learned_by_the_containers_cgroup_whatever_their_uid(identity: str) -> None:
    rs = build_ruleset(pod_policy(shared_uid_pod(identity), {}), Settings(), cgroups=SEEN)
    assert rs is not None
    # app (cgroup 101) and proxy (102) share UID 1000: only their cgroups tell them apart
    seen = [("101", "tcp", 15001, 1), ("101", "tcp", 15002, 3), ("102", "udp", 53, 2), ("1000", "tcp", 1, 1)]
    assert learned(rs, {}, seen, cap=10) == {
        Observed("app", "tcp", 15002): 3,
        Observed("proxy", "udp", 53): 2,
    }
    # a restarted container's former cgroup still names it
    assert learned(rs, {}, [("99", "tcp", 7, 1)], cap=10, former={"99": ("app",)}) == {
        Observed("app", "tcp", 7): 1
    }


def test_suggested_annotations_keep_the_current_grants() -> None:
    current = {"app": (PortRange("tcp", 15001, 15001),)}
    observed = [Observed("app", "tcp", 15002), Observed("proxy", "udp", 53)]
    annotations = suggested(current, observed)
    assert annotations == {"allow.netisolate.io/app": "15001,15002", "allow.netisolate.io/proxy": "53/udp"}
    message = summary(dict.fromkeys(observed, 2), annotations, "audit", "Deployment/web")
    assert parse_summary(message) == (annotations, "Deployment/web")
    assert (
        len(summary({Observed("app", "tcp", p): 1 for p in range(1, 2000)}, annotations, "audit", "")) < 1024
    )
    annotate, patch_ = commands(
        "shop", "web-1", annotations=annotations, owner="Deployment/web", enforce=True
    )
    assert annotate == (
        "kubectl annotate pod -n shop web-1 --overwrite allow.netisolate.io/app=15001,15002 "
        "allow.netisolate.io/proxy=53/udp netisolate.io/isolation=enforce"
    )
    assert patch_.startswith('kubectl patch deployment -n shop web --type merge -p \'{"spec"')


# --- the agent, for real ---------------------------------------------------------------------------

LISTENING = {"app": ["8080", "9090"], "proxy": ["15001", "15002", "5353/udp"], "rogue": []}
UIDS = {"app": 1000, "proxy": 1001, "rogue": 1002}
TARGETS = [
    (int(spec.partition("/")[0]), spec.partition("/")[2] or "tcp")
    for ports in LISTENING.values()
    for spec in ports
]


def matrix(sim: SimulatedPod, uids: dict[str, int]) -> dict[tuple[str, int, str], str]:
    out: dict[tuple[str, int, str], str] = {}
    for name, uid in uids.items():
        results = sim.local.probe(uid, [("127.0.0.1", port, proto) for port, proto in TARGETS], name)
        out |= {(name, port, proto): r for (port, proto), r in zip(TARGETS, results, strict=True)}
    return out


def learner(identity: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The pod and its containers' UIDs: under cgroup identity they all share one, as images do."""
    manifest = pod_manifest(
        "learner",
        NODE,
        {
            "netisolate.io/isolation": "audit",
            "netisolate.io/identity": identity,
            "allow.netisolate.io/app": "15001",
            "allow.netisolate.io/proxy": "",
        },
    )
    uids = UIDS if identity == "uid" else dict.fromkeys(UIDS, 1000)
    for container in manifest["spec"]["containers"]:
        container["securityContext"]["runAsUser"] = uids[container["name"]]
    manifest["status"]["containerStatuses"] = [  # how the agent names the containers' cgroups
        {
            "name": name,
            "containerID": f"containerd://{SimulatedPod.container_id(name)}",
            **{"image": "busybox", "imageID": "", "ready": True, "restartCount": 0},
        }
        for name in uids
    ]
    return manifest, uids


def _named(running: Running, uid: str) -> set[str]:
    """The containers whose cgroups the agent's rules for the pod name."""
    applied = running.agent.reconciler.pods[uid].applied
    members = applied.cgroups.members if applied and applied.cgroups else ()
    return {m.name for m in members if m.cgroup is not None}


async def _use(sim: SimulatedPod, uids: dict[str, int], used: set[tuple[str, int, str]]) -> list[str]:
    """Each container in `used` opens its flow; what each probe saw."""
    results = []
    for name, port, proto in sorted(used):
        results += await asyncio.to_thread(sim.local.probe, uids[name], [("127.0.0.1", port, proto)], name)
    return results


async def _cluster_wide(
    kmock: Any, tmp_path: Path, running: Running, port: int, expected: dict[str, str]
) -> None:
    """`suggest` from the Event the agent posted, and from its metrics, says the same."""
    await until(
        lambda: any(parse_summary(e.get("message", ""))[0] == expected for e in events(kmock, EVENT_REASON)),
        what="a ConnectionsObserved event naming everything",
    )
    config = kubeconfig(str(kmock.url), tmp_path)
    # (in a thread: the API stand-in is served by this test's event loop)
    from_events = await asyncio.to_thread(_suggest, "--from", "events", "--kubeconfig", str(config))
    assert from_events["pods"][0]["annotations"] == expected
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    running.agent.update_gauges()
    metrics = await asyncio.to_thread(
        _suggest, "--from", "metrics", "--url", metrics_url, "--kubeconfig", str(config)
    )
    assert metrics["pods"][0]["annotations"] == expected
    sample = REGISTRY.get_sample_value(
        "netisolate_observed_connections",
        {"namespace": "shop", "pod": "learner", "container": "proxy", "port": "5353", "protocol": "udp"},
    )
    assert sample is not None and sample >= 1


def _suggest(*args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "netisolate", "suggest", *args, "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.kernel
@pytest.mark.timeout(120)
@pytest.mark.asyncio
@pytest.mark.parametrize("identity", ["uid", "cgroup"])
async def test_audit_then_suggest_then_enforce_leaves_exactly_what_was_seen_open(
    core: client.CoreV1Api, kmock: Any, tmp_path: Path, identity: str
) -> None:
    manifest, uids = learner(identity)
    uid = manifest["metadata"]["uid"]
    sim = SimulatedPod(manifest)
    running = Running(core)
    running.agent.reconciler.observed_event_s = 0.0
    server = endpoints.serve(running.agent, 0, "127.0.0.1")
    try:
        await asyncio.to_thread(sim.start_sandbox)
        for name, ports in LISTENING.items():
            if ports:
                await asyncio.to_thread(sim.start_container, name, ports)
        await asyncio.to_thread(sim.run_as, "rogue", ["sleep", "infinity"])  # it listens nowhere
        await create(core, manifest)
        await until(lambda: running.state(uid) == "audit", what="audit")
        if identity == "cgroup":  # told apart by their cgroups (they share a UID), all named
            await until(lambda: _named(running, uid) == set(UIDS), what="the containers' cgroups named")
        before = await asyncio.to_thread(matrix, sim, uids)
        assert set(before.values()) == {"open"}, "at audit nothing is refused"
        # what the pod does in its working life: app → its proxy's ports, proxy → the app and DNS
        used = {("app", 15001, "tcp"), ("app", 15002, "tcp"), ("proxy", 8080, "tcp"), ("proxy", 5353, "udp")}
        assert set(await _use(sim, uids, used)) == {"open"}

        # the matrix above touched every port from everyone: forget it, so only `used` is learned.
        running.agent.reconciler.pods[uid].observed.clear()
        assert sim.local.ns is not None
        await asyncio.to_thread(
            sim.local.ns.run,
            lambda: subprocess.run(["nft", "flush", "set", "inet", "netisolate", "observed"], check=True),
        )
        await _use(sim, uids, used)
        expected = {"allow.netisolate.io/app": "15001,15002", "allow.netisolate.io/proxy": "8080,5353/udp"}
        port = server.server_address[1]

        def learned_all() -> bool:
            rows = _suggest("--metrics-port", str(port))["pods"]
            return bool(rows) and rows[0]["annotations"] == expected

        await until(learned_all, timeout=20, what="the agent to learn what the pod did")
        (row,) = _suggest("--metrics-port", str(port), "--enforce")["pods"]
        assert row["commands"][0].startswith("kubectl annotate pod -n shop learner --overwrite ")
        assert "netisolate.io/isolation=enforce" in row["commands"][0]
        await _cluster_wide(kmock, tmp_path, running, port, expected)

        # apply what suggest printed (kubectl annotate is this patch) and switch to enforce
        await patch(core, "learner", {**row["annotations"], "netisolate.io/isolation": "enforce"})
        await until(lambda: running.state(uid) == "enforce", what="enforce")
        await until(
            lambda: running.agent.reconciler.pods[uid].observed == {}, what="granted observations forgotten"
        )
        after = await asyncio.to_thread(matrix, sim, uids)
        assert {k for k, v in after.items() if v == "open"} == used
        assert {k: v for k, v in after.items() if k not in used and v not in ("refused", "eperm")} == {}
    finally:
        server.shutdown()
        running.stop()
        close_all([sim])
