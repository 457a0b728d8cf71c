"""The serving side of replication: hand out images and ship durable log records.

Rules that hold here:

* Only records that are durable on this node are shipped (G3), and on a mirror serving
  another mirror only records it has replayed, so a chain of mirrors stays prefix-consistent.
* An image is sent as a pinned view at a durable LSN, so the copy is exactly that version.
* A fetch states where the client's log ends (next LSN and the chain before it). If our chain
  at that LSN differs, the histories diverged: we refuse with ``diverged`` and never ship
  (split brain is detected, never resolved automatically). If our log no longer holds the
  records, we refuse with ``log-trimmed``.
* While a mirror is known, its position holds our log (``Volume.hold``), so we keep what it
  still has to fetch.
* Shipping runs in its own tasks and only reads the log: a slow, stalled or dead link never
  blocks writers (G4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from marsfs.aio import single_error
from marsfs.errors import MarsError
from marsfs.replication.channel import Channel, ConnectionLost
from marsfs.replication.protocol import PROTO_VERSION, MsgType, ProtocolError, encode_frame, encode_image_data
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

BATCH_BYTES = 4 * 1024 * 1024
FIRST_BATCH = 64 * 1024  #: a session's first frame; each later one may be twice as big
IMAGE_CHUNK = 1024 * 1024
HEARTBEAT = 0.5
POLL = 0.01
_ZERO = bytes(IMAGE_CHUNK)


@dataclass
class PeerState:
    """What this node knows about one mirror of one of its volumes."""

    node: str
    volume: str
    connected: bool = False
    fetched_lsn: int = 0
    replayed_lsn: int = 0
    fetch_paused: bool = False
    replay_paused: bool = False
    sent_lsn: int = 0
    lag_bytes: int = 0
    lag_records: int = 0
    lag_seconds: float = 0.0
    last_seen: float = field(default_factory=time.time)
    address: str = ""
    probe: int = 0  #: the newest ACK probe, echoed in heartbeats (see fetch.FetchState)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["role"] = "mirror"
        d["state"] = ("paused" if self.fetch_paused else "synced" if self.connected and not self.lag_records
                      else "fetching" if self.connected else "disconnected")
        return d


class PeerTable:
    """Mirrors per volume, as seen from the node they fetch from."""

    def __init__(self) -> None:
        self._peers: dict[tuple[str, str], PeerState] = {}

    def get(self, volume: str, node: str) -> PeerState:
        key = (volume, node)
        if key not in self._peers:
            self._peers[key] = PeerState(node=node, volume=volume)
        return self._peers[key]

    def forget(self, volume: str, node: str) -> None:
        self._peers.pop((volume, node), None)

    def for_volume(self, volume: str) -> list[PeerState]:
        return [p for (v, _), p in sorted(self._peers.items()) if v == volume]


def lag_of(vol: Volume, fetched: int) -> tuple[int, int, float]:
    """(bytes, records, seconds) a mirror that has everything up to ``fetched`` is behind us."""
    durable = vol.durable_lsn
    if fetched >= durable:
        return 0, 0, 0.0
    first = max(fetched + 1, vol.log.first_lsn)
    try:
        oldest = vol.log.info(first).timestamp_ns
    except AssertionError:
        oldest = time.time_ns()
    return vol.log.bytes_between(fetched, durable), durable - fetched, max(0.0, time.time() - oldest / 1e9)


def shippable_lsn(vol: Volume) -> int:
    """The newest LSN we may ship: durable here, and replayed if we are a mirror."""
    return min(vol.durable_lsn, vol.current_lsn)


class Server:
    """Answers one replication connection at a time per task (see :meth:`handle`)."""

    def __init__(self, node: str, cluster: str, lookup: Callable[[str], Volume | None],
                 epoch_of: Callable[[str], int], peers: PeerTable) -> None:
        self.node = node
        self.cluster = cluster
        self.lookup = lookup
        self.epoch_of = epoch_of
        self.peers = peers

    async def handle(self, stream: trio.abc.Stream) -> None:
        ch = Channel(stream)
        peer = "?"
        try:
            hello = (await ch.expect(MsgType.HELLO)).json()
            peer = str(hello.get("node", "?"))
            vol = await self._welcome(ch, hello)
            if vol is None:
                return
            want = hello.get("want")
            if want == "image":
                await self._send_image(ch, vol, peer)
            elif want == "fetch":
                await self._serve_fetch(ch, vol, peer)
            elif want == "leave":
                vol.release(f"mirror:{peer}")
                self.peers.forget(vol.name, peer)
        except (ConnectionLost, ProtocolError) as e:
            logger.info("replication connection from %s ended: %s", peer, e)
        except MarsError as e:
            logger.warning("replication connection from %s: %s", peer, e)
            await self._refuse(ch, "error", str(e))
        except Exception:  # a bug in one peer's connection must not take the node down (G4)
            logger.exception("replication connection from %s failed; dropping it", peer)
        finally:
            await ch.aclose()

    async def _refuse(self, ch: Channel, code: str, message: str) -> None:
        try:
            await ch.send_json(MsgType.ERROR, {"code": code, "error": message})
        except ConnectionLost:
            pass

    async def _welcome(self, ch: Channel, hello: dict[str, Any]) -> Volume | None:
        if hello.get("proto") != PROTO_VERSION:
            await self._refuse(ch, "protocol", f"node {self.node} speaks protocol {PROTO_VERSION}")
            return None
        if hello.get("cluster") != self.cluster:
            await self._refuse(ch, "cluster", f"node {self.node} is in cluster {self.cluster!r}, "
                                              f"not {hello.get('cluster')!r}")
            return None
        name = str(hello.get("volume", ""))
        vol = self.lookup(name)
        if vol is None:
            await self._refuse(ch, "unknown-volume", f"node {self.node} has no volume {name!r}")
            return None
        await ch.send_json(MsgType.WELCOME, {
            "node": self.node, "volume": vol.name, "uuid": vol.uuid, "size": vol.size,
            "epoch": self.epoch_of(vol.name), "head_lsn": vol.head_lsn, "durable_lsn": vol.durable_lsn})
        return vol

    async def _send_image(self, ch: Channel, vol: Volume, peer: str) -> None:
        await trio.to_thread.run_sync(vol.log.sync)
        lsn = shippable_lsn(vol)
        view = vol.view(lsn)
        try:
            vol.hold(f"mirror:{peer}", lsn)  # the mirror fetches from lsn+1 once the copy is done
            chain = vol.log.chain_at(lsn)
            await ch.send_json(MsgType.IMAGE_INFO, {"lsn": lsn, "chain": chain.hex(), "size": vol.size,
                                                    "uuid": vol.uuid})
            logger.info("sending image of %s at LSN %d to %s", vol.name, lsn, peer)
            for off in range(0, vol.size, IMAGE_CHUNK):
                n = min(IMAGE_CHUNK, vol.size - off)
                data = await trio.to_thread.run_sync(view.read, off, n)
                if data != _ZERO[:n]:  # the mirror's base starts sparse: zeros need no bytes
                    frame = await trio.to_thread.run_sync(encode_image_data, off, data)
                    await ch.send_raw(frame)
            await ch.send_json(MsgType.IMAGE_END, {"lsn": lsn})
            await ch.expect(MsgType.ACK)  # the copy is durable on the mirror
        finally:
            view.close()

    async def _serve_fetch(self, ch: Channel, vol: Volume, peer: str) -> None:
        req = (await ch.expect(MsgType.FETCH)).json()
        after = int(req["from_lsn"]) - 1
        theirs = bytes.fromhex(str(req["prev_chain"]))
        if after > vol.log.last_lsn:
            await self._refuse(ch, "diverged", f"{peer}'s log of {vol.name} reaches LSN {after}, beyond "
                                              f"{self.node}'s {vol.log.last_lsn}: the histories diverged")
            return
        if after < vol.log.first_lsn - 1:
            await self._refuse(ch, "log-trimmed", f"{self.node} no longer holds LSN {after + 1} of {vol.name}; "
                                                 f"the mirror needs a full resync (marsfs invalidate)")
            return
        if vol.log.chain_at(after) != theirs:
            await self._refuse(ch, "diverged", f"the histories of {vol.name} on {peer} and {self.node} "
                                              f"diverge at or before LSN {after} (split brain)")
            return
        key = f"mirror:{peer}"
        vol.hold(key, after)
        state = self.peers.get(vol.name, peer)
        state.connected, state.fetched_lsn, state.sent_lsn = True, after, after
        logger.info("%s fetches %s from LSN %d", peer, vol.name, after + 1)
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive_acks, ch, vol, state, key, nursery.cancel_scope)
                    await self._ship(ch, vol, state)
        finally:
            state.connected = False

    async def _ship(self, ch: Channel, vol: Volume, state: PeerState) -> None:
        cursor = state.sent_lsn + 1
        next_beat = 0.0
        batch = FIRST_BATCH  # slow start: over a link that cuts connections, small frames still land
        while True:
            probe = state.probe  # read before limit: the heartbeat's LSNs are no older than the probe
            limit = shippable_lsn(vol)
            if cursor <= limit:
                frame, cursor = await trio.to_thread.run_sync(_records_frame, vol, cursor, limit, batch)
                batch = min(batch * 2, BATCH_BYTES)
                await ch.send_raw(frame)
                state.sent_lsn = cursor - 1
            else:
                await trio.sleep(POLL)
            now = time.monotonic()
            if now >= next_beat:
                lag_b, lag_r, lag_s = lag_of(vol, state.fetched_lsn)
                state.lag_bytes, state.lag_records, state.lag_seconds = lag_b, lag_r, lag_s
                await ch.send_json(MsgType.HEARTBEAT, {
                    "head_lsn": vol.head_lsn, "durable_lsn": limit, "time": time.time(), "probe": probe,
                    "lag_bytes": lag_b, "lag_records": lag_r, "lag_seconds": lag_s})
                next_beat = now + HEARTBEAT

    async def _receive_acks(self, ch: Channel, vol: Volume, state: PeerState, key: str,
                            scope: trio.CancelScope) -> None:
        try:
            while True:
                ack = (await ch.expect(MsgType.ACK)).json()
                state.fetched_lsn = int(ack.get("fetched_lsn", state.fetched_lsn))
                state.replayed_lsn = int(ack.get("replayed_lsn", state.replayed_lsn))
                state.fetch_paused = bool(ack.get("fetch_paused"))
                state.replay_paused = bool(ack.get("replay_paused"))
                state.probe = int(ack.get("probe", state.probe))
                state.last_seen = time.time()
                vol.hold(key, min(state.fetched_lsn, state.replayed_lsn))
        finally:
            scope.cancel()


def _records_frame(vol: Volume, first: int, limit: int, batch: int) -> tuple[bytes, int]:
    """One RECORDS frame of raw records from ``first`` (at most ``batch`` bytes unless one is larger)."""
    parts: list[bytes] = []
    size = 0
    lsn = first
    while lsn <= limit and (not parts or size < batch):
        raw = vol.log.read_raw(lsn)
        if parts and size + len(raw) > batch:
            break
        parts.append(raw)
        size += len(raw)
        lsn += 1
    return encode_frame(MsgType.RECORDS, b"".join(parts)), lsn
