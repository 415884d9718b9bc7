"""The rules on the real kernel, both backends: real namespaces, real processes under distinct UIDs.

Every namespace is created by `LocalPod` under a unique `ni-<hex>-` prefix and removed on exit, also
when a test fails; traffic stays inside those namespaces.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from netisolate import scenarios
from netisolate.backends import Backend, EnforceError, apply_many, run_tool, select_backend
from netisolate.backends.iptables import known_outputs, lock_file
from netisolate.backends.kept import KeptSockets
from netisolate.backends.nftables import NftablesBackend
from netisolate.cli import main
from netisolate.localpod import (
    ALL_ADDRESSES,
    PEER_IPV4,
    PEER_IPV6,
    POD_IPV4,
    POD_IPV6,
    LocalPod,
    as_uid,
    matrix,
    python_argv,
)
from netisolate.model import Pod, parse_pod
from netisolate.netns import NetNS, NetNSError
from netisolate.policy import pod_policy
from netisolate.rules import RuleSet, Settings, build_ruleset
from netisolate.rules import iptables as iptables_rules
from tests.agent_harness import close_all

pytestmark = pytest.mark.kernel
BACKENDS = ["nftables", "iptables"]
APP, PROXY, ROGUE = 1000, 1001, 1002
NODE_LOCK = "/run/xtables.lock"  # the node's legacy iptables lock


def make_pod(annotations: dict[str, str]) -> Pod:
    containers = [
        {"name": n, "securityContext": {"runAsUser": u}}
        for n, u in (("app", APP), ("proxy", PROXY), ("rogue", ROGUE))
    ]
    return parse_pod(
        {
            "metadata": {"name": "t", "namespace": "ns", "annotations": annotations},
            "spec": {"containers": containers},
        }
    )


def ruleset_for(pod: Pod, settings: Settings | None = None, labels: dict[str, str] | None = None) -> RuleSet:
    rs = build_ruleset(pod_policy(pod, labels or {}), settings or Settings())
    assert rs is not None
    return rs


GRANTS = {
    "netisolate.io/isolation": "enforce",
    "allow.netisolate.io/app": "15001",
    "allow.netisolate.io/proxy": "8080",
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    return select_backend(request.param)


@pytest.fixture
def local_pod() -> Iterator[LocalPod]:
    with LocalPod(make_pod(GRANTS)) as pod:
        pod.listen("app", ["8080"])
        pod.listen("proxy", ["15001", "15000"])
        yield pod


def ns_of(pod: LocalPod) -> NetNS:
    assert pod.ns is not None
    return pod.ns


def test_scenario_matrix_over_every_address(backend: Backend) -> None:
    scenario = scenarios.load("app-proxy-rogue")
    with LocalPod(scenario.parsed_pod()) as pod:
        for container, ports in scenario.listeners.items():
            pod.listen(container, ports)
        before = matrix(pod, scenario.listeners)
        assert all(r == "open" for results in before.values() for r in results), before
        backend.apply(ns_of(pod), ruleset_for(pod.pod))
        started = time.monotonic()
        after = matrix(pod, scenario.listeners)
        elapsed = time.monotonic() - started
    for (client, target), results in after.items():
        expected = scenario.expected(client, target)
        assert results == (
            ["open"] * len(ALL_ADDRESSES) if expected == "open" else ["refused"] * len(ALL_ADDRESSES)
        ), (client, target, results)
    assert elapsed < 2.0, "refusals must be immediate (reset), never a hang"


def test_udp_grant_and_replies(backend: Backend) -> None:
    scenario = scenarios.load("udp-grant")
    with LocalPod(scenario.parsed_pod()) as pod:
        for container, ports in scenario.listeners.items():
            pod.listen(container, ports)
        backend.apply(ns_of(pod), ruleset_for(pod.pod))
        app = pod.probe(
            pod.uid("app"), [("127.0.0.1", 53, "udp"), ("::1", 53, "udp"), ("127.0.0.1", 8053, "tcp")]
        )
        rogue = pod.probe(pod.uid("rogue"), [("127.0.0.1", 53, "udp"), ("::1", 53, "udp")])
    assert app == ["open", "open", "refused"]  # the echo came back: replies pass through conntrack
    assert rogue == ["eperm", "eperm"]  # a refused UDP send fails at once


def test_unknown_uid_and_root(backend: Backend, local_pod: LocalPod) -> None:
    targets = [("127.0.0.1", 8080, "tcp"), ("::1", 15001, "tcp")]
    backend.apply(ns_of(local_pod), ruleset_for(local_pod.pod))
    assert local_pod.probe(4242, targets) == ["refused", "refused"]
    assert local_pod.probe(0, targets) == ["open", "open"]  # the runtime: kubectl port-forward
    backend.apply(ns_of(local_pod), ruleset_for(local_pod.pod, Settings(allow_root=False)))
    assert local_pod.probe(0, targets) == ["refused", "refused"]


def test_port_ranges_and_single_ports_grant_alike(backend: Backend, local_pod: LocalPod) -> None:
    """A range grants each port in it and no other, next to single ports (nftables keeps the two
    in sets of their own), and a grant that moves from one kind to the other is an update."""
    ns, targets = (
        ns_of(local_pod),
        [("127.0.0.1", 15000, "tcp"), ("::1", 15001, "tcp"), ("127.0.0.1", 8080, "tcp")],
    )
    ranged = ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/app": "14999-15001"}))
    backend.apply(ns, ranged)
    assert local_pod.probe(APP, targets) == ["open", "open", "refused"]
    assert local_pod.probe(ROGUE, targets) == ["refused", "refused", "refused"]
    single = ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/app": "15001, 8080"}))
    backend.apply(ns, single)
    assert local_pod.probe(APP, targets) == ["refused", "open", "open"]
    assert backend.verify(ns, single) == []


def test_sentinel_answers_admin_prohibited(backend: Backend, local_pod: LocalPod) -> None:
    """Over IPv4 connect() fails with EHOSTUNREACH, which only our rules produce. (Over ::1 the
    kernel does not hand the ICMPv6 error of an output-hook reject to the connecting TCP socket — it
    times out — so the gate probes 127.0.0.1; the IPv6 sentinel still refuses.)"""
    sentinel = [("127.0.0.1", 9, "tcp"), ("::1", 9, "tcp")]
    assert local_pod.probe(APP, sentinel) == ["refused", "refused"]  # no rules: nobody listens there
    backend.apply(ns_of(local_pod), ruleset_for(local_pod.pod, Settings(allow_root=False)))
    for uid in (0, APP, ROGUE):
        assert local_pod.probe(uid, sentinel[:1]) == ["unreachable"]
        assert local_pod.probe(uid, [("::1", 9, "udp")]) == ["eperm"]


def test_sentinel_answers_a_container_granted_its_port(backend: Backend, local_pod: LocalPod) -> None:
    """A grant that covers the sentinel port (no admission, or a node's other --sentinel-port)
    grants nothing there: the gate must still see the sentinel's answer."""
    pod = make_pod({**GRANTS, "allow.netisolate.io/app": "9, 15001"})
    backend.apply(ns_of(local_pod), ruleset_for(pod))
    assert local_pod.probe(APP, [("127.0.0.1", 9, "tcp"), ("127.0.0.1", 15001, "tcp")]) == [
        "unreachable",
        "open",
    ]


ECHO_CLIENT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(100).decode().strip() or "closed", flush=True)
"""


def test_established_connection_survives_a_reapply(backend: Backend, local_pod: LocalPod) -> None:
    local_pod.spawn(as_uid(PROXY, ["socat", "TCP6-LISTEN:7000,ipv6only=0,reuseaddr,fork", "EXEC:cat"]))
    time.sleep(0.2)
    ns = ns_of(local_pod)
    backend.apply(ns, ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/app": "7000"})))
    client = local_pod.spawn(as_uid(APP, ["/usr/bin/python3", "-c", ECHO_CLIENT, "7000"]), stdin=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "connected"
        backend.apply(ns, ruleset_for(make_pod(GRANTS)))  # the grant to 7000 is gone
        client.stdin.write("still-here\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "still-here"
        assert local_pod.probe(APP, [("127.0.0.1", 7000, "tcp")]) == ["refused"]  # but no new connection
    finally:
        client.kill()


LOOP_PROBE = """
import errno, json, socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
counts = {}
while time.monotonic() < deadline:
    for port in map(int, sys.argv[2:] or (8080, 9)):
        s = socket.socket()
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", port)); r = "open"
        except OSError as e:
            r = errno.errorcode.get(e.errno, "timeout")
        s.close()
        counts[f"{port}:{r}"] = counts.get(f"{port}:{r}", 0) + 1
