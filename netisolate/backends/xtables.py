"""The legacy filter table of the calling thread's network namespace, through the x_tables socket
options on a raw socket: read its info and entries, replace it whole. What to write is computed in
`netisolate.rules.xtables`; this module only talks to the kernel.

The kernel takes a replace only if the table still holds as many entries as the caller read
(`num_counters`): a rule added or deleted since is refused whole (EAGAIN), never lost. A change
that keeps the count (a policy set, a rule replaced in place) is not seen by the kernel; against
that only the lock helps, and it binds our writers alone, as the node's lock binds only those who
take it: a pod's filter table is ours to write (see netisolate.backends.iptables). Our writers
hold the family's lock file (our tools through XTABLES_LOCKFILE), so this process and its
`-restore` tools never interleave.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from netisolate.rules.iptables import Family
from netisolate.rules.xtables import VALID_HOOKS, Table

_LIBC = ctypes.CDLL(None, use_errno=True)
_SOCKET: dict[Family, tuple[int, int]] = {
    4: (socket.AF_INET, socket.IPPROTO_IP),
    6: (socket.AF_INET6, socket.IPPROTO_IPV6),
}
# the same numbers for IPT_ and IP6T_
_SO_SET_REPLACE = _SO_GET_INFO = 64
_SO_GET_ENTRIES = 65
_GETINFO = struct.Struct("=32sI5I5III")  # name, valid_hooks, hook_entry[5], underflow[5], num_entries, size
_GET_ENTRIES = struct.Struct("=32sI4x")  # name, size, then the entries (aligned to 8)
_REPLACE = struct.Struct("=32sIII5I5IIQ")  # name, valid_hooks, num_entries, size, hook_entry[5],
# underflow[5], num_counters, counters (a pointer to where the old counters go), then the entries
_COUNTERS = 16  # struct xt_counters
_TABLE = b"filter"


@dataclass(frozen=True)
class Info:
    valid_hooks: int
    hook_entry: tuple[int, ...]
    underflow: tuple[int, ...]
    num_entries: int
    size: int


def _getsockopt(raw: socket.socket, family: Family, option: int, buffer: ctypes.Array[ctypes.c_char]) -> None:
    """getsockopt through libc: these options read the table's name from the buffer they fill,
    and socket.getsockopt passes the kernel a zeroed one."""
    size = ctypes.c_uint32(len(buffer))
    if _LIBC.getsockopt(raw.fileno(), _SOCKET[family][1], option, buffer, ctypes.byref(size)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


@contextlib.contextmanager
def opened(family: Family) -> Iterator[socket.socket]:
    """The raw socket the options are asked on, in the calling thread's namespace."""
    with socket.socket(_SOCKET[family][0], socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        yield raw


def info(raw: socket.socket, family: Family) -> Info:
    buffer = ctypes.create_string_buffer(_TABLE, _GETINFO.size)
    _getsockopt(raw, family, _SO_GET_INFO, buffer)
    fields = _GETINFO.unpack(buffer.raw)
    return Info(fields[1], fields[2:7], fields[7:12], fields[12], fields[13])


def entries(raw: socket.socket, family: Family, size: int) -> bytes:
    buffer = ctypes.create_string_buffer(_GET_ENTRIES.size + size)
    _GET_ENTRIES.pack_into(buffer, 0, _TABLE, size)
    _getsockopt(raw, family, _SO_GET_ENTRIES, buffer)
    return buffer.raw[_GET_ENTRIES.size :]


def replace(raw: socket.socket, family: Family, table: Table, num_counters: int) -> None:
    """Commit `table` in place of one that holds `num_counters` entries (OSError: refused)."""
    counters = ctypes.create_string_buffer(max(1, num_counters) * _COUNTERS)
    header = _REPLACE.pack(
        _TABLE,
        VALID_HOOKS,
        table.num_entries,
        len(table.entries),
        *table.hook_entry,
        *table.underflow,
        num_counters,
        ctypes.addressof(counters),
    )
    raw.setsockopt(_SOCKET[family][1], _SO_SET_REPLACE, header + table.entries)


@contextlib.contextmanager
def locked(path: str, timeout: float) -> Iterator[bool]:
    """The lock file held, waiting at most `timeout` seconds: False when it stayed held. Polled,
    not a blocking flock: a thread cannot be woken from that, and our writes hold it for well
    under a millisecond (a tool of ours for a few)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline, pause = time.monotonic() + timeout, 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
        yield True
    finally:
        os.close(fd)
