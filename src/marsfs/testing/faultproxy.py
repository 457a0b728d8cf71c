"""A TCP fault proxy: bad links on loopback, switchable while running.

Linux netem/tc is not available to us, so every test of a slow, lossy, stalled or dead link (G4)
and of damaged frames (G6) goes through this proxy. A client connects to the proxy; for each
such connection the proxy connects to the target and forwards bytes both ways, applying the
current :class:`Faults`.

Words: the *client* is whoever connects to the proxy, the *target* is what the proxy connects
to. ``"up"`` is client -> target, ``"down"`` is target -> client (upstream -> downstream).

Rules (each fault exactly):

- ``latency`` / ``jitter`` (seconds): each chunk read from one side is written to the other no
  earlier than ``arrival + latency + u * jitter``, ``u`` uniform in [-1, 1] drawn once per chunk,
  and never earlier than its arrival. Order within a connection direction is always kept: a chunk
  is never written before the one read before it, so with jitter the effective delay of a chunk
  is the maximum of its own and its predecessors'. The delay is evaluated against the *current*
  setting whenever the writer looks at the chunk, so lowering latency releases queued data sooner.
- ``bandwidth`` (bytes/s, ``None`` = unlimited): a token bucket per connection and direction,
  refilled at ``bandwidth``, holding at most 20 ms worth (at least one piece); data is written in
  pieces of at most ``bandwidth / 50`` bytes (1 .. 64 KiB).
- ``stall``: connections are accepted and read (up to the buffer bound), but nothing is written
  to either side, on new and existing connections alike; a new connection does not even connect
  to the target until the stall ends. Clearing it forwards everything buffered, in order, intact
  (TCP over a black-holed link either resumes without loss or is given up by an endpoint).
- ``corrupt`` (probability per byte): each forwarded byte independently has one uniformly chosen
  bit flipped with this probability (at most one flip per byte per pass through the proxy), so
  ``bits_flipped`` equals the number of differing bits in what was delivered. Lengths never change.
- ``cut_after`` (bytes): a connection accepted while it is set forwards exactly this many bytes in
  ``cut_direction`` (default ``"down"``), then both sides are shut down for writing and closed,
  typically in the middle of a frame. Later changes do not affect connections already accepted;
  use :meth:`FaultProxy.reset` to kill those.
- ``down``: setting it closes every connection abruptly (RST); while it is set, new connections
  are accepted and closed at once (RST) without connecting to the target.
- ``direction`` (``"both"`` | ``"up"`` | ``"down"``): the directions that latency, jitter,
  bandwidth and corruption apply to. Stall, cut, down and reset act on whole connections.
- :meth:`FaultProxy.reset` (an action, not a fault): closes every current connection abruptly on
  both sides (``SO_LINGER`` 0, so the peers see ECONNRESET where the kernel allows).

Errors from one side are passed on: EOF becomes EOF (half-close is kept), a reset or broken
pipe on one side resets the other; a target that refuses the connection gets the client reset.
Stopping the proxy (cancelling :meth:`FaultProxy.serve`, SIGTERM in process mode) closes its
connections in order (FIN); call :meth:`FaultProxy.reset` first to make it look like a crash.

Memory bound: at most ``max_buffer`` bytes (default 16 MiB) are held per connection and
direction; when full, the proxy stops reading that side, so backpressure reaches the sender
through TCP. ``statistics().buffered_peak`` reports the highest level seen.

In-process use (trio)::

    async with open_fault_proxy(target_port) as proxy:
        connect to ("127.0.0.1", proxy.port); proxy.set(latency=0.05, jitter=0.01); proxy.reset()

Process mode, for tests that run real node processes::

    python -m marsfs.testing.faultproxy --listen 127.0.0.1:0 --target 127.0.0.1:7000 \\
        --control /tmp/x/ctl.sock

prints ``PORT <n>`` as its first stdout line once both the listener and the control socket are
ready, then serves until SIGTERM/SIGINT. The control socket takes JSON lines and answers one JSON
line each: ``{"set": {"latency": 0.05}}``, ``{"clear": true}``, ``{"reset": true}``,
``{"stats": true}`` (keys may be combined; they run in the order clear, set, reset, stats). Each
answer has ``"ok"`` and the current ``"faults"``, or ``"ok": false`` and an ``"error"``.
:class:`ProxyProcess` is the blocking client that starts, drives and always stops such a process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import trio

logger = logging.getLogger(__name__)

Way = Literal["up", "down"]
Direction = Literal["both", "up", "down"]

DEFAULT_MAX_BUFFER = 16 * 1024 * 1024
READ_SIZE = 64 * 1024
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Faults:
    """The faults in force; immutable, switched as a whole with :meth:`FaultProxy.set`.

    See the module docstring for exactly what each one does. The default value is a clean link.
    """

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None
    stall: bool = False
    corrupt: float = 0.0
    cut_after: int | None = None
    cut_direction: Way = "down"
    down: bool = False
    direction: Direction = "both"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_number(self.latency) or self.latency < 0:
            problems.append(f"latency must be a number >= 0, not {self.latency!r}")
        if not _is_number(self.jitter) or self.jitter < 0:
            problems.append(f"jitter must be a number >= 0, not {self.jitter!r}")
        if self.bandwidth is not None and (not _is_number(self.bandwidth) or self.bandwidth <= 0):
            problems.append(f"bandwidth must be None or a number > 0, not {self.bandwidth!r}")
        if not isinstance(self.stall, bool):
            problems.append(f"stall must be true or false, not {self.stall!r}")
        if not _is_number(self.corrupt) or not 0 <= self.corrupt <= 1:
            problems.append(f"corrupt must be a probability in [0, 1], not {self.corrupt!r}")
        if self.cut_after is not None and (
            not isinstance(self.cut_after, int) or isinstance(self.cut_after, bool) or self.cut_after < 0
        ):
            problems.append(f"cut_after must be None or an integer >= 0, not {self.cut_after!r}")
        if self.cut_direction not in ("up", "down"):
            problems.append(f"cut_direction must be 'up' or 'down', not {self.cut_direction!r}")
        if not isinstance(self.down, bool):
            problems.append(f"down must be true or false, not {self.down!r}")
        if self.direction not in ("both", "up", "down"):
            problems.append(f"direction must be 'both', 'up' or 'down', not {self.direction!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def applies(self, way: Way) -> bool:
        """Whether latency, jitter, bandwidth and corruption act on direction ``way``."""
        return self.direction == "both" or self.direction == way

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Faults:
        """A copy with ``changes``; unknown names raise ``ValueError`` naming the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


