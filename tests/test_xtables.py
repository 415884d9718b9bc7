"""The in-process iptables writer (`rules.xtables`, `backends.xtables`): a new sandbox's filter table
written without a tool must be, byte for byte, the table `iptables-restore` writes from our
document, and every table it cannot rebuild exactly must go to the tools, everyone's rules kept."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from netisolate import scenarios
from netisolate.backends import EnforceError, run_tool, select_backend, xtables
from netisolate.backends.iptables import IptablesBackend, lock_file, written_in_process
from netisolate.model import parse_pod
from netisolate.netns import NetNS
from netisolate.policy import IdentityMode, pod_policy
from netisolate.rules import RuleSet, Settings, build_ruleset
from netisolate.rules import iptables as rules
from netisolate.rules.iptables import Family
from netisolate.rules.xtables import LayoutError, _entry, _error, _standard, builtin_policies, split
from netisolate.rules.xtables import _cleared as cleared

FAMILIES: tuple[Family, ...] = (4, 6)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOOLS = {4: "iptables-legacy", 6: "ip6tables-legacy"}


def _uid_rulesets() -> dict[str, RuleSet]:
    """Every scenario and example known by UID (the shared-UID scenario too: its comment is
    "app,proxy", which -save quotes), and a pod with ranges and more ports than a multiport match
    holds; without root's pass and on another sentinel port for some, so every struct we pack
    (tcp, udp, icmp, owner and negated owner, multiport, comment, addrtype, conntrack, REJECT) and
    the serve chain's owners are compared."""
    pods = {name: (s.parsed_pod(), s.namespace_labels) for name, s in map(_scenario, scenarios.names())}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        pods[f"example-{path.stem}"] = (parse_pod(yaml.safe_load(path.read_text())), {})
    many = ",".join([*map(str, range(3000, 3020)), "4000-4100", "5000-5001/udp"])
    pod, labels = pods["app-proxy-rogue"]
    annotations = {**(pod.metadata.annotations or {}), "allow.netisolate.io/app": many}
    pods["many-ports"] = (
        pod.model_copy(update={"metadata": pod.metadata.model_copy(update={"annotations": annotations})}),
        labels,
    )
    found = {}
    for name, (pod, labels) in pods.items():
        settings = Settings(
            allow_root=name != "audit-mode", sentinel_port=65000 if name == "udp-grant" else 9
        )
        policy = replace(pod_policy(pod, labels), identity=IdentityMode.UID)
        rs = build_ruleset(policy, settings)
        if rs is not None:
            found[name] = rs
    return found


def _scenario(name: str) -> tuple[str, scenarios.Scenario]:
    return name, scenarios.load(name)


RULESETS = _uid_rulesets()


