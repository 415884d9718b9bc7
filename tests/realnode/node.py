"""containerd 1.6 (CRI) + runc + CNI bridge on this machine, its whole state under one temp dir,
and a teardown that leaves the machine as it was — also when a test failed half-way or containerd
was SIGKILLed (its shims and containers outlive it).

What containerd 1.6 touches outside its configured root and state, and how we undo it:
- `/run/containerd/s/<hash>`: shim sockets (hard-coded) — the ones created meanwhile are removed,
  and the directories if they were not there before;
- `/var/lib/cni/results`: libcni's result cache (hard-coded) — the entries our sandboxes added
  (our network's and CRI's loopback's) are removed;
- the bridge plugin's sysctls (`ip_forward`, IPv6 `forwarding`) — restored to their old values;
- cgroups `/kubepods/<qos>/pod<uid>` in every hierarchy — removed once their processes are gone.
Pod network namespaces are mounted under the state dir (`netns_mounts_under_state_dir`), never in
`/run/netns`; IPAM state lives in the temp dir; runc's state too (the runtime's `Root`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.realnode import images
from tests.realnode.cri import RuntimeClient

LOCK_PATH = Path(os.environ.get("NETISOLATE_REALNODE_LOCK", "/run/lock/netisolate-realnode.lock"))
BRIDGE = "ni-realnode0"
NETWORK = "netisolate-realnode"
SUBNET_V4, SUBNET_V6 = "198.18.0.0/24", "fd00:198:18::/64"  # benchmarking ranges: never routed
CNI_PLUGINS = ("bridge", "host-local", "loopback")
CNI_BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
SHIM_SOCKETS, CNI_CACHE = Path("/run/containerd"), Path("/var/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
TOOLS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "gcc", "busybox", "socat")


class NodeError(RuntimeError):
    pass


def _sysctl_paths() -> list[Path]:
    """The forwarding switches the bridge plugin turns on (all, default and per interface)."""
    paths = [Path("/proc/sys/net/ipv4/ip_forward")]
    for family in ("ipv4", "ipv6"):
        paths += sorted(Path(f"/proc/sys/net/{family}/conf").glob("*/forwarding"))
    return paths


def _read_sysctls() -> dict[Path, str]:
    values = {}
    for path in _sysctl_paths():
        with contextlib.suppress(OSError):
            values[path] = path.read_text().strip()
    return values


def _listing(directory: Path) -> set[str] | None:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")} if directory.exists() else None


def _ruleset() -> str:
    """The host namespace's rules (counters zeroed): a CNI plugin must leave none behind."""
    text = ""
    for argv in (["nft", "list", "ruleset"], ["iptables-legacy-save"], ["ip6tables-legacy-save"]):
        if shutil.which(argv[0]):
            text += subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    text = re.sub(r"^#.*$", "", text, flags=re.M)  # iptables-save's timestamps
    text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
    return re.sub(r"packets \d+ bytes \d+", "packets 0 bytes 0", text)


def _links() -> dict[str, str]:
    """{host interface: its master or ''}."""
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"]: link.get("master", "") for link in json.loads(out)}


def _cmdlines() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


