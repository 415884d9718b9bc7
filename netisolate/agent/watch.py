"""List+watch of one resource (netisolate.kubeclient), one thread per resource.

Pods are listed and watched with the server-side field selector `spec.nodeName=<node>`, so the
agent's API load grows with its node, not the cluster (and they are filtered by node here too).
Bookmarks keep the resourceVersion fresh; 410 Gone means relist; any other failure backs off and
retries — enforcement never waits on the API server, the reconciler keeps what it has. A failing
list/watch is reported: `failing` says why (until a list or an event gets through again), the
`netisolate_watch_up` gauge and `netisolate_watch_errors_total` count it, and the log says when it
starts failing and when it recovers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from netisolate.agent.report import WATCH_ERRORS, WATCH_UP
from netisolate.kube import Watcher
from netisolate.kubeclient import ApiError, Obj

log = logging.getLogger(__name__)


class ListWatch:
    def __init__(
        self,
        name: str,
        api: Watcher,
        path: str,
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        *,
        stop: threading.Event,
        timeout_seconds: int = 240,
        field_selector: str | None = None,
    ) -> None:
        self.name, self.api, self.path, self.on_list, self.on_event = name, api, path, on_list, on_event
        self.stop, self.field_selector, self.timeout_seconds = stop, field_selector, timeout_seconds
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.failing = ""  # why the last attempt failed; "" once a list or an event gets through
        WATCH_UP.labels(name).set(0)

    def _succeeded(self) -> None:
        if self.failing:
            log.info("list/watch recovered", extra={"resource": self.name})
        self.failing = ""
        WATCH_UP.labels(self.name).set(1)

    def _failed(self, reason: str, backoff: float) -> None:
        if not self.failing:
            log.error("list/watch failing", extra={"resource": self.name, "error": reason})
        self.failing = reason
        WATCH_ERRORS.labels(self.name).inc()
        WATCH_UP.labels(self.name).set(0)
        log.warning("retrying", extra={"resource": self.name, "error": reason, "retry_in_s": backoff})
        self.stop.wait(backoff)

    def _list(self) -> None:
        listing = self.api.list(self.path, field_selector=self.field_selector)
        self.resource_version = listing.resource_version
        self._succeeded()
        self.on_list(listing.items)
        self.synced.set()

    def _watch(self) -> None:
        events = self.api.watch(
            self.path,
            resource_version=self.resource_version,
            field_selector=self.field_selector,
            timeout_seconds=self.timeout_seconds,
        )
        for event in events:
            if self.stop.is_set():
                return
            meta = event.object.get("metadata") or {}
            self.resource_version = meta.get("resourceVersion", self.resource_version)
            self._succeeded()
            if event.type != "BOOKMARK":
                self.on_event(event.type, event.object)

    def run(self, max_backoff: float = 30.0) -> None:
        backoff = 0.5
        while not self.stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()  # ends when the server ends it, or a silent connection timed out
                backoff = 0.5
            except ApiError as err:
                if err.status == 410:  # the resourceVersion is too old (compacted): relist
                    log.info("watch expired, relisting", extra={"resource": self.name})
                    self.resource_version = None
                    continue
                self._failed(f"API error {err.status}: {err.message}", backoff)
                backoff = min(backoff * 2, max_backoff)
            except Exception as err:  # connection refused, reset, garbled: the API server is away
                self._failed(f"API unreachable: {err}", backoff)
                backoff = min(backoff * 2, max_backoff)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"watch-{self.name}", daemon=True)
        thread.start()
        return thread
