"""List+watch with the plain `kubernetes` client, one thread per resource.

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
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ReadTimeoutError

from netisolate.agent.report import WATCH_ERRORS, WATCH_UP
from netisolate.kube import Lister, decoded

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class Gone(Exception):  # noqa: N818 - the HTTP status' own name
    """HTTP 410: the resourceVersion is too old; relist."""


class ListWatch:
    def __init__(
        self,
        name: str,
        list_fn: Lister,
        on_list: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        *,
        stop: threading.Event,
        timeout_seconds: int = 240,
        field_selector: str | None = None,
    ) -> None:
        self.name, self.list_fn, self.on_list, self.on_event = name, list_fn, on_list, on_event
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
        data = decoded(self.list_fn(field_selector=self.field_selector, _preload_content=False))
        self.resource_version = data["metadata"].get("resourceVersion")
        self._succeeded()
        self.on_list(data.get("items") or [])
        self.synced.set()

    def _watch(self) -> None:
        stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
            self.list_fn,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.timeout_seconds,
            # the server ends a watch after timeout_seconds; a connection silent for longer is dead
            _request_timeout=(10, self.timeout_seconds + 2),
            deserialize=False,
            field_selector=self.field_selector,
        )
        for event in stream:
            if self.stop.is_set():
                return
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ApiException(status=obj.get("code"), reason=obj.get("message"))
            self.resource_version = (obj.get("metadata") or {}).get("resourceVersion", self.resource_version)
            self._succeeded()
            if kind != "BOOKMARK":
                self.on_event(kind, obj)

    def run(self, max_backoff: float = 30.0) -> None:
        backoff = 0.5
        while not self.stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()
                backoff = 0.5
            except ReadTimeoutError:
                continue  # a quiet watch outlived its timeout: resume from the same resourceVersion
            except Gone:
                log.info("watch expired, relisting", extra={"resource": self.name})
                self.resource_version = None
            except ApiException as err:
                if err.status == 410:
                    self.resource_version = None
                    continue
                self._failed(f"API error {err.status}: {err.reason}", backoff)
                backoff = min(backoff * 2, max_backoff)
            except Exception as err:  # connection refused, reset, timeouts: the API server is away
                self._failed(f"API unreachable: {err!r}", backoff)
                backoff = min(backoff * 2, max_backoff)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name=f"watch-{self.name}", daemon=True)
        thread.start()
        return thread
