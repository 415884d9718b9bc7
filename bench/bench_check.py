"""`netisolate check` start-up and throughput, each next to the interpreter's own floor in the same run.
Prints one JSON object per scenario (wall and CPU times in ms: median, p10, p90 of --runs runs).

    .venv/bin/python bench/bench_check.py [--runs 15]

Scenarios: the floor (`python -c pass`, the same interpreter and site-packages); `check --help`;
`check -f` one small file; the top-level `--help`; `check -f DIR` over tests/corpus (documents per
second, recursive as kubeconform reads a directory); one 2,000-container pod (wall, peak memory).
Every command runs as the installed `netisolate` script does, with bytecode caching on (as after
`pip install`), after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"
ONE_FILE = ROOT / "examples" / "app-with-proxy.yaml"
CLI = "from netisolate.cli import main; raise SystemExit(main())"
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], runs: int) -> dict[str, Any]:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=False)
    walls, cpus = [], []
    for _ in range(runs):
        cpu, started = _children_cpu(), time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, check=False)
        walls.append(time.perf_counter() - started)
        cpus.append(_children_cpu() - cpu)
    return {"wall_ms": spread(walls), "cpu_ms": spread(cpus)}


def spread(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"median": round(statistics.median(ordered) * 1000, 1), "p10": at(0.1), "p90": at(0.9)}


def netisolate(*args: str) -> list[str]:
    return [sys.executable, "-c", CLI, *args]


def documents(path: Path) -> int:
    count = 0
    for file in sorted(path.rglob("*")):
        if file.suffix in (".yaml", ".yml", ".json"):
            docs = yaml.load_all(file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            count += sum(1 for doc in docs if doc is not None)
    return count


def big_pod(path: Path, containers: int) -> None:
    hardened = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    spec = {
        "securityContext": {"runAsUser": 1000},
        "containers": [
            {"name": f"c{i}", "image": "app:1", "securityContext": hardened} for i in range(containers)
        ],
    }
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big"}, "spec": spec}
    path.write_text(json.dumps(pod))


def peak_rss_mib(argv: list[str]) -> float:
    """Peak RSS of one run of argv, read from /usr/bin/time's report (RUSAGE_CHILDREN keeps a max
    over every child so far)."""
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *argv], capture_output=True, text=True, env=ENV, check=False
    )
    return round(int(out.stderr.strip().splitlines()[-1]) / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    runs = args.runs
    floor = timed([sys.executable, "-c", "pass"], runs)
    print(json.dumps({"scenario": "interpreter-floor", **floor}))
    targets = {"check --help": 150, "check -f FILE": 250, "--help": 150}
    for name, argv in (
        ("check --help", netisolate("check", "--help")),
        ("check -f FILE", netisolate("check", "-f", str(ONE_FILE))),
        ("--help", netisolate("--help")),
    ):
        result = timed(argv, runs)
        over = round(result["wall_ms"]["median"] - floor["wall_ms"]["median"], 1)
        print(
            json.dumps(
                {"scenario": name, **result, "over_floor_ms": over, "target_wall_ms": targets.get(name)}
            )
        )
    docs = documents(CORPUS)
    corpus = timed(netisolate("check", "-f", str(CORPUS)), max(3, runs // 5))
    rate = docs / (corpus["wall_ms"]["median"] / 1000)
    print(
        json.dumps(
            {
                "scenario": "check -f DIR (tests/corpus)",
                "documents": docs,
                **corpus,
                "documents_per_s": round(rate),
                "target_documents_per_s": 500,
            }
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.json"
        big_pod(path, 2000)
        argv = netisolate("check", "-f", str(path), "--namespace-labels", "netisolate.io/isolation=enforce")
        result = timed(argv, max(3, runs // 5))
        print(
            json.dumps(
                {
                    "scenario": "check one 2,000-container pod",
                    **result,
                    "peak_rss_mib": peak_rss_mib(argv),
                    "floor_rss_mib": peak_rss_mib([sys.executable, "-c", "pass"]),
                }
            )
        )


if __name__ == "__main__":
    main()
