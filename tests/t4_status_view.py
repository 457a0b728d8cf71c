"""The status view read the way an operator reads it: in a real terminal (a tmux pane) and
through a pipe, during a sync that lasts several seconds (a join limited by ``--rate``).

What must hold:

* ``marsfs status --watch`` in a terminal redraws in place: two captures of the pane during the
  sync show the joining volume's progress bar further along and a smaller ETA; the pane has
  colour (escape codes in ``capture-pane -e``).
* The same command into a pipe prints plain snapshots, one per interval, with the sync's ASCII
  bar and ETA and no escape code at all; so does ``marsfs status``.
* With ``CI=true`` a missing tmux fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marsfs.testing.checks import wait_synced
from marsfs.testing.harness import Harness

MiB = 1 << 20
SIZE = 96 * MiB  #: random data, so that every block travels: at 8 MiB/s about 12 s of sync
RATE = "8M"


def _tmux() -> str:
    tmux = shutil.which("tmux")
    if tmux is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but tmux is missing (scripts/_bootstrap installs it)")
        pytest.skip("needs tmux")
    return tmux


def _fill(image: Path) -> None:
    rng = random.Random(18)
    fd = os.open(image, os.O_WRONLY)
    try:
        for pos in range(0, SIZE, 4 * MiB):
            os.pwrite(fd, rng.randbytes(4 * MiB), pos)
        os.fsync(fd)
    finally:
        os.close(fd)


#: the joining volume's row in the terminal table: "... ETA  ████░░░░  42.0% of ..."
_ROW = re.compile(r"^vm\s.*?(\d+ s|\d+ min|\?)\s+([█░]+)\s+(\d+\.\d)% of")


def _seconds(eta: str) -> float:
    if eta == "?":
        return float("inf")
    n, unit = eta.split()
    return float(n) * (60 if unit == "min" else 1)


def _terminal_env() -> dict[str, str]:
    """The environment of a shell in a terminal: pytest-xdist's workers set COLUMNS=80 and
    LINES=24, which rich obeys over the pane's real size (200 columns here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "TERM": "xterm-256color"}


def _sync_row(screen: str) -> tuple[float, int, float] | None:
    """(ETA seconds, filled bar cells, percent) of vm's row on the screen; None: not shown (yet)."""
    for line in screen.splitlines():
        m = _ROW.match(line)
        if m:
            return _seconds(m.group(1)), m.group(2).count("█"), float(m.group(3))
    return None


def test_status_watch_in_a_terminal_moves_and_a_pipe_gets_no_escape_codes(harness: Harness, tmp_path: Path) -> None:
    tmux = _tmux()
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "96M")
    _fill(a.image("vm"))
    b.cli("join", "vm", "--from", "a", "--rate", RATE)

    sock = tmp_path / "tmux.sock"  # a server of its own: nothing of the user's tmux is touched
    watch = f"{sys.executable} -m marsfs --state {b.state} status --watch --interval 0.2"

    def capture(*flags: str) -> str:
        return subprocess.run([tmux, "-S", os.fspath(sock), "capture-pane", "-p", *flags, "-t", "view"],
                              check=True, capture_output=True, text=True).stdout

    def wait_row(cond: object, what: str) -> tuple[str, tuple[float, int, float]]:
        deadline = time.monotonic() + 60
        screen = ""
        while time.monotonic() < deadline:
            screen = capture()
            row = _sync_row(screen)
            if row is not None and callable(cond) and cond(row):
                return screen, row
            time.sleep(0.1)
        raise AssertionError(f"{what}: the pane shows\n{screen}\n{b.log_tail()}")

    subprocess.run([tmux, "-S", os.fspath(sock), "new-session", "-d", "-s", "view", "-x", "200", "-y", "40",
                    watch], check=True, env=_terminal_env())
    try:
        first, (eta1, bar1, pct1) = wait_row(lambda r: r[0] != float("inf") and r[2] < 60, "a sync with an ETA")
        assert "\x1b[" in capture("-e"), "no colour on a terminal"
        assert first.count("VOLUME") == 1, f"the view is not redrawn in place:\n{first}"

        # the same command into a pipe, while the sync goes on: plain snapshots, one per interval
        pipe = subprocess.Popen([sys.executable, "-m", "marsfs", "--state", os.fspath(b.state), "status", "--watch",
                                 "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert pipe.stdout is not None
        out = b""
        try:
            while out.count(b"  sync [") < 3:
                line = pipe.stdout.readline()
                assert line, f"status --watch into a pipe ended: {out.decode(errors='replace')}"
                out += line
        finally:
            pipe.terminate()
            pipe.wait(timeout=30)
        assert b"\x1b" not in out, out
        text = out.decode()
        assert text.count("VOLUME  ROLE") >= 3 and "\n\nVOLUME  ROLE" in text, text  # one snapshot per interval
        assert re.search(r"^  sync \[#*-*\] +\d+\.\d% of 96\.0 MiB compared, .* ETA (\d+ s|\d+ min|\?)$", text, re.M), text
        once = b.cli("status").stdout
        assert "\x1b" not in once and "sync [" in once, once

        second, (eta2, bar2, pct2) = wait_row(lambda r: r[2] >= pct1 + 25 and r[2] < 100, "the sync moving on")
        print(f"first capture:\n{first}\nsecond capture:\n{second}")
        assert second.count("VOLUME") == 1, second
        assert bar2 > bar1 and pct2 > pct1, (first, second)
        assert eta2 < eta1, f"the ETA did not move:\n{first}\n{second}"
    finally:
        subprocess.run([tmux, "-S", os.fspath(sock), "kill-server"], check=False, capture_output=True)
    wait_synced(b, "vm", timeout=120)
