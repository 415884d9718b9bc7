"""Stand-ins for container processes: stdlib-only scripts run by the system python3 under a
container's UID (other UIDs cannot read a venv under /root, so they get the source via `-c`)."""

from __future__ import annotations

from importlib.resources import files


def script(name: str) -> str:
    return files(__package__).joinpath(f"{name}.py").read_text()
