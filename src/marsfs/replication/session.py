"""Replication sessions as pure state machines (h11 style): no I/O, no trio, no clock reads.

Everything that decides the node-to-node conversation lives here; ``server`` and ``fetch``
only move bytes, read and write the volume (in worker threads where that blocks) and sleep.
A session holds no volume: it is fed events - a decoded message, the time (``now``, passed
in), local facts as values the I/O shell read (:class:`VolumeFacts`, :class:`LogFacts`,
positions as arguments) - and answers with what to do: a message to send, what to read
next, records to append, a refusal, or a :class:`ProtocolError` (raised; the caller closes
the connection and logs it at INFO).

Rules that hold here:

* Each side has its states and allowed transitions as a table (``_SERVE`` and ``_FETCH``).
  A message that is valid on the wire but not allowed in the current state (RECORDS before
  FETCH, a second HELLO, SYNC_DATA on a fetch session) is a :class:`ProtocolError`, and the
  session is ``CLOSED`` for good. An ERROR from the server is allowed in every open state.
* Admission (serving side): HELLO must speak our protocol (``protocol``), be for our cluster
  (``cluster``) and name a volume we have (``unknown-volume``). A FETCH whose log reaches
  beyond ours, or whose chain differs from ours at that LSN, is ``diverged``; one that needs
  records we no longer hold is ``log-trimmed``. Refusals are ERROR messages and end the
  session. What a refusal means to the refused mirror is one table, :data:`REFUSALS`: each
  code is a :class:`Stop` (retry, resync what changed, split brain, needs-resync, fatal); the
  I/O shells act on the Stop and never compare codes.
* Only records that are durable here are shipped (G3), and on a mirror serving another mirror
  only records it has replayed, so a chain of mirrors stays prefix-consistent
  (:func:`shippable_lsn`). A fast sync's target is the volume at that LSN.
* Volume identity: a volume is its uuid, not its name. The serving side is asked, at every
  step of its loops, whether the volume it serves is still the node's volume of that name
  (:meth:`ServingSession.volume_gone`); when it was deleted (and maybe created again) the
  session ends with ERROR ``volume-deleted``. The fetching side compares the uuid of the
  WELCOME and of every HEARTBEAT with its own volume's; another uuid ends the session as
  ``volume-replaced``. Both are :attr:`Stop.NEEDS_RESYNC`: the mirror's copy belongs to a
  volume that is gone, and only the operator can say what to do with it. Within one volume, the chain is
  what is checked: at admission (``prev_chain``) and on every appended record.
* A paused fetch still watches: its FETCH has ``watch`` set, the server sends heartbeats and
  no records, so the mirror keeps knowing the source's durable LSN and how far behind it is.
  Pausing or resuming starts a new session (records in flight belong to the old one).
* Fast sync (want ``sync``): the mirror's SYNC_SUMS must walk the SYNC_INFO's ranges in
  order, whole blocks of one range per message (:class:`RangeCursor`); the source answers each
  with the blocks whose sums differ and a SYNC_PROGRESS, and SYNC_END only when every range is
  compared. The mirror accepts SYNC_DATA only for blocks whose sums it sent and the source has
  not yet reported compared, keeps at most :data:`SUMS_AHEAD` bytes of sums unanswered, and
  counts the source's silence as a stall only while sums are unanswered. Data is paced by
  :class:`Pace`; progress and ETA are :class:`SyncStatus`'s. The ranges are what changed since
  the mirror's ``since_lsn`` when our log can tell (:meth:`ServingSession.changes` names the
  change set the shell reads), else the whole image; a staged resync meets a newer target by
  :func:`stage_step` (retarget, or start over).
* Slow start: a session's first RECORDS frame holds at most :data:`FIRST_BATCH` bytes (or
  one record), each later one twice as much, up to :data:`BATCH_BYTES`.
* A source that stops cleanly says goodbye: once it has nothing more to ship, its last
  HEARTBEAT (its log durable first; :meth:`ServingSession.farewell` says when that went out,
  after the last records shipped), then ERROR ``stopping`` (:attr:`Stop.RETRY`). The mirror
  keeps that heartbeat as the source's final word (``FetchState.final``) until it hears from
  the source again, so a failover then knows exactly what it lacks.
* A HEARTBEAT goes out at once and then every :data:`HEARTBEAT` seconds; it echoes the newest
  ACK probe read *before* the shippable LSN it reports, so the mirror knows how old the state
  it describes can be at most (:class:`Probes`, ``FetchState.heartbeat_basis``).
* The fetching side expects records to continue its log (the first LSN of each RECORDS is
  the next one it needs), corrects the server's lag figures by what arrived since the server
  computed them, and calls a connection stalled after :data:`STALL_AFTER` seconds without a
  frame. Reconnects back off from :data:`BACKOFF_MIN` doubling to :data:`BACKOFF_MAX`, back to
  the minimum after a session that moved the log forward (:class:`Backoff`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Protocol, TypeAlias

from marsfs.errors import ProtocolError
from marsfs.replication.protocol import (
    PROTO_VERSION,
    Ack,
    Error,
    Fetch,
    Heartbeat,
    Hello,
    Message,
    Records,
    SumsRequest,
    SyncData,
    SyncEnd,
    SyncInfo,
    SyncProgress,
    SyncRequest,
    SyncSums,
    Want,
    Welcome,
)
from marsfs.volume.blocksums import BLOCK, SUM_SIZE, block_ranges, block_sums, differing_blocks
from marsfs.volume.holds import mirror_hold

BATCH_BYTES = 4 * 1024 * 1024
FIRST_BATCH = 64 * 1024  #: a session's first frame; each later one may be twice as big
HEARTBEAT = 0.5
STALL_AFTER = 10.0  #: seconds without progress (while there is lag) before a fetch or replay is stalled
ACK_EVERY = 0.2
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
SUMS_BLOCKS = 1024  #: blocks per SYNC_SUMS: 4 MiB of image, 8 KiB of sums
SUMS_AHEAD = 64 * 1024 * 1024  #: how far the mirror's sums may run ahead of the source's progress
PACE_BURST = 0.1  #: seconds of data a rate-limited sync may send at once
_PROBES_KEPT = 100
_SAMPLES_KEPT = 50


# ---------------------------------------------------------------------------- local facts


class Positions(Protocol):
    """The two positions that bound what a node may ship (``marsfs.volume.Volume`` has them)."""

    @property
    def durable_lsn(self) -> int: ...
    @property
    def replayed_lsn(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SyncWord:
    """What a primary says about its replication mode in each heartbeat (see ``Heartbeat``):
    enough for a mirror to tell, at a failover, what the primary may have acknowledged that
    the mirror lacks."""

    mode: str = "async"  #: ``async`` or ``sync``
    mirrors: int = 0  #: sync: the mirrors that must hold a flush before it completes
    refuse: bool = False  #: sync: a flush fails (EIO) rather than complete without them
    degraded_since: float = 0.0  #: wall time it degraded to async (0: it did not)
    acked_lsn: int = 0  #: the newest LSN a completed flush acknowledged to an application


def shippable_lsn(vol: Positions) -> int:
    """The newest LSN we may ship: durable here, and replayed if we are a mirror."""
    return min(vol.durable_lsn, vol.replayed_lsn)


@dataclass(frozen=True, slots=True)
class VolumeFacts:
    """A served volume as it stood when the I/O shell read it (the WELCOME tells the mirror)."""

    name: str
    uuid: str
    size: int
    head_lsn: int
    durable_lsn: int


@dataclass(frozen=True, slots=True)
class LogFacts:
    """What our log said about one LSN when the I/O shell read it: the log's ends and the
    chain after record ``lsn`` (None: the log does not hold it, ``lsn`` lies outside
    ``first_lsn - 1 .. last_lsn``)."""

    lsn: int
    first_lsn: int
    last_lsn: int
    chain: bytes | None


@dataclass(frozen=True, slots=True)
class SyncTarget:
    """The target of a staged resync: the source's volume ``uuid`` at ``lsn`` (chain, size)."""

    uuid: str
    lsn: int
    chain: bytes
    size: int


