"""The node in its cluster: serve peers, keep mirrors fetching and replaying, report lag.

Rules that hold here:

* ``join`` answers as soon as the source node accepted (errors such as an unknown peer or
  volume come back to the operator at once); the image copy then runs in the background, shown
  as state ``syncing`` with progress. Until it finishes the mirror's image is not offered.
* Replay moves a mirror's visible version to its durable fetched LSN every ``REPLAY_EVERY``
  seconds unless paused. Pause flags and the paused replay position persist in role.json.
* A fetch or replay that should progress and has not for ``STALL_AFTER`` seconds is reported
  as ``stalled`` with the reason.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections import deque
from typing import Any

import trio

from marsfs.errors import MarsError, UsageError, VolumeError
from marsfs.node.node import Node, check_volume_name
from marsfs.replication.channel import PeerRefused
from marsfs.replication.fetch import Connect, Fetcher, hello, open_channel, receive_image
from marsfs.replication.protocol import ImageInfo
from marsfs.replication.server import PeerTable, Server, lag_of
from marsfs.volume import Volume

logger = logging.getLogger(__name__)

REPLAY_EVERY = 0.02
STALL_AFTER = 10.0
FRESH = 1.5  #: a mirror is "synced" only on the word of a heartbeat at most this old (they come every 0.5 s)
DEFAULT_CLUSTER = "marsfs"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {text!r}: give HOST:PORT, like 127.0.0.1:7600")
    return host.strip("[]"), int(port)


class Cluster:
    """Replication for every volume of one node. Runs inside the daemon's trio loop."""

    def __init__(self, node: Node, *, listen: str | None, peers: dict[str, str], cluster: str = DEFAULT_CLUSTER) -> None:
        self.node = node
        self.listen = parse_address(listen) if listen else None
        self.peers = {name: parse_address(addr) for name, addr in peers.items()}
        self.cluster = cluster
        self.peer_table = PeerTable()
        self.server = Server(node.name, cluster, self._servable, self._epoch, self.peer_table)
        self.fetchers: dict[str, Fetcher] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self.copies: dict[str, dict[str, Any]] = {}  #: image copies in progress
        self._replay_samples: dict[str, deque[tuple[float, int]]] = {}
        self._nursery: trio.Nursery | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.listen is not None:
                host, port = self.listen
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as e:
                    raise MarsError(f"cannot listen for peers on {host}:{port}: {e.strerror}; "
                                    "pick another --listen address or stop what uses it") from None
                nursery.start_soon(trio.serve_listeners, self.server.handle, listeners)
                self.port = listeners[0].socket.getsockname()[1]
                logger.info("node %s listens for peers on %s:%d", self.node.name, host, self.port)
            for name, vol in list(self.node.volumes.items()):
                if self.node.is_mirror(name):
                    self._start_fetch(vol)
            for name, source in list(self.node.rejoin.items()):
                try:
                    await self.join(name, source)
                except MarsError as e:
                    logger.error("could not restart the image copy of %s from %s: %s", name, source, e)
            nursery.start_soon(self._replay_loop)
            task_status.started()

    def _connector(self, peer: str) -> Connect:
        if peer not in self.peers:
            known = ", ".join(sorted(self.peers)) or "none"
            raise VolumeError(f"unknown peer {peer!r} (known: {known}); start the daemon with --peer {peer}=HOST:PORT")
        host, port = self.peers[peer]

        async def connect() -> trio.abc.Stream:
            return await trio.open_tcp_stream(host, port)

        return connect

    def _servable(self, name: str) -> Volume | None:
        return self.node.volumes.get(name)

    def _epoch(self, name: str) -> int:
        return int(self.node.roles.get(name, {}).get("epoch", 1))

    # ------------------------------------------------------------------ join and leave

    async def join(self, name: str, source: str) -> dict[str, Any]:
        """Become a mirror of ``name`` from ``source``: returns once the source accepted."""
        check_volume_name(name)
        connect = self._connector(source)
        if name in self.copies:
            raise VolumeError(f"volume {name!r} is already being copied from {self.copies[name]['source']}")
        path = self.node.check_new(name)
        try:
            ch, welcome = await open_channel(connect, hello(self.node.name, self.cluster, name, "image"))
        except PeerRefused as e:
            raise VolumeError(f"{source} refused: {e.message}") from None
        except (OSError, trio.TooSlowError) as e:
            raise VolumeError(f"cannot reach peer {source} at {self.peers[source][0]}:{self.peers[source][1]}: "
                              f"{e}; is its daemon running with --listen?") from None
        progress = {"source": source, "done": 0, "size": welcome.size, "started": time.monotonic()}
        self.copies[name] = progress
        epoch = welcome.epoch

        def make_volume(info: ImageInfo) -> Volume:
            path.mkdir(parents=True)  # role.json first: a crash during the copy restarts the copy
            self.node.roles[name] = {"role": "mirror", "state": "syncing", "source": source, "epoch": epoch,
                                     "fetch_paused": False, "replay_paused": False}
            self.node.set_role(name)
            return Volume.create_replica(path, name, info.size, info.uuid, info.lsn, info.chain)

        def progressed(done: int, size: int) -> None:
            progress["done"] = done

        async def copy() -> None:
            try:
                vol = await receive_image(ch, make_volume, progressed)
            except BaseException as e:
                self.copies.pop(name, None)
                if not isinstance(e, trio.Cancelled):
                    logger.error("image copy of %s from %s failed: %s; retry with marsfs join", name, source, e)
                    self.node.roles.pop(name, None)
                    await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
                raise
            finally:
                await ch.aclose()
            self.node.register(vol)
            self.node.set_role(name, state="mirror", replayed_lsn=vol.current_lsn)
            self.copies.pop(name, None)
            logger.info("image copy of %s from %s done at LSN %d; fetching the log", name, source, vol.applied_lsn)
            self._start_fetch(vol)

        assert self._nursery is not None
        self._nursery.start_soon(_quiet(copy))
        return {"volume": name, "source": source, "size": progress["size"], "state": "syncing"}

    def _start_fetch(self, vol: Volume) -> None:
        role = self.node.roles[vol.name]
        source = str(role["source"])
        try:
            connect = self._connector(source)
        except VolumeError as e:
            vol.errors.append(str(e))
            return
        fetcher = Fetcher(vol, self.node.name, self.cluster, source, connect,
                          paused=lambda: bool(self.node.roles.get(vol.name, {}).get("fetch_paused")),
                          replayed=lambda: vol.current_lsn,
                          replay_paused=lambda: bool(self.node.roles.get(vol.name, {}).get("replay_paused")))
        self.fetchers[vol.name] = fetcher
        scope = trio.CancelScope()
        self._scopes[vol.name] = scope

        async def run() -> None:
            with scope:
                await fetcher.run()

        assert self._nursery is not None
        self._nursery.start_soon(run)

    async def leave(self, name: str) -> dict[str, Any]:
        """Stop mirroring ``name`` and remove this node's copy."""
        if not self.node.is_mirror(name):
            self.node.volume(name)
            raise VolumeError(f"volume {name!r} is not a mirror on node {self.node.name}; use marsfs delete")
        source = str(self.node.roles[name]["source"])
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
        self.fetchers.pop(name, None)
        await trio.to_thread.run_sync(lambda: self.node.delete(name, force=False))
        try:  # tell the source to stop holding log for us; it will also notice the silence
            ch, _ = await open_channel(self._connector(source), hello(self.node.name, self.cluster, name, "leave"))
            await ch.aclose()
        except (MarsError, OSError, PeerRefused, trio.TooSlowError) as e:
            logger.info("could not tell %s that we left %s: %s", source, name, e)
        return {"volume": name, "left": source}

    # ------------------------------------------------------------------ pause and resume

    def set_paused(self, name: str, what: str, paused: bool) -> dict[str, Any]:
        if not self.node.is_mirror(name):
            self.node.volume(name)
            raise VolumeError(f"volume {name!r} is not a mirror on node {self.node.name}")
        vol = self.node.volume(name)
        changes: dict[str, Any] = {f"{what}_paused": paused}
        if what == "replay":
            changes["replayed_lsn"] = vol.current_lsn
        self.node.set_role(name, **changes)
        return {"volume": name, f"{what}_paused": paused}

    async def _replay_loop(self) -> None:
        persisted: dict[str, float] = {}
        while True:
            await trio.sleep(REPLAY_EVERY)
            now = time.monotonic()
            for name, vol in list(self.node.volumes.items()):
                role = self.node.roles.get(name, {})
                if role.get("role") != "mirror" or role.get("replay_paused"):
                    continue
                if vol.visible_lsn is not None and vol.durable_lsn > vol.visible_lsn:
                    vol.visible_lsn = vol.durable_lsn
                samples = self._replay_samples.setdefault(name, deque(maxlen=50))
                if not samples or now - samples[-1][0] > 0.1:
                    samples.append((now, vol.current_lsn))
                if now - persisted.get(name, 0) > 1.0 and role.get("replayed_lsn") != vol.current_lsn:
                    persisted[name] = now
                    await trio.to_thread.run_sync(functools.partial(self.node.set_role, name, replayed_lsn=vol.current_lsn))

    # ------------------------------------------------------------------ status

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        rows = self.node.status(name) if name is None or name in self.node.volumes else []
        if name is not None and not rows:
            if name in self.copies:
                return [self._copy_status(name)]
            self.node.volume(name)  # raises the usual unknown-volume error
        for r in rows:
            if r["role"] == "mirror":
                self._mirror_status(r)
            else:
                vol = self.node.volumes[r["volume"]]
                peers = self.peer_table.for_volume(r["volume"])
                for p in peers:  # now, not when the last session shipped: a dead link keeps lagging
                    p.lag_bytes, p.lag_records, p.lag_seconds = lag_of(vol, p.fetched_lsn)
                r["peers"] = [p.public() for p in peers]
                self.node.known_mirrors[r["volume"]] = {p["node"] for p in r["peers"]}
        if name is None:
            rows += [self._copy_status(n) for n in sorted(self.copies)]
        return rows

    def _copy_status(self, name: str) -> dict[str, Any]:
        c = self.copies[name]
        elapsed = max(1e-3, time.monotonic() - c["started"])
        rate = c["done"] / elapsed
        return {"volume": name, "node": self.node.name, "role": "mirror", "state": "syncing",
                "epoch": 0, "size": c["size"], "head_lsn": 0, "durable_lsn": 0, "fetched_lsn": 0,
                "replayed_lsn": 0, "applied_lsn": 0, "lag_bytes": c["size"] - c["done"], "lag_records": 0,
                "lag_seconds": 0.0, "oldest_version_lsn": 0, "log_bytes": 0, "open_handles": 0,
                "progress": c["done"] / c["size"] if c["size"] else 1.0, "fetch_rate": rate,
                "eta_seconds": (c["size"] - c["done"]) / rate if rate else None,
                "source": c["source"], "peers": [], "errors": []}

    def _mirror_status(self, r: dict[str, Any]) -> None:
        name = r["volume"]
        role = self.node.roles[name]
        f = self.fetchers.get(name)
        r["source"] = role.get("source")
        r["fetch_paused"] = bool(role.get("fetch_paused"))
        r["replay_paused"] = bool(role.get("replay_paused"))
        now = trio.current_time()  # FetchState's clock
        samples = self._replay_samples.get(name) or deque()
        r["replay_rate"] = _rate(samples)
        if f is None:
            r["state"] = "failed"
            return
        st = f.state
        r["connected"] = st.connected
        # how old the source's state behind the newest heartbeat is at most (see FetchState)
        r["heartbeat_age"] = now - st.heartbeat_basis if st.heartbeat_basis else None
        r["primary_durable_lsn"] = st.primary_durable_lsn
        replay_lag = r["fetched_lsn"] - r["replayed_lsn"]
        r["lag_records"] = st.lag_records + replay_lag
        r["lag_bytes"] = st.lag_bytes + (r["durable_lsn"] and self.node.volumes[name].log.bytes_between(
            r["replayed_lsn"], r["fetched_lsn"]))
        r["lag_seconds"] = st.lag_seconds
        age = r["heartbeat_age"]
        if age is None or age > FRESH or not st.connected:
            # our newest word from the source describes it `age` seconds ago (heartbeats queue
            # behind records on a slow link): we cannot claim to be closer than that
            r["lag_seconds"] = max(r["lag_seconds"], age if age is not None else now - st.last_progress)
        r["fetch_rate"] = st.rate()
        r["eta_seconds"] = (st.lag_bytes / r["fetch_rate"]) if st.lag_bytes and r["fetch_rate"] else (0.0 if not st.lag_bytes else None)
        if st.error:
            r["errors"].append(f"fetch from {st.source}: {st.error}")
        if st.fatal:
            r["state"] = "split-brain" if st.fatal == "diverged" else "needs-resync" if st.fatal == "log-trimmed" else "failed"
        elif r["fetch_paused"]:
            r["state"] = "fetch-paused"
        elif not st.connected and now - st.last_progress > STALL_AFTER:
            r["state"] = "stalled"
            r["errors"].append(f"stalled: no connection to {st.source} for {now - st.last_progress:.0f} s")
        elif not st.connected:
            r["state"] = "disconnected"
        elif st.lag_records and now - st.last_progress > STALL_AFTER:
            r["state"] = "stalled"
            r["errors"].append(f"stalled: no records from {st.source} for {now - st.last_progress:.0f} s "
                               f"while {st.lag_records} are missing")
        elif r["replay_paused"]:
            r["state"] = "replay-paused"
        elif r["lag_records"] or r["heartbeat_age"] is None or r["heartbeat_age"] > FRESH:
            r["state"] = "catching-up"  # behind, or not sure it is not: no recent word from the source
        else:
            r["state"] = "synced"


def _rate(samples: deque[tuple[float, int]]) -> float:
    if len(samples) < 2:
        return 0.0
    (t0, v0), (t1, v1) = samples[0], samples[-1]
    return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


def _quiet(fn: Any) -> Any:
    """Run a background task whose failure is already logged without killing the daemon."""

    async def run() -> None:
        try:
            await fn()
        except Exception:
            pass

    return run
