"""The ruleset in nftables: one `inet` table of our own, in `nft list`'s own format (less counter
values), so what is loaded is what the kernel lists back and drift detection is a comparison.
What the rules decide, and why, is explained once, in `netisolate.rules`.

Everything that names a container's identity lives in named sets, so the chains are the same for
every pod of a given shape and a changed policy is an element update inside the existing table:

- `grants`      identity . protocol . port        — rule 8, one hash lookup whatever the number of
                grants: the single ports, which a SYN to a granted port meets first
- `grant_ranges` identity . protocol . port-range — rule 8's port ranges: an interval set, whose
                lookup costs a loopback connection ~3 % where the hash costs ~0.1 % (measured)
- `owners`      identity . protocol . port        — who may serve a declared port (rules 2 and 4)
- `owned`       protocol . port                   — the declared ports
- `identities`  identity, with a counter each      — the refusals per container (rule 9)
- `observed`    identity . protocol . port        — filled by the packet path: what the grants did
  not allow (learning). Its elements are the kernel's, not ours: never drift, never loaded.

The identity is the key `IDENTITY` names (the socket's UID); the sets are declared with `typeof`
that key, so an identity of another kind changes the key, not the layout. Cgroup identity has a set
per container holding its cgroup (`c-<name>`, which the owner rules and the refusal counters name)
and the pod's (`pod`), the same `grants` and `grant_ranges` keyed by the container's cgroup ID
(`_grant_key`: the UID first under uid+cgroup), and the same `observed`. Its elements name cgroups
by path when loaded and by ID when listed; nft 1.0 deletes none by ID, so a set that must lose an
element is flushed and refilled in one transaction (`elements`, `update`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from netisolate.policy import PortRange
from netisolate.rules import Cgroup, CgroupOwner, CgroupRules, RuleSet

TABLE = "netisolate"
IDENTITY = "meta skuid"
OBSERVED_SIZE = 256  # distinct identity . protocol . port per pod the kernel keeps; the rest is not recorded
OBSERVED_TIMEOUT = "1h"  # an observation not seen again for this long is forgotten by the kernel
# the packets that stay in the pod, or of which the kernel keeps a copy for it (see WHICH PACKETS)
_JUDGED = (
    'oif "lo"',
    "ip daddr 127.0.0.0/8",
    "ip6 daddr ::1",
    "fib daddr type local",
    "meta l4proto { udp, udplite } fib daddr type { broadcast, multicast }",
    "meta l4proto { udp, udplite } ip6 daddr ff00::/8",
)
_SYN_ACK = "tcp flags syn,ack / syn,ack"
# Decision 1, first in the output chain, before the matches that pick the judged packets: it passes
# a packet whatever its destination, and the ACKs and FINs of every connection (half of a loopback
# connection's packets) then meet one rule, not a jump and a rule.
_NOT_OPENING = "tcp flags ! syn accept"
# Decisions 8 and 2 for TCP, next, also whatever the destination: a SYN to a port granted to its UID
# and a SYN-ACK from a port's owner pass anyway, judged or not, so they meet two or three rules
# instead of a jump and up to nine (+1.1 % of the loopback connection rate, 95 % CI 0.4-1.9 %,
# measured). A grant of the sentinel port is kept out of `grants` (`sets`): decision 6 comes first,
# so it never counted, and here it would keep the sentinel from answering.
_EARLY = (
    f"tcp flags syn / syn,ack {IDENTITY} . meta l4proto . tcp dport @grants accept",
    f"{_SYN_ACK} {IDENTITY} . meta l4proto . tcp sport @owners accept",
)
# nft lists a port after a protocol match by the protocol's name (`udp sport`), so we write it so
_FIRST = (  # decisions 2-3, whatever the identity
    f"{_SYN_ACK} goto serve",
    "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
    "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept",
)
_UDP_NOT_OWNER = f"meta l4proto . udp sport @owned {IDENTITY} . meta l4proto . udp sport != @owners"
_FLOW = f"{IDENTITY} . meta l4proto . th dport"
_RECORDED = "meta l4proto { tcp, udp } update @observed"


@dataclass(frozen=True)
class NftSet:
    name: str
    declaration: tuple[str, ...]  # the lines before `elements`, as nft lists them
    elements: tuple[str, ...] = ()  # each `KEY[ counter][ comment "..."]`, in nft's element syntax
    dynamic: bool = False  # written by the packet path: its elements are not ours


def _port(p: PortRange) -> str:
    return str(p.low) if p.low == p.high else f"{p.low}-{p.high}"


def _comment(containers: str) -> str:
    return f' comment "{containers}"'


def sets(rs: RuleSet) -> tuple[NftSet, ...]:
    """The table's named sets with the elements this ruleset wants (cgroups by ID, as listed), in
    a stable order."""
    if rs.cgroups is not None:
        return _cgroup_sets(rs.cgroups, loading=False)
    grants = [
        (p.low == p.high, f"{g.uid} . {g.protocol} . {_port(p)}{_comment(g.containers)}")
        for g in rs.grants
        for p in g.ports
        if not p.low == p.high == rs.sentinel_port  # see _EARLY
    ]
    owners = [f"{uid} . {o.protocol} . {o.port}{_comment(o.containers)}" for o in rs.owners for uid in o.uids]
    return (
        NftSet("grants", (f"typeof {_FLOW}",), tuple(e for single, e in grants if single)),
        NftSet(
            "grant_ranges",
            (f"typeof {_FLOW}", "flags interval"),
            tuple(e for single, e in grants if not single),
        ),
        NftSet("owners", (f"typeof {IDENTITY} . meta l4proto . th sport",), tuple(owners)),
        NftSet(
            "owned", ("typeof meta l4proto . th sport",), tuple(f"{o.protocol} . {o.port}" for o in rs.owners)
        ),
        NftSet(
            "identities",
            (f"typeof {IDENTITY}", "counter"),
            tuple(f"{i.uid} counter{_comment(i.containers)}" for i in rs.identities),
        ),
        _observed(f"typeof {_FLOW}"),
    )


def _observed(key: str) -> NftSet:
    """The learning record (rule 9), its elements written by the packet path."""
    declaration = (
        key,
        f"size {OBSERVED_SIZE}",
        "flags dynamic,timeout",
        "counter",
        f"timeout {OBSERVED_TIMEOUT}",
    )
    return NftSet("observed", declaration, dynamic=True)


def _judging(rs: RuleSet) -> list[str]:
    if rs.cgroups is not None:
        return _judging_by_cgroup(rs, rs.cgroups)
    rules = [*_FIRST, f"{_UDP_NOT_OWNER} goto refuse"]
    if rs.stateful:
        rules.append("ct direction reply accept")
    rules.append(_sentinel(rs))
    if rs.allow_root:
        rules.append(f"{IDENTITY} 0 accept")
    rules += [
        f"{_FLOW} @grants accept",
        f"{_FLOW} @grant_ranges accept",
        f"{_RECORDED} {{ {_FLOW} }}",
        "goto refuse",
    ]
    return rules


def _sentinel(rs: RuleSet) -> str:
    """Rule 6, the port compared before the protocol: every SYN meets this rule, and a compare that
    fails costs less than the lookup in `{ tcp, udp }`."""
    return f"th dport {rs.sentinel_port} meta l4proto {{ tcp, udp }} reject with icmpx admin-prohibited"


def _serve(rs: RuleSet) -> list[str]:
    """SYN-ACKs, in a chain of their own so that a SYN never meets the declared ports. By UID, an
    owner's passes and any other from a declared port is refused (two lookups). By cgroup,
    a SYN-ACK's request socket has no cgroup to match (`socket cgroupv2` breaks on it): a declared
    TCP port is kept to its owners on input instead (`_receiving`), where the SYN meets the
    listener; under uid+cgroup the owners' UIDs are held to it here as well."""
    if rs.cgroups is None:
        return [
            f"{IDENTITY} . meta l4proto . th sport @owners accept",
            "meta l4proto . th sport @owned goto refuse",  # a SYN cookie's SYN-ACK, socketless, too
            "accept",
        ]
    cg = rs.cgroups
    owners = [(o.port, cg.uids(o), ",".join(o.members)) for o in cg.owned("tcp")] if cg.by_uid else []
    rules = []
    for port, uids, containers in owners:
        served = f"tcp sport {port}"
        if uids:
            owned_by = _one_or_set([str(u) for u in uids])
            rules.append(f'{served} meta skuid {owned_by} accept comment "{containers}"')
        rules.append(f"{served} goto refuse")
    return [*rules, "accept"]


