"""What the red-team's unprivileged processes do, as one stdlib-only script that tests run under a
container's UID with the system python3 (`python3 -c SOURCE MODE ARGS...`).

    recv  PROTO PORT [ADDR]         bind PROTO (tcp, udp, udplite) on PORT, on ADDR or on both
                                    0.0.0.0 and ::; print `ready`, then `got <data>` for each
                                    datagram or connection (answering `ok` from the same socket)
    send  PROTO ADDR PORT [OPT...]  one attempt; prints `open` (an answer came), `sent` (no answer
                                    in time), `refused`, `eperm`, `timeout` or an errno name
    ping  ADDR                      one echo request from an unprivileged ping socket

Options for send: `sport=N` (bind the source port first, with SO_REUSEADDR), `device=DEV`
(SO_BINDTODEVICE), `broadcast` (SO_BROADCAST), `fastopen` (TCP: data in the SYN), `mptcp`.
An address may carry an IPv6 scope: `ff02::1%eth0`.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import sys

TIMEOUT = 1.0
IPPROTO_UDPLITE, IPPROTO_MPTCP, MSG_FASTOPEN = 136, 262, 0x20000000
RESULTS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "refused",
    errno.EPERM: "eperm",
    errno.EAGAIN: "timeout",  # a blocking socket's SO_SNDTIMEO / SO_RCVTIMEO ran out
    errno.EINPROGRESS: "timeout",
}


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _socket(proto: str, family: socket.AddressFamily, mptcp: bool = False) -> socket.socket:
    if proto == "tcp":
        return socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    return socket.socket(family, socket.SOCK_DGRAM, IPPROTO_UDPLITE if proto == "udplite" else 0)


def _address(addr: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    if ":" not in addr:
        return (addr, port)
    host, _, scope = addr.partition("%")
    return (host, port, 0, socket.if_nametoindex(scope) if scope else 0)


def recv(proto: str, port: int, addr: str = "") -> None:
    sel = selectors.DefaultSelector()
    for bind in [addr] if addr else ["0.0.0.0", "::"]:
        sock = _socket(proto, _family(bind))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6 and not addr:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(_address(bind, port))
        if proto == "tcp":
            sock.listen(16)
        sel.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj  # type: ignore[assignment]
            if proto == "tcp":
                conn, _ = sock.accept()
                conn.settimeout(TIMEOUT)
                try:
                    data = conn.recv(100)
                except OSError:
                    data = b""
                print(f"got {data.decode() or '-'}", flush=True)
                with contextlib.suppress(OSError):  # the client may be gone already
                    conn.sendall(b"ok")
                conn.close()
            else:
                data, peer = sock.recvfrom(2048)
                print(f"got {data.decode()}", flush=True)
                try:
                    sock.sendto(b"ok", peer)
                except OSError as err:
                    print(f"answer {errno.errorcode.get(err.errno or 0, err)}", flush=True)


def send(proto: str, addr: str, port: int, options: list[str]) -> str:
    opts = dict(option.partition("=")[::2] for option in options)
    with _socket(proto, _family(addr), "mptcp" in opts) as sock:
        if "fastopen" in opts:  # a blocking send, so the SYN carries the data; bounded by timeouts
            timeval = struct.pack("ll", int(TIMEOUT), int(TIMEOUT % 1 * 1e6))
            for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
                sock.setsockopt(socket.SOL_SOCKET, option, timeval)
        else:
            sock.settimeout(TIMEOUT)
        if "device" in opts:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, opts["device"].encode())
        if "broadcast" in opts:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if "sport" in opts:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", int(opts["sport"])))
        target, payload = _address(addr, port), b"hello"
        try:
            if proto == "tcp" and "fastopen" in opts:
                sock.sendto(payload, MSG_FASTOPEN, target)
            elif proto == "tcp":
                sock.connect(target)
                sock.sendall(payload)
            else:
                sock.sendto(payload, target)
            return "open" if sock.recv(16) else "closed"
        except TimeoutError:
            return "sent" if proto != "tcp" else "timeout"
        except OSError as err:
            return RESULTS.get(err.errno or 0, errno.errorcode.get(err.errno or 0, str(err)))


def ping(addr: str) -> str:
    family = _family(addr)
    proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, str(err))
    with sock:
        sock.settimeout(TIMEOUT)
        echo = bytes([128 if family == socket.AF_INET6 else 8, 0, 0, 0, 0, 0, 0, 1]) + b"hello"
        try:
            sock.sendto(echo, _address(addr, 0))
            sock.recv(64)
            return "open"
        except TimeoutError:
            return "timeout"
        except OSError as err:
            return RESULTS.get(err.errno or 0, errno.errorcode.get(err.errno or 0, str(err)))


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "recv":
        recv(args[0], int(args[1]), *args[2:3])
    elif mode == "send":
        print(send(args[0], args[1], int(args[2]), args[3:]), flush=True)
    else:
        print(ping(args[0]), flush=True)


if __name__ == "__main__":
    main()
