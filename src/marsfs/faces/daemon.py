"""``marsfs serve``: one node's daemon in the foreground: node + cluster + control socket + FUSE.

Start-up refuses, with one line saying what to do, what :func:`marsfs.faces.config.preflight`
and :meth:`marsfs.node.Node.open` refuse (mount point, FUSE, state directory, the ``--listen``
address). Volumes are recovered (every log record verified) before the filesystem is mounted.
A start that fails after the mount (the listener, the control socket) unmounts again: only a
daemon that served leaves a dead mount behind.

One trio loop runs everything: pyfuse3's main loop, the cluster (peers, fetch, replay), the
control socket (answered through :func:`marsfs.faces.commands.dispatch`), the Prometheus
endpoint of ``--metrics`` (:mod:`marsfs.faces.metrics`), the periodic
maintenance (writeback of what left the history window), the log space limit (woken by the
write path, :mod:`marsfs.node.space`) and, once mounted, the FUSE
connection tuning measured to pay.

Stopping (SIGTERM/SIGINT). A volume image that is open (a loop device with a mounted
filesystem, a reader) is a disk in use: stopping would pull it from under its user (ext4 aborts
its journal). So:

* With nothing open the daemon stops at once: pyfuse3 finishes the requests in flight, the main
  loop returns, every log is made durable and every connected mirror told where it ends (a
  last heartbeat, at most 2 s), the filesystem is unmounted, exit status 0.
* With volumes open, the first signal logs each open volume and its handle count, refuses new
  opens (EBUSY), and keeps serving, replication included, until the last handle closes; then it
  stops as above (exit 0).
* A second signal, or ``--stop-timeout`` seconds (default 30; 0: at once; inf: no limit)
  forces the stop: it logs which volumes were still open, stops as above, and exits 1. Their
  users then get I/O errors; flushed writes are safe as always.

After an abnormal end the dead mount stays, so applications get errors instead of writing into
the bare mount point directory.

Under a ``Type=notify`` systemd unit (``packaging/marsfs.service``) the service manager hears
``READY=1`` at the moment the daemon logs "serving": the FUSE mount is up, every volume
recovered, peers and the control socket listen. ``STOPPING=1`` goes out when the stop begins
(the first signal, or an external unmount), and ``STATUS=`` says what it is doing (recovering,
serving, waiting for open volumes). Without ``$NOTIFY_SOCKET`` nothing is sent
(:mod:`marsfs.faces.sdnotify`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import trio

from marsfs.aio import single_error, supervised
from marsfs.errors import MarsError
from marsfs.faces import metrics
from marsfs.faces.commands import Context, dispatch
from marsfs.faces.config import ServeConfig, preflight
from marsfs.faces.control import serve_control
from marsfs.faces.fuse import Operations
from marsfs.faces.sdnotify import Notifier
from marsfs.node import Node
from marsfs.node.cluster import Cluster
from marsfs.node.tls import Tls
from marsfs.node.tls import load as load_tls

logger = logging.getLogger(__name__)

MAINTAIN_INTERVAL = 1.0
DRAIN_POLL = 0.1  #: how often a stopping daemon looks whether the last volume was closed
FUSE_MAX_BACKGROUND = 64  # measured: +35-45 % on 1 MiB I/O over the default 12


def _tune_process() -> None:
    """Memory and I/O settings measured to pay; each one is best effort."""
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


def _load_tls(cfg: ServeConfig) -> Tls | None:
    """This node's certificates, read before anything is touched; refused with what to do
    when they are missing or wrong. None with ``--insecure`` (said loudly) and for a node
    without peers or a node port (nothing to authenticate)."""
    if not cfg.talks_to_peers:
        return None
    if cfg.insecure:
        logger.warning("node %s runs --insecure: plain TCP to its peers, nobody authenticated; anyone who reaches "
                       "%s can act as a node (issue certificates with marsfs cluster add-node)", cfg.node,
                       cfg.listen or "this node's peers")
        return None
    tls = load_tls(cfg.tls_path, cfg.node, cfg.cluster)
    logger.info("node %s talks to its peers over mutual TLS (certificates in %s, this node's expires %s)",
                cfg.node, cfg.tls_path, tls.not_after.strftime("%Y-%m-%d"))
    warning = tls.warning()
    if warning:
        logger.warning("%s", warning)
    return tls


def _raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one: every peer connection, log segment
    and open image is a descriptor, and running out of them at the common 1024 would take the
    control socket down with the node port."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (OSError, ValueError) as e:
            logger.info("could not raise the open file limit from %d: %s", soft, e)


class Daemon:
    """The running node: hosts the FUSE operations and answers control commands."""

    def __init__(self, cfg: ServeConfig, node: Node, ops: Operations, tls: Tls | None = None,
                 notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.node = node
        self.ops = ops
        self.cluster = Cluster(node, listen=cfg.listen, peers=cfg.peers, cluster=cfg.cluster,
                               sync_rate=cfg.sync_rate, tls=tls)
        self.context = Context(node, self.cluster, cfg.mount, ops.forget_volume, mounted=True)
        self.serving = False  #: everything started; from here on a failure leaves the mount (see serve)
        self.forced = ""  #: why the stop was forced with volumes open ("" if it was not)

    async def run(self) -> None:
        with single_error():
            await self._run()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.cluster.run)
            await nursery.start(serve_control, self.cfg.state, functools.partial(dispatch, self.context))
            if self.cfg.metrics is not None:
                reg = metrics.registry(self.node, self.cluster.statuses)
                await nursery.start(metrics.serve_metrics, self.cfg.metrics, functools.partial(metrics.render, reg))
            nursery.start_soon(self._signals)
            nursery.start_soon(self._maintain)
            nursery.start_soon(self._keep_log_space)
            nursery.start_soon(supervised, "FUSE connection tuning", self._tune_connection)
            logger.info("node %s serving %d volume(s) at %s", self.node.name, len(self.node.volumes), self.cfg.mount)
            self.serving = True
            self.notifier.ready(f"serving {len(self.node.volumes)} volume(s) at {self.cfg.mount}")
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            self.notifier.stopping("flushing the logs and unmounting")
            await self.cluster.farewell()  # nothing writes any more: tell the mirrors where we stop
            nursery.cancel_scope.cancel()

    def open_volumes(self) -> dict[str, int]:
        """Each open volume and how many handles hold it (loop devices, readers)."""
        return {name: n for name, n in sorted(self.node.opens.items()) if n > 0}

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                held = self.open_volumes()
                self.notifier.stopping(f"{name}: " + ("waiting for open volumes to close: " + ", ".join(held)
                                                      if held else "finishing requests in flight"))
                if held:
                    await self._drain(name, held, signals)
                logger.info("%s: finishing requests in flight, then flushing and unmounting", name)
                pyfuse3.terminate()
                return

    async def _drain(self, signame: str, held: dict[str, int], signals: AsyncIterator[int]) -> None:
        """Keep serving, new opens refused, until every volume is closed, a second signal
        arrives, or the stop timeout expires (then :attr:`forced` says which)."""
        self.ops.closing = True
        for volume, handles in held.items():
            logger.warning("%s: volume %s is open (%d handle(s): a loop device, a mounted filesystem or a "
                           "reader); stopping now would pull the disk from under it", signame, volume, handles)
        timeout = self.cfg.stop_timeout
        logger.warning("%s: still serving until every volume is closed (umount, losetup -d); new opens are "
                       "refused; a second %s%s forces the stop", signame, signame,
                       "" if math.isinf(timeout) else f" or {timeout:g} s without it")
        async with trio.open_nursery() as nursery:

            async def second_signal() -> None:
                async for signum in signals:
                    self.forced = f"a second {signal.Signals(signum).name}"
                    nursery.cancel_scope.cancel()

            nursery.start_soon(second_signal)
            with trio.move_on_after(timeout):
                while self.open_volumes():
                    await trio.sleep(DRAIN_POLL)
                nursery.cancel_scope.cancel()
                logger.info("every volume is closed")
                return
            self.forced = f"the stop timeout of {timeout:g} s"
            nursery.cancel_scope.cancel()
        still = ", ".join(f"{v} ({n} handle(s))" for v, n in self.open_volumes().items()) or "none any more"
        logger.warning("stop forced by %s with volumes open: %s; their users now get I/O errors "
                       "(flushed writes are safe)", self.forced, still)

    async def _maintain(self) -> None:
        """Writeback and retention, once a second. A pass that fails unexpectedly is logged as a
        bug and the next pass runs anyway: maintenance must never end the daemon (G11)."""
        while True:
            await trio.sleep(MAINTAIN_INTERVAL)
            await supervised("maintenance", functools.partial(trio.to_thread.run_sync, self.node.maintain))

    async def _keep_log_space(self) -> None:
        """Keep the logs inside the log space limit (G8): woken by the write path whenever a
        log grew by a quarter segment, at least once a second, in its own task so that a long
        history writeback in maintenance does not delay it. Never ends the daemon (G11)."""
        space = self.node.space
        while True:
            await trio.to_thread.run_sync(space.wait, MAINTAIN_INTERVAL, abandon_on_cancel=True)
            await supervised("log space", self._enforce_space)

    async def _enforce_space(self) -> None:
        await trio.to_thread.run_sync(self.node.enforce_space)

    async def _tune_connection(self) -> None:
        """Raise max_background (+35-45 % on 1 MiB I/O). stat() of our own mount must not run on this thread."""
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
    """Run the node until SIGTERM/SIGINT or an external unmount. Returns the exit status:
    0 after a clean stop, 1 after a stop forced with volumes open."""
    preflight(cfg)
    tls = _load_tls(cfg)
    _tune_process()
    _raise_fd_limit()
    notifier = Notifier()
    notifier.status("recovering: verifying every log record")
    node = Node.open(cfg.state, cfg.node, history=cfg.history, log_space=cfg.log_space)
    try:
        ops = Operations(node)
        daemon = Daemon(cfg, node, ops, tls, notifier)
        options = set(pyfuse3.default_options) | {"fsname=marsfs", "subtype=marsfs"}
        try:
            pyfuse3.init(ops, os.fspath(cfg.mount), options)
        except RuntimeError as e:
            raise MarsError(f"mounting FUSE at {cfg.mount} failed ({e}); is the mount point busy?") from None
        clean = False
        try:
            trio.run(daemon.run)
            clean = True
        finally:
            # After an abnormal end, leave the (dead) mount in place so applications get errors
            # instead of writing into the bare mount point directory; a start that failed
            # before serving had no applications: unmount, so the next start finds it free.
            pyfuse3.close(unmount=clean or not daemon.serving)
    finally:
        node.close()
    if daemon.forced:
        logger.warning("node %s stopped by force (%s) with volumes open", cfg.node, daemon.forced)
        return 1
    logger.info("node %s stopped cleanly", cfg.node)
    return 0


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
