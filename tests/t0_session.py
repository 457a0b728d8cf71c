"""The replication sessions (marsfs.replication.session) driven against each other in memory.

Like h11's ConnectionPair (:mod:`marsfs.testing.sansio`): each side's output goes through the
wire codec into the other side; volumes are small fakes whose facts the pair passes in as
values, as the I/O shells do; time is a number passed in.

* A full fetch conversation; leave.
* Every refusal: unknown volume, cluster, protocol, diverged by chain, diverged beyond the
  log, log-trimmed; and the one table of what each refusal code means (:data:`REFUSALS`):
  which stop fetching and which state each puts a mirror in.
* Every out-of-order message on both sides is a ProtocolError and closes the session.
* Slow start, heartbeat cadence and probe echo, lag correction, stall detection, backoff.
* The volume's identity (uuid in WELCOME and HEARTBEAT; a served volume deleted or replaced
  ends the session), a paused fetch that watches heartbeats.
* A staged resync meets a new target: begun, kept, retargeted or started over.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from marsfs.errors import ProtocolError
from marsfs.log.record import decode_header
from marsfs.node.volstate import MirrorFacts, VolumeState, mirror_state
from marsfs.replication.channel import PeerRefused
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Ack,
    Error,
    Fetch,
    Heartbeat,
    Hello,
    Message,
    Records,
    SyncData,
    SyncEnd,
    SyncInfo,
    SyncRequest,
    Want,
    Welcome,
)
from marsfs.replication.session import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    BATCH_BYTES,
    FIRST_BATCH,
    HEARTBEAT,
    REFUSALS,
    STALL_AFTER,
    Backoff,
    FetchingSession,
    FetchPhase,
    FetchState,
    Probes,
    Refused,
    ServePhase,
    Ship,
    StageStep,
    StartShipping,
    Stop,
    SyncTarget,
    refusal_stop,
    stage_step,
)
from marsfs.testing.sansio import CHAIN, FakeVolume, Pair, chain, hello, records, ship, volume

# ---------------------------------------------------------------------------- whole conversations


def test_fetch_conversation() -> None:
    served = volume(1, 30)
    mirror = volume(1, 10, history="h")
    pair = Pair(served, mirror)
    welcome = pair.connect()
    assert welcome == Welcome(node="a", volume="vm", uuid="u-1", size=served.size, epoch=7, head_lsn=30, durable_lsn=30)
    # a tuple: an `is` would narrow the phases for mypy past the calls below that move them
    assert (pair.client.phase, pair.server.phase) == (FetchPhase.WELCOMED, ServePhase.AWAIT_FETCH)
    fetch = pair.fetch(now=1.0)
    assert fetch == Fetch(from_lsn=11, prev_chain=chain("h", 10))
    assert pair.state.connected and pair.state.last_frame == 1.0
    assert pair.to_server(fetch) == StartShipping(after=10)
    assert pair.server.phase is ServePhase.SHIPPING and pair.server.hold_lsn == 10
    assert pair.server.hold_key == "mirror:b"
    # the first heartbeat goes out at once
    assert ship(pair, now=2.0) is not None
    assert pair.server.heartbeat_due(2.0)
    beat = pair.heartbeat(2.0, wall=1e9, lag=(999, 20, 0.5))
    assert (beat.head_lsn, beat.durable_lsn, beat.probe) == (30, 30, 0)
    pair.to_client(beat, now=2.0)
    # the heartbeat's figures (20 records), corrected by the 6 records that came since
    assert mirror.durable_lsn == 16 and pair.state.lag_records == 14 and pair.state.lag_bytes == 999
    while ship(pair, now=3.0):
        pass
    assert mirror.log.last_lsn == 30 and pair.state.lag_records == 0 and pair.state.lag_bytes == 0
    assert pair.state.primary_durable_lsn == 30 and pair.state.last_progress == 3.0
    ack = pair.client.ack(now=3.0, replayed_lsn=25, fetch_paused=False, replay_paused=True)
    assert ack == Ack(fetched_lsn=30, replayed_lsn=25, fetch_paused=False, replay_paused=True, probe=1)
    assert pair.to_server(ack) == ack
    assert (pair.server.fetched_lsn, pair.server.replayed_lsn, pair.server.hold_lsn) == (30, 25, 25)
    assert pair.poll() is None  # nothing more to ship until the source has more
    served.log.last_lsn = served.durable_lsn = 31
    todo = pair.poll()
    assert todo is not None and (todo.first, todo.limit) == (31, 31) and FIRST_BATCH < todo.batch <= BATCH_BYTES


def test_mirror_serves_only_what_it_replayed() -> None:
    served = volume(1, 30)
    served.replay_limit = 20  # a mirror serving another mirror: its replay position bounds shipping
    pair = Pair(served, volume(1, 10))
    pair.start_fetch()
    assert pair.poll() == Ship(11, 20, FIRST_BATCH)


def test_slow_start() -> None:
    served = volume(1, 10_000)
    pair = Pair(served, volume(1, 0))
    pair.start_fetch()
    batches = []
    for _ in range(10):
        todo = pair.poll()
        assert todo is not None
        batches.append(todo.batch)
        pair.server.shipped(todo.first + 1)
    assert batches == [min(FIRST_BATCH << i, BATCH_BYTES) for i in range(10)]
    assert batches[-1] == BATCH_BYTES


def test_leave() -> None:
    pair = Pair(volume(), want="leave")
    assert isinstance(pair.connect(), Welcome)
    assert pair.server.phase is ServePhase.DONE and pair.client.phase is FetchPhase.WELCOMED
    with pytest.raises(ProtocolError):
        pair.to_client(SINFO)


# ---------------------------------------------------------------------------- refusals


def refusal(pair: Pair, got: object) -> Refused:
    assert isinstance(got, Refused), got
    assert pair.server.phase is ServePhase.CLOSED and pair.client.phase is FetchPhase.CLOSED
    return got


@pytest.mark.parametrize("served, greeting, code", [
    (None, hello(), "unknown-volume"),
    (volume(), hello(cluster="other"), "cluster"),
    (volume(), hello(proto=PROTO_VERSION + 1), "protocol"),
], ids=["unknown-volume", "cluster", "protocol"])
def test_hello_refusals(served: FakeVolume | None, greeting: Hello, code: str) -> None:
    pair = Pair(served)
    pair.client = FetchingSession(greeting, state=pair.state)
    got = refusal(pair, pair.connect())
    assert got.code == code and got.stop is Stop.FATAL


@pytest.mark.parametrize("served, mirror, code, words", [
    (volume(1, 30), volume(1, 20, diverged_after=15), "diverged", "split brain"),
    (volume(1, 30), volume(1, 31), "diverged", "beyond"),
    (volume(21, 30), volume(1, 10), "log-trimmed", "must be resynced"),
], ids=["chain", "beyond-our-log", "log-trimmed"])
def test_fetch_refusals(served: FakeVolume, mirror: FakeVolume, code: str, words: str) -> None:
    stop = Stop.SPLIT_BRAIN if code == "diverged" else Stop.RESYNC
    pair = Pair(served, mirror)
    answer = pair.start_fetch()
    assert isinstance(answer, Error) and answer.code == code and words in answer.error
    got = refusal(pair, pair.to_client(answer))
    assert got.code == code and got.stop is stop and words in got.message


def test_edges_of_fetch_admission() -> None:
    """The mirror's log may end exactly where ours starts or ends."""
    for served, mirror in [(volume(21, 30), volume(1, 20)), (volume(1, 30), volume(1, 30))]:
        pair = Pair(served, mirror)
        assert pair.start_fetch() == StartShipping(mirror.log.last_lsn)


