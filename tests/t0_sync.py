"""Fast sync on the wire (protocol 3): the SYNC_* messages and both sessions, in memory.

* Every SYNC_* message survives the codec; its fields are checked like every other message's
  (ranges: pairs of integers; sums: whole 8-byte sums at a block-aligned offset).
* A whole conversation between the sessions brings an image with a few differing blocks to
  the source's, sending only those blocks; only given ranges are compared when the source
  knows what changed since the mirror's LSN (and the mirror's own ranges are added).
* Out-of-order and out-of-range messages on both sides are ProtocolErrors that close the
  session: sums at the wrong offset, data for blocks whose sums were not sent, an early end.
* The rate limit and the progress/ETA arithmetic.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from marsfs.errors import MarsError, ProtocolError, UsageError
from marsfs.faces.commands import follow_sync, progress_line
from marsfs.faces.config import load_config
from marsfs.replication.protocol import (
    Ack,
    MsgType,
    SyncData,
    SyncEnd,
    SyncInfo,
    SyncProgress,
    SyncRequest,
    SyncSums,
    encode_frame,
    encode_message,
)
from marsfs.replication.session import (
    SUMS_AHEAD,
    SUMS_BLOCKS,
    FetchPhase,
    Pace,
    ServePhase,
    SyncStatus,
    check_sync_ranges,
    combined_rate,
    sync_ranges,
)
from marsfs.testing.sansio import CHAIN, Pair, chain, volume
from marsfs.testing.wire import decode_frame
from marsfs.volume.blocksums import BLOCK, block_sums

SYNC_SAMPLES = [
    SyncRequest(since_lsn=5, since_chain=CHAIN),
    SyncRequest(since_lsn=0, since_chain=CHAIN, whole=True, ranges=((0, 4096), (1 << 20, 8192)), rate=50 << 20),
    SyncInfo(lsn=9, chain=CHAIN, size=1 << 30, uuid="u-1", ranges=((0, 1 << 30),)),
    SyncSums(offset=1 << 20, sums=b"12345678" * 3),
    SyncData(offset=8192, data=b"y" * 5000),
    SyncProgress(compared=1 << 22, sent=4096),
    SyncEnd(lsn=9),
]


@pytest.mark.parametrize("msg", SYNC_SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode_frame(encode_message(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [[[0]], [[0, 0]], [[-1, 5]], [[0, True]], [["0", 5]], "0,5", [[0, 5, 6]], None])
def test_ranges_are_checked(value: object) -> None:
    obj = {"since_lsn": 1, "since_chain": CHAIN.hex(), "ranges": value}
    with pytest.raises(ProtocolError, match="^SYNC_REQUEST: field 'ranges' "):
        decode_frame(encode_frame(MsgType.SYNC_REQUEST, json.dumps(obj).encode()))


def test_binary_sync_frames_are_checked() -> None:
    with pytest.raises(ProtocolError, match="SYNC_SUMS: frame without offset"):
        decode_frame(encode_frame(MsgType.SYNC_SUMS, b"1234"))
    with pytest.raises(ProtocolError, match="not a multiple of 8"):
        decode_frame(encode_frame(MsgType.SYNC_SUMS, bytes(8) + b"123"))
    with pytest.raises(ProtocolError, match="SYNC_DATA: field 'offset' 100 is not a multiple of 4096"):
        decode_frame(encode_frame(MsgType.SYNC_DATA, (100).to_bytes(8, "little") + b"x"))


def test_sync_ranges_are_block_aligned_merged_and_clipped() -> None:
    size = 10 * BLOCK + 100
    assert sync_ranges([(5000, 10), (0, 1), (4096, 1), (9 * BLOCK, 10 * BLOCK), (size + 5, 3)], size) == (
        (0, 2 * BLOCK), (9 * BLOCK, size - 9 * BLOCK))
    assert sync_ranges([], size) == ()
    assert check_sync_ranges(((0, BLOCK), (2 * BLOCK, size - 2 * BLOCK)), size) is None
    assert "not after" in str(check_sync_ranges(((BLOCK, BLOCK), (0, BLOCK)), size))
    assert "aligned" in str(check_sync_ranges(((1, BLOCK),), size))
    assert "past the image" in str(check_sync_ranges(((0, size + 1),), size))


# ---------------------------------------------------------------------------- conversations


class Images:
    """A source image and a mirror image as bytes, the sessions' volumes as fakes."""

    def __init__(self, size: int, differ: list[int], seed: int = 1) -> None:
        rng = random.Random(seed)
        self.size = size
        self.source = bytearray(rng.randbytes(size))
        self.mirror = bytearray(self.source)
        for b in differ:
            self.mirror[b * BLOCK : b * BLOCK + 10] = b"\xff" * 10


