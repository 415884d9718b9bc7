"""The CNI plugin as the runtime runs it: the binary (built by scripts/bootstrap.sh, rebuilt here
when the source is newer), called with the CNI environment and a network configuration on stdin,
and the agent's side of it (reconciler, socket, conf dir) on this machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from netisolate.agent.cni import start
from netisolate.agent.node import Agent
from netisolate.backends import select_backend
from netisolate.cni import conflist
from netisolate.cni.options import CniOptions
from netisolate.rules import Settings
from tests.kube_standin import ours

ROOT = Path(__file__).parent.parent
SOURCE = ROOT / "cni" / "netisolate-cni.c"
BUILT = ROOT / "build" / "netisolate-cni"
PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:c6:12:00:05", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 0}],
    "dns": {"nameservers": ["198.18.0.10"], "search": ["shop.svc.cluster.local"]},
}
PRIMARY = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [
        {"type": "bridge", "bridge": "ni0", "ipam": {"type": "host-local", "subnet": "198.18.0.0/24"}}
    ],
}


def plugin_binary() -> Path:
    """The plugin, as `cc -O2 -static` builds it (bootstrap does; a stale build is rebuilt)."""
    if not BUILT.exists() or BUILT.stat().st_mtime < SOURCE.stat().st_mtime:
        cc = shutil.which("cc")
        assert cc, "cc is missing: apt-get install gcc libc6-dev (scripts/bootstrap.sh does)"
        BUILT.parent.mkdir(exist_ok=True)
        subprocess.run([cc, "-O2", "-static", "-o", str(BUILT), str(SOURCE)], check=True)
    return BUILT


@dataclass
class Call:
    code: int
    stdout: str
    stderr: str

    @property
    def error(self) -> dict[str, Any]:
        assert self.code != 0, self.stdout
        error: dict[str, Any] = json.loads(self.stdout)
        return error


def call(
    binary: Path,
    command: str,
    *,
    namespace: str | None = "shop",
    name: str = "web",
    uid: str = "",
    netns: str = "",
    config: dict[str, Any] | None = None,
    stdin: str | None = None,
    container_id: str = "c0ffee" * 10,
    run_as: list[str] | None = None,
) -> Call:
    args = ["IgnoreUnknown=1", f"K8S_POD_NAME={name}", "K8S_POD_INFRA_CONTAINER_ID=" + container_id]
    if namespace is not None:
        args.append(f"K8S_POD_NAMESPACE={namespace}")
    if uid:
        args.append(f"K8S_POD_UID={uid}")
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": ";".join(args),
        "CNI_PATH": str(binary.parent),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    text = stdin if stdin is not None else json.dumps(config or {})
    result = subprocess.run(
        [*(run_as or []), str(binary)],
        check=False,
        input=text,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Call(result.returncode, result.stdout, result.stderr)


def runtime_config(entry: dict[str, Any], prev_result: dict[str, Any] | None = PREV_RESULT) -> dict[str, Any]:
    """What libcni hands the last plugin of a chain: the network's name and version, the
    plugin's own entry, and the chain's result so far."""
    config = {"cniVersion": "1.0.0", "name": PRIMARY["name"], **entry}
    if prev_result is not None:
        config["prevResult"] = prev_result
    return config


@dataclass
class CniNode:
    """An agent (no watches: pods come from the API on ADD, as before the watch delivers them)
    serving the plugin from a conf dir and bin dir of its own."""

    core: Any
    tmp: Path
    backend: str = "nftables"
    exempt: tuple[str, ...] = ("kube-system", "netisolate-system")
    agent: Agent = field(init=False)
    options: CniOptions = field(init=False)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        for sub in ("net.d", "bin", "run"):
            (self.tmp / sub).mkdir(exist_ok=True)
        (self.tmp / "net.d" / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
        self.options = CniOptions(
            self.tmp / "net.d", self.tmp / "bin", plugin_binary(), self.tmp / "run" / "cni.sock", self.exempt
        )
        # the agent's own client; None: no API server (pods only from the agent's cache)
        self.api = cast(Any, None if self.core is None else ours(self.core))
        self.agent = Agent(
            "node-a", select_backend(self.backend), Settings(), self.api, host_netns="/proc/self/ns/net"
        )
        self.agent.namespaces_known.set()
        self.server = start(self.options, self.agent.reconciler, self.api, self.stop).server

    @property
    def binary(self) -> Path:
        return self.options.bin_dir / conflist.PLUGIN_TYPE

    @property
    def entry(self) -> dict[str, Any]:
        chain = json.loads((self.options.conf_dir / "10-bridge.conflist").read_text())["plugins"]
        assert chain[-1]["type"] == conflist.PLUGIN_TYPE
        entry: dict[str, Any] = chain[-1]
        return entry

    def agent_down(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        os.unlink(self.options.socket)

    def agent_up(self) -> None:
        from netisolate.agent.cni import CniHandler
        from netisolate.agent.cni_server import CniServer

        self.server = CniServer(self.options.socket, CniHandler(self.agent.reconciler, self.api))
        self.server.start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        for tracked in list(self.agent.reconciler.pods.values()):
            if tracked.ns is not None:
                tracked.ns.close()
        self.agent.host.close()
