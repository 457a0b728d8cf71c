"""A kit for driving the replication sessions (marsfs.replication.session) in memory (t0).

Like h11's ConnectionPair: each side's output goes through the wire codec into the other
side. Volumes are small fakes; :class:`Pair` plays the I/O shells' part (what ``server`` and
``fetch`` read of the volume and pass in as values), so tests of the rules need no disk.
Time is a number passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marsfs.log.record import RecordType, encode_header, encode_payload
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Error,
    Fetch,
    Heartbeat,
    Hello,
    Message,
    Records,
    SyncInfo,
    Want,
    Welcome,
    encode_message,
)
from marsfs.replication.server import log_facts
from marsfs.replication.session import (
    FetchingSession,
    FetchState,
    Probes,
    ServingSession,
    Ship,
    StartShipping,
    VolumeFacts,
    shippable_lsn,
)
from marsfs.testing.wire import decode_frame

CLUSTER = "c"
CHAIN = bytes(range(16))
SIZE = 3 * 1024 * 1024 + 512  #: a fake volume's size unless a test sets another


def records(first: int, n: int, size: int = 100) -> tuple[bytes, ...]:
    """``n`` verified WRITE records from LSN ``first`` (each of ``size`` payload bytes)."""
    out = []
    chain_value = CHAIN
    for lsn in range(first, first + n):
        payload = encode_payload(bytes([lsn % 256]) * size)
        head, chain_value = encode_header(RecordType.WRITE, lsn, 4096 * lsn, payload, 1_000_000 * lsn, chain_value)
        out.append(head + payload.stored)
    return tuple(out)


def wire(msg: Message) -> Message:
    """``msg`` after the codec (what the peer gets)."""
    return decode_frame(encode_message(msg))


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
    size: int = SIZE
    replay_limit: int | None = None

    @property
    def head_lsn(self) -> int:
        return self.log.last_lsn

    @property
    def replayed_lsn(self) -> int:
        return self.head_lsn if self.replay_limit is None else self.replay_limit

    def facts(self) -> VolumeFacts:
        return VolumeFacts(name=self.name, uuid=self.uuid, size=self.size, head_lsn=self.head_lsn,
                           durable_lsn=self.durable_lsn)


def volume(first: int = 1, last: int = 100, durable: int | None = None, history: str = "h",
           diverged_after: int | None = None) -> FakeVolume:
    return FakeVolume(FakeLog(first, last, history, diverged_after), last if durable is None else durable)


def hello(want: Want = "fetch", *, proto: int = PROTO_VERSION, cluster: str = CLUSTER) -> Hello:
    return Hello(proto=proto, cluster=cluster, node="b", volume="vm", want=want, epoch=0)


@dataclass
class Pair:
    """A serving and a fetching session wired together over the codec, with the shells' reads
    of ``served`` (node a) and ``mirror`` (node b) done here."""

    served: FakeVolume | None
    mirror: FakeVolume | None = None
    want: Want = "fetch"
    server: ServingSession = field(init=False)
    client: FetchingSession = field(init=False)
    state: FetchState = field(default_factory=lambda: FetchState(source="a"))
    probes: Probes = field(default_factory=Probes)

    def __post_init__(self) -> None:
        self.server = ServingSession("a", CLUSTER)
        self.client = FetchingSession(hello(self.want), state=self.state, probes=self.probes,
                                      uuid=self.mirror.uuid if self.mirror is not None else None)

    def to_server(self, msg: Message) -> object:
        """What the server answers; a FETCH is admitted against the served log (as server.py does)."""
        got = self.server.receive(wire(msg))
        if isinstance(got, Fetch):
            assert self.served is not None
            return self.server.admit_fetch(log_facts(self.served.log, got.from_lsn - 1))
        return got

    def to_client(self, msg: Message, now: float = 0.0) -> object:
        return self.client.receive(wire(msg), now)

    def connect(self) -> object:
        got = self.to_server(self.client.hello())
        assert isinstance(got, Hello)
        return self.to_client(self.server.admit(self.served.facts() if self.served is not None else None, 7))

    def fetch(self, now: float = 0.0, *, watch: bool = False) -> Fetch:
        """The mirror's FETCH (its log's end read from ``mirror``)."""
        m = self.mirror
        assert m is not None
        return self.client.fetch(now, last_lsn=m.log.last_lsn, last_chain=m.log.last_chain,
                                 durable_lsn=m.durable_lsn, watch=watch)

    def start_fetch(self, now: float = 0.0) -> Error | StartShipping:
        assert isinstance(self.connect(), Welcome)
        got = self.to_server(self.fetch(now))
        assert isinstance(got, Error | StartShipping), got
        return got

    def poll(self) -> Ship | None:
        assert self.served is not None
        return self.server.poll(shippable_lsn(self.served))

    def heartbeat(self, now: float, wall: float, lag: tuple[int, int, float]) -> Heartbeat:
        assert self.served is not None
        return self.server.heartbeat(now, wall, lag, self.served.head_lsn)

    def since_known(self) -> bool:
        """Whether the server may compare only what changed since the SYNC_REQUEST's LSN."""
        req = self.server.sync_request
        assert self.served is not None and req is not None
        return self.server.since_known(log_facts(self.served.log, req.since_lsn), shippable_lsn(self.served))

    def plan_sync(self, changed: list[tuple[int, int]] | None, lsn: int) -> SyncInfo:
        assert self.served is not None
        return self.server.plan_sync(changed, lsn, self.served.log.chain_at(lsn), self.served.size)


def ship(pair: Pair, now: float) -> Records | None:
    """One round of the server's ship loop; the mirror appends what comes."""
    mirror = pair.mirror
    assert mirror is not None
    todo = pair.poll()
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
