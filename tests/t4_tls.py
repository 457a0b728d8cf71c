"""The node port as an outsider, an impostor and a buggy peer see it: a live two-node cluster
over mutual TLS keeps replicating while a client that speaks our protocol attacks the primary.

What must hold, for each case of the matrix (no client certificate, another CA's, an expired
one, TLS 1.2 only, plain TCP with a HELLO, one byte per second, bytes replayed from a captured
session, 500 idle connections, a valid certificate of a node in no peer list, a valid
certificate whose HELLO speaks as another node, a peer's own certificate with the wrong
cluster or volume, the mirror's own certificate asking for a handover at a wrong epoch, and a
valid certificate of a peer that is no member of the volume asking for its log, image, sums,
a handover, a comparison, its position or to leave it):

* it is refused (an ERROR with the reason) or closed, within the deadlines (10 s for the
  handshake and for the HELLO);
* the mirror stays a synced mirror of the primary, its connection is not replaced, and
  replication goes on (a write made after the attacks reaches it);
* the primary's writes (a writer fsyncing all along) see no error; their slowest fsync is
  printed (``-s``), not asserted: timing is the benchmark's business.
* ``status`` says the node talks mutual TLS and when its certificate expires; a node started
  ``--insecure`` is said to be so, loudly, on every row and in its log.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from pathlib import Path

import pytest
import trio

import marsfs.node.tls as tls
from marsfs.replication.channel import Channel, ConnectionLost
from marsfs.replication.fetch import hello
from marsfs.replication.protocol import Error, Fetch, HandoverPrepare, Want, Welcome, encode_message
from marsfs.testing.certs import client_context, forged
from marsfs.testing.checks import status, wait_synced, write_synced
from marsfs.testing.harness import Harness, NodeProcess, free_port
from marsfs.testing.memnet import PassStream

MiB = 1 << 20


class Writer(threading.Thread):
    """fsynced writes into the primary's image until stopped: errors and the slowest one."""

    def __init__(self, image: Path) -> None:
        super().__init__(daemon=True)
        self.image = image
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.slowest = 0.0
        self.writes = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            start = time.monotonic()
            try:
                write_synced(self.image, (self.writes % 64) * 65536, os.urandom(65536))
            except OSError as e:
                self.errors.append(str(e))
            self.slowest = max(self.slowest, time.monotonic() - start)
            self.writes += 1
            time.sleep(0.02)






class Recording(PassStream):
    """A TCP stream that keeps what was sent through it (the capture of a session)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.sent = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)


async def until_closed(stream: trio.abc.Stream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except (trio.BrokenResourceError, ssl.SSLError, OSError):
        pass
    return data


async def over_tls(port: int, ctx: ssl.SSLContext, frames: list[bytes]) -> str:
    """Handshake with ``ctx``, send ``frames``: the ERROR code answered (after a WELCOME, if one
    came), the first other message's type, or "closed"."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="node1")
    try:
        await stream.do_handshake()
        ch = Channel(stream)
        for frame in frames:
            await stream.send_all(frame)
        answer = await ch.receive_message()
        if isinstance(answer, Welcome):
            answer = await ch.receive_message()
        return answer.code if isinstance(answer, Error) else type(answer).__name__
    except (trio.BrokenResourceError, ssl.SSLError, ConnectionLost, OSError):
        return "closed"
    finally:
        await trio.aclose_forcefully(stream)


