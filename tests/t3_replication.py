"""The real Server and Fetcher in one process: trio memory streams for TCP, trio's MockClock for
time, real Volumes in ``tmp_path``.

* An image copy and then fetching leave the mirror's log equal to the primary's (same last
  LSN and chain) and its image equal to the primary's.
* A peer that sends a malformed or out-of-order message gets a protocol error (logged at INFO,
  no traceback: the log check enforces that) and a closed connection; on the fetching side it
  costs a reconnect, never the fetcher.
* A connection that brings nothing for STALL_AFTER seconds is dropped and reconnected; one
  whose frame takes longer than that to arrive, its bytes trickling in, is not.
* A diverged mirror is refused and stops for good.

Worker threads (append, sync, reads) run in real time while the MockClock may jump when every
task waits: ``autojump_threshold`` is small but not zero, so the clock jumps only after the
threads had real time to finish, and every wait in the tests has a virtual-time bound.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import trio
import trio.testing

from marsfs.replication.channel import Channel, ConnectionLost
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Fetch,
    Heartbeat,
    MsgType,
    Records,
    Welcome,
    encode_frame,
    encode_message,
)
from marsfs.replication.server import PeerTable, lag_of
from marsfs.replication.session import BACKOFF_MIN, STALL_AFTER
from marsfs.testing.memnet import CLUSTER, SIZE, Link, copy_image, fetcher, primary, server_for, write
from marsfs.testing.runner import run, wait_for
from marsfs.volume import Volume


def test_image_then_fetch_until_equal(tmp_path: Path) -> None:
    a = primary(tmp_path)
    peers = PeerTable()
    server = server_for(a, peers)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            assert b.head_lsn == a.durable_lsn and b.log.last_chain == a.log.last_chain
            f = fetcher(b, link)
            nursery.start_soon(f.run)
            for seed in range(1, 4):  # writes while fetching: several frames, several heartbeats
                await trio.to_thread.run_sync(write, a, seed, 40)
                await trio.sleep(0.3)
            await wait_for(lambda: b.durable_lsn == a.durable_lsn, "the mirror to catch up")
            await wait_for(lambda: f.state.lag_records == 0 and f.state.primary_durable_lsn == a.durable_lsn,
                           "a heartbeat that says so")
            assert b.log.last_lsn == a.log.last_lsn and b.log.last_chain == a.log.last_chain
            assert f.state.connected and not f.state.error and not f.state.fatal
            assert f.state.heartbeat_basis > 0 and f.state.rate() > 0
            (peer,) = peers.for_volume("vm", a.uuid)
            await wait_for(lambda: peer.fetched_lsn == a.durable_lsn, "the ACK of the last record")
            assert peer.connected and peer.node == "b"
            nursery.cancel_scope.cancel()
        b.replay_limit = None  # replay everything
        assert b.read(0, SIZE) == a.read(0, SIZE)
        b.close()

    try:
        run(main)
    finally:
        a.close()


def _frame(mtype: MsgType, obj: dict[str, object]) -> bytes:
    return encode_frame(mtype, json.dumps(obj).encode())


_HELLO = {"proto": PROTO_VERSION, "cluster": CLUSTER, "node": "b", "volume": "vm", "want": "fetch", "epoch": 0}


@pytest.mark.parametrize("frames, error", [
    ([_frame(MsgType.HELLO, {k: v for k, v in _HELLO.items() if k != "want"})], "HELLO: missing field 'want'"),
    ([_frame(MsgType.HELLO, {**_HELLO, "epoch": True})], "HELLO: field 'epoch' must be an integer"),
    ([_frame(MsgType.FETCH, {"from_lsn": 1, "prev_chain": "00" * 16})], "FETCH is not allowed in state AWAIT_HELLO"),
    ([_frame(MsgType.HELLO, _HELLO), _frame(MsgType.FETCH, {"from_lsn": 1})], "FETCH: missing field 'prev_chain'"),
    ([_frame(MsgType.HELLO, _HELLO), _frame(MsgType.HELLO, _HELLO)], "HELLO is not allowed in state AWAIT_FETCH"),
    ([b"MRSx" + bytes(40)], "bad frame magic"),
])
def test_server_drops_a_peer_that_breaks_the_protocol(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      frames: list[bytes], error: str) -> None:
    a = primary(tmp_path)
    server = server_for(a)

    async def main() -> None:
        client, end = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle, end)
            for frame in frames:
                await client.send_all(frame)
            ch = Channel(client)
            with pytest.raises(ConnectionLost):  # maybe a WELCOME first, then the server hangs up
                while True:
                    await ch.receive()

    with caplog.at_level(logging.INFO, logger="marsfs"):
        try:
            run(main)
        finally:
            a.close()
    ended = [r for r in caplog.records if "ended" in r.getMessage()]
    assert len(ended) == 1 and error in ended[0].getMessage(), [r.getMessage() for r in caplog.records]
    assert ended[0].levelno == logging.INFO and ended[0].exc_info is None


def test_fetcher_survives_a_server_that_breaks_the_protocol(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = primary(tmp_path)
    b = Volume.create_replica(tmp_path / "b" / "vm", "vm", SIZE, a.uuid, a.durable_lsn, a.log.last_chain)

    async def rogue(stream: trio.abc.Stream) -> None:
        ch = Channel(stream)
        await ch.receive_message()
        await ch.send_message(Welcome(node="a", volume="vm", uuid=a.uuid, size=SIZE, epoch=1, head_lsn=0, durable_lsn=0))
        assert isinstance(await ch.receive_message(), Fetch)
        beat = Heartbeat(uuid=a.uuid, head_lsn=1, durable_lsn=1, time=0.0, probe=0, lag_bytes=0, lag_records=0, lag_seconds=0.0)
        await ch.send_raw(_frame(MsgType.HEARTBEAT, {**asdict(beat), "durable_lsn": -1}))
        with pytest.raises(ConnectionLost):  # the fetcher hangs up
            while True:
                await ch.receive()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, rogue)
            f = fetcher(b, link)
            nursery.start_soon(f.run)
            await wait_for(lambda: len(link.opened) >= 3, "reconnects")
            assert not f.state.fatal and "ProtocolError: HEARTBEAT: field 'durable_lsn'" in f.state.error
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="marsfs"):
        try:
            run(main)
        finally:
            a.close()
            b.close()
    assert any("retrying in" in r.getMessage() and r.exc_info is None for r in caplog.records)


def test_stall_drops_and_reconnects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = primary(tmp_path)
    b = Volume.create_replica(tmp_path / "b" / "vm", "vm", SIZE, a.uuid, a.durable_lsn, a.log.last_chain)

    async def silent(stream: trio.abc.Stream) -> None:
        """WELCOME, read the FETCH, then say nothing while reading ACKs."""
        ch = Channel(stream)
        await ch.receive_message()
        await ch.send_message(Welcome(node="a", volume="vm", uuid=a.uuid, size=SIZE, epoch=1, head_lsn=0, durable_lsn=0))
        try:
            while True:
                await ch.receive()
        except ConnectionLost:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, silent)
            f = fetcher(b, link)
            nursery.start_soon(f.run)
            await wait_for(lambda: len(link.opened) >= 3, "two stalls", timeout=3 * STALL_AFTER)
            first, second, third = link.opened[:3]
            # dropped after STALL_AFTER, reconnected after the backoff (doubling: no records came)
            assert second - first == pytest.approx(STALL_AFTER + BACKOFF_MIN, abs=0.1)
            assert third - second == pytest.approx(STALL_AFTER + 2 * BACKOFF_MIN, abs=0.1)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="marsfs"):
        try:
            run(main, autojump=0)  # no worker threads: nothing happens in real time
        finally:
            a.close()
            b.close()
    why = f"fetch of vm from a: no data from a for {STALL_AFTER:.0f} s; retrying in"
    assert sum(why in r.getMessage() for r in caplog.records) >= 2


def test_a_frame_that_trickles_in_longer_than_the_stall_timeout_is_no_stall(tmp_path: Path) -> None:
    """A large RECORDS frame on a slow link: its bytes are progress, the fetch does not drop it."""
    a = primary(tmp_path)
    b = Volume.create_replica(tmp_path / "b" / "vm", "vm", SIZE, a.uuid, a.durable_lsn, a.log.last_chain)
    write(a, 1, 8)
    frame = encode_message(Records(tuple(a.log.read_raw(n) for n in range(b.head_lsn + 1, a.head_lsn + 1))))
    pieces = 6  # one every STALL_AFTER / 2: the whole frame takes 2.5 STALL_AFTER

    async def slow(stream: trio.abc.Stream) -> None:
        ch = Channel(stream)
        await ch.receive_message()
        await ch.send_message(Welcome(node="a", volume="vm", uuid=a.uuid, size=SIZE, epoch=1,
                                      head_lsn=a.head_lsn, durable_lsn=a.durable_lsn))
        for i in range(pieces):
            await trio.sleep(STALL_AFTER / 2)
            await stream.send_all(frame[i * len(frame) // pieces : (i + 1) * len(frame) // pieces])
        try:
            while True:
                await ch.receive()
        except ConnectionLost:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, slow)
            nursery.start_soon(fetcher(b, link).run)
            await wait_for(lambda: b.head_lsn == a.head_lsn, "the trickled records", timeout=4 * STALL_AFTER)
            assert len(link.opened) == 1, "the fetch dropped a connection whose bytes kept coming"
            nursery.cancel_scope.cancel()

    try:
        run(main)  # the fetcher appends in worker threads: the clock waits for them
        assert b.log.last_chain == a.log.last_chain
    finally:
        a.close()
        b.close()


@pytest.mark.allow_log(r"fetch of vm from a stopped: .*diverge")
def test_diverged_mirror_is_refused_and_stops(tmp_path: Path) -> None:
    a = primary(tmp_path)
    server = server_for(a)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, server.handle)
            b = await copy_image(link, tmp_path / "b" / "vm")
            try:
                await trio.to_thread.run_sync(write, b, 50, 1)  # history of its own: split brain
                await trio.to_thread.run_sync(write, a, 60, 3)
                f = fetcher(b, link)
                with trio.fail_after(5):
                    await f.run()  # returns: refused for good
                assert f.state.fatal == "diverged" and "split brain" in f.state.error
                assert len(link.opened) == 2  # the image copy and the one refused fetch
            finally:
                b.close()

    try:
        run(main)
    finally:
        a.close()


def test_lag_of_counts_records_our_log_no_longer_holds(tmp_path: Path) -> None:
    """A mirror behind the first record we hold (or a log that holds none) lags from now."""
    a = primary(tmp_path)
    b = Volume.create_replica(tmp_path / "b" / "vm", "vm", SIZE, a.uuid, a.durable_lsn, a.log.last_chain)
    try:
        assert b.log.first_lsn == b.log.last_lsn + 1  # holds no record
        assert lag_of(b, b.durable_lsn) == (0, 0, 0.0)
        assert lag_of(b, b.durable_lsn - 3) == (0, 3, 0.0)
        _, records, seconds = lag_of(a, 1)
        assert records == a.durable_lsn - 1 and seconds >= 0.0
    finally:
        a.close()
        b.close()
