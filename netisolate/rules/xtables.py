"""The filter table as the kernel takes it from `IPT_SO_SET_REPLACE` (`IP6T_` for IPv6): our rules
packed into x_tables entries the way libiptc packs them, so what `iptables-save` reads back is what
`iptables-restore` of the same document would have written. Pure: bytes in, bytes out.

Only a table that holds nothing but its three built-in chains (a new sandbox's) is rebuilt here:
its layout is then known exactly, and everyone else's rules cannot be lost. The new table is the
built-in chains with their policies as they were, our jumps first in OUTPUT, our chains (sorted by
name, as libiptc keeps user chains), and the closing ERROR entry. Unlike libiptc, the built-in
policies' counters are not carried over (SO_SET_ADD_COUNTERS): a new sandbox's have counted
nothing that matters yet.

An entry is the IP header part (`ipt_ip` / `ip6t_ip6`), offsets, counters, then its matches and its
target, each a 32-byte header (size, name, revision) and a struct padded to 8 bytes. A jump is the
byte offset of the chain's first rule; a goto is the same with the entry's GOTO flag."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from netisolate.rules.iptables import PROTOCOLS, Family, Rule, Target

# The layouts of a 64-bit process (x86_64, arm64: u64 aligned to 8, pointers of 8 bytes); elsewhere
# the tools write the table.
SUPPORTED = struct.calcsize("P") == 8
_ENTRY: dict[Family, struct.Struct] = {
    # src, dst, smsk, dmsk, iniface, outiface, iniface_mask, outiface_mask, proto, flags, invflags,
    # nfcache, target_offset, next_offset, comefrom, packets, bytes
    4: struct.Struct("=4s4s4s4s16s16s16s16sHBBIHHIQQ"),
    # the same, with tos before flags and padding
    6: struct.Struct("=16s16s16s16s16s16s16s16sHBBB3xIHHI4xQQ"),
}
_TARGET_OFFSET = {4: 88, 6: 140}  # of target_offset (next_offset follows)
_GOTO = {4: 0x02, 6: 0x04}  # IPT_F_GOTO, IP6T_F_GOTO
_IP6T_F_PROTO = 0x01
_HEADER = struct.Struct("=H29sB")  # struct xt_entry_match / xt_entry_target
_VERDICTS = {"ACCEPT": -2, "DROP": -1, "RETURN": -5}  # -NF_ACCEPT - 1, -NF_DROP - 1, XT_RETURN
_ERROR = "ERROR"
HOOKS = (1, 2, 3)  # the filter table's: NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT
LOCAL_OUT = HOOKS[2]
VALID_HOOKS = sum(1 << hook for hook in HOOKS)
_NO_HOOK = 0xFFFFFFFF


class LayoutError(ValueError):
    """The table is not one this module rebuilds (it holds more than its built-in chains)."""


@dataclass(frozen=True)
class Table:
    """What IPT_SO_SET_REPLACE takes, less the counters the kernel hands back."""

    entries: bytes
    num_entries: int
    hook_entry: tuple[int, ...]  # NF_INET_NUMHOOKS offsets
    underflow: tuple[int, ...]


def _align(size: int) -> int:
    return (size + 7) & ~7


def _block(name: str, revision: int, data: bytes) -> bytes:
    """A match or target: header and struct, padded."""
    size = _HEADER.size + _align(len(data))
    return _HEADER.pack(size, name.encode(), revision) + data.ljust(size - _HEADER.size, b"\0")


def _standard(verdict: int) -> bytes:
    return _block("", 0, struct.pack("=i", verdict))


def _error(name: str) -> bytes:
    return _block(_ERROR, 0, name.encode().ljust(30, b"\0"))


def _target(target: Target, starts: Mapping[str, int]) -> bytes:
    if target.data is not None:
        return _block(target.name, target.revision, target.data)
    if target.name in _VERDICTS:
        return _standard(_VERDICTS[target.name])
    return _standard(starts[target.name])


def _entry(family: Family, rule: Rule | None, target: bytes) -> bytes:
    """One entry: `rule`'s header fields and matches (None: unconditional) and the packed target."""
    matches = b"".join(_block(m.module, m.revision, m.data) for m in rule.matches) if rule else b""
    size = _ENTRY[family].size
    length = 4 if family == 4 else 16
    dst = dmsk = bytes(length)
    outiface = mask = bytes(16)
    proto = flags = 0
    if rule is not None:
        if rule.destination:
            network = ipaddress.ip_network(rule.destination)
            dst, dmsk = network.network_address.packed, network.netmask.packed
        if rule.out_interface:
            outiface = rule.out_interface.encode().ljust(16, b"\0")
            mask = (b"\xff" * (len(rule.out_interface) + 1)).ljust(16, b"\0")
        if rule.protocol:
            proto = PROTOCOLS[rule.protocol]
            flags |= _IP6T_F_PROTO if family == 6 else 0
        flags |= _GOTO[family] if rule.target.goto else 0
    empty, zero = bytes(length), bytes(16)
    header = (empty, dst, empty, dmsk, zero, outiface, zero, mask, proto)
    fields = (*header, flags, 0) if family == 4 else (*header, 0, flags, 0)
    offsets = (0, size + len(matches), size + len(matches) + len(target), 0, 0, 0)
    return _ENTRY[family].pack(*fields, *offsets) + matches + target


