"""Node-to-node wire protocol: framing and typed messages, pure functions over bytes (no I/O).

Rules that hold here:

* Every frame is a 20-byte header and a payload: magic ``MRSf``, protocol version, message
  type, flags, payload length (at most :data:`MAX_FRAME`), and an xxh3-64 checksum over the
  first 12 header bytes and the payload as transmitted. A frame that fails any check raises
  :class:`ProtocolError`; the connection is then dropped and the fetch resumes from the last
  good LSN. A damaged frame is never acted on (G6).
* The payload is lz4-compressed (flag ``LZ4``) when that makes it at least 1/16 smaller; RECORDS
  frames (:class:`FrameLz4`) only when it saves 1/8, and after attempts that did not pay the sender
  stops trying for a while, so a frame may go uncompressed although it would have shrunk, never
  the reverse.
* Each message type is one frozen dataclass (:data:`Message`). Control messages travel as JSON
  objects whose keys are the dataclass fields; ``RECORDS`` carries log records exactly as
  stored (each verifies on its own: header sum, payload hash, and the chain on append);
  ``SYNC_SUMS`` and ``SYNC_DATA`` carry an 8-byte volume offset and the sums or bytes there.
* :func:`decode_message` validates everything a peer can get wrong: a missing or unknown
  field, a wrong JSON type (a bool is not an int), a negative LSN, a chain that is not 16 hex
  bytes, an unknown ``want``, records that do not follow each other. Any of these is a
  :class:`ProtocolError` naming the message type and the field; nothing malformed reaches
  the sessions. Whether a valid message may come *now* is the sessions' business
  (:mod:`marsfs.replication.session`).
* Messages are validated when decoded, not when built: a message we build wrongly is our bug
  and must not pass for the peer's fault.
* The framing runs over any byte stream, so TLS can wrap the TCP stream without changing it.

Conversation (client = the mirror, server = the node it fetches from)::

    client: HELLO {proto, cluster, node, volume, want: "fetch" | "sync" | "leave" | ..., epoch, node_id, join}
    server: WELCOME {node, volume, uuid, size, epoch, head_lsn, durable_lsn}  |  ERROR {code, error}
            (a node refuses a HELLO of a node in no peer list, ``unknown-node``, and one that claims
            the name of another running node, told apart by ``node_id``, ``node-identity``: see
            marsfs.node.identity; ``node_id`` may be absent: ""; and a HELLO about a volume from
            a node that is no member of it, ``not-a-member``, unless it is a ``join``'s fast
            sync: see marsfs.node.access; ``join`` may be absent: false)
    want=fetch: client: FETCH {from_lsn, prev_chain, watch}
                server: RECORDS... (none when ``watch``: the mirror's fetch is paused) and
                        HEARTBEAT {uuid, head_lsn, durable_lsn, time, probe, lag_bytes,
                        lag_records, lag_seconds} while the client ACKs
                client: ACK {fetched_lsn, replayed_lsn, fetch_paused, replay_paused, probe}
    want=leave: nothing after WELCOME; the server forgets the mirror.
    want=sync (fast sync, protocol 3; a new mirror's first copy too, into an empty image):
                client: SYNC_REQUEST {since_lsn, since_chain, whole, ranges, rate}
                server: SYNC_INFO {lsn, chain, size, uuid, ranges}   (the target and what to compare)
                client: SYNC_SUMS {offset, sums}... over the ranges in order, pipelined (binary)
                server: per SYNC_SUMS: SYNC_DATA {offset, data} for blocks that differ (binary),
                        then SYNC_PROGRESS {compared, sent}; after the last: SYNC_END {lsn}
                client: ACK {fetched_lsn, replayed_lsn}   (switched to the target; fetches from lsn+1)
    want=handover (the server is the primary, the client a mirror that wants to take over):
                client: HANDOVER_PREPARE {epoch, timeout}
                server: HANDOVER_READY {head_lsn, chain, epoch} (it is fenced and flushed)
                        | ERROR {code: "busy" | "epoch" | ...}
                client: (fetches up to head_lsn on its fetch connection, claims) HANDOVER_END
                        {claimed, epoch, start_lsn, reason}
    want=compare (after a FETCH was refused as diverged: where do the histories fork?):
                client: CHAINS {lsns, chains, head_lsn}   server: CHAINS {its chains there}
                ... until the client knows the fork; then
                client: CHAINS {done, fork_lsn, tail_records, tail_bytes}
                server: CHAINS {done, fork_lsn, its tail_records, tail_bytes}
    want=position (a forced failover asks every member what it holds beyond the asker):
                client: POSITION_ASK {lsn, chain}   (the asker's durable head and its chain there)
                server: POSITION {relation, durable_lsn, replayed_lsn, records, bytes, oldest, newest}
    want=meta: no volume; the cluster metadata exchange (see its block below the messages).
    A HEARTBEAT echoes the newest ACK probe the server had read before it looked at its
    durable LSN, so the client knows how old the state it describes can be at most.
    WELCOME and every HEARTBEAT name the volume's uuid: a volume deleted and re-created under
    the same name is another volume, and its mirrors must notice.
    want=sums: client: SUMS_REQUEST {lsn (0: your current version), offset, length}
               server: SUMS {lsn, offset, size, sums} | ERROR {code: "version-not-retained" | "out-of-range"}
               (repeated; the first request pins the version for the whole connection, so
               ``verify`` compares both nodes' images at one LSN while writes go on)
    Any server state may end with ERROR {code: "volume-deleted"} when the volume it served is no
    longer the node's volume of that name.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import MISSING, dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar, Literal, TypeAlias, get_args

import lz4.block
import xxhash

from marsfs.errors import ProtocolError
from marsfs.log.record import CHAIN_SIZE, HEADER_SIZE, BadRecord, decode_header
from marsfs.names import RULE as NAME_RULE
from marsfs.names import is_name
from marsfs.volume.blocksums import BLOCK, SUM_SIZE

__all__ = [
    "FRAME_HEADER", "MAX_CHAINS", "MAX_FRAME", "PROTO_VERSION", "Ack", "Chains", "Error", "Fetch", "Frame",
    "FrameDecoder", "HandoverEnd", "HandoverPrepare", "HandoverReady", "Heartbeat", "Hello", "Message", "MetaEntries", "MetaEntry", "MetaWelcome", "MsgType", "PositionAsk",
    "PositionTold", "ProtocolError",
    "Records", "Sums", "SumsRequest", "SyncData", "SyncEnd", "SyncInfo", "SyncProgress", "SyncRequest", "SyncSums",
    "Want", "Welcome", "FrameLz4", "decode_message", "encode_frame", "encode_message", "split_records",
]

FRAME_MAGIC = b"MRSf"
#: 2: HEARTBEAT.uuid, FETCH.watch, IMAGE_PROGRESS (since retired); 3: META_WELCOME, META_ENTRIES (want "meta"),
#: SUMS_REQUEST, SUMS (want "sums")
#: 3: handover (HANDOVER_PREPARE/READY/END, want "handover"), split brain (CHAINS, want "compare")
#: 3: fast sync (SYNC_*, want "sync")
#: 3: what a member holds beyond a would-be primary (POSITION_ASK, POSITION; want "position")
PROTO_VERSION = 3
MAX_FRAME = 8 * 1024 * 1024
_HEAD = struct.Struct("<4sBBHI")  # magic, version, type, flags, length
_SUM = struct.Struct("<Q")
FRAME_HEADER = _HEAD.size + _SUM.size  # 20
FLAG_LZ4 = 0x1
_FLAGS_AT = 6  # the flags byte in a frame (after magic, version, type); u16 little-endian
_MIN_COMPRESS = 512
_OFFSET = struct.Struct("<Q")
MAX_RANGES = 100_000  #: ranges in one SYNC_REQUEST/SYNC_INFO (16 bytes of JSON each: under MAX_FRAME)
#: bytes of JSON a message may carry, after decompression: small for the messages that hold a few
#: scalars, larger for the few that hold lists (see :data:`_JSON_LIMITS`). Parsing is the one cost
#: a peer can make us pay per byte it sends; these keep it to what the message needs.
MAX_JSON = 64 * 1024
#: frames larger than this are decoded off the trio thread (what a decode costs grows with them)
DECODE_IN_THREAD = 256 * 1024


class MsgType(IntEnum):
    """Message types. Values are on the wire: never renumber."""

    HELLO = 1
    WELCOME = 2
    ERROR = 3
    FETCH = 4
    RECORDS = 5
    HEARTBEAT = 6
    ACK = 7
    # 8-11 were an image copy's (IMAGE_INFO, IMAGE_DATA, IMAGE_END, IMAGE_PROGRESS; want "image"),
    # which fast sync replaced: reserved, never reuse
    SYNC_REQUEST = 12
    SYNC_INFO = 13
    SYNC_SUMS = 14
    SYNC_DATA = 15
    SYNC_PROGRESS = 16
    SYNC_END = 17
    SUMS_REQUEST = 18
    SUMS = 19
    # cluster metadata gossip (want "meta"); 22 is reserved for it
    META_WELCOME = 20
    META_ENTRIES = 21
    # handover and split brain (marsfs.replication.handover)
    HANDOVER_PREPARE = 23
    HANDOVER_READY = 24
    HANDOVER_END = 25
    CHAINS = 26
    # a forced failover's survey of the members (marsfs.replication.handover)
    POSITION_ASK = 27
    POSITION = 28


# ---------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class Frame:
    """One verified frame: its type and its (decompressed) payload."""

    type: MsgType
    payload: bytes


def encode_frame(mtype: MsgType, payload: bytes | bytearray | memoryview, *, compress: bool = True,
                 min_saving: int = 16) -> bytes:
    """The frame of ``payload``: lz4-compressed when ``compress`` and that saves 1/``min_saving`` of it."""
    data = bytes(payload)
    flags = 0
    if compress and len(data) >= _MIN_COMPRESS:
        packed = lz4.block.compress(data, store_size=True)
        if len(packed) <= len(data) - len(data) // min_saving:
            data, flags = packed, FLAG_LZ4
    if len(data) > MAX_FRAME:
        raise ValueError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    head = _HEAD.pack(FRAME_MAGIC, PROTO_VERSION, int(mtype), flags, len(data))
    h = xxhash.xxh3_64(head)
    h.update(data)
    return head + _SUM.pack(h.intdigest()) + data


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole verified frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= FRAME_HEADER:
            magic, version, mtype, flags, length = _HEAD.unpack_from(self._buf, 0)
            if magic != FRAME_MAGIC:
                raise ProtocolError("bad frame magic")
            if length > MAX_FRAME:
                raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME}")
            if len(self._buf) < FRAME_HEADER + length:
                break
            (want,) = _SUM.unpack_from(self._buf, _HEAD.size)
            body = bytes(self._buf[FRAME_HEADER : FRAME_HEADER + length])
            h = xxhash.xxh3_64(bytes(self._buf[: _HEAD.size]))
            h.update(body)
            if h.intdigest() != want:
                raise ProtocolError("frame checksum mismatch")
            del self._buf[: FRAME_HEADER + length]
            if version != PROTO_VERSION:
                raise ProtocolError(f"unsupported protocol version {version}")
            try:
                mt = MsgType(mtype)
            except ValueError:
                raise ProtocolError(f"unknown message type {mtype}") from None
            if flags & ~FLAG_LZ4:
                raise ProtocolError(f"unknown frame flags {flags:#x}")
            limit = payload_limit(mt)
            if flags & FLAG_LZ4:
                body = _decompress(body, limit, mt)
            elif len(body) > limit:
                raise ProtocolError(f"{mt.name}: payload of {len(body)} bytes exceeds {limit}")
            out.append(Frame(mt, body))
        return out


def _decompress(body: bytes, limit: int, mt: MsgType) -> bytes:
    """The payload of a compressed frame; its declared size is checked before anything is allocated."""
    if len(body) < 4:
        raise ProtocolError(f"{mt.name}: compressed payload without its size")
    size = int.from_bytes(body[:4], "little")
    if size > limit:
        raise ProtocolError(f"{mt.name}: compressed payload claims {size} bytes, more than {limit}")
    try:
        out: bytes = lz4.block.decompress(body)
        return out
    except lz4.block.LZ4BlockError as e:
        raise ProtocolError(f"bad lz4 frame payload: {e}") from None


def split_records(payload: bytes) -> list[bytes]:
    """The raw records in a RECORDS payload (boundaries from each verified header)."""
    out: list[bytes] = []
    pos = 0
    view = memoryview(payload)
    while pos < len(payload):
        try:
            h = decode_header(view[pos : pos + HEADER_SIZE])
        except BadRecord as e:
            raise ProtocolError(f"bad record in RECORDS frame: {e.reason}") from None
        end = pos + HEADER_SIZE + h.stored_len
        if end > len(payload):
            raise ProtocolError("record runs past the end of its RECORDS frame")
        out.append(payload[pos:end])
        pos = end
    return out


# ---------------------------------------------------------------------------- messages

Want: TypeAlias = Literal["fetch", "leave", "meta", "sums", "handover", "compare", "sync", "position"]
_WANTS: tuple[str, ...] = get_args(Want)

# How a JSON field is checked and converted (field metadata "kind"):
#   uint: an int >= 0 (LSNs, sizes, counters); pos: an int >= 1; str; bool;
#   seconds: a finite number >= 0; chain: 16 bytes as 32 hex digits; want: one of _WANTS;
#   ranges: a list of [offset, length] pairs of ints, offset >= 0, length >= 1;
#   entries: metadata entries (see MetaEntries).
#   lsns: a list of at most MAX_CHAINS uints, ascending; chains: a list of at most MAX_CHAINS chains.
#   relation: one of RELATIONS (PositionTold); mode: one of MODES (HEARTBEAT's replication mode).


def _field(kind: str, **kw: Any) -> Any:
    return field(metadata={"kind": kind}, **kw)


@dataclass(frozen=True, slots=True)
class Hello:
    """The client's opening: who it is and what it wants of which volume."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    proto: int = _field("uint")
    cluster: str = _field("str")
    node: str = _field("node")
    volume: str = _field("volume")  #: "" for what is about no volume (metadata)
    want: Want = _field("want")
    epoch: int = _field("uint")
    #: the client node's id (``STATE/node-id``): two daemons given one ``--node`` name differ in
    #: it; "" when it says none (a HELLO from before ids; refused where that name runs with one)
    node_id: str = _field("str", default="")
    #: the operator ran ``marsfs join`` of this volume on the client node: a fast sync (want
    #: ``sync``) that makes it a member; only a member may ask anything else of a volume (ignored
    #: with any other want)
    join: bool = _field("bool", default=False)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server accepted a HELLO: the volume as it stands there."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    node: str = _field("node")
    volume: str = _field("volume")
    uuid: str = _field("str")
    size: int = _field("pos")
    epoch: int = _field("uint")
    head_lsn: int = _field("uint")
    durable_lsn: int = _field("uint")


