"""Webhook benchmark: review latency over TLS at a fixed request rate, next to the in-process cost of
the same checks. Prints one JSON object per scenario.

    .venv/bin/python bench/bench_webhook.py [--rate 200] [--seconds 10]

The server runs in its own process (as a replica would), the client sends an open-loop stream of
AdmissionReviews for a 4-container pod to 127.0.0.1 and measures each answer.
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


async def load(url: str, ca: bytes, rate: float, seconds: float) -> list[float]:
    trust = ssl.create_default_context(cadata=ca.decode())
    trust.check_hostname = False
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust, limit=0)) as session:

        async def one() -> None:
            started = time.perf_counter()
            async with session.post(url, data=REVIEW) as r:
                await r.read()
                assert r.status == 200
            latencies.append(time.perf_counter() - started)

        for _ in range(20):  # warm the connection pool
            await one()
        latencies.clear()
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):  # open loop: send on schedule whatever the answers do
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def in_process(n: int = 2000) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        request = parse_review("/validate/pods", REVIEW)
        response(request, review_request(request, {"netisolate.io/isolation": "enforce"}, Config()))
        samples.append(time.perf_counter() - started)
    return {
        "scenario": "review-in-process",
        "containers": 4,
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
        server = multiprocessing.Process(target=serve, args=(cert_dir, args.port), daemon=True)
        server.start()
        try:
            time.sleep(1.5)
            latencies = asyncio.run(
                load(f"https://127.0.0.1:{args.port}/validate/pods", bundle.ca_pem, args.rate, args.seconds)
            )
        finally:
            server.terminate()
            server.join()
    print(
        json.dumps(
            {
                "scenario": "review-over-tls",
                "containers": 4,
                "rate_per_s": args.rate,
                "reviews": len(latencies),
                "p50_ms": pct(latencies, 0.5),
                "p99_ms": pct(latencies, 0.99),
                "mean_ms": round(statistics.mean(latencies) * 1000, 2),
            }
        )
    )
    print(json.dumps(in_process()))


if __name__ == "__main__":
    main()
