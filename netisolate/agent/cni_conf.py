"""The plugin on the node's disk: its binary in the CNI bin dir, its entry in the primary conflist,
kept there while the primary CNI rewrites that file, and taken out again on uninstall.

Every write is atomic (a temporary file in the same directory, renamed over the target): the
runtime reloads its configuration whenever the directory changes, and must never read half a file.
Temporary names end in `.tmp`, which the runtime does not read.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from netisolate.cni import conflist

log = logging.getLogger(__name__)
PLUGIN_NAME = conflist.PLUGIN_TYPE  # the runtime runs the binary named as the plugin's type
CHAIN_REPAIRS = Counter(
    "netisolate_cni_chain_repairs_total", "Times the plugin was put back into the primary conflist"
)
CHAINED = Gauge("netisolate_cni_chained", "1 while netisolate-cni is the last plugin of the primary conflist")
# inotify(7): IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM/TO, IN_CREATE, IN_DELETE(_SELF)
_IN_EVENTS = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400
_IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC


class CniInstallError(RuntimeError):
    """The plugin cannot be installed; the message says what to fix."""


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_binary(plugin: Path, bin_dir: Path) -> Path:
    """Copy the plugin into the bin dir (atomically: a runtime may be executing the old one)."""
    if not os.access(plugin, os.X_OK):
        raise CniInstallError(
            f"the CNI plugin {plugin} is missing or not executable: build it with "
            "`cc -O2 -static -o netisolate-cni cni/netisolate-cni.c` (the image ships it)"
        )
    if not bin_dir.is_dir():
        raise CniInstallError(f"the CNI bin dir {bin_dir} does not exist: mount the node's (hostPath)")
    target = bin_dir / PLUGIN_NAME
    data = plugin.read_bytes()
    if not (target.exists() and target.read_bytes() == data):
        write_atomically(target, data, 0o755)
        log.info("CNI plugin installed", extra={"path": str(target)})
    return target


class Chain:
    """Keeps our entry last in the primary conflist of `conf_dir`."""

    def __init__(self, conf_dir: Path, entry: dict[str, Any]) -> None:
        self.conf_dir, self.entry = conf_dir, entry
        self.problem = ""  # the last reason the entry could not be put in, for logs and /status
        self.chained_into: str | None = None

    def ensure(self) -> bool:
        """Put the entry in if it is missing. True when it is in the primary conflist now."""
        try:
            names = os.listdir(self.conf_dir)
        except OSError as err:
            return self._cannot(f"cannot read the CNI conf dir {self.conf_dir}: {err.strerror}")
        name = conflist.primary(names)
        if name is None:
            return self._cannot(f"no CNI configuration in {self.conf_dir} yet: waiting for the node's CNI")
        try:
            edit = conflist.chained(name, (self.conf_dir / name).read_text(), self.entry)
        except (OSError, UnicodeDecodeError) as err:
            return self._cannot(f"cannot read {self.conf_dir / name}: {err}")
        except conflist.ConflistError as err:
            return self._cannot(str(err))
        if edit is not None:
            apply_edit(self.conf_dir, edit)
            if self.chained_into is not None:
                CHAIN_REPAIRS.inc()
            log.info("netisolate-cni chained as the last plugin", extra={"file": edit.name})
        self.chained_into, self.problem = edit.name if edit else name, ""
        CHAINED.set(1)
        return True

    def _cannot(self, problem: str) -> bool:
        if problem != self.problem:
            log.warning("CNI plugin not chained", extra={"reason": problem})
        self.problem, self.chained_into = problem, None
        CHAINED.set(0)
        return False

    def keep(self, stop: threading.Event, recheck: float = 1.0) -> None:
        """Re-check on every change of the directory (inotify), and every `recheck` seconds in
        case a change was missed (or inotify is unavailable)."""
        watch = _DirWatch(self.conf_dir)
        try:
            while not stop.is_set():
                try:
                    self.ensure()
                except Exception:  # a bug here must not end the watch: the next round retries
                    log.exception("keeping the CNI chain failed")
                if watch.wait(recheck):
                    stop.wait(0.02)  # let a writer finish its burst (write, rename) before reading
        finally:
            watch.close()

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.keep, args=(stop,), name="cni-chain", daemon=True)
        thread.start()
        return thread


def apply_edit(conf_dir: Path, edit: conflist.Edit) -> None:
    write_atomically(conf_dir / edit.name, edit.text.encode())
    if edit.remove:
        (conf_dir / edit.remove).unlink(missing_ok=True)


def uninstall(conf_dir: Path, bin_dir: Path, grace: float = 2.0) -> list[str]:
    """Take the plugin out of every conflist first, give the runtime `grace` seconds to reload
    them, then remove the binary: a chain that names a missing plugin fails every pod."""
    changed = []
    for name in sorted(os.listdir(conf_dir)):
        if not name.endswith(".conflist"):
            continue
        try:
            edit = conflist.unchained(name, (conf_dir / name).read_text())
        except (OSError, UnicodeDecodeError, conflist.ConflistError):
            continue  # not ours to judge: we only take ourselves out
        if edit is not None:
            apply_edit(conf_dir, edit)
            changed.append(name)
    if changed:
        time.sleep(grace)
    (bin_dir / PLUGIN_NAME).unlink(missing_ok=True)
    log.info("netisolate-cni uninstalled", extra={"conflists": changed})
    return changed


class _DirWatch:
    """inotify on one directory, by ctypes (libc); polling when that is not possible."""

    def __init__(self, directory: Path) -> None:
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK_CLOEXEC)
            if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(directory), _IN_EVENTS) >= 0:
                self.fd = fd
            elif fd >= 0:
                os.close(fd)
        except (OSError, AttributeError):
            self.fd = -1

    def wait(self, timeout: float) -> bool:
        """True when the directory changed within timeout."""
        if self.fd < 0:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