@dataclass
class ProxyStats:
    """Counters since the proxy was created (``connections_active`` and ``buffered`` are current)."""

    connections_accepted: int = 0
    connections_active: int = 0
    connections_refused: int = 0  # accepted while down and closed at once
    connections_cut: int = 0  # by cut_after
    connections_reset: int = 0  # closed abruptly by reset() or by going down
    connections_broken: int = 0  # an endpoint reset or broke the connection
    connect_failures: int = 0  # the target could not be reached
    bytes_up: int = 0  # delivered client -> target
    bytes_down: int = 0  # delivered target -> client
    bits_flipped: int = 0
    buffered: int = 0  # held in the proxy now, all connections and directions
    buffered_peak: int = 0  # highest level seen in one connection direction
    errors: int = 0  # unexpected exceptions in connection handlers (bugs; logged)

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _bucket_piece(rate: float) -> int:
    return max(1, min(READ_SIZE, int(rate / 50)))


def _bucket_cap(rate: float) -> float:
    return max(float(_bucket_piece(rate)), rate / 50)


def _set_linger_zero(stream: trio.SocketStream | None) -> None:
    if stream is None:
        return
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except (OSError, trio.ClosedResourceError):
        pass


def _close(stream: trio.SocketStream | None) -> None:
    if stream is not None:
        stream.socket.close()