# ---------------------------------------------------------------------------- refusals


class Stop(Enum):
    """What a refused mirror does next: the meaning of a refusal code (:data:`REFUSALS`)."""

    RETRY = "retry"  #: a passing condition (a switch, a local failure there): reconnect after the backoff
    RESYNC = "resync"  #: the source no longer holds the log we need: fast-sync what changed, then fetch
    SPLIT_BRAIN = "split-brain"  #: our histories diverged: fetching stops; the node looks for the fork
    #: the copy belongs to a volume that is gone there (deleted, maybe created anew): fetching stops
    NEEDS_RESYNC = "needs-resync"
    FATAL = "fatal"  #: retrying cannot help (another protocol or cluster, no such volume): fetching stops

    @property
    def stops(self) -> bool:
        """Fetching ends until an operator acts."""
        return self in (Stop.SPLIT_BRAIN, Stop.NEEDS_RESYNC, Stop.FATAL)


#: The one table of what each refusal code means to the mirror it refuses. A code not listed
#: (a newer peer's, or a conversation's own like ``busy``) is :attr:`Stop.RETRY`: nothing says
#: retrying cannot help.
REFUSALS: Mapping[str, Stop] = {
    "protocol": Stop.FATAL,
    "cluster": Stop.FATAL,
    "unknown-volume": Stop.FATAL,
    "diverged": Stop.SPLIT_BRAIN,
    "log-trimmed": Stop.RESYNC,
    "volume-deleted": Stop.NEEDS_RESYNC,
    "volume-replaced": Stop.NEEDS_RESYNC,
    "switching": Stop.RETRY,
    "stopping": Stop.RETRY,  # the source stops cleanly; the heartbeat before it was its last word
    "error": Stop.RETRY,
    "unsupported": Stop.RETRY,
    "unknown-want": Stop.RETRY,
    "unknown-node": Stop.RETRY,  # the source does not know us (yet: its --peer list may grow)
    "node-identity": Stop.RETRY,  # another node of our name runs there: one of the two stops
    "not-a-member": Stop.RETRY,  # the source does not know us as a member (yet: our metadata may not have reached it)
}


def refusal_stop(code: str) -> Stop:
    """What a refusal with ``code`` means to the refused mirror (see :data:`REFUSALS`)."""
    return REFUSALS.get(code, Stop.RETRY)


@dataclass(frozen=True, slots=True)
class Refused:
    """The session is over for a reason in ``code``: the server's ERROR, or what the fetching
    side found itself (``volume-replaced``: the source's volume is not ours)."""

    code: str
    message: str

    @property
    def stop(self) -> Stop:
        return refusal_stop(self.code)


def _refusal(code: str, message: str) -> Error:
    return Error(code=code, error=message)


def _step(table: dict[tuple[Enum, object], Enum], state: Enum, event: Enum | Message, side: str) -> Enum:
    """The state after ``event``: a ProtocolError when the table does not allow a message from
    the peer; a local event the table does not allow is our bug."""
    if isinstance(event, Enum):
        target = table.get((state, event))
        assert target is not None, f"{event.name} in state {state.name} of the {side} session"
        return target
    target = table.get((state, type(event)))
    if target is None:
        raise ProtocolError(f"{event.TYPE.name} is not allowed in state {state.name} of the {side} session")
    return target


# ---------------------------------------------------------------------------- fast sync helpers


