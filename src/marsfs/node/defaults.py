"""Defaults of the node layer that the command line shows in its help, in a module that
imports nothing: the command line must not load the cluster (or ``cryptography``) to say them."""

from __future__ import annotations

DEFAULT_CLUSTER = "marsfs"  #: the cluster id of ``serve --cluster`` and ``cluster init`` when none is given
NODE_DAYS = 825  #: days a node certificate from ``cluster add-node`` is valid
DEFAULT_SYNC_TIMEOUT = 2.0  #: seconds a sync volume's flush waits for its mirrors before it degrades (``--timeout``)