def _refuse(rs: RuleSet) -> list[str]:
    if rs.cgroups is not None:
        cg = rs.cgroups
        rules = [f'{_in(cg, m.set)} counter goto deny comment "{m.name}"' for m in cg.members]
        return [*rules, "counter goto deny"]
    return [f"{IDENTITY} @identities goto deny", "counter goto deny"]


def _one_or_set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


# --- cgroup identity (see CGROUP IDENTITY) -----------------------------------------------------


def _in(cg: CgroupRules, set_name: str, level: int | None = None, negated: bool = False) -> str:
    depth = cg.level if level is None else level
    return f"socket cgroupv2 level {depth} {'!= ' if negated else ''}@{set_name}"


class GrantKey(NamedTuple):
    """The grant sets' key under cgroup identity: how they are declared, and what a packet is
    looked up by (under uid+cgroup the socket's UID too). `type`, not `typeof`: see
    `_cgroup_sets`."""

    declared: str
    looked_up: str


def _grant_key(cg: CgroupRules) -> GrantKey:
    flow = f"socket cgroupv2 level {cg.level} . meta l4proto . th dport"
    if cg.by_uid:
        return GrantKey("type uid . cgroupsv2 . inet_proto . inet_service", f"meta skuid . {flow}")
    return GrantKey("type cgroupsv2 . inet_proto . inet_service", flow)


