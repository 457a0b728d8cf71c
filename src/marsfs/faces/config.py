"""``marsfs serve``'s configuration: what the daemon is told, and whether it can start at all.

Rules that hold here:

* A TOML file (``--config``) supplies what flags do not; flags win, and ``--peer`` adds to the
  file's ``[peers]``. Bad input is one :class:`UsageError` line naming the flag or file (exit
  status 2, which a service manager does not retry), names that break the name rule too; a key
  the file may not have (a typo such as ``lisen``) is refused with its name, never ignored.
* Every address (``--listen``, ``--metrics``, each peer) is parsed here, so that a malformed one is refused
  before anything is mounted.
* :func:`preflight` refuses to start, with one line saying what to do, when the mount point is
  missing, not a directory, already mounted or a dead FUSE mount, when FUSE is unavailable,
  when the state directory is not a directory or lies inside the mount point, or when the ``--listen`` (or
  ``--metrics``) address cannot be bound (in use, not an address of this machine, a name that does not resolve). It
  runs before any state is touched and before the mount.
  (A state directory owned by another node name or locked by a running daemon is refused by
  :meth:`marsfs.node.Node.open`.)
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marsfs.errors import InvalidRequest, MarsError, UsageError
from marsfs.names import RULE as NAME_RULE
from marsfs.names import is_name
from marsfs.node.cluster import DEFAULT_CLUSTER
from marsfs.node.peers import parse_address
from marsfs.node.space import LogSpaceSetting
from marsfs.node.tls import TLS_DIR
from marsfs.units import human_bytes, parse_size
from marsfs.volume import Retention

#: How long a SIGTERM waits for open volumes to close before it forces the stop (seconds).
DEFAULT_STOP_TIMEOUT = 30.0
#: The keys a ``--config`` file may have: the long flags' names, and ``[peers]`` for ``--peer``.
CONFIG_KEYS = frozenset({"node", "state", "mount", "listen", "peers", "history", "cluster", "stop-timeout",
                         "log-space", "sync-rate", "tls-dir", "insecure", "metrics"})


@dataclass
class ServeConfig:
    """Everything one ``marsfs serve`` needs; built by :func:`load_config`."""

    node: str
    state: Path
    mount: Path
    listen: str | None = None
    peers: dict[str, str] = field(default_factory=dict)
    history: Retention = field(default_factory=Retention)  #: ``--history SIZE|DURATION`` (repeatable, or ``10G,24h``)
    cluster: str = DEFAULT_CLUSTER
    stop_timeout: float = DEFAULT_STOP_TIMEOUT  #: see :mod:`marsfs.faces.daemon` (SIGTERM)
    #: ``--log-space SIZE|PCT%``: the node's limit for all logs (see :mod:`marsfs.node.space`)
    log_space: LogSpaceSetting = field(default_factory=LogSpaceSetting)
    sync_rate: int = 0  #: ``--sync-rate``: bytes/s of fast sync data this node sends per mirror (0: unlimited)
    metrics: str | None = None  #: ``--metrics HOST:PORT``: where Prometheus scrapes (None: not served)
    tls_dir: Path | None = None  #: ``--tls-dir``: ``ca.crt``, ``node.crt``, ``node.key`` (default ``STATE/tls``)
    insecure: bool = False  #: ``--insecure``: plain TCP between nodes, nobody authenticated

    @property
    def talks_to_peers(self) -> bool:
        """Whether this node has a node port or peers: only then is TLS needed."""
        return self.listen is not None or bool(self.peers)

    @property
    def tls_path(self) -> Path:
        return self.tls_dir if self.tls_dir is not None else self.state / TLS_DIR

    @property
    def history_bytes(self) -> int | None:
        return self.history.keep_bytes


def load_config(path: Path | None, flags: dict[str, Any]) -> ServeConfig:
    """Merge a TOML config file with command-line flags; flags win."""
    conf: dict[str, Any] = {}
    if path is not None:
        try:
            conf = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {path} is not valid TOML: {e}") from None
        unknown = sorted(set(conf) - CONFIG_KEYS)
        if unknown:
            raise UsageError(f"config file {path}: unknown key {unknown[0]!r} (the keys are "
                             f"{', '.join(sorted(CONFIG_KEYS))})")
        if not isinstance(conf.get("peers", {}), dict):
            raise UsageError(f"config file {path}: 'peers' must be a table of NAME = \"HOST:PORT\"")
        if "stop-timeout" in conf:
            conf["stop_timeout"] = conf.pop("stop-timeout")
        if "log-space" in conf:
            conf["log_space"] = conf.pop("log-space")
        if "sync-rate" in conf:
            conf["sync_rate"] = conf.pop("sync-rate")
        if "tls-dir" in conf:
            conf["tls_dir"] = conf.pop("tls-dir")
        if not isinstance(conf.get("insecure", False), bool):
            raise UsageError(f"config file {path}: 'insecure' must be true or false")
    merged = {**conf, **{k: v for k, v in flags.items() if v not in (None, [], {}) and v is not False}}
    missing = [k for k in ("node", "state", "mount") if not merged.get(k)]
    if missing:
        raise UsageError(f"marsfs serve needs {', '.join('--' + m for m in missing)} (or the same keys in --config)")
    if not is_name(merged["node"]):
        raise UsageError(f"--node {merged['node']!r:.80} is not a node name: give {NAME_RULE}")
    peers = {str(k): str(v) for k, v in conf.get("peers", {}).items()}
    for spec in flags.get("peer") or []:
        name, sep, addr = spec.partition("=")
        if not sep or not name or ":" not in addr:
            raise UsageError(f"--peer {spec!r}: give NAME=HOST:PORT")
        peers[name] = addr
    for name, addr in peers.items():
        if not is_name(name):
            raise UsageError(f"--peer {name!r:.80} is not a node name: give the peer's name as its serve --node "
                             f"gives it ({NAME_RULE})")
        try:
            parse_address(addr)
        except UsageError as e:
            raise UsageError(f"peer {name}: {e}") from None
    listen = merged.get("listen")
    if listen is not None:
        try:
            parse_address(str(listen))
        except UsageError as e:
            raise UsageError(f"--listen: {e}") from None
    try:
        history = Retention.parse(merged["history"]) if "history" in merged else Retention()
    except InvalidRequest as e:
        raise UsageError(f"--history: {e}") from None
    try:
        log_space = LogSpaceSetting.parse(merged.get("log_space"))
    except InvalidRequest as e:
        raise UsageError(f"--log-space: {e}") from None
    _check_log_space(log_space, Path(merged["state"]))
    _check_peers(str(merged["node"]), None if listen is None else str(listen), peers)
    return ServeConfig(node=str(merged["node"]), state=Path(merged["state"]), mount=Path(merged["mount"]),
                       listen=None if listen is None else str(listen), peers=peers,
                       cluster=_cluster(merged.get("cluster", DEFAULT_CLUSTER)), history=history,
                       stop_timeout=_stop_timeout(merged.get("stop_timeout", DEFAULT_STOP_TIMEOUT)),
                       log_space=log_space, sync_rate=_sync_rate(merged.get("sync_rate")),
                       tls_dir=Path(merged["tls_dir"]) if merged.get("tls_dir") else None,
                       insecure=bool(merged.get("insecure", False)),
                       metrics=_metrics(merged.get("metrics"), None if listen is None else str(listen)))


def _metrics(value: Any, listen: str | None) -> str | None:
    """The ``--metrics`` address, checked like ``--listen``; not the same as ``--listen``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"--metrics {value!r}: give HOST:PORT, like 127.0.0.1:9590")
    try:
        address = parse_address(value)
    except UsageError as e:
        raise UsageError(f"--metrics: {e}") from None
    if listen is not None and parse_address(listen) == address:
        raise UsageError(f"--metrics {value}: that is the --listen address for peers; give the metrics "
                         "endpoint a port of its own, like 9590")
    return value