# ---------------------------------------------------------------------------- the refusal table

#: every refusal code a node sends or a fetching session finds, what it means to the refused
#: mirror, and the state a mirror whose fetch it stopped is in (None: fetching goes on)
TABLE = [
    ("protocol", Stop.FATAL, VolumeState.FAILED),
    ("cluster", Stop.FATAL, VolumeState.FAILED),
    ("unknown-volume", Stop.FATAL, VolumeState.FAILED),
    ("diverged", Stop.SPLIT_BRAIN, VolumeState.SPLIT_BRAIN),
    ("log-trimmed", Stop.RESYNC, VolumeState.NEEDS_RESYNC),  # (a resync runs first; stuck: needs one)
    ("volume-deleted", Stop.NEEDS_RESYNC, VolumeState.NEEDS_RESYNC),
    ("volume-replaced", Stop.NEEDS_RESYNC, VolumeState.NEEDS_RESYNC),
    ("switching", Stop.RETRY, None),
    ("stopping", Stop.RETRY, None),
    ("error", Stop.RETRY, None),
    ("unsupported", Stop.RETRY, None),
    ("unknown-want", Stop.RETRY, None),
    ("unknown-node", Stop.RETRY, None),
    ("node-identity", Stop.RETRY, None),
    ("not-a-member", Stop.RETRY, None),
]