def converse(pair: Pair, img: Images, req: SyncRequest, changed: list[tuple[int, int]] | None) -> tuple[SyncInfo, int]:
    """Run a sync between the sessions (sums sent as the window allows); returns the SYNC_INFO
    and the data bytes that went over."""
    assert pair.connect() is not None
    got = pair.to_server(pair.client.sync_request(req))
    # tuples: an `is` would narrow the phases for mypy past the calls below that move them
    assert (got, pair.server.phase) == (req, ServePhase.PLANNING_SYNC)
    info = pair.plan_sync(changed, 30)
    assert (pair.to_client(info), pair.client.phase) == (info, FetchPhase.SYNCING)
    sent = 0
    while (chunk := pair.client.next_sums()) is not None:
        assert pair.client.sums_window_open
        off, n = chunk
        sums = pair.client.sums(off, block_sums(lambda o, k: bytes(img.mirror[o : o + k]), off, n))
        job = pair.to_server(sums)
        for msg in pair.server.compare(job, bytes(img.source[off : off + n])):  # type: ignore[arg-type]
            assert pair.to_client(msg) == msg
            if isinstance(msg, SyncData):
                img.mirror[msg.offset : msg.offset + len(msg.data)] = msg.data
                sent += len(msg.data)
    assert pair.server.sync_complete
    end = pair.server.end_sync()
    assert pair.to_client(end) == end and pair.client.phase is FetchPhase.SYNC_END
    ack = pair.client.sync_done(info.lsn)
    assert pair.to_server(ack) == ack and pair.server.phase is ServePhase.DONE
    assert ack == Ack(fetched_lsn=info.lsn, replayed_lsn=info.lsn)
    return info, sent


def sync_pair(size: int) -> Pair:
    served = volume(1, 30)
    served.size = size
    return Pair(served, volume(1, 10), want="sync")


def test_a_whole_image_sync_sends_only_the_differing_blocks() -> None:
    size = 3 * SUMS_BLOCKS * BLOCK + 1000  # several sums chunks and a short last block
    img = Images(size, differ=[0, 5, 6, SUMS_BLOCKS, 3 * SUMS_BLOCKS])
    pair = sync_pair(size)
    info, sent = converse(pair, img, SyncRequest(since_lsn=10, since_chain=chain("h", 10), whole=True), None)
    assert info.ranges == ((0, size),) and (info.lsn, info.chain, info.uuid) == (30, chain("h", 30), "u-1")
    assert img.mirror == img.source
    assert sent == 4 * BLOCK + 1000  # four whole blocks and the short last one
    assert pair.client.received == sent and pair.server.sync_sent == sent and pair.client.compared == size


def test_only_changed_ranges_are_compared_and_the_mirror_adds_its_own() -> None:
    size = 64 * BLOCK
    img = Images(size, differ=[3, 20, 40])
    pair = sync_pair(size)
    req = SyncRequest(since_lsn=10, since_chain=chain("h", 10), ranges=((40 * BLOCK + 7, 1),))
    pair.connect()
    pair.to_server(pair.client.sync_request(req))
    assert pair.since_known()
    pair2 = sync_pair(size)
    info, sent = converse(pair2, img, req, [(3 * BLOCK + 100, 50)])
    assert info.ranges == ((3 * BLOCK, BLOCK), (40 * BLOCK, BLOCK))
    assert sent == 2 * BLOCK and img.mirror[20 * BLOCK] != img.source[20 * BLOCK]  # block 20 was not compared


@pytest.mark.parametrize("req, known", [
    (SyncRequest(since_lsn=10, since_chain=chain("h", 10)), True),
    (SyncRequest(since_lsn=10, since_chain=chain("other", 10)), False),  # another history
    (SyncRequest(since_lsn=10, since_chain=chain("h", 10), whole=True), False),
    (SyncRequest(since_lsn=31, since_chain=chain("h", 31)), False),  # beyond our log
    (SyncRequest(since_lsn=3, since_chain=chain("h", 3)), False),  # before our log
])
def test_since_is_known_only_when_our_log_holds_it_with_the_same_chain(req: SyncRequest, known: bool) -> None:
    served = volume(5, 30)
    pair = Pair(served, volume(1, 10), want="sync")
    pair.connect()
    pair.to_server(pair.client.sync_request(req))
    assert pair.since_known() is known


def test_nothing_to_compare_ends_at_once() -> None:
    img = Images(8 * BLOCK, differ=[])
    info, sent = converse(sync_pair(8 * BLOCK), img, SyncRequest(since_lsn=30, since_chain=chain("h", 30)), [])
    assert info.ranges == () and sent == 0


