"""The TCP fault proxy (marsfs.testing.faultproxy) over real loopback sockets.

Each fault is checked for what its docstring promises. Timing assertions are lower bounds plus
generous upper bounds (the suite must hold on a loaded 2-core machine).
"""

from __future__ import annotations

import functools
import os
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec

import pytest
import trio

from marsfs.testing.faultproxy import FaultProxy, Faults, ProxyProcess, open_fault_proxy
from marsfs.testing.runner import run, wait_for

P = ParamSpec("P")
MiB = 1024 * 1024


def trio_test(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an async test under trio with a hard 25 s limit, so a bug fails instead of hanging."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        run(functools.partial(fn, *args, **kwargs), limit=25, autojump=None)

    return wrapper


Handler = Callable[[trio.SocketStream], Awaitable[None]]


class Target:
    """A trio TCP server on 127.0.0.1 running ``handler`` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0

    async def _wrapped(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self.handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, self._wrapped, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self.port


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


class Sink:
    """Collects what each connection sends, until EOF or error."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.total = 0
        self.closed: list[str] = []  # "eof" or "error" per finished connection

    async def __call__(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        self.received.append(buf)
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    buf += data
                    self.total += len(data)
            self.closed.append("eof")
        except trio.BrokenResourceError:
            self.closed.append("error")


def source(payload: bytes) -> Handler:
    """Send ``payload`` and then wait for the peer to close."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(payload)
            while await stream.receive_some(65536):
                pass

    return handler


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(min(65536, n - len(buf)))
        if not data:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def receive_until_closed(stream: trio.SocketStream) -> tuple[bytes, str]:
    """Everything until EOF or reset; returns the bytes and "eof" or "reset"."""
    buf = bytearray()
    try:
        while data := await stream.receive_some(65536):
            buf += data
    except trio.BrokenResourceError:
        return bytes(buf), "reset"
    return bytes(buf), "eof"


async def round_trip(stream: trio.SocketStream, size: int = 1) -> float:
    t0 = trio.current_time()
    await stream.send_all(b"p" * size)
    await receive_exactly(stream, size)
    return trio.current_time() - t0


def differing_bits(a: bytes, b: bytes) -> int:
    assert len(a) == len(b)
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return x.bit_count()


# -- clean forwarding ---------------------------------------------------------------------------


@trio_test
async def test_clean_forwarding_8mib_both_ways_is_byte_exact() -> None:
    payload = os.urandom(8 * MiB)
    async with trio.open_nursery() as nursery:
        target = Target(echo)
        port = await target.start(nursery)
        async with open_fault_proxy(port) as proxy:
            stream = await connect(proxy)
            got = bytearray()

            async def send() -> None:
                for i in range(0, len(payload), 100_000):
                    await stream.send_all(payload[i:i + 100_000])
                await stream.send_eof()

            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                rest, how = await receive_until_closed(stream)
                got += rest
            assert how == "eof"
            assert bytes(got) == payload
            await stream.aclose()
            await wait_for(lambda: proxy.statistics().connections_active == 0)
            s = proxy.statistics()
            assert (s.bytes_up, s.bytes_down) == (len(payload), len(payload))
            assert (s.connections_accepted, s.bits_flipped, s.errors) == (1, 0, 0)
            assert s.buffered_peak <= proxy.max_buffer
        nursery.cancel_scope.cancel()


@trio_test
async def test_target_down_resets_the_client_and_is_counted() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with open_fault_proxy(dead_port) as proxy:
        stream = await connect(proxy)
        data, how = await receive_until_closed(stream)
        assert data == b"" and how in ("eof", "reset")
        assert proxy.statistics().connect_failures == 1


# -- latency, jitter, bandwidth -----------------------------------------------------------------


@trio_test
async def test_latency_adds_at_least_the_delay_each_way() -> None:
    async with trio.open_nursery() as nursery:
        port = await Target(echo).start(nursery)
        async with open_fault_proxy(port, faults=Faults(latency=0.15, jitter=0.05)) as proxy:
            stream = await connect(proxy)
            rtt = await round_trip(stream)
            assert 2 * (0.15 - 0.05) <= rtt < 2 * 0.2 + 5
            proxy.set(direction="down")  # only target -> client delayed now
            rtt = await round_trip(stream)
            assert 0.1 <= rtt < 0.2 + 5
            proxy.clear()
            assert await round_trip(stream) < 5
            await stream.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_jitter_keeps_byte_order() -> None:
    # Many small writes, each a separate chunk with its own jitter sample, must arrive in order.
    payload = b"".join(i.to_bytes(4, "big") for i in range(3000))
    async with trio.open_nursery() as nursery:
        port = await Target(echo).start(nursery)
        async with open_fault_proxy(port, faults=Faults(latency=0.02, jitter=0.02), seed=1) as proxy:
            stream = await connect(proxy)

            async def send() -> None:
                for i in range(0, len(payload), 40):
                    await stream.send_all(payload[i:i + 40])
                    if i % 400 == 0:
                        await trio.sleep(0.001)

            nursery.start_soon(send)
            assert await receive_exactly(stream, len(payload)) == payload
            await stream.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_bandwidth_limits_throughput() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await Target(sink).start(nursery)
        async with open_fault_proxy(port, faults=Faults(bandwidth=2_000_000)) as proxy:
            stream = await connect(proxy)
            t0 = trio.current_time()
            await stream.send_all(os.urandom(1_000_000))
            await wait_for(lambda: sink.total == 1_000_000, timeout=15)
            elapsed = trio.current_time() - t0
            assert 0.4 <= elapsed < 0.5 + 5
            await stream.aclose()
        nursery.cancel_scope.cancel()


# -- stall --------------------------------------------------------------------------------------


@trio_test
async def test_stall_forwards_nothing_then_clear_lets_everything_through() -> None:
    sink = Sink()
    payload = os.urandom(300_000)
    async with trio.open_nursery() as nursery:
        target = Target(sink)
        port = await target.start(nursery)
        async with open_fault_proxy(port) as proxy:
            old = await connect(proxy)
            await old.send_all(b"before")
            await wait_for(lambda: sink.total == 6)
            proxy.set(stall=True)
            new = await connect(proxy)  # accepted, but not connected on to the target
            await old.send_all(payload)
            await new.send_all(payload)
            await trio.sleep(0.5)
            assert sink.total == 6
            assert target.connections == 1
            proxy.clear()
            await old.send_eof()
            await new.send_eof()
            await wait_for(lambda: len(sink.closed) == 2)
            assert target.connections == 2
            assert bytes(sink.received[0]) == b"before" + payload
            assert bytes(sink.received[1]) == payload
            await old.aclose()
            await new.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_memory_is_bounded_by_backpressure() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await Target(sink).start(nursery)
        async with open_fault_proxy(port, faults=Faults(stall=True), max_buffer=256 * 1024) as proxy:
            stream = await connect(proxy)
            sent = 0
            with trio.move_on_after(1.0):  # the sender blocks once proxy and kernel buffers are full
                while True:  # socket.send, unlike send_all, sends nothing when cancelled
                    sent += await stream.socket.send(b"x" * 65536)
            s = proxy.statistics()
            assert s.buffered_peak <= 256 * 1024
            assert 0 < s.buffered <= 256 * 1024
            assert sent < 64 * MiB
            proxy.clear()
            await stream.send_eof()
            await wait_for(lambda: len(sink.closed) == 1)
            assert sink.total == sent
            await stream.aclose()
        nursery.cancel_scope.cancel()


# -- corruption ---------------------------------------------------------------------------------


@trio_test
async def test_corruption_flips_counted_bits_and_keeps_length() -> None:
    sink = Sink()
    payload = os.urandom(1_000_000)
    async with trio.open_nursery() as nursery:
        port = await Target(sink).start(nursery)
        async with open_fault_proxy(port, faults=Faults(corrupt=1e-3), seed=7) as proxy:
            stream = await connect(proxy)
            await stream.send_all(payload)
            await stream.send_eof()
            await wait_for(lambda: len(sink.closed) == 1)
            got = bytes(sink.received[0])
            assert len(got) == len(payload)
            flipped = differing_bits(payload, got)
            assert flipped == proxy.statistics().bits_flipped
            assert 700 < flipped < 1300  # ~1000 expected; binomial sd ~32
            await stream.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_corruption_only_in_the_chosen_direction() -> None:
    payload = os.urandom(200_000)
    async with trio.open_nursery() as nursery:
        sink = Sink()
        port = await Target(sink).start(nursery)
        async with open_fault_proxy(port, faults=Faults(corrupt=1e-2, direction="down")) as proxy:
            stream = await connect(proxy)
            await stream.send_all(payload)
            await stream.send_eof()
            await wait_for(lambda: len(sink.closed) == 1)
            assert bytes(sink.received[0]) == payload  # "up" is untouched
            assert proxy.statistics().bits_flipped == 0
            await stream.aclose()
        port2 = await Target(source(payload)).start(nursery)
        async with open_fault_proxy(port2, faults=Faults(corrupt=1e-2, direction="down")) as proxy:
            stream = await connect(proxy)
            got = await receive_exactly(stream, len(payload))
            assert differing_bits(payload, got) == proxy.statistics().bits_flipped > 0
            await stream.aclose()
        nursery.cancel_scope.cancel()


# -- cut, down, reset ---------------------------------------------------------------------------


@trio_test
async def test_cut_after_closes_each_new_connection_after_exactly_n_bytes() -> None:
    payload = os.urandom(1_000_000)
    n = 100_003
    async with trio.open_nursery() as nursery:
        target = Target(source(payload))
        port = await target.start(nursery)
        async with open_fault_proxy(port) as proxy:
            before = await connect(proxy)
            await receive_exactly(before, 10)
            proxy.set(cut_after=n)
            for _ in range(2):
                stream = await connect(proxy)
                got, how = await receive_until_closed(stream)
                assert how == "eof"
                assert got == payload[:n]
                await stream.aclose()
            assert proxy.statistics().connections_cut == 2
            # A connection accepted before cut_after was set is not cut.
            assert await receive_exactly(before, len(payload) - 10) == payload[10:]
            await before.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_cut_after_zero_and_upward() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await Target(sink).start(nursery)
        async with open_fault_proxy(port, faults=Faults(cut_after=5000, cut_direction="up")) as proxy:
            stream = await connect(proxy)
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(200):  # the proxy closes after 5000 bytes; writes start failing
                    await stream.send_all(b"y" * 10_000)
                    await trio.sleep(0.01)
            await wait_for(lambda: len(sink.closed) == 1)
            assert bytes(sink.received[0]) == b"y" * 5000
            await stream.aclose()
            proxy.set(cut_after=0, cut_direction="down")
            stream = await connect(proxy)
            assert await receive_until_closed(stream) == (b"", "eof")
            await stream.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_down_closes_connections_and_passes_nothing() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        target = Target(sink)
        port = await target.start(nursery)
        async with open_fault_proxy(port) as proxy:
            old = await connect(proxy)
            await old.send_all(b"hello")
            await wait_for(lambda: sink.total == 5)
            proxy.set(down=True)
            with trio.fail_after(5):
                assert await receive_until_closed(old) == (b"", "reset")
            await wait_for(lambda: len(sink.closed) == 1)
            for _ in range(3):
                try:
                    new = await connect(proxy)
                except OSError:
                    continue  # failing fast is allowed too
                with trio.fail_after(5):
                    try:
                        await new.send_all(b"lost")
                    except trio.BrokenResourceError:
                        pass
                    data, _ = await receive_until_closed(new)
                assert data == b""
                await new.aclose()
            await trio.sleep(0.2)
            assert (target.connections, sink.total) == (1, 5)
            s = proxy.statistics()
            assert s.connections_reset == 1 and s.connections_refused >= 1
            proxy.set(down=False)
            new = await connect(proxy)
            await new.send_all(b"again")
            await new.send_eof()
            await wait_for(lambda: len(sink.closed) == 2)
            assert bytes(sink.received[1]) == b"again"
            await new.aclose()
        nursery.cancel_scope.cancel()


@trio_test
async def test_reset_kills_current_connections_only() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await Target(sink).start(nursery)
        async with open_fault_proxy(port) as proxy:
            streams = [await connect(proxy) for _ in range(3)]
            for s in streams:
                await s.send_all(b"abc")
            await wait_for(lambda: sink.total == 9)
            assert proxy.reset() == 3
            for s in streams:
                with trio.fail_after(5):
                    data, how = await receive_until_closed(s)
                assert data == b"" and how in ("reset", "eof")
                await s.aclose()
            await wait_for(lambda: len(sink.closed) == 3)
            assert "error" in sink.closed  # the target saw ECONNRESET, not a clean EOF
            assert proxy.statistics().connections_reset == 3
            new = await connect(proxy)
            await new.send_all(b"fresh")
            await new.send_eof()
            await wait_for(lambda: len(sink.closed) == 4)
            assert bytes(sink.received[3]) == b"fresh"
            await new.aclose()
        nursery.cancel_scope.cancel()


# -- switching while a transfer runs ------------------------------------------------------------


@trio_test
async def test_switching_faults_during_a_transfer_keeps_the_stream_intact() -> None:
    payload = os.urandom(4 * MiB)
    async with trio.open_nursery() as nursery:
        port = await Target(echo).start(nursery)
        async with open_fault_proxy(port, faults=Faults(bandwidth=4_000_000), seed=3) as proxy:
            stream = await connect(proxy)

            async def send() -> None:
                for i in range(0, len(payload), 50_000):
                    await stream.send_all(payload[i:i + 50_000])

            async def switch() -> None:
                await trio.sleep(0.2)
                proxy.set(stall=True)
                await trio.sleep(0.3)
                stalled_at = proxy.statistics().bytes_down
                await trio.sleep(0.2)
                assert proxy.statistics().bytes_down == stalled_at
                proxy.set(stall=False, latency=0.05, jitter=0.03, bandwidth=20_000_000)
                await trio.sleep(0.2)
                proxy.set(direction="up", bandwidth=None)
                await trio.sleep(0.1)
                proxy.clear()

            async with trio.open_nursery() as inner:
                inner.start_soon(send)
                inner.start_soon(switch)
                got = await receive_exactly(stream, len(payload))
            assert got == payload
            await stream.aclose()
        nursery.cancel_scope.cancel()


def test_faults_validate() -> None:
    with pytest.raises(ValueError, match="latency"):
        Faults(latency=-1)
    with pytest.raises(ValueError, match="corrupt"):
        Faults(corrupt=2)
    with pytest.raises(ValueError, match="unknown fault"):
        Faults().replace(latncy=1)
    proxy = FaultProxy()
    assert proxy.command({"set": {"latency": 0.05, "jitter": 0.01}})["faults"]["latency"] == 0.05
    assert proxy.command({"set": {"stall": "yes"}})["ok"] is False
    assert proxy.command({"bogus": 1})["ok"] is False
    answer = proxy.command({"clear": True, "stats": True})
    assert answer["ok"] and answer["faults"] == Faults().to_json() and answer["stats"]["bytes_up"] == 0


# -- process mode -------------------------------------------------------------------------------


@contextmanager
def threaded_echo_server() -> Iterator[int]:
    """A plain-thread echo server (the process-mode test is all blocking code)."""
    ls = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def accept_loop() -> None:
        ls.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        ls.close()


def blocking_round_trip(s: socket.socket, payload: bytes) -> tuple[bytes, float]:
    t0 = time.monotonic()
    s.sendall(payload)
    buf = b""
    while len(buf) < len(payload):
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return buf, time.monotonic() - t0


def test_process_mode_via_proxy_process() -> None:
    payload = random.Random(5).randbytes(500_000)
    with threaded_echo_server() as echo_port, ProxyProcess(seed=1) as proxy:
        port = proxy.start(echo_port)
        pid = proxy.pid
        assert pid is not None and proxy.control_path.exists()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert blocking_round_trip(s, payload)[0] == payload
            faults = proxy.set(latency=0.1, jitter=0.02)
            assert (faults.latency, faults.jitter) == (0.1, 0.02)
            got, rtt = blocking_round_trip(s, b"ping")
            assert got == b"ping" and 2 * 0.08 <= rtt < 0.24 + 5
            stats = proxy.stats()
            assert stats["bytes_up"] == len(payload) + 4 and stats["connections_active"] == 1
            assert proxy.clear() == Faults()
            assert proxy.reset() == 1
            try:
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
        with pytest.raises(RuntimeError, match="unknown fault"):
            proxy.set(nonsense=1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert blocking_round_trip(s, b"after reset")[0] == b"after reset"
        workdir = proxy.workdir
        assert proxy.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()


def test_process_mode_fails_fast_on_a_taken_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with ProxyProcess(listen_port=taken.getsockname()[1]) as proxy:
            with pytest.raises(RuntimeError, match="exited 1"):
                proxy.start(1)
