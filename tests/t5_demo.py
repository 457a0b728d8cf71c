"""The README's first command must keep working and must leave the machine as it found it.

``scripts/demo`` runs end to end (as a user runs it) with ``TMPDIR`` pointed at a directory of
this test; afterwards nothing of it may be left: no mount under that directory (FUSE or ext4,
from /proc/mounts), no loop device whose backing file is there (``losetup -l``), no process
whose command line names it, no file in it. ``--keep`` must leave the cluster running (the same
checks find all four kinds of leftover: so they can fail) and ``--stop DIR`` must then release it.

The suite normally runs from the checkout's own ``.venv`` (``scripts/test``); then the test runs
``scripts/demo`` itself, setup included. From another interpreter (a second worktree sharing a
venv) it runs what the script execs, ``python -m marsfs.demo``, since the script's setup would
install this checkout into a venv of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from marsfs.testing.harness import Harness

ROOT = Path(__file__).resolve().parents[1]


def demo_command() -> list[str]:
    venv = ROOT / ".venv"
    if (venv / "bin" / "python").exists() and Path(sys.prefix).resolve() == venv.resolve():
        return [os.fspath(ROOT / "scripts" / "demo")]
    return [sys.executable, "-m", "marsfs.demo"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: short, as a user's /tmp is (a control socket's path must fit in 107
    bytes, and an xdist worker's tmp_path is long), removed afterwards whatever the demo left."""
    tmp = Path(tempfile.mkdtemp(prefix="demo-", dir="/tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": os.fspath(tmp),
           "PYTHONPATH": os.pathsep.join([os.fspath(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*demo_command(), *args], capture_output=True, text=True, timeout=900, env=env,
                          cwd=ROOT)


def loop_devices() -> dict[str, str]:
    """Attached loop devices and their backing files, as ``losetup -l`` names them."""
    out = subprocess.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], capture_output=True, text=True,
                         check=True).stdout
    return dict((line.split(None, 1) + [""])[:2] for line in out.splitlines() if line.strip())


def leftovers(tmp: Path, loops_before: dict[str, str]) -> dict[str, list[str]]:
    """Everything under ``tmp`` that is still mounted, attached, running or on disk.

    A loop device counts when its backing file is under ``tmp``, or when it is new and its
    backing file is gone from where it was (a loop left on a FUSE mount that went away names
    its file relative to nothing, ``/vm.img``, or ``(deleted)``); the loops of tests running
    alongside have files that exist.
    """
    tag = os.fspath(tmp)
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(tag)]
    loops = [f"{dev} {back}" for dev, back in loop_devices().items()
             if tag in back or (dev not in loops_before and not os.path.exists(back.removesuffix(" (deleted)")))]
    procs: list[str] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if os.fsencode(tag) in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            procs.append(f"{pid}: {words[:200]}")
    files = sorted(os.fspath(p) for p in tmp.rglob("*")) if not mounts else ["(not listed: mounts are left)"]
    return {"mounts": mounts, "loops": loops, "processes": procs, "files": files}


def test_core_demo() -> None:
    r = subprocess.run([sys.executable, "-m", "marsfs.demo", "--core", "--size", "16", "--writes", "60"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "marsfs demo: OK" in r.stdout


def test_demo_tells_the_whole_story_and_leaves_nothing_behind(harness: Harness, short_tmp: Path) -> None:
    # the harness fixture checks root/FUSE/loop (under CI=true it fails loudly instead of skipping)
    tmp = short_tmp
    loops = loop_devices()
    r = run_demo(tmp)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "marsfs demo: OK" in r.stdout and "Traceback" not in r.stdout + r.stderr
    out = r.stdout
    for typed in ("marsfs cluster init", "marsfs cluster add-node a", "marsfs serve --node c", "marsfs create vm",
                  "marsfs join vm --from a", "marsfs status vm", "marsfs mark vm v1", "marsfs clone vm@v1",
                  "b$ marsfs primary vm", "kill -KILL", "fusermount3 -u", "c$ marsfs primary vm --force",
                  "split brain with b", "b$ marsfs invalidate vm", "marsfs verify vm"):
        assert typed in out, f"the demo does not show {typed!r}:\n{out}"
    assert re.search(r"identical at lsn-\d+", out), out
    steps = re.findall(r"^ ?\d+\. ", out, re.M)
    assert len(steps) >= 10, out
    assert leftovers(tmp, loops) == {"mounts": [], "loops": [], "processes": [], "files": []}


def test_demo_keep_leaves_the_cluster_running_and_stop_releases_it(harness: Harness, short_tmp: Path) -> None:
    tmp = short_tmp
    loops = loop_devices()
    r = run_demo(tmp, "--keep")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^ +(\S*demo) --stop (\S+)$", r.stdout, re.M)
    assert m, r.stdout
    kept = Path(m.group(2))
    try:
        left = leftovers(tmp, loops)
        assert kept.parent == tmp and "export DEMO=" in r.stdout and "marsfs status" in r.stdout, r.stdout
        assert len([p for p in left["mounts"] if p.endswith("/mnt")]) == 3, left  # the three FUSE mounts
        assert any(p.endswith("/ext4-c") for p in left["mounts"]), left  # c's ext4, to look at
        assert len(left["loops"]) == 1 and len(left["processes"]) >= 3 and left["files"], left
        status = subprocess.run([sys.executable, "-m", "marsfs", "--state", os.fspath(kept / "c" / "state"),
                                 "status", "vm", "--json"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["role"] == "primary", status.stdout
    finally:
        s = run_demo(tmp, "--stop", os.fspath(kept))
    assert s.returncode == 0, s.stdout + s.stderr
    assert leftovers(tmp, loops) == {"mounts": [], "loops": [], "processes": [], "files": []}
