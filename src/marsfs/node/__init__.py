"""The node: a state directory, its volumes and roles, and the policies that run on them."""

from marsfs.errors import NodeError
from marsfs.node.node import DEFAULT_HISTORY_BYTES, Node, check_node_name, check_volume_name

__all__ = ["DEFAULT_HISTORY_BYTES", "Node", "NodeError", "check_node_name", "check_volume_name"]