class _Conn:
    """One proxied connection: two sockets, two pipes, one cancel scope."""

    def __init__(self, proxy: FaultProxy, client: trio.SocketStream) -> None:
        self.proxy = proxy
        self.client = client
        self.target: trio.SocketStream | None = None
        self.scope = trio.CancelScope()
        self.pipes: list[_Pipe] = []
        faults = proxy.faults
        self.cut_after = faults.cut_after
        self.cut_direction: Way = faults.cut_direction
        self.ended: str | None = None

    def kick(self) -> None:
        for pipe in self.pipes:
            pipe.kick_writer()

    def abort(self, reason: str) -> None:
        """Close both sides abruptly (RST) and stop this connection's tasks."""
        if self.ended is None:
            self.ended = reason
            if reason == "reset":
                self.proxy._stats.connections_reset += 1
            elif reason == "broken":
                self.proxy._stats.connections_broken += 1
        _set_linger_zero(self.client)
        _set_linger_zero(self.target)
        self.scope.cancel()

    def cut(self) -> None:
        """Close both sides in order (FIN after the data already written)."""
        if self.ended is None:
            self.ended = "cut"
            self.proxy._stats.connections_cut += 1
        for stream in (self.client, self.target):
            if stream is not None:
                try:
                    stream.socket.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self.scope.cancel()


class _Pipe:
    """One direction of a connection: a reader filling a bounded delay queue, a writer draining it."""

    def __init__(self, proxy: FaultProxy, conn: _Conn, way: Way, src: trio.SocketStream) -> None:
        self.proxy = proxy
        self.conn = conn
        self.way: Way = way
        self.src = src
        # (arrival time, jitter sample in [-1, 1], bytes)
        self.queue: deque[tuple[float, float, bytes]] = deque()
        self.buffered = 0
        self.eof = False
        self.forwarded = 0
        self.tokens = math.inf
        self.tokens_at = 0.0
        self._writer_wake = trio.Event()
        self._reader_wake = trio.Event()

    def kick_writer(self) -> None:
        self._writer_wake.set()
        self._writer_wake = trio.Event()

    def kick_reader(self) -> None:
        self._reader_wake.set()
        self._reader_wake = trio.Event()

    async def read_loop(self) -> None:
        stats = self.proxy._stats
        try:
            while True:
                room = self.proxy.max_buffer - self.buffered
                if room <= 0:
                    await self._reader_wake.wait()
                    continue
                data = await self.src.receive_some(min(READ_SIZE, room))
                if not data:
                    self.eof = True
                    self.kick_writer()
                    return
                self.queue.append((trio.current_time(), self.proxy._rng.uniform(-1.0, 1.0), data))
                self.buffered += len(data)
                if self.buffered > stats.buffered_peak:
                    stats.buffered_peak = self.buffered
                self.kick_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.conn.abort("broken")

    def _cut_budget(self) -> int | None:
        if self.conn.cut_after is None or self.conn.cut_direction != self.way:
            return None
        return self.conn.cut_after - self.forwarded

    async def write_loop(self, dst: trio.SocketStream) -> None:
        proxy = self.proxy
        stats = proxy._stats
        try:
            while True:
                wake = self._writer_wake
                budget = self._cut_budget()
                if budget is not None and budget <= 0:
                    self.conn.cut()
                    return
                if not self.queue:
                    if self.eof:
                        await dst.send_eof()
                        return
                    await wake.wait()
                    continue
                faults = proxy.faults
                if faults.stall:
                    await wake.wait()
                    continue
                arrival, u, data = self.queue[0]
                now = trio.current_time()
                shaped = faults.applies(self.way)
                if shaped and (faults.latency or faults.jitter):
                    release = max(arrival, arrival + faults.latency + u * faults.jitter)
                    if now < release:
                        with trio.move_on_at(release):
                            await wake.wait()
                        continue
                n = len(data)
                rate = faults.bandwidth if shaped else None
                if rate is not None:
                    n = min(n, _bucket_piece(rate))
                    self.tokens = min(_bucket_cap(rate), self.tokens + (now - self.tokens_at) * rate)
                    self.tokens_at = now
                    if self.tokens < n:
                        with trio.move_on_at(now + (n - self.tokens) / rate):
                            await wake.wait()
                        continue
                    self.tokens -= n
                else:
                    self.tokens = math.inf
                    self.tokens_at = now
                if budget is not None:
                    n = min(n, budget)
                piece = data
                if n == len(data):
                    self.queue.popleft()
                else:
                    piece = data[:n]
                    self.queue[0] = (arrival, u, data[n:])
                self.buffered -= n
                self.kick_reader()
                if shaped and faults.corrupt > 0:
                    piece = self._corrupt(piece, faults.corrupt)
                await dst.send_all(piece)
                self.forwarded += n
                if self.way == "up":
                    stats.bytes_up += n
                else:
                    stats.bytes_down += n
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.conn.abort("broken")

    def _corrupt(self, piece: bytes, p: float) -> bytes:
        """Flip one random bit in each byte with probability ``p`` (geometric skipping)."""
        rng = self.proxy._rng
        log_q = math.log1p(-p) if p < 1 else -math.inf
        buf: bytearray | None = None
        pos = -1
        flips = 0
        while True:
            # Number of untouched bytes before the next flipped one: geometric, memoryless.
            pos += 1 + int(math.log(1.0 - rng.random()) / log_q)
            if pos >= len(piece):
                break
            if buf is None:
                buf = bytearray(piece)
            buf[pos] ^= 1 << rng.randrange(8)
            flips += 1
        if buf is None:
            return piece
        self.proxy._stats.bits_flipped += flips
        return bytes(buf)


