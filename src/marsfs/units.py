"""Sizes as people write and read them (``512M``, ``10G``; ``1.5 GiB``). Below every layer."""

from __future__ import annotations

import re

from marsfs.errors import InvalidRequest

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``10G``, ``1.5T`` (binary units, optional ``iB``/``B``) or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidRequest(f"cannot read size {text!r}: give bytes or a number with K, M, G or T, like 512M or 10G")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value != int(value):
        raise InvalidRequest(f"size {text!r} is not a whole number of bytes")
    return int(value)


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 MiB``, ``2.0 TiB``: what status tables and progress lines show."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
