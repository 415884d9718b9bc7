"""Start-path import cost of what the image runs: the agent's and the webhook's modules, each in a
fresh interpreter, next to baselines from the same run: the bare interpreter, the kubernetes
client (which they imported before netisolate/kubeclient.py; the agent also imported pyroute2
then, 0.25-0.3 s more, for a check that now reads /proc).

    .venv/bin/python bench/bench_imports.py [--runs 15] [--before DIR]

--before DIR: also the agent's and the webhook's imports from another commit's package, by
PYTHONPATH with this venv's libraries (`git archive <commit> netisolate | tar -x -C DIR`).

The variants run interleaved (one of each per round), so a machine whose load changes during the
run shifts them alike. Prints one JSON object per variant, in milliseconds: the CPU time (user +
system) median, p10, p90 and its extra over the bare interpreter's median, the wall-time median,
and the load average (on a busy machine wall time is mostly waiting for a core: compare CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the API client made as the commands make it (before this client: `api_clients`, which imported
# the kubernetes client only then), from a kubeconfig naming a server nothing is asked of
CLIENT = (
    "import netisolate.kube as kube, sys; "
    "(getattr(kube, 'api_client', None) or kube.api_clients)(sys.argv[1])"
)
VARIANTS = {
    "baseline: python -c pass": "pass",
    "baseline: import kubernetes (what the agent and webhook imported before)": "import kubernetes",
    "agent: its modules and its API client, up to the first request": (
        "import netisolate.commands.agent, netisolate.agent.node, netisolate.agent.cni; " + CLIENT
    ),
    "webhook: its modules and its API client, up to the first request": (
        "import netisolate.commands.webhook, netisolate.webhook.server, netisolate.webhook.tls; " + CLIENT
    ),
}
KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def once(code: str, path: str | None = None, kubeconfig: str = "") -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one fresh interpreter: CPU time is what a loaded
    machine changes least (wall time there is mostly waiting for a core)."""
    env = {**os.environ, **({"PYTHONPATH": path} if path else {})}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, kubeconfig], env=env, cwd="/")  # not this checkout
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{code!r} failed: exit {child.returncode}")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--before", metavar="DIR", help="another checkout to compare with")
    args = parser.parse_args()
    kubeconfig = str(Path(tempfile.mkdtemp(prefix="netisolate-bench-")) / "kubeconfig")
    Path(kubeconfig).write_text(KUBECONFIG)
    variants = {name: (code, None) for name, code in VARIANTS.items()}
    if args.before:
        for name, code in VARIANTS.items():
            if not name.startswith("baseline"):
                variants[f"before ({args.before}): {name}"] = (code, args.before)
    for code, path in variants.values():
        once(code, path, kubeconfig)  # bytecode caches written and files in the page cache: the warm case
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, (code, path) in variants.items():
            times[name].append(once(code, path, kubeconfig))
    bare = statistics.median(cpu for _, cpu in times["baseline: python -c pass"])
    for name, samples in times.items():
        cpu, wall = [c for _, c in samples], [w for w, _ in samples]
        deciles = statistics.quantiles(cpu, n=10)
        print(
            json.dumps(
                {
                    "variant": name,
                    "runs": len(samples),
                    "cpu_median_ms": round(statistics.median(cpu) * 1000, 1),
                    "cpu_p10_ms": round(deciles[0] * 1000, 1),
                    "cpu_p90_ms": round(deciles[-1] * 1000, 1),
                    "cpu_over_bare_ms": round((statistics.median(cpu) - bare) * 1000, 1),
                    "wall_median_ms": round(statistics.median(wall) * 1000, 1),
                    "loadavg": round(os.getloadavg()[0], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
