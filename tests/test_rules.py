"""Policy → ruleset → backend text: the decisions, determinism, and that the kernel tools accept it."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from netisolate.model import parse_pod
from netisolate.policy import pod_policy
from netisolate.rules import RuleSet, Settings, build_ruleset, iptables, nft


def ruleset(
    annotations: dict[str, str],
    containers: list[dict[str, Any]] | None = None,
    settings: Settings | None = None,
) -> RuleSet:
    containers = containers or [
        {"name": "app", "securityContext": {"runAsUser": 1000}},
        {"name": "proxy", "securityContext": {"runAsUser": 1001}},
        {"name": "rogue", "securityContext": {"runAsUser": 1002}},
    ]
    pod = parse_pod(
        {"metadata": {"name": "p", "annotations": annotations}, "spec": {"containers": containers}}
    )
    rs = build_ruleset(pod_policy(pod, {}), settings or Settings())
    assert rs is not None
    return rs


ENFORCE = {"netisolate.io/isolation": "enforce"}
TYPICAL = {
    **ENFORCE,
    "allow.netisolate.io/app": "15001",
    "allow.netisolate.io/proxy": "8080, 9000-9100, 53/udp",
}


def test_off_pods_get_no_rules() -> None:
    pod = parse_pod({"spec": {"containers": [{"name": "a"}]}})
    assert build_ruleset(pod_policy(pod, {}), Settings()) is None


def test_grants_per_uid_and_protocol() -> None:
    rs = ruleset(TYPICAL)
    assert [(g.uid, g.protocol, [str(p) for p in g.ports]) for g in rs.grants] == [
        (1000, "tcp", ["15001"]),
        (1001, "tcp", ["8080", "9000-9100"]),
        (1001, "udp", ["53/udp"]),
    ]
    assert [(i.uid, i.containers) for i in rs.identities] == [(1000, "app"), (1001, "proxy"), (1002, "rogue")]


def test_rendering_is_deterministic_whatever_the_annotation_order() -> None:
    a = ruleset(TYPICAL)
    b = ruleset(
        {
            "allow.netisolate.io/proxy": "53/udp,9000-9100 ,8080",
            **ENFORCE,
            "allow.netisolate.io/app": "15001,15001",
        }
    )
    assert nft.replace(a) == nft.replace(b)
    assert iptables.document(a, 4) == iptables.document(b, 4)


SERVING: list[
    dict[str, Any]
] = [  # the typical pod, with the ports its containers declare (one declared twice)
    {"name": "app", "securityContext": {"runAsUser": 1000}, "ports": [{"containerPort": 15001}]},
    {
        "name": "proxy",
        "securityContext": {"runAsUser": 1001},
        "ports": [{"containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}],
    },
    {"name": "rogue", "securityContext": {"runAsUser": 1002}},
    {"name": "proxy2", "securityContext": {"runAsUser": 1003}, "ports": [{"containerPort": 8080}]},
]


def test_nft_order_of_decisions() -> None:
    """The order of netisolate.rules' docstring, rule by rule."""
    lines = [line.strip() for line in nft.table(ruleset(TYPICAL, SERVING)).splitlines()]
    order = [
        "tcp flags ! syn accept",  # whatever the destination: only what follows picks the judged packets
        "tcp flags syn / syn,ack meta skuid . meta l4proto . tcp dport @grants accept",  # 8, early
        "tcp flags syn,ack / syn,ack meta skuid . meta l4proto . tcp sport @owners accept",  # 2's accept
        'oif "lo" jump loopback',
        "ip daddr 127.0.0.0/8 jump loopback",
        "ip6 daddr ::1 jump loopback",
        "fib daddr type local jump loopback",  # a DNAT to the pod's own address (see WHICH PACKETS)
        "meta l4proto { udp, udplite } fib daddr type { broadcast, multicast } jump loopback",
        "meta l4proto { udp, udplite } ip6 daddr ff00::/8 jump loopback",
        "chain loopback {",
        "tcp flags syn,ack / syn,ack goto serve",
        "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
        "meta l4proto . udp sport @owned meta skuid . meta l4proto . udp sport != @owners goto refuse",
        "ct direction reply accept",
        "th dport 9 meta l4proto { tcp, udp } reject with icmpx admin-prohibited",
        "meta skuid 0 accept",
        "meta skuid . meta l4proto . th dport @grants accept",
        "meta skuid . meta l4proto . th dport @grant_ranges accept",
        "meta l4proto { tcp, udp } update @observed { meta skuid . meta l4proto . th dport }",
        "goto refuse",
        "chain serve {",
        "meta skuid . meta l4proto . th sport @owners accept",
        "meta l4proto . th sport @owned goto refuse",  # a socketless SYN-ACK (SYN cookie) too
        "accept",
        "chain refuse {",
        "meta skuid @identities goto deny",
        "counter goto deny",
        "chain deny {",
        "meta l4proto tcp reject with tcp reset",
        "meta l4proto udp reject",
        "drop",
    ]
    positions = [lines.index(line) for line in order]
    assert positions == sorted(positions)
    chain = lines.index("chain output {")
    assert lines[chain + 2 : chain + 2 + 7] == order[:7], "the output chain jumps on exactly these"