@dataclass(frozen=True)
class MachineState:
    """What the real node may change on the machine; equal before and after a node's life."""

    sysctls: dict[Path, str]
    links: frozenset[str]
    shim_sockets: frozenset[str] | None
    cni_cache: frozenset[str] | None
    ruleset: str
    netns: frozenset[str]

    @classmethod
    def take(cls) -> MachineState:
        shims, cache = _listing(SHIM_SOCKETS), _listing(CNI_CACHE)
        return cls(
            sysctls=_read_sysctls(),
            links=frozenset(_links()),
            shim_sockets=None if shims is None else frozenset(shims),
            cni_cache=None if cache is None else frozenset(cache),
            ruleset=_ruleset(),
            netns=frozenset(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else frozenset(),
        )

    def differences(self, after: MachineState) -> list[str]:
        out = []
        for path, value in self.sysctls.items():
            now = after.sysctls.get(path)
            if now is not None and now != value:
                out.append(f"sysctl {path} is {now}, was {value}")
        out += [
            f"new interface {name}" for name in after.links - self.links if name == BRIDGE or "veth" in name
        ]
        if after.shim_sockets != self.shim_sockets:
            out.append(f"{SHIM_SOCKETS} changed: {self.shim_sockets} -> {after.shim_sockets}")
        if after.cni_cache != self.cni_cache:
            out.append(f"{CNI_CACHE} changed: {self.cni_cache} -> {after.cni_cache}")
        if after.ruleset != self.ruleset:
            out.append("the host's nftables/iptables rules changed")
        out += [f"new /run/netns/{name}" for name in after.netns - self.netns if name.startswith("cni-")]
        return out


@dataclass
class RealNode:
    """One containerd with CRI and a CNI bridge network; `start()`, then `close()` (always)."""

    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ni-realnode-", dir="/tmp")))
    extra_plugins: list[dict[str, Any]] = field(default_factory=list)  # chained after the bridge
    process: subprocess.Popen[bytes] | None = None
    cri: RuntimeClient | None = None
    pod_uids: set[str] = field(default_factory=set)  # pods whose cgroups teardown removes
    images: set[str] = field(default_factory=set)  # image references containerd holds
    before: MachineState | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def cni_bin(self) -> Path:
        """Where CNI plugins are looked up: drop another plugin's binary here to chain it."""
        return self.dir / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.dir / "cni" / "conf"

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    # --- start -----------------------------------------------------------------------------------

    def start(self) -> RealNode:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise NodeError(f"missing {', '.join(missing)}: run `sudo bash scripts/bootstrap.sh test`")
        self.before = self.before or MachineState.take()
        self.cni_bin.mkdir(parents=True)
        self.cni_conf.mkdir(parents=True)
        for plugin in CNI_PLUGINS:
            source = next((d / plugin for d in CNI_BIN_DIRS if (d / plugin).exists()), None)
            if source is None:
                raise NodeError(
                    f"CNI plugin {plugin} not found in {CNI_BIN_DIRS}: install containernetworking-plugins"
                )
            (self.cni_bin / plugin).symlink_to(source)
        self.write_conflist()
        config = self.dir / "config.toml"
        config.write_text(self._config())
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(config), "--log-level", "info"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # our Ctrl-C reaches the tests, which tear it down
            )
        self.cri = RuntimeClient(str(self.socket))
        self._wait_ready()
        self._import_images()
        return self

    def _config(self) -> str:
        d = self.dir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[{cri}]
  sandbox_image = "{images.PAUSE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{cri}.cni]
  bin_dir = "{self.cni_bin}"
  conf_dir = "{self.cni_conf}"
  max_conf_num = 1
