"""``marsfs serve --metrics HOST:PORT``: the node's status in Prometheus' text format.

What it exports is docs/metrics.md. Rules that hold here:

* Everything is rendered from the status rows (:class:`~marsfs.node.state.VolumeStatus`, what
  ``marsfs status --json`` prints) built at scrape time, plus the counters and the fsync
  histogram the core keeps (:mod:`marsfs.stats`). No state is worked out a second way here:
  a state, a lag or an LSN is exactly the row's.
* One :class:`~prometheus_client.CollectorRegistry` per daemon (:func:`registry`), holding one
  :class:`NodeCollector`; nothing module-level.
* The HTTP side is a small responder on the daemon's trio loop (:func:`serve_metrics`), so the
  collector reads the node on the one thread that changes it, as the control socket does; no
  HTTP server thread. It answers ``GET /metrics`` (and ``HEAD``), 404 for any other path, 405
  for any other method; a request head is bounded (:data:`MAX_REQUEST`), a connection gets
  :data:`DEADLINE` seconds for everything and at most :data:`MAX_CLIENTS` are served at once
  (more get 503), so a slow or flooding client cannot hold the loop or the daemon's memory.
  Every answer closes its connection.
* State sets (role, state) are gauges with a label that takes each possible value, 1 for the
  one that holds and 0 for the others, so that a series never vanishes while the volume
  exists. Labels are the volume, the peer, a role or a state: never an LSN, a message or a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from marsfs.errors import MarsError
from marsfs.node import Node
from marsfs.node.peers import parse_address
from marsfs.node.state import ReplicationMode, SyncState, VolumeStatus
from marsfs.node.volstate import Role, VolumeState

logger = logging.getLogger(__name__)

MAX_REQUEST = 8192  #: bytes of a request head (request line and headers); more is refused with 431
DEADLINE = 10.0  #: seconds a connection may take, reading the request and sending the answer
MAX_CLIENTS = 8  #: connections answered at once; more are refused with 503 at once
LINGER = 1.0  #: seconds after an answer that a connection waits for the client to close, reading what it sent
#: the classic text format (0.0.4): what generate_latest writes with legacy metric names
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

Rows = Callable[[], list[VolumeStatus]]


def _gauge(name: str, doc: str, labels: Iterable[str] = ("volume",), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


class NodeCollector(Collector):
    """Reads a node's status rows at each scrape and renders them as metric families.

    ``rows``: the node's status rows, the same call ``marsfs status`` answers from
    (:meth:`marsfs.node.cluster.Cluster.statuses` in a daemon, or
    :func:`marsfs.node.status.node_statuses` for a node alone). Call :meth:`collect` on the
    thread that runs the node (the daemon's trio loop)."""

    def __init__(self, node: Node, rows: Rows) -> None:
        self.node = node
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        rows = _unique(self.rows())
        node = self.node
        info = _gauge("marsfs_node_info", "This node; always 1, its name in the label.", ("node",))
        info.add_metric([node.name], 1)
        yield info
        limit = _gauge("marsfs_log_space_limit_bytes", "The node's limit for the log bytes of all volumes "
                       "together (--log-space), as the last log space pass computed it.", ())
        limit.add_metric([], node.space.last_limit)
        yield limit
        used = _gauge("marsfs_log_space_used_bytes", "Log bytes of every served volume together (the sum of "
                      "marsfs_volume_log_bytes), what the limit bounds.", ())
        used.add_metric([], sum(r.log_bytes for r in rows if r.volume in node.volumes))
        yield used
        yield from _volume_families(rows)
        yield from _peer_families(rows)
        yield from _core_families(node, rows)


def _unique(rows: list[VolumeStatus]) -> list[VolumeStatus]:
    """One row per volume (the first): a series must not appear twice in one scrape."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if r.volume not in seen:
            seen.add(r.volume)
            out.append(r)
    return out


#: (name, help, the row's field) of the plain per-volume gauges; every row has these
VOLUME_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("marsfs_volume_epoch", "The volume's epoch here: raised at each change of primary.", "epoch"),
    ("marsfs_volume_size_bytes", "The volume's current size.", "size"),
    ("marsfs_volume_head_lsn", "LSN of the newest record in this node's log of the volume.", "head_lsn"),
    ("marsfs_volume_durable_lsn", "Newest LSN durable (fdatasync'd) in this node's log.", "durable_lsn"),
    ("marsfs_volume_fetched_lsn", "Newest LSN this node has (a mirror: fetched and durable; a primary: its head).",
     "fetched_lsn"),
    ("marsfs_volume_replayed_lsn", "LSN of the version readers see here (a mirror: its replay position).",
     "replayed_lsn"),
    ("marsfs_volume_applied_lsn", "LSN written back into the base image.", "applied_lsn"),
    ("marsfs_volume_oldest_version_lsn", "LSN of the oldest version that can still be opened.", "oldest_version_lsn"),
    ("marsfs_volume_lag_bytes", "A mirror's lag behind its source in bytes (0 on a primary).", "lag_bytes"),
    ("marsfs_volume_lag_records", "A mirror's lag behind its source in records (0 on a primary).", "lag_records"),
    ("marsfs_volume_lag_seconds", "A mirror's lag behind its source in seconds (0 on a primary).", "lag_seconds"),
    ("marsfs_volume_log_bytes", "Bytes this node's log of the volume takes.", "log_bytes"),
    ("marsfs_volume_open_handles", "Open handles of the volume's image here (loop devices, readers).",
     "open_handles"),
)

#: (name, help, the row's field) of per-volume gauges that only some rows have (None: left out)
OPTIONAL_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("marsfs_volume_connected", "A mirror: 1 while connected to its source.", "connected"),
    ("marsfs_volume_fetch_paused", "A mirror: 1 while its fetch is paused (marsfs pause-fetch).", "fetch_paused"),
    ("marsfs_volume_replay_paused", "A mirror: 1 while its replay is paused (marsfs pause-replay).", "replay_paused"),
    ("marsfs_volume_sync_progress_ratio", "A sync (first copy or resync) under way: the fraction compared, 0 to 1.",
     "progress"),
    ("marsfs_volume_sync_remaining_bytes", "A sync under way: bytes of the image still to compare.", "sync_left_bytes"),
    ("marsfs_volume_eta_seconds", "A mirror catching up or syncing: the estimated seconds until it has no lag.",
     "eta_seconds"),
)


def _volume_families(rows: list[VolumeStatus]) -> Iterator[Metric]:
    role = _gauge("marsfs_volume_role", "The volume's role here: 1 for the role it has, 0 for the others.",
                  ("volume", "role"))
    state = _gauge("marsfs_volume_state", "The volume's state here (as marsfs status says it): 1 for the state it "
                   "is in, 0 for the others.", ("volume", "state"))
    errors = _gauge("marsfs_volume_errors", "Error lines marsfs status shows for the volume now.")
    warnings = _gauge("marsfs_volume_warnings", "Warning lines marsfs status shows for the volume now (log space).")
    splits = _gauge("marsfs_volume_split_brains", "Unresolved split brains of the volume here (one per peer).")
    mode = _gauge("marsfs_volume_mode", "The volume's replication mode: 1 for the mode it has, 0 for the other.",
                  ("volume", "mode"))
    degraded = _gauge("marsfs_volume_sync_degraded", "A sync volume's primary: 1 while it runs degraded (async).")
    behind = _gauge("marsfs_volume_sync_behind_records", "A sync volume's primary: records its N-th mirror lacks.")
    degradations = _gauge("marsfs_volume_sync_degradations", "A sync volume's primary: how often it degraded since "
                          "the daemon started.")
    no_aio = _gauge("marsfs_volume_fsync_aio_refused", "1 while the volume's log makes fsync durable in threads "
                    "because the kernel refused AIO (slower fsync; status says why).")
    plain = [(_gauge(n, doc), f) for n, doc, f in VOLUME_GAUGES]
    optional = [(_gauge(n, doc), f) for n, doc, f in OPTIONAL_GAUGES]
    for r in rows:
        v = [r.volume]
        for x in Role:
            role.add_metric([r.volume, x.value], float(x == r.role))
        for s in VolumeState:
            state.add_metric([r.volume, s.value], float(s == r.state))
        errors.add_metric(v, len(r.errors))
        warnings.add_metric(v, len(r.warnings))
        splits.add_metric(v, len(r.split_brain))
        no_aio.add_metric(v, float(r.fsync_aio_refused is not None))
        for m in ReplicationMode:
            mode.add_metric([r.volume, m.value], float(m == r.mode))
        if r.sync_mode is not None:
            degraded.add_metric(v, float(r.sync_mode.state is SyncState.DEGRADED))
            behind.add_metric(v, r.sync_mode.behind_records)
            degradations.add_metric(v, r.sync_mode.degradations)
        for family, f in plain:
            family.add_metric(v, float(getattr(r, f)))
        for family, f in optional:
            value = getattr(r, f)
            if value is not None:
                family.add_metric(v, float(value))
    yield from (role, state, errors, warnings, splits, no_aio, mode, degraded, behind, degradations)
    yield from (f for f, _ in plain)
    yield from (f for f, _ in optional)


#: (name, help, the peer row's field) of the per-peer gauges: a primary's view of each mirror
PEER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("marsfs_peer_connected", "1 while the mirror is connected to this node.", "connected"),
    ("marsfs_peer_fetched_lsn", "Newest LSN the mirror has fetched, as its last ACK said.", "fetched_lsn"),
    ("marsfs_peer_replayed_lsn", "The mirror's replay position, as its last ACK said.", "replayed_lsn"),
    ("marsfs_peer_lag_bytes", "How far the mirror is behind this node's log, in bytes.", "lag_bytes"),
    ("marsfs_peer_lag_records", "How far the mirror is behind this node's log, in records.", "lag_records"),
    ("marsfs_peer_lag_seconds", "How far the mirror is behind this node's log, in seconds.", "lag_seconds"),
    ("marsfs_peer_dropped_bytes", "Bytes of changed extents the mirror will copy when it returns (its log was "
     "dropped for log space).", "dropped"),
)


def _peer_families(rows: list[VolumeStatus]) -> Iterator[Metric]:
    labels = ("volume", "peer")
    state = _gauge("marsfs_peer_state", "A mirror's state as this node (its source) sees it: 1 for the state it is "
                   "in, 0 for the others.", ("volume", "peer", "state"))
    families = [(_gauge(n, doc, labels), f) for n, doc, f in PEER_GAUGES]
    peer_states = (VolumeState.SYNCING, VolumeState.FETCH_PAUSED, VolumeState.REPLAY_PAUSED,
                   VolumeState.DISCONNECTED, VolumeState.CATCHING_UP, VolumeState.SYNCED)
    for r in rows:
        for p in r.peers:
            for s in peer_states:
                state.add_metric([r.volume, p.node, s.value], float(s == p.state))
            for family, f in families:
                family.add_metric([r.volume, p.node], float(getattr(p, f)))
    yield state
    yield from (f for f, _ in families)


def _core_families(node: Node, rows: list[VolumeStatus]) -> Iterator[Metric]:
    """The counters and the fsync histogram of every served volume that has a row."""
    fetched = CounterMetricFamily("marsfs_volume_fetched_bytes", "Log bytes fetched from another node since the "
                                  "volume was opened here.", labels=["volume"])
    replayed = CounterMetricFamily("marsfs_volume_replayed_bytes", "Log bytes a mirror's replay made visible since "
                                   "the volume was opened here.", labels=["volume"])
    written_back = CounterMetricFamily("marsfs_volume_writeback_bytes", "Data bytes written back into the base "
                                       "image since the volume was opened here.", labels=["volume"])
    fsync = HistogramMetricFamily("marsfs_volume_fsync_duration_seconds", "Duration of each fdatasync of the "
                                  "volume's log (one per group commit).", labels=["volume"])
    for r in rows:
        vol = node.volumes.get(r.volume)
        if vol is None:
            continue
        c = vol.counters
        fetched.add_metric([r.volume], c.fetched_bytes)
        replayed.add_metric([r.volume], c.replayed_bytes)
        written_back.add_metric([r.volume], c.writeback_bytes)
        h = vol.log.sync_latency.snapshot()
        buckets = [(repr(bound), float(n)) for bound, n in h.buckets] + [("+Inf", float(h.count))]
        fsync.add_metric([r.volume], buckets, h.sum)
    yield from (fetched, replayed, written_back, fsync)


def registry(node: Node, rows: Rows) -> CollectorRegistry:
    """A registry of its own for one daemon, holding its :class:`NodeCollector`."""
    reg = CollectorRegistry()
    reg.register(NodeCollector(node, rows))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """The text exposition of ``reg``, now (on the node's thread)."""
    return generate_latest(reg)


# ---------------------------------------------------------------------------- HTTP


async def serve_metrics(address: str, body: Callable[[], bytes], *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer scrapes at ``address`` (``HOST:PORT``) with ``body()`` until cancelled; reports
    the bound port when listening."""
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise MarsError(f"cannot listen for metrics scrapes on {address}: {e.strerror}; pick another --metrics "
                        "address or stop what uses it") from None
    bound = listeners[0].socket.getsockname()[1]
    logger.info("metrics at http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    task_status.started(bound)
    await trio.serve_listeners(functools.partial(_connection, body, limiter), listeners)


async def _connection(body: Callable[[], bytes], limiter: trio.CapacityLimiter, stream: trio.SocketStream) -> None:
    """One client: at most :data:`DEADLINE` seconds for its request and our answer, then at
    most :data:`LINGER` for it to close; it holds a slot all that time."""
    try:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(LINGER):
                await _send(stream, 503, b"too many scrapes at once; try again\n")
                await _drain(stream)
            return
        try:
            with trio.move_on_after(DEADLINE):
                await _answer(body, stream)
            with trio.move_on_after(LINGER):
                await _drain(stream)
        finally:
            limiter.release()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the client went away: nothing to tell anyone
    finally:
        await trio.aclose_forcefully(stream)


async def _drain(stream: trio.SocketStream) -> None:
    """Say we are done sending, then read what the client still sends (a body, the rest of an
    oversized head) until it closes: closing a socket with unread input resets the connection,
    and the client could lose the answer it was about to read."""
    await stream.send_eof()
    left = 16 * MAX_REQUEST
    while left > 0:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        left -= len(chunk)


async def _answer(body: Callable[[], bytes], stream: trio.SocketStream) -> None:
    head = await _read_head(stream)
    if head is None:
        return  # closed before a whole request head
    if len(head) > MAX_REQUEST:
        await _send(stream, 431, b"request head too large\n")
        return
    parts = head.split(b"\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        await _send(stream, 400, b"not an HTTP request\n")
        return
    method, target = parts[0], parts[1]
    if method not in (b"GET", b"HEAD"):
        await _send(stream, 405, b"only GET /metrics\n", extra=b"Allow: GET, HEAD\r\n")
        return
    if target.split(b"?", 1)[0] != b"/metrics":
        await _send(stream, 404, b"not found: metrics are at /metrics\n")
        return
    try:
        text = body()
    except Exception:
        logger.exception("rendering the metrics failed")
        await _send(stream, 500, b"rendering the metrics failed; see the daemon's log\n")
        return
    await _send(stream, 200, text, content_type=CONTENT_TYPE, head_only=method == b"HEAD")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head up to its blank line; more than :data:`MAX_REQUEST` bytes are cut
    there (the caller refuses it); None if the client closed first."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > MAX_REQUEST:
            return bytes(buf)
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buf += chunk


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


async def _send(stream: trio.SocketStream, code: int, payload: bytes, *, content_type: str = "text/plain; charset=utf-8",
                extra: bytes = b"", head_only: bool = False) -> None:
    header = (f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(payload)}\r\nConnection: close\r\n").encode() + extra + b"\r\n"
    await stream.send_all(header if head_only else header + payload)