def _elements(rs: RuleSet) -> dict[str, tuple[str, ...]]:
    return {s.name: s.elements for s in nft.sets(rs)}


def test_identities_are_named_only_in_sets() -> None:
    """Every UID and port of the policy is a set element, so a changed policy changes no rule."""
    elements = _elements(ruleset(TYPICAL, SERVING))
    assert elements["grants"] == (
        '1000 . tcp . 15001 comment "app"',
        '1001 . tcp . 8080 comment "proxy"',
        '1001 . udp . 53 comment "proxy"',
    )
    # ranges in an interval set of their own: the hash lookup of single ports is the cheaper one
    assert elements["grant_ranges"] == ('1001 . tcp . 9000-9100 comment "proxy"',)
    assert elements["owners"] == (
        '1001 . tcp . 8080 comment "proxy,proxy2"',
        '1003 . tcp . 8080 comment "proxy,proxy2"',
        '1000 . tcp . 15001 comment "app"',
        '1001 . udp . 53 comment "proxy"',
    )
    assert elements["owned"] == ("tcp . 8080", "tcp . 15001", "udp . 53")
    assert elements["identities"][2] == '1002 counter comment "rogue"'
    chains = nft.parse(nft.table(ruleset(TYPICAL, SERVING))).layout
    assert (
        chains
        == nft.parse(nft.table(ruleset({**ENFORCE, "allow.netisolate.io/app": "1/udp"}, SERVING))).layout
    )


def test_undeclared_ports_have_no_owner() -> None:
    elements = _elements(ruleset(TYPICAL))
    assert elements["owners"] == elements["owned"] == ()


def test_a_changed_policy_is_an_element_update() -> None:
    old, new = ruleset(TYPICAL), ruleset({**TYPICAL, "allow.netisolate.io/app": "15001, 15005-15010"})
    assert nft.update(new, nft.parse(nft.table(old))) == (
        'add element inet netisolate grant_ranges { 1000 . tcp . 15005-15010 comment "app" }\n'
    )
    assert nft.update(old, nft.parse(nft.table(new))) == (
        "delete element inet netisolate grant_ranges { 1000 . tcp . 15005-15010 }\n"
    )
    single = ruleset({**TYPICAL, "allow.netisolate.io/app": ""})
    assert "grants { 1000 . tcp . 15001 }" in (nft.update(single, nft.parse(nft.table(old))) or "")
    # nft finds a single port of an interval set only when it is spelt as a range
    assert nft.element_key("1000 . tcp . 15001", interval=True) == "1000 . tcp . 15001-15001"
    assert nft.update(old, nft.parse(nft.table(old))) == ""