[{cri}.containerd]
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{self.runc_root}"
"""

    def conflist(self) -> dict[str, Any]:
        bridge = {
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": True,  # the bridge holds .1 / ::1; no default route is given to pods
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "dataDir": str(self.dir / "cni" / "ipam"),
                "ranges": [[{"subnet": SUBNET_V4}], [{"subnet": SUBNET_V6}]],
            },
        }
        return {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [bridge, *self.extra_plugins]}

    def write_conflist(self, extra_plugins: list[dict[str, Any]] | None = None) -> None:
        """(Re)write the network's conflist atomically (containerd reloads a half-written file),
        and, while containerd runs, wait until it has loaded it."""
        if extra_plugins is not None:
            self.extra_plugins = extra_plugins
        text = json.dumps(self.conflist(), indent=2)
        partial = self.cni_conf / ".10-netisolate.conflist.partial"  # not a name libcni reads
        partial.write_text(text)
        os.replace(partial, self.cni_conf / "10-netisolate.conflist")
        if self.cri is None:
            return
        wanted = [p["type"] for p in self.conflist()["plugins"]]
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(ValueError):
                loaded = json.loads(self.cri.cni_config() or "{}")
                networks = loaded.get("Networks") or []
                types = [p["Network"]["type"] for n in networks for p in n["Config"]["Plugins"]]
                if types[-len(wanted) :] == wanted:
                    return
            if time.monotonic() > deadline:
                raise NodeError(f"containerd did not load the new CNI configuration; see {self.log}")
            time.sleep(0.02)

    def _wait_ready(self) -> None:
        assert self.cri is not None and self.process is not None
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise NodeError(f"containerd exited with {self.process.returncode}: {self._log_tail()}")
            try:
                self.cri.version()
                return
            except Exception:  # grpc raises several kinds until containerd's socket answers: keep asking
                if time.monotonic() > deadline:
                    raise NodeError(
                        f"containerd's CRI did not answer within 30 s: {self._log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-15:])
        except OSError:
            return "(no log)"

    def _import_images(self) -> None:
        archives = {"pause.tar": images.pause_archive(self.dir), "toolbox.tar": images.toolbox_archive()}
        for name, data in archives.items():
            path = self.dir / name
            path.write_bytes(data)
            self.import_image(path)

    def import_image(self, archive: Path) -> None:
        """Import an OCI or Docker archive into CRI's namespace (k8s.io); pods can then use its name."""
        self.ctr("images", "import", str(archive))
        self.images = {ref for ref in self.ctr("images", "ls", "-q").split() if not ref.startswith("sha256:")}

    def ctr(self, *args: str) -> str:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    # --- crash, for tests --------------------------------------------------------------------------

    def kill_containerd(self) -> None:
        """SIGKILL containerd, as an OOM kill or a crash would: its shims and containers live on."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    # --- teardown ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Undo everything, whatever state the node is in; raises afterwards if a step failed."""
        errors: list[str] = []
        for step in (
            self._remove_sandboxes,
            self._stop_containerd,
            self._kill_leftovers,
            self._unmount,
            self._remove_links,
            self._remove_cgroups,
            self._restore_sysctls,
            self._remove_outside_files,
        ):
            try:
                step()
            except Exception as err:  # every teardown step runs, whatever an earlier one raised
                errors.append(f"{step.__name__}: {err}")
        if self.cri is not None:
            self.cri.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise NodeError("real node teardown incomplete: " + "; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this node is still on the machine (after close(): nothing), beyond MachineState."""
        out = [f"process {pid}: {cmd}" for pid, cmd in _cmdlines().items() if str(self.dir) in cmd]
        mounts = Path("/proc/self/mountinfo").read_text()
        out += [f"mount {line.split()[4]}" for line in mounts.splitlines() if str(self.dir) in line]
        for uid in self.pod_uids:
            out += [f"cgroup {path}" for path in CGROUP_ROOT.glob(f"*/kubepods/*/pod{uid}")]
        if self.dir.exists():
            out.append(f"directory {self.dir}")
        if self.before is not None:
            out += self.before.differences(MachineState.take())
        return out

    def _remove_sandboxes(self) -> None:
        """The kubelet's way out, while containerd answers: stop (CNI DEL) and remove every sandbox."""
        if self.cri is None or self.process is None or self.process.poll() is not None:
            return
        for sandbox in self.cri.sandboxes():
            self.cri.stop_sandbox(sandbox.id)
            self.cri.remove_sandbox(sandbox.id)

    def _stop_containerd(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _kill_leftovers(self) -> None:
        """Shims that outlived containerd, and their containers (runc's state names them)."""
        inits = []
        for state in self.runc_root.glob("*/*/state.json"):  # <Root>/<namespace>/<container>
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                runc = json.loads(state.read_text())
                pid = int(runc["init_process_pid"])
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[19]) == int(runc["init_process_start"]):  # that process, not a reused PID
                    inits.append(pid)
        shims = [
            pid for pid, cmd in _cmdlines().items() if "containerd-shim" in cmd and str(self.socket) in cmd
        ]
        for pid in inits + shims:  # a container's init ends its container (its PID namespace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive := [pid for pid in inits + shims if Path(f"/proc/{pid}").exists()]:
            if time.monotonic() > deadline:  # orphans are reaped by PID 1, which may be slow
                raise NodeError(f"processes {alive} did not exit")
            time.sleep(0.02)

    def _unmount(self) -> None:
        """Rootfs, netns and shm mounts under our dir, deepest first (a lazy unmount if busy)."""
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(str(self.dir) + "/"):
                mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _remove_links(self) -> None:
        """Pod namespaces are gone, so their veths are too; whatever still hangs on the bridge goes."""
        links = _links()
        for name, master in links.items():
            if master == BRIDGE:
                subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
        if BRIDGE in links:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=True)

    def _remove_cgroups(self) -> None:
        deadline = time.monotonic() + 10
        for uid in self.pod_uids:
            for pod_dir in CGROUP_ROOT.glob(f"*/kubepods/*/pod{uid}"):
                for directory in [*sorted(pod_dir.rglob("*"), key=lambda p: -len(p.parts)), pod_dir]:
                    while directory.is_dir():
                        try:
                            directory.rmdir()
                        except OSError:  # processes still leaving
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.05)
        for qos in CGROUP_ROOT.glob("*/kubepods/*"):  # empty ones; another test's pods keep theirs
            with contextlib.suppress(OSError):
                qos.rmdir()
        for kubepods in CGROUP_ROOT.glob("*/kubepods"):
            with contextlib.suppress(OSError):
                kubepods.rmdir()

    def _restore_sysctls(self) -> None:
        if self.before is None:
            return
        for path, value in self.before.sysctls.items():
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value)

    def _remove_outside_files(self) -> None:
        before = self.before
        if before is None:
            return
        sockets = _listing(SHIM_SOCKETS) or set()
        for name in sorted(sockets - (before.shim_sockets or set()), key=len, reverse=True):
            path = SHIM_SOCKETS / name
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        if before.shim_sockets is None:
            with contextlib.suppress(OSError):
                SHIM_SOCKETS.rmdir()
        cached = (_listing(CNI_CACHE) or set()) - (before.cni_cache or set())
        for name in cached:  # results of our network and of CRI's loopback network, both per sandbox
            if Path(name).name.startswith((f"{NETWORK}-", "cni-loopback-")):
                (CNI_CACHE / name).unlink(missing_ok=True)
        if before.cni_cache is None:
            for directory in (CNI_CACHE / "results", CNI_CACHE):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def _lock_holders() -> str:
    """Who holds LOCK_PATH (from /proc/locks), for the message of a run that waits."""
    inode = LOCK_PATH.stat().st_ino
    pids = {
        int(fields[4])
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())
        if len(fields) > 5 and fields[1] != "->" and fields[5].endswith(f":{inode}")
    }
    commands = _cmdlines()
    return ", ".join(f"PID {pid} ({commands.get(pid, '?').strip()[:120]})" for pid in sorted(pids)) or "?"


