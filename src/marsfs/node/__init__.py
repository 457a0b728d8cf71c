"""The node: a state directory, its volumes and roles, and the policies that run on them.

``Node``, ``DEFAULT_HISTORY_BYTES``, ``check_node_name`` and ``check_volume_name`` are imported when first asked for
(PEP 562): a command-line process that reads only :mod:`marsfs.node.volstate` or
:mod:`marsfs.node.defaults` does not load the volume and log layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from marsfs.errors import NodeError

if TYPE_CHECKING:
    from marsfs.node.node import DEFAULT_HISTORY_BYTES, Node, check_node_name, check_volume_name

__all__ = ["DEFAULT_HISTORY_BYTES", "Node", "NodeError", "check_node_name", "check_volume_name"]


def __getattr__(name: str) -> Any:
    if name in ("DEFAULT_HISTORY_BYTES", "Node", "check_node_name", "check_volume_name"):
        from marsfs.node import node

        return getattr(node, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
