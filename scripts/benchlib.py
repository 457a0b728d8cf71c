"""Helpers shared by the benchmark scripts (scripts/bench_*.py import it as ``benchlib``)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any


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
