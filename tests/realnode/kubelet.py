"""A kubelet stand-in: runs the pods the API stand-in (kmock) holds for this node on the real node's
containerd, through CRI, as the kubelet does — and writes their status back.

For each pod: RunPodSandbox (metadata name/namespace/uid, `cgroup_parent /kubepods/<qos>/pod<uid>`,
the pod's annotations, RuntimeDefault seccomp), then CreateContainer + StartContainer for each
container with its `runAsUser`/`runAsGroup`, `no_new_privs` (allowPrivilegeEscalation: false),
capabilities, RuntimeDefault seccomp; then the status: podIP(s), containerStatuses with
`containerd://<id>` and restartCount. It can restart a container (a new container ID, attempt+1),
recreate a sandbox (a new network namespace, attempt+1) and delete a pod.

Also as the kubelet does: `hostPID` (the sandbox's and each container's PID namespace is the
node's), `readOnlyRootFilesystem`, `env` (values and the fieldRefs spec.nodeName,
metadata.namespace, metadata.name) and the volumes hostPath (its `...OrCreate` types; the node's
CNI directories are the fixture's, see `host_paths`), emptyDir and configMap (read from the API).
What a cluster adds to every pod to reach its API server (a service account) is `api_env` +
`api_mounts`, set by the test.

Not modelled: init containers, probes, other volume types, image pulls (there is no registry: an
image the node has not imported runs as the local toolbox image), resource limits beyond the QoS
class.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.realnode import cri_pb2 as pb
from tests.realnode import images
from tests.realnode.cri import ExecResult
from tests.realnode.node import BRIDGE, NodeError, RealNode

Manifest = dict[str, Any]
RUNTIME_DEFAULT = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)


@dataclass
class RunningPod:
    manifest: Manifest
    sandbox_id: str = ""
    sandbox: pb.PodSandboxConfig = field(default_factory=pb.PodSandboxConfig)
    containers: dict[str, str] = field(default_factory=dict)  # name -> container ID
    restarts: dict[str, int] = field(default_factory=dict)
    ips: list[str] = field(default_factory=list)
    pid: int = 0  # the sandbox's (pause) process
    sandbox_called: float = 0.0  # time.time() of the last RunPodSandbox call, and of its return
    sandbox_ready: float = 0.0

    @property
    def uid(self) -> str:
        return str(self.manifest["metadata"]["uid"])

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.manifest["metadata"].get("namespace") or "default")


def qos_class(spec: Manifest) -> str:
    resources = [c.get("resources") or {} for c in spec.get("containers", [])]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "besteffort"
    guaranteed = all(
        (r.get("limits") or {}).get(k)
        and (r.get("requests") or r.get("limits") or {}).get(k) == r["limits"][k]
        for r in resources
        for k in ("cpu", "memory")
    )
    return "guaranteed" if guaranteed else "burstable"


def cgroup_parent(manifest: Manifest) -> str:
    qos = qos_class(manifest["spec"])
    pod = f"pod{manifest['metadata']['uid']}"
    return f"/kubepods/{pod}" if qos == "guaranteed" else f"/kubepods/{qos}/{pod}"


def _user(context: Manifest, pod_context: Manifest, key: str) -> pb.Int64Value | None:
    value = context.get(key, pod_context.get(key))
    return None if value is None else pb.Int64Value(value=int(value))


class Kubelet:
    def __init__(self, node: RealNode, core: Any, node_name: str) -> None:
        assert node.cri is not None, "start the node first"
        self.node, self.cri, self.core, self.node_name = node, node.cri, core, node_name
        self.pods: dict[str, RunningPod] = {}
        # the node's paths this fixture keeps in its own directory
        self.host_paths = {"/etc/cni/net.d": node.cni_conf, "/opt/cni/bin": node.cni_bin}
        self.api_env: dict[str, str] = {}
        self.api_mounts: list[pb.Mount] = []
        self._created: list[Path] = []  # hostPaths made for `...OrCreate`: removed at close

    # --- the sync loop's one round -----------------------------------------------------------------

    def sync(self) -> list[RunningPod]:
        """Run this node's pods the API holds and we do not run yet; stop those it no longer holds."""
        listed = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node_name}", _preload_content=False
        )
        wanted = {
            p["metadata"]["uid"]: p
            for p in json.loads(listed.data)["items"]
            if p["spec"].get("nodeName") == self.node_name  # the stand-in ignores field selectors
        }
        for uid in set(self.pods) - set(wanted):
            self._stop(self.pods.pop(uid))
        return [self.run(m) for uid, m in wanted.items() if uid not in self.pods]

    # --- pods --------------------------------------------------------------------------------------

    def run(self, manifest: Manifest) -> RunningPod:
        pod = RunningPod(manifest)
        self.node.pod_uids.add(pod.uid)  # teardown removes its cgroups whatever happens
        self.pods[pod.uid] = pod
        self._start_sandbox(pod, attempt=0)
        for container in manifest["spec"]["containers"]:
            pod.restarts[container["name"]] = 0
            pod.containers[container["name"]] = self._start_container(pod, container, attempt=0)
        self.report(pod)
        return pod

    def _start_sandbox(self, pod: RunningPod, attempt: int) -> None:
        meta, spec = pod.manifest["metadata"], pod.manifest["spec"]
        host_network = bool(spec.get("hostNetwork"))
        labels = {
            "io.kubernetes.pod.name": pod.name,
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid,
        }
        pod.sandbox = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name=pod.name, namespace=pod.namespace, uid=pod.uid, attempt=attempt
            ),
            hostname=pod.name,
            log_directory=str(self.node.dir / "pods" / f"{pod.namespace}_{pod.name}_{pod.uid}"),
            labels={**labels, **(meta.get("labels") or {})},
            annotations=dict(meta.get("annotations") or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent(pod.manifest),
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(
                        network=pb.NODE if host_network else pb.POD,
                        pid=pb.NODE if spec.get("hostPID") else pb.CONTAINER,
                        ipc=pb.POD,
                    ),
                    seccomp=RUNTIME_DEFAULT,
                ),
            ),
        )
        pod.sandbox_called = time.time()  # the wall clock, which other processes' logs share
        pod.sandbox_id = self.cri.run_sandbox(pod.sandbox)
        pod.sandbox_ready = time.time()
        status, info = self.cri.sandbox_status(pod.sandbox_id)
        pod.ips = (
            [status.network.ip, *(ip.ip for ip in status.network.additional_ips)] if status.network.ip else []
        )
        pod.pid = int(json.loads(info["info"])["pid"])
        if not host_network:
            self._wait_addresses(pod)

    def _wait_addresses(self, pod: RunningPod, timeout: float = 10.0) -> None:
        """IPv6 duplicate address detection: until it ends, the pod's (and the bridge's) new
        addresses are `tentative` and unusable, so the first IPv6 probe would fail for no reason."""
        deadline = time.monotonic() + timeout
        checks = (
            ["nsenter", "-t", str(pod.pid), "-n", "ip", "-6", "-o", "addr", "show", "tentative"],
            ["ip", "-6", "-o", "addr", "show", "dev", BRIDGE, "tentative"],
        )
        while any(
            subprocess.run(c, capture_output=True, text=True, check=False).stdout.strip() for c in checks
        ):
            if time.monotonic() > deadline:
                raise NodeError(
                    f"pod {pod.namespace}/{pod.name}: IPv6 addresses still tentative after {timeout} s"
                )
            time.sleep(0.05)

    def _image(self, ref: str) -> str:
        return ref if ref in self.node.images else images.TOOLBOX

    def _start_container(self, pod: RunningPod, container: Manifest, attempt: int) -> str:
        context = container.get("securityContext") or {}
        pod_context = pod.manifest["spec"].get("securityContext") or {}
        caps = context.get("capabilities") or {}
        name = container["name"]
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=self._image(container.get("image", ""))),
            command=container.get("command") or [],
            args=container.get("args") or [],
            envs=[pb.KeyValue(key=k, value=v) for k, v in self._env(pod, container).items()],
            mounts=[*self._mounts(pod, container), *self.api_mounts],
            labels={
                "io.kubernetes.container.name": name,
                "io.kubernetes.pod.name": pod.name,
                "io.kubernetes.pod.namespace": pod.namespace,
                "io.kubernetes.pod.uid": pod.uid,
            },
            annotations={"io.kubernetes.container.restartCount": str(pod.restarts.get(name, 0))},
            log_path=f"{name}/{attempt}.log",
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    capabilities=pb.Capability(
                        add_capabilities=caps.get("add") or [], drop_capabilities=caps.get("drop") or []
                    ),
                    privileged=bool(context.get("privileged")),
                    run_as_user=_user(context, pod_context, "runAsUser"),
                    run_as_group=_user(context, pod_context, "runAsGroup"),
                    no_new_privs=context.get("allowPrivilegeEscalation") is False,
                    readonly_rootfs=bool(context.get("readOnlyRootFilesystem")),
                    namespace_options=pb.NamespaceOption(
                        pid=pb.NODE if pod.manifest["spec"].get("hostPID") else pb.CONTAINER
                    ),
                    seccomp=RUNTIME_DEFAULT,
                )
            ),
        )
        container_id = self.cri.create_container(pod.sandbox_id, config, pod.sandbox)
        self.cri.start_container(container_id)
        return container_id

    def _env(self, pod: RunningPod, container: Manifest) -> dict[str, str]:
        fields = {
            "spec.nodeName": self.node_name,
            "metadata.namespace": pod.namespace,
            "metadata.name": pod.name,
        }
        env = dict(self.api_env)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            path = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
            if path not in fields:
                raise NodeError(
                    f"container {container['name']}: env {var['name']} from {var} is not modelled"
                )
            env[var["name"]] = fields[path]
        return env

    def _mounts(self, pod: RunningPod, container: Manifest) -> list[pb.Mount]:
        volumes = {v["name"]: v for v in pod.manifest["spec"].get("volumes") or []}
        return [
            pb.Mount(
                container_path=m["mountPath"],
                host_path=str(self._volume(pod, volumes[m["name"]])),
                readonly=bool(m.get("readOnly")),
            )
            for m in container.get("volumeMounts") or []
        ]

    def _volume(self, pod: RunningPod, volume: Manifest) -> Path:
        """Where the volume is on this node, made as the kubelet makes it."""
        if "hostPath" in volume:
            spec = volume["hostPath"]
            path = Path(self.host_paths.get(spec["path"], spec["path"]))
            if not path.exists() and spec.get("type") in ("FileOrCreate", "DirectoryOrCreate"):
                if spec["type"] == "FileOrCreate":
                    path.touch()
                else:
                    path.mkdir(parents=True)
                self._created.append(path)
            return path
        path = self.node.dir / "pods" / pod.uid / "volumes" / str(volume["name"])
        path.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            path.chmod(0o777)  # as the kubelet makes it: any UID in the pod may write
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            for key, text in (self.core.read_namespaced_config_map(name, pod.namespace).data or {}).items():
                (path / key).write_text(text)
        else:
            raise NodeError(f"pod {pod.name}: volume {volume['name']} of this type is not modelled")
        return path

    def _spec(self, pod: RunningPod, name: str) -> Manifest:
        return next(c for c in pod.manifest["spec"]["containers"] if c["name"] == name)

    def restart_container(self, pod: RunningPod, name: str) -> str:
        """The container exits and the kubelet starts it again: a new container, a new ID."""
        old = pod.containers[name]
        self.cri.stop_container(old)
        pod.restarts[name] += 1
        pod.containers[name] = self._start_container(pod, self._spec(pod, name), pod.restarts[name])
        self.cri.remove_container(old)
        self.report(pod)
        return pod.containers[name]

    def recreate_sandbox(self, pod: RunningPod) -> None:
        """The sandbox died (or its network changed): a new sandbox, a new network namespace, the
        containers started anew in it."""
        old = pod.sandbox_id
        attempt = pod.sandbox.metadata.attempt + 1
        self.cri.stop_sandbox(old)
        self.cri.remove_sandbox(old)
        self._start_sandbox(pod, attempt)
        for name in pod.containers:
            pod.restarts[name] += 1
            pod.containers[name] = self._start_container(pod, self._spec(pod, name), pod.restarts[name])
        self.report(pod)

    def delete(self, pod: RunningPod) -> None:
        """The pod is deleted in the API and its sandbox goes."""
        self.core.delete_namespaced_pod(pod.name, pod.namespace)
        self._stop(self.pods.pop(pod.uid))

    def _stop(self, pod: RunningPod) -> None:
        self.cri.stop_sandbox(pod.sandbox_id)
        self.cri.remove_sandbox(pod.sandbox_id)

    def close(self) -> None:
        for pod in list(self.pods.values()):
            self._stop(pod)
        self.pods.clear()
        for path in reversed(self._created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self._created.clear()

    # --- status, exec ------------------------------------------------------------------------------

    def report(self, pod: RunningPod) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        statuses = [
            {
                "name": name,
                "containerID": f"containerd://{cid}",
                "restartCount": pod.restarts[name],
                "ready": True,
                "started": True,
                "image": self._spec(pod, name).get("image", ""),
                "imageID": self.cri.container_status(cid)[0].image_ref,
                "state": {"running": {"startedAt": now}},
            }
            for name, cid in pod.containers.items()
        ]
        status = {
            "phase": "Running",
            "podIP": pod.ips[0] if pod.ips else None,
            "podIPs": [{"ip": ip} for ip in pod.ips],
            "containerStatuses": statuses,
            "startTime": now,
        }
        self.core.patch_namespaced_pod_status(
            pod.name, pod.namespace, {"status": status}, _preload_content=False
        )

    def exec(self, pod: RunningPod, container: str, cmd: list[str], timeout: int = 10) -> ExecResult:
        return self.cri.exec_sync(pod.containers[container], cmd, timeout)