def sync_ranges(ranges: list[tuple[int, int]], size: int) -> tuple[tuple[int, int], ...]:
    """``ranges`` as a sync compares them: widened to whole blocks, clipped to the image,
    sorted and merged (touching ranges become one)."""
    spans = sorted((off // BLOCK * BLOCK, min(size, -(-(off + n) // BLOCK) * BLOCK))
                   for off, n in ranges if off < size and n > 0)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return tuple((start, end - start) for start, end in out)


def check_sync_ranges(ranges: tuple[tuple[int, int], ...], size: int) -> str | None:
    """Why ``ranges`` are not what a SYNC_INFO may name (None: they are): in order, apart,
    block-aligned, inside the image."""
    end = -1
    for off, n in ranges:
        if off <= end:
            return f"range at {off} is not after the one before it"
        if off + n > size:
            return f"range ({off}, {n}) lies past the image's {size} bytes"
        if off % BLOCK or (n % BLOCK and off + n != size):
            return f"range ({off}, {n}) is not aligned to {BLOCK}-byte blocks"
        end = off + n
    return None


@dataclass(frozen=True, slots=True)
class Compare:
    """A SYNC_SUMS to answer: the mirror's ``sums`` of ``length`` bytes at ``offset``."""

    offset: int
    length: int
    sums: bytes


class RangeCursor:
    """Walks a sync's ranges in SYNC_SUMS steps: where the next sums must start, and how far
    (in bytes of the ranges, counted in order) the sums got."""

    def __init__(self, ranges: tuple[tuple[int, int], ...]) -> None:
        self._ranges = ranges
        self._index = 0
        self._within = 0
        self.done = 0  #: bytes of the ranges covered

    @property
    def finished(self) -> bool:
        return self._index >= len(self._ranges)

    def next_chunk(self, blocks: int = SUMS_BLOCKS) -> tuple[int, int] | None:
        """(offset, length) of the next step of at most ``blocks`` blocks (None: all covered)."""
        if self.finished:
            return None
        off, n = self._ranges[self._index]
        return off + self._within, min(blocks * BLOCK, n - self._within)

    def take(self, offset: int, blocks: int, fail: Callable[[str], ProtocolError]) -> int:
        """Advance over ``blocks`` blocks that must start at ``offset``; returns their length in
        bytes. A step that is not the next one, or runs past its range, is ``fail(why)``."""
        nxt = self.next_chunk(max(blocks, 1))
        if nxt is None:
            raise fail(f"sums at offset {offset} after every range was covered")
        if offset != nxt[0]:
            raise fail(f"field 'offset' is {offset}, not the next block to compare ({nxt[0]})")
        off, n = self._ranges[self._index]
        length = min(blocks * BLOCK, n - self._within)
        if blocks == 0 or -(-length // BLOCK) != blocks:
            raise fail(f"{blocks} sums at offset {offset} do not fit the range ({off}, {n})")
        self._within += length
        self.done += length
        if self._within == n:
            self._index, self._within = self._index + 1, 0
        return length

    def position(self, offset: int) -> int | None:
        """``offset`` counted in bytes of the ranges (None: it lies in none of them)."""
        before = 0
        for off, n in self._ranges:
            if off <= offset < off + n:
                return before + offset - off
            before += n
        return None


class Pace:
    """A byte rate limit (bytes/s; 0: none): how long to wait before sending ``nbytes`` so that
    what was sent stays within the rate, with bursts of at most :data:`PACE_BURST` seconds."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._free_at: float | None = None  #: when everything sent so far has "left" at the rate

    def delay(self, now: float, nbytes: int) -> float:
        if not self.rate:
            return 0.0
        start = now - PACE_BURST if self._free_at is None else max(self._free_at, now - PACE_BURST)
        self._free_at = start + nbytes / self.rate
        return max(0.0, self._free_at - now)


def combined_rate(*rates: int) -> int:
    """The strictest of several limits (0: unlimited)."""
    limits = [r for r in rates if r > 0]
    return min(limits) if limits else 0


class StageStep(Enum):
    """What the mirror does with its staged resync for a SYNC_INFO's target (:func:`stage_step`)."""

    BEGIN = auto()  #: nothing is staged: begin staging for the target
    RESTART = auto()  #: what is staged is of another volume or a newer target: abort it, begin anew
    RETARGET = auto()  #: the source is further now: move the staged resync's target
    CONTINUE = auto()  #: what is staged is for this very target


def stage_step(staged: SyncTarget | None, info: SyncInfo) -> StageStep:
    """How a staged resync (of ``staged``, None: none) meets the target ``info``: an older target
    cannot be reached from staged blocks of a newer one, so it starts over."""
    if staged is None:
        return StageStep.BEGIN
    if staged.uuid != info.uuid or info.lsn < staged.lsn:
        return StageStep.RESTART
    if (staged.lsn, staged.chain, staged.size) != (info.lsn, info.chain, info.size):
        return StageStep.RETARGET
    return StageStep.CONTINUE


@dataclass
class SyncStatus:
    """A fast sync's progress as the mirror knows it (status shows it; outlives sessions).

    ``total``/``compared``: bytes of the ranges; ``received``: data bytes received. Times are
    the caller's clock."""

    started: float
    total: int = 0
    compared: int = 0
    received: int = 0
    lsn: int = 0  #: the target version
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_SAMPLES_KEPT))
    waiting: str = ""  #: why the switch cannot happen yet (old versions still open), "" if it can

    @property
    def fraction(self) -> float:
        return self.compared / self.total if self.total else 0.0

    def update(self, now: float, compared: int, received: int) -> None:
        self.compared, self.received = compared, received
        if not self.samples or now - self.samples[-1][0] >= 0.1:
            self.samples.append((now, compared))

    def rate(self) -> float:
        """Compared bytes per second over the last samples."""
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        left = self.total - self.compared
        return 0.0 if not left else (left / rate if rate else None)


# ---------------------------------------------------------------------------- serving side


class ServePhase(Enum):
    AWAIT_HELLO = auto()
    ADMITTING = auto()  #: HELLO or FETCH read; the caller reads the volume or log and calls admit()/admit_fetch()
    AWAIT_FETCH = auto()
    SHIPPING = auto()
    AWAIT_SYNC_REQUEST = auto()
    PLANNING_SYNC = auto()  #: SYNC_REQUEST read; the caller reads the changes and calls plan_sync()
    SENDING_SYNC = auto()  #: comparing the mirror's sums, sending what differs
    AWAIT_SYNC_ACK = auto()
    SERVING_SUMS = auto()  #: want=sums: SUMS_REQUESTs answered (marsfs.replication.verify)
    DONE = auto()
    CLOSED = auto()  #: refused, or the peer broke the protocol


class ServeEvent(Enum):
    WELCOME_FETCH = auto()
    WELCOME_LEAVE = auto()
    WELCOME_SUMS = auto()
    WELCOME_OTHER = auto()  #: a conversation another module carries on (handover, compare)
    ACCEPT_FETCH = auto()
    REFUSE = auto()
    VOLUME_GONE = auto()  #: the volume served was deleted (maybe created again) on this node
    WELCOME_SYNC = auto()
    SYNC_PLANNED = auto()
    SYNC_END = auto()