@pytest.mark.parametrize("code, stop, state", TABLE, ids=[c for c, _, _ in TABLE])
def test_what_each_refusal_means(code: str, stop: Stop, state: VolumeState | None) -> None:
    assert REFUSALS[code] is stop and refusal_stop(code) is stop
    assert Refused(code, "").stop is stop and PeerRefused(code, "").stop is stop
    assert stop.stops is (stop in (Stop.SPLIT_BRAIN, Stop.NEEDS_RESYNC, Stop.FATAL))
    if state is not None:  # the fetch stopped on it: the mirror's state says what to do
        st = FetchState(source="a", fatal=code)
        assert st.stop is stop
        got, errors = mirror_state(MirrorFacts(
            source="a", fetching=True, fatal=code, error="refused", fetch_paused=False, replay_paused=False,
            connected=False, since_progress=0.0, missing_records=0, lag_records=0, heartbeat_age=None))
        assert got is state and errors == ["fetch from a: refused"]
    else:
        assert not stop.stops


def test_the_table_is_the_whole_story() -> None:
    """Every code in the table is tested above, and a code nobody listed (a newer peer's, a
    conversation's own) means retry: nothing says retrying cannot help."""
    assert sorted(REFUSALS) == sorted(c for c, _, _ in TABLE)
    assert refusal_stop("busy") is Stop.RETRY and refusal_stop("no-such-code") is Stop.RETRY
    assert FetchState(source="a").stop is None


# ---------------------------------------------------------------------------- out of order

BEAT = Heartbeat(uuid="u-1", head_lsn=1, durable_lsn=1, time=0.0, probe=0, lag_bytes=0, lag_records=0, lag_seconds=0.0)
SINFO = SyncInfo(lsn=1, chain=bytes(16), size=1024, uuid="u-1", ranges=())
WELCOME = Welcome(node="a", volume="vm", uuid="u-1", size=1024, epoch=1, head_lsn=1, durable_lsn=1)
ACK = Ack(fetched_lsn=1, replayed_lsn=1)
FETCH = Fetch(from_lsn=1, prev_chain=bytes(16))
RECORDS = Records(records(1, 1))
SYNC_REQUEST = SyncRequest(since_lsn=0, since_chain=CHAIN)


def server_at(phase: str) -> Pair:
    """A pair whose server is in ``phase``."""
    want: Want = "sync" if "SYNC" in phase else "fetch"
    pair = Pair(volume(1, 10), volume(1, 5), want=want)
    if phase != "AWAIT_HELLO":
        pair.connect()
    if phase == "SHIPPING":
        pair.to_server(pair.fetch(0.0))
    if phase == "AWAIT_SYNC_ACK":  # a sync with nothing to compare
        pair.to_server(pair.client.sync_request(SYNC_REQUEST))
        pair.plan_sync([], 10)
        pair.server.end_sync()
    assert pair.server.phase.name == phase
    return pair


@pytest.mark.parametrize("phase, msg", [
    ("AWAIT_HELLO", FETCH), ("AWAIT_HELLO", ACK), ("AWAIT_HELLO", RECORDS), ("AWAIT_HELLO", WELCOME),
    ("AWAIT_FETCH", hello()), ("AWAIT_FETCH", ACK), ("AWAIT_FETCH", RECORDS), ("AWAIT_FETCH", BEAT),
    ("AWAIT_FETCH", Error(code="x", error="y")), ("AWAIT_FETCH", SYNC_REQUEST),
    ("SHIPPING", hello()), ("SHIPPING", FETCH), ("SHIPPING", RECORDS), ("SHIPPING", SINFO),
    ("AWAIT_SYNC_REQUEST", ACK), ("AWAIT_SYNC_REQUEST", FETCH), ("AWAIT_SYNC_REQUEST", hello()),
    ("AWAIT_SYNC_ACK", FETCH), ("AWAIT_SYNC_ACK", RECORDS), ("AWAIT_SYNC_ACK", SYNC_REQUEST),
])
def test_server_refuses_out_of_order(phase: str, msg: Message) -> None:
    pair = server_at(phase)
    with pytest.raises(ProtocolError, match=f"{msg.TYPE.name} is not allowed in state {phase} of the serving"):
        pair.to_server(msg)
    assert pair.server.phase is ServePhase.CLOSED
    with pytest.raises(ProtocolError):  # closed for good
        pair.to_server(ACK)