def _grants(cg: CgroupRules, loading: bool) -> tuple[list[str], list[str]]:
    """Rule 8's elements by cgroup: (single ports, port ranges), each member's grants once per
    cgroup the rules know it by. A member not seen yet has none: it is refused everything."""
    single: list[str] = []
    ranges: list[str] = []
    for m in cg.usable():
        if m.cgroup is None:
            continue
        who = (f"{m.uid} . " if cg.by_uid else "") + _element(m.cgroup, loading)
        for protocol, ports in m.grants:
            for p in ports:
                (single if p.low == p.high else ranges).append(
                    f"{who} . {protocol} . {_port(p)}{_comment(m.name)}"
                )
    return single, ranges


def _cgroup_elements(cg: CgroupRules, loading: bool) -> dict[str, list[str]]:
    """Every set of ours whose elements name cgroups, with them: the pod's, each container's, the
    grants."""
    found = {name: [_element(cgroup, loading)] if cgroup else [] for name, cgroup in cg.elements()}
    single, ranges = _grants(cg, loading)
    found |= {"grants": single, "grant_ranges": ranges}
    if cg.owners:
        members = {m.name: m for m in cg.members}
        found["owned"] = [f"{o.protocol} . {o.port}" for o in cg.owners]
        found["owners"] = [
            f"{_element(cgroup, loading)} . {o.protocol} . {o.port}{_comment(name)}"
            for o in cg.owners
            for name in o.members
            if (cgroup := members[name].cgroup) is not None
        ]
    return found


def _not_owner(cg: CgroupRules, owner: CgroupOwner) -> str:
    return " ".join(_in(cg, f"c-{name}", negated=True) for name in owner.members)


