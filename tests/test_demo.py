"""`netisolate demo`, the README's first command: it works, it checks itself, it cleans up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netisolate.cli import main

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_demo_prints_both_matrices(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "Before: every container reaches every port" in out
    after = out.split("After:")[1]
    rows = {line.split()[0]: line.split()[1:] for line in after.splitlines()[2:5]}
    assert rows == {
        "app": ["blocked", "open", "blocked"],
        "proxy": ["open", "blocked", "blocked"],
        "rogue": ["blocked", "blocked", "blocked"],
    }
    assert "Cleaned up" in out


def test_demo_of_cgroup_identity(capsys: pytest.CaptureFixture[str]) -> None:
    """The shared-uid scenario: app and proxy on one UID, the rogue root, told apart by cgroups;
    under iptables it says why it cannot run rather than show a wrong matrix."""
    before = set(Path("/sys/fs/cgroup/unified").glob("ni-*"))
    assert main(["demo", "--scenario", "shared-uid"]) == 0
    out = capsys.readouterr().out
    assert "socket cgroupv2 level" in out and "The matrix is exactly what the annotations grant" in out
    assert set(Path("/sys/fs/cgroup/unified").glob("ni-*")) <= before, "the demo's cgroups are removed"
    assert main(["demo", "--scenario", "shared-uid", "--backend", "iptables"]) == 1
    assert "--backend nftables" in capsys.readouterr().err


def test_demo_cleans_up_when_terminated() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "netisolate", "demo"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    while "network namespace" not in first:
        first = proc.stdout.readline()
    name = first.split("network namespace ")[1].split()[0]
    assert Path(f"/run/netns/{name}").exists()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    deadline = time.monotonic() + 5
    while Path(f"/run/netns/{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/run/netns/{name}").exists()
    assert not Path(f"/run/netns/{name.removesuffix('-pod')}-peer").exists()
