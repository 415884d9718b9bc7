"""A CRI client (runtime.v1 RuntimeService) over containerd's gRPC socket: the few calls a kubelet
makes, typed. The messages come from cri.proto, compiled at set-up (scripts/bootstrap.sh)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from tests.realnode import cri_pb2 as pb
from tests.realnode import cri_pb2_grpc as pb_grpc

SandboxConfig = pb.PodSandboxConfig
ContainerConfig = pb.ContainerConfig


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


class RuntimeClient:
    def __init__(self, socket: str, timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{os.path.abspath(socket)}")
        self.stub = pb_grpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return getattr(self.stub, method)(request, timeout=timeout or self.timeout)

    def version(self) -> str:
        reply = self._call("Version", pb.VersionRequest(version="v1"), timeout=2)
        return f"{reply.runtime_name} {reply.runtime_version} (CRI {reply.runtime_api_version})"

    def run_sandbox(self, config: pb.PodSandboxConfig) -> str:
        return str(self._call("RunPodSandbox", pb.RunPodSandboxRequest(config=config)).pod_sandbox_id)

    def stop_sandbox(self, sandbox_id: str) -> None:
        self._call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))

    def remove_sandbox(self, sandbox_id: str) -> None:
        self._call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    def sandbox_status(self, sandbox_id: str) -> tuple[pb.PodSandboxStatus, dict[str, str]]:
        reply = self._call(
            "PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True)
        )
        return reply.status, dict(reply.info)

    def sandboxes(self) -> list[pb.PodSandbox]:
        return list(self._call("ListPodSandbox", pb.ListPodSandboxRequest()).items)

    def create_container(
        self, sandbox_id: str, config: pb.ContainerConfig, sandbox: pb.PodSandboxConfig
    ) -> str:
        request = pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox)
        return str(self._call("CreateContainer", request).container_id)

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", pb.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self._call("StopContainer", pb.StopContainerRequest(container_id=container_id, timeout=timeout))

    def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer", pb.RemoveContainerRequest(container_id=container_id))

    def containers(self, sandbox_id: str = "") -> list[pb.Container]:
        request = pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id))
        return list(self._call("ListContainers", request).containers)

    def container_status(self, container_id: str) -> tuple[pb.ContainerStatus, dict[str, str]]:
        reply = self._call(
            "ContainerStatus", pb.ContainerStatusRequest(container_id=container_id, verbose=True)
        )
        return reply.status, dict(reply.info)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 10) -> ExecResult:
        """Runs cmd inside the container (its namespaces, its user, its seccomp profile)."""
        request = pb.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        reply = self._call("ExecSync", request, timeout=timeout + 10)
        return ExecResult(
            reply.exit_code, reply.stdout.decode(errors="replace"), reply.stderr.decode(errors="replace")
        )

    def cni_config(self) -> str:
        """The CNI configuration containerd has loaded (verbose Status), as JSON text."""
        return str(dict(self._call("Status", pb.StatusRequest(verbose=True)).info).get("cniconfig", ""))

    def close(self) -> None:
        self.channel.close()