_held = [False]  # this process runs a node: a second one would share its bridge and subnet


def _wait_for(lock: IO[str]) -> None:
    """Blocks until the lock is ours (a waiter queued in the kernel, woken when it is free). The
    wait does not count against a test's own timeout (pytest-timeout's interval timer is paused
    meanwhile): a run that waits for another's real node is not slow itself."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    print(f"real node: waiting for {LOCK_PATH}, held by {_lock_holders()}", file=sys.stderr, flush=True)
    main = threading.current_thread() is threading.main_thread()
    paused = signal.setitimer(signal.ITIMER_REAL, 0) if main else (0.0, 0.0)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    finally:
        if paused[0]:
            signal.setitimer(signal.ITIMER_REAL, *paused)


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """The real node is machine-wide (one bridge, one subnet, shim sockets, CNI cache): one test run
    at a time holds this lock (an flock on LOCK_PATH); others wait for it."""
    if _held[0]:
        raise NodeError("a real node already runs in this process: use the `node` fixture's")
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_PATH.open("a") as lock:
        _wait_for(lock)
        _held[0] = True
        try:
            yield
        finally:
            _held[0] = False
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def real_node(extra_plugins: list[dict[str, Any]] | None = None) -> Iterator[RealNode]:
    """A started node, under the machine-wide lock, torn down (and the machine checked) after."""
    with exclusive():
        node = RealNode(extra_plugins=list(extra_plugins or []))
        try:
            yield node.start()
        finally:
            node.close()