def _cleared(family: Family, entry: bytes) -> bytes:
    """An entry as the kernel reads it in, with no counters and no hook marks (`comefrom`)."""
    fields = list(_ENTRY[family].unpack_from(entry))
    fields[-3:] = [0, 0, 0]
    return _ENTRY[family].pack(*fields) + entry[_ENTRY[family].size :]


def split(family: Family, entries: bytes) -> list[tuple[int, bytes]]:
    """The table's entries with their offsets."""
    found, offset = [], 0
    while offset < len(entries):
        if len(entries) - offset < _ENTRY[family].size:
            raise LayoutError(f"{len(entries) - offset} bytes at {offset} are no entry")
        (next_offset,) = struct.unpack_from("=H", entries, offset + _TARGET_OFFSET[family] + 2)
        if next_offset < _ENTRY[family].size or offset + next_offset > len(entries):
            raise LayoutError(f"an entry at {offset} is {next_offset} bytes long")
        found.append((offset, entries[offset : offset + next_offset]))
        offset += next_offset
    return found


def _head_size(family: Family) -> int:
    """A user chain's head: an entry with the ERROR target naming the chain."""
    return _ENTRY[family].size + len(_error(""))


def _target_of(family: Family, entry: bytes) -> tuple[str, bytes]:
    """An entry's target: its name and its struct."""
    (target_offset,) = struct.unpack_from("=H", entry, _TARGET_OFFSET[family])
    if target_offset < _ENTRY[family].size or target_offset + _HEADER.size > len(entry):
        raise LayoutError(f"an entry's target is at {target_offset} of its {len(entry)} bytes")
    _, name, _ = _HEADER.unpack_from(entry, target_offset)
    return name.rstrip(b"\0").decode(errors="replace"), entry[target_offset + _HEADER.size :]


def jumps_first(
    family: Family, entries: bytes, hook_entry: Sequence[int], underflow: Sequence[int], jumps: Sequence[Rule]
) -> bool:
    """Whether OUTPUT begins with exactly `jumps` (to one chain of ours) and jumps or goes to that
    chain nowhere else, from the table's entries: what a changed policy must know of OUTPUT,
    without an `iptables-save` (LayoutError: entries that cannot be read)."""
    found = split(family, entries)
    chain = jumps[0].target.name
    heads = [
        offset
        for offset, entry in found
        if _target_of(family, entry) == (_ERROR, _error(chain)[_HEADER.size :])
    ]
    if len(heads) != 1:
        return False
    start = heads[0] + _head_size(family)
    output = [entry for offset, entry in found if hook_entry[LOCAL_OUT] <= offset < underflow[LOCAL_OUT]]
    expected = [_entry(family, rule, _standard(start)) for rule in jumps]
    if [_cleared(family, entry) for entry in output[: len(expected)]] != expected:
        return False
    return all(
        _target_of(family, entry)[1][:4] != struct.pack("=i", start) for entry in output[len(expected) :]
    )


def builtin_policies(
    family: Family, entries: bytes, hook_entry: Sequence[int], underflow: Sequence[int]
) -> list[bytes]:
    """The policy entries of INPUT, FORWARD and OUTPUT, from a table that holds nothing else
    (LayoutError otherwise): each exactly an unconditional ACCEPT or DROP, at its hook."""
    found = split(family, entries)
    if len(found) != len(HOOKS) + 1:
        raise LayoutError(f"the table holds {len(found)} entries, not only its built-in chains")
    plain = {_entry(family, None, _standard(_VERDICTS[v])) for v in ("ACCEPT", "DROP")}
    policies = []
    for hook, (offset, entry) in zip(HOOKS, found[: len(HOOKS)], strict=True):
        policy = _cleared(family, entry)
        if policy not in plain or not hook_entry[hook] == underflow[hook] == offset:
            raise LayoutError(f"built-in chain {hook} holds more than an ACCEPT or DROP policy")
        policies.append(policy)
    if _cleared(family, found[-1][1]) != _entry(family, None, _error(_ERROR)):
        raise LayoutError("the table does not end with its ERROR entry")
    return policies


def table(
    family: Family, policies: Sequence[bytes], output: Sequence[Rule], chains: Mapping[str, Sequence[Rule]]
) -> Table:
    """The table: the built-in chains' `policies` (INPUT, FORWARD, OUTPUT entries, kept as they
    were), `output` first in OUTPUT, then `chains`, each a head, its rules and a RETURN."""

    def entries(starts: Mapping[str, int]) -> list[bytes]:
        packed = [*policies[:2], *(_entry(family, r, _target(r.target, starts)) for r in output), policies[2]]
        for name in sorted(chains):
            packed.append(_entry(family, None, _error(name)))
            packed += [_entry(family, r, _target(r.target, starts)) for r in chains[name]]
            packed.append(_entry(family, None, _standard(_VERDICTS["RETURN"])))
        return [*packed, _entry(family, None, _error(_ERROR))]

    sized = entries(dict.fromkeys(chains, 0))  # sizes do not depend on where jumps land
    offsets = [sum(map(len, sized[:i])) for i in range(len(sized) + 1)]
    heads, index = {}, len(output) + len(HOOKS)
    for name in sorted(chains):
        heads[name] = offsets[index + 1]  # the chain's first rule, after its head
        index += len(chains[name]) + 2
    packed = entries(heads)
    input_, forward, output_policy = offsets[0], offsets[1], offsets[2 + len(output)]
    hook_entry = (_NO_HOOK, input_, forward, offsets[2], _NO_HOOK)
    underflow = (_NO_HOOK, input_, forward, output_policy, _NO_HOOK)
    return Table(b"".join(packed), len(packed), hook_entry, underflow)