@dataclass(frozen=True, slots=True)
class Error:
    """A refusal: ``code`` is machine-readable (diverged, log-trimmed, ...), ``error`` for people."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: str = _field("str")
    error: str = _field("str")


@dataclass(frozen=True, slots=True)
class Fetch:
    """Where the client's log ends: the next LSN it needs and the chain before it.

    ``watch``: the client's fetch is paused; send heartbeats (so it keeps knowing how far
    behind it is) but no records. The client starts a new session when it resumes."""

    TYPE: ClassVar[MsgType] = MsgType.FETCH
    from_lsn: int = _field("pos")
    prev_chain: bytes = _field("chain")
    watch: bool = _field("bool", default=False)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The server's positions, and the mirror's lag as the server computed it; ``uuid`` names
    the volume they are positions of (the mirror checks it is still its volume)."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    uuid: str = _field("str")
    head_lsn: int = _field("uint")
    durable_lsn: int = _field("uint")
    time: float = _field("seconds")  #: wall time at the server (shown, compared with record stamps)
    probe: int = _field("uint")  #: the newest ACK probe the server had read before durable_lsn
    lag_bytes: int = _field("uint")
    lag_records: int = _field("uint")
    lag_seconds: float = _field("seconds")
    #: the volume's replication mode on the server (a primary), what a failover onto the mirror
    #: can promise: ``sync`` with ``sync_mirrors`` N and ``refuse``; ``degraded_since`` (wall
    #: time, 0: not degraded) and ``acked_lsn``, the newest LSN a completed flush acknowledged
    #: to an application
    mode: str = _field("mode", default="async")
    sync_mirrors: int = _field("uint", default=0)
    refuse: bool = _field("bool", default=False)
    degraded_since: float = _field("seconds", default=0.0)
    acked_lsn: int = _field("uint", default=0)


@dataclass(frozen=True, slots=True)
class Ack:
    """The client's positions. After a fast sync only the two LSNs are sent (the rest default)."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    fetched_lsn: int = _field("uint")
    replayed_lsn: int = _field("uint")
    fetch_paused: bool = _field("bool", default=False)
    replay_paused: bool = _field("bool", default=False)
    probe: int = _field("uint", default=0)