def _judging_by_cgroup(rs: RuleSet, cg: CgroupRules) -> list[str]:
    rules = list(_FIRST)
    for owner in cg.owned("udp"):
        comment = f'comment "{",".join(owner.members)}"'
        rules.append(f"udp sport {owner.port} {_not_owner(cg, owner)} goto refuse {comment}")
        if cg.by_uid:
            uids = cg.uids(owner)
            others = f"meta skuid != {_one_or_set([str(u) for u in uids])} " if uids else ""
            rules.append(f"udp sport {owner.port} {others}goto refuse {comment}")
    if rs.stateful:
        rules.append("ct direction reply accept")
    rules.append(_sentinel(rs))
    key = _grant_key(cg).looked_up
    rules += [f"{key} @grants accept", f"{key} @grant_ranges accept"]
    in_pod = _in(cg, "pod", level=cg.level - 1)
    rules.append(f"{in_pod} {_RECORDED} {{ socket cgroupv2 level {cg.level} . meta l4proto . th dport }}")
    rules.append(f"{in_pod} goto refuse")
    if rs.allow_root:
        rules.append("meta skuid 0 accept")
    rules.append("goto refuse")
    return rules


def _receiving(cg: CgroupRules) -> list[str]:
    """The input hook: what opens a flow to a declared port is refused when the socket it would be
    delivered to is in no owner's cgroup. Every packet the pod receives takes this hook, so TCP
    that opens nothing (all but the SYN) passes first, and the rest meets two lookups, however
    many ports are declared: before, each packet walked one rule per declared port (150 of them
    cost 44 % of the loopback connection rate, and a SYN alone still ~10 %)."""
    flow = f"socket cgroupv2 level {cg.level} . meta l4proto . th dport"
    return [
        "type filter hook input priority filter; policy accept;",
        "tcp flags != syn / syn,ack accept",
        f"meta l4proto . th dport @owned {flow} != @owners goto refuse",
    ]


def _element(cgroup: Cgroup, loading: bool) -> str:
    """nft lists an ID back when it finds no path for it (the agent lists from where it cannot)."""
    return f'"{cgroup.path}"' if loading else str(cgroup.id)


def _cgroup_sets(cg: CgroupRules, loading: bool) -> tuple[NftSet, ...]:
    # `type`, not `typeof`: nft 1.0.6 lists a `typeof socket cgroupv2 level N` key back as level 0
    elements = _cgroup_elements(cg, loading)
    key = _grant_key(cg).declared
    declared: dict[str, tuple[str, ...]] = {name: ("type cgroupsv2",) for name, _ in cg.elements()}
    declared |= {"grants": (key,), "grant_ranges": (key, "flags interval")}
    if cg.owners:  # the input hook's: declared ports, and each by its owners' cgroups
        by_cgroup = "type cgroupsv2 . inet_proto . inet_service"
        declared |= {"owned": ("type inet_proto . inet_service",), "owners": (by_cgroup,)}
    sets_ = (NftSet(name, declaration, tuple(elements[name])) for name, declaration in declared.items())
    return (*sets_, _observed("type cgroupsv2 . inet_proto . inet_service"))


def elements(rs: RuleSet, installed: RuleSet) -> tuple[str, str]:
    """Two `nft -f` documents that turn the sets of `installed` into those of `rs`: first the new
    cgroups are added, to the containers' sets and the grants (~1 ms: the grants hold from here),
    then the old ones cleared out (which waits ~15 ms in the kernel for RCU). nft 1.0 takes a
    cgroup only by path, so an element whose cgroup is gone cannot be deleted by name: the set is
    flushed and refilled in one transaction, never empty in between. Until then it also holds the
    removed cgroup's ID, which nothing can be in again (IDs are not reused). Either document may
    be empty."""
    assert rs.cgroups is not None and installed.cgroups is not None
    ids, paths = _cgroup_elements(rs.cgroups, False), _cgroup_elements(rs.cgroups, True)
    old = _cgroup_elements(installed.cgroups, False)
    added, cleared = [], []
    for name, wanted in ids.items():
        fresh = [path for key, path in zip(wanted, paths[name], strict=True) if key not in old.get(name, [])]
        added += [_added(name, fresh)] if fresh else []
        if set(old.get(name, [])) - set(wanted):
            cleared.append(_refilled(name, paths[name]))
    return "".join(added), "".join(cleared)


def _added(name: str, items: list[str]) -> str:
    return f"add element inet {TABLE} {name} {{ {', '.join(items)} }}\n"


def _refilled(name: str, items: list[str]) -> str:
    """A set emptied and filled anew, in the same transaction."""
    return f"flush set inet {TABLE} {name}\n" + (_added(name, items) if items else "")


