"""Set element updates sent to nf_tables over a netfilter netlink socket of our own, kept open.

Why not `nft -f` or a libnftables context per write: the kernel makes whoever *closes* an
nftables socket flush the transaction-destroy work, which waits for an RCU grace period
(nft_rcv_nl_event on NETLINK_URELEASE), so every process or context that deleted an element paid
~10 ms as it exited. A socket opened once per namespace and kept pays that once, when the pod is
gone. (libnftables 1.0.6 cannot be kept per namespace instead: it select()s on its socket, and
aborts the whole process once that fd is 1024 or more, which a node's worth of kept sockets
reaches.) pyroute2's NFTSocket could frame these messages, but it runs an event loop per socket
and neither sends a batch generation nor collects a batch's errors, both of which this needs.

A batch carries the ruleset generation its delta was computed against (NFNL_BATCH_GENID): the
kernel refuses it whole (ERESTART) if anything changed the namespace's nftables since, so an update
from a remembered listing is as exact as one from a fresh read. Elements are encoded as nft
encodes them: each field of a concatenated key padded to 4 bytes, a UID or a cgroup ID in host order
(in network order in an interval set, where nft converts it), ports in network order, an interval's end as
KEY_END, a comment as nftnl user data, `counter` as the element's expression.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_BATCH_GENID = 1
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 12, 14, 15, 16
NLM_F_REQUEST, NLM_F_CREATE = 0x1, 0x400
NLMSG_ERROR = 2
NFPROTO_INET = 1
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_USERDATA, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_KEY_END = 1, 6, 7, 10
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_GEN_ID = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0
_MAX_ELEMENTS_NEST = 60_000  # an attribute's length is 16 bits: a bigger list goes in several messages
_TIMEOUT_S = 5.0
_PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


class NetlinkError(OSError):
    """The kernel refused a batch (errno says why); nothing of it was applied."""


class UnsupportedError(ValueError):
    """An element or key this encoder does not know: the caller loads it with nft instead."""


def _attr(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _nest(kind: int, parts: Iterable[bytes]) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _message(kind: int, flags: int, seq: int, payload: bytes, *, family: int = 0, res_id: int = 0) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + payload
    return struct.pack("=IHHII", 16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


# --- keys ------------------------------------------------------------------------------------


def _field(expression: str, interval: bool) -> str:
    """The struct format of one key field, from the expression the set is `typeof`."""
    if expression in ("meta skuid", "meta skgid"):
        return ">I" if interval else "=I"
    if expression == "meta l4proto":
        return "B"
    if re.fullmatch(r"(th|tcp|udp) [sd]port", expression):
        return ">H"
    raise UnsupportedError(f"key field {expression!r}")


# the struct format of a field of a set declared by `type`: (without intervals, in an interval set)
_TYPES = {
    "uid": ("=I", ">I"),
    "cgroupsv2": ("=Q", ">Q"),  # a cgroup's ID, 8 bytes
    "inet_proto": ("B", "B"),
    "inet_service": (">H", ">H"),
}


def _typed(name: str, interval: bool) -> str:
    if name not in _TYPES:
        raise UnsupportedError(f"key type {name!r}")
    return _TYPES[name][interval]


@dataclass(frozen=True)
class SetKey:
    """How a set's elements are keyed: one struct format per field, and whether it holds intervals."""

    fields: tuple[str, ...]
    interval: bool

    @classmethod
    def of(cls, declaration: Sequence[str]) -> SetKey:
        """From a set's declaration lines as nft lists them (`typeof A . B` or `type A . B`,
        `flags interval`)."""
        interval = any(line.startswith("flags ") and "interval" in line for line in declaration)
        for line in declaration:
            kind, _, key = line.partition(" ")
            if kind == "typeof":
                return cls(tuple(_field(part, interval) for part in key.split(" . ")), interval)
            if kind == "type":
                return cls(tuple(_typed(part, interval) for part in key.split(" . ")), interval)
        raise UnsupportedError("a set declared by neither type nor typeof")


