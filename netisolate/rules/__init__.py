"""The rules: pod policy → one backend-neutral ruleset, which `rules.nft` and `rules.iptables` render
as the exact documents their backends load. Pure. This docstring is the one place that explains what
the rules decide; the dialects only spell it.

WHICH PACKETS. Every packet the pod's namespace sends that will be delivered inside it: routed to
`lo`, or addressed to 127.0.0.0/8 or ::1, or to one of the pod's own addresses as the routing table
says (`local`). The device is the one chosen before NAT (the output hook's device does not change
when a nat OUTPUT rule re-routes a packet), so a connection NAT sends to this host is caught by its
new destination: a mesh's REDIRECT to 127.0.0.1 / ::1 by the address, a DNAT to the pod's own
address by the routing table's word that it is local. Hence four matches that jump to the judging
chain. Besides, every UDP and UDP-Lite datagram to a broadcast or multicast address (IPv4: what the
routing table calls broadcast or multicast, the pod subnet's broadcast included; IPv6: ff00::/8),
whatever its device: the kernel delivers a copy of it to the pod's own sockets, so it is judged like
loopback — a container that multicasts needs a grant for the port. Only datagrams: the kernel's own
IGMP, MLD and neighbour discovery carry no container's UID and must still flow. Ports are the ones a
packet is finally delivered to, after NAT. Traffic through other interfaces is not judged.

THE DECISIONS, in the order both dialects evaluate them for every such packet:

1. TCP packets without SYN pass — see CONNECTION STATE below. First, because every packet of an
   open connection takes this path; nftables decides it even before the matches above (any TCP
   packet without SYN passes whatever its destination, so it need not know whether it is judged).
2. A SYN-ACK from a port a container declares (`containerPort` + protocol: an Owner) passes only
   from a UID of a container that declares it; from anyone else it is refused, so a container that
   listens on another's port while that one restarts never completes a connection. Any other SYN-ACK
   passes. SYN-ACKs are judged in a chain of their own (`serve`), so a SYN never walks the declared
   ports. Written as "owner: accept, else refuse", so a SYN-ACK that carries no socket (a SYN
   cookie, which a squatter could provoke) is refused too; the price is that an owner whose SYN
   queue overflows loses those handshakes to the client's retry.
3. ICMP errors pass: the kernel sends them (our own rejects included); unprivileged processes cannot.
4. A UDP datagram from a declared port is refused unless its UID is one of the port's owners.
5. Where the policy grants UDP, or the pod is at audit, conntrack lets replies of accepted flows
   pass: the reply direction only. A datagram in the original direction is judged again, so a UID
   that binds the source port of a closed, granted flow does not inherit its conntrack entry.
6. The sentinel port is answered with ICMP admin-prohibited, whoever asks: only our rules do that,
   which is how `netisolate gate` knows they are live.
7. UID 0 (the runtime: `kubectl port-forward`) passes unless the agent denies port-forward, and never
   in a user-namespaced pod, where UID 0 is the pod's own root.
8. A container's UID passes to the ports granted to it: one lookup of UID . protocol . port in the
   pod's grant set, however many grants there are. nftables decides this for a TCP SYN, and 2's
   "owner: accept" for a SYN-ACK, right after 1 and, like 1, whatever the destination: what they
   accept passes anyway, judged or not, so the two most frequent openings skip the jump and the
   rules between (a grant of the sentinel port, dead behind 6, is left out of the set for that).
9. What is left is recorded, as UID . protocol . port, in a bounded set with timeouts (TCP and UDP
   only: the learning `netisolate suggest` reads), then refused: counted per container UID (the
   `refuse` chain, so metrics can name the offender, the refusals of 2 and 4 included), then denied:
   TCP reset, ICMP port-unreachable for UDP, drop for other protocols. In audit mode the deny chain
   accepts instead, so the counters and the record still show what enforcement would have stopped.

Rules 2, 4, 8 and 9 name identities only through sets (grants, owners, identities), so a changed
policy — or a container whose identity changes — is an element update in the same table, in one
transaction, never a rebuilt table.

CONNECTION STATE: TCP is judged on its opening SYN (and, for declared ports, the SYN-ACK) alone and
everything else of TCP is accepted. That is sound because admission forbids NET_RAW/NET_ADMIN (no
unprivileged process can emit a bare ACK or RST) and it keeps conntrack out of namespaces that do
not otherwise use it (conntrack costs ~14 % of the loopback connection rate). UDP has no opening
packet, so pods that grant UDP get conntrack to let replies back. So do pods at audit: there every
datagram passes, and without conntrack a reply would be recorded (rule 9) as a flow to the client's
ephemeral port, which nobody should be granted. This is the only place that choice is made.

WHAT UID IDENTITY CANNOT DO: the input path has no owner match, so a datagram (or the data of a Fast
Open SYN, where the namespace enables server-side Fast Open) sent to a declared port reaches a
squatter bound to it more specifically; rule 4 keeps the squatter from answering, and the agent's
listener check reports the squatter (`PortSquatted`). Ownership, like everything here, is judged on
the packets above only: a squatter's answers to clients beyond the pod (a Service's traffic on
eth0) are not refused — refusing socketless SYN cookies there would let any outside SYN flood cut
the owner off — and are left to the listener check too.

PORT RANGES are kept as nft lists them back (see `_merged`), so drift detection is exact.

CGROUP IDENTITY (`netisolate.io/identity: cgroup`, or `uid+cgroup` where both must match). Each
container is known by its cgroup (v2) at the containers' level of the hierarchy (`socket cgroupv2
level N`, the ancestor of the socket's cgroup at depth N): sockets a container creates can only be
in its own cgroup, whatever UID it runs as, so containers may share a UID or run as root. Each
container has a set of its own holding its cgroup's ID (empty until the agent has seen the cgroup),
and the grants name the same cgroup, so a restart — a new cgroup — is an element update, not a new
ruleset. The same decisions as above,
with the container's cgroup (and, under uid+cgroup, its UID too) in place of the UID:

- 4: a UDP datagram from a declared port passes only from a declaring container's cgroup;
- 2: a SYN-ACK leaves from a request socket, which has no cgroup the rules can see, so a declared
  TCP port is kept to its owners on input (below); under uid+cgroup the UID rule 2 stays too;
- 7: the runtime exception (UID 0) comes after the grants and after a catch-all that refuses
  every other socket of the pod's own cgroup, one level up. A container whose new cgroup the
  agent has not seen yet is refused, never let through as the runtime or given another's grant;
- 8: a container's cgroup passes to its grants: one lookup of cgroup . protocol . port (under
  uid+cgroup UID . cgroup . protocol . port) in the grant sets, which hold each grant once per
  cgroup its container is known by, so a changed policy is an element update here too;
- 9: what is left of the pod's own cgroup is recorded by the container's cgroup ID (under
  uid+cgroup too: the cgroup is what tells containers apart), then refused; sockets of other
  cgroups are not recorded, so nothing outside the pod fills its record;
- and on input: a packet that opens a flow to a declared port (a TCP SYN, any UDP datagram) is
  refused when the socket it would be delivered to is not in an owner's cgroup, so a squatter
  never receives what is meant for the owner (the hole UID identity can only report).

A socket whose cgroup is shallower than the level (a process of the node, such as the runtime's
port-forward) matches no cgroup rule at all. The kernel compares IDs; `nft` takes a path when it
loads a rule and, when the path is not found under /sys/fs/cgroup, lists the ID back: rules are
loaded by path and compared by ID (see netisolate.backends.nftables).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import groupby
from typing import Literal

from netisolate.policy import IdentityMode, Level, PodPolicy, PortRange, Protocol, without_grants

DEFAULT_SENTINEL_PORT = 9
# The kubelet's layout, either cgroup driver: kubepods/<qos>/pod<uid>/<container> (3 for a
# Guaranteed pod, which has no QoS level). What `render` shows; the agent uses what it sees.
DEFAULT_CGROUP_LEVEL = 4


@dataclass(frozen=True)
class Settings:
    """Agent settings that shape every pod's rules."""

    sentinel_port: int = DEFAULT_SENTINEL_PORT
    allow_root: bool = True  # False with --deny-port-forward
    identity: IdentityMode = IdentityMode.UID  # the node's default, --identity