def _deny(rs: RuleSet) -> list[str]:
    if rs.mode == "audit":
        return ["accept"]
    return ["meta l4proto tcp reject with tcp reset", "meta l4proto udp reject", "drop"]


def _set_block(s: NftSet) -> str:
    lines = [f"\t\t{line}\n" for line in s.declaration]
    if s.elements and not s.dynamic:
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(s.elements) + " }\n")
    return f"\tset {s.name} {{\n" + "".join(lines) + "\t}"


def table(rs: RuleSet, loading: bool = False) -> str:
    """The table block as `nft list table inet netisolate` prints it, but for the line breaks inside
    element lists; counters print as `counter`. `loading`: cgroups by path, for `nft -f` (it lists
    them back by ID, see CGROUP IDENTITY)."""
    chains = {
        "output": [
            "type filter hook output priority filter; policy accept;",
            _NOT_OPENING,
            *(_EARLY if rs.cgroups is None else ()),
            *(f"{match} jump loopback" for match in _JUDGED),
        ],
        "loopback": _judging(rs),
        "serve": _serve(rs),
        "refuse": _refuse(rs),
        "deny": _deny(rs),
    }
    if rs.cgroups is not None and rs.cgroups.owners:
        chains["input"] = _receiving(rs.cgroups)
    declared = _cgroup_sets(rs.cgroups, loading) if rs.cgroups is not None else sets(rs)
    blocks = [_set_block(s) for s in declared]
    blocks += [
        f"\tchain {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}"
        for name, lines in chains.items()
    ]
    return f"table inet {TABLE} {{\n" + "\n\n".join(blocks) + "\n}\n"


def create(rs: RuleSet) -> str:
    """The `nft -f` document for a namespace that has no table of ours: it fails ("File exists")
    rather than touch one that is there, and costs a third of a replacement (no RCU wait)."""
    return f"create table inet {TABLE}\n{table(rs, loading=True)}"


