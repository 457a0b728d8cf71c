"""The README's first command must keep working: run both demos as a user would."""

from __future__ import annotations

import subprocess
import sys

from marsfs.testing.harness import Harness


def test_core_demo() -> None:
    r = subprocess.run([sys.executable, "-m", "marsfs.demo", "--core", "--size", "16", "--writes", "60"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "marsfs demo: OK" in r.stdout


def test_cluster_demo(harness: Harness) -> None:  # the fixture checks root/FUSE/loop (CI fails loudly)
    r = subprocess.run([sys.executable, "-m", "marsfs.demo", "--size", "64", "--files", "5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "images are byte-identical" in r.stdout and "marsfs demo: OK" in r.stdout
