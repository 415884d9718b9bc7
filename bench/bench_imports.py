"""Start-path import cost of what the image runs: the agent's and the webhook's modules, each in a
fresh interpreter, next to baselines from the same run (the bare interpreter, and the libraries
they no longer import on the way to their first request: the kubernetes client, pyroute2).

    .venv/bin/python bench/bench_imports.py [--runs 15] [--before DIR]

--before DIR: also the agent's and the webhook's imports from another checkout (say
`git worktree add /tmp/before <commit>`), by PYTHONPATH, with this venv's libraries.

The variants run interleaved (one of each per round), so a machine whose load changes during the
run shifts them alike. Prints one JSON object per variant: median, p10, p90 and the extra over the
bare interpreter (medians), in milliseconds, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "baseline: python -c pass": "pass",
    "baseline: import kubernetes (what the agent and webhook imported before)": "import kubernetes",
    "baseline: import pyroute2": "import pyroute2",
    "agent: import netisolate.agent.node": "import netisolate.agent.node",
    "agent: netisolate agent's imports up to the first request": (
        "import netisolate.agent.node, netisolate.agent.cni, netisolate.kube, netisolate.commands.agent"
    ),
    "webhook: import netisolate.commands.webhook + server + tls": (
        "import netisolate.commands.webhook, netisolate.webhook.server, netisolate.webhook.tls"
    ),
}


def once(code: str, path: str | None = None) -> float:
    env = {**os.environ, **({"PYTHONPATH": path} if path else {})}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd="/")  # not this checkout
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--before", metavar="DIR", help="another checkout to compare with")
    args = parser.parse_args()
    variants = {name: (code, None) for name, code in VARIANTS.items()}
    if args.before:
        for name, code in VARIANTS.items():
            if not name.startswith("baseline"):
                variants[f"before ({args.before}): {name}"] = (code, args.before)
    for code, path in variants.values():
        once(code, path)  # bytecode caches written and files in the page cache: the warm case
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, (code, path) in variants.items():
            times[name].append(once(code, path))
    bare = statistics.median(times["baseline: python -c pass"])
    for name, samples in times.items():
        deciles = statistics.quantiles(samples, n=10)
        print(
            json.dumps(
                {
                    "variant": name,
                    "runs": len(samples),
                    "median_ms": round(statistics.median(samples) * 1000, 1),
                    "p10_ms": round(deciles[0] * 1000, 1),
                    "p90_ms": round(deciles[-1] * 1000, 1),
                    "over_bare_ms": round((statistics.median(samples) - bare) * 1000, 1),
                    "loadavg": os.getloadavg()[0],
                }
            )
        )


if __name__ == "__main__":
    main()
