"""Reaching the other nodes: one place that turns a peer's name into a connection.

Rules that hold here:

* Every connection this node opens to a peer (fetch, gossip, handover, compare, verify, leave,
  join's hello) comes from :meth:`Peers.connector`, so a test passes a fake :class:`Peers` and
  TLS later wraps this one place. Nothing else in :mod:`marsfs.node` opens a stream.
* An unknown peer is refused with :class:`~marsfs.errors.PeerError` when the connector is asked
  for, before anything changes; a known peer that is down fails only when connected to.
* Every connection a peer opens to this node passes :class:`Admission` first: with TLS the
  handshake (both certificates of the cluster CA, :mod:`marsfs.node.tls`), at most
  :data:`MAX_HANDSHAKES` at once and each within its deadline, so a stranger holds neither
  a task nor a file descriptor for long; the server then gets the name the certificate gives.
* A refused connection is logged in one line without a traceback, at most once per
  :data:`LOG_EVERY` seconds per host (the lines left out are counted in the next one).
* No module-level mutable state; the only import from :mod:`marsfs.node` is :mod:`~marsfs.node.tls`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from marsfs.aio import describe
from marsfs.errors import PeerError, UsageError
from marsfs.node.logbook import LOG_EVERY, LogBook
from marsfs.node.tls import HandshakeFailed, Tls, client_stream, server_stream
from marsfs.replication.channel import PeerRefused
from marsfs.replication.fetch import Connect, hello, open_channel
from marsfs.replication.protocol import Welcome
from marsfs.replication.server import peer_address

logger = logging.getLogger(__name__)

MAX_HANDSHAKES = 64  #: connections in their TLS handshake at once; more are closed at once


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
    """The peers of ``--peer NAME=HOST:PORT``, reached over TCP: TLS 1.3 with this node's
    certificate, the peer's certificate naming the peer (with ``tls``), or plain TCP.

    ``addresses`` is shared, not copied: it is :attr:`Cluster.peers`, and a peer added there
    (a test that learns a port after start) is reachable here at once."""

    def __init__(self, addresses: dict[str, tuple[str, int]], tls: Tls | None = None) -> None:
        self.addresses = addresses
        self.tls = tls

    def connector(self, peer: str) -> Connect:
        if peer not in self.addresses:
            known = ", ".join(sorted(self.addresses)) or "none"
            raise PeerError(f"unknown peer {peer!r} (known: {known}); start the daemon with --peer {peer}=HOST:PORT")
        host, port = self.addresses[peer]

        tls = self.tls

        async def connect() -> trio.abc.Stream:
            stream = await trio.open_tcp_stream(host, port)
            return stream if tls is None else await client_stream(stream, tls, peer)

        return connect

    def where(self, peer: str) -> str:
        host, port = self.addresses[peer]
        return f"{host}:{port}"


async def welcome(peers: Peers, me: str, cluster: str, source: str, name: str, node_id: str) -> Welcome:
    """Ask ``source`` whether it serves ``name`` to us (``me``, whose id is ``node_id``) for the
    operator's ``join`` (the HELLO of a join's fast sync): refusals come back to the operator at
    once, as PeerError (also the source's refusal of this node: in no peer list, or another
    node of this name runs); the connection is closed again."""
    connect = peers.connector(source)
    try:
        ch, answer = await open_channel(connect, hello(me, cluster, name, "sync", node_id=node_id, join=True))
    except PeerRefused as e:
        advice = (f"; give a node that holds {name} (marsfs status on {source} lists its volumes)"
                  if e.code == "unknown-volume" else "")
        raise PeerError(f"{source} refused: {e.message}{advice}") from None
    except (OSError, trio.TooSlowError) as e:
        raise PeerError(f"cannot reach peer {source} at {peers.where(source)}: {describe(e)}; "
                        "is its daemon running with --listen?") from None
    await ch.aclose()
    return answer


#: What serves an admitted connection: the stream and the node name its certificate gives
#: (None without TLS); :meth:`marsfs.replication.server.Server.handle`.
Handler = Callable[[trio.abc.Stream, str | None], Awaitable[None]]


class Admission:
    """The node port's front door: the TLS handshake and its bounds (see the module)."""

    def __init__(self, tls: Tls | None, *, clock: Callable[[], float] = trio.current_time) -> None:
        self.tls = tls
        self.handshaking = 0  #: connections in their handshake now
        self.refused = 0  #: connections refused since start (handshake failed, or too many at once)
        self._clock = clock
        self._book = LogBook(clock, LOG_EVERY)  #: one line per host and minute

    async def handle(self, serve: Handler, stream: trio.SocketStream) -> None:
        """Admit ``stream`` (accepted on the node port) and serve it, or close it."""
        if self.tls is None:
            await serve(stream, None)
            return
        where = peer_address(stream)
        if self.handshaking >= MAX_HANDSHAKES:
            self._refuse(where, f"{MAX_HANDSHAKES} connections are in their TLS handshake already")
            await trio.aclose_forcefully(stream)
            return
        self.handshaking += 1
        try:
            secured, name = await server_stream(stream, self.tls)
        except HandshakeFailed as e:
            self._refuse(where, f"TLS handshake failed: {e}")
            return
        finally:
            self.handshaking -= 1
        await serve(secured, name)

    def _refuse(self, where: str, why: str) -> None:
        self.refused += 1
        more = self._book.due(where.rpartition(":")[0] or where)
        if more is not None:
            logger.info("refused a connection from %s: %s%s", where or "an unknown address", why, more)