class FaultProxy:
    """A trio TCP proxy applying :class:`Faults`; see the module docstring for the rules.

    Switch faults with :meth:`set`, :meth:`clear` or by assigning :attr:`faults`, and
    :meth:`reset` current connections; all of these must be called from the proxy's trio thread
    and take effect at once, also on connections already running.
    """

    def __init__(self, faults: Faults | None = None, *, seed: int | None = None,
                 max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1 byte")
        self.max_buffer = max_buffer
        self._faults = faults or Faults()
        self._rng = random.Random(seed)
        self._stats = ProxyStats()
        self._conns: set[_Conn] = set()
        self._changed = trio.Event()
        self._port: int | None = None

    # -- faults ---------------------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, new: Faults) -> None:
        going_down = new.down and not self._faults.down
        self._faults = new
        if going_down:
            for conn in list(self._conns):
                conn.abort("reset")
        for conn in self._conns:
            conn.kick()
        self._changed.set()
        self._changed = trio.Event()

    def set(self, **changes: Any) -> Faults:
        """Change some faults, keep the others; returns the faults now in force."""
        self.faults = self._faults.replace(**changes)
        return self._faults

    def clear(self) -> Faults:
        """All faults off (a clean link); connections stay up."""
        self.faults = Faults()
        return self._faults

    def reset(self) -> int:
        """Close all current connections abruptly (RST to both sides); returns how many."""
        conns = list(self._conns)
        for conn in conns:
            conn.abort("reset")
        return len(conns)

    # -- observation ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once :meth:`serve` has started)."""
        if self._port is None:
            raise RuntimeError("the fault proxy is not listening yet")
        return self._port

    def statistics(self) -> ProxyStats:
        s = dataclasses.replace(self._stats)
        live = [c for c in self._conns if c.ended is None]  # aborted ones may not have unwound yet
        s.connections_active = len(live)
        s.buffered = sum(p.buffered for c in live for p in c.pipes)
        return s

    def command(self, request: object) -> dict[str, Any]:
        """Run one control request (the JSON protocol of process mode); returns the answer."""
        try:
            if not isinstance(request, dict) or not request:
                raise ValueError("a request is a non-empty JSON object")
            unknown = sorted(set(request) - {"set", "clear", "reset", "stats", "faults"})
            if unknown:
                raise ValueError(f"unknown request key(s) {', '.join(unknown)}; "
                                 "known: set, clear, reset, stats, faults")
            changes = request.get("set", {})
            if not isinstance(changes, dict):
                raise ValueError('"set" takes an object of faults')
            new = Faults() if request.get("clear") else self._faults
            new = new.replace(**changes)
            answer: dict[str, Any] = {"ok": True}
            self.faults = new
            if request.get("reset"):
                answer["reset"] = self.reset()
            if request.get("stats"):
                answer["stats"] = self.statistics().to_json()
            answer["faults"] = self._faults.to_json()
            return answer
        except (ValueError, TypeError) as e:
            return {"ok": False, "error": str(e)}

    # -- serving --------------------------------------------------------------------------------

    async def serve(self, listen_host: str, listen_port: int, target_host: str, target_port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (port 0: any free one, see :attr:`port`) and forward to the target until cancelled."""
        infos = await trio.socket.getaddrinfo(listen_host, listen_port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        self._port = sock.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self._port)
                while True:
                    try:
                        client = await listener.accept()
                    except OSError as e:  # e.g. EMFILE: wait for descriptors to come back
                        logger.warning("fault proxy: accept failed: %s", e)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._handle, client, target_host, target_port)
        finally:
            sock.close()

    async def _connect(self, conn: _Conn, host: str, port: int) -> trio.SocketStream | None:
        while self._faults.stall and not self._faults.down:
            await self._changed.wait()
        if self._faults.down:
            return None
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as e:
            self._stats.connect_failures += 1
            logger.info("fault proxy: cannot reach target %s:%d: %s", host, port, e)
            return None

    async def _handle(self, client: trio.SocketStream, host: str, port: int) -> None:
        self._stats.connections_accepted += 1
        if self._faults.down:
            self._stats.connections_refused += 1
            _set_linger_zero(client)
            _close(client)
            return
        conn = _Conn(self, client)
        self._conns.add(conn)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    up = _Pipe(self, conn, "up", client)
                    conn.pipes.append(up)
                    nursery.start_soon(up.read_loop)
                    target = await self._connect(conn, host, port)
                    if target is None:
                        conn.abort("refused")
                        return
                    conn.target = target
                    down = _Pipe(self, conn, "down", target)
                    conn.pipes.append(down)
                    nursery.start_soon(up.write_loop, target)
                    nursery.start_soon(down.read_loop)
                    nursery.start_soon(down.write_loop, client)
        except Exception:
            self._stats.errors += 1
            logger.exception("fault proxy: connection handler failed")
            _set_linger_zero(conn.client)
            _set_linger_zero(conn.target)
        finally:
            self._conns.discard(conn)
            _close(conn.client)
            _close(conn.target)


@asynccontextmanager
async def open_fault_proxy(target_port: int, *, target_host: str = "127.0.0.1",
                           listen_host: str = "127.0.0.1", listen_port: int = 0,
                           faults: Faults | None = None, seed: int | None = None,
                           max_buffer: int = DEFAULT_MAX_BUFFER) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` for the duration of the block; connect to ``proxy.port``."""
    proxy = FaultProxy(faults, seed=seed, max_buffer=max_buffer)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve, listen_host, listen_port, target_host, target_port)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


# -- process mode -------------------------------------------------------------------------------

MAX_CONTROL_LINE = 1024 * 1024


async def _control_session(proxy: FaultProxy, stream: trio.SocketStream) -> None:
    buf = b""
    try:
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    try:
                        request = json.loads(line)
                    except ValueError as e:
                        answer: dict[str, Any] = {"ok": False, "error": f"not JSON: {e}"}
                    else:
                        answer = proxy.command(request)
                    await stream.send_all(json.dumps(answer).encode() + b"\n")
                if len(buf) > MAX_CONTROL_LINE:
                    await stream.send_all(b'{"ok": false, "error": "request line too long"}\n')
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _serve_control(proxy: FaultProxy, path: str, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_control_session, proxy, stream)
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _run_process(args: argparse.Namespace) -> None:
    proxy = FaultProxy(args.faults, seed=args.seed, max_buffer=args.max_buffer)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve, *args.listen, *args.target)
            if args.control:
                await nursery.start(_serve_control, proxy, args.control)
            print(f"PORT {port}", flush=True)
            async for signum in signals:
                logger.info("fault proxy: signal %d, stopping", signum)
                break
            nursery.cancel_scope.cancel()