@contextmanager
def fresh_netns() -> Iterator[NetNS]:
    """A network namespace of its own, held by a process, gone afterwards."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], start_new_session=True)
    try:
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{holder.pid}/ns/net").st_ino == own:
            assert time.monotonic() < deadline, "unshare --net did not start"
            time.sleep(0.005)
        with NetNS.open(f"/proc/{holder.pid}/ns/net") as ns:
            yield ns
    finally:
        holder.kill()
        holder.wait()


def kernel_entries(ns: NetNS, family: Family) -> list[bytes]:
    """The filter table as the kernel holds it, without counters and hook marks."""

    def read() -> bytes:
        with xtables.opened(family) as raw:
            return xtables.entries(raw, family, xtables.info(raw, family).size)

    return [cleared(family, entry) for _, entry in split(family, ns.run(read))]


def saved(ns: NetNS, family: Family) -> list[str]:
    out = run_tool(ns, [f"{TOOLS[family]}-save", "-t", "filter"]).stdout
    return [line for line in out.splitlines() if not line.startswith("#")]


def restored(ns: NetNS, rs: RuleSet, family: Family) -> None:
    result = run_tool(ns, [f"{TOOLS[family]}-restore", "--noflush"], rules.document(rs, family))
    assert result.returncode == 0, result.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("name", RULESETS)
def test_a_new_sandbox_is_written_in_process_exactly_as_the_tools_write_it(name: str) -> None:
    rs = RULESETS[name]
    with fresh_netns() as ours, fresh_netns() as tools:
        assert written_in_process(ours, rs)
        for family in FAMILIES:
            restored(tools, rs, family)
            assert kernel_entries(ours, family) == kernel_entries(tools, family)
            assert saved(ours, family) == saved(tools, family)
        assert select_backend("iptables").verify(ours, rs) == []


@pytest.mark.kernel
def test_the_built_in_policies_are_kept() -> None:
    rs = RULESETS["app-proxy-rogue"]
    with fresh_netns() as ns:
        for family in FAMILIES:
            assert run_tool(ns, [TOOLS[family], "-P", "INPUT", "DROP"]).returncode == 0
        assert written_in_process(ns, rs)
        for family in FAMILIES:
            assert ":INPUT DROP [0:0]" in saved(ns, family)


@pytest.mark.kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_a_table_holding_anyones_rule_goes_to_the_tools(family: Family) -> None:
    rs = RULESETS["app-proxy-rogue"]
    with fresh_netns() as ns:
        assert run_tool(ns, [TOOLS[family], "-A", "INPUT", "-j", "ACCEPT"]).returncode == 0
        assert not written_in_process(ns, rs)
        assert (f":{rules.CHAIN} - [0:0]" in saved(ns, 6)) == (family == 4), "IPv6 goes first"
        assert f":{rules.CHAIN} - [0:0]" not in saved(ns, family)
        select_backend("iptables").apply(ns, rs)
        assert "-A INPUT -j ACCEPT" in saved(ns, family)
        assert select_backend("iptables").verify(ns, rs) == []


@pytest.mark.kernel
def test_a_table_that_changes_before_the_replace_goes_to_the_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone adds a rule between our read and our replace: the kernel refuses the replace (the
    entry count moved), nothing of ours or theirs is lost, and the tools write the rules."""
    rs = RULESETS["app-proxy-rogue"]
    real = xtables.replace

    def raced(raw: object, family: Family, new: object, num_counters: int) -> None:
        subprocess.run([TOOLS[family], "-A", "FORWARD", "-j", "DROP"], check=True)  # in the namespace
        real(raw, family, new, num_counters)  # type: ignore[arg-type]

    with fresh_netns() as ns:
        monkeypatch.setattr(xtables, "replace", raced)
        assert not written_in_process(ns, rs)
        assert "-A FORWARD -j DROP" in saved(ns, 6)
        monkeypatch.undo()
        select_backend("iptables").apply(ns, rs)
        assert "-A FORWARD -j DROP" in saved(ns, 6)
        assert select_backend("iptables").verify(ns, rs) == []


@pytest.mark.kernel
def test_ipv4_is_written_last_and_not_at_all_when_ipv6_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = RULESETS["app-proxy-rogue"]
    order: list[Family] = []
    real = xtables.replace

    def recorded(raw: object, family: Family, new: object, num_counters: int) -> None:
        order.append(family)
        if family == 6 and len(order) == 1:
            raise OSError(22, "refused")
        real(raw, family, new, num_counters)  # type: ignore[arg-type]

    with fresh_netns() as ns:
        monkeypatch.setattr(xtables, "replace", recorded)
        pristine = kernel_entries(ns, 4)
        assert not written_in_process(ns, rs)
        assert order == [6] and kernel_entries(ns, 4) == pristine
        assert written_in_process(ns, rs)
        assert order == [6, 6, 4]


