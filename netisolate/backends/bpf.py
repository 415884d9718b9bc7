"""The socket guard in the kernel: bpf(2) for maps, programs and their attachment to a cgroup (v2).
What the programs are and what the maps hold is computed in `netisolate.rules.sockaddr`; this
module only talks to the kernel, through the syscall itself (ctypes), as netisolate.backends.xtables
does for x_tables: no compiler, no ELF loader, nothing to install.

Attached with BPF_F_ALLOW_MULTI, so a program another tool attached to the same cgroup, below
it or above it stays and runs too: the kernel runs the container's cgroup's programs first, then
each ancestor's in the order they were attached, and a call passes only if all let it (so a
destination rewrite attached below us, or earlier on the pod's cgroup, is judged rewritten). An
attachment lives as long as the cgroup does: it is not undone when the process that made it
exits, and the maps live as long as a program uses them. `attached` finds our programs on a
cgroup by name; their maps are not reopened (by the IDs the program's info lists): a restarted
caller installs a guard of its own beside the old one, then detaches the old (`detach_others`),
so the cgroup is never without one; the refusal counters start again from 0.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from errno import ENOENT

from netisolate.backends.base import EnforceError
from netisolate.netns import NetNS
from netisolate.rules import ebpf
from netisolate.rules.sockaddr import ATTACH, MAPS, PROTOCOLS, UNKNOWN, Guard, MapSpec

_LIBC = ctypes.CDLL(None, use_errno=True)
_SYSCALL = {"x86_64": 321, "aarch64": 280}
_MAP_CREATE, _LOOKUP, _UPDATE, _DELETE, _NEXT_KEY, _PROG_LOAD = 0, 1, 2, 3, 4, 5
_PROG_ATTACH, _PROG_DETACH, _PROG_GET_FD_BY_ID, _OBJ_GET_INFO_BY_FD, _PROG_QUERY = 8, 9, 13, 15, 16
_MAP_TYPES = {"hash": 1, "lru_hash": 9, "lpm_trie": 11}
_NO_PREALLOC = 1  # a longest-prefix trie must be made without it
_CGROUP_SOCK, _CGROUP_SOCK_ADDR = 9, 18  # enum bpf_prog_type: socket(), and the calls naming an address
ATTACH_TYPES = {
    "sock_create": 2,
    "bind4": 8,
    "bind6": 9,
    "connect4": 10,
    "connect6": 11,
    "sendmsg4": 14,
    "sendmsg6": 15,
}
_ALLOW_MULTI = 2
_ATTR = 128  # bytes of union bpf_attr we pass: more than any command here reads
_LOG = 1 << 16
_QUERY_MAX = 64  # programs one cgroup's attach point can list back
_QUERY_EFFECTIVE = 1
_PROG_INFO = 256  # bytes of struct bpf_prog_info we read (its name ends at 80)
PREFIX = "ni_"  # our programs' and maps' names begin with it


class GuardError(EnforceError):
    """bpf(2) refused; the message says what and what to do, `errno` why."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class LoadError(GuardError):
    """The kernel will not load the guard's programs (the verifier, a helper it lacks, no
    capability): every pod's would be refused alike, so the node has no guard."""


def _bpf(command: int, attr: bytes, what: str, buffer: ctypes.Array[ctypes.c_char] | None = None) -> int:
    """bpf(command, attr); `buffer`, when given, is the attr (the kernel writes some answers there)."""
    number = _SYSCALL.get(platform.machine())
    if number is None:
        raise GuardError(f"{what}: the socket guard knows bpf(2) on x86_64 and aarch64 only")
    buffer = buffer if buffer is not None else ctypes.create_string_buffer(attr, _ATTR)
    result = int(_LIBC.syscall(number, command, buffer, _ATTR))
    if result < 0:
        errno = ctypes.get_errno()
        hint = " (needs CAP_BPF and CAP_NET_ADMIN, or root)" if errno == 1 else ""
        raise GuardError(f"{what}: {os.strerror(errno)}{hint}", errno)
    return result