print(json.dumps(counts))
"""


def test_reapplying_never_opens_a_window(backend: Backend, local_pod: LocalPod) -> None:
    """A client probing in a loop while policies are swapped never gets through, and the sentinel
    answers on every attempt: there is no moment with half a ruleset or none."""
    ns = ns_of(local_pod)
    policies = [
        ruleset_for(local_pod.pod),
        ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/app": "15000"})),
    ]
    backend.apply(ns, policies[0])
    prober = local_pod.spawn(as_uid(ROGUE, ["/usr/bin/python3", "-c", LOOP_PROBE, "2.5"]))
    applied = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        backend.apply(ns, policies[applied % 2])
        applied += 1
    out, _ = prober.communicate(timeout=10)
    counts: dict[str, int] = json.loads(out)
    assert applied >= 10
    # Never through, never "no rules" (ECONNREFUSED from port 9). The kernel's ICMP rate limit may
    # swallow the odd admin-prohibited answer (a 1 s timeout), which the gate simply retries.
    assert set(counts) <= {"8080:ECONNREFUSED", "9:EHOSTUNREACH", "9:timeout"}, counts
    assert counts["8080:ECONNREFUSED"] > 50
    assert counts.get("9:timeout", 0) < counts["9:EHOSTUNREACH"] / 10


def test_a_changed_policy_never_drops_a_grant_both_sides_hold(backend: Backend, local_pod: LocalPod) -> None:
    """While the app's grants change back and forth (nftables: element updates in the same table),
    the grant both policies hold answers every attempt, and the one only one of them holds is
    refused or let through, never anything else: no window where the set is half-written."""
    ns = ns_of(local_pod)
    both = {**GRANTS, "allow.netisolate.io/app": "15001"}
    policies = [
        ruleset_for(make_pod(both)),
        ruleset_for(make_pod({**both, "allow.netisolate.io/app": "15000, 15001"})),
    ]
    backend.apply(ns, policies[0])
    prober = local_pod.spawn(as_uid(APP, ["/usr/bin/python3", "-c", LOOP_PROBE, "2.5", "15001", "15000"]))
    applied = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        backend.apply(ns, policies[(applied + 1) % 2])
        applied += 1
    out, _ = prober.communicate(timeout=10)
    counts: dict[str, int] = json.loads(out)
    assert applied >= 10
    # Refused is a reset, so a grant lost for a moment would show as 15001:ECONNREFUSED; a rare
    # timeout is a listener's accept queue overflowing under this load (the rules never drop TCP),
    # on either port while it is open (element updates are fast: 15000 is open half the time).
    assert set(counts) <= {
        "15001:open",
        "15001:timeout",
        "15000:open",
        "15000:ECONNREFUSED",
        "15000:timeout",
    }, counts
    assert counts["15001:open"] > 50 and counts.get("15000:open") and counts.get("15000:ECONNREFUSED"), counts
    assert counts.get("15001:timeout", 0) < counts["15001:open"] / 100, counts
    assert counts.get("15000:timeout", 0) < counts["15000:open"] / 100, counts
    assert backend.verify(ns, policies[applied % 2]) == []


def test_istio_style_redirect_is_judged_after_nat(backend: Backend, local_pod: LocalPod) -> None:
    """The app's outbound connection is captured to the proxy on 15001 by a nat OUTPUT redirect in
    the pod's namespace; the grant that counts is the port it is finally delivered to."""
    nat = (
        "table ip mesh {\n chain out {\n type nat hook output priority -100; policy accept;\n"
        f" ip daddr {PEER_IPV4} tcp dport 80 redirect to :15001\n }}\n}}\n"
    )
    assert run_tool(ns_of(local_pod), ["nft", "-f", "-"], nat).returncode == 0
    backend.apply(ns_of(local_pod), ruleset_for(local_pod.pod))
    assert local_pod.probe(APP, [(PEER_IPV4, 80, "tcp")]) == ["open"]
    assert local_pod.probe(ROGUE, [(PEER_IPV4, 80, "tcp")]) == ["refused"]