_S = ServePhase
_SERVE: dict[tuple[Enum, object], Enum] = {
    (_S.AWAIT_HELLO, Hello): _S.ADMITTING,
    (_S.ADMITTING, ServeEvent.WELCOME_FETCH): _S.AWAIT_FETCH,
    (_S.ADMITTING, ServeEvent.WELCOME_LEAVE): _S.DONE,
    (_S.ADMITTING, ServeEvent.WELCOME_OTHER): _S.DONE,
    (_S.ADMITTING, ServeEvent.REFUSE): _S.CLOSED,
    (_S.AWAIT_FETCH, Fetch): _S.ADMITTING,
    (_S.ADMITTING, ServeEvent.ACCEPT_FETCH): _S.SHIPPING,
    (_S.SHIPPING, Ack): _S.SHIPPING,
    (_S.ADMITTING, ServeEvent.WELCOME_SYNC): _S.AWAIT_SYNC_REQUEST,
    (_S.AWAIT_SYNC_REQUEST, SyncRequest): _S.PLANNING_SYNC,
    (_S.PLANNING_SYNC, ServeEvent.SYNC_PLANNED): _S.SENDING_SYNC,
    (_S.SENDING_SYNC, SyncSums): _S.SENDING_SYNC,
    (_S.SENDING_SYNC, ServeEvent.SYNC_END): _S.AWAIT_SYNC_ACK,
    (_S.AWAIT_SYNC_ACK, Ack): _S.DONE,
    (_S.ADMITTING, ServeEvent.WELCOME_SUMS): _S.SERVING_SUMS,
    (_S.SERVING_SUMS, SumsRequest): _S.SERVING_SUMS,
    **{(phase, ServeEvent.VOLUME_GONE): _S.CLOSED
       for phase in (_S.AWAIT_FETCH, _S.ADMITTING, _S.SHIPPING, _S.SERVING_SUMS, _S.AWAIT_SYNC_REQUEST,
                     _S.PLANNING_SYNC, _S.SENDING_SYNC, _S.AWAIT_SYNC_ACK)},
}
_WELCOME_EVENT = {"fetch": ServeEvent.WELCOME_FETCH, "leave": ServeEvent.WELCOME_LEAVE,
                  "sums": ServeEvent.WELCOME_SUMS, "sync": ServeEvent.WELCOME_SYNC,
                  "handover": ServeEvent.WELCOME_OTHER, "compare": ServeEvent.WELCOME_OTHER,
                  "position": ServeEvent.WELCOME_OTHER}


@dataclass(frozen=True, slots=True)
class StartShipping:
    """A FETCH was admitted: the mirror holds everything up to ``after``."""

    after: int


@dataclass(frozen=True, slots=True)
class Ship:
    """Records ``first..limit`` are due, in a frame of at most ``batch`` bytes (or one record)."""

    first: int
    limit: int
    batch: int


class Changes(Enum):
    """Which change set bounds a fast sync's ranges (the I/O shell reads it, see plan_sync)."""

    WHOLE = auto()  #: not known: compare the whole image
    WRITTEN = auto()  #: the extents our log's records after the mirror's ``since_lsn`` wrote
    KEPT = auto()  #: what log space kept for the mirror when it dropped the log it needed


