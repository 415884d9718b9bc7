"""A pod on this machine without a cluster: a network namespace shaped like a pod sandbox (lo, and
an eth0 veth with IPv4 and IPv6 addresses whose peer sits in a second namespace of ours) and one
listener process per container, running under that container's UID. Used by `netisolate demo`,
the kernel tests and the shared end-to-end scenarios.

A pod with cgroup identity (`netisolate.io/identity: cgroup` or `uid+cgroup`), or made with
`with_cgroups=True`, also gets a cgroup (v2) of its own with one child per container, and every
process of a container runs in that container's cgroup, as the runtime runs them; `cgroups()` says
what the agent would have seen.

With `user_namespace=True` it is shaped like a `hostUsers: false` pod instead: the network namespace
belongs to a user namespace of its own that maps the pod's UIDs 0-65535 to the node's
USERNS_BASE and up, and the container processes run under those node UIDs, as the runtime runs them.

Everything it creates carries a unique name prefix and is removed by `close()`, which the context
manager and signal handlers guarantee.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from netisolate.agent.cgroups import NodeCgroups
from netisolate.model import Pod
from netisolate.netns import NetNS
from netisolate.policy import PortRange, effective_uid, parse_grants, pod_identity
from netisolate.rules import PodCgroups
from netisolate.workload import script

SYSTEM_PYTHON = "/usr/bin/python3"
POD_IPV4, PEER_IPV4 = "192.0.2.10", "192.0.2.1"  # TEST-NET-1: documentation addresses, never routed
POD_IPV6, PEER_IPV6 = "2001:db8::10", "2001:db8::1"
LOOPBACK_ADDRESSES = ("127.0.0.1", "127.0.0.53", "::1")
ALL_ADDRESSES = (*LOOPBACK_ADDRESSES, POD_IPV4, POD_IPV6)
USERNS_BASE, USERNS_SIZE = 200000, 65536  # the node's UIDs behind a user-namespaced pod's 0-65535


class HarnessError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def as_uid(uid: int, argv: Sequence[str]) -> list[str]:
    """argv run under uid (with a group of the same number and no supplementary groups)."""
    if uid == 0:
        return list(argv)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


def python_argv(name: str, *args: str) -> list[str]:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise HarnessError(
            f"{SYSTEM_PYTHON} is missing: install Debian's python3 (processes under other UIDs "
            "cannot run a Python that lives under /root)"
        )
    return [SYSTEM_PYTHON, "-c", script(name), *args]


@dataclass
class LocalPod:
    pod: Pod
    prefix: str = field(default_factory=lambda: f"ni-{uuid.uuid4().hex[:8]}")
    user_namespace: bool = False
    ns: NetNS | None = None
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    cgroup: Path | None = None  # the pod's cgroup, with cgroup identity or with_cgroups
    with_cgroups: bool = False  # cgroups whatever the identity (the socket guard's place under UID)
    # each container's cgroup, where the caller lays them out itself (as a node does): then every
    # process of a container starts in it, whatever the identity, and no cgroup of ours is made
    container_cgroup: Callable[[str], Path] | None = None

    @property
    def name(self) -> str:
        return f"{self.prefix}-pod"

    @property
    def peer(self) -> str:
        return f"{self.prefix}-peer"

    def uid(self, container: str) -> int:
        for c in self.pod.all_containers():
            if c.name == container:
                uid = effective_uid(self.pod, c)
                if uid is None:
                    raise HarnessError(f"container {container} has no runAsUser: the harness needs one")
                return uid
        raise HarnessError(f"the pod has no container {container!r}")

    def create(self) -> LocalPod:
        for tool in ("ip", "setpriv"):
            if shutil.which(tool) is None:
                raise HarnessError(f"{tool} is missing: run `bash scripts/bootstrap.sh` as root")
        if self.user_namespace:
            self._add_user_namespaced(self.name)
        else:
            _ip("netns", "add", self.name)
        _ip("netns", "add", self.peer)
        veth = f"v{self.prefix[3:]}"
        # The pod end is created under a unique name and renamed, as CNI plugins do.
        _ip("link", "add", veth, "netns", self.name, "type", "veth", "peer", "eth0", "netns", self.peer)
        _ip("-n", self.name, "link", "set", veth, "name", "eth0")
        for ns, v4, v6 in ((self.name, POD_IPV4, POD_IPV6), (self.peer, PEER_IPV4, PEER_IPV6)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            _ip("-n", ns, "link", "set", "eth0", "up")
        # Containers in a real pod may bind low ports (NET_BIND_SERVICE); let our listeners do so too.
        subprocess.run(
            ["ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"],
            check=True,
        )
        self.ns = NetNS.open(f"/run/netns/{self.name}")
        if (pod_identity(self.pod)[0].by_cgroup or self.with_cgroups) and self.container_cgroup is None:
            self._add_cgroups()
        return self

    def _add_cgroups(self) -> None:
        mount = NodeCgroups(lambda pod: None).mount
        if mount is None:
            raise HarnessError("cgroup identity needs cgroup v2 mounted (/sys/fs/cgroup or its unified/)")
        self.cgroup = Path(mount.point) / self.prefix
        for container in [self.cgroup, *(self.cgroup / c.name for c in self.pod.all_containers())]:
            container.mkdir()

    def cgroups(self) -> PodCgroups:
        """The pod's cgroups as the agent sees them on a node."""
        assert self.cgroup is not None, "a pod with cgroup identity, or made with_cgroups"
        directories = [(c.name, self.cgroup / c.name) for c in self.pod.all_containers()]
        return PodCgroups(
            2,  # <hierarchy root>/<pod>/<container>
            NodeCgroups.cgroup_of(str(self.cgroup)),
            tuple(sorted((name, NodeCgroups.cgroup_of(str(d))) for name, d in directories)),
        )

    def _in_cgroup(self, container: str | None, argv: list[str]) -> list[str]:
        """argv started in the container's cgroup (by a root shell, before it changes UID)."""
        if container is None:
            return argv
        if self.container_cgroup is not None:
            directory = self.container_cgroup(container)
        elif self.cgroup is not None:
            directory = self.cgroup / container
        else:
            return argv
        procs = str(directory / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def _add_user_namespaced(self, name: str) -> None:
        """A network namespace owned by a new user namespace, pinned at /run/netns/<name>."""
        holder = subprocess.Popen(
            ["unshare", "--user", "--net", "sleep", "infinity"], text=True, start_new_session=True
        )
        self.processes.append(holder)
        own = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{holder.pid}/ns/user").st_ino == own:  # until unshare(2) has run
            if time.monotonic() > deadline or holder.poll() is not None:
                raise HarnessError("unshare --user --net did not start: is util-linux installed?")
            time.sleep(0.001)
        for kind in ("uid_map", "gid_map"):
            Path(f"/proc/{holder.pid}/{kind}").write_text(f"0 {USERNS_BASE} {USERNS_SIZE}\n")
        _ip("netns", "attach", name, str(holder.pid))

    def node_uid(self, uid: int) -> int:
        """The node's UID for a UID as the pod sees it."""
        return uid + USERNS_BASE if self.user_namespace else uid

    def spawn(
        self, argv: Sequence[str], stdin: bool = False, container: str | None = None
    ) -> subprocess.Popen[str]:
        """Start a process inside the pod's namespace (it inherits the namespace of the thread), and
        in the container's cgroup where the pod has them."""
        assert self.ns is not None, "create() first"
        pipe = subprocess.PIPE
        proc = self.ns.run(
            lambda: subprocess.Popen(
                self._in_cgroup(container, list(argv)),
                stdin=pipe if stdin else subprocess.DEVNULL,
                stdout=pipe,
                stderr=pipe,
                text=True,
                start_new_session=True,
            )
        )
        self.processes.append(proc)
        return proc

    def listen(self, container: str, ports: Sequence[str]) -> None:
        """A listener on `ports` (grant syntax: `8080`, `53/udp`) under the container's UID."""
        specs = [f"{r.low}/{r.protocol}" for spec in ports for r in _ports(spec)]
        argv = as_uid(self.node_uid(self.uid(container)), python_argv("listener", *specs))
        proc = self.spawn(argv, container=container)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise HarnessError(
                f"listener for {container} failed: {proc.stderr.read() if proc.stderr else ''}"
            )

    def probe(
        self, uid: int, targets: Sequence[tuple[str, int, str]], container: str | None = None
    ) -> list[str]:
        """Connect from uid (as the pod sees it; in the container's cgroup, when given) to each
        (address, port, protocol); one result each (see workload/probe.py)."""
        args = [str(item) for target in targets for item in target]
        proc = self.spawn(as_uid(self.node_uid(uid), python_argv("probe", *args)), container=container)
        out, err = proc.communicate(timeout=5 + 2 * len(targets))
        self.processes.remove(proc)
        results = out.split()
        if len(results) != len(targets):
            raise HarnessError(f"probe as UID {uid} failed: {err.strip()}")
        return results

    def close(self) -> None:
        for proc in self.processes:
            proc.kill()
            proc.wait()
        self.processes.clear()
        if self.ns is not None:
            self.ns.close()
            self.ns = None
        for name in (self.name, self.peer):
            if Path(f"/run/netns/{name}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)
            self.cgroup = None

    def __enter__(self) -> LocalPod:
        try:
            return self.create()
        except BaseException:  # Ctrl-C mid-creation too: never leave half a pod behind
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_cgroup(directory: Path) -> None:
    """Children first; a cgroup whose killed processes the kernel has not yet let go is busy for a
    moment."""
    if not directory.exists():
        return
    for child in [p for p in directory.iterdir() if p.is_dir()]:
        _remove_cgroup(child)
    deadline = time.monotonic() + 5
    while True:
        try:
            directory.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _ports(spec: str) -> tuple[PortRange, ...]:
    ranges = parse_grants(spec)
    if any(r.low != r.high for r in ranges):
        raise HarnessError(f"{spec!r}: a listener takes single ports, not ranges")
    return ranges


def matrix(
    pod: LocalPod,
    listeners: Mapping[str, Sequence[str]],
    addresses: Sequence[str] = ALL_ADDRESSES,
    clients: Sequence[str] | None = None,
) -> dict[tuple[str, str], list[str]]:
    """{(client, "container:port[/udp]"): [result per address]} for every listener port."""
    targets = [(owner, r) for owner, specs in listeners.items() for spec in specs for r in _ports(spec)]
    names = clients if clients is not None else [c.name for c in pod.pod.spec.containers]
    out = {}
    for client in names:
        attempts = [(addr, r.low, r.protocol) for _, r in targets for addr in addresses]
        results = pod.probe(pod.uid(client), attempts, container=client)
        for i, (owner, r) in enumerate(targets):
            out[(client, f"{owner}:{r}")] = results[i * len(addresses) : (i + 1) * len(addresses)]
    return out