def replace(rs: RuleSet) -> str:
    """The `nft -f` document that replaces our table, whatever is there: declare (so it works on a
    first apply too), delete, re-create. The kernel applies all of it or none, so there is no moment
    with half a table, and loading it twice leaves the same table: atomic and idempotent."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n{table(rs, loading=True)}"


# --- reading a listing back ----------------------------------------------------------------------

_ELEMENTS = re.compile(r"\n\t\telements = \{ (.*?) \}(?=\n)", re.DOTALL)
_SET_NAME = re.compile(r"\tset (\S+) \{\n")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_STATE = re.compile(r" (?:counter|comment)\b.*$")
_ITEM = re.compile(r'(?:[^,"]|"[^"]*")+')


@dataclass(frozen=True)
class Listing:
    """A table split into its layout (chains and set declarations, counters without values) and the
    elements of each set, as nft lists them."""

    layout: str
    elements: Mapping[str, tuple[str, ...]]


def parse(text: str) -> Listing:
    """Parse `nft list table` output (or `table()`); element order and line breaks do not count."""
    layout = _COUNTER.sub("counter", _ELEMENTS.sub("", text))
    elements = {
        name: tuple(_COUNTER.sub("counter", e) for e in items) for name, items in _raw_elements(text).items()
    }
    return Listing(layout, elements)


@lru_cache(maxsize=1024)
def expected(rs: RuleSet) -> Listing:
    """What the kernel lists for this ruleset, parsed: the one side of every comparison (cached: the
    agent compares each pod's ruleset on every round and update)."""
    return parse(table(rs))


def element_key(element: str, interval: bool) -> str:
    """What identifies an element to `delete element`: the key, without counter and comment. In an
    interval set a single port is spelt as the range `P-P` (nft 1.0.6 finds no element otherwise)."""
    key = _STATE.sub("", element)
    last = key.rsplit(" ", 1)[-1]
    return f"{key}-{last}" if interval and last.isdigit() else key


def element_changes(rs: RuleSet, listed: Listing) -> list[tuple[str, list[str], list[str]]]:
    """(set, elements missing, elements unexpected) for each set either side has; the kernel's own
    (`observed`) never count."""
    wanted = expected(rs).elements
    changes = []
    for name in sorted({*wanted, *listed.elements} - {"observed"}):
        want, have = wanted.get(name, ()), listed.elements.get(name, ())
        changes.append((name, [e for e in want if e not in have], sorted(set(have) - set(want))))
    return changes


def update(rs: RuleSet, listed: Listing) -> str | None:
    """The `nft -f` document that turns a listed table with this ruleset's layout into exactly this
    ruleset by element updates alone — one transaction, so no packet sees a half-changed policy —
    or None when the layout differs (then only `replace` will do). "" when nothing is to change."""
    if expected(rs).layout != listed.layout:
        return None
    if rs.cgroups is not None:  # listed by ID, loaded by path: each changed set is refilled
        paths = _cgroup_elements(rs.cgroups, True)
        changed = [name for name, missing, unexpected in element_changes(rs, listed) if missing or unexpected]
        return "".join(_refilled(name, paths.get(name, [])) for name in changed)
    interval = {s.name for s in sets(rs) if "flags interval" in s.declaration}
    lines = []
    for name, missing, unexpected in element_changes(rs, listed):
        if unexpected:
            keys = ", ".join(sorted({element_key(e, name in interval) for e in unexpected}))
            lines.append(f"delete element inet {TABLE} {name} {{ {keys} }}\n")
        if missing:
            lines.append(f"add element inet {TABLE} {name} {{ {', '.join(missing)} }}\n")
    return "".join(lines)


def drift(rs: RuleSet, listed: Listing) -> list[str]:
    """What differs between a listed table and this ruleset ([] when exactly equal): layout lines
    missing or unexpected, and each set's missing or unexpected elements. Counter values and the
    kernel-written `observed` elements never count."""
    problems = _line_drift(expected(rs).layout, listed.layout)
    for name, missing, unexpected in element_changes(rs, listed):
        problems += [f"missing in set {name}: {e}" for e in missing]
        problems += [f"unexpected in set {name}: {e}" for e in unexpected]
    return problems


def _line_drift(expected: str, actual: str) -> list[str]:
    if expected == actual:
        return []
    diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(), n=0, lineterm="")
    return [
        f"{'unexpected' if line[0] == '+' else 'missing'}: {line[1:].strip()}"
        for line in diff
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


_OBSERVED = re.compile(r"^(.+?) \. (tcp|udp) \. (\d+) counter packets (\d+)")
_IDENTITY_COUNTER = re.compile(r'^(.+?) counter packets (\d+) bytes \d+(?: comment "([^"]*)")?')
_DENY_RULE = re.compile(r'counter packets (\d+) bytes \d+ goto deny(?: comment "([^"]*)")?\n')


def observed(text: str) -> list[tuple[str, str, int, int]]:
    """(identity, protocol, port, packets) of each element of the listed `observed` set."""
    found = []
    for element in _raw_elements(text).get("observed", ()):
        match = _OBSERVED.match(element)
        if match:
            found.append((match[1], match[2], int(match[3]), int(match[4])))
    return found


def refused(text: str) -> dict[str, int]:
    """Refused packets by the containers of each identity ("" for sockets of no known identity)."""
    counts: dict[str, int] = {}
    for element in _raw_elements(text).get("identities", ()):
        match = _IDENTITY_COUNTER.match(element)
        if match:
            counts[match[3] or ""] = counts.get(match[3] or "", 0) + int(match[2])
    for packets, containers in _DENY_RULE.findall(text):  # unknown sockets; cgroup identity's members
        counts[containers] = counts.get(containers, 0) + int(packets)
    return counts


def _raw_elements(text: str) -> Mapping[str, tuple[str, ...]]:
    """The elements of each set as listed, counter values kept."""
    out: dict[str, tuple[str, ...]] = {}
    for match in _ELEMENTS.finditer(text):
        names = _SET_NAME.findall(text, 0, match.start())
        out[names[-1] if names else ""] = tuple(
            " ".join(i.split()) for i in _ITEM.findall(match[1]) if i.strip()
        )
    return out
