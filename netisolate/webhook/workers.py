"""Reviews in worker processes: never on the event loop, each bounded in time and memory.

A review is pure CPU (JSON, pydantic, the rules) and pydantic holds the GIL while it validates, so
a thread would still stall the loop, `/healthz` and every other review while one large pod is
judged. Each worker is a process of its own that takes one review at a time over a pipe:

    server → worker   ("review", path, body)
    worker → server   ("parsed", uid, namespace | None)  | ("bad", status, message)
    server → worker   ("labels", {labels} | "reason")      (None: a Namespace, no labels needed;
                                                           a reason: they cannot be read, deny)
    worker → server   ("answer", AdmissionReview, result)

A worker that does not answer within the time limit is killed and replaced, and the review is
denied with the reason (fail closed, before the API server's own timeout). Each worker's address
space is capped at its start-up size plus a budget: a review that needs more fails inside the
worker, which answers with a denial (or dies, and is replaced), never the server.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from netisolate.config import Config

log = logging.getLogger(__name__)

LabelLookup = Callable[[str], Awaitable[Mapping[str, str]]]
Answer = tuple[int, dict[str, Any], str]  # HTTP status, body, result (for the metrics)
# A fork server (started fresh, so none of the server's threads) loads the rules once and forks
# each worker from that: a worker killed for overrunning is replaced in milliseconds.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["netisolate.admission", "netisolate.webhook.review"])
_STARTUP_SECONDS = 60.0


@dataclass(frozen=True)
class Limits:
    # With two or more, one of them (at a lower CPU priority) takes every review of a body over
    # `large_body` bytes: a stream of huge pods then delays only other huge pods.
    workers: int = 2
    large_body: int = 64 * 1024  # a real pod, managedFields and all, is a few KB
    seconds: float = 2.0  # the API server waits timeoutSeconds (5 in daemonset/): answer before it
    # per review, on top of what an idle worker holds: a 20,000-container pod (2.5 MB) needs ~80 MiB
    memory_mib: int = 128


class NamespaceUnavailableError(Exception):
    """The pod's namespace could not be read, so its isolation floor is unknown: deny."""


# --- the worker process -----------------------------------------------------------------------


def _cap_memory(budget_mib: int) -> None:
    pages = int(open("/proc/self/statm").read().split()[0])  # noqa: SIM115 (one read, at start-up)
    limit = pages * os.sysconf("SC_PAGE_SIZE") + budget_mib * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def _review(conn: Connection, config: Config, path: str, body: bytes) -> tuple[Any, ...]:
    from netisolate.admission import allowed, review_request
    from netisolate.model import InputError
    from netisolate.webhook.review import BadReviewError, parse_review, refusal, response

    try:
        request = parse_review(path, body)
    except BadReviewError as bad:
        return ("bad", bad.status, bad.message)
    del body
    pod = request.kind.kind != "Namespace"
    conn.send(("parsed", request.uid, (request.namespace or "default") if pod else None))
    _, labels = conn.recv()
    if isinstance(labels, str):
        return ("answer", refusal(request.uid, labels), "refused")
    try:
        findings = review_request(request, labels, config)
    except InputError as err:
        return ("answer", refusal(request.uid, str(err)), "refused")
    except MemoryError:
        return ("answer", refusal(request.uid, "judging it needs more memory than a review may use"), "error")
    except Exception:  # a bug of ours must deny (fail closed) with a message, never answer 500
        log.exception("review failed", extra={"uid": request.uid})
        return (
            "answer",
            refusal(request.uid, "internal error while reviewing; see the webhook's logs"),
            "error",
        )
    return ("answer", response(request, findings), "allowed" if allowed(findings) else "denied")


def _serve(conn: Connection, config: Config, memory_mib: int, large: bool) -> None:
    """The worker's loop: one review at a time, until the server closes the pipe."""
    import netisolate.admission
    import netisolate.webhook.review  # noqa: F401  (loaded before the memory cap is measured)

    _cap_memory(memory_mib)
    if large:
        os.nice(10)  # the server and the other reviews come first
    conn.send(("ready",))
    while True:
        try:
            _, path, body = conn.recv()
        except EOFError:
            return
        try:
            reply = _review(conn, config, path, body)
        except MemoryError:  # reading the body took it all: answered without a uid
            reply = ("bad", 413, "reading the review needs more memory than a review may use")
        del body
        conn.send(reply)


# --- the server side --------------------------------------------------------------------------