def test_a_changed_layout_is_not_an_element_update() -> None:
    tcp_only = ruleset({**ENFORCE, "allow.netisolate.io/app": "15001"})
    audit = ruleset({**TYPICAL, "netisolate.io/isolation": "audit"})
    for listed, wanted in ((tcp_only, ruleset(TYPICAL)), (ruleset(TYPICAL), audit)):
        assert nft.update(wanted, nft.parse(nft.table(listed))) is None


def test_drift_names_missing_and_unexpected_elements_and_lines() -> None:
    rs = ruleset(TYPICAL)
    table = nft.table(rs)
    assert nft.drift(rs, nft.parse(table)) == []
    tampered = table.replace('1000 . tcp . 15001 comment "app"', '1002 . tcp . 15001 comment "app"')
    assert nft.drift(rs, nft.parse(tampered)) == [
        'missing in set grants: 1000 . tcp . 15001 comment "app"',
        'unexpected in set grants: 1002 . tcp . 15001 comment "app"',
    ]
    assert nft.drift(rs, nft.parse(table.replace("\t\tgoto refuse\n", "\t\taccept\n"))) == [
        "missing: goto refuse",
        "unexpected: accept",
    ]


LISTED = """table inet netisolate {
\tset identities {
\t\ttypeof meta skuid
\t\tcounter
\t\telements = { 1000 counter packets 3 bytes 180 comment "app",
\t\t\t     1002 counter packets 0 bytes 0 comment "a,b" }
\t}

\tset observed {
\t\ttypeof meta skuid . meta l4proto . th dport
\t\telements = { 1000 . tcp . 7001 counter packets 1 bytes 60 expires 59m59s952ms,
\t\t\t     1000 . udp . 53 counter packets 2 bytes 120 expires 59m59s968ms }
\t}

\tchain refuse {
\t\tmeta skuid @identities goto deny
\t\tcounter packets 4 bytes 240 goto deny
\t}
}
"""


def test_counters_and_observations_are_read_from_a_listing() -> None:
    assert nft.refused(LISTED) == {"app": 3, "a,b": 0, "": 4}
    assert nft.observed(LISTED) == [("1000", "tcp", 7001, 1), ("1000", "udp", 53, 2)]
    # the kernel's own elements of `observed` are never drift
    assert not any(
        line.startswith("unexpected in set observed")
        for line in nft.drift(ruleset(TYPICAL), nft.parse(LISTED))
    )


def test_conntrack_only_where_udp_is_granted_or_at_audit() -> None:
    tcp_only = ruleset({**ENFORCE, "allow.netisolate.io/app": "15001"})
    assert not tcp_only.stateful
    assert "ct direction" not in nft.table(tcp_only)
    assert not any("conntrack" in r for r in iptables.chains(tcp_only, 4)[iptables.CHAIN])
    assert ruleset(TYPICAL).stateful
    # at audit every datagram passes: only conntrack tells a reply from a flow worth recording
    assert ruleset({"netisolate.io/isolation": "audit", "allow.netisolate.io/app": "15001"}).stateful


def test_deny_port_forward_drops_the_root_allowance() -> None:
    rs = ruleset(TYPICAL, settings=Settings(allow_root=False))
    assert "skuid 0 " not in nft.table(rs)
    assert not any("--uid-owner 0 " in r for r in iptables.chains(rs, 4)[iptables.CHAIN])


def test_user_namespaced_pods_get_no_root_allowance() -> None:
    """In a `hostUsers: false` pod UID 0 is the pod's own root, not the node's runtime."""
    pod = parse_pod(
        {
            "metadata": {"name": "p", "annotations": TYPICAL},
            "spec": {
                "hostUsers": False,
                "containers": [{"name": "app", "securityContext": {"runAsUser": 0}}],
            },
        }
    )
    rs = build_ruleset(pod_policy(pod, {}), Settings())
    assert rs is not None and not rs.allow_root
    assert "meta skuid 0 accept" not in nft.table(rs)
    assert "meta skuid 0 accept" in nft.table(ruleset(TYPICAL))


