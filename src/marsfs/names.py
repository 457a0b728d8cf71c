"""The one rule for the names of nodes and volumes. Below every layer.

A name is a file name in a state directory (``mirror-NODE.json``, ``VOL/``), part of a metadata
key (``volume/VOL/primary``), and text in status lines and logs. So it is short (at most 64
characters, far below the 255 bytes of a file name), starts with a letter or digit (no hidden
or relative names) and holds only letters, digits, '.', '_' and '-' (nothing a shell, a path
or a log line treats specially). The same rule holds where a name comes from the operator
(``serve --node``, ``create``) and where it comes from the wire (a hello, a metadata entry).
"""

from __future__ import annotations

import re

from marsfs.errors import InvalidRequest

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_NAME = 64
RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_name(value: object) -> bool:
    """Whether ``value`` is a legal node or volume name."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def check_volume_name(name: str) -> str:
    """``name`` if it is a legal volume name, else InvalidRequest saying the rule."""
    if not is_name(name):
        raise InvalidRequest(f"invalid volume name {name!r:.80}: use {RULE} (no '/', no leading dot)")
    return name


def check_node_name(name: str) -> str:
    """A node name as the operator gives it (``join --from``, ``verify --peer``): the same rule
    as ``serve --node``, so that a typo is named as such, not as a node this one does not know."""
    if not is_name(name):
        raise InvalidRequest(f"invalid node name {name!r:.80}: use {RULE} (the name its serve --node gives)")
    return name