@pytest.mark.parametrize("family", [4, 6])
def test_nat_to_the_pods_own_address_is_judged(backend: Backend, local_pod: LocalPod, family: int) -> None:
    """A nat OUTPUT rule that sends a connection to one of the pod's own addresses (not loopback's)
    delivers it locally all the same: it must be judged like any loopback connection."""
    peer, pod_ip, ip = (PEER_IPV4, POD_IPV4, "ip") if family == 4 else (PEER_IPV6, POD_IPV6, "ip6")
    nat = (
        f"table {ip} mesh {{\n chain out {{\n type nat hook output priority -100; policy accept;\n"
        f" {ip} daddr {peer} tcp dport 81 dnat to {f'[{pod_ip}]' if family == 6 else pod_ip}:8080\n"
        " }\n}\n"
    )
    assert run_tool(ns_of(local_pod), ["nft", "-f", "-"], nat).returncode == 0, nat
    backend.apply(ns_of(local_pod), ruleset_for(local_pod.pod))
    assert local_pod.probe(PROXY, [(peer, 81, "tcp")]) == ["open"]  # granted 8080
    assert local_pod.probe(ROGUE, [(peer, 81, "tcp")]) == ["refused"]


def test_audit_blocks_nothing_but_counts(backend: Backend, local_pod: LocalPod) -> None:
    audit = make_pod({**GRANTS, "netisolate.io/isolation": "audit"})
    backend.apply(ns_of(local_pod), ruleset_for(audit))
    assert local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp"), ("::1", 15000, "tcp")]) == ["open", "open"]
    counters = backend.deny_counters(ns_of(local_pod))
    assert counters.get("rogue", 0) >= 2
    assert counters.get("app", 0) == 0


