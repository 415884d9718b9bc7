"""The agent as a process, the way a DaemonSet runs it: `netisolate agent` with a kubeconfig for
the Kubernetes API stand-in, `--host-netns /proc/self/ns/net` (PID 1's namespace cannot be opened
on this machine), its endpoints on a free loopback port. It can be killed (SIGKILL, a crash) and
started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class AgentProcessError(RuntimeError):
    pass


def kubeconfig(server: str, directory: Path, user: dict[str, str] | None = None) -> Path:
    """A kubeconfig for the API stand-in at `server`, its user's credentials `user` (none: the
    stand-in asks for none)."""
    path = directory / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": server.rstrip("/")}}],
        "users": [{"name": "agent", "user": user or {}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "agent"}}],
        "current-context": "standin",
    }
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    def __init__(
        self, server: str, node: str, backend: str, *extra: str, verify_interval: float = 1.0
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ni-agent-"))
        self.port = free_port()
        self.argv = [
            sys.executable,
            "-m",
            "netisolate",
            "agent",
            "--node-name",
            node,
            "--kubeconfig",
            str(kubeconfig(server, self.dir)),
            "--backend",
            backend,
            "--metrics-port",
            str(self.port),
            "--host-netns",
            "/proc/self/ns/net",
            "--verify-interval",
            str(verify_interval),
            *extra,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.logs: list[Path] = []

    def start(self) -> AgentProcess:
        log = self.dir / f"agent-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def status(self) -> dict[str, Any]:
        """/status, or {} while the agent does not answer yet."""
        self.check_alive()
        try:
            code, body = self.get("/status")
        except (urllib.error.URLError, OSError):
            return {}
        return json.loads(body) if code == 200 else {}

    def pods(self) -> dict[str, dict[str, str]]:
        """{pod UID: its /status row}."""
        return {row["uid"]: row for row in self.status().get("pods", [])}

    def metric(self, name: str, labels: str = "") -> float:
        """A sample's value from /metrics (0 when absent), e.g. metric("netisolate_apply_seconds_count")."""
        _, body = self.get("/metrics")
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in body.splitlines():
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    def wait(self, condition: Any, timeout: float = 20.0, what: str = "condition") -> float:
        """Polls condition() every 10 ms; returns the seconds it took."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                raise AgentProcessError(f"timed out waiting for {what}; agent log:\n{self.log_tail()}")
            time.sleep(0.01)
        return time.monotonic() - start

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AgentProcessError(f"the agent exited with {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs[-1].read_text(errors="replace").splitlines()[-lines:]) if self.logs else ""

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self.stop()
        for log in self.logs:
            log.unlink(missing_ok=True)
        (self.dir / "kubeconfig").unlink(missing_ok=True)
        self.dir.rmdir()