@dataclass(frozen=True, slots=True)
class Records:
    """Raw log records with consecutive LSNs, exactly as stored (binary payload)."""

    TYPE: ClassVar[MsgType] = MsgType.RECORDS
    records: tuple[bytes, ...]

    @property
    def first_lsn(self) -> int:
        """LSN of the first record (decode_message checked that the others follow it)."""
        return decode_header(self.records[0][:HEADER_SIZE]).lsn

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + len(self.records) - 1

    @property
    def nbytes(self) -> int:
        return sum(len(r) for r in self.records)


# -- fast sync (protocol 3): the mirror's staged image is brought to the source's version
#    by comparing 4 KiB block sums (marsfs.volume.blocksums); see session.py for the rules.


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """The mirror asks for the source's image, sending only blocks that differ from its own.

    ``since_lsn``/``since_chain``: the mirror's image is known to equal the source's history
    at that LSN (its durable head, or a resync's base), so the source may compare only the
    extents written after it; ``whole``: compare the whole image (the mirror's state is not
    trusted); ``ranges``: byte ranges the mirror adds itself (e.g. a split-brain tail);
    ``rate``: bytes/s of data this sync may use (0: the source's limit only)."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_REQUEST
    since_lsn: int = _field("uint")
    since_chain: bytes = _field("chain")
    whole: bool = _field("bool", default=False)
    ranges: tuple[tuple[int, int], ...] = _field("ranges", default=())
    rate: int = _field("uint", default=0)


@dataclass(frozen=True, slots=True)
class SyncInfo:
    """The target: the source's volume at ``lsn`` (chain, size, uuid), and the block-aligned
    byte ``ranges`` to compare, in offset order (``total`` bytes)."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_INFO
    lsn: int = _field("uint")
    chain: bytes = _field("chain")
    size: int = _field("pos")
    uuid: str = _field("str")
    ranges: tuple[tuple[int, int], ...] = _field("ranges")

    @property
    def total(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True, slots=True)
