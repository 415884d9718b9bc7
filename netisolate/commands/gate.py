"""`netisolate gate`: the start-up gate, run as a pod's first init container."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import time

from netisolate.commands.common import add_command, port, seconds
from netisolate.rules import DEFAULT_SENTINEL_PORT

DETAILS = f"""\
Waits until the pod's netisolate rules are live, so no other container starts before they hold:
it connects to 127.0.0.1:PORT (the agent's sentinel, default {DEFAULT_SENTINEL_PORT}) until the connection
fails with EHOSTUNREACH — an ICMP admin-prohibited answer that only the agent's rules produce (the
socket guard, --socket-guard, answers the same, before a packet leaves).
Exit 0 then; exit 1 at the timeout, so the kubelet retries the pod (fail closed).

  initContainers:
    - name: netisolate-gate            # first, before every other init container
      image: ghcr.io/netisolate/netisolate:0.1.0
      args: [gate, --timeout, "120"]
      securityContext: {{runAsUser: 65532, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "gate", "wait until this pod's isolation rules are live", DETAILS)
    parser.add_argument("--timeout", type=seconds, default=120.0, metavar="SECONDS")
    parser.add_argument(
        "--port",
        type=port,
        default=DEFAULT_SENTINEL_PORT,
        help="the agent's --sentinel-port (default %(default)s)",
    )
    parser.add_argument("--interval", type=seconds, default=0.05, metavar="SECONDS", help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def sentinel_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)  # an answer lost to ICMP rate limiting is simply tried again
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as err:
            return err.errno == errno.EHOSTUNREACH
        return False  # something listens there: not our rules


def run(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if sentinel_answers(args.port):
            print("netisolate gate: rules are live")
            return 0
        time.sleep(args.interval)
    print(
        f"netisolate gate: no rules after {args.timeout:.0f}s (is the agent running on this node?)",
        file=sys.stderr,
    )
    return 1