def test_the_sums_window() -> None:
    size = 2 * SUMS_AHEAD
    pair = sync_pair(size)
    pair.connect()
    pair.to_server(pair.client.sync_request(SyncRequest(since_lsn=0, since_chain=CHAIN, whole=True)))
    pair.to_client(pair.plan_sync(None, 30))
    n = 0
    while pair.client.sums_window_open:
        chunk = pair.client.next_sums()
        assert chunk is not None
        pair.to_server(pair.client.sums(chunk[0], bytes(8 * SUMS_BLOCKS)))
        n += chunk[1]
    assert n == SUMS_AHEAD and pair.client.awaiting_source
    pair.to_client(SyncProgress(compared=SUMS_BLOCKS * BLOCK, sent=0))
    assert pair.client.sums_window_open


# ---------------------------------------------------------------------------- what is refused


def started(size: int = 16 * BLOCK) -> Pair:
    pair = sync_pair(size)
    pair.connect()
    pair.to_server(pair.client.sync_request(SyncRequest(since_lsn=0, since_chain=CHAIN, whole=True)))
    pair.to_client(pair.plan_sync(None, 30))
    return pair


def test_server_refuses_sums_out_of_order() -> None:
    pair = started()
    with pytest.raises(ProtocolError, match="SYNC_SUMS: field 'offset' is 4096, not the next block"):
        pair.to_server(SyncSums(BLOCK, bytes(8)))
    assert pair.server.phase is ServePhase.CLOSED
    pair = started()
    with pytest.raises(ProtocolError, match="do not fit the range"):
        pair.to_server(SyncSums(0, bytes(8 * 17)))
    pair = started()
    pair.to_server(pair.client.sums(0, bytes(8 * 16)))
    with pytest.raises(ProtocolError, match="after every range was covered"):
        pair.to_server(SyncSums(16 * BLOCK, bytes(8)))


def test_server_refuses_sums_before_the_request() -> None:
    pair = sync_pair(16 * BLOCK)
    pair.connect()
    with pytest.raises(ProtocolError, match="SYNC_SUMS is not allowed in state AWAIT_SYNC_REQUEST"):
        pair.to_server(SyncSums(0, bytes(8)))


def test_client_refuses_what_does_not_fit_the_sync() -> None:
    pair = started()
    with pytest.raises(ProtocolError, match="SYNC_DATA: field 'offset' 0"):  # no sums sent yet
        pair.to_client(SyncData(0, b"x" * BLOCK))
    assert pair.client.phase is FetchPhase.CLOSED
    pair = started()
    pair.client.sums(0, bytes(8 * 2))
    pair.to_client(SyncData(BLOCK, b"x" * BLOCK))
    with pytest.raises(ProtocolError, match="SYNC_DATA"):  # past the sums sent
        pair.to_client(SyncData(BLOCK, b"x" * 2 * BLOCK))
    pair = started()
    pair.client.sums(0, bytes(8 * 2))
    with pytest.raises(ProtocolError, match="SYNC_PROGRESS: field 'compared' 12288"):
        pair.to_client(SyncProgress(compared=3 * BLOCK, sent=0))
    pair = started()
    with pytest.raises(ProtocolError, match="SYNC_END: at LSN 30 after 0 of 65536"):
        pair.to_client(SyncEnd(lsn=30))


def test_client_refuses_a_bad_sync_info() -> None:
    pair = sync_pair(16 * BLOCK)
    pair.connect()
    pair.to_server(pair.client.sync_request(SyncRequest(since_lsn=0, since_chain=CHAIN)))
    with pytest.raises(ProtocolError, match="SYNC_INFO: field 'ranges': range .* past the image"):
        pair.to_client(SyncInfo(lsn=3, chain=CHAIN, size=BLOCK, uuid="u-1", ranges=((0, 2 * BLOCK),)))
    pair = sync_pair(16 * BLOCK)
    pair.connect()
    pair.to_server(pair.client.sync_request(SyncRequest(since_lsn=0, since_chain=CHAIN)))
    with pytest.raises(ProtocolError, match="SYNC_INFO: field 'uuid'"):
        pair.to_client(SyncInfo(lsn=3, chain=CHAIN, size=BLOCK, uuid="other", ranges=()))


def test_sync_info_before_the_request_is_refused() -> None:
    pair = sync_pair(16 * BLOCK)
    pair.connect()
    with pytest.raises(ProtocolError, match="SYNC_INFO is not allowed in state WELCOMED"):
        pair.to_client(SyncInfo(lsn=3, chain=CHAIN, size=BLOCK, uuid="u-1", ranges=()))


# ---------------------------------------------------------------------------- pace and progress