def test_apply_is_idempotent_and_verify_sees_drift(backend: Backend, local_pod: LocalPod) -> None:
    ns, rs = ns_of(local_pod), ruleset_for(local_pod.pod)
    assert backend.verify(ns, rs) != []  # nothing installed yet
    assert not backend.installed(ns)
    backend.apply(ns, rs)
    backend.apply(ns, rs)
    assert backend.installed(ns)
    assert backend.verify(ns, rs) == []
    local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp")])
    assert backend.deny_counters(ns)["rogue"] > 0
    assert backend.verify(ns, rs) == [], "counters are not drift"
    other = ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/rogue": "8080"}))
    assert backend.verify(ns, other) != []
    tamper: list[list[str]] = (
        [["nft", "insert", "rule", "inet", "netisolate", "loopback", "accept"]]
        if backend.name == "nftables"
        else [
            ["iptables-legacy", "-I", "NETISOLATE", "1", "-j", "ACCEPT"],
            ["ip6tables-legacy", "-I", "OUTPUT", "1", "-j", "ACCEPT"],
        ]
    )
    for argv in tamper:
        assert run_tool(ns, argv).returncode == 0
    assert local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp")]) == ["open"]  # the tampering works...
    drift = backend.verify(ns, rs)
    assert drift, "...and verify sees it"
    backend.apply(ns, rs)
    assert backend.verify(ns, rs) == []
    assert local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp")]) == ["refused"]


def test_iptables_jump_stays_unique_and_first(local_pod: LocalPod) -> None:
    backend, ns, rs = select_backend("iptables"), ns_of(local_pod), ruleset_for(local_pod.pod)
    run_tool(ns, ["iptables-legacy", "-A", "OUTPUT", "-j", "ACCEPT"])  # someone else's rule
    for _ in range(3):
        backend.apply(ns, rs)
    output = [
        line
        for line in run_tool(ns, ["iptables-legacy-save"]).stdout.splitlines()
        if line.startswith("-A OUTPUT")
    ]
    assert output == [
        "-A OUTPUT -o lo -j NETISOLATE",
        "-A OUTPUT -d 127.0.0.0/8 -j NETISOLATE",
        "-A OUTPUT -m addrtype --dst-type LOCAL -j NETISOLATE",
        "-A OUTPUT -p udp -m addrtype --dst-type BROADCAST,MULTICAST -j NETISOLATE",
        "-A OUTPUT -p udplite -m addrtype --dst-type BROADCAST,MULTICAST -j NETISOLATE",
        "-A OUTPUT -j ACCEPT",
    ]


