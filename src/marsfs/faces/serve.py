"""``marsfs serve``: one node's daemon in the foreground: node + FUSE mount + control socket.

Start-up refuses, with one line saying what to do, when the mount point is missing, not a
directory, already mounted or a dead FUSE mount; when FUSE is unavailable; when the state
directory belongs to another node name or is locked by a running daemon. Volumes are
recovered (every log record verified) before the filesystem is mounted.

SIGTERM/SIGINT: pyfuse3 finishes the requests in flight, the main loop returns, every log is
made durable, and the filesystem is unmounted.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from marsfs.aio import single_error
from marsfs.errors import MarsError, UsageError
from marsfs.faces.control import serve_control
from marsfs.faces.fuse import Operations
from marsfs.node import DEFAULT_HISTORY_BYTES, Node
from marsfs.node.cluster import DEFAULT_CLUSTER, Cluster
from marsfs.units import parse_size

logger = logging.getLogger(__name__)

MAINTAIN_INTERVAL = 1.0
FUSE_MAX_BACKGROUND = 64  # FUSE-NOTES: +35-45 % on 1 MiB I/O over the default 12


@dataclass
class ServeConfig:
    node: str
    state: Path
    mount: Path
    listen: str | None = None
    peers: dict[str, str] = field(default_factory=dict)
    history_bytes: int = DEFAULT_HISTORY_BYTES
    cluster: str = DEFAULT_CLUSTER


def load_config(path: Path | None, flags: dict[str, Any]) -> ServeConfig:
    """Merge a TOML config file with command-line flags; flags win."""
    import tomllib

    conf: dict[str, Any] = {}
    if path is not None:
        try:
            conf = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    merged = {**conf, **{k: v for k, v in flags.items() if v not in (None, [], {})}}
    missing = [k for k in ("node", "state", "mount") if not merged.get(k)]
    if missing:
        raise UsageError(f"marsfs serve needs {', '.join('--' + m for m in missing)} (or the same keys in --config)")
    peers = dict(conf.get("peers", {}))
    for spec in flags.get("peer") or []:
        name, sep, addr = spec.partition("=")
        if not sep or not name or ":" not in addr:
            raise UsageError(f"--peer {spec!r}: give NAME=HOST:PORT")
        peers[name] = addr
    history = merged.get("history", DEFAULT_HISTORY_BYTES)
    return ServeConfig(node=str(merged["node"]), state=Path(merged["state"]), mount=Path(merged["mount"]),
                       listen=merged.get("listen"), peers=peers, cluster=str(merged.get("cluster", DEFAULT_CLUSTER)),
                       history_bytes=parse_size(str(history)) if not isinstance(history, int) else history)


def preflight(cfg: ServeConfig) -> None:
    """Refuse to start for reasons the operator can fix, before touching any state."""
    m = cfg.mount
    try:
        st = os.stat(m)
    except FileNotFoundError:
        raise MarsError(f"mount point {m} does not exist; create it with: mkdir -p {m}") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MarsError(f"mount point {m} is a dead FUSE mount (its daemon died); "
                            f"detach loop devices on it, then run: fusermount3 -u {m}") from None
        raise MarsError(f"cannot use mount point {m}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MarsError(f"mount point {m} is not a directory")
    if os.path.ismount(m):
        raise MarsError(f"mount point {m} is busy (something is mounted there); unmount it or pick another")
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MarsError("FUSE is unavailable: /dev/fuse is missing or not accessible; "
                        "load it with: modprobe fuse (and run as root)")
    if shutil.which("fusermount3") is None:
        raise MarsError("fusermount3 is not installed; install the fuse3 package (scripts/demo does)")
    if cfg.state.resolve() == m.resolve() or m.resolve() in cfg.state.resolve().parents:
        raise MarsError("the state directory must not be inside the mount point")


def _tune_process() -> None:
    """Memory and I/O settings FUSE-NOTES measured; each one is best effort."""
    # Writeback and replication threads run Python code; with the default 5 ms GIL switch
    # interval every FUSE request behind them waits up to 5 ms. 0.5 ms bounds that tail.
    sys.setswitchinterval(0.0005)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD: keep 1 MiB request buffers off mmap/munmap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        if libc.prctl(57, 1, 0, 0, 0) != 0:  # PR_SET_IO_FLUSHER: refused here (EPERM), try anyway
            logger.debug("PR_SET_IO_FLUSHER refused (errno %d)", ctypes.get_errno())
    except OSError:
        pass


class Daemon:
    """The running node: dispatches control commands and hosts the FUSE operations."""

    def __init__(self, cfg: ServeConfig, node: Node, ops: Operations) -> None:
        self.cfg = cfg
        self.node = node
        self.ops = ops
        self.cluster = Cluster(node, listen=cfg.listen, peers=cfg.peers, cluster=cfg.cluster)

    async def dispatch(self, cmd: str, args: dict[str, Any]) -> Any:
        node = self.node
        if cmd == "ping":
            return {"node": node.name, "pid": os.getpid(), "mount": str(self.cfg.mount)}
        if cmd == "create":
            size = parse_size(str(args["size"]))
            await trio.to_thread.run_sync(node.create, args["volume"], size)
            return node.status(args["volume"])[0]
        if cmd == "delete":
            if node.is_mirror(args["volume"]):
                raise UsageError(f"{args['volume']} is a mirror here: stop mirroring with marsfs leave")
            mirrors = self.cluster.mirrors_of(args["volume"])
            await trio.to_thread.run_sync(lambda: node.delete(args["volume"], force=bool(args.get("force")),
                                                              mirrors=mirrors))
            self.ops.forget_volume(args["volume"])
            return {"deleted": args["volume"]}
        if cmd == "status":
            return self.cluster.status(args.get("volume"))
        if cmd == "join":
            return await self.cluster.join(args["volume"], args["source"])
        if cmd == "leave":
            result = await self.cluster.leave(args["volume"])
            self.ops.forget_volume(args["volume"])
            return result
        if cmd in ("pause-fetch", "resume-fetch", "pause-replay", "resume-replay"):
            verb, what = cmd.split("-")
            return self.cluster.set_paused(args["volume"], what, verb == "pause")
        if cmd == "mark":
            lsn = await trio.to_thread.run_sync(node.mark, args["volume"], args["name"])
            return {"volume": args["volume"], "mark": args["name"], "lsn": lsn}
        if cmd == "versions":
            vol = node.volume(args["volume"])
            return {"volume": vol.name, "oldest_lsn": vol.oldest_version_lsn, "head_lsn": vol.head_lsn,
                    "versions": [{"lsn": v.lsn, "kind": v.kind, "name": v.name, "timestamp_ns": v.timestamp_ns}
                                 for v in vol.versions()]}
        raise UsageError(f"unknown command {cmd!r}")

    async def run(self) -> None:
        with single_error():
            await self._run()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.cluster.run)
            await nursery.start(serve_control, self.cfg.state, self.dispatch)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._maintain)
            nursery.start_soon(self._tune_connection)
            logger.info("node %s serving %d volume(s) at %s", self.node.name, len(self.node.volumes), self.cfg.mount)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info("%s: finishing requests in flight, then flushing and unmounting",
                         signal.Signals(signum).name)
                pyfuse3.terminate()
                return

    async def _maintain(self) -> None:
        while True:
            await trio.sleep(MAINTAIN_INTERVAL)
            await trio.to_thread.run_sync(self.node.maintain)

    async def _tune_connection(self) -> None:
        """Raise max_background (FUSE-NOTES). stat() of our own mount must not run on this thread."""
        try:
            dev = (await trio.to_thread.run_sync(os.stat, self.cfg.mount)).st_dev
            conn = Path("/sys/fs/fuse/connections") / str(os.minor(dev))
            if not conn.exists():  # fusectl is not mounted on every machine
                await trio.run_process(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"],
                                       check=False, capture_stdout=True, capture_stderr=True)
            (conn / "max_background").write_text(str(FUSE_MAX_BACKGROUND))
            (conn / "congestion_threshold").write_text(str(FUSE_MAX_BACKGROUND * 3 // 4))
        except OSError as e:
            logger.info("could not raise FUSE max_background: %s", e)


def serve(cfg: ServeConfig) -> int:
    """Run the node until SIGTERM/SIGINT or an external unmount. Returns the exit status."""
    preflight(cfg)
    _tune_process()
    node = Node.open(cfg.state, cfg.node, history_bytes=cfg.history_bytes)
    ops = Operations(node)
    options = set(pyfuse3.default_options) | {"fsname=marsfs", "subtype=marsfs"}
    try:
        try:
            pyfuse3.init(ops, os.fspath(cfg.mount), options)
        except RuntimeError as e:
            raise MarsError(f"mounting FUSE at {cfg.mount} failed ({e}); is the mount point busy?") from None
        clean = False
        try:
            trio.run(Daemon(cfg, node, ops).run)
            clean = True
        finally:
            # After an abnormal end, leave the (dead) mount in place so applications get errors
            # instead of writing into the bare mount point directory.
            pyfuse3.close(unmount=clean)
    finally:
        node.close()
    logger.info("node %s stopped cleanly", cfg.node)
    return 0


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
