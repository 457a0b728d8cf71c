"""Reaching the other nodes: one place that turns a peer's name into a connection.

Rules that hold here:

* Every connection this node opens to a peer (fetch, gossip, handover, compare, verify, leave,
  join's hello) comes from :meth:`Peers.connector`, so a test passes a fake :class:`Peers` and
  TLS later wraps this one place. Nothing else in :mod:`marsfs.node` opens a stream.
* An unknown peer is refused with :class:`~marsfs.errors.PeerError` when the connector is asked
  for, before anything changes; a known peer that is down fails only when connected to.
* No module-level mutable state; the only import from :mod:`marsfs.node` is none.
"""

from __future__ import annotations

from typing import Protocol

import trio

from marsfs.aio import describe
from marsfs.errors import PeerError, UsageError
from marsfs.replication.channel import PeerRefused
from marsfs.replication.fetch import Connect, hello, open_channel
from marsfs.replication.protocol import Welcome


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; a usage error says the form otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {text!r}: give HOST:PORT, like 127.0.0.1:7600")
    return host.strip("[]"), int(port)


class Peers(Protocol):
    """How this node reaches a peer by name (what :class:`~marsfs.node.cluster.Cluster`,
    :class:`~marsfs.node.mirrors.Mirrors` and :class:`~marsfs.node.handover.Roles` need;
    :class:`TcpPeers` in a daemon, a fake in tests)."""

    def connector(self, peer: str) -> Connect:
        """A function that opens a stream to ``peer``; PeerError at once for an unknown peer."""
        ...

    def where(self, peer: str) -> str:
        """Where ``peer`` is, in words, for an error message (``127.0.0.1:7600``)."""
        ...


class TcpPeers:
    """The peers of ``--peer NAME=HOST:PORT``, reached over plain TCP.

    ``addresses`` is shared, not copied: it is :attr:`Cluster.peers`, and a peer added there
    (a test that learns a port after start) is reachable here at once."""

    def __init__(self, addresses: dict[str, tuple[str, int]]) -> None:
        self.addresses = addresses

    def connector(self, peer: str) -> Connect:
        if peer not in self.addresses:
            known = ", ".join(sorted(self.addresses)) or "none"
            raise PeerError(f"unknown peer {peer!r} (known: {known}); start the daemon with --peer {peer}=HOST:PORT")
        host, port = self.addresses[peer]

        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, port)

        return connect

    def where(self, peer: str) -> str:
        host, port = self.addresses[peer]
        return f"{host}:{port}"


async def welcome(peers: Peers, me: str, cluster: str, source: str, name: str, node_id: str) -> Welcome:
    """Ask ``source`` whether it serves ``name`` to us (``me``, whose id is ``node_id``):
    refusals come back to the operator at once, as PeerError (also the source's refusal of this
    node: in no peer list, or another node of this name runs); the connection is closed again."""
    connect = peers.connector(source)
    try:
        ch, answer = await open_channel(connect, hello(me, cluster, name, "sync", node_id=node_id))
    except PeerRefused as e:
        raise PeerError(f"{source} refused: {e.message}") from None
    except (OSError, trio.TooSlowError) as e:
        raise PeerError(f"cannot reach peer {source} at {peers.where(source)}: {describe(e)}; "
                        "is its daemon running with --listen?") from None
    await ch.aclose()
    return answer