@pytest.mark.kernel
def test_a_lock_file_held_too_long_fails_the_write(monkeypatch: pytest.MonkeyPatch) -> None:
    rs = RULESETS["app-proxy-rogue"]
    monkeypatch.setattr("netisolate.backends.iptables._TOOL_TIMEOUT_S", 0.2)
    with fresh_netns() as ns, open(lock_file(6)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pristine = kernel_entries(ns, 6)
        with pytest.raises(EnforceError, match=r"IPv6 rules failed \(in-process\): no answer within"):
            written_in_process(ns, rs)
        assert kernel_entries(ns, 6) == pristine


@pytest.mark.kernel
@pytest.mark.parametrize(
    "someone",
    [
        "nothing",
        "a rule after our jumps",
        "a rule before our jumps",
        "a second jump to our chain",
    ],
)
def test_a_changed_policy_reads_output_with_a_tool_only_when_our_jumps_are_not_exactly_first(
    someone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUTPUT is judged from the kernel's entries: exactly our jumps first and none after them
    needs no `-save`; anything else is read by the tool and repaired (jumps once and first),
    everyone's rules kept."""
    rs, changed = RULESETS["app-proxy-rogue"], RULESETS["many-ports"]
    backend = IptablesBackend()
    extra = {
        "nothing": None,
        "a rule after our jumps": ["-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT"],
        "a rule before our jumps": ["-I", "OUTPUT", "1", "-p", "udp", "-j", "ACCEPT"],
        "a second jump to our chain": ["-A", "OUTPUT", "-p", "udp", "-j", rules.CHAIN],
    }[someone]
    with fresh_netns() as ns:
        backend.apply(ns, rs)
        for family in FAMILIES:
            if extra is not None:
                assert run_tool(ns, [TOOLS[family], *extra]).returncode == 0
        read: list[Family] = []
        real = IptablesBackend._output

        def output(self: IptablesBackend, ns_: NetNS, family: Family) -> list[str]:
            read.append(family)
            return real(self, ns_, family)

        monkeypatch.setattr(IptablesBackend, "_output", output)
        backend.apply(ns, changed)
        needs_a_tool = someone in ("a rule before our jumps", "a second jump to our chain")
        assert sorted(read) == (sorted(FAMILIES) if needs_a_tool else [])
        assert backend.verify(ns, changed) == []
        for family in FAMILIES:
            output_rules = [line for line in saved(ns, family) if line.startswith("-A OUTPUT")]
            assert output_rules[: len(rules.jumps(family))] == [f"-A OUTPUT {j}" for j in rules.jumps(family)]
            assert ("-A OUTPUT -p udp -j ACCEPT" in output_rules) == (someone.startswith("a rule"))


# --- the pure layer ------------------------------------------------------------------------------


def _policy(family: Family, verdict: int = -2) -> bytes:
    return _entry(family, None, _standard(verdict))


def _pristine(family: Family, policy: bytes | None = None) -> tuple[bytes, tuple[int, ...]]:
    """A new table's entries (INPUT, FORWARD, OUTPUT policies and ERROR) and its hook offsets;
    `policy` in place of FORWARD's."""
    accept = _policy(family)
    entries = accept + (policy or accept) + accept + _entry(family, None, _error("ERROR"))
    size = len(accept)
    offsets = (0xFFFFFFFF, 0, size, size + len(policy or accept), 0xFFFFFFFF)
    return entries, offsets


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_policies_of_a_new_table(family: Family) -> None:
    entries, offsets = _pristine(family, _policy(family, -1))
    assert builtin_policies(family, entries, offsets, offsets) == [
        _policy(family),
        _policy(family, -1),
        _policy(family),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_rule_in_a_built_in_chain_is_not_pristine(family: Family) -> None:
    entries, offsets = _pristine(family)
    with pytest.raises(LayoutError):
        builtin_policies(family, _policy(family) + entries, offsets, offsets)
    moved = (*offsets[:3], offsets[3] + 1, offsets[4])
    with pytest.raises(LayoutError):
        builtin_policies(family, entries, offsets, moved)


RULE = rules.Rule(rules.ACCEPT, (rules.tcp(dport=80),), "tcp")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "policy",
    ["RETURN", "a jump", "a match", "a header field"],
)
def test_only_an_accept_or_drop_policy_is_pristine(family: Family, policy: str) -> None:
    odd = {
        "RETURN": _policy(family, -5),
        "a jump": _policy(family, 0),
        "a match": _entry(family, RULE, _standard(-2)),
        "a header field": _entry(family, rules.Rule(rules.ACCEPT, protocol="udp"), _standard(-2)),
    }[policy]
    entries, offsets = _pristine(family, odd)
    with pytest.raises(LayoutError):
        builtin_policies(family, entries, offsets, offsets)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_table_without_its_error_entry_is_not_pristine(family: Family) -> None:
    entries, offsets = _pristine(family)
    policy = _policy(family)
    with pytest.raises(LayoutError):
        builtin_policies(family, entries[: 3 * len(policy)] + policy, offsets, offsets)


@given(st.sampled_from(FAMILIES), st.binary(max_size=2048))
def test_reading_any_bytes_raises_only_layout_errors(family: Family, data: bytes) -> None:
    offsets = _pristine(family)[1]
    with suppress(LayoutError):
        builtin_policies(family, data, offsets, offsets)


@given(st.sampled_from(FAMILIES), st.data())
def test_a_new_table_with_any_bytes_changed_is_read_or_refused(family: Family, data: st.DataObject) -> None:
    """Mutations of a real layout reach past the first checks: what is read back is either three
    plain ACCEPT or DROP policies or a LayoutError, never another exception."""
    entries, offsets = _pristine(family)
    at = data.draw(st.integers(0, len(entries) - 1))
    patch = data.draw(st.binary(min_size=1, max_size=8))
    mutated = entries[:at] + patch + entries[at + len(patch) :]
    with suppress(LayoutError):
        policies = builtin_policies(family, mutated, offsets, offsets)
        assert all(p in (_policy(family), _policy(family, -1)) for p in policies)


def test_a_comment_with_other_characters_is_quoted_as_save_prints_it() -> None:
    assert str(rules.comment("app")) == "-m comment --comment app"
    assert str(rules.comment("app,proxy")) == '-m comment --comment "app,proxy"'
    assert rules.comment("app,proxy").data.rstrip(b"\0") == b"app,proxy"
