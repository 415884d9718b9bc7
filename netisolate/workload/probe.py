"""Try each target `ADDR PORT PROTO` given as arguments (triples) and print one result per line:
`open`, `refused` (TCP reset or ECONNREFUSED), `eperm` (the send was dropped locally),
`unreachable` (EHOSTUNREACH: ICMP admin-prohibited, the netisolate sentinel), `timeout`, or an
errno name. A hang is never mistaken for a result: every attempt has a short timeout."""

from __future__ import annotations

import errno
import socket
import sys

TIMEOUT = 1.0
RESULTS = {errno.ECONNREFUSED: "refused", errno.EPERM: "eperm", errno.EHOSTUNREACH: "unreachable"}


def attempt(addr: str, port: int, proto: str) -> str:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((addr, port))
            if proto == "udp":
                sock.send(b"ping")
            return "open" if sock.recv(16) else "closed"
        except TimeoutError:
            return "timeout"
        except OSError as err:
            return RESULTS.get(err.errno or 0, errno.errorcode.get(err.errno or 0, str(err)))


def main() -> None:
    args = sys.argv[1:]
    for i in range(0, len(args), 3):
        print(attempt(args[i], int(args[i + 1]), args[i + 2]), flush=True)


if __name__ == "__main__":
    main()