_ELEMENT = re.compile(r'(?P<key>.+?)(?P<counter> counter)?(?: comment "(?P<comment>[^"]*)")?')


def _value(fmt: str, text: str) -> bytes:
    number = _PROTOCOLS.get(text) if fmt == "B" else None
    try:
        packed = struct.pack(fmt, number if number is not None else int(text))
    except (ValueError, struct.error):
        raise UnsupportedError(f"value {text!r}") from None
    return packed + b"\0" * (-len(packed) % 4)


@lru_cache(maxsize=8192)  # a pod's elements come back as its policy changes back and forth
def _element(key: SetKey, text: str, full: bool) -> bytes:
    """One element in nft's syntax (`1000 . tcp . 80-81 counter comment "app"`) as the kernel takes
    it; `full`: with its counter and comment (an add), else the key alone (a delete)."""
    match = _ELEMENT.fullmatch(text)
    values = match["key"].split(" . ") if match else []
    if match is None or len(values) != len(key.fields):
        raise UnsupportedError(f"element {text!r}")
    low, high = b"", b""
    for fmt, value in zip(key.fields, values, strict=True):
        first, _, last = value.partition("-") if key.interval else (value, "", "")
        low, high = low + _value(fmt, first), high + _value(fmt, last or first)
    parts = [_nest(NFTA_SET_ELEM_KEY, [_attr(NFTA_DATA_VALUE, low)])]
    if key.interval:
        parts.append(_nest(NFTA_SET_ELEM_KEY_END, [_attr(NFTA_DATA_VALUE, high)]))
    elif high != low:
        raise UnsupportedError(f"a range in a set without intervals: {text!r}")
    if full and match["comment"] is not None:
        comment = match["comment"].encode() + b"\0"
        if len(comment) > 255:
            raise UnsupportedError(f"comment of {len(comment)} bytes")
        parts.append(
            _attr(NFTA_SET_ELEM_USERDATA, bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(comment)]) + comment)
        )
    if full and match["counter"]:
        parts.append(
            _nest(NFTA_SET_ELEM_EXPR, [_attr(NFTA_EXPR_NAME, b"counter\0"), _nest(NFTA_EXPR_DATA, [])])
        )
    return _nest(NFTA_LIST_ELEM, parts)


@dataclass(frozen=True)
class Change:
    """Elements of one set to delete (keys) and to add (with counter and comment), nft's syntax."""

    table: str
    set: str
    key: SetKey
    delete: tuple[str, ...] = ()
    add: tuple[str, ...] = ()