def client_at(phase: str, want: Want) -> Pair:
    pair = Pair(volume(1, 10), volume(1, 5), want=want)
    if phase != "START":
        pair.client.hello()
    if phase in ("WELCOMED", "FETCHING", "SYNCING", "SYNC_END"):
        pair.to_client(WELCOME)
    if phase == "FETCHING":
        pair.fetch(0.0)
    if phase in ("SYNCING", "SYNC_END"):
        pair.client.sync_request(SYNC_REQUEST)
        pair.to_client(SINFO)
    if phase == "SYNC_END":
        pair.to_client(SyncEnd(lsn=1))
    assert pair.client.phase.name == phase
    return pair


@pytest.mark.parametrize("phase, want, msg", [
    ("START", "fetch", WELCOME), ("START", "fetch", Error(code="x", error="y")),
    ("AWAIT_WELCOME", "fetch", RECORDS), ("AWAIT_WELCOME", "fetch", BEAT), ("AWAIT_WELCOME", "sync", SINFO),
    ("WELCOMED", "fetch", RECORDS), ("WELCOMED", "fetch", SINFO), ("WELCOMED", "sync", RECORDS),
    ("WELCOMED", "sync", SINFO), ("WELCOMED", "sync", SyncData(0, b"x")), ("WELCOMED", "fetch", WELCOME),
    ("FETCHING", "fetch", WELCOME), ("FETCHING", "fetch", SINFO), ("FETCHING", "fetch", hello()),
    ("FETCHING", "fetch", ACK), ("FETCHING", "fetch", FETCH),
    ("SYNCING", "sync", RECORDS), ("SYNCING", "sync", SINFO), ("SYNCING", "sync", BEAT),
    ("SYNC_END", "sync", SyncData(0, b"x")), ("SYNC_END", "sync", SyncEnd(lsn=1)),
])
def test_client_refuses_out_of_order(phase: str, want: Want, msg: Message) -> None:
    pair = client_at(phase, want)
    with pytest.raises(ProtocolError, match=f"{msg.TYPE.name} is not allowed in state {phase} of the {want} fetching"):
        pair.to_client(msg)
    assert pair.client.phase is FetchPhase.CLOSED


def test_client_checks_what_it_is_given() -> None:
    pair = client_at("FETCHING", "fetch")  # the mirror's log ends at 5
    with pytest.raises(ProtocolError, match="RECORDS: field 'records' starts at LSN 7, not at the next one we need"):
        pair.to_client(Records(records(7, 2)))
    pair = client_at("FETCHING", "fetch")
    assert pair.to_client(Records(records(6, 2))) is not None
    with pytest.raises(ProtocolError, match="starts at LSN 6"):  # a repeat
        pair.to_client(Records(records(6, 1)))


def test_refusal_may_come_in_any_open_phase() -> None:
    for phase, want in [("AWAIT_WELCOME", "fetch"), ("WELCOMED", "fetch"), ("FETCHING", "fetch"),
                        ("WELCOMED", "sync"), ("SYNCING", "sync"), ("SYNC_END", "sync")]:
        pair = client_at(phase, want)  # type: ignore[arg-type]
        assert pair.to_client(Error(code="error", error="disk full")) == Refused("error", "disk full")
        assert pair.client.phase is FetchPhase.CLOSED


# ---------------------------------------------------------------------------- time and lag


