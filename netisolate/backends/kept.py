"""The netfilter netlink sockets the nftables backend keeps open, one per pod namespace, and what
each namespace's table is known to hold.

A socket lives as long as someone holds the namespace open: the backend remembers (weakly) the
NetNS handles it was given for it, and a background thread closes the socket once they are all
closed or gone, since a kept socket pins its namespace and closing it waits for an RCU grace
period (see `nfnetlink`). The number kept is bounded (`limit`, from the open-file limit): past it
a namespace is served as if none were kept, correctly, only slower.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
import weakref
from dataclasses import dataclass, field

from netisolate.backends.nfnetlink import Socket
from netisolate.netns import NetNS
from netisolate.rules.nft import Listing

log = logging.getLogger(__name__)
SWEEP_EVERY_S = 2.0


@dataclass
class Kept:
    """One namespace's socket; `known`: the table's parsed listing at a ruleset generation, when we
    know it exactly (we read or wrote it, and nothing committed between); use under `lock`."""

    socket: Socket
    handles: list[weakref.ref[NetNS]]
    known: tuple[Listing, int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return any((ns := ref()) is not None and ns.fd >= 0 for ref in self.handles)

    def hold(self, ns: NetNS) -> None:
        if not any(ref() is ns for ref in self.handles):
            self.handles = [ref for ref in self.handles if ref() is not None] + [weakref.ref(ns)]


def default_limit() -> int:
    """A quarter of the open-file limit, at most 4096: each kept socket is an open file."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, min(4096, soft // 4 if soft != resource.RLIM_INFINITY else 4096))


class KeptSockets:
    def __init__(self, limit: int | None = None, sweep_every_s: float = SWEEP_EVERY_S) -> None:
        self.limit = default_limit() if limit is None else limit
        self._kept: dict[int, Kept] = {}  # by namespace inode: unique while our socket pins it
        self._lock = threading.Lock()
        self._sweep_every_s = sweep_every_s
        self._sweeper: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, inode: object) -> bool:
        """Whether a socket is kept for the namespace with this inode."""
        return inode in self._kept

    def get(self, ns: NetNS) -> Kept | None:
        """The namespace's kept socket, opened (inside it) the first time; None past the limit or
        when no socket can be opened there."""
        with self._lock:
            if ns.fd < 0:
                return None
            kept = self._kept.get(ns.inode)
            if kept is not None:
                kept.hold(ns)
                return kept
            if len(self._kept) >= self.limit:
                return None
        try:
            sock = ns.run(Socket)
        except OSError as err:
            log.warning(
                "cannot open a netlink socket in the namespace", extra={"ns": ns.path, "error": str(err)}
            )
            return None
        with self._lock:
            kept = self._kept.setdefault(ns.inode, Kept(sock, []))
            kept.hold(ns)
            self._start_sweeper()
        if kept.socket is not sock:  # another thread opened one meanwhile
            sock.close()
        return kept

    def sweep(self) -> int:
        """Close the sockets of namespaces nobody holds any more; how many were closed."""
        with self._lock:
            dead = [inode for inode, kept in self._kept.items() if not kept.alive()]
            closing = [self._kept.pop(inode) for inode in dead]
        for kept in closing:
            with kept.lock:  # an update under way finishes first
                kept.socket.close()
        return len(closing)

    def close(self) -> None:
        """Close every socket (a test's end, an agent that stops)."""
        with self._lock:
            closing = list(self._kept.values())
            self._kept.clear()
        for kept in closing:
            with kept.lock:
                kept.socket.close()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = threading.Thread(target=self._sweep_forever, name="nfnl-sweeper", daemon=True)
            self._sweeper.start()

    def _sweep_forever(self) -> None:
        # Started by whichever thread first keeps a socket: one inside a pod's namespace, which
        # this thread would inherit and keep alive for good. It joins the process's own first.
        with NetNS.of_process() as own:
            own.move_here()
        while True:
            time.sleep(self._sweep_every_s)
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive any one socket's trouble
                log.exception("closing kept netlink sockets failed")