class SyncSums:
    """The mirror's block sums of its staged image from ``offset`` (binary payload: 8-byte
    offset, then 8 bytes per 4 KiB block)."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_SUMS
    offset: int
    sums: bytes


@dataclass(frozen=True, slots=True)
class SyncData:
    """The source's bytes at ``offset`` where the sums differed (binary: 8-byte offset, data)."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_DATA
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class SyncProgress:
    """The source has compared (and sent what differed of) the first ``compared`` bytes of the
    ranges; ``sent``: data bytes sent so far in this session."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_PROGRESS
    compared: int = _field("uint")
    sent: int = _field("uint")


@dataclass(frozen=True, slots=True)
class SyncEnd:
    """Every range is compared: the mirror's staged image now equals the source's at ``lsn``."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_END
    lsn: int = _field("uint")


# ---------------------------------------------------------------------------- cluster metadata (want "meta")
#
#   client: HELLO {want: "meta", volume: "", epoch: 0, node_id}
#   server: META_WELCOME {node, cluster}  |  ERROR {code: "cluster" | "protocol" | "unknown-node" | "node-identity", error}
#   client: META_ENTRIES {entries, more}...  (until more is false)
#   server: META_ENTRIES {entries, more}...  (until more is false); both close.
# Each side merges what the other sent (marsfs.node.meta); a side of another cluster is refused.