def _pointer(buffer: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


@dataclass
class Map:
    spec: MapSpec
    fd: int

    @classmethod
    def create(cls, spec: MapSpec) -> Map:
        flags = _NO_PREALLOC if spec.kind == "lpm_trie" else 0
        name = f"{PREFIX}{spec.name}".encode()
        sizes = (spec.key_size, spec.value_size, spec.max_entries)
        attr = struct.pack("=7I16s", _MAP_TYPES[spec.kind], *sizes, flags, 0, 0, name)
        try:
            return cls(spec, _bpf(_MAP_CREATE, attr, f"creating the map {spec.name}"))
        except GuardError as err:  # no capability: the same for every pod
            raise (LoadError(str(err), err.errno) if err.errno == errno.EPERM else err) from None

    def _elem(self, command: int, key: bytes, value: ctypes.Array[ctypes.c_char] | None, what: str) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        v = _pointer(value) if value is not None else 0
        _bpf(command, struct.pack("=I4xQQQ", self.fd, _pointer(k), v, 0), f"{what} in {self.spec.name}")

    def put(self, key: bytes, value: bytes) -> None:
        self._elem(_UPDATE, key, ctypes.create_string_buffer(value, len(value)), "adding an element")

    def delete(self, key: bytes) -> None:
        self._elem(_DELETE, key, None, "deleting an element")

    def get(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.spec.value_size)
        try:
            self._elem(_LOOKUP, key, value, "reading an element")
        except GuardError as err:
            if err.errno == ENOENT:
                return None
            raise
        return value.raw

    def keys(self) -> Iterator[bytes]:
        """Every key. A longest-prefix trie lists prefixes, each as it was added."""
        key: bytes | None = None
        while True:
            current = ctypes.create_string_buffer(key or b"", self.spec.key_size)
            following = ctypes.create_string_buffer(self.spec.key_size)
            attr = struct.pack("=I4xQQQ", self.fd, _pointer(current) if key else 0, _pointer(following), 0)
            try:
                _bpf(_NEXT_KEY, attr, f"listing {self.spec.name}")
            except GuardError as err:
                if err.errno == ENOENT:
                    return
                raise
            key = following.raw
            yield key

    def items(self) -> dict[bytes, bytes]:
        return {key: value for key in self.keys() if (value := self.get(key)) is not None}

    def replace(self, entries: Mapping[bytes, bytes]) -> None:
        """Exactly `entries` afterwards. What is missing is added before what is extra goes, so a
        policy change never has a moment with fewer grants than either side; where both would not
        fit in the map at once, the extra go first (a moment with fewer: fail closed)."""
        if len(entries) > self.spec.max_entries:
            raise GuardError(
                f"{len(entries)} elements do not fit in {self.spec.name} ({self.spec.max_entries})"
            )
        extra = set(self.keys()) - set(entries)
        if len(extra) + len(entries) > self.spec.max_entries:
            self.delete_keys(extra)
            extra = set()
        for key, value in entries.items():
            self.put(key, value)
        self.delete_keys(extra)

    def delete_keys(self, keys: set[bytes]) -> None:
        for key in keys:
            self.delete(key)


def load(name: str, attach: str, program: ebpf.Program, maps: Mapping[str, Map], named: str = "") -> int:
    """The program's fd, listed as `ni_<name>` (or `named`); a refusal carries the verifier's log."""
    code = ebpf.encode(program, {n: m.fd for n, m in maps.items()})
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG)
    attr = struct.pack(
        "=IIQQIIQII16sII",
        _CGROUP_SOCK if attach == "sock_create" else _CGROUP_SOCK_ADDR,
        len(code) // 8,
        _pointer(insns),
        _pointer(license_),
        1,
        _LOG,
        _pointer(log),
        0,
        0,
        (named or f"{PREFIX}{name}").encode(),
        0,
        ATTACH_TYPES[attach],
    )
    try:
        return _bpf(_PROG_LOAD, attr, f"loading {name}")
    except GuardError as err:
        said = log.value.decode(errors="replace")[-2000:]
        if err.errno in (errno.EINVAL, errno.EACCES, errno.EPERM):
            raise LoadError(f"{err}; the verifier said: {said}", err.errno) from None
        raise GuardError(f"{err}; the verifier said: {said}", err.errno) from None  # (ENOMEM: next time)


