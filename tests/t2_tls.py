"""Mutual TLS between nodes, in process over loopback TCP: certificates, the handshake matrix,
the node port's front door and the name a certificate lets a node speak as.

What must hold:

* ``cluster init`` makes one CA per directory (a second is refused); ``add-node`` issues a
  certificate naming the node, key 0600; a bad name is refused.
* ``load`` refuses, saying what to do, missing files, a CA of another cluster, another node's
  certificate and a key others can read.
* The node port admits a peer only with a certificate of the cluster's CA, unexpired, over TLS
  1.3; no certificate, another CA, an expired one and TLS 1.2 end in the handshake and never
  reach the server. A connection that does not finish its handshake is closed at the deadline;
  beyond the cap of handshakes at once, new connections are closed at once. Refusals are
  logged once per host and minute.
* A client dialling node X refuses a server whose certificate names another node.
* A HELLO that speaks as another node than its certificate's is refused (``node-identity``).
* A renewed certificate in the TLS directory is loaded by ``refresh`` without a restart; one
  that does not load is logged and the old one kept; expiry shows as a status warning.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import marsfs.node.peers as peers
import marsfs.node.tls as tls
from marsfs.errors import InvalidRequest, StateError
from marsfs.replication.channel import Channel
from marsfs.replication.fetch import hello
from marsfs.replication.protocol import Error
from marsfs.replication.server import PeerTable, Server
from marsfs.testing.certs import client_context, forged
from marsfs.testing.runner import run


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    tls.init_ca(tmp_path / "ca", "marsfs")
    return tmp_path / "ca"


def issued(ca: Path, name: str, **kw: int) -> tls.Tls:
    out = ca.parent / name
    tls.add_node(ca, name, out, **kw)
    return tls.load(out, name, "marsfs")


def test_certificates_are_made_and_checked(tmp_path: Path, ca: Path) -> None:
    with pytest.raises(InvalidRequest, match="holds a CA already"):
        tls.init_ca(ca, "marsfs")
    t = issued(ca, "node1")
    assert stat.S_IMODE(os.stat(t.dir / tls.NODE_KEY).st_mode) == 0o600
    assert 824 < t.days_left() <= 825 and t.warning() is None
    assert t.status()["mode"] == "mutual-tls"
    with pytest.raises(InvalidRequest, match="invalid node name"):  # exit 1, as create's bad volume name
        tls.add_node(ca, "../x", tmp_path / "x")
    with pytest.raises(InvalidRequest, match="does not exist"):
        tls.add_node(tmp_path / "nowhere", "node1", tmp_path / "x")

    with pytest.raises(StateError, match=r"missing ca\.crt, node\.crt, node\.key.*add-node node9"):
        tls.load(tmp_path / "empty", "node9", "marsfs")
    with pytest.raises(StateError, match="CA of cluster 'marsfs'.*--cluster marsfs"):
        tls.load(t.dir, "node1", "other")
    with pytest.raises(StateError, match="certificate of node 'node1', not of 'node2'"):
        tls.load(t.dir, "node2", "marsfs")
    os.chmod(t.dir / tls.NODE_KEY, 0o644)
    with pytest.raises(StateError, match="chmod 600"):
        tls.load(t.dir, "node1", "marsfs")






Served = list[str | None]


async def front_door(t: tls.Tls, served: Served, nursery: trio.Nursery) -> tuple[peers.Admission, int]:
    """A node port: the Admission before a server that records who it got and echoes a line."""
    door = peers.Admission(t)

    async def serve(stream: trio.abc.Stream, name: str | None) -> None:
        served.append(name)
        await stream.send_all(b"welcome " + (name or "").encode())
        await stream.aclose()

    async def handle(stream: trio.SocketStream) -> None:
        await door.handle(serve, stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    return door, listeners[0].socket.getsockname()[1]


async def attempt(port: int, ctx: ssl.SSLContext) -> bytes:
    """Connect with ``ctx``; what the server said, or b"" if the connection was refused."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="node1")
    try:
        with trio.fail_after(20):
            await stream.do_handshake()
            data = b""
            while chunk := await stream.receive_some(100):
                data += chunk
            return data
    except (trio.BrokenResourceError, ssl.SSLError):
        return b""
    finally:
        await trio.aclose_forcefully(stream)


