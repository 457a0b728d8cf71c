"""Helpers shared by the benchmark scripts (scripts/bench_*.py import it as ``benchlib``)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from marsfs.testing.faultproxy import ProxyProcess
from marsfs.testing.harness import Harness, NodeProcess


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the harnesses, which clean up


def exit_on_sigterm() -> None:
    """A SIGTERM (a CI timeout, a kill by pid) ends a benchmark as an exception does, so the
    harnesses unmount, detach and stop what it started."""
    signal.signal(signal.SIGTERM, _sigterm)


def splice(doc: Path, section: str, body: str) -> None:
    """Replace the text between ``<!-- section:start -->`` and ``<!-- section:end -->``."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


class Neighbours:
    """Watches for marsfs daemons, fio and pytest runs that are not ours: they disturb the numbers."""

    PATTERNS = ("marsfs serve", "fio ", "pytest", "bench_")

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    @classmethod
    def _ours(cls, pid: int, me: int, ancestors: frozenset[int]) -> bool:
        """``pid`` is this benchmark, one of its children, or what started it (a ``timeout`` wrapper)."""
        if pid in ancestors:
            return True
        while pid > 1:
            if pid == me:
                return True
            pid = cls._parent(pid)
        return False

    def _run(self) -> None:
        me = os.getpid()
        up, pid = set(), os.getppid()
        while pid > 1:
            up.add(pid)
            pid = self._parent(pid)
        ancestors = frozenset(up)
        while not self._stop.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if any(p in cmd for p in self.PATTERNS) and not self._ours(int(d.name), me, ancestors):
                    self.seen.add(" ".join(cmd.split()[:6]))
            self._stop.wait(2.0)

    def __enter__(self) -> Neighbours:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pair_ratios(runs: list[tuple[str, float | None]], kind: str, base: str) -> list[float]:
    """Each ``kind`` run's value divided by the mean of the ``base`` runs just before and after it.

    ``runs`` is (kind, value) in the order run, value None for a failed run; alternating runs
    this way cancels most of a slow drift in the machine's load. A ``kind`` run without a
    ``base`` neighbour that succeeded gives no ratio."""
    out = []
    for i, (k, v) in enumerate(runs):
        if k != kind or v is None:
            continue
        near = [w for j in (i - 1, i + 1) if 0 <= j < len(runs)
                for b, w in [runs[j]] if b == base and w is not None]
        if near:
            out.append(v / (sum(near) / len(near)))
    return out


def pair(h: Harness, volume: str, size: str, proxy: ProxyProcess | None = None, *,
         insecure: bool = False) -> tuple[NodeProcess, NodeProcess]:
    """Primary ``a`` with ``volume`` of ``size``, mirror ``b`` joined and synced (through ``proxy`` if given;
    over plain TCP with ``insecure``, else mutual TLS as the harness sets nodes up)."""
    nodes = h.cluster(["a", "b"], start=False)
    a, b = nodes["a"], nodes["b"]
    if insecure:
        a.extra.append("--insecure")
        b.extra.append("--insecure")
    a.start()
    if proxy is not None:
        port = proxy.start(h.ports["a"])
        i = b.extra.index(f"a=127.0.0.1:{h.ports['a']}")
        b.extra[i] = f"a=127.0.0.1:{port}"
    b.start()
    a.cli("create", volume, "--size", size)
    b.cli("join", volume, "--from", "a")
    r = b.cli("wait", volume, "--synced", "--timeout", "120", check=False, timeout=180)
    if r.returncode != 0:
        raise RuntimeError(f"mirror did not sync: {r.stderr.strip()}\n{b.log_tail()}")
    return a, b


def shown_args(argv: list[str], *hidden: str) -> list[str]:
    """The command line a report quotes: ``argv`` without the options that only say where files
    go (``--out``, ``--json``, ``--dir`` and ``hidden``), with their values, as ``--opt V`` or ``--opt=V``."""
    opts = ("--out", "--json", "--dir", *hidden)
    shown, it = [], iter(argv)
    for a in it:
        if a in opts:
            next(it, None)
        elif not a.startswith(tuple(o + "=" for o in opts)):
            shown.append(a)
    return shown
