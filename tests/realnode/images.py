"""Two OCI images built on this machine, with no registry: `pause` (the sandbox process, a static
C binary compiled from pause.c) and `toolbox` (Debian's static busybox with its applets, plus the
host's socat and the libraries it links: the UDP listeners and every probe use socat, busybox's
nc speaks TCP only). Each is a one-layer OCI archive that `ctr images import` reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

HERE = Path(__file__).parent
PAUSE = "localhost/netisolate-test/pause:1"
TOOLBOX = "localhost/netisolate-test/toolbox:1"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class ImageError(RuntimeError):
    pass


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(files: dict[str, Path], links: dict[str, str], dirs: list[str]) -> bytes:
    """An uncompressed, reproducible layer: files copied from the host, symlinks, empty dirs."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for name, source in sorted(files.items()):
            data = source.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for name, target in sorted(links.items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out.getvalue()


def oci_archive(ref: str, layer: bytes, entrypoint: list[str], cmd: list[str]) -> bytes:
    """An OCI image layout as one tar (what `ctr images import` takes), named `ref`."""
    arch = _ARCH.get(platform.machine(), platform.machine())
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": _digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                    },
                }
            ],
        }
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        entries = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": index}
        entries |= {f"blobs/sha256/{_digest(b)[7:]}": b for b in (config, manifest, layer)}
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def pause_archive(workdir: Path) -> bytes:
    binary = workdir / "pause"
    built = subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-o", str(binary), str(HERE / "pause.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise ImageError(f"building the pause binary failed (is gcc installed?): {built.stderr.strip()}")
    return oci_archive(PAUSE, _layer({"pause": binary}, {}, []), ["/pause"], [])


def _host_binary(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise ImageError(f"{name} is missing: run `bash scripts/bootstrap.sh` as root")
    return Path(found).resolve()


def _linked_libraries(binary: Path) -> dict[str, Path]:
    """{path in the image: host file} for every shared library `binary` loads (ldd's view)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = {}
    for line in out.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            libs[path.lstrip("/")] = Path(path).resolve()
    return libs


def toolbox_archive() -> bytes:
    busybox, socat = _host_binary("busybox"), _host_binary("socat")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    links = {f"bin/{a}": "busybox" for a in applets.split() if a != "busybox"}
    files = {"bin/busybox": busybox, "usr/bin/socat": socat, **_linked_libraries(socat)}
    dirs = ["bin", "etc", "dev", "proc", "sys", "tmp", "usr", "usr/bin", "lib", "lib64", "var"]
    dirs += sorted({str(Path(p).parent) for p in files} - set(dirs) - {"."})
    return oci_archive(TOOLBOX, _layer(files, links, dirs), [], ["sh"])
