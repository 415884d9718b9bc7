"""The webhook's HTTPS server (aiohttp). kopf's admission server is not used: it answers handler
exceptions with HTTP 500, derives its paths from handler ids, and manages its own configuration and
certificates — we need our fixed paths, 4xx for malformed bodies, and certificates that rotate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from netisolate.config import Config
from netisolate.kube import Namespaces, resource_path
from netisolate.webhook.review import MAX_BODY, PATHS
from netisolate.webhook.workers import LabelLookup, Limits, NamespaceUnavailableError, ReviewPool

__all__ = ["LabelLookup", "Limits", "NamespaceLabels", "NamespaceUnavailableError", "build_app"]
log = logging.getLogger(__name__)
REVIEWS = Counter("netisolate_webhook_reviews_total", "Admission reviews answered", ["path", "result"])
LATENCY = Histogram(
    "netisolate_webhook_review_seconds",
    "Time to answer a review",
    ["path"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 2.5),
)


class NamespaceLabels:
    """Namespace labels from the API server, cached briefly (labels change rarely; a review must be
    fast). A namespace just switched to isolation is judged by its new label within `ttl` seconds;
    a pod admitted in that window is reported by `netisolate audit` (pod-violates-admission)."""

    def __init__(self, core: Namespaces, ttl: float = 5.0) -> None:
        self._core, self._ttl = core, ttl
        self._cache: dict[str, tuple[float, Mapping[str, str]]] = {}

    async def __call__(self, namespace: str) -> Mapping[str, str]:
        hit = self._cache.get(namespace)
        if hit and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        try:
            ns = await asyncio.to_thread(self._core.get, resource_path("v1", "namespaces", name=namespace))
        except Exception as err:  # API error, timeout, refused connection alike: the floor is unknown, deny
            raise NamespaceUnavailableError(
                f"cannot read namespace {namespace} for its isolation label: {err}"
            ) from None
        labels = {str(k): str(v) for k, v in ((ns.get("metadata") or {}).get("labels") or {}).items()}
        self._cache[namespace] = (time.monotonic(), labels)
        return labels


def build_app(config: Config, labels: LabelLookup, limits: Limits | None = None) -> web.Application:
    """The server; reviews are judged by a pool of worker processes started with the app."""
    pool = ReviewPool(config, limits or Limits())

    async def review(request: web.Request) -> web.Response:
        started = time.perf_counter()
        status, answer, result = await pool.review(request.path, await request.read(), labels)
        REVIEWS.labels(request.path, result).inc()
        if status == 200:
            LATENCY.labels(request.path).observe(time.perf_counter() - started)
        return web.json_response(answer, status=status)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def workers(app: web.Application) -> AsyncIterator[None]:
        await pool.start()
        yield
        await pool.close()

    app = web.Application(client_max_size=MAX_BODY, middlewares=[_never_500])
    app.add_routes([web.post(path, review) for path in PATHS])
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics)])
    app.cleanup_ctx.append(workers)
    return app


@web.middleware
async def _never_500(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": f"request body exceeds {MAX_BODY} bytes"}, status=413)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        served = ", ".join(f"POST {path}" for path in PATHS)
        return web.json_response(
            {"error": f"{err.reason} {request.method} {request.path}; served: {served}"}, status=err.status
        )
    except Exception:  # whatever aiohttp raised on a request it could not take: a 400, never a 500
        log.exception("unexpected error", extra={"path": request.path})
        return web.json_response({"error": "malformed request"}, status=400)