def test_iptables_reads_output_only_where_it_holds_rules(local_pod: LocalPod) -> None:
    """A new namespace's OUTPUT is known empty without a tool (the write goes alone); a rule in
    OUTPUT, anyone's, is seen, so the table is read and that rule kept behind our jumps."""
    backend, ns, rs = select_backend("iptables"), ns_of(local_pod), ruleset_for(local_pod.pod)
    assert empty_outputs(ns) == {4, 6}
    run_tool(ns, ["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"])  # not OUTPUT: still empty
    run_tool(ns, ["ip6tables-legacy", "-A", "OUTPUT", "-j", "ACCEPT"])
    assert empty_outputs(ns) == {4}
    backend.apply(ns, rs)
    assert empty_outputs(ns) == set()
    saved = run_tool(ns, ["ip6tables-legacy-save"]).stdout.splitlines()
    assert [line for line in saved if line.startswith("-A OUTPUT")][-1] == "-A OUTPUT -j ACCEPT"
    assert backend.verify(ns, rs) == []


def test_iptables_commits_ipv4_only_once_ipv6_is_in(
    local_pod: LocalPod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two tools load at once, but IPv4 commits after IPv6 and not at all when IPv6 fails:
    the gate's IPv4 probe must never answer while ::1 is still open. (A table holding anyone's
    rule goes to the tools; tests/test_xtables.py covers the in-process writer's order.)"""
    backend, ns, rs = select_backend("iptables"), ns_of(local_pod), ruleset_for(local_pod.pod)
    someones_rule(ns)
    real = iptables_rules.document

    def ipv6_refused(rs: RuleSet, family: int, output: Sequence[str] = ()) -> str:
        return real(rs, 4, output) if family == 4 else "*filter\n-A NOWHERE -j ACCEPT\nCOMMIT\n"

    monkeypatch.setattr("netisolate.backends.iptables.document", ipv6_refused)
    with pytest.raises(EnforceError, match="IPv6 rules failed"):
        backend.apply(ns, rs)
    assert not backend.installed(ns), "IPv4 was committed although IPv6 failed"
    assert local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp")]) == ["open"]
    monkeypatch.undo()
    backend.apply(ns, rs)
    assert backend.verify(ns, rs) == []


def empty_outputs(ns: NetNS) -> set[int]:
    """The families whose filter table holds no rule in OUTPUT, as the backend tells it."""
    return {family for family, rules in known_outputs(ns).items() if not rules}


def someones_rule(ns: NetNS) -> None:
    """A rule of someone else's in both families' filter table: the tools write it from here."""
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        assert run_tool(ns, [tool, "-A", "INPUT", "-j", "ACCEPT"]).returncode == 0


@pytest.mark.parametrize("table", ["new (written in-process)", "used (by the tools)"])
def test_iptables_holds_ipv4_back_while_ipv6_waits_for_its_lock(
    local_pod: LocalPod, monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    """While IPv6 waits for its lock, IPv4 waits too (the tool loaded meanwhile, for its COMMIT);
    a write that waits past the timeout fails, IPv4 still not in."""
    backend, ns, rs = select_backend("iptables"), ns_of(local_pod), ruleset_for(local_pod.pod)
    if table.startswith("used"):
        someones_rule(ns)
    with open(lock_file(6)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        monkeypatch.setattr("netisolate.backends.iptables._TOOL_TIMEOUT_S", 1.0)
        with pytest.raises(EnforceError, match=r"IPv6 rules failed.*no answer within"):
            backend.apply(ns, rs)
        assert empty_outputs(ns) == {4, 6}, "IPv4 went in although IPv6 never did"
        monkeypatch.undo()
        writing = threading.Thread(target=backend.apply, args=(ns, rs))
        writing.start()
        time.sleep(1.0)
        assert empty_outputs(ns) == {4, 6}, "IPv4 went in while IPv6 waited"
        fcntl.flock(lock, fcntl.LOCK_UN)
        writing.join(timeout=15)
    assert not writing.is_alive()
    assert backend.verify(ns, rs) == []


@pytest.mark.parametrize("table", ["new (written in-process)", "used (by the tools)"])
def test_iptables_writes_a_pods_rules_while_the_node_lock_is_held(local_pod: LocalPod, table: str) -> None:
    """Whoever holds the node's /run/xtables.lock (kube-proxy, for seconds on a big node) writes the
    node's tables, not the pod's: it must not hold a sandbox's rules (and its CNI ADD) back."""
    backend, ns, rs = select_backend("iptables"), ns_of(local_pod), ruleset_for(local_pod.pod)
    if table.startswith("used"):
        someones_rule(ns)
    # (never removed: the node's iptables tools make it too, and others may hold it open)
    with open(NODE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        backend.apply(ns, rs)
        assert time.monotonic() - started < 5, "the write waited for the node's lock"
    assert backend.verify(ns, rs) == []
    assert local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp")]) == ["refused"]


def test_cli_enforce_and_verify(
    tmp_path: Path, local_pod: LocalPod, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "pod.json"
    pod = local_pod.pod.model_dump(by_alias=True, exclude_none=True)
    manifest.write_text(json.dumps({**pod, "apiVersion": "v1", "kind": "Pod"}))
    path = ns_of(local_pod).path
    for backend in BACKENDS:
        args = ["-f", str(manifest), "--netns", path, "--backend", backend]
        assert main(["verify", *args]) == 1
        assert main(["enforce", *args]) == 0
        assert main(["verify", *args]) == 0
        assert main(["verify", *args, "--deny-port-forward"]) == 1
    assert "DRIFTED" in capsys.readouterr().out
    assert main(["enforce", "-f", str(manifest), "--netns", "/run/netns/ni-does-not-exist"]) == 1
    assert "cannot open network namespace" in capsys.readouterr().err
    for command in ("enforce", "verify"):  # DESIGN: 0 ok, 1 failed - unreadable input included
        assert main([command, "-f", str(tmp_path / "missing.yaml"), "--netns", path]) == 1
        assert "missing.yaml" in capsys.readouterr().err


def test_netns_never_moves_the_caller() -> None:
    here = NetNS.current()
    with LocalPod(make_pod(GRANTS)) as pod:
        ns = ns_of(pod)
        inside = ns.run(lambda: NetNS.current().inode)
        assert inside == ns.inode != here.inode
        assert NetNS.current().inode == here.inode
        threading.Thread(target=lambda: None).start()
    here.close()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_no_thread_stays_in_a_pods_namespace(backend_name: str) -> None:
    """Whatever an apply starts (the kept sockets' sweeper, first of all) ends or leaves the
    pod's namespace: a thread left inside would keep the namespace, its rules and all, alive."""
    backend = (
        NftablesBackend(kept=KeptSockets()) if backend_name == "nftables" else select_backend(backend_name)
    )
    own = os.stat("/proc/self/ns/net").st_ino
    with LocalPod(make_pod(GRANTS)) as pod:
        backend.apply(ns_of(pod), ruleset_for(pod.pod))
        time.sleep(0.1)  # a thread that would move out has had the time to
        inside = [
            task
            for task in os.listdir("/proc/self/task")
            if os.stat(f"/proc/self/task/{task}/ns/net").st_ino != own
        ]
    assert inside == [], f"threads left in the pod's namespace: {inside}"


def test_netns_calls_from_inside_share_the_thread_unless_asked_not_to() -> None:
    with LocalPod(make_pod(GRANTS)) as pod, LocalPod(make_pod(GRANTS)) as other:
        ns, elsewhere = ns_of(pod), ns_of(other)

        def nested() -> tuple[int, int, int, int]:
            outer = threading.get_ident()
            return (
                outer,
                ns.run(threading.get_ident),
                ns.run(threading.get_ident, fresh=True),
                elsewhere.run(lambda: NetNS.current().inode),
            )

        outer, same, fresh, entered = ns.run(nested)
        assert same == outer != fresh
        assert entered == elsewhere.inode, "another namespace is entered on a thread of its own"


@pytest.mark.parametrize("target", ["/run/netns/ni-missing-0000", "/proc/self/ns/uts", "/etc/hostname"])
def test_netns_open_refuses_what_is_not_a_netns(target: str) -> None:
    with pytest.raises(NetNSError):
        NetNS.open(target)


def test_apply_many(backend: Backend) -> None:
    pods = [LocalPod(make_pod(GRANTS)) for _ in range(4)]
    try:
        items: list[Any] = [(p.create().ns, ruleset_for(p.pod)) for p in pods]
        assert apply_many(backend, items) == [None] * 4
        assert all(backend.verify(ns, rs) == [] for ns, rs in items)
    finally:
        close_all(pods)


def test_another_tables_accept_cannot_undo_our_reject(local_pod: LocalPod) -> None:
    """Why nftables is the default where it can be: our base chain sees every packet on the hook,
    whatever another table (a CNI's, a mesh's) decided before it."""
    other = "table inet other {\n chain out {\n type filter hook output priority -10; accept\n }\n}\n"
    assert run_tool(ns_of(local_pod), ["nft", "-f", "-"], other).returncode == 0
    select_backend("nftables").apply(ns_of(local_pod), ruleset_for(local_pod.pod))
    assert local_pod.probe(ROGUE, [("127.0.0.1", 8080, "tcp")]) == ["refused"]


def test_user_namespaced_pod(backend: Backend) -> None:
    """`hostUsers: false`: the pod's UIDs are not the node's. Rules name the pod's UIDs; both backends
    must make them hold (iptables only accepts an owner match written from inside the pod's user
    namespace, so this fails if the backend stops entering it)."""
    scenario = scenarios.load("app-proxy-rogue")
    spec = scenario.parsed_pod().spec.model_copy(update={"host_users": False})
    with LocalPod(scenario.parsed_pod().model_copy(update={"spec": spec}), user_namespace=True) as pod:
        ns = ns_of(pod)
        owner = ns.foreign_owner()
        assert owner is not None, "the harness must give the pod a user namespace of its own"
        os.close(owner)
        for container, ports in scenario.listeners.items():
            pod.listen(container, ports)
        rs = ruleset_for(pod.pod)
        backend.apply(ns, rs)
        backend.apply(ns, rs)
        assert backend.verify(ns, rs) == []
        after = matrix(pod, scenario.listeners, addresses=("127.0.0.1", "::1"))
        assert pod.probe(APP + 4242, [("127.0.0.1", 8080, "tcp")]) == ["refused"]
        # the node's root (the runtime) is an unmapped UID here, and the pod's root is no exception
        node_root = pod.spawn(python_argv("probe", "127.0.0.1", "8080", "tcp"))
        assert node_root.communicate(timeout=10)[0].split() == ["refused"]
        assert pod.probe(0, [("127.0.0.1", 8080, "tcp")]) == ["refused"]
    for (client, target), results in after.items():
        expected = "open" if scenario.expected(client, target) == "open" else "refused"
        assert results == [expected] * 2, (client, target, results)


def test_ports_meant_for_loopback_that_listen_beyond_it() -> None:
    """Granted ports, and undeclared ones, bound beyond loopback are reported; a declared,
    ungranted port is served on purpose and is not."""
    from netisolate.agent.listeners import exposed

    scenario = scenarios.load("app-proxy-rogue")
    raw = scenario.parsed_pod().model_dump(by_alias=True, exclude_none=True)
    for undeclared, expected in (
        (True, ["15000 (no container declares it)", "15001 (granted to app)", "8080 (granted to proxy)"]),
        (False, ["15001 (granted to app)", "8080 (granted to proxy)"]),
    ):
        if not undeclared:
            raw["spec"]["containers"][1]["ports"] = [{"containerPort": 15000}]
        with LocalPod(parse_pod(raw)) as pod:
            for container, ports in scenario.listeners.items():
                pod.listen(container, ports)
            assert exposed(ns_of(pod), pod.pod, ruleset_for(pod.pod)) == expected


def test_udp_ports_beyond_loopback_are_seen_too() -> None:
    from netisolate.agent.listeners import exposed

    scenario = scenarios.load("udp-grant")
    with LocalPod(scenario.parsed_pod()) as pod:
        for container, ports in scenario.listeners.items():
            pod.listen(container, ports)
        found = exposed(ns_of(pod), pod.pod, ruleset_for(pod.pod))
    assert found == ["53/udp (granted to app)", "8053 (no container declares it)"]