class ServingSession:
    """One connection as seen by the node that serves a volume.

    It holds no volume: the I/O shell reads what each step needs (:class:`VolumeFacts` at
    admission, :class:`LogFacts` for a FETCH or a SYNC_REQUEST, the shippable LSN at each
    poll) and passes it in as values."""

    def __init__(self, node: str, cluster: str) -> None:
        self.node = node
        self.cluster = cluster
        self.phase = ServePhase.AWAIT_HELLO
        self.hello: Hello | None = None
        self._served: VolumeFacts | None = None
        self.fetch_request: Fetch | None = None
        #: the mirror's positions, from FETCH and then each ACK
        self.fetched_lsn = 0
        self.replayed_lsn = 0
        self.sent_lsn = 0
        self.probe = 0  #: the newest ACK probe
        self.watching = False  #: the mirror's fetch is paused: heartbeats only
        self._batch = FIRST_BATCH
        self._next_beat: float | None = None
        self._beat_probe = 0  #: the probe read before _beat_limit
        self._beat_limit = 0
        #: a clean stop: the next heartbeat is our last word; set once it went out after the
        #: last records we shipped (see :meth:`farewell`)
        self._farewell: bool | None = None
        self.sync_request: SyncRequest | None = None
        self.sync: SyncInfo | None = None
        self._cursor: RangeCursor | None = None  #: where the mirror's next SYNC_SUMS must start
        self.sync_compared = 0  #: bytes of the sync's ranges compared
        self.sync_sent = 0  #: data bytes sent in this sync

    @property
    def peer(self) -> str:
        return self.hello.node if self.hello is not None else "?"

    @property
    def hold_key(self) -> str:
        """The name under which the mirror's position holds our log."""
        return mirror_hold(self.peer)

    @property
    def hold_lsn(self) -> int:
        """Our log must keep everything after this for the mirror (it may not have replayed more)."""
        return min(self.fetched_lsn, self.replayed_lsn)

    @property
    def served(self) -> VolumeFacts:
        """The volume admitted, as it stood then."""
        assert self._served is not None, "no volume before admit()"
        return self._served

    def _go(self, event: Enum | Message) -> None:
        self.phase = ServePhase(_step(_SERVE, self.phase, event, "serving"))

    def receive(self, msg: Message) -> Hello | Ack | Fetch | SumsRequest | SyncRequest | Compare:
        """Take a message from the client. Returns the HELLO (then call :meth:`admit`), an ACK,
        the FETCH (then call :meth:`admit_fetch`), a SUMS_REQUEST (verify), a SYNC_REQUEST
        (then :meth:`changes` and :meth:`plan_sync`) or, for SYNC_SUMS, what to compare (then
        :meth:`compare`)."""
        try:
            self._go(msg)
        except ProtocolError:
            self.phase = ServePhase.CLOSED
            raise
        if isinstance(msg, Hello):
            self.hello = msg
            return msg
        if isinstance(msg, Fetch):
            self.fetch_request = msg
            return msg
        if isinstance(msg, SyncRequest):
            self.sync_request = msg
            return msg
        if isinstance(msg, SyncSums):
            return self._sums(msg)
        if isinstance(msg, SumsRequest):
            return msg  # what it may ask is marsfs.replication.verify's to judge
        assert isinstance(msg, Ack)
        if self.phase is ServePhase.SHIPPING:
            self.fetched_lsn, self.replayed_lsn, self.probe = msg.fetched_lsn, msg.replayed_lsn, msg.probe
        return msg

    def admit(self, vol: VolumeFacts | None, epoch: int) -> Welcome | Error:
        """Answer the HELLO, given the volume it names (None: we have none of that name)."""
        hello = self.hello
        assert hello is not None and self.phase is ServePhase.ADMITTING
        if hello.proto != PROTO_VERSION:
            return self._refuse("protocol", f"node {self.node} speaks protocol {PROTO_VERSION}")
        if hello.cluster != self.cluster:
            return self._refuse("cluster", f"node {self.node} is in cluster {self.cluster!r}, not {hello.cluster!r}")
        if vol is None:
            return self._refuse("unknown-volume", f"node {self.node} has no volume {hello.volume!r}")
        self._served = vol
        self._go(_WELCOME_EVENT[hello.want])
        return Welcome(node=self.node, volume=vol.name, uuid=vol.uuid, size=vol.size, epoch=epoch,
                       head_lsn=vol.head_lsn, durable_lsn=vol.durable_lsn)

    def _refuse(self, code: str, message: str) -> Error:
        self._go(ServeEvent.REFUSE)
        return _refusal(code, message)

    def volume_gone(self, anew: str | None) -> Error | None:
        """The volume this session serves is no longer the node's volume of its name: it was
        deleted, and ``anew`` is the uuid of the one created under its name since (None:
        none). The session is CLOSED and this is the ERROR to send; a session that is not
        admitted yet or already over has nothing to say."""
        vol = self._served
        if vol is None or self.phase in (ServePhase.DONE, ServePhase.CLOSED):
            return None
        self._go(ServeEvent.VOLUME_GONE)
        created = f" and created a new volume {vol.name} (uuid {anew})" if anew is not None else ""
        return _refusal("volume-deleted", f"{self.node} deleted volume {vol.name} (uuid {vol.uuid}){created}; "
                                          f"the copy on {self.peer} belongs to the deleted volume (to mirror "
                                          f"one of that name again: marsfs leave {vol.name}, then marsfs join "
                                          f"{vol.name} --from {self.node})")

    def admit_fetch(self, log: LogFacts) -> Error | StartShipping:
        """Answer the FETCH, given what our log says about the LSN before its ``from_lsn``."""
        req = self.fetch_request
        assert req is not None and self.phase is ServePhase.ADMITTING
        name, peer = self.served.name, self.peer
        after = req.from_lsn - 1
        assert log.lsn == after
        if after > log.last_lsn:
            return self._refuse("diverged", f"{peer}'s log of {name} reaches LSN {after}, beyond "
                                            f"{self.node}'s {log.last_lsn}: the histories diverged")
        if after < log.first_lsn - 1:
            return self._refuse("log-trimmed", f"{self.node} no longer holds LSN {after + 1} of {name}; "
                                               f"the mirror's image must be resynced from it")
        if log.chain != req.prev_chain:
            return self._refuse("diverged", f"the histories of {name} on {peer} and {self.node} "
                                            f"diverge at or before LSN {after} (split brain)")
        self._go(ServeEvent.ACCEPT_FETCH)
        self.fetched_lsn = self.replayed_lsn = self.sent_lsn = after
        self.watching = req.watch
        return StartShipping(after)

    # -- fast sync

    def since_known(self, log: LogFacts, lsn: int) -> bool:
        """Whether the mirror's image is this volume's at the SYNC_REQUEST's ``since_lsn``, as far
        as our log can tell (``log`` is about that LSN; the chain there matches, and it is not
        beyond the target ``lsn``), so that only extents written after it can differ. A
        request for the whole image knows nothing."""
        req = self.sync_request
        assert req is not None and log.lsn == req.since_lsn
        if req.whole or not log.first_lsn - 1 <= req.since_lsn <= lsn:
            return False
        return log.chain == req.since_chain

    def changes(self, log: LogFacts, lsn: int) -> Changes:
        """Which change set bounds the sync to target ``lsn``, given what our log says about the
        mirror's ``since_lsn``: what our records after it wrote when our log holds it with the
        same chain; when it lies before our log, what log space kept for that mirror when it
        dropped its log; else (another chain there: a divergent mirror; beyond our head) none."""
        req = self.sync_request
        assert req is not None and self.phase is ServePhase.PLANNING_SYNC
        if req.whole:
            return Changes.WHOLE
        if self.since_known(log, lsn):
            return Changes.WRITTEN
        if req.since_lsn < log.first_lsn - 1:
            return Changes.KEPT
        return Changes.WHOLE

    def plan_sync(self, changed: list[tuple[int, int]] | None, lsn: int, chain: bytes, size: int) -> SyncInfo:
        """The SYNC_INFO: the volume at ``lsn`` (shippable, picked after the log was synced; its
        chain ``chain``, the volume's size ``size``), and the ranges to compare: ``changed``
        (the change set :meth:`changes` named; the mirror's own ranges are added) or, when
        None (not known), the whole image."""
        assert self.phase is ServePhase.PLANNING_SYNC and self.sync_request is not None
        ranges = (((0, size),) if changed is None
                  else sync_ranges([*changed, *self.sync_request.ranges], size))
        self.sync = SyncInfo(lsn=lsn, chain=chain, size=size, uuid=self.served.uuid, ranges=ranges)
        self._cursor = RangeCursor(ranges)
        self._go(ServeEvent.SYNC_PLANNED)
        return self.sync

    def _sums(self, msg: SyncSums) -> Compare:
        cursor = self._cursor
        assert cursor is not None
        length = cursor.take(msg.offset, len(msg.sums) // SUM_SIZE, self._fail_sums)
        return Compare(msg.offset, length, msg.sums)

    def _fail_sums(self, why: str) -> ProtocolError:
        self.phase = ServePhase.CLOSED
        return ProtocolError(f"SYNC_SUMS: {why}")

    def compare(self, job: Compare, data: bytes) -> list[SyncData | SyncProgress]:
        """What to send for one SYNC_SUMS, given our bytes of its range (of the target
        version): the blocks whose sums differ, then how far the comparison got."""
        assert len(data) == job.length
        ours = block_sums(lambda off, n: data[off - job.offset : off - job.offset + n], job.offset, job.length)
        out: list[SyncData | SyncProgress] = []
        for off, n in block_ranges(differing_blocks(ours, job.sums), job.offset, job.offset + job.length):
            out.append(SyncData(off, data[off - job.offset : off - job.offset + n]))
            self.sync_sent += n
        self.sync_compared += job.length
        out.append(SyncProgress(compared=self.sync_compared, sent=self.sync_sent))
        return out

    @property
    def sync_complete(self) -> bool:
        return self.sync is not None and self.sync_compared == self.sync.total

    def end_sync(self) -> SyncEnd:
        assert self.sync is not None and self.sync_complete
        self._go(ServeEvent.SYNC_END)
        return SyncEnd(lsn=self.sync.lsn)

    # -- shipping

    def poll(self, shippable: int) -> Ship | None:
        """What to ship now that our shippable LSN is ``shippable`` (None: nothing, or the mirror
        only watches; wait a little). The caller reads that LSN after the ACKs it passed in, so
        the probe taken here is older than it."""
        self._beat_probe = self.probe
        self._beat_limit = limit = shippable
        cursor = self.sent_lsn + 1
        if cursor > limit or self.watching:
            return None
        return Ship(cursor, limit, self._batch)

    def shipped(self, next_lsn: int) -> None:
        """A RECORDS frame up to ``next_lsn - 1`` went out."""
        assert next_lsn > self.sent_lsn + 1
        self.sent_lsn = next_lsn - 1
        if self._farewell:
            self._farewell = False  # these came after our last word: another is due
        self._batch = min(self._batch * 2, BATCH_BYTES)

    def heartbeat_due(self, now: float) -> bool:
        return self._next_beat is None or now >= self._next_beat

    def farewell(self) -> bool:
        """A clean stop, and nothing left to ship (:meth:`poll` said None): True once a
        heartbeat went out after the last records we shipped: it was our last word, now send
        ERROR ``stopping``. Until then the next heartbeat is due at once."""
        if self._farewell:
            return True
        self._farewell, self._next_beat = False, None
        return False

    def heartbeat(self, now: float, wall: float, lag: tuple[int, int, float], head_lsn: int,
                  word: SyncWord | None = None) -> Heartbeat:
        """The heartbeat for the last :meth:`poll` (``lag`` as :func:`server.lag_of` has it;
        ``head_lsn``: our log's head now; ``word``: our replication mode, None: async)."""
        self._next_beat = now + HEARTBEAT
        if self._farewell is not None:
            self._farewell = True  # our last word (unless records follow it)
        lag_bytes, lag_records, lag_seconds = lag
        w = word if word is not None else SyncWord()
        return Heartbeat(uuid=self.served.uuid, head_lsn=head_lsn, durable_lsn=self._beat_limit, time=wall,
                         probe=self._beat_probe, lag_bytes=lag_bytes, lag_records=lag_records, lag_seconds=lag_seconds,
                         mode=w.mode, sync_mirrors=w.mirrors, refuse=w.refuse, degraded_since=w.degraded_since,
                         acked_lsn=w.acked_lsn)


# ---------------------------------------------------------------------------- fetching side


@dataclass
class FetchState:
    """What a mirror knows about its fetch of one volume (read by status; outlives sessions).

    Times are trio times (the caller's clock), except that lag_seconds compares wall times."""

    source: str
    connected: bool = False
    error: str = ""
    fatal: str = ""  #: the refusal code that stopped fetching (its Stop says why: :attr:`stop`)
    primary_head_lsn: int = 0
    primary_durable_lsn: int = 0
    primary_time: float = 0.0  #: the source's wall time in its newest heartbeat (0: none yet)
    lag_bytes: int = 0
    lag_records: int = 0
    lag_seconds: float = 0.0
    last_frame: float = 0.0  #: when the last frame arrived
    last_heartbeat: float = 0.0
    #: when we sent the ACK whose probe the newest heartbeat echoes: that heartbeat describes
    #: the source at or after this moment (heartbeats can sit in buffers; receipt time lies)
    heartbeat_basis: float = 0.0
    #: the source said it stops cleanly right after its newest heartbeat (ERROR ``stopping``):
    #: that heartbeat is its final word, not just its latest (until we hear from it again)
    final: bool = False
    last_progress: float = 0.0  #: when records last arrived (or the fetcher started)
    fetched_bytes: int = 0
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_SAMPLES_KEPT))
    sync: SyncStatus | None = None  #: a fast sync (resync) of this mirror under way
    #: the source's replication mode as its newest heartbeat said it (None: no heartbeat yet)
    primary_sync: SyncWord | None = None

    @property
    def stop(self) -> Stop | None:
        """Why fetching stopped for good (None: it did not)."""
        return refusal_stop(self.fatal) if self.fatal else None

    def rate(self) -> float:
        """Fetched bytes per second over the last few seconds."""
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class Probes:
    """ACK probe numbers and when each was sent (outlives sessions, so numbers stay unique)."""

    def __init__(self) -> None:
        self._last = 0
        self._sent: dict[int, float] = {}

    def new(self, now: float) -> int:
        self._last += 1
        self._sent[self._last] = now
        self._sent.pop(self._last - _PROBES_KEPT, None)
        return self._last

    def sent_at(self, probe: int) -> float | None:
        return self._sent.get(probe)