def attach(cgroup: int, program: int, attach_type: str) -> None:
    attr = struct.pack("=4I", cgroup, program, ATTACH_TYPES[attach_type], _ALLOW_MULTI)
    _bpf(_PROG_ATTACH, attr, f"attaching {attach_type}")


def detach(cgroup: int, program: int, attach_type: str) -> None:
    attr = struct.pack("=4I", cgroup, program, ATTACH_TYPES[attach_type], 0)
    _bpf(_PROG_DETACH, attr, f"detaching {attach_type}")


def attached(cgroup: int, attach_type: str, effective: bool = False) -> list[tuple[int, str]]:
    """(ID, name) of every program attached to the cgroup itself at `attach_type`; `effective`:
    every program that runs for it, its ancestors' included."""
    ids = ctypes.create_string_buffer(4 * _QUERY_MAX)
    flags = _QUERY_EFFECTIVE if effective else 0
    attr = struct.pack("=4IQI", cgroup, ATTACH_TYPES[attach_type], flags, 0, _pointer(ids), _QUERY_MAX)
    buffer = ctypes.create_string_buffer(attr, _ATTR)
    _bpf(_PROG_QUERY, attr, f"querying {attach_type}", buffer)
    count = struct.unpack_from("=I", buffer.raw, 24)[0]  # prog_cnt, as the kernel wrote it
    found = []
    for prog_id in struct.unpack_from(f"={count}I", ids.raw):
        fd = open_program(prog_id)
        try:
            info = ctypes.create_string_buffer(_PROG_INFO)
            attr = struct.pack("=IIQ", fd, _PROG_INFO, _pointer(info))
            _bpf(_OBJ_GET_INFO_BY_FD, attr, f"reading program {prog_id}")
            found.append((prog_id, info.raw[64:80].rstrip(b"\0").decode()))  # struct bpf_prog_info's name
        finally:
            os.close(fd)
    return found


def _on(directory: str, effective: bool) -> dict[str, list[tuple[int, str]]]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {point: attached(fd, point, effective) for point, _ in ATTACH}
    finally:
        os.close(fd)


def foreign(directory: str) -> list[str]:
    """Programs not of ours that judge the cgroup's connects and sends (a socket load-balancer's,
    which rewrites the address ours judged): `attach point: name`."""
    found = _on(directory, effective=True)
    return [
        f"{point}: {name or prog_id}"
        for point, programs in found.items()
        for prog_id, name in programs
        if not name.startswith(PREFIX) and point.startswith(("connect", "sendmsg"))
    ]


def ours_on(directory: str) -> list[tuple[str, int]]:
    """(attach point, ID) of every netisolate program attached to the cgroup itself."""
    found = _on(directory, effective=False)
    return [
        (point, prog_id)
        for point, programs in found.items()
        for prog_id, name in programs
        if name.startswith(PREFIX)
    ]


def detach_ids(directory: str, programs: list[tuple[str, int]]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for point, prog_id in programs:
            program = open_program(prog_id)
            try:
                detach(fd, program, point)
            finally:
                os.close(program)
    finally:
        os.close(fd)


def open_program(prog_id: int) -> int:
    return _bpf(_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id), f"opening program {prog_id}")


def program_id(fd: int) -> int:
    info = ctypes.create_string_buffer(_PROG_INFO)
    _bpf(_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, _PROG_INFO, _pointer(info)), "reading a program's info")
    return int(struct.unpack_from("=I", info.raw, 4)[0])