def _chunks(encoded: list[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for element in encoded:
        if chunk and size + len(element) > _MAX_ELEMENTS_NEST:
            yield chunk
            chunk, size = [], 0
        chunk.append(element)
        size += len(element)
    if chunk:
        yield chunk


def _set_messages(change: Change, seq: Iterator[int]) -> Iterator[bytes]:
    head = _attr(NFTA_SET_ELEM_LIST_TABLE, change.table.encode() + b"\0")
    head += _attr(NFTA_SET_ELEM_LIST_SET, change.set.encode() + b"\0")
    for kind, flags, elements, full in (
        (NFT_MSG_DELSETELEM, 0, change.delete, False),
        (NFT_MSG_NEWSETELEM, NLM_F_CREATE, change.add, True),
    ):
        for chunk in _chunks([_element(change.key, e, full) for e in elements]):
            payload = head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, chunk)
            yield _message(kind | NFNL_SUBSYS_NFTABLES << 8, flags, next(seq), payload, family=NFPROTO_INET)


# --- the socket ------------------------------------------------------------------------------


class Socket:
    """A netfilter netlink socket in the namespace of the thread that makes it (NetNS.run), usable
    from any thread after that, one call at a time. Close it when the namespace goes: it pins it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.setblocking(False)  # waits go through poll() (with a timeout socket, even a
        # MSG_DONTWAIT recv would wait first)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN)
        self._seq = 0
        self._lock = threading.Lock()

    def _next(self) -> Iterator[int]:
        while True:
            self._seq = self._seq % 0x7FFFFFFF + 1
            yield self._seq

    def generation(self) -> int:
        """The namespace's nftables ruleset generation: every committed transaction moves it by one."""
        with self._lock:
            asked = next(self._next())
            self._sock.sendall(_message(NFT_MSG_GETGEN | NFNL_SUBSYS_NFTABLES << 8, 0, asked, b""))
            deadline = time.monotonic() + _TIMEOUT_S
            while True:  # answers to an earlier call that timed out are told apart by sequence number
                for kind, number, payload in _messages(self._receive(deadline)):
                    if kind == NLMSG_ERROR and number == asked and _code(payload):
                        code = _code(payload)
                        raise NetlinkError(
                            code, f"nf_tables refused a generation request: {os.strerror(code)}"
                        )
                    if kind == NFT_MSG_NEWGEN | NFNL_SUBSYS_NFTABLES << 8 and number == asked:
                        return _generation(payload[4:])

    def commit(self, changes: Sequence[Change], generation: int) -> int:
        """Apply `changes` in one transaction, only if the ruleset is still at `generation`; returns
        the generation after it. Raises NetlinkError (ERESTART: it was not) or UnsupportedError,
        having changed nothing.

        The kernel checks the generation with its commit lock taken and keeps it to the commit, so
        ours is the next generation. It handles a batch as it is sent, so every error is queued by
        the time the send returns: no acknowledgement is asked for, none to wait for."""
        genid = _attr(NFNL_BATCH_GENID, struct.pack(">I", generation))
        with self._lock:
            seq = self._next()
            first = next(seq)
            begin = _message(NFNL_MSG_BATCH_BEGIN, 0, first, genid, res_id=NFNL_SUBSYS_NFTABLES)
            body = b"".join(m for change in changes for m in _set_messages(change, seq))
            last = next(seq)
            self._sock.sendall(
                begin + body + _message(NFNL_MSG_BATCH_END, 0, last, b"", res_id=NFNL_SUBSYS_NFTABLES)
            )
            failure = 0
            while True:
                try:
                    data = self._sock.recv(65536)
                except BlockingIOError:
                    break
                for kind, number, payload in _messages(data):
                    if kind == NLMSG_ERROR and first <= number <= last:
                        failure = failure or _code(payload)
        if failure:
            raise NetlinkError(failure, f"nf_tables refused the update: {os.strerror(failure)}")
        return generation % 0xFFFFFFFF + 1  # a u32 that skips 0

    def _receive(self, deadline: float) -> bytes:
        while True:
            try:
                return self._sock.recv(65536)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not self._poll.poll(left * 1000):
                    raise TimeoutError("nf_tables did not answer") from None

    def close(self) -> None:
        """Waits for the namespace's last transactions' RCU grace period: call it off the hot path."""
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in a datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, number, _ = struct.unpack_from("=IHHII", data, offset)
        yield kind, number, data[offset + 16 : offset + length]
        offset += max(length + (-length % 4), 16)


def _code(error: bytes) -> int:
    """The errno of an NLMSG_ERROR's payload (0: an acknowledgement)."""
    return -int(struct.unpack_from("=i", error)[0])


def _generation(attributes: bytes) -> int:
    offset = 0
    while offset + 4 <= len(attributes):
        length, kind = struct.unpack_from("=HH", attributes, offset)
        if kind & ~NLA_F_NESTED == NFTA_GEN_ID:
            return int(struct.unpack_from(">I", attributes, offset + 4)[0])
        offset += max(length + (-length % 4), 4)
    raise NetlinkError(errno.EPROTO, "nf_tables answered without a generation")