def in_trio(fn: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await fn(nursery)
            nursery.cancel_scope.cancel()

    run(main, autojump=0.02)  # real sockets: 20 ms of idleness, time for a local round trip, before a jump


def test_only_a_valid_certificate_of_the_cluster_ca_passes_the_handshake(tmp_path: Path, ca: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    server = issued(ca, "node1")
    issued(ca, "node2")
    good = (ca.parent / "node2" / tls.NODE_CERT, ca.parent / "node2" / tls.NODE_KEY)
    served: Served = []
    caplog.set_level(logging.INFO, logger="marsfs.node.peers")

    async def cases(nursery: trio.Nursery) -> None:
        door, port = await front_door(server, served, nursery)
        assert await attempt(port, client_context(ca, good)) == b"welcome node2"
        assert await attempt(port, client_context(ca, None)) == b""
        assert await attempt(port, client_context(ca, forged(tmp_path / "other", "node2"))) == b""
        assert await attempt(port, client_context(ca, forged(tmp_path / "old", "node2", ca=ca,
                                                                   expired=True))) == b""
        assert await attempt(port, client_context(ca, good, tls12=True)) == b""
        assert door.refused == 4 and door.handshaking == 0

    in_trio(cases)
    assert served == ["node2"]
    lines = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(lines) == 1 and "TLS handshake failed" in lines[0], lines  # once per host and minute
    assert "Traceback" not in caplog.text


def test_a_silent_connection_is_closed_at_the_deadline_and_a_flood_at_the_cap(
        ca: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls, "HANDSHAKE_TIMEOUT", 0.5)
    monkeypatch.setattr(peers, "MAX_HANDSHAKES", 3)
    server = issued(ca, "node1")
    served: Served = []

    async def cases(nursery: trio.Nursery) -> None:
        door, port = await front_door(server, served, nursery)
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert door.handshaking == 3
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):  # closed at once, long before the deadline
            assert await extra.receive_some(10) == b""
        with trio.fail_after(10):  # the deadline closes the silent ones
            for s in silent:
                try:
                    assert await s.receive_some(10) == b""
                except trio.BrokenResourceError:
                    pass
        assert door.handshaking == 0 and door.refused == 4
        for s in [*silent, extra]:
            await s.aclose()

    in_trio(cases)
    assert served == []


def test_a_client_refuses_a_server_that_is_another_node(ca: Path) -> None:
    server, client = issued(ca, "node1"), issued(ca, "node2")

    async def cases(nursery: trio.Nursery) -> None:
        _, port = await front_door(server, [], nursery)
        ok = await tls.client_stream(await trio.open_tcp_stream("127.0.0.1", port), client, "node1")
        assert tls.certified_name(ok) == "node1"
        await ok.aclose()
        with pytest.raises(tls.HandshakeFailed, match="presents the certificate of 'node1', not of node3"):
            await tls.client_stream(await trio.open_tcp_stream("127.0.0.1", port), client, "node3")

    in_trio(cases)


def test_a_hello_speaks_only_as_the_certificate_s_node() -> None:
    server = Server("node1", "marsfs", lambda name: None, lambda name: 0, PeerTable())

    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, b, "node2")
            ch = Channel(a)
            await ch.send_message(hello("node3", "marsfs", "vm1", "meta"))
            answer = await ch.receive_message()
            assert isinstance(answer, Error) and answer.code == "node-identity", answer
            assert "certificate is node node2's" in answer.error

    run(main)


@pytest.mark.allow_log("a new certificate in")
def test_a_renewed_certificate_is_loaded_without_a_restart(ca: Path) -> None:
    t = issued(ca, "node1", days=10)
    warning = t.warning()
    assert warning is not None and "expires at" in warning and "add-node node1" in warning
    assert not t.refresh()  # nothing changed
    tls.add_node(ca, "node1", t.dir)  # the renewal, into the running node's directory
    os.utime(t.dir / tls.NODE_CERT, ns=(t.loaded + 1, t.loaded + 1))  # a new mtime even within one tick
    assert t.refresh() and t.days_left() > 800 and t.warning() is None
    tls.add_node(ca, "node2", t.dir)  # another node's pair: refused, the old one kept
    before = t.not_after
    assert not t.refresh() and t.not_after == before
    past = t.not_after - datetime.timedelta(days=900)
    assert "expired at" in (t.warning(past + datetime.timedelta(days=1000)) or "")