class Backoff:
    """Delays between fetch sessions: doubling from BACKOFF_MIN to BACKOFF_MAX, reset by progress."""

    def __init__(self) -> None:
        self._delay = BACKOFF_MIN

    def next(self, progressed: bool) -> float:
        """The delay before the next session; ``progressed``: the last one moved the log forward
        or ended cleanly (the link works, mostly)."""
        if progressed:
            self._delay = BACKOFF_MIN
        delay = self._delay
        self._delay = min(delay * 2, BACKOFF_MAX)
        return delay


class FetchPhase(Enum):
    START = auto()
    AWAIT_WELCOME = auto()
    WELCOMED = auto()
    FETCHING = auto()
    WATCHING = auto()  #: fetch paused: heartbeats only
    SYNC_AWAIT_INFO = auto()
    SYNCING = auto()  #: sending sums, receiving what differs
    SYNC_END = auto()  #: the caller makes the staged image durable and switches, then sync_done()
    DONE = auto()
    CLOSED = auto()  #: refused, or the peer broke the protocol


class FetchEvent(Enum):
    SEND_HELLO = auto()
    SEND_FETCH = auto()
    SEND_WATCH = auto()
    SEND_ACK = auto()
    SEND_SYNC_REQUEST = auto()
    SEND_SUMS = auto()


