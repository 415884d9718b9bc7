"""The agent's Unix socket for the CNI plugin: one thread per call, the pod's network namespace
received as a file descriptor, only root on this node may call (SO_PEERCRED). An answer may
carry work for after it is sent (bookkeeping the runtime need not wait for), done on the same
thread.

The socket lives in a directory only root can enter; the plugin runs as the runtime, as root.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from netisolate.cni import protocol
from netisolate.netns import NetNS, NetNSError

log = logging.getLogger(__name__)


Then = Callable[[], object]  # what is left to do once the reply is sent (or could not be)


@dataclass(frozen=True)
class Answer:
    reply: bytes
    then: Then | None = None


Handler = Callable[[protocol.Request, NetNS | None], Answer]
READ_TIMEOUT_S = 5.0  # the plugin sends everything at once; a caller that stalls is dropped


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """Everything until the plugin closes its side, and the fds that came with it (closed again
    when the request cannot be read whole)."""
    chunks, fds, size = list[bytes](), list[int](), 0
    try:
        while True:
            data, got, _, _ = socket.recv_fds(conn, 65536, 4)
            fds.extend(got)
            if not data:
                return b"".join(chunks), fds
            size += len(data)
            if size > protocol.MAX_REQUEST:
                raise protocol.ProtocolError(f"request larger than {protocol.MAX_REQUEST} bytes")
            chunks.append(data)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _namespace(fds: list[int]) -> NetNS | None:
    """The one fd the plugin may send, as a network namespace; anything else is refused."""
    if len(fds) > 1:
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError("more than one file descriptor sent")
    if not fds:
        return None
    try:
        return NetNS.adopt(fds[0], "CNI_NETNS")
    except NetNSError as err:
        raise protocol.ProtocolError(str(err)) from None


class CniServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, handler: Handler, allowed_uid: int = 0) -> None:
        self.handler, self.allowed_uid = handler, allowed_uid
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        path.unlink(missing_ok=True)  # a stale socket of an agent that died
        super().__init__(str(path), _Connection)
        os.chmod(path, 0o600)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="cni-socket", daemon=True)
        thread.start()
        return thread


class _Connection(socketserver.BaseRequestHandler):
    server: CniServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(READ_TIMEOUT_S)
        try:
            answer = self._answer(conn)
        except protocol.ProtocolError as err:
            log.warning("malformed CNI call", extra={"error": str(err)})
            reply = protocol.failure(protocol.E_DECODE, f"netisolate agent: malformed request: {err}")
            answer = Answer(reply)
        except (OSError, TimeoutError) as err:
            log.warning("CNI call dropped", extra={"error": str(err)})
            return
        try:
            conn.sendall(answer.reply)
            conn.shutdown(socket.SHUT_WR)  # the plugin reads until EOF: it need not wait for the rest
        except OSError as err:  # the plugin gave up (its timeout): it has failed the sandbox itself
            log.warning("CNI caller gone before the answer", extra={"error": str(err)})
        if answer.then is not None:
            try:
                answer.then()
            except Exception:  # the answer is out; what follows is logged, never raised into socketserver
                log.exception("CNI bookkeeping after the answer failed")

    def _answer(self, conn: socket.socket) -> Answer:
        uid = _peer_uid(conn)
        if uid != self.server.allowed_uid:
            log.warning("CNI call refused: not from root", extra={"peer_uid": uid})
            return Answer(protocol.failure(protocol.E_ENV, "netisolate agent: only root may call it"))
        data, fds = read_request(conn)
        ns = _namespace(fds)
        try:
            return self.server.handler(protocol.parse_request(data), ns)
        finally:
            if ns is not None:
                ns.close()  # a handler that keeps the namespace holds a duplicate of its own
