"""Webhook benchmark: review latency over TLS at a fixed request rate, next to the in-process cost of
the same checks; then the same stream while 2,000-container pods are judged back to back (the
uid-shared worst case, 250 KB each). Prints one JSON object per scenario.

    .venv/bin/python bench/bench_webhook.py [--rate 200] [--seconds 10]

The server runs in its own process (as a replica would, with its default review workers), the
client sends an open-loop stream of AdmissionReviews for a 4-container pod to 127.0.0.1 and
measures each answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import ssl
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from netisolate.admission import review_request
from netisolate.config import Config
from netisolate.webhook import tls
from netisolate.webhook.review import parse_review, response
from netisolate.webhook.server import build_app

HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
CONTAINERS = [
    {
        "name": "app",
        "image": "registry.example.com/app:1",
        "securityContext": {"runAsUser": 1000, **HARDENED},
    },
    {
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2:1.22.0",
        "securityContext": {"runAsUser": 1337, **HARDENED},
    },
    {
        "name": "daprd",
        "image": "ghcr.io/dapr/daprd:1.14.4",
        "securityContext": {"runAsUser": 1338, **HARDENED},
    },
    {
        "name": "log-shipper",
        "image": "registry.example.com/fluent-bit:3",
        "securityContext": {"runAsUser": 1339, **HARDENED},
    },
]
REVIEW = json.dumps(
    {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "bench",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "shop",
            "name": "web",
            "userInfo": {"username": "ci", "groups": ["developers"]},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "web",
                    "namespace": "shop",
                    "annotations": {
                        "netisolate.io/isolation": "enforce",
                        "allow.netisolate.io/app": "15001",
                        "allow.netisolate.io/istio-proxy": "8080",
                    },
                },
                "spec": {"containers": CONTAINERS},
            },
        },
    }
).encode()


def _big_review(containers: int) -> bytes:
    hardened = {"runAsUser": 1000, **HARDENED}
    review = json.loads(REVIEW)
    review["request"]["uid"] = "big"
    review["request"]["object"]["spec"] = {
        "containers": [
            {"name": f"c{i}", "image": "app:1", "securityContext": hardened} for i in range(containers)
        ]
    }
    return json.dumps(review).encode()


BIG = _big_review(2000)


async def _labels(namespace: str) -> Mapping[str, str]:
    return {"netisolate.io/isolation": "enforce"}


def serve(cert_dir: str, port: int) -> None:
    cert = tls.ReloadingCert(f"{cert_dir}/tls.crt", f"{cert_dir}/tls.key")
    web.run_app(
        build_app(Config(), _labels),
        host="127.0.0.1",
        port=port,
        ssl_context=cert.context,
        print=None,
        access_log=None,
    )


async def load(url: str, ca: bytes, rate: float, seconds: float, beside_big: bool) -> dict[str, list[float]]:
    """Latencies of the small reviews; with beside_big, also of big pods sent one after another
    for as long as the small stream runs."""
    trust = ssl.create_default_context(cadata=ca.decode())
    trust.check_hostname = False
    small: list[float] = []
    big: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust, limit=0)) as session:

        async def one(body: bytes, into: list[float]) -> None:
            started = time.perf_counter()
            async with session.post(url, data=body) as r:
                await r.read()
                assert r.status == 200
            into.append(time.perf_counter() - started)

        for _ in range(20):  # warm the connection pool
            await one(REVIEW, small)
        small.clear()
        done = asyncio.Event()

        async def big_pods() -> None:
            while not done.is_set():
                await one(BIG, big)

        pressure = asyncio.create_task(big_pods()) if beside_big else None
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):  # open loop: send on schedule whatever the answers do
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(REVIEW, small)))
        await asyncio.gather(*tasks)
        done.set()
        if pressure:
            await pressure
    return {"small": small, "big": big}


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def in_process(body: bytes, containers: int, n: int) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        request = parse_review("/validate/pods", body)
        response(request, review_request(request, {"netisolate.io/isolation": "enforce"}, Config()))
        samples.append(time.perf_counter() - started)
    return {
        "scenario": "review-in-process",
        "containers": containers,
        "reviews": n,
        "p50_ms": pct(samples, 0.5),
        "p99_ms": pct(samples, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=18443)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cert_dir:
        bundle = tls.generate("netisolate-webhook", "netisolate-system")
        tls.write_files(bundle, Path(cert_dir))
        server = multiprocessing.Process(target=serve, args=(cert_dir, args.port))  # (has workers)
        server.start()
        url = f"https://127.0.0.1:{args.port}/validate/pods"
        try:
            time.sleep(3)  # the server and its review workers
            runs = {
                beside: asyncio.run(load(url, bundle.ca_pem, args.rate, args.seconds, beside))
                for beside in (False, True)
            }
        finally:
            server.terminate()
            server.join()
    for beside, latencies in runs.items():
        small = latencies["small"]
        result: dict[str, Any] = {
            "scenario": "review-over-tls" + (", beside 2,000-container pods" if beside else ""),
            "containers": 4,
            "rate_per_s": args.rate,
            "reviews": len(small),
            "p50_ms": pct(small, 0.5),
            "p99_ms": pct(small, 0.99),
            "mean_ms": round(statistics.mean(small) * 1000, 2),
        }
        if beside:
            big = latencies["big"]
            result["big_pods_judged"] = len(big)
            result["big_pod_p50_ms"] = pct(big, 0.5)
        print(json.dumps(result))
    print(json.dumps(in_process(REVIEW, 4, 2000)))
    print(json.dumps(in_process(BIG, 2000, 20)))


if __name__ == "__main__":
    main()