@dataclass(frozen=True)
class Grant:
    uid: int
    protocol: Protocol
    ports: tuple[PortRange, ...]
    containers: str  # comma-joined names of the containers running as this UID


@dataclass(frozen=True)
class Identity:
    uid: int
    containers: str


@dataclass(frozen=True)
class Owner:
    """A declared port and the UIDs of the containers that declare it: only they may serve it."""

    protocol: Protocol
    port: int
    uids: tuple[int, ...]
    containers: str


@dataclass(frozen=True, order=True)
class Cgroup:
    """A cgroup (v2) as the rules name it: its ID, which the kernel compares and nft lists back,
    and the path nft resolves to that ID when it loads the rules (relative to /sys/fs/cgroup)."""

    id: int
    path: str


@dataclass(frozen=True)
class PodCgroups:
    """What the agent has seen of a pod's cgroups: the containers' level (their depth below the
    root of the v2 hierarchy), the pod's own cgroup (one level up) and each started container's."""

    level: int
    pod: Cgroup | None = None
    containers: tuple[tuple[str, Cgroup], ...] = ()  # (container name, its cgroup), sorted


@dataclass(frozen=True)
class Member:
    """A container known by its cgroup; under uid+cgroup its UID must match as well."""

    name: str
    uid: int | None
    cgroup: Cgroup | None  # None until the agent has seen it: the set is empty, nothing matches
    grants: tuple[tuple[Protocol, tuple[PortRange, ...]], ...]

    @property
    def set(self) -> str:
        return f"c-{self.name}"