class _Worker:
    def __init__(self, config: Config, memory_mib: int, large: bool) -> None:
        self.large = large
        self.conn, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(
            target=_serve, args=(child, config, memory_mib, large), name="netisolate-review", daemon=True
        )
        self.process.start()
        child.close()

    async def recv(self, timeout: float) -> tuple[Any, ...]:
        """The worker's next message; TimeoutError after `timeout`, EOFError if it died."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.conn.fileno(), readable)
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(self.conn.fileno())
        message: tuple[Any, ...] = self.conn.recv()  # a whole message: the worker sends small ones
        return message

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class ReviewPool:
    """`limits.workers` processes judging reviews; `review` waits for an idle one of its lane."""

    def __init__(self, config: Config, limits: Limits) -> None:
        self._config, self._limits = config, limits
        self._idle = {False: asyncio.Queue[_Worker](), True: asyncio.Queue[_Worker]()}  # by large
        self._all: set[_Worker] = set()
        self._starting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        lanes = [False] * self._limits.workers
        if len(lanes) > 1:
            lanes[-1] = True
        await asyncio.gather(*(self._add(large) for large in lanes))

    async def close(self) -> None:
        for task in self._starting:
            task.cancel()
        for worker in list(self._all):
            worker.kill()
        self._all.clear()

    async def _add(self, large: bool) -> None:
        """Start a worker and make it available; one that does not come up is retried, with backoff,
        until the pool closes (meanwhile reviews wait, and are denied when none is free)."""
        delay = 0.5
        while True:
            worker = await self._start_worker(large)
            self._all.add(worker)
            try:
                await worker.recv(_STARTUP_SECONDS)
            except (TimeoutError, EOFError, OSError):
                log.error("a review worker did not start", extra={"exitcode": worker.process.exitcode})
                self._discard(worker)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
                continue
            self._idle[large].put_nowait(worker)
            return

    async def _start_worker(self, large: bool) -> _Worker:
        # Off the loop (the first start launches the fork server); cancelled meanwhile (the pool
        # closes), the worker that still comes up is killed rather than left behind.
        started = asyncio.get_running_loop().run_in_executor(
            None, _Worker, self._config, self._limits.memory_mib, large
        )
        try:
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            started.add_done_callback(lambda f: None if f.exception() else f.result().kill())
            raise

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._all.discard(worker)

    def _replace(self, worker: _Worker) -> None:
        self._discard(worker)
        task = asyncio.get_running_loop().create_task(self._add(worker.large))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def review(self, path: str, body: bytes, labels: LabelLookup) -> Answer:
        seconds = self._limits.seconds
        large = self._limits.workers > 1 and len(body) > self._limits.large_body
        try:
            worker = await asyncio.wait_for(self._idle[large].get(), seconds)
        except TimeoutError:
            return _unjudged(None, f"no review worker was free within {seconds:g} s (overloaded)", 429)
        progress = _Progress()
        try:
            answer = await self._exchange(worker, path, body, labels, progress)
        except TimeoutError:
            self._replace(worker)
            return _unjudged(progress.uid, f"judging it took longer than {seconds:g} s")
        except (EOFError, OSError):
            code = worker.process.exitcode
            self._replace(worker)
            return _unjudged(progress.uid, f"the review worker ended (exit code {code}) while judging it")
        except BaseException:
            self._replace(worker)  # cancelled mid-review: the worker's state is unknown
            raise
        self._idle[large].put_nowait(worker)
        return answer

    async def _exchange(
        self, worker: _Worker, path: str, body: bytes, labels: LabelLookup, progress: _Progress
    ) -> Answer:
        seconds = self._limits.seconds
        await asyncio.to_thread(worker.conn.send, ("review", path, body))  # up to 3 MiB: off the loop
        message = await worker.recv(seconds)
        if message[0] == "bad":
            return message[1], {"error": message[2]}, "bad-request"
        _, progress.uid, namespace = message
        reply: Mapping[str, str] | str = {}
        if namespace is not None:
            try:
                reply = dict(await labels(namespace))
            except NamespaceUnavailableError as err:
                reply = str(err)
        worker.conn.send(("labels", reply))
        message = await worker.recv(seconds)  # the API server's time (labels) is not the review's
        return 200, message[1], message[2]


@dataclass
class _Progress:
    uid: str | None = None  # known once the worker has read the review


def _unjudged(uid: str | None, reason: str, status: int = 400) -> Answer:
    """A review we could not finish is denied, with the reason; without its uid (the worker did
    not get that far) only as an HTTP error, which the API server's failurePolicy: Fail denies."""
    from netisolate.webhook.review import refusal

    log.warning("review denied unjudged", extra={"uid": uid, "reason": reason})
    if uid is None:
        return status, {"error": f"netisolate: {reason}"}, "error"
    return 200, refusal(uid, reason), "error"