async def raw(port: int, data: bytes, *, per_second: bool = False) -> str:
    """Send ``data`` over plain TCP (a byte a second, if asked): "closed" once the node hangs up."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            async def trickle() -> None:
                for i in range(len(data)):
                    try:
                        await stream.send_all(data[i:i + 1] if per_second else data[i:])
                    except (trio.BrokenResourceError, OSError):
                        return
                    if not per_second:
                        return
                    await trio.sleep(1)

            nursery.start_soon(trickle)
            await until_closed(stream)
            nursery.cancel_scope.cancel()
        return "closed"
    finally:
        await trio.aclose_forcefully(stream)


def test_the_node_port_refuses_strangers_impostors_and_buggy_peers_while_replication_goes_on(
        harness: Harness) -> None:
    # node3 is a peer of both (its certificate is the cluster's), but it never runs: the attacker
    # that holds its certificate is a node of the cluster that is no member of vm1
    nodes = harness.cluster(["node1", "node2", "node3"], start=False)
    node1, node2, node3 = nodes["node1"], nodes["node2"], nodes["node3"]
    node1.start()
    node2.start()
    node3.issue_certificate()
    node1.cli("create", "vm1", "--size", "16M")
    write_synced(node1.image("vm1"), 0, os.urandom(MiB))
    node2.cli("join", "vm1", "--from", "node1")
    wait_synced(node2, "vm1")
    row = status(node1, "vm1")
    assert row["tls"]["mode"] == "mutual-tls" and row["tls"]["certificate_days_left"] > 800, row["tls"]
    assert not [w for w in row["warnings"] if "TLS" in w or "insecure" in w], row["warnings"]

    ca = harness.root / "ca-marsfs"
    port = harness.ports["node1"]
    node2_pair = (node2.state / "tls" / tls.NODE_CERT, node2.state / "tls" / tls.NODE_KEY)
    node2_id = (node2.state / "node-id").read_text().strip()
    node4 = harness.root / "node4-tls"
    tls.add_node(ca, "node4", node4)  # a valid certificate of the cluster: of a node no peer list has
    node4_pair = (node4 / tls.NODE_CERT, node4 / tls.NODE_KEY)
    node3_pair = (node3.state / "tls" / tls.NODE_CERT, node3.state / "tls" / tls.NODE_KEY)
    as_node2 = encode_message(hello("node2", "marsfs", "vm1", "meta", node_id=node2_id))
    seize = encode_message(hello("node2", "marsfs", "vm1", "meta", node_id="0" * 32))

    wants: tuple[Want, ...] = ("fetch", "sync", "sums", "handover", "compare", "position", "leave")

    writer = Writer(node1.image("vm1"))
    writer.start()
    outcomes: dict[str, tuple[str, float]] = {}

    async def attacks() -> None:
        async def case(name: str, attack: object) -> None:
            start = time.monotonic()
            with trio.fail_after(40):  # a hang guard: the node's deadlines are 10 s
                outcomes[name] = (await attack, time.monotonic() - start)  # type: ignore[misc]

        await case("no client certificate", over_tls(port, client_context(ca), [as_node2]))
        await case("another CA", over_tls(port, client_context(ca, forged(harness.root / "x", "node2")),
                                          [as_node2]))
        await case("expired", over_tls(port, client_context(ca, forged(harness.root / "y", "node2", ca=ca,
                                                                   expired=True)), [as_node2]))
        await case("TLS 1.2 only", over_tls(port, client_context(ca, node2_pair, tls12=True), [as_node2]))
        await case("plain TCP HELLO", raw(port, as_node2))
        await case("node in no peer list", over_tls(port, client_context(ca, node4_pair),
                                                    [encode_message(hello("node4", "marsfs", "vm1", "fetch"))]))
        await case("HELLO as another node", over_tls(port, client_context(ca, node4_pair), [seize]))
        for want in wants:  # node3's own certificate, but node3 never joined vm1
            await case(f"no member: {want}", over_tls(port, client_context(ca, node3_pair), [
                encode_message(hello("node3", "marsfs", "vm1", want, 1)),
                encode_message(Fetch(from_lsn=1, prev_chain=bytes(16)))]))
        for epoch in (0, 7):  # the mirror itself, at an epoch that is not the volume's
            await case(f"handover at epoch {epoch}", over_tls(port, client_context(ca, node2_pair), [
                encode_message(hello("node2", "marsfs", "vm1", "handover", epoch, node_id=node2_id)),
                encode_message(HandoverPrepare(epoch=epoch, timeout=600.0))]))
        await case("wrong cluster", over_tls(port, client_context(ca, node2_pair), [encode_message(
            hello("node2", "other", "vm1", "meta", node_id=node2_id))]))
        await case("wrong volume", over_tls(port, client_context(ca, node2_pair), [encode_message(
            hello("node2", "marsfs", "nope", "fetch", node_id=node2_id))]))
        await case("TLS, then no HELLO", over_tls(port, client_context(ca, node2_pair), []))

        # a captured session, replayed: the bytes a real client sent, on a new connection
        recording = Recording(await trio.open_tcp_stream("127.0.0.1", port))
        captured = trio.SSLStream(recording, client_context(ca, node2_pair), server_hostname="node1")
        await captured.do_handshake()
        await captured.send_all(encode_message(hello("node2", "marsfs", "nope", "fetch", node_id=node2_id)))
        await until_closed(captured)
        await case("replayed session", raw(port, bytes(recording.sent)))

        await case("1 byte per second", raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4,
                                            per_second=True))

        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(500)]
        start = time.monotonic()
        with trio.fail_after(40):
            for s in idle:
                await until_closed(s)
        outcomes["500 idle connections"] = ("closed", time.monotonic() - start)
        for s in idle:
            await trio.aclose_forcefully(s)

    try:
        trio.run(attacks)
        write_synced(node1.image("vm1"), 4 * MiB, b"after the attacks" * 100)
    finally:
        writer.stopping.set()
        writer.join()
    print("\n".join(f"{name}: {what} after {took:.1f} s" for name, (what, took) in outcomes.items()))
    print(f"writer: {writer.writes} fsynced writes, slowest {writer.slowest:.3f} s, errors {writer.errors}")

    assert outcomes.pop("node in no peer list")[0] == "unknown-node"
    for want in wants:
        assert outcomes.pop(f"no member: {want}")[0] == "not-a-member", want
    assert outcomes.pop("handover at epoch 0")[0] == outcomes.pop("handover at epoch 7")[0] == "epoch"
    assert outcomes.pop("HELLO as another node")[0] == "node-identity"
    assert outcomes.pop("wrong cluster")[0] == "cluster"
    assert outcomes.pop("wrong volume")[0] == "unknown-volume"
    assert {what for what, _ in outcomes.values()} == {"closed"}, outcomes
    assert writer.errors == [] and writer.writes > 0

    wait_synced(node2, "vm1")
    [peer] = status(node1, "vm1")["peers"]
    assert peer["node"] == "node2" and peer["connected"] and peer["state"] == "synced", peer
    mirror = status(node2, "vm1")
    assert mirror["role"] == "mirror" and mirror["state"] == "synced", mirror
    assert status(node1, "vm1")["role"] == "primary"
    with open(node2.image("vm1"), "rb") as f:
        f.seek(4 * MiB)
        assert f.read(1700) == b"after the attacks" * 100
    log = node1.logfile.read_text()
    assert "refused a connection from" in log and "Traceback" not in log
    assert log.count("refused node node3 for volume vm1: node node3 is not a member") == 1, log
    assert "fenced for a handover" not in log


def test_without_certificates_serve_refuses_and_insecure_is_said_loudly(harness: Harness) -> None:
    bare = NodeProcess(harness.root, "lone", extra=["--listen", "127.0.0.1:1", "--peer", "other=127.0.0.1:2"],
                       certificates=False)
    harness.nodes.append(bare)
    with pytest.raises(RuntimeError, match=r"no TLS certificates for node lone .*cluster add-node lone"):
        bare.start()
    assert not (bare.state / "volumes").exists(), "refused before the state directory was touched"

    open_node = harness.node("open", extra=["--listen", f"127.0.0.1:{free_port()}", "--peer", "other=127.0.0.1:2", "--insecure"])
    open_node.cli("create", "vm1", "--size", "16M", "--thin")
    row = status(open_node, "vm1")
    assert row["tls"] == {"mode": "insecure"}
    assert any("runs --insecure" in w for w in row["warnings"]), row["warnings"]
    assert "runs --insecure" in open_node.cli("status").stdout
    assert "runs --insecure: plain TCP to its peers" in open_node.logfile.read_text()