@dataclass(frozen=True)
class CgroupOwner:
    """A declared port and the containers that declare it, by name."""

    protocol: Protocol
    port: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class CgroupRules:
    """The cgroup half of a ruleset (cgroup and uid+cgroup identity)."""

    by_uid: bool  # uid+cgroup: a member's UID must match too
    level: int
    pod: Cgroup | None
    members: tuple[Member, ...]
    owners: tuple[CgroupOwner, ...]

    def owned(self, protocol: Protocol) -> tuple[CgroupOwner, ...]:
        return tuple(owner for owner in self.owners if owner.protocol == protocol)

    def usable(self) -> tuple[Member, ...]:
        """The members the rules can name: every one, or under uid+cgroup those with a UID."""
        return tuple(m for m in self.members if m.uid is not None or not self.by_uid)

    def uids(self, owner: CgroupOwner) -> tuple[int, ...]:
        return tuple(sorted({m.uid for m in self.members if m.name in owner.members and m.uid is not None}))

    def elements(self) -> tuple[tuple[str, Cgroup | None], ...]:
        """Every set of ours and the cgroup it holds: the pod's, then each container's."""
        return (("pod", self.pod), *((m.set, m.cgroup) for m in self.members))


@dataclass(frozen=True)
class RuleSet:
    pod: str
    mode: Literal["enforce", "audit"]
    sentinel_port: int
    allow_root: bool
    grants: tuple[Grant, ...]
    identities: tuple[Identity, ...]
    owners: tuple[Owner, ...] = ()
    cgroups: CgroupRules | None = None  # cgroup identity (then grants, identities, owners are empty)
    # UID identity: the pod's own cgroup, where the agent looked it up (only the socket guard,
    # which is attached there, asks for it); cgroup identity keeps it in `cgroups.pod`
    pod_cgroup: Cgroup | None = None

    @property
    def own_cgroup(self) -> Cgroup | None:
        """The pod's own cgroup, where the agent knows it, whatever the identity."""
        return self.cgroups.pod if self.cgroups is not None else self.pod_cgroup

    @property
    def stateful(self) -> bool:
        """Conntrack is needed only for UDP replies (see CONNECTION STATE)."""
        members = self.cgroups.members if self.cgroups else ()
        return (
            self.mode == "audit"
            or any(grant.protocol == "udp" for grant in self.grants)
            or any(protocol == "udp" for m in members for protocol, _ in m.grants)
        )

    def same_but_cgroups(self, other: RuleSet) -> bool:
        """Whether the two differ at most in which cgroups their sets hold: then an element update
        turns one into the other."""
        if self.cgroups is None or other.cgroups is None:
            return False
        return replace(self, cgroups=_unseen(self.cgroups)) == replace(other, cgroups=_unseen(other.cgroups))

    def owned(self, protocol: Protocol) -> tuple[Owner, ...]:
        return tuple(owner for owner in self.owners if owner.protocol == protocol)


