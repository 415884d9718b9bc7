"""Reading nftables in-process through libnftables (the library `nft` itself is built on), with no
fork and exec: listing a pod's table costs ~0.5 ms instead of ~4 ms, which is what makes verifying
hundreds of pods cheap, and a new pod's first table loads in ~1 ms of CPU instead of a process.

The library opens its netlink socket in the namespace of the calling thread: NetNS.run calls it
from a thread that has entered the pod's namespace. Calls are serialised: libnftables keeps global
state. A context lives for one call: libnftables 1.0.6 select()s on its socket when it writes, and
glibc aborts the whole process when that fd is 1024 or more ("bit out of range 0 - FD_SETSIZE"),
so `load` refuses, and the caller forks `nft`, when the process's lowest free fd is near that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from functools import cache

_LOCK = threading.Lock()
FD_SETSIZE = 1024
_FD_MARGIN = 64  # fds other threads may open between our check and libnftables' socket()


class TooManyFilesError(OSError):
    """The process holds so many files that libnftables' socket could be past FD_SETSIZE."""


@cache
def _library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error, lib.nft_ctx_free):
        fn.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    return _library() is not None


def _lowest_free_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd


def run(command: str) -> tuple[int, str, str]:
    """(status, output, error) of one nft command that only reads (a listing never select()s),
    in the calling thread's network namespace."""
    return _call(command, write=False)


def load(document: str) -> tuple[int, str, str]:
    """Like `run`, for a document that writes; raises TooManyFilesError where that could abort."""
    return _call(document, write=True)


def _call(command: str, write: bool) -> tuple[int, str, str]:
    lib = _library()
    if lib is None:
        raise OSError("libnftables is not installed")
    with _LOCK:
        if write and _lowest_free_fd() >= FD_SETSIZE - _FD_MARGIN:
            raise TooManyFilesError("too many open files to call libnftables safely")
        ctx = lib.nft_ctx_new(0)
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            status = lib.nft_run_cmd_from_buffer(ctx, command.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode()
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode()
        finally:
            lib.nft_ctx_free(ctx)
    return status, out, err