def test_sentinel_port_is_configurable_and_never_grantable() -> None:
    rs = ruleset({**ENFORCE, "allow.netisolate.io/app": "9, 7000"}, settings=Settings(sentinel_port=7000))
    lines = [line.strip() for line in nft.table(rs).splitlines()]
    sentinel = lines.index("th dport 7000 meta l4proto { tcp, udp } reject with icmpx admin-prohibited")
    grants = [
        lines.index(f"meta skuid . meta l4proto . th dport @{s} accept") for s in ("grants", "grant_ranges")
    ]
    assert sentinel < min(grants), "the sentinel must answer before any grant can accept"
    # the early SYN accept, before the sentinel's rule, finds no grant of it
    early = lines.index("tcp flags syn / syn,ack meta skuid . meta l4proto . tcp dport @grants accept")
    assert early < sentinel
    granted = next(s for s in nft.sets(rs) if s.name == "grants").elements
    assert granted and not any(" . 7000" in e for e in granted), granted


def test_audit_counts_but_accepts() -> None:
    rs = ruleset({"netisolate.io/isolation": "audit"})
    table = nft.table(rs)
    assert "chain deny {\n\t\taccept\n\t}" in table
    assert "reject with tcp reset" not in table
    assert iptables.document(rs, 4).count("-A NETISOLATE-DENY") == 1
    assert "-A NETISOLATE-DENY -j ACCEPT" in iptables.document(rs, 6)


def test_shared_uid_and_missing_uid() -> None:
    rs = ruleset(
        {
            **ENFORCE,
            "allow.netisolate.io/a": "80",
            "allow.netisolate.io/b": "81",
            "allow.netisolate.io/c": "82",
        },
        containers=[
            {"name": "a", "securityContext": {"runAsUser": 1000}},
            {"name": "b", "securityContext": {"runAsUser": 1000}},
            {"name": "c"},  # no UID: nothing can be allowed for it
        ],
    )
    assert [(g.uid, g.containers, [str(p) for p in g.ports]) for g in rs.grants] == [
        (1000, "a,b", ["80", "81"])
    ]
    assert "82" not in nft.table(rs) and '1000 . tcp . 81 comment "a,b"' in nft.table(rs)


def test_multiport_is_split_at_fifteen_slots() -> None:
    ports = ",".join(str(p) for p in range(1000, 1020))
    rules = [
        r
        for r in iptables.chains(ruleset({**ENFORCE, "allow.netisolate.io/app": ports}), 4)[iptables.CHAIN]
        if "multiport" in r
    ]
    assert len(rules) == 2
    assert sum(len(r.split("--dports ")[1].split()[0].split(",")) for r in rules) == 20


# --- the kernel's own tools accept the text (in a throwaway network namespace) ----------------


def _in_fresh_netns(cmd: list[str], text: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("unshare") is None or shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} or unshare is missing: run `bash scripts/bootstrap.sh test` as root")
    return subprocess.run(["unshare", "--net", *cmd], input=text, capture_output=True, text=True, check=False)


CASES = {
    "typical": ruleset(TYPICAL),
    "serving": ruleset(TYPICAL, SERVING),
    "audit": ruleset({"netisolate.io/isolation": "audit"}, SERVING),
    "no-root": ruleset(TYPICAL, settings=Settings(allow_root=False, sentinel_port=65000)),
    "many-ports": ruleset(
        {**ENFORCE, "allow.netisolate.io/app": ",".join(str(p) for p in range(2000, 2040))}
    ),
}


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES)
def test_nft_accepts_the_script(case: str) -> None:
    result = _in_fresh_netns(["nft", "-c", "-f", "-"], nft.replace(CASES[case]))
    assert result.returncode == 0, result.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "tool",
    ["iptables-legacy-restore", "ip6tables-legacy-restore", "iptables-nft-restore", "ip6tables-nft-restore"],
)
def test_iptables_restore_accepts_the_document(case: str, tool: str) -> None:
    family: iptables.Family = 6 if tool.startswith("ip6") else 4
    document = iptables.document(CASES[case], family)
    result = _in_fresh_netns([tool, "--test", "--noflush"], document)
    assert result.returncode == 0, result.stderr