MAX_META_ENTRIES = 512  #: entries in one META_ENTRIES message
MAX_META_KEY = 200  #: characters of a key (what a node stores is held to the same limits)
MAX_META_VALUE = 2048  #: bytes of a value as compact JSON
MAX_META_FRAMES = 128  #: META_ENTRIES messages one side sends in one exchange
#: the largest Lamport clock of an entry: exact in any JSON reader, and far beyond what a cluster
#: reaches by counting (a larger one can only be forged, and would stop every later write of the key)
MAX_META_CLOCK = 2**53
MAX_META_DEPTH = 8  #: levels of nested lists and objects in an entry's value


def json_depth(value: Any) -> int:
    """Levels of nested lists and objects in a parsed JSON value (0 for a scalar), counted without
    recursion, so that no value is too deep to measure."""
    depth, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        if isinstance(v, (list, dict)):
            depth = max(depth, d)
            level.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth

#: One entry on the wire: owner, key, Lamport clock, value (any JSON within the bounds).
MetaEntry: TypeAlias = tuple[str, str, int, Any]


@dataclass(frozen=True, slots=True)
class MetaWelcome:
    """The server takes part in a metadata exchange: who it is and which cluster it is in."""

    TYPE: ClassVar[MsgType] = MsgType.META_WELCOME
    node: str = _field("node")
    cluster: str = _field("str")


@dataclass(frozen=True, slots=True)
class MetaEntries:
    """Some of the sender's metadata entries; ``more``: another META_ENTRIES follows."""

    TYPE: ClassVar[MsgType] = MsgType.META_ENTRIES
    entries: tuple[MetaEntry, ...] = _field("entries")
    more: bool = _field("bool", default=False)


# -- verify (want "sums"): block checksums of one version, see marsfs.replication.verify

#: the largest range one SUMS_REQUEST may ask for (its sums fill 1 MiB of a frame)
MAX_SUMS_SPAN = 512 * 1024 * 1024
_SUMS_HEAD = struct.Struct("<QQQ")  # lsn, offset, size


@dataclass(frozen=True, slots=True)
class SumsRequest:
    """Sums of the blocks in ``[offset, offset+length)`` of version ``lsn`` (0: the server's
    current version); ``offset`` is block-aligned. The first request pins that version."""

    TYPE: ClassVar[MsgType] = MsgType.SUMS_REQUEST
    lsn: int = _field("uint")
    offset: int = _field("uint")
    length: int = _field("pos")


@dataclass(frozen=True, slots=True)
class Sums:
    """The answer: the version's LSN and size, and 8 bytes per 4 KiB block from ``offset``
    (binary payload: lsn, offset, size as 8-byte integers, then the sums)."""

    TYPE: ClassVar[MsgType] = MsgType.SUMS
    lsn: int
    offset: int
    size: int
    sums: bytes


def _decode_sums(payload: bytes) -> Sums:
    if len(payload) < _SUMS_HEAD.size:
        raise ProtocolError("SUMS: frame shorter than its header")
    lsn, offset, size = _SUMS_HEAD.unpack_from(payload, 0)
    sums = payload[_SUMS_HEAD.size :]
    if len(sums) % SUM_SIZE or offset % BLOCK:
        raise ProtocolError(f"SUMS: {len(sums)} bytes of sums from offset {offset} are not whole 4 KiB blocks")
    if offset + len(sums) // SUM_SIZE * BLOCK > size + BLOCK - 1:
        raise ProtocolError(f"SUMS: sums from offset {offset} run past the image's {size} bytes")
    return Sums(lsn, offset, size, sums)



# -- handover and split brain (marsfs.replication.handover has the conversations) -----------

MAX_CHAINS = 64  #: LSNs one CHAINS message may compare


@dataclass(frozen=True, slots=True)
class HandoverPrepare:
    """The would-be primary asks the primary to stop accepting writes and flush; ``timeout``:
    seconds after which the primary accepts writes again unless the handover was claimed."""

    TYPE: ClassVar[MsgType] = MsgType.HANDOVER_PREPARE
    epoch: int = _field("uint")  #: the epoch the asker knows (the primary's must be the same)
    timeout: float = _field("seconds")