_F = FetchPhase
_FETCH_COMMON: dict[tuple[Enum, object], Enum] = {
    (_F.START, FetchEvent.SEND_HELLO): _F.AWAIT_WELCOME,
    (_F.AWAIT_WELCOME, Welcome): _F.WELCOMED,
}
_FETCH: dict[Want, dict[tuple[Enum, object], Enum]] = {
    "fetch": {**_FETCH_COMMON,
              (_F.WELCOMED, FetchEvent.SEND_FETCH): _F.FETCHING,
              (_F.FETCHING, Records): _F.FETCHING,
              (_F.FETCHING, Heartbeat): _F.FETCHING,
              (_F.FETCHING, FetchEvent.SEND_ACK): _F.FETCHING,
              (_F.WELCOMED, FetchEvent.SEND_WATCH): _F.WATCHING,
              (_F.WATCHING, Heartbeat): _F.WATCHING,
              (_F.WATCHING, FetchEvent.SEND_ACK): _F.WATCHING},
    "leave": dict(_FETCH_COMMON),
    "sync": {**_FETCH_COMMON,
             (_F.WELCOMED, FetchEvent.SEND_SYNC_REQUEST): _F.SYNC_AWAIT_INFO,
             (_F.SYNC_AWAIT_INFO, SyncInfo): _F.SYNCING,
             (_F.SYNCING, FetchEvent.SEND_SUMS): _F.SYNCING,
             (_F.SYNCING, SyncData): _F.SYNCING,
             (_F.SYNCING, SyncProgress): _F.SYNCING,
             (_F.SYNCING, SyncEnd): _F.SYNC_END,
             (_F.SYNC_END, FetchEvent.SEND_ACK): _F.DONE},
    "sums": dict(_FETCH_COMMON),  # then SUMS_REQUEST/SUMS, judged by marsfs.replication.verify
    "handover": dict(_FETCH_COMMON),  # then marsfs.replication.handover carries on
    "compare": dict(_FETCH_COMMON),
    "position": dict(_FETCH_COMMON),
}
_REFUSABLE = (_F.AWAIT_WELCOME, _F.WELCOMED, _F.FETCHING, _F.WATCHING, _F.SYNC_AWAIT_INFO, _F.SYNCING, _F.SYNC_END)


#: what a fetching session passes on from the server (an ERROR becomes a :class:`Refused`)
ServerReply: TypeAlias = Welcome | Records | Heartbeat | SyncInfo | SyncData | SyncProgress | SyncEnd


