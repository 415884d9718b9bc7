"""`netisolate agent` and `netisolate status`: the node agent, and what it is doing."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from netisolate.agent.state import NodeStatus, PodState
from netisolate.backends import BACKENDS, EnforceError, guarded, select_backend
from netisolate.cni.options import DEFAULT_EXEMPT, CniOptions
from netisolate.commands.common import add_command, add_rule_settings, port, rule_settings, seconds
from netisolate.logs import setup_logging
from netisolate.model import InputError
from netisolate.netns import NetNS, NetNSError

METRICS_PORT = 9808
AGENT_DETAILS = """\
Runs on every node (DaemonSet, hostPID, capabilities NET_ADMIN, SYS_ADMIN, SYS_PTRACE). Watches the
pods of its own node (server-side field selector spec.nodeName) and the namespaces, finds each
isolated pod's network namespace from /proc, installs its rules, verifies them at start-up and every
--verify-interval seconds and repairs drift. Rules are never removed by the agent: they go away with
the pod. A pod's own `netisolate.io/isolation` annotation is enforced at once, even while the
namespace list/watch fails; a namespace label can only raise its level. Serves /metrics, /healthz,
/readyz (ready after the start-up verification, with the namespace labels known) and /status.

Cgroup identity (--identity cgroup, or a pod's netisolate.io/identity): containers are known by
their cgroup v2, found under the first cgroup2 mount that shows the node's whole hierarchy (the
DaemonSet mounts the node's /sys/fs/cgroup read-only); a restarted container's new cgroup is put
in its set as soon as the runtime places its first process there. nftables only: elsewhere such
pods are enforced with no grants and a CgroupIdentityUnavailable event.
"""
STATUS_DETAILS = (
    "Asks the agent on this node (its --metrics-port on localhost) for the pods it tracks and "
    "their state:\n" + "".join(f"  {state:<13} {state.meaning}\n" for state in PodState)
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agent = add_command(sub, "agent", "run the node agent", AGENT_DETAILS)
    agent.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="default: $NODE_NAME")
    agent.add_argument("--kubeconfig", metavar="FILE", help="default: in-cluster configuration")
    agent.add_argument("--backend", choices=("auto", *BACKENDS), default="auto")
    agent.add_argument(
        "--socket-guard",
        action="store_true",
        help="nftables only: judge the pods it can serve (enforce, no UDP grant, no NAT in the pod, "
        "taken over before the pod opens a socket: with the chained CNI plugin) with cgroup BPF "
        "programs on the pod's cgroup, once per connect/send/bind, instead of netfilter rules that "
        "every packet meets (docs/design.md, the socket guard)",
    )
    agent.add_argument("--metrics-port", type=port, default=METRICS_PORT, help="default %(default)s")
    add_rule_settings(agent)
    agent.add_argument(
        "--verify-interval",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="how often every pod's rules are read back and compared; drift is repaired (default 30)",
    )
    add_cni_arguments(agent)
    agent.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    agent.add_argument(
        "--host-netns",
        default="/proc/1/ns/net",
        metavar="PATH",
        help="the node's own network namespace, never taken for a pod's (default: PID 1's, which "
        "needs hostPID; name another where PID 1 is not the node's init)",
    )
    agent.set_defaults(run=run_agent)
    status = add_command(sub, "status", "list this node's pods and their enforcement state", STATUS_DETAILS)
    status.add_argument(
        "--metrics-port",
        type=port,
        default=METRICS_PORT,
        help="the agent's --metrics-port (default %(default)s)",
    )
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")
    status.set_defaults(run=run_status)


CNI_DETAILS = """\
With --cni-conf-dir and --cni-bin-dir the agent also serves netisolate's chained CNI plugin: it
copies --cni-plugin into the bin dir, appends it as the last plugin of the node's primary conflist
(the first file of the conf dir, as the runtime picks it; put back within a second whenever the
node's CNI rewrites that file), and answers it on --cni-socket. The runtime then starts no
container of an isolated pod before its rules hold; while the agent is down, every pod outside
--cni-exempt-namespaces waits (fail closed). --cni-uninstall takes the plugin out of the
conflist first, then removes it, and runs on as an agent without it."""


def add_cni_arguments(agent: argparse.ArgumentParser) -> None:
    cni = agent.add_argument_group(
        "chained CNI plugin (rules before the first container starts)", CNI_DETAILS
    )
    cni.add_argument(
        "--cni-conf-dir", type=Path, metavar="DIR", help="the node's CNI conf dir (/etc/cni/net.d)"
    )
    cni.add_argument("--cni-bin-dir", type=Path, metavar="DIR", help="the node's CNI bin dir (/opt/cni/bin)")
    cni.add_argument(
        "--cni-plugin",
        type=Path,
        default=Path("/usr/local/lib/netisolate/netisolate-cni"),
        metavar="PATH",
        help="the plugin binary to install (default: the image's, %(default)s)",
    )
    cni.add_argument(
        "--cni-socket",
        type=Path,
        default=Path("/var/run/netisolate/cni.sock"),
        metavar="PATH",
        help="the agent's socket for the plugin, on a hostPath (default %(default)s)",
    )
    cni.add_argument(
        "--cni-exempt-namespaces",
        default=",".join(DEFAULT_EXEMPT),
        metavar="NS,...",
        help="namespaces whose pods always start, agent or not: the agent's own, the webhook's, the "
        "CNI's and kube-system belong here (default %(default)s; $POD_NAMESPACE is added)",
    )
    cni.add_argument(
        "--cni-uninstall",
        action="store_true",
        help="take the plugin out of the node's CNI and run without it",
    )


def cni_options(args: argparse.Namespace) -> CniOptions | None:
    if args.cni_conf_dir is None and args.cni_bin_dir is None:
        return None
    if args.cni_conf_dir is None or args.cni_bin_dir is None:
        raise InputError("--cni-conf-dir and --cni-bin-dir go together: the plugin needs both")
    exempt = {n.strip() for n in args.cni_exempt_namespaces.split(",") if n.strip()}
    if os.environ.get("POD_NAMESPACE"):
        exempt.add(os.environ["POD_NAMESPACE"])  # the agent must be able to start itself
    return CniOptions(
        args.cni_conf_dir, args.cni_bin_dir, args.cni_plugin, args.cni_socket, tuple(sorted(exempt))
    )


def run_agent(args: argparse.Namespace) -> int:
    from netisolate.agent.cni import start as start_cni
    from netisolate.agent.cni_conf import CniInstallError, uninstall
    from netisolate.agent.node import Agent
    from netisolate.kube import api_client

    setup_logging()
    if not args.node_name:
        raise InputError(
            "no node name: pass --node-name or set NODE_NAME (the DaemonSet sets it from spec.nodeName)"
        )
    cni = cni_options(args)
    core = api_client(args.kubeconfig, "netisolate-agent")
    settings = rule_settings(args)
    try:
        with NetNS.open(args.host_netns) as host:
            backend = select_backend(args.backend, host)
        if args.socket_guard:
            backend = guarded(backend)
        agent = Agent(
            args.node_name,
            backend,
            settings,
            core,
            proc_root=args.proc_root,
            host_netns=args.host_netns,
            verify_interval=args.verify_interval,
        )
    except NetNSError as err:  # nothing to tell pods from the node with: say why, and let it restart
        return _failed(
            f"{err}: the agent needs the node's own network namespace; run it with hostPID (and "
            "SYS_PTRACE), or name that namespace with --host-netns"
        )
    except EnforceError as err:  # nothing to enforce with
        return _failed(str(err))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    if cni is not None and args.cni_uninstall:
        uninstall(cni.conf_dir, cni.bin_dir)
    elif cni is not None:
        try:
            start_cni(cni, agent.reconciler, core, agent.stop)
        except (CniInstallError, OSError) as err:
            return _failed(f"cannot serve the CNI plugin: {err}")
    agent.run(args.metrics_port)
    return 0


def _failed(why: str) -> int:
    """The agent cannot start: why, on stderr, and the exit code that lets it be restarted."""
    print(f"netisolate agent: {why}", file=sys.stderr)
    return 1


def run_status(args: argparse.Namespace) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{args.metrics_port}/status", timeout=5) as r:
            status: NodeStatus = json.loads(r.read())
    except (urllib.error.URLError, OSError) as err:
        print(f"netisolate status: no agent answers on 127.0.0.1:{args.metrics_port}: {err}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(status, indent=2))
        return 0
    print(f"node {status['node']} ({status['backend']}, {'ready' if status['ready'] else 'starting'})")
    if status.get("unready"):
        print(f"  not ready: {status['unready']}")
    for pod in status["pods"]:
        seen = pod.get("observed") or []
        learned = f" ({len(seen)} not granted seen: netisolate suggest)" if seen else ""
        print(f"  {pod['state']:<12} {pod['pod']:<40} {pod['detail']}{learned}")
    return 0