@dataclass(frozen=True, slots=True)
class HandoverReady:
    """The primary is fenced and its log durable up to ``head_lsn``, whose chain is ``chain``."""

    TYPE: ClassVar[MsgType] = MsgType.HANDOVER_READY
    head_lsn: int = _field("uint")
    chain: bytes = _field("chain")
    epoch: int = _field("uint")


@dataclass(frozen=True, slots=True)
class HandoverEnd:
    """The asker claimed the volume (``claimed``: epoch ``epoch`` from ``start_lsn``), or gave up."""

    TYPE: ClassVar[MsgType] = MsgType.HANDOVER_END
    claimed: bool = _field("bool")
    epoch: int = _field("uint")
    start_lsn: int = _field("uint")
    reason: str = _field("str", default="")


@dataclass(frozen=True, slots=True)
class Chains:
    """Chain hashes at some LSNs, to find where two histories fork (both directions).

    The asker sends its chains at ``lsns`` (``done`` false); the other side answers with its own
    at those of them it holds. The last message of the asker (``done``) names the fork (the last
    LSN both share) and its tail after it; the answer names the other side's tail."""

    TYPE: ClassVar[MsgType] = MsgType.CHAINS
    lsns: tuple[int, ...] = _field("lsns")
    chains: tuple[bytes, ...] = _field("chains")
    head_lsn: int = _field("uint")
    done: bool = _field("bool", default=False)
    fork_lsn: int = _field("uint", default=0)
    exact: bool = _field("bool", default=False)  #: the fork is the last common LSN, not a bound below it
    tail_records: int = _field("uint", default=0)
    tail_bytes: int = _field("uint", default=0)


#: what a member's history is to the asker's (PositionTold.relation)
RELATIONS = ("ahead", "same", "behind", "diverged", "trimmed")
MODES = ("async", "sync")  #: a volume's replication modes


@dataclass(frozen=True, slots=True)
class PositionAsk:
    """A would-be primary's durable head ``lsn`` and its chain there: how much more do you hold?"""

    TYPE: ClassVar[MsgType] = MsgType.POSITION_ASK
    lsn: int = _field("uint")
    chain: bytes = _field("chain")


@dataclass(frozen=True, slots=True)
class PositionTold:
    """What the member holds beyond the asker's ``lsn``. ``relation``: ``ahead`` (the asker's
    LSN is on its chain and it holds ``records`` more, ``bytes`` of log), ``same`` (on its
    chain, nothing more), ``behind`` (its log ends before the asker's LSN), ``diverged`` (another
    chain there), ``trimmed`` (its log no longer reaches back to the asker's LSN: it holds
    ``records`` more by LSN, ``bytes`` at least its whole log). ``oldest`` and ``newest``:
    wall times of the first and last of those records it holds (0: none)."""

    TYPE: ClassVar[MsgType] = MsgType.POSITION
    relation: str = _field("relation")
    durable_lsn: int = _field("uint")
    replayed_lsn: int = _field("uint")
    records: int = _field("uint")
    bytes: int = _field("uint")
    oldest: float = _field("seconds", default=0.0)
    newest: float = _field("seconds", default=0.0)


JsonMessage: TypeAlias = (Hello | Welcome | Error | Fetch | Heartbeat | Ack | MetaWelcome | MetaEntries | SumsRequest | HandoverPrepare | HandoverReady | HandoverEnd
                          | Chains | SyncRequest | SyncInfo | SyncProgress | SyncEnd | PositionAsk | PositionTold)
Message: TypeAlias = JsonMessage | Records | Sums | SyncSums | SyncData

_JSON_TYPES: dict[MsgType, type[JsonMessage]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Error, Fetch, Heartbeat, Ack, MetaWelcome, MetaEntries, SumsRequest, HandoverPrepare, HandoverReady, HandoverEnd,
                              Chains, SyncRequest, SyncInfo, SyncProgress, SyncEnd, PositionAsk, PositionTold)}
#: binary messages of an 8-byte offset and bytes
_OFFSET_TYPES: dict[MsgType, type[SyncSums | SyncData]] = {cls.TYPE: cls for cls in (SyncSums, SyncData)}
#: the JSON messages that hold lists, and what their largest legal payload needs
_JSON_LIMITS: dict[MsgType, int] = {
    MsgType.META_ENTRIES: 2 * 1024 * 1024,  # MAX_META_ENTRIES of MAX_META_KEY + MAX_META_VALUE and some
    MsgType.SYNC_REQUEST: 4 * 1024 * 1024,  # MAX_RANGES [offset, length] pairs of up to ~30 bytes
    MsgType.SYNC_INFO: 4 * 1024 * 1024,
}


def payload_limit(mt: MsgType) -> int:
    """The largest (decompressed) payload a frame of type ``mt`` may carry."""
    if mt in _JSON_TYPES:
        return _JSON_LIMITS.get(mt, MAX_JSON)
    return MAX_FRAME