@dataclass
class Installed:
    """A guard attached to a cgroup: the maps (to update, and to read counters and the record
    from) and the programs, until `detach`."""

    cgroup: str
    maps: dict[str, Map]
    programs: dict[str, int] = field(default_factory=dict)  # attach point -> fd

    def _attached(self) -> dict[str, list[tuple[int, str]]]:
        return _on(self.cgroup, effective=False)

    def whole(self) -> bool:
        """Whether each of our programs is still attached (someone may have detached one)."""
        found = self._attached()
        return all(program_id(fd) in {i for i, _ in found[point]} for point, fd in self.programs.items())

    def drift(self, guard: Guard, local4: set[bytes], local6: set[bytes]) -> list[str]:
        """What differs from `guard` attached here ([] when exactly it): our programs, and only
        ours of netisolate's, at every attach point, and each map's elements."""
        problems = []
        for point, found in self._attached().items():
            ours = program_id(self.programs[point])
            if ours not in {prog_id for prog_id, _ in found}:
                problems.append(f"the socket guard's {point} program is not attached to {self.cgroup}")
            stale = [prog_id for prog_id, name in found if name.startswith(PREFIX) and prog_id != ours]
            problems += [
                f"another netisolate {point} program (ID {i}) is attached to {self.cgroup}" for i in stale
            ]
        one = struct.pack("=I", 1)
        wanted = {**guard.entries, "local4": dict.fromkeys(local4, one), "local6": dict.fromkeys(local6, one)}
        for name, entries in wanted.items():
            have = self.maps[name].items()
            missing = sorted(key.hex() for key in set(entries) - set(have))
            unexpected = sorted(key.hex() for key in set(have) - set(entries))
            problems += [f"missing in map {name}: {key}" for key in missing]
            problems += [f"unexpected in map {name}: {key}" for key in unexpected]
        return problems

    def observed(self) -> list[tuple[str, str, int, int]]:
        """(who: cgroup ID or UID, protocol, port, refusals) of what the guard recorded, as
        nftables' record names them."""
        names = {number: name for name, number in PROTOCOLS.items()}
        found = []
        for key, value in self.maps["observed"].items().items():
            _, who, protocol, port = struct.unpack("=IQ", key[:12]) + struct.unpack(">HH", key[12:])
            if protocol in names:
                found.append((str(who), names[protocol], port, struct.unpack("=Q", value)[0]))
        return found

    def detach_others(self) -> None:
        """Detach every netisolate program on the cgroup that is not ours (an earlier agent's)."""
        mine = {program_id(fd) for fd in self.programs.values()}
        detach_ids(self.cgroup, [(point, i) for point, i in ours_on(self.cgroup) if i not in mine])

    def update(self, guard: Guard, local4: set[bytes], local6: set[bytes]) -> None:
        """The maps as `guard` wants them, and `local4`/`local6` as `local_addresses` reads them."""
        for name, entries in guard.entries.items():
            self.maps[name].replace(entries)
        self.update_local(local4, local6)
        self._counters(guard)

    def update_local(self, local4: set[bytes], local6: set[bytes]) -> None:
        one = struct.pack("=I", 1)
        self.maps["local4"].replace(dict.fromkeys(local4, one))
        self.maps["local6"].replace(dict.fromkeys(local6, one))

    def _counters(self, guard: Guard) -> None:
        """A refusal counter for each identity the guard names; a gone one's count (a restarted
        container's old cgroup) is folded into the unknown callers' (UNKNOWN) and its counter
        deleted, so restarts never fill the map."""
        counters = self.maps["refused"]
        wanted = {struct.pack("=Q", who) for who in guard.identities}
        gone = {key: value for key, value in counters.items().items() if key not in wanted}
        for key in wanted:
            if counters.get(key) is None:
                counters.put(key, bytes(8))
        if gone:
            pod = struct.pack("=Q", UNKNOWN)
            total = sum(struct.unpack("=Q", v)[0] for v in (counters.get(pod) or bytes(8), *gone.values()))
            counters.put(pod, struct.pack("=Q", total))
            counters.delete_keys(set(gone))

    def refused(self, guard: Guard) -> dict[str, int]:
        """Refusals by container ("" for callers nobody names: the pod's own cgroup, cgroups or
        UIDs of no container)."""
        counts: dict[str, int] = {}
        for key, value in self.maps["refused"].items().items():
            name = guard.identities.get(struct.unpack("=Q", key)[0], "")
            counts[name] = counts.get(name, 0) + struct.unpack("=Q", value)[0]
        return counts

    def detach(self) -> None:
        try:
            fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for attach_type, program in self.programs.items():
                    detach(fd, program, attach_type)
            finally:
                os.close(fd)
        finally:
            self.close()

    def close(self) -> None:
        """Our fds only: what is attached stays attached."""
        for program in self.programs.values():
            os.close(program)
        for m in self.maps.values():
            os.close(m.fd)
        self.programs, self.maps = {}, {}