def test_pace_keeps_to_the_rate_after_a_short_burst() -> None:
    pace = Pace(1000)
    now, waited = 0.0, 0.0
    for _ in range(20):
        d = pace.delay(now, 500)
        waited += d
        now += d
    assert 9.8 <= now <= 10.0  # 10 000 bytes at 1000 B/s, less the 0.1 s burst
    assert Pace(0).delay(0.0, 10**9) == 0.0
    assert combined_rate(0, 0) == 0 and combined_rate(0, 5, 3) == 3


def test_sync_status_rate_and_eta() -> None:
    st = SyncStatus(started=0.0, total=1000)
    assert st.eta() is None and st.fraction == 0.0
    st.update(1.0, 100, 10)
    st.update(2.0, 300, 20)
    assert st.rate() == 200.0 and st.eta() == 3.5 and st.fraction == 0.3
    st.update(3.0, 1000, 30)
    assert st.eta() == 0.0


# ---------------------------------------------------------------------------- serve --sync-rate, progress


def test_sync_rate_from_flags_and_config(tmp_path: Path) -> None:
    base = {"node": "n1", "state": "/s", "mount": "/m"}
    assert load_config(None, base).sync_rate == 0
    assert load_config(None, {**base, "sync_rate": "50M"}).sync_rate == 50 << 20
    conf = tmp_path / "c.toml"
    conf.write_text('sync-rate = "1G"\n')
    assert load_config(conf, base).sync_rate == 1 << 30
    assert load_config(conf, {**base, "sync_rate": "2M"}).sync_rate == 2 << 20  # flags win
    with pytest.raises(UsageError, match="--sync-rate: cannot read size 'fast'"):
        load_config(None, {**base, "sync_rate": "fast"})


def test_progress_lines_until_the_sync_is_done() -> None:
    row = {"volume": "v", "state": "resyncing", "durable_lsn": 9, "errors": [], "sync_bytes": 2 << 30,
           "progress": 0.25, "sync_received_bytes": 3 << 20, "fetch_rate": 100 << 20, "eta_seconds": 15.4}
    assert progress_line(row) == ("v: resyncing  25.0% of 2.0 GiB compared, 3.0 MiB received, 100.0 MiB/s, "
                                  "ETA 15 s")
    assert "waiting for the source" in progress_line({**row, "sync_bytes": 0})
    rows = [row, {**row, "progress": 0.5}, {**row, "state": "catching-up"}]
    out = io.StringIO()
    last = follow_sync("v", lambda cmd, args: [rows.pop(0)], out=out, every=0.0)
    assert last["state"] == "catching-up" and rows == []
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "25.0%" in lines[0] and "50.0%" in lines[1]
    assert lines[2] == "v: synced to LSN 9; now catching-up"
    with pytest.raises(MarsError, match="v: the sync stopped: state failed; boom"):
        follow_sync("v", lambda cmd, args: [{**row, "state": "failed", "errors": ["boom"]}], out=io.StringIO())


def test_the_last_line_of_a_sync_is_not_a_momentary_disconnect() -> None:
    """Right after the switch the fetch of the log reconnects: ``join --wait`` reports the state
    that follows, and never "now disconnected" for that moment."""
    row = {"volume": "v", "state": "syncing", "durable_lsn": 9, "errors": [], "sync_bytes": 0, "source": "n1"}
    rows = [row, {**row, "state": "disconnected"}, {**row, "state": "disconnected"}, {**row, "state": "synced"}]
    out = io.StringIO()
    assert follow_sync("v", lambda cmd, args: [rows.pop(0)], out=out, every=0.0)["state"] == "synced"
    assert out.getvalue().splitlines()[-1] == "v: synced to LSN 9; now synced" and rows == []
    rows = [row, {**row, "state": "disconnected"}]  # still reconnecting when the wait is over
    out = io.StringIO()
    follow_sync("v", lambda cmd, args: [rows.pop(0) if len(rows) > 1 else rows[0]], out=out, every=0.0, settle=0.0)
    last = out.getvalue().splitlines()[-1]
    assert last == "v: synced to LSN 9; now reconnecting to n1 to fetch the log (see: marsfs status v)"


def test_a_rate_of_0_is_refused_not_read_as_unlimited() -> None:
    """``--sync-rate 0`` (and ``sync-rate = 0``) is a usage mistake like ``join --rate 0``:
    leaving the option out is how to say "no limit"."""
    base = {"node": "n1", "state": "/s", "mount": "/m"}
    for zero in ("0", 0, "0M"):
        with pytest.raises(UsageError, match=r"--sync-rate .*above 0.*leave it out for no limit"):
            load_config(None, {**base, "sync_rate": zero})
