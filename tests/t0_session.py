"""The replication sessions (marsfs.replication.session) driven against each other in memory.

Like h11's ConnectionPair: each side's output goes through the wire codec into the other side.
Volumes are small fakes that satisfy ``VolumeFacts``; time is a number passed in.

* A full fetch conversation and a full image copy.
* Every refusal: unknown volume, cluster, protocol, diverged by chain, diverged beyond the
  log, log-trimmed; which are fatal.
* Every out-of-order message on both sides is a ProtocolError and closes the session.
* Slow start, heartbeat cadence and probe echo, lag correction, stall detection, backoff.
* Issue 8: the volume's identity (uuid in WELCOME and HEARTBEAT; a served volume deleted or
  replaced ends the session), a paused fetch that watches heartbeats, image scan progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from marsfs.errors import ProtocolError
from marsfs.log.record import decode_header
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Ack,
    Error,
    Fetch,
    FrameDecoder,
    Heartbeat,
    Hello,
    ImageData,
    ImageEnd,
    ImageInfo,
    ImageProgress,
    Message,
    Records,
    Want,
    Welcome,
    decode_message,
    encode_message,
)
from marsfs.replication.session import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    BATCH_BYTES,
    FIRST_BATCH,
    HEARTBEAT,
    IMAGE_CHUNK,
    PROGRESS_BYTES,
    PROGRESS_EVERY,
    STALL_AFTER,
    Backoff,
    FetchingSession,
    FetchPhase,
    FetchState,
    Probes,
    Refused,
    ServePhase,
    ServingSession,
    Ship,
    StartShipping,
)
from t0_protocol import records

CLUSTER = "c"


def chain(history: str, lsn: int) -> bytes:
    """A stand-in chain value: equal for equal (history, LSN)."""
    return (f"{history}:{lsn}".encode() * 16)[:16]


@dataclass
class FakeLog:
    first_lsn: int
    last_lsn: int
    history: str = "h"
    diverged_after: int | None = None  #: from here on, this log's history is its own

    @property
    def last_chain(self) -> bytes:
        return self.chain_at(self.last_lsn)

    def chain_at(self, lsn: int) -> bytes:
        assert self.first_lsn - 1 <= lsn <= self.last_lsn
        own = self.diverged_after is not None and lsn > self.diverged_after
        return chain("own" if own else self.history, lsn)


@dataclass
class FakeVolume:
    log: FakeLog
    durable_lsn: int
    name: str = "vm"
    uuid: str = "u-1"
    size: int = 3 * IMAGE_CHUNK + 512
    replay_limit: int | None = None

    def size_at(self, lsn: int) -> int:
        return self.size

    @property
    def head_lsn(self) -> int:
        return self.log.last_lsn

    @property
    def replayed_lsn(self) -> int:
        return self.head_lsn if self.replay_limit is None else self.replay_limit


def volume(first: int = 1, last: int = 100, durable: int | None = None, **kw: object) -> FakeVolume:
    return FakeVolume(FakeLog(first, last, **kw), last if durable is None else durable)  # type: ignore[arg-type]


def wire(msg: Message) -> Message:
    (frame,) = FrameDecoder().feed(encode_message(msg))
    return decode_message(frame)


def hello(want: Want = "fetch", **kw: object) -> Hello:
    fields: dict[str, object] = {"proto": PROTO_VERSION, "cluster": CLUSTER, "node": "b", "volume": "vm",
                                 "want": want, "epoch": 0, **kw}
    return Hello(**fields)  # type: ignore[arg-type]


@dataclass
class Pair:
    """A serving and a fetching session wired together, over the codec."""

    served: FakeVolume | None
    mirror: FakeVolume | None = None
    want: Want = "fetch"
    server: ServingSession = field(init=False)
    client: FetchingSession = field(init=False)
    state: FetchState = field(default_factory=lambda: FetchState(source="a"))
    probes: Probes = field(default_factory=Probes)

    def __post_init__(self) -> None:
        self.server = ServingSession("a", CLUSTER)
        self.client = FetchingSession(hello(self.want), state=self.state, probes=self.probes, mirror=self.mirror)

    def to_server(self, msg: Message) -> object:
        return self.server.receive(wire(msg))

    def to_client(self, msg: Message, now: float = 0.0) -> object:
        return self.client.receive(wire(msg), now)

    def connect(self) -> object:
        got = self.to_server(self.client.hello())
        assert isinstance(got, Hello)
        return self.to_client(self.server.admit(self.served, 7))

    def start_fetch(self, now: float = 0.0) -> object:
        assert isinstance(self.connect(), Welcome)
        return self.to_server(self.client.fetch(now))


def ship(pair: Pair, mirror: FakeVolume, now: float) -> Records | None:
    """One round of the server's ship loop; the mirror appends what comes."""
    todo = pair.server.poll()
    if todo is None:
        return None
    n = max(1, min(todo.limit - todo.first + 1, todo.batch // 10_000))  # records of ~10 KB
    msg = Records(records(todo.first, n))
    pair.server.shipped(todo.first + n)
    got = pair.to_client(msg, now)
    assert got == msg and isinstance(got, Records)
    mirror.log.last_lsn = mirror.durable_lsn = got.last_lsn
    pair.client.appended(got)
    return got


# ---------------------------------------------------------------------------- whole conversations


def test_fetch_conversation() -> None:
    served = volume(1, 30)
    mirror = volume(1, 10, history="h")
    pair = Pair(served, mirror)
    welcome = pair.connect()
    assert welcome == Welcome(node="a", volume="vm", uuid="u-1", size=served.size, epoch=7, head_lsn=30, durable_lsn=30)
    assert pair.client.phase is FetchPhase.WELCOMED and pair.server.phase is ServePhase.AWAIT_FETCH
    fetch = pair.client.fetch(now=1.0)
    assert fetch == Fetch(from_lsn=11, prev_chain=chain("h", 10))
    assert pair.state.connected and pair.state.last_frame == 1.0
    assert pair.to_server(fetch) == StartShipping(after=10)
    assert pair.server.phase is ServePhase.SHIPPING and pair.server.hold_lsn == 10
    assert pair.server.hold_key == "mirror:b"
    # the first heartbeat goes out at once
    assert ship(pair, mirror, now=2.0) is not None
    assert pair.server.heartbeat_due(2.0)
    beat = pair.server.heartbeat(2.0, wall=1e9, lag=(999, 20, 0.5))
    assert (beat.head_lsn, beat.durable_lsn, beat.probe) == (30, 30, 0)
    pair.to_client(beat, now=2.0)
    # the heartbeat's figures (20 records), corrected by the 6 records that came since
    assert mirror.durable_lsn == 16 and pair.state.lag_records == 14 and pair.state.lag_bytes == 999
    while ship(pair, mirror, now=3.0):
        pass
    assert mirror.log.last_lsn == 30 and pair.state.lag_records == 0 and pair.state.lag_bytes == 0
    assert pair.state.primary_durable_lsn == 30 and pair.state.last_progress == 3.0
    ack = pair.client.ack(now=3.0, replayed_lsn=25, fetch_paused=False, replay_paused=True)
    assert ack == Ack(fetched_lsn=30, replayed_lsn=25, fetch_paused=False, replay_paused=True, probe=1)
    assert pair.to_server(ack) == ack
    assert (pair.server.fetched_lsn, pair.server.replayed_lsn, pair.server.hold_lsn) == (30, 25, 25)
    assert pair.server.poll() is None  # nothing more to ship until the source has more
    served.log.last_lsn = served.durable_lsn = 31
    todo = pair.server.poll()
    assert todo is not None and (todo.first, todo.limit) == (31, 31) and FIRST_BATCH < todo.batch <= BATCH_BYTES


def test_mirror_serves_only_what_it_replayed() -> None:
    served = volume(1, 30)
    served.replay_limit = 20  # a mirror serving another mirror: its replay position bounds shipping
    pair = Pair(served, volume(1, 10))
    pair.start_fetch()
    assert pair.server.poll() == Ship(11, 20, FIRST_BATCH)


def test_slow_start() -> None:
    served = volume(1, 10_000)
    pair = Pair(served, volume(1, 0))
    pair.start_fetch()
    batches = []
    for _ in range(10):
        todo = pair.server.poll()
        assert todo is not None
        batches.append(todo.batch)
        pair.server.shipped(todo.first + 1)
    assert batches == [min(FIRST_BATCH << i, BATCH_BYTES) for i in range(10)]
    assert batches[-1] == BATCH_BYTES


def test_image_conversation() -> None:
    served = volume(1, 40, durable=35)
    pair = Pair(served, want="image")
    assert isinstance(pair.connect(), Welcome)
    assert pair.server.phase is ServePhase.SENDING_IMAGE
    info = pair.server.start_image()
    assert info == ImageInfo(lsn=35, chain=chain("h", 35), size=served.size, uuid="u-1")
    assert pair.to_client(info) == info
    chunks = list(pair.server.image_chunks())
    assert chunks == [(0, IMAGE_CHUNK), (IMAGE_CHUNK, IMAGE_CHUNK), (2 * IMAGE_CHUNK, IMAGE_CHUNK), (3 * IMAGE_CHUNK, 512)]
    assert pair.server.image_chunk(0, bytes(IMAGE_CHUNK), now=0.0) == ImageProgress(IMAGE_CHUNK)  # zeros: not sent
    for off, n in chunks[1:]:
        msg = pair.server.image_chunk(off, b"\1" * n, now=0.0)
        assert msg is not None and pair.to_client(msg) == msg
    end = pair.server.end_image()
    assert end == ImageEnd(lsn=35) and pair.server.phase is ServePhase.AWAIT_IMAGE_ACK
    assert pair.to_client(end) == end
    ack = pair.client.image_done(head_lsn=35)
    assert ack == Ack(fetched_lsn=35, replayed_lsn=35)
    assert pair.to_server(ack) == ack
    assert pair.server.phase is ServePhase.DONE and pair.client.phase is FetchPhase.DONE


def test_leave() -> None:
    pair = Pair(volume(), want="leave")
    assert isinstance(pair.connect(), Welcome)
    assert pair.server.phase is ServePhase.DONE and pair.client.phase is FetchPhase.WELCOMED
    with pytest.raises(ProtocolError):
        pair.to_client(ImageInfo(lsn=1, chain=bytes(16), size=512, uuid="u"))


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
    assert got.code == code and got.fatal


@pytest.mark.parametrize("served, mirror, code, words", [
    (volume(1, 30), volume(1, 20, diverged_after=15), "diverged", "split brain"),
    (volume(1, 30), volume(1, 31), "diverged", "beyond"),
    (volume(21, 30), volume(1, 10), "log-trimmed", "full resync"),
], ids=["chain", "beyond-our-log", "log-trimmed"])
def test_fetch_refusals(served: FakeVolume, mirror: FakeVolume, code: str, words: str) -> None:
    pair = Pair(served, mirror)
    answer = pair.start_fetch()
    assert isinstance(answer, Error) and answer.code == code and words in answer.error
    got = refusal(pair, pair.to_client(answer))
    assert got.code == code and got.fatal and words in got.message


def test_edges_of_fetch_admission() -> None:
    """The mirror's log may end exactly where ours starts or ends."""
    for served, mirror in [(volume(21, 30), volume(1, 20)), (volume(1, 30), volume(1, 30))]:
        pair = Pair(served, mirror)
        assert pair.start_fetch() == StartShipping(mirror.log.last_lsn)


def test_only_operator_refusals_are_fatal() -> None:
    assert not Refused("error", "disk full").fatal
    assert all(Refused(c, "").fatal for c in ("diverged", "log-trimmed", "unknown-volume", "cluster", "protocol"))


# ---------------------------------------------------------------------------- out of order

BEAT = Heartbeat(uuid="u-1", head_lsn=1, durable_lsn=1, time=0.0, probe=0, lag_bytes=0, lag_records=0, lag_seconds=0.0)
INFO = ImageInfo(lsn=1, chain=bytes(16), size=1024, uuid="u-1")
WELCOME = Welcome(node="a", volume="vm", uuid="u-1", size=1024, epoch=1, head_lsn=1, durable_lsn=1)
ACK = Ack(fetched_lsn=1, replayed_lsn=1)
FETCH = Fetch(from_lsn=1, prev_chain=bytes(16))
RECORDS = Records(records(1, 1))


def server_at(phase: str) -> Pair:
    """A pair whose server is in ``phase``."""
    want: Want = "image" if "IMAGE" in phase else "fetch"
    pair = Pair(volume(1, 10), volume(1, 5), want=want)
    if phase != "AWAIT_HELLO":
        pair.connect()
    if phase == "SHIPPING":
        pair.to_server(pair.client.fetch(0.0))
    if phase == "AWAIT_IMAGE_ACK":
        pair.server.start_image()
        pair.server.end_image()
    assert pair.server.phase.name == phase
    return pair


@pytest.mark.parametrize("phase, msg", [
    ("AWAIT_HELLO", FETCH), ("AWAIT_HELLO", ACK), ("AWAIT_HELLO", RECORDS), ("AWAIT_HELLO", WELCOME),
    ("AWAIT_FETCH", hello()), ("AWAIT_FETCH", ACK), ("AWAIT_FETCH", RECORDS), ("AWAIT_FETCH", BEAT),
    ("AWAIT_FETCH", Error(code="x", error="y")),
    ("SHIPPING", hello()), ("SHIPPING", FETCH), ("SHIPPING", RECORDS), ("SHIPPING", INFO),
    ("SENDING_IMAGE", ACK), ("SENDING_IMAGE", FETCH), ("SENDING_IMAGE", hello()),
    ("AWAIT_IMAGE_ACK", FETCH), ("AWAIT_IMAGE_ACK", RECORDS),
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
    if phase in ("WELCOMED", "FETCHING", "IMAGE", "IMAGE_END"):
        pair.to_client(WELCOME)
    if phase == "FETCHING":
        pair.client.fetch(0.0)
    if phase in ("IMAGE", "IMAGE_END"):
        pair.to_client(INFO)
    if phase == "IMAGE_END":
        pair.to_client(ImageEnd(lsn=1))
    assert pair.client.phase.name == phase
    return pair


@pytest.mark.parametrize("phase, want, msg", [
    ("START", "fetch", WELCOME), ("START", "fetch", Error(code="x", error="y")),
    ("AWAIT_WELCOME", "fetch", RECORDS), ("AWAIT_WELCOME", "fetch", BEAT), ("AWAIT_WELCOME", "image", INFO),
    ("WELCOMED", "fetch", RECORDS), ("WELCOMED", "fetch", INFO), ("WELCOMED", "image", RECORDS),
    ("WELCOMED", "image", ImageData(0, b"x")), ("WELCOMED", "fetch", WELCOME),
    ("FETCHING", "fetch", WELCOME), ("FETCHING", "fetch", INFO), ("FETCHING", "fetch", hello()),
    ("FETCHING", "fetch", ACK), ("FETCHING", "fetch", FETCH),
    ("IMAGE", "image", RECORDS), ("IMAGE", "image", INFO), ("IMAGE", "image", BEAT),
    ("IMAGE_END", "image", ImageData(0, b"x")), ("IMAGE_END", "image", ImageEnd(lsn=1)),
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
    pair = client_at("IMAGE", "image")  # an image of 1024 bytes at LSN 1
    with pytest.raises(ProtocolError, match="IMAGE_DATA: field 'offset' 1000 \\+ 25 bytes"):
        pair.to_client(ImageData(1000, bytes(25)))
    pair = client_at("IMAGE", "image")
    with pytest.raises(ProtocolError, match="IMAGE_END: field 'lsn' 2 is not the image's LSN 1"):
        pair.to_client(ImageEnd(lsn=2))


def test_refusal_may_come_in_any_open_phase() -> None:
    for phase, want in [("AWAIT_WELCOME", "fetch"), ("WELCOMED", "fetch"), ("FETCHING", "fetch"),
                        ("IMAGE", "image"), ("IMAGE_END", "image")]:
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
    assert pair.server.poll() is None
    pair.to_server(second)  # read after the poll: the next heartbeat must not claim it
    assert pair.server.heartbeat_due(1.3)
    beat = pair.server.heartbeat(1.3, wall=5.0, lag=(0, 0, 0.0))
    assert beat.probe == 1
    assert not pair.server.heartbeat_due(1.3 + HEARTBEAT - 0.01)
    assert pair.server.heartbeat_due(1.3 + HEARTBEAT)
    pair.to_client(beat, now=1.4)
    assert pair.state.heartbeat_basis == 1.0 and pair.state.last_heartbeat == 1.4
    pair.server.poll()
    pair.to_client(pair.server.heartbeat(1.8, wall=5.5, lag=(0, 0, 0.0)), now=1.9)
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


# ---------------------------------------------------------------------------- volume identity (issue 8)


def test_a_mirror_refuses_a_source_volume_with_another_uuid() -> None:
    """A volume deleted and created again under its name is another volume: the WELCOME says so."""
    served = volume(1, 30)
    served.uuid = "u-2"
    pair = Pair(served, volume(1, 10))
    got = pair.connect()
    assert isinstance(got, Refused) and got.code == "volume-replaced" and got.fatal
    assert pair.client.phase is FetchPhase.CLOSED
    assert "uuid u-2 there, u-1 here" in got.message and "deleted on a and created anew" in got.message
    assert "marsfs leave vm, then marsfs join vm --from a" in got.message


def test_every_heartbeat_names_the_volume_and_the_mirror_checks_it() -> None:
    served, mirror = volume(1, 10), volume(1, 10)
    pair = Pair(served, mirror)
    pair.start_fetch()
    pair.server.poll()
    beat = pair.server.heartbeat(0.0, wall=1.0, lag=(0, 0, 0.0))
    assert beat.uuid == "u-1" and isinstance(pair.to_client(beat, now=0.1), Heartbeat)
    got = pair.to_client(replace(BEAT, uuid="u-2"), now=0.2)
    assert isinstance(got, Refused) and got.code == "volume-replaced" and got.fatal
    assert pair.client.phase is FetchPhase.CLOSED and not pair.client.following


def test_an_image_is_of_the_welcomed_volume() -> None:
    pair = client_at("WELCOMED", "image")
    with pytest.raises(ProtocolError, match="IMAGE_INFO: field 'uuid' u-2 is not the WELCOME's u-1"):
        pair.to_client(replace(INFO, uuid="u-2"))
    assert pair.client.phase is FetchPhase.CLOSED


@pytest.mark.parametrize("phase", ["AWAIT_FETCH", "SHIPPING", "SENDING_IMAGE", "AWAIT_IMAGE_ACK"])
def test_a_session_ends_when_its_volume_is_deleted(phase: str) -> None:
    pair = server_at(phase)
    served = pair.served
    assert pair.server.volume_gone(served) is None  # still the node's volume of that name
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
    anew = volume(1, 3)
    anew.uuid = "u-2"
    gone = pair.server.volume_gone(anew)
    assert isinstance(gone, Error) and gone.code == "volume-deleted"
    assert "deleted volume vm (uuid u-1) and created a new volume vm (uuid u-2)" in gone.error
    got = pair.to_client(gone)
    assert isinstance(got, Refused) and got.fatal and pair.client.phase is FetchPhase.CLOSED


def test_volume_gone_before_admission_or_after_the_end_says_nothing() -> None:
    pair = Pair(volume(), want="leave")
    assert pair.server.volume_gone(None) is None  # nothing admitted yet
    pair.connect()
    assert pair.server.phase is ServePhase.DONE and pair.server.volume_gone(None) is None


# ---------------------------------------------------------------------------- a paused fetch watches (issue 8)


def test_a_paused_fetch_watches_and_keeps_learning_the_lag() -> None:
    served, mirror = volume(1, 10), volume(1, 10)
    pair = Pair(served, mirror)
    assert isinstance(pair.connect(), Welcome)
    fetch = pair.client.fetch(now=1.0, watch=True)
    assert fetch.watch and pair.client.phase is FetchPhase.WATCHING and pair.client.following
    assert pair.state.connected
    assert pair.to_server(fetch) == StartShipping(after=10) and pair.server.watching
    served.log.last_lsn = served.durable_lsn = 40  # the primary writes on
    assert pair.server.poll() is None  # no records for a watcher...
    assert pair.server.heartbeat_due(2.0)  # ...but heartbeats, with the durable LSN
    beat = pair.server.heartbeat(2.0, wall=1e9, lag=(30 * 65_600, 30, 4.0))
    assert beat.durable_lsn == 40
    pair.to_client(beat, now=2.0)
    st = pair.state
    assert (st.primary_durable_lsn, st.lag_records, st.lag_bytes, st.lag_seconds) == (40, 30, 30 * 65_600, 4.0)
    ack = pair.client.ack(now=2.1, replayed_lsn=10, fetch_paused=True, replay_paused=False)
    assert pair.to_server(ack) == ack and pair.server.hold_lsn == 10
    with pytest.raises(ProtocolError, match="RECORDS is not allowed in state WATCHING"):
        pair.to_client(Records(records(11, 1)))
    assert not pair.client.following


def test_a_fetch_that_is_not_paused_does_not_watch() -> None:
    pair = Pair(volume(1, 20), volume(1, 10))
    pair.start_fetch()
    assert not pair.server.watching and pair.client.phase is FetchPhase.FETCHING and pair.client.following
    assert pair.server.poll() == Ship(11, 20, FIRST_BATCH)


# ---------------------------------------------------------------------------- image scan progress (issue 8)


def test_an_image_scan_through_zeros_reports_progress() -> None:
    served = volume(1, 5)
    served.size = 300 * IMAGE_CHUNK
    pair = Pair(served, want="image")
    pair.connect()
    info = pair.server.start_image()
    pair.to_client(info)
    zeros = bytes(IMAGE_CHUNK)
    sent: list[tuple[float, object]] = []
    now = 0.0
    for off, n in pair.server.image_chunks():  # 300 chunks of zeros, one every 1 ms, one of data
        now += 0.001
        data = b"\1" * n if off == 150 * IMAGE_CHUNK else zeros[:n]
        msg = pair.server.image_chunk(off, data, now)
        if msg is not None:
            assert pair.to_client(msg, now) == msg
            sent.append((now, msg))
            assert pair.client.scanned == off + n  # the mirror knows how far the scan got
    kinds = [type(m).__name__ for _, m in sent]
    assert kinds.count("ImageData") == 1 and sent[0][1] == ImageProgress(IMAGE_CHUNK)  # at once
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:])]
    assert max(gaps) <= PROGRESS_EVERY + 0.001  # at least every 0.2 s...
    assert len(sent) < 10  # ...and not per chunk
    # a fast scan reports every PROGRESS_BYTES
    fast = Pair(served, want="image")
    fast.connect()
    fast.server.start_image()
    reports = [m for off, n in fast.server.image_chunks()
               if (m := fast.server.image_chunk(off, zeros[:n], 0.0)) is not None]
    assert [m.scanned for m in reports if isinstance(m, ImageProgress)] == [
        IMAGE_CHUNK, *range(IMAGE_CHUNK + PROGRESS_BYTES, 300 * IMAGE_CHUNK + 1, PROGRESS_BYTES)]


def test_image_progress_is_checked() -> None:
    pair = client_at("IMAGE", "image")  # an image of 1024 bytes
    with pytest.raises(ProtocolError, match="IMAGE_PROGRESS: field 'scanned' 1025 lies past the image's 1024"):
        pair.to_client(ImageProgress(1025))
    pair = client_at("IMAGE", "image")
    pair.to_client(ImageProgress(1000))
    pair.to_client(ImageProgress(512))  # never backwards
    assert pair.client.scanned == 1000
    for phase, want in [("FETCHING", "fetch"), ("WELCOMED", "image"), ("IMAGE_END", "image")]:
        pair = client_at(phase, want)  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match="IMAGE_PROGRESS is not allowed"):
            pair.to_client(ImageProgress(1))
