"""Audit start-to-verdict time: `netisolate audit` as a user runs it, against a cluster of 2,000 pods
and 200 mutating webhooks served over HTTP on 127.0.0.1, next to baselines from the same run (the
bare interpreter, the import of the kubernetes client, the audit's own pure work in-process).

    .venv/bin/python bench/bench_audit.py [--runs 7] [--pods 2000] [--webhooks 200]

Prints one JSON object per scenario (median, min and max seconds over the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.json_server import serve_json

HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsUser": 1000}


def cluster(pods: int, webhooks: int) -> dict[str, list[dict[str, Any]]]:
    """A plausible cluster: 50 namespaces (every fifth isolated), pods with an app and a proxy
    sidecar, webhooks shaped like the namespace-scoped and object-scoped injectors."""
    namespaces = [
        {
            "metadata": {
                "name": f"ns-{i}",
                "labels": {"kubernetes.io/metadata.name": f"ns-{i}"}
                | ({"netisolate.io/isolation": "enforce"} if i % 5 == 0 else {}),
            }
        }
        for i in range(50)
    ]
    pod_items = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"pod-{i}", "namespace": f"ns-{i % 50}", "labels": {"app": f"a{i % 7}"}},
            "spec": {
                "containers": [
                    {"name": "app", "image": "registry.example.com/app:1", "securityContext": HARDENED},
                    {
                        "name": "istio-proxy",
                        "image": "docker.io/istio/proxyv2:1.24.0",
                        "securityContext": {**HARDENED, "runAsUser": 1337},
                    },
                ]
            },
        }
        for i in range(pods)
    ]
    hooks = [
        {
            "metadata": {"name": f"injector-{i}"},
            "webhooks": [
                {
                    "name": f"inject-{i}.example.com",
                    "clientConfig": {"service": {"name": "s", "namespace": "x"}, "caBundle": "Q0EK"},
                    "failurePolicy": "Fail",
                    "namespaceSelector": {"matchLabels": {f"inject-{i}": "enabled"}},
                    "objectSelector": {
                        "matchExpressions": [{"key": "inject", "operator": "NotIn", "values": ["false"]}]
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ],
                }
            ],
        }
        for i in range(webhooks)
    ]
    return {"namespaces": namespaces, "pods": pod_items, "webhooks": hooks}


def serve(objects: dict[str, list[dict[str, Any]]]) -> ThreadingHTTPServer:
    """The three lists the audit reads, as the API server answers them (one page each)."""
    bodies = {
        "/api/v1/namespaces": objects["namespaces"],
        "/api/v1/pods": objects["pods"],
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations": objects["webhooks"],
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations": [],
    }
    encoded = {
        path: json.dumps({"kind": "List", "metadata": {}, "items": items}).encode()
        for path, items in bodies.items()
    }

    return serve_json(lambda request: encoded.get(request.path.split("?")[0]))


def kubeconfig(directory: Path, port: int) -> Path:
    path = directory / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bench", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "bench", "user": {"token": "bench-token"}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
        "current-context": "bench",
    }
    path.write_text(json.dumps(config))
    return path


def timed(runs: int, action: Callable[[], None]) -> dict[str, float]:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return {
        "median_s": round(statistics.median(seconds), 3),
        "min_s": round(min(seconds), 3),
        "max_s": round(max(seconds), 3),
    }


def run_python(*args: str, cold: bool = False) -> Callable[[], None]:
    """cold: no bytecode cache (a fresh pycache prefix per run), as the first run after an install
    or in a new container pays it."""

    def action() -> None:
        env = dict(os.environ)
        if cold:
            env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="netisolate-bench-pycache-")
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False, env=env)
        if cold:
            shutil.rmtree(env["PYTHONPYCACHEPREFIX"])
        if done.returncode not in (0, 1):
            raise SystemExit(f"{' '.join(args)} exited {done.returncode}: {done.stderr}")

    return action


def judge(objects: dict[str, list[dict[str, Any]]]) -> Callable[[], None]:
    from netisolate.audit import audit
    from netisolate.config import Config

    def action() -> None:
        audit(objects["webhooks"], objects["namespaces"], objects["pods"], Config())

    return action


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--webhooks", type=int, default=200)
    args = parser.parse_args()
    objects = cluster(args.pods, args.webhooks)
    server = serve(objects)
    with tempfile.TemporaryDirectory(prefix="netisolate-bench-audit-") as tmp:
        config = str(kubeconfig(Path(tmp), server.server_address[1]))
        audit = ["-m", "netisolate", "audit", "--kubeconfig", config, "-o", "json"]
        scenarios = {
            "netisolate audit, end to end": run_python(*audit),
            "netisolate audit, end to end, no bytecode cache": run_python(*audit, cold=True),
            "baseline: python -c pass": run_python("-c", "pass"),
            "baseline: import kubernetes.client": run_python("-c", "import kubernetes.client"),
            "baseline: import kubernetes.client, no bytecode cache": run_python(
                "-c", "import kubernetes.client", cold=True
            ),
        }
        for name, action in scenarios.items():
            print(
                json.dumps(
                    {
                        "scenario": name,
                        "pods": args.pods,
                        "webhooks": args.webhooks,
                        **timed(args.runs, action),
                    }
                )
            )
        in_process = {"scenario": "audit's own work, in-process (no start-up, no HTTP)", "pods": args.pods}
        print(json.dumps({**in_process, "webhooks": args.webhooks, **timed(args.runs, judge(objects))}))
    server.shutdown()


if __name__ == "__main__":
    main()
