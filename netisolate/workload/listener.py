"""Listen on the given ports (`8080`, `53/udp`) on every address, IPv4 and IPv6; answer each TCP
connection with `ok` and echo each UDP datagram. Prints `ready` once every socket is bound."""

from __future__ import annotations

import selectors
import socket
import sys


def bind(port: int, proto: str) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    if proto == "tcp":
        sock.listen(128)
    else:  # learn which address each datagram was sent to, to answer from that same address
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    return sock


def echo(sock: socket.socket) -> None:
    data, ancillary, _, peer = sock.recvmsg(2048, socket.CMSG_SPACE(20))
    info = [c for level, kind, c in ancillary if (level, kind) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)]
    # in6_pktinfo: the destination address, then an interface index (0: let routing choose)
    reply = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info[0][:16] + bytes(4))] if info else []
    sock.sendmsg([data], reply, 0, peer)


def serve(sel: selectors.DefaultSelector) -> None:
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock.type == socket.SOCK_STREAM:
                conn, _ = sock.accept()
                conn.sendall(b"ok")
                conn.close()
            else:
                echo(sock)


def main() -> None:
    sel = selectors.DefaultSelector()
    for spec in sys.argv[1:]:
        port, _, proto = spec.partition("/")
        sel.register(bind(int(port), proto or "tcp"), selectors.EVENT_READ)
    print("ready", flush=True)
    serve(sel)


if __name__ == "__main__":
    main()