def _sync_rate(value: Any) -> int:
    """Bytes per second above 0, like ``50M``; None (not given): unlimited, as 0 stands for
    inside. A 0 given is refused rather than read as "no limit", like ``join --rate 0``."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f"--sync-rate {value!r}: give bytes per second, like 50M (leave it out for no limit)")
    try:
        rate = parse_size(str(value))
    except MarsError as e:
        raise UsageError(f"--sync-rate: {e}") from None
    if rate <= 0:
        raise UsageError(f"--sync-rate {value!r}: give bytes per second above 0, like 50M (leave it out for no "
                         "limit)")
    return rate


def _cluster(value: Any) -> str:
    """The cluster id: a non-empty string (peers compare it in every hello)."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"--cluster {value!r}: give a non-empty cluster id that every node of the cluster "
                         f"shares (default {DEFAULT_CLUSTER})")
    return value


def _check_peers(node: str, listen: str | None, peers: dict[str, str]) -> None:
    """Refuse a ``--peer`` that is this node itself: its own name, or its own ``--listen``
    address (the same host and port as written; another spelling of the same address is not
    detected here)."""
    own = parse_address(listen) if listen is not None else None
    for name, addr in peers.items():
        if name == node:
            raise UsageError(f"--peer {name}={addr}: {name} is this node's own name; list the other nodes only")
        if own is not None and parse_address(addr) == own:
            raise UsageError(f"--peer {name}={addr}: that is this node's own --listen address; give {name}'s "
                             "address, or leave this node out of its own peers")


