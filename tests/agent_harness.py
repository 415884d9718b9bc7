"""A simulated node for the agent: pods laid out as the kubelet and containerd lay them out — a
network namespace per pod (netisolate.localpod), cgroups named after the pod UID with the
container processes moved into them, running under the containers' UIDs — and pod objects served
by the Kubernetes API stand-in (tests/kube_standin.py).

Cgroups are created under a unique pod UID and removed again, like the namespaces.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from netisolate.localpod import LocalPod, as_uid
from netisolate.model import parse_pod

HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
V2_ROOT = Path("/sys/fs/cgroup/unified")
V1_ROOT = Path("/sys/fs/cgroup/pids")


def pod_manifest(
    name: str, node: str, annotations: dict[str, str] | None = None, uid: str | None = None
) -> dict[str, Any]:
    containers = [
        {"name": n, "image": "busybox", "securityContext": {"runAsUser": u, **HARDENED}}
        for n, u in (("app", 1000), ("proxy", 1001), ("rogue", 1002))
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": uid or str(uuid.uuid4()),
            "annotations": {
                "netisolate.io/isolation": "enforce",
                "allow.netisolate.io/app": "15001",
                "allow.netisolate.io/proxy": "8080",
                **(annotations or {}),
            },
        },
        "spec": {"nodeName": node, "containers": containers},
        "status": {"phase": "Running", "podIP": "192.0.2.10", "podIPs": [{"ip": "192.0.2.10"}]},
    }


class SimulatedPod:
    """Sandbox + containers of one pod on this machine (systemd driver, cgroup v2, or cgroupfs v1)."""

    def __init__(
        self, manifest: dict[str, Any], layout: str = "systemd", user_namespace: bool = False
    ) -> None:
        self.manifest = manifest
        uid = manifest["metadata"]["uid"]
        self.scope: Callable[[str], Path]  # a container's cgroup directory, by container ID
        if layout == "systemd":
            slice_ = f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
            self.pod_dir = V2_ROOT / "kubepods.slice" / "kubepods-besteffort.slice" / slice_
            self.scope = lambda cid: self.pod_dir / f"cri-containerd-{cid}.scope"
        else:
            self.pod_dir = V1_ROOT / "kubepods" / "besteffort" / f"pod{uid}"
            self.scope = lambda cid: self.pod_dir / cid
        # every process of a container starts in its cgroup, as the runtime starts them
        self.local = LocalPod(
            parse_pod(manifest), user_namespace=user_namespace, container_cgroup=self.cgroup
        )

    @staticmethod
    def container_id(name: str) -> str:
        """The runtime ID of the pod's container `name` (64 hex digits, as containerd's)."""
        return uuid.uuid5(uuid.NAMESPACE_OID, name).hex + uuid.uuid5(uuid.NAMESPACE_URL, name).hex

    def cgroup(self, name: str) -> Path:
        """Container `name`'s cgroup directory, made when first asked for."""
        scope = self.scope(self.container_id(name))
        scope.mkdir(parents=True, exist_ok=True)
        return scope

    def start_sandbox(self) -> None:
        self.local.create()
        self._run_in_cgroup("sandbox", ["sleep", "infinity"])

    def start_container(self, name: str, ports: list[str]) -> None:
        self.local.listen(name, ports)

    def run_as(self, container: str, argv: list[str]) -> Any:
        uid = self.local.node_uid(self.local.uid(container))
        return self.local.spawn(as_uid(uid, argv), container=container)

    def _run_in_cgroup(self, cid: str, argv: list[str]) -> None:
        self.local.spawn(argv, container=cid)

    def close(self) -> None:
        self.local.close()
        deadline = time.monotonic() + 5
        for directory in [*sorted(self.pod_dir.rglob("*"), key=lambda p: -len(p.parts)), self.pod_dir]:
            while directory.is_dir():
                try:
                    os.rmdir(directory)
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        for parent in self.pod_dir.parents:  # kubepods.slice & co., once no other pod uses them
            if parent in (V1_ROOT, V2_ROOT):
                break
            try:
                os.rmdir(parent)
            except OSError:
                break


def close_all(pods: Iterable[SimulatedPod | LocalPod]) -> None:
    """Close every pod even when one fails (namespaces and cgroups of the others must not leak);
    the first failure is raised after."""
    errors = []
    for pod in pods:
        try:
            pod.close()
        except Exception as err:  # any failure: the other pods are still closed
            errors.append(err)
    if errors:
        raise errors[0]