# what `nft list` shows for each set of ports (observed on the kernel): runs with a range merge
NFT_KEEPS = {
    "8080, 8081": "8080, 8081",
    "80, 81, 82": "80, 81, 82",
    "80, 82": "80, 82",
    "8000-9000, 9001": "8000-9001",
    "80, 81, 82-90": "80-90",
    "79, 80-81, 83": "79-81, 83",
    "80, 80-85": "80-85",
    "1-3, 5-7, 4": "1-7",
    "8080, 8000-9000, 9001, 7000-7999": "7000-9001",
}


@pytest.mark.parametrize("grant", NFT_KEEPS)
def test_port_sets_are_rendered_as_nft_keeps_them(grant: str) -> None:
    (only,) = ruleset({**ENFORCE, "allow.netisolate.io/app": grant}).grants
    assert ", ".join(str(r) for r in only.ports) == NFT_KEEPS[grant]


OVERLAPPING = {**ENFORCE, "allow.netisolate.io/app": "8080, 8000-9000, 9001, 7000-7999"}


@pytest.mark.kernel
@pytest.mark.parametrize("case", ["typical", "serving", "overlapping"])
def test_nft_lists_exactly_what_we_render(case: str) -> None:
    """Drift detection compares text and elements, so our table must be nft's own listing (less
    counter values, element order and line breaks)."""
    rs = CASES.get(case) or ruleset(OVERLAPPING)
    result = _in_fresh_netns(["sh", "-c", "nft -f - && nft list table inet netisolate"], nft.replace(rs))
    assert result.returncode == 0, result.stderr
    listed, ours = nft.parse(result.stdout), nft.parse(nft.table(rs))
    assert listed.layout == ours.layout
    assert {k: sorted(v) for k, v in listed.elements.items()} == {
        k: sorted(v) for k, v in ours.elements.items()
    }
    assert nft.drift(rs, listed) == []


def test_iptables_document_keeps_our_jumps_once_and_first() -> None:
    """The document is written for what OUTPUT holds now: nothing to do when our jumps begin it,
    else every jump of ours is deleted and all are inserted first, in the same commit."""
    rs, jumps = ruleset(TYPICAL), iptables.jumps(4)
    assert jumps == [
        "-o lo -j NETISOLATE",
        "-d 127.0.0.0/8 -j NETISOLATE",
        "-m addrtype --dst-type LOCAL -j NETISOLATE",  # a DNAT to the pod's own address
        "-p udp -m addrtype --dst-type BROADCAST,MULTICAST -j NETISOLATE",
        "-p udplite -m addrtype --dst-type BROADCAST,MULTICAST -j NETISOLATE",
    ]
    assert iptables.jumps(6) == [
        "-o lo -j NETISOLATE",
        "-d ::1/128 -j NETISOLATE",
        "-m addrtype --dst-type LOCAL -j NETISOLATE",
        "-d ff00::/8 -p udp -j NETISOLATE",
        "-d ff00::/8 -p udplite -j NETISOLATE",
    ]

    def output_lines(current: list[str]) -> list[str]:
        return [line for line in iptables.document(rs, 4, current).splitlines() if " OUTPUT " in line]

    assert output_lines([*jumps, "-j ACCEPT"]) == []
    assert output_lines([]) == [f"-I OUTPUT {i} {jump}" for i, jump in enumerate(jumps, 1)]
    displaced = ["-j ACCEPT", jumps[0], jumps[2]]  # e.g. the jumps of an older netisolate
    assert output_lines(displaced) == [
        f"-D OUTPUT {jumps[0]}",
        f"-D OUTPUT {jumps[2]}",
        *(f"-I OUTPUT {i} {jump}" for i, jump in enumerate(jumps, 1)),
    ]
    assert not iptables.jumps_in_place([*jumps, jumps[0]], 4), "a second jump of ours is drift"