def _check_log_space(setting: LogSpaceSetting, state: Path) -> None:
    """Refuse a ``--log-space`` size the state filesystem cannot hold at all (more than its
    whole size), naming both; the filesystem is that of the state directory, or of its
    nearest existing parent before the first start."""
    if setting.size is None:
        return
    where = state
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return  # the state directory itself is refused later, with its own reason
    total = st.f_blocks * st.f_frsize
    if setting.size > total:
        raise UsageError(f"--log-space {setting.describe()} ({setting.size} bytes) is more than the filesystem of "
                         f"{state} holds ({human_bytes(total)} in all); give at most that, like "
                         f"{human_bytes(total // 2)}, or a percentage such as 10%")


def _stop_timeout(value: Any) -> float:
    """Seconds, ``inf`` to wait for as long as volumes are open, or 0 to stop at once."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or math.isnan(seconds) or seconds < 0:
        raise UsageError(f"--stop-timeout {value!r}: give seconds (0 stops at once, inf waits for every "
                         "open volume to close)")
    return seconds


def check_listen(listen: str, what: str = "for peers") -> None:
    """Refuse a ``--listen`` address this machine cannot listen on, before the daemon mounts.

    The socket is bound as the cluster will bind it (SO_REUSEADDR) and closed again; the
    cluster binds it for real a moment later (something may take the port in between, and
    then that start fails as well, after the mount, which the daemon undoes)."""
    host, port = parse_address(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MarsError(f"cannot listen {what} on {listen}: {host!r} does not resolve ({e.strerror}); "
                        "give an address of this machine, like 10.0.0.1:7600") from None
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
                s.listen(1)
            except OSError as e:
                hint = {errno.EADDRINUSE: "something else listens there: stop it or pick another port",
                        errno.EADDRNOTAVAIL: "it is not an address of this machine (see: ip -br addr)",
                        errno.EACCES: "ports below 1024 need root"}.get(e.errno or 0, "pick another --listen address")
                raise MarsError(f"cannot listen {what} on {listen}: {e.strerror}; {hint}") from None


def preflight(cfg: ServeConfig) -> None:
    """Refuse to start for reasons the operator can fix, before touching any state."""
    if cfg.state.exists() and not cfg.state.is_dir():
        raise MarsError(f"state directory {cfg.state} is not a directory; give a directory (serve makes it if it "
                        "does not exist)")
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
        raise MarsError(f"mount point {m} is not a directory; give an empty directory, made with: mkdir -p DIR")
    if os.path.ismount(m):
        raise MarsError(f"mount point {m} is busy (something is mounted there); unmount it or pick another")
    if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MarsError("FUSE is unavailable: /dev/fuse is missing or not accessible; "
                        "load it with: modprobe fuse (and run as root)")
    if shutil.which("fusermount3") is None:
        raise MarsError("fusermount3 is not installed; install the fuse3 package (scripts/demo does)")
    if cfg.state.resolve() == m.resolve() or m.resolve() in cfg.state.resolve().parents:
        raise MarsError("the state directory must not be inside the mount point")
    if cfg.listen is not None:
        check_listen(cfg.listen)
    if cfg.metrics is not None:
        check_listen(cfg.metrics, "for metrics scrapes")