def _parse_faults(text: str) -> Faults:
    try:
        changes = json.loads(text)
        if not isinstance(changes, dict):
            raise ValueError("expected a JSON object")
        return Faults().replace(**changes)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"bad --faults: {e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marsfs.testing.faultproxy",
                                     description="TCP fault proxy with a JSON-lines control socket.")
    parser.add_argument("--listen", type=_host_port, required=True, metavar="HOST:PORT",
                        help="where to listen; port 0 picks a free one (printed as 'PORT n')")
    parser.add_argument("--target", type=_host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--control", metavar="PATH", help="unix socket taking JSON-line requests")
    parser.add_argument("--faults", type=_parse_faults, default=Faults(), metavar="JSON",
                        help='initial faults, e.g. \'{"latency": 0.05}\'')
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-buffer", type=int, default=DEFAULT_MAX_BUFFER, metavar="BYTES")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="faultproxy %(levelname)s %(message)s")
    failed: list[OSError] = []
    try:
        trio.run(_run_process, args)
    except* OSError as group:  # e.g. the listen address is taken: one line, exit status 1
        failed.extend(e for e in group.exceptions if isinstance(e, OSError))
    for e in failed:
        print(f"faultproxy: {e}", file=sys.stderr)
    return 1 if failed else 0


class ProxyProcess:
    """A fault proxy in its own process, driven by blocking calls; always stops what it started.

    ``with ProxyProcess() as p: port = p.start(target_port); p.set(stall=True); ...``. The
    process is stopped by pid (SIGTERM, then SIGKILL after a timeout), never by name.
    """

    def __init__(self, *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 target_host: str = "127.0.0.1", faults: Faults | None = None, seed: int | None = None,
                 max_buffer: int | None = None, workdir: Path | None = None,
                 request_timeout: float = 10.0) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.initial_faults = faults
        self.seed = seed
        self.max_buffer = max_buffer
        self.request_timeout = request_timeout
        self._own_workdir = workdir is None
        self._workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            # /tmp keeps the control socket path well under the 108-byte limit of AF_UNIX.
            self._workdir = Path(tempfile.mkdtemp(prefix="marsfs-faultproxy-", dir="/tmp"))
        return self._workdir

    @property
    def control_path(self) -> Path:
        return self.workdir / "ctl.sock"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no stderr)"

    def start(self, target_port: int, timeout: float = 15.0) -> int:
        """Start the proxy towards ``target_port``; returns the port it listens on."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("fault proxy process already running")
        cmd = [sys.executable, "-m", "marsfs.testing.faultproxy",
               "--listen", f"{self.listen_host}:{self.listen_port}",
               "--target", f"{self.target_host}:{target_port}",
               "--control", os.fspath(self.control_path)]
        if self.initial_faults is not None:
            cmd += ["--faults", json.dumps(self.initial_faults.to_json())]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.max_buffer is not None:
            cmd += ["--max-buffer", str(self.max_buffer)]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            self.port = self._read_port(timeout)
        except BaseException:
            self.stop()
            raise
        return self.port

    def _read_port(self, timeout: float) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"fault proxy did not report its port within {timeout} s:\n"
                                   + self.stderr_tail())
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 1)
                if not chunk:
                    self.proc.wait(5)
                    raise RuntimeError(f"fault proxy exited {self.proc.returncode} during start:\n"
                                       + self.stderr_tail())
                line += chunk
        word, _, port = line.decode().strip().partition(" ")
        if word != "PORT" or not port.isdigit():
            raise RuntimeError(f"fault proxy said {line!r} instead of 'PORT n'")
        return int(port)

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one control request; returns the answer, raises ``RuntimeError`` if refused."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("fault proxy process is not running:\n" + self.stderr_tail())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.request_timeout)
            s.connect(os.fspath(self.control_path))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("fault proxy closed the control connection without answering")
                buf += chunk
        answer: dict[str, Any] = json.loads(buf)
        if not answer.get("ok"):
            raise RuntimeError(f"fault proxy refused {req!r}: {answer.get('error')}")
        return answer

    def set(self, **faults: Any) -> Faults:
        """Change some faults, keep the others; returns the faults now in force."""
        return Faults(**self.request({"set": faults})["faults"])

    def clear(self) -> Faults:
        return Faults(**self.request({"clear": True})["faults"])

    def reset(self) -> int:
        """Close all current connections abruptly; returns how many there were."""
        return int(self.request({"reset": True})["reset"])

    def faults(self) -> Faults:
        return Faults(**self.request({"faults": True})["faults"])

    def stats(self) -> dict[str, int]:
        return dict(self.request({"stats": True})["stats"])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by pid and wait (SIGKILL after ``timeout``); returns the exit status."""
        code: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