def install(cgroup: str, guard: Guard, local4: set[bytes], local6: set[bytes]) -> Installed:
    """Make the maps, fill them, load the programs and attach them to the cgroup directory (a v2
    cgroup: the pod's). The maps are filled before any program is attached, so the guard is whole
    from its first call; on any failure, whatever was attached is detached again and every fd
    closed."""
    installed = Installed(cgroup, {})
    try:
        for spec in MAPS:
            installed.maps[spec.name] = Map.create(spec)
        installed.update(guard, local4, local6)
        for point, body in ATTACH:
            installed.programs[point] = load(point, point, guard.programs[body], installed.maps)
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            done: list[str] = []
            try:
                for point, program in installed.programs.items():
                    attach(fd, program, point)
                    done.append(point)
            except BaseException:
                for point in done:
                    detach(fd, installed.programs[point], point)
                raise
        finally:
            os.close(fd)
    except BaseException:
        installed.close()
        raise
    return installed


# rtnetlink, spoken directly (as netisolate.backends.sockdiag speaks sock_diag): no `ip` in the image
_NETLINK_ROUTE, _RTM_NEWROUTE, _RTM_GETROUTE, _NLMSG_ERROR, _NLMSG_DONE = 0, 24, 26, 2, 3
_DUMP = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # rtattr
_RTA_DST, _RTA_TABLE, _RT_TABLE_LOCAL = 1, 15, 255
_LOCAL_TYPES = {2, 3, 5}  # RTN_LOCAL, RTN_BROADCAST, RTN_MULTICAST


def _route(message: bytes) -> tuple[int, int, bytes, int] | None:
    """(table, type, destination, prefix length) of one RTM_NEWROUTE payload."""
    family, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(message)
    width = 4 if family == socket.AF_INET else 16
    dst, offset = bytes(width), _RTMSG.size
    while offset + _RTATTR.size <= len(message):
        length, attr = _RTATTR.unpack_from(message, offset)
        if length < _RTATTR.size:
            return None
        value = message[offset + _RTATTR.size : offset + length]
        if attr == _RTA_DST:
            dst = value
        elif attr == _RTA_TABLE:
            table = struct.unpack("=I", value)[0]
        offset += (length + 3) & ~3
    return table, kind, dst, dst_len


def _local_routes(family: int) -> set[bytes]:
    """The local4/local6 keys of the calling thread's namespace's `local` table (see below)."""
    keys: set[bytes] = set()
    request = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE) as rtnl:
        rtnl.settimeout(5.0)
        rtnl.send(_HEADER.pack(_HEADER.size + len(request), _RTM_GETROUTE, _DUMP, 1, 0) + request)
        while True:
            data, offset = rtnl.recv(1 << 16), 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                payload = data[offset + _HEADER.size : offset + length]
                if kind == _NLMSG_DONE:
                    return keys
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    raise GuardError(f"reading the pod's local routes: {os.strerror(code)}", code)
                route = _route(payload) if kind == _RTM_NEWROUTE and payload[0] == family else None
                if route is not None and route[0] == _RT_TABLE_LOCAL and route[1] in _LOCAL_TYPES:
                    keys.add(struct.pack("=I", route[3]) + route[2])
                offset += (length + 3) & ~3


def local_addresses(ns: NetNS) -> tuple[set[bytes], set[bytes]]:
    """The local4 and local6 keys (prefix length, then the address, network order) of what the
    namespace's `local` routing table calls local, broadcast or multicast: the pod's own
    addresses, its subnets' broadcast addresses, whatever else routes back into it."""
    return ns.run(lambda: (_local_routes(socket.AF_INET), _local_routes(socket.AF_INET6)))