class FetchingSession:
    """One connection as seen by the mirror: HELLO, then a fetch or a fast sync (or leave).

    It holds no volume: ``uuid`` is the mirror's volume's (when given, the source's volume
    must be that one), and the positions of our log come in as arguments (:meth:`fetch`,
    :meth:`appended`). ``state`` and ``probes`` outlive the session (one per fetcher)."""

    def __init__(self, greeting: Hello, *, state: FetchState | None = None, probes: Probes | None = None,
                 uuid: str | None = None) -> None:
        self.greeting = greeting
        self.phase = FetchPhase.START
        self.state = state if state is not None else FetchState(source="")
        self.probes = probes if probes is not None else Probes()
        self.uuid = uuid
        self.welcome: Welcome | None = None
        self._next_lsn = 0  #: the LSN the next RECORDS frame must start with
        self._durable_lsn = 0  #: how far our log is durable (the FETCH's, then each append's)
        self.sync: SyncInfo | None = None
        self._cursor: RangeCursor | None = None  #: where our next SYNC_SUMS starts
        self.compared = 0  #: bytes of the sync's ranges the source has compared
        self.received = 0  #: data bytes received in this sync

    @property
    def want(self) -> Want:
        return self.greeting.want

    @property
    def following(self) -> bool:
        """A fetch or watch session is under way (it acknowledges; a closed one says nothing more)."""
        return self.phase in (FetchPhase.FETCHING, FetchPhase.WATCHING)

    def _go(self, event: Enum | Message) -> None:
        try:
            self.phase = FetchPhase(_step(_FETCH[self.want], self.phase, event, f"{self.want} fetching"))
        except ProtocolError:
            self.phase = FetchPhase.CLOSED
            raise

    def _fail(self, why: str) -> ProtocolError:
        self.phase = FetchPhase.CLOSED
        return ProtocolError(why)

    def _replaced(self, theirs: str) -> Refused:
        """The source's volume of our name is another volume (its uuid is ``theirs``)."""
        self.phase = FetchPhase.CLOSED
        ours, source = self.uuid, self.welcome.node if self.welcome else self.state.source
        name = self.greeting.volume
        return Refused("volume-replaced",
                       f"{source}'s volume {name} is not the volume this mirror copies (uuid {theirs} there, "
                       f"{ours} here): it was deleted on {source} and created anew; fetching stopped. To mirror "
                       f"the new volume: marsfs leave {name}, then marsfs join {name} --from {source}")

    def hello(self) -> Hello:
        self._go(FetchEvent.SEND_HELLO)
        return self.greeting

    def receive(self, msg: Message, now: float) -> ServerReply | Refused:
        """Take a message from the server; RECORDS are to be appended, then :meth:`appended`."""
        if isinstance(msg, Error) and self.phase in _REFUSABLE:
            if msg.code == "stopping" and self.following:
                self.state.final = True  # the heartbeat before this was its goodbye
            self.phase = FetchPhase.CLOSED
            return Refused(msg.code, msg.error)
        self._go(msg)
        self.state.last_frame = now
        if isinstance(msg, Welcome):
            self.welcome = msg
            self.state.final = False  # it answers again: a goodbye before this is void
            if self.uuid is not None and msg.uuid != self.uuid:
                return self._replaced(msg.uuid)
        elif isinstance(msg, SyncInfo | SyncData | SyncProgress | SyncEnd):
            self._sync_reply(msg)
        elif isinstance(msg, Records):
            if msg.first_lsn != self._next_lsn:
                raise self._fail(f"RECORDS: field 'records' starts at LSN {msg.first_lsn}, "
                                 f"not at the next one we need ({self._next_lsn})")
            self._next_lsn = msg.last_lsn + 1
        else:
            assert isinstance(msg, Heartbeat), msg  # the table allows nothing else
            if msg.uuid != self.uuid:
                return self._replaced(msg.uuid)
            self._heartbeat(msg, now)
        return msg

    # -- fast sync

    def sync_request(self, req: SyncRequest) -> SyncRequest:
        self._go(FetchEvent.SEND_SYNC_REQUEST)
        return req

    def _sync_reply(self, msg: SyncInfo | SyncData | SyncProgress | SyncEnd) -> None:
        if isinstance(msg, SyncInfo):
            assert self.welcome is not None
            if msg.uuid != self.welcome.uuid:
                raise self._fail(f"SYNC_INFO: field 'uuid' {msg.uuid} is not the WELCOME's {self.welcome.uuid}")
            why = check_sync_ranges(msg.ranges, msg.size)
            if why is not None:
                raise self._fail(f"SYNC_INFO: field 'ranges': {why}")
            self.sync, self._cursor = msg, RangeCursor(msg.ranges)
            return
        cursor = self._cursor
        assert self.sync is not None and cursor is not None
        if isinstance(msg, SyncData):
            pos = cursor.position(msg.offset)
            end = cursor.position(msg.offset + len(msg.data) - 1) if msg.data else None
            if pos is None or end != pos + len(msg.data) - 1 or pos < self.compared or end >= cursor.done:
                raise self._fail(f"SYNC_DATA: field 'offset' {msg.offset} + {len(msg.data)} bytes is not in a "
                                 "range whose sums were sent and not yet compared")
            self.received += len(msg.data)
        elif isinstance(msg, SyncProgress):
            if not self.compared <= msg.compared <= cursor.done:
                raise self._fail(f"SYNC_PROGRESS: field 'compared' {msg.compared} is outside {self.compared}.."
                                 f"{cursor.done} (compared before .. sums sent)")
            self.compared = msg.compared
        elif msg.lsn != self.sync.lsn or not cursor.finished or self.compared != self.sync.total:
            raise self._fail(f"SYNC_END: at LSN {msg.lsn} after {self.compared} of {self.sync.total} bytes "
                             f"compared (the target is LSN {self.sync.lsn})")

    def next_sums(self) -> tuple[int, int] | None:
        """(offset, length) of our next SYNC_SUMS (None: every range is covered)."""
        assert self._cursor is not None
        return self._cursor.next_chunk()

    @property
    def sums_window_open(self) -> bool:
        """Whether we may send more sums (those sent run at most SUMS_AHEAD past the progress)."""
        assert self._cursor is not None
        return self._cursor.done - self.compared < SUMS_AHEAD

    @property
    def awaiting_source(self) -> bool:
        """Sums are out that the source has not answered yet (its silence then is a stall)."""
        return self._cursor is not None and self._cursor.done > self.compared

    def sums(self, offset: int, sums: bytes) -> SyncSums:
        """The SYNC_SUMS of our staged image for the chunk :meth:`next_sums` named."""
        self._go(FetchEvent.SEND_SUMS)
        assert self._cursor is not None

        def bug(why: str) -> ProtocolError:
            raise AssertionError(why)

        self._cursor.take(offset, len(sums) // SUM_SIZE, bug)
        return SyncSums(offset, sums)

    def sync_done(self, head_lsn: int) -> Ack:
        """The ACK that says we switched to the target, durably."""
        self._go(FetchEvent.SEND_ACK)
        return Ack(fetched_lsn=head_lsn, replayed_lsn=head_lsn)

    # -- fetch

    def fetch(self, now: float, *, last_lsn: int, last_chain: bytes, durable_lsn: int, watch: bool = False) -> Fetch:
        """The FETCH that continues our log, which ends at ``last_lsn`` with ``last_chain`` and is
        durable up to ``durable_lsn`` (``watch``: fetching is paused, ask for heartbeats only);
        the session counts as connected from now."""
        assert self.uuid is not None, "a fetch session knows the mirror's volume"
        self._go(FetchEvent.SEND_WATCH if watch else FetchEvent.SEND_FETCH)
        self._next_lsn = last_lsn + 1
        self._durable_lsn = durable_lsn
        st = self.state
        st.connected, st.error, st.last_frame = True, "", now
        return Fetch(from_lsn=last_lsn + 1, prev_chain=last_chain, watch=watch)

    def ack(self, now: float, replayed_lsn: int, fetch_paused: bool, replay_paused: bool) -> Ack:
        """The next ACK, with a new probe a heartbeat may echo."""
        self._go(FetchEvent.SEND_ACK)
        return Ack(fetched_lsn=self._durable_lsn, replayed_lsn=replayed_lsn, fetch_paused=fetch_paused,
                   replay_paused=replay_paused, probe=self.probes.new(now))

    def appended(self, records: Records) -> None:
        """``records`` are in our log and durable (progress is dated when their frame came)."""
        self._durable_lsn = max(self._durable_lsn, records.last_lsn)
        st = self.state
        st.fetched_bytes += records.nbytes
        st.samples.append((st.last_frame, st.fetched_bytes))
        st.last_progress = st.last_frame
        st.primary_durable_lsn = max(st.primary_durable_lsn, self._durable_lsn)
        self._update_lag(None)

    @property
    def stall_deadline(self) -> float:
        """When the connection counts as stalled unless a frame comes."""
        return self.state.last_frame + STALL_AFTER

    def stalled(self, now: float) -> str | None:
        """Why the connection is to be dropped, if it has stalled."""
        if now < self.stall_deadline:
            return None
        self.phase = FetchPhase.CLOSED
        return f"no data from {self.state.source} for {STALL_AFTER:.0f} s"

    def _heartbeat(self, beat: Heartbeat, now: float) -> None:
        st = self.state
        st.final = False  # it runs (again): this is its latest word, not its last
        st.primary_head_lsn = beat.head_lsn
        st.primary_durable_lsn = beat.durable_lsn
        st.primary_time = beat.time
        st.primary_sync = SyncWord(mode=beat.mode, mirrors=beat.sync_mirrors, refuse=beat.refuse,
                                   degraded_since=beat.degraded_since, acked_lsn=beat.acked_lsn)
        st.last_heartbeat = now
        sent = self.probes.sent_at(beat.probe)
        if sent is not None:
            st.heartbeat_basis = max(st.heartbeat_basis, sent)
        self._update_lag(beat)

    def _update_lag(self, beat: Heartbeat | None) -> None:
        st = self.state
        fetched = self._durable_lsn
        if beat is not None:
            # the source computed lag for what we had acknowledged; correct it by what came since
            st.lag_records = max(0, st.primary_durable_lsn - fetched)
            st.lag_bytes = beat.lag_bytes if st.lag_records else 0
            st.lag_seconds = beat.lag_seconds if st.lag_records else 0.0
        elif st.primary_durable_lsn <= fetched:
            st.lag_records = st.lag_bytes = 0
            st.lag_seconds = 0.0