def test_heartbeat_cadence_and_probe_echo() -> None:
    pair = Pair(volume(1, 10), volume(1, 10))
    pair.start_fetch(now=0.0)
    first = pair.client.ack(now=1.0, replayed_lsn=10, fetch_paused=False, replay_paused=False)
    second = pair.client.ack(now=1.2, replayed_lsn=10, fetch_paused=False, replay_paused=False)
    assert (first.probe, second.probe) == (1, 2)
    pair.to_server(first)
    assert pair.poll() is None
    pair.to_server(second)  # read after the poll: the next heartbeat must not claim it
    assert pair.server.heartbeat_due(1.3)
    beat = pair.heartbeat(1.3, wall=5.0, lag=(0, 0, 0.0))
    assert beat.probe == 1
    assert not pair.server.heartbeat_due(1.3 + HEARTBEAT - 0.01)
    assert pair.server.heartbeat_due(1.3 + HEARTBEAT)
    pair.to_client(beat, now=1.4)
    assert pair.state.heartbeat_basis == 1.0 and pair.state.last_heartbeat == 1.4
    pair.poll()
    pair.to_client(pair.heartbeat(1.8, wall=5.5, lag=(0, 0, 0.0)), now=1.9)
    assert pair.state.heartbeat_basis == 1.2
    pair.to_client(BEAT, now=2.0)  # an old or unknown probe never moves the basis back
    assert pair.state.heartbeat_basis == 1.2


def test_probes_outlive_sessions_and_are_bounded() -> None:
    probes = Probes()
    numbers = [probes.new(float(i)) for i in range(250)]
    assert numbers == list(range(1, 251))
    assert probes.sent_at(250) == 249.0 and probes.sent_at(200) == 199.0 and probes.sent_at(100) is None


def test_lag_correction_on_the_mirror() -> None:
    mirror = volume(1, 15)
    pair = Pair(volume(1, 20), mirror)
    pair.start_fetch()
    # the source computed its lag for what we had acknowledged (10); we have 15 by now
    pair.to_client(Heartbeat(uuid="u-1", head_lsn=21, durable_lsn=20, time=0.0, probe=0, lag_bytes=5000, lag_records=10,
                             lag_seconds=2.5), now=1.0)
    st = pair.state
    assert (st.primary_head_lsn, st.primary_durable_lsn) == (21, 20)
    assert (st.lag_records, st.lag_bytes, st.lag_seconds) == (5, 5000, 2.5)
    got = pair.to_client(Records(records(16, 5)), now=2.0)
    assert isinstance(got, Records)
    mirror.log.last_lsn = mirror.durable_lsn = 20
    pair.client.appended(got)
    assert (st.lag_records, st.lag_bytes, st.lag_seconds) == (0, 0, 0.0)
    assert st.fetched_bytes == got.nbytes and list(st.samples) == [(2.0, got.nbytes)]
    # a heartbeat that says we are level leaves nothing to correct
    pair.to_client(Heartbeat(uuid="u-1", head_lsn=20, durable_lsn=20, time=0.0, probe=0, lag_bytes=77, lag_records=3,
                             lag_seconds=1.0), now=3.0)
    assert (st.lag_records, st.lag_bytes, st.lag_seconds) == (0, 0, 0.0)
    assert decode_header(got.records[-1][:80]).lsn == 20


def test_stall() -> None:
    pair = Pair(volume(1, 10), volume(1, 10))
    pair.start_fetch(now=100.0)
    assert pair.client.stall_deadline == 100.0 + STALL_AFTER
    assert pair.client.stalled(100.0 + STALL_AFTER - 0.01) is None
    pair.to_client(BEAT, now=105.0)  # any frame counts
    assert pair.client.stalled(100.0 + STALL_AFTER) is None
    assert pair.client.stall_deadline == 105.0 + STALL_AFTER
    assert pair.client.stalled(105.0 + STALL_AFTER) == f"no data from a for {STALL_AFTER:.0f} s"
    assert pair.client.phase is FetchPhase.CLOSED