#: the most frames :class:`FrameLz4` sends without trying lz4 after attempts that did not pay
FRAME_LZ4_MAX_SKIP = 64
#: what lz4 must save of a frame :class:`FrameLz4` sends (1/8, the volume's rule for its records)
FRAME_LZ4_MIN_SAVING = 8


class FrameLz4:
    """Whether one sender tries lz4 on its next frame: the backoff of the volume's records, for frames.

    Why: lz4 over fio's data (it shrinks by 5-7 %) costs the primary ~1.3 ms of CPU per MiB it
    ships, and the mirror a decompression, to save a few % of the link; on two shared cores that
    CPU is what the mirror lacks to keep up. So a frame is compressed only when that saves 1/8
    (:data:`FRAME_LZ4_MIN_SAVING`, the volume's rule for its records), and after an attempt that
    did not, the next 1, 2, 4 ... 64 frames go without trying; one that paid resets that. A frame
    may go uncompressed although it would have shrunk, never the other way round, and the wire is
    the same: every receiver takes both kinds. Not thread-safe: one per sender, used by one task."""

    __slots__ = ("_skip", "_backoff")

    def __init__(self) -> None:
        self._skip = 0  # frames still to send without trying lz4
        self._backoff = 0  # how many the next attempt that does not pay makes skip (0: none failed)

    def encode(self, msg: Message) -> bytes:
        """encode_message(msg), trying lz4 unless recent attempts did not pay."""
        if self._skip > 0:
            self._skip -= 1
            return encode_message(msg, compress=False)
        frame = encode_message(msg, min_saving=FRAME_LZ4_MIN_SAVING)
        if frame[_FLAGS_AT] & FLAG_LZ4 or len(frame) < FRAME_HEADER + _MIN_COMPRESS:
            self._backoff = 0
        else:
            self._backoff = min(FRAME_LZ4_MAX_SKIP, self._backoff * 2 or 1)
            self._skip = self._backoff
        return frame


def encode_message(msg: Message, *, compress: bool = True, min_saving: int = 16) -> bytes:
    """The frame that carries ``msg`` (compressed as :func:`encode_frame` says)."""
    if isinstance(msg, Records):
        return encode_frame(MsgType.RECORDS, b"".join(msg.records), compress=compress, min_saving=min_saving)
    if isinstance(msg, SyncData):
        return encode_frame(msg.TYPE, _OFFSET.pack(msg.offset) + msg.data, compress=compress, min_saving=min_saving)
    if isinstance(msg, SyncSums):
        return encode_frame(msg.TYPE, _OFFSET.pack(msg.offset) + msg.sums, compress=compress, min_saving=min_saving)
    if isinstance(msg, Sums):
        return encode_frame(MsgType.SUMS, _SUMS_HEAD.pack(msg.lsn, msg.offset, msg.size) + msg.sums, compress=compress, min_saving=min_saving)
    obj = {f.name: _to_json(f.metadata["kind"], getattr(msg, f.name)) for f in fields(msg)}
    return encode_frame(msg.TYPE, json.dumps(obj, separators=(",", ":")).encode(), compress=compress, min_saving=min_saving)


def _to_json(kind: str, value: Any) -> Any:
    if kind == "chain":
        return value.hex()
    if kind == "chains":
        return [c.hex() for c in value]
    if kind == "lsns":
        return list(value)
    if kind == "ranges":
        return [list(r) for r in value]
    return value


def decode_message(frame: Frame) -> Message:
    """The message a verified frame carries; :class:`ProtocolError` if it is malformed."""
    if frame.type == MsgType.RECORDS:
        return _decode_records(frame.payload)
    binary = _OFFSET_TYPES.get(frame.type)
    if binary is not None:
        if len(frame.payload) < _OFFSET.size:
            raise ProtocolError(f"{frame.type.name}: frame without offset")
        offset, body = _OFFSET.unpack_from(frame.payload, 0)[0], frame.payload[_OFFSET.size :]
        if binary is SyncSums and len(body) % SUM_SIZE:
            raise ProtocolError(f"SYNC_SUMS: field 'sums' holds {len(body)} bytes, not a multiple of {SUM_SIZE}")
        if offset % BLOCK:
            raise ProtocolError(f"{frame.type.name}: field 'offset' {offset} is not a multiple of {BLOCK}")
        return binary(offset, body)
    if frame.type == MsgType.SUMS:
        return _decode_sums(frame.payload)
    cls = _JSON_TYPES[frame.type]
    name = frame.type.name
    try:
        obj = json.loads(frame.payload)
    except ValueError as e:
        raise ProtocolError(f"{name}: payload is not JSON: {e}") from None
    except RecursionError:
        raise ProtocolError(f"{name}: payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{name}: payload is not a JSON object")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in obj:
            values[f.name] = _check(name, f.name, f.metadata["kind"], obj.pop(f.name))
        elif f.default is MISSING:  # a required field
            raise ProtocolError(f"{name}: missing field {f.name!r}")
    if obj:
        raise ProtocolError(f"{name}: unknown field {sorted(obj)[0]!r}")
    msg = cls(**values)
    if isinstance(msg, Chains) and len(msg.lsns) != len(msg.chains):
        raise ProtocolError(f"{name}: field 'chains' holds {len(msg.chains)} entries for {len(msg.lsns)} LSNs")
    return msg