def _merged(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    """Sorted ranges of one protocol as nft keeps them, so what we render is what it lists (drift
    is a text comparison): a run of overlapping or adjacent ports becomes one range, unless the
    run is only single ports, which stay single (`80, 81` stays; `80, 81-90` is `80-90`)."""
    runs: list[list[PortRange]] = []
    for r in ranges:
        if runs and r.low <= max(x.high for x in runs[-1]) + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    merged: list[PortRange] = []
    for run in runs:
        if all(r.low == r.high for r in run) and len({r.low for r in run}) == len(run):
            merged += run
        else:
            merged.append(PortRange(run[0].protocol, run[0].low, max(r.high for r in run)))
    return tuple(merged)


def without_cgroups(policy: PodPolicy, settings: Settings, reason: str) -> tuple[PodPolicy, Settings]:
    """Where cgroups cannot be matched (no cgroup v2, the iptables backend), a pod that asks for
    cgroup identity is enforced under UID rules with no grants and no runtime exception: its
    containers may share UIDs or run as root, so no UID may pass (fail closed)."""
    closed = without_grants(replace(policy, identity=IdentityMode.UID), f"cgroup identity: {reason}")
    return closed, replace(settings, allow_root=False)


def granted(rs: RuleSet) -> list[tuple[str, tuple[PortRange, ...]]]:
    """(who, ports) for each grant, whatever the identity: for messages."""
    if rs.cgroups is not None:
        return [(m.name, ports) for m in rs.cgroups.members for _, ports in m.grants]
    return [(g.containers, g.ports) for g in rs.grants]


def _unseen(rules: CgroupRules) -> CgroupRules:
    return replace(rules, pod=None, members=tuple(replace(m, cgroup=None) for m in rules.members))


def build_ruleset(
    policy: PodPolicy,
    settings: Settings,
    user_namespaced: bool = False,
    cgroups: PodCgroups | None = None,
) -> RuleSet | None:
    """The ruleset for an isolated pod, or None when its level is off. `user_namespaced`: the kernel
    says the pod's network namespace belongs to a user namespace of its own, whatever the spec says.
    `cgroups`: what the agent has seen of the pod's cgroups (under UID identity only the pod's own
    is kept: the socket guard's place)."""
    if policy.level is Level.OFF:
        return None
    if policy.identity.by_cgroup:
        return _cgroup_ruleset(policy, settings, user_namespaced, cgroups or PodCgroups(DEFAULT_CGROUP_LEVEL))
    by_uid = sorted((c.uid, c.name, c.grants) for c in policy.containers if c.uid is not None)
    identities, grants = [], []
    for uid, group in groupby(by_uid, key=lambda item: item[0]):
        members = list(group)
        names = ",".join(sorted({name for _, name, _ in members}))
        identities.append(Identity(uid, names))
        ranges = sorted({r for _, _, container_grants in members for r in container_grants})
        for protocol in ("tcp", "udp"):
            ports = _merged([r for r in ranges if r.protocol == protocol])
            if ports:
                grants.append(Grant(uid, protocol, ports, names))
    mode: Literal["enforce", "audit"] = "enforce" if policy.level is Level.ENFORCE else "audit"
    # UID 0 is let through as the node's runtime (port-forward). In a user-namespaced pod, UID 0 is
    # the pod's own root and the runtime shows up as an unmapped UID: no exception there.
    allow_root = settings.allow_root and not (policy.user_namespaced or user_namespaced)
    return RuleSet(
        policy.pod,
        mode,
        settings.sentinel_port,
        allow_root,
        tuple(grants),
        tuple(identities),
        _owners(policy),
        pod_cgroup=cgroups.pod if cgroups is not None else None,
    )


def _owners(policy: PodPolicy) -> tuple[Owner, ...]:
    """Every declared port of a container with a UID; a port that containers of different UIDs
    declare is served by any of them. A container without a UID owns nothing: it has no identity
    the rules can name (admission reports it, `uid-missing`)."""
    declared = sorted(
        (p.protocol, p.low, c.uid, c.name) for c in policy.containers if c.uid is not None for p in c.declared
    )
    owners = []
    for (protocol, port), group in groupby(declared, key=lambda item: item[:2]):
        members = list(group)
        uids = tuple(sorted({uid for _, _, uid, _ in members}))
        owners.append(Owner(protocol, port, uids, ",".join(sorted({name for *_, name in members}))))
    return tuple(owners)


def _cgroup_ruleset(
    policy: PodPolicy, settings: Settings, user_namespaced: bool, seen: PodCgroups
) -> RuleSet:
    """Cgroup identity: one member per container, its grants merged as nft keeps them; under
    uid+cgroup a container without a UID has no identity the rules can name and is granted nothing."""
    cgroups = dict(seen.containers)
    by_uid = policy.identity.by_uid
    members = []
    for c in policy.containers:
        usable = c.uid is not None or not by_uid
        protocols: tuple[Protocol, ...] = ("tcp", "udp")
        grants = tuple(
            (protocol, ports)
            for protocol in protocols
            if usable and (ports := _merged(sorted({r for r in c.grants if r.protocol == protocol})))
        )
        members.append(Member(c.name, c.uid, cgroups.get(c.name), grants))
    declared = sorted((p.protocol, p.low, c.name) for c in policy.containers for p in c.declared)
    owners = tuple(
        CgroupOwner(protocol, port, tuple(sorted({name for *_, name in group})))
        for (protocol, port), group in groupby(declared, key=lambda item: item[:2])
    )
    mode: Literal["enforce", "audit"] = "enforce" if policy.level is Level.ENFORCE else "audit"
    # the runtime exception needs the pod's cgroup to refuse the pod's own root processes first
    allow_root = settings.allow_root and not (policy.user_namespaced or user_namespaced) and bool(seen.pod)
    rules = CgroupRules(by_uid, seen.level, seen.pod, tuple(members), owners)
    return RuleSet(policy.pod, mode, settings.sentinel_port, allow_root, (), (), (), rules)