def test_backoff_schedule() -> None:
    b = Backoff()
    delays = [b.next(progressed=False) for _ in range(9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert delays[0] == BACKOFF_MIN and delays[-1] == BACKOFF_MAX
    assert b.next(progressed=True) == BACKOFF_MIN  # a session that moved the log forward resets it
    assert b.next(progressed=False) == 0.2


# ---------------------------------------------------------------------------- volume identity


def test_a_mirror_refuses_a_source_volume_with_another_uuid() -> None:
    """A volume deleted and created again under its name is another volume: the WELCOME says so."""
    served = volume(1, 30)
    served.uuid = "u-2"
    pair = Pair(served, volume(1, 10))
    got = pair.connect()
    assert isinstance(got, Refused) and got.code == "volume-replaced" and got.stop is Stop.NEEDS_RESYNC
    assert pair.client.phase is FetchPhase.CLOSED
    assert "uuid u-2 there, u-1 here" in got.message and "deleted on a and created anew" in got.message
    assert "marsfs leave vm, then marsfs join vm --from a" in got.message


def test_every_heartbeat_names_the_volume_and_the_mirror_checks_it() -> None:
    served, mirror = volume(1, 10), volume(1, 10)
    pair = Pair(served, mirror)
    pair.start_fetch()
    pair.poll()
    beat = pair.heartbeat(0.0, wall=1.0, lag=(0, 0, 0.0))
    assert beat.uuid == "u-1" and isinstance(pair.to_client(beat, now=0.1), Heartbeat)
    got = pair.to_client(replace(BEAT, uuid="u-2"), now=0.2)
    assert isinstance(got, Refused) and got.code == "volume-replaced" and got.stop is Stop.NEEDS_RESYNC
    assert pair.client.phase is FetchPhase.CLOSED and not pair.client.following


@pytest.mark.parametrize("phase", ["AWAIT_FETCH", "SHIPPING", "AWAIT_SYNC_REQUEST", "AWAIT_SYNC_ACK"])
def test_a_session_ends_when_its_volume_is_deleted(phase: str) -> None:
    pair = server_at(phase)
    gone = pair.server.volume_gone(None)
    assert isinstance(gone, Error) and gone.code == "volume-deleted"
    assert gone.error == ("a deleted volume vm (uuid u-1); the copy on b belongs to the deleted volume (to mirror "
                          "one of that name again: marsfs leave vm, then marsfs join vm --from a)")
    assert pair.server.phase is ServePhase.CLOSED
    assert pair.server.volume_gone(None) is None  # said once
    with pytest.raises(ProtocolError):
        pair.to_server(ACK)


def test_a_volume_created_under_the_old_name_ends_the_session_too() -> None:
    pair = server_at("SHIPPING")
    gone = pair.server.volume_gone("u-2")
    assert isinstance(gone, Error) and gone.code == "volume-deleted"
    assert "deleted volume vm (uuid u-1) and created a new volume vm (uuid u-2)" in gone.error
    got = pair.to_client(gone)
    assert isinstance(got, Refused) and got.stop is Stop.NEEDS_RESYNC and pair.client.phase is FetchPhase.CLOSED


def test_volume_gone_before_admission_or_after_the_end_says_nothing() -> None:
    pair = Pair(volume(), want="leave")
    assert pair.server.volume_gone(None) is None  # nothing admitted yet
    pair.connect()
    assert pair.server.phase is ServePhase.DONE and pair.server.volume_gone(None) is None


# ---------------------------------------------------------------------------- a paused fetch watches


def test_a_paused_fetch_watches_and_keeps_learning_the_lag() -> None:
    served, mirror = volume(1, 10), volume(1, 10)
    pair = Pair(served, mirror)
    assert isinstance(pair.connect(), Welcome)
    fetch = pair.fetch(now=1.0, watch=True)
    assert fetch.watch and pair.client.phase is FetchPhase.WATCHING and pair.client.following
    assert pair.state.connected
    assert pair.to_server(fetch) == StartShipping(after=10) and pair.server.watching
    served.log.last_lsn = served.durable_lsn = 40  # the primary writes on
    assert pair.poll() is None  # no records for a watcher...
    assert pair.server.heartbeat_due(2.0)  # ...but heartbeats, with the durable LSN
    beat = pair.heartbeat(2.0, wall=1e9, lag=(30 * 65_600, 30, 4.0))
    assert beat.durable_lsn == 40
    pair.to_client(beat, now=2.0)
    st = pair.state
    assert (st.primary_durable_lsn, st.lag_records, st.lag_bytes, st.lag_seconds) == (40, 30, 30 * 65_600, 4.0)
    ack = pair.client.ack(now=2.1, replayed_lsn=10, fetch_paused=True, replay_paused=False)
    assert pair.to_server(ack) == ack and pair.server.hold_lsn == 10
    with pytest.raises(ProtocolError, match="RECORDS is not allowed in state WATCHING"):
        pair.to_client(Records(records(11, 1)))
    assert not pair.client.following


def test_a_clean_stop_says_goodbye_after_the_last_records_shipped() -> None:
    """The serving side of a clean stop: with nothing left to ship, a heartbeat is due at once
    and is the last word; records shipped after it make another one due first."""
    served, mirror = volume(1, 20), volume(1, 10)
    pair = Pair(served, mirror)
    pair.start_fetch()
    srv = pair.server
    todo = pair.poll()
    assert todo is not None
    pair.heartbeat(1.0, wall=1e9, lag=(0, 10, 0.0))
    assert not srv.heartbeat_due(1.1)
    srv.shipped(todo.limit + 1)  # everything is out...
    assert pair.poll() is None and not srv.farewell()  # ...and the last heartbeat is due at once
    assert srv.heartbeat_due(1.1) and not srv.farewell()
    beat = pair.heartbeat(1.1, wall=1e9, lag=(0, 0, 0.0))
    assert beat.durable_lsn == 20 and srv.farewell()  # that was the last word: now ERROR stopping
    served.log.last_lsn = served.durable_lsn = 22  # a record after it (a mark, say)
    todo = pair.poll()
    assert todo is not None
    srv.shipped(todo.limit + 1)
    assert pair.poll() is None and not srv.farewell() and srv.heartbeat_due(1.2)
    assert pair.heartbeat(1.2, wall=1e9, lag=(0, 0, 0.0)).durable_lsn == 22 and srv.farewell()


def test_a_clean_stop_makes_the_last_heartbeat_final_until_the_source_speaks_again() -> None:
    """ERROR ``stopping`` after a heartbeat: that heartbeat is the source's final word (a
    failover then knows exactly what it lacks); the next WELCOME or heartbeat voids it."""
    served, mirror = volume(1, 10), volume(1, 10)
    pair = Pair(served, mirror)
    assert isinstance(pair.connect(), Welcome)
    pair.to_server(pair.fetch(now=1.0, watch=True))
    served.log.last_lsn = served.durable_lsn = 25
    pair.poll()
    pair.to_client(pair.heartbeat(2.0, wall=1e9, lag=(15 * 65_600, 15, 1.0)), now=2.0)
    assert not pair.state.final
    got = pair.to_client(Error(code="stopping", error="a is stopping cleanly"), now=2.1)
    assert isinstance(got, Refused) and got.stop is Stop.RETRY and not pair.client.following
    assert pair.state.final and pair.state.primary_durable_lsn == 25
    again = Pair(served, mirror, state=pair.state, probes=pair.probes)  # the next session
    assert isinstance(again.connect(), Welcome) and not pair.state.final
    pair.state.final = True
    again.to_server(again.fetch(now=3.0, watch=True))
    again.poll()
    again.to_client(again.heartbeat(3.0, wall=1e9 + 1, lag=(0, 0, 0.0)), now=3.0)
    assert not pair.state.final
    # a refusal before any fetch or watch ran is no goodbye: nothing told it where the log ends
    third = Pair(served, mirror)
    assert isinstance(third.connect(), Welcome)
    assert isinstance(third.to_client(Error(code="stopping", error="stopping")), Refused) and not third.state.final


def test_a_fetch_that_is_not_paused_does_not_watch() -> None:
    pair = Pair(volume(1, 20), volume(1, 10))
    pair.start_fetch()
    assert not pair.server.watching and pair.client.phase is FetchPhase.FETCHING and pair.client.following
    assert pair.poll() == Ship(11, 20, FIRST_BATCH)


# ---------------------------------------------------------------------------- a staged resync meets a target


def test_a_staged_resync_is_kept_retargeted_or_started_over() -> None:
    info = SyncInfo(lsn=30, chain=chain("h", 30), size=1024, uuid="u-1", ranges=())
    same = SyncTarget(uuid="u-1", lsn=30, chain=chain("h", 30), size=1024)
    assert stage_step(None, info) is StageStep.BEGIN
    assert stage_step(same, info) is StageStep.CONTINUE
    assert stage_step(replace(same, lsn=20, chain=chain("h", 20)), info) is StageStep.RETARGET  # the source moved on
    assert stage_step(replace(same, size=512), info) is StageStep.RETARGET  # it grew meanwhile
    assert stage_step(replace(same, lsn=40), info) is StageStep.RESTART  # an older target: not from newer blocks
    assert stage_step(replace(same, uuid="u-2"), info) is StageStep.RESTART  # another volume's blocks