def _check(msg: str, name: str, kind: str, value: Any) -> Any:
    """``value`` of JSON field ``name`` converted to its dataclass type, or ProtocolError."""
    def bad(why: str) -> ProtocolError:
        return ProtocolError(f"{msg}: field {name!r} {why}, not {value!r:.80}")

    if kind in ("uint", "pos"):
        if type(value) is not int:  # bool is an int subclass and not an LSN
            raise bad("must be an integer")
        if value < (1 if kind == "pos" else 0):
            raise bad("is out of range")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("must be a string")
        return value
    if kind in ("node", "volume"):
        if not is_name(value) and not (kind == "volume" and value == ""):
            raise bad(f"must be a name of {NAME_RULE}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind == "seconds":
        if type(value) not in (int, float):
            raise bad("must be a number")
        if not math.isfinite(value) or value < 0:
            raise bad("is out of range")
        return float(value)
    if kind == "chain":
        if not isinstance(value, str) or len(value) != 2 * CHAIN_SIZE:
            raise bad(f"must be {2 * CHAIN_SIZE} hex digits")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise bad(f"must be {2 * CHAIN_SIZE} hex digits") from None
    if kind == "ranges":
        if not isinstance(value, list) or len(value) > MAX_RANGES:
            raise bad(f"must be a list of at most {MAX_RANGES} [offset, length] pairs")
        out: list[tuple[int, int]] = []
        for r in value:
            if (not isinstance(r, list) or len(r) != 2 or any(type(x) is not int for x in r)
                    or r[0] < 0 or r[1] < 1):
                raise bad("must hold [offset, length] pairs of integers (offset >= 0, length >= 1)")
            out.append((r[0], r[1]))
        return tuple(out)
    if kind == "entries":
        return _check_entries(msg, name, value)
    if kind in ("lsns", "chains"):
        if not isinstance(value, list):
            raise bad("must be a list")
        if len(value) > MAX_CHAINS:
            raise bad(f"holds more than {MAX_CHAINS} entries")
        items = tuple(_check(msg, name, "uint" if kind == "lsns" else "chain", v) for v in value)
        if kind == "lsns" and any(b <= a for a, b in zip(items, items[1:])):
            raise bad("must be ascending")
        return items
    if kind == "mode":
        if value not in MODES:
            raise bad(f"must be one of {', '.join(MODES)}")
        return value
    if kind == "relation":
        if value not in RELATIONS:
            raise bad(f"must be one of {', '.join(RELATIONS)}")
        return value
    assert kind == "want", kind
    if value not in _WANTS:
        raise bad(f"must be one of {', '.join(_WANTS)}")
    return value


def _check_entries(msg: str, name: str, value: Any) -> tuple[MetaEntry, ...]:
    """Metadata entries, each ``[owner, key, clock, value]`` within the bounds, or ProtocolError."""
    if not isinstance(value, list):
        raise ProtocolError(f"{msg}: field {name!r} must be a list")
    if len(value) > MAX_META_ENTRIES:
        raise ProtocolError(f"{msg}: field {name!r} holds {len(value)} entries (at most {MAX_META_ENTRIES})")
    out: list[MetaEntry] = []
    for i, e in enumerate(value):
        where = f"{msg}: entry {i}"
        if not isinstance(e, list) or len(e) != 4:
            raise ProtocolError(f"{where} must be [owner, key, clock, value]")
        owner, key, clock, val = e
        if not is_name(owner):
            raise ProtocolError(f"{where}: owner must be a node name of {NAME_RULE}")
        if not isinstance(key, str) or not 0 < len(key) <= MAX_META_KEY:
            raise ProtocolError(f"{where}: key must be a string of 1 to {MAX_META_KEY} characters")
        if type(clock) is not int or not 0 < clock <= MAX_META_CLOCK:
            raise ProtocolError(f"{where}: clock must be an integer from 1 to {MAX_META_CLOCK}")
        if json_depth(val) > MAX_META_DEPTH:
            raise ProtocolError(f"{where}: value is nested deeper than {MAX_META_DEPTH} levels")
        if len(json.dumps(val, separators=(",", ":"))) > MAX_META_VALUE:
            raise ProtocolError(f"{where}: value is longer than {MAX_META_VALUE} bytes")
        out.append((owner, key, clock, val))
    return tuple(out)


def _decode_records(payload: bytes) -> Records:
    records = split_records(payload)
    if not records:
        raise ProtocolError("RECORDS: frame without records")
    first = decode_header(records[0][:HEADER_SIZE]).lsn
    for i, raw in enumerate(records[1:], 1):
        lsn = decode_header(raw[:HEADER_SIZE]).lsn
        if lsn != first + i:
            raise ProtocolError(f"RECORDS: field 'records' holds LSN {lsn} after {first + i - 1}")
    return Records(tuple(records))
