"""Holds: what keeps a volume's log from being deleted.

A hold is a name and an LSN: the log after that LSN stays until the hold moves or goes. A
mirror's position on its primary is such a hold, under the key :func:`mirror_hold` makes;
every place that reads or writes a mirror's hold goes through these two functions, so the
key's form has one home.
"""

from __future__ import annotations

_MIRROR = "mirror:"


def mirror_hold(node: str) -> str:
    """The hold key under which mirror ``node``'s position holds a primary's log."""
    assert node and not node.startswith(_MIRROR), node
    return _MIRROR + node


def hold_mirror(key: str) -> str | None:
    """The mirror whose position ``key`` is, or None for a hold that is no mirror's."""
    return key[len(_MIRROR):] if key.startswith(_MIRROR) else None
