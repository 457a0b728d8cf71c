"""``marsfs serve``'s configuration: what the daemon is told, and whether it can start at all.

Rules that hold here:

* A TOML file (``--config``) supplies what flags do not; flags win, and ``--peer`` adds to the
  file's ``[peers]``. Bad input is one :class:`UsageError` line naming the flag or file.
* :func:`preflight` refuses to start, with one line saying what to do, when the mount point is
  missing, not a directory, already mounted or a dead FUSE mount, when FUSE is unavailable, or
  when the state directory lies inside the mount point. It runs before any state is touched.
  (A state directory owned by another node name or locked by a running daemon is refused by
  :meth:`marsfs.node.Node.open`.)
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marsfs.errors import InvalidRequest, MarsError, UsageError
from marsfs.node.cluster import DEFAULT_CLUSTER
from marsfs.volume import Retention


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
    try:
        history = Retention.parse(merged["history"]) if "history" in merged else Retention()
    except InvalidRequest as e:
        raise UsageError(f"--history: {e}") from None
    return ServeConfig(node=str(merged["node"]), state=Path(merged["state"]), mount=Path(merged["mount"]),
                       listen=merged.get("listen"), peers=peers, cluster=str(merged.get("cluster", DEFAULT_CLUSTER)),
                       history=history)


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
