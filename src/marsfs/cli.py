"""The ``marsfs`` command line: ``serve`` runs a node; every other verb asks its daemon.

Errors are one line on stderr with exit status 1; usage errors exit 2 (argparse's
convention); no tracebacks for anything a user can cause.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from marsfs.errors import MarsError, UsageError
from marsfs.units import human_bytes, parse_size

DEFAULT_STATE = "/var/lib/marsfs"


def _state(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "state", None) or os.environ.get("MARSFS_STATE") or DEFAULT_STATE)


def _call(args: argparse.Namespace, cmd: str, **kw: Any) -> Any:
    from marsfs.faces.control import call

    return call(_state(args), cmd, **kw)


def _status_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no volumes (create one with: marsfs create NAME --size SIZE)"
    head = ["VOLUME", "ROLE", "STATE", "EPOCH", "SIZE", "HEAD", "DURABLE", "APPLIED", "OLDEST", "LOG", "LAG", "OPEN"]
    table = [head]
    for r in rows:
        table.append([r["volume"], r["role"], r["state"], str(r["epoch"]), human_bytes(r["size"]),
                      str(r["head_lsn"]), str(r["durable_lsn"]), str(r["applied_lsn"]),
                      str(r["oldest_version_lsn"]), human_bytes(r["log_bytes"]),
                      f"{human_bytes(r['lag_bytes'])}/{r['lag_seconds']:.1f}s", str(r["open_handles"])])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        lines += [f"{r['volume']}: error: {e}" for e in r["errors"]]
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    from marsfs.faces.serve import configure_logging, load_config, serve

    configure_logging(args.verbose)
    flags = {"node": args.node, "state": getattr(args, "state", None), "mount": args.mount,
             "listen": args.listen, "peer": args.peer, "history": args.history, "cluster": args.cluster}
    cfg = load_config(args.config, flags)
    return serve(cfg)


def cmd_create(args: argparse.Namespace) -> int:
    from marsfs.node import check_volume_name

    check_volume_name(args.volume)
    size = parse_size(args.size)
    r = _call(args, "create", volume=args.volume, size=size)
    print(f"created volume {r['volume']} ({human_bytes(r['size'])}), primary on node {r['node']}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _call(args, "delete", volume=args.volume, force=args.force)
    print(f"deleted volume {args.volume}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    while True:
        rows = _call(args, "status", volume=args.volume)
        if args.json:
            print(json.dumps(rows[0] if args.volume else rows, indent=1), flush=True)
        else:
            if args.watch:
                print("\x1b[H\x1b[2J", end="")
            print(_status_table(rows), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def cmd_mark(args: argparse.Namespace) -> int:
    r = _call(args, "mark", volume=args.volume, name=args.name)
    print(f"marked {r['volume']} at LSN {r['lsn']} as {r['mark']}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    r = _call(args, "versions", volume=args.volume)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"volume {r['volume']}: versions lsn-{r['oldest_lsn']} to lsn-{r['head_lsn']} are retained")
    for v in r["versions"]:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["timestamp_ns"] / 1e9)) if v["timestamp_ns"] else ""
        print(f"  lsn-{v['lsn']:<10} {v['kind']:<6} {v['name'] if v['kind'] == 'mark' else '':<20} {when}")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    r = _call(args, "join", volume=args.volume, source=args.source)
    print(f"joining {r['volume']} from {r['source']}: copying {human_bytes(r['size'])}; "
          f"follow with: marsfs status {r['volume']}  (or marsfs wait {r['volume']} --synced)")
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    r = _call(args, "leave", volume=args.volume)
    print(f"left {r['volume']} (no longer fetching from {r['left']}; local copy removed)")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    r = _call(args, args.command, volume=args.volume)
    print(f"{args.command.replace('-', ' ')}: {r['volume']}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Block until this node's mirror of VOL has no lag (fetched and replayed everything)."""
    from marsfs.errors import MarsError

    if not args.synced:
        raise UsageError("say what to wait for: --synced")
    start = time.monotonic()
    deadline = None if args.timeout is None else start + args.timeout
    last: dict[str, Any] = {}
    while True:
        rows = _call(args, "status", volume=args.volume)
        last = rows[0]
        if last["role"] == "primary":
            return 0
        fresh = last.get("heartbeat_age") is not None and last["heartbeat_age"] < time.monotonic() - start
        if last["state"] == "synced" and fresh:  # what the source said after we began waiting
            return 0
        if last["state"] in ("split-brain", "needs-resync", "failed"):
            raise MarsError(f"{args.volume} cannot become synced: state {last['state']}; "
                            + "; ".join(last["errors"]))
        if deadline is not None and time.monotonic() > deadline:
            raise MarsError(f"{args.volume} not synced after {args.timeout:g} s: state {last['state']}, "
                            f"lag {last['lag_records']} records / {human_bytes(last['lag_bytes'])} / "
                            f"{last['lag_seconds']:.1f} s")
        time.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", default=argparse.SUPPRESS, metavar="DIR",
                        help=f"the node's state directory (default: $MARSFS_STATE or {DEFAULT_STATE})")
    p = argparse.ArgumentParser(prog="marsfs", parents=[common],
                                description="Asynchronous log-shipping replication of volume images (FUSE).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", parents=[common], help="run a node in the foreground")
    s.add_argument("--node", help="this node's name (immutable for a state directory)")
    s.add_argument("--mount", type=Path, metavar="DIR", help="where the volume images appear")
    s.add_argument("--listen", metavar="HOST:PORT", help="address for peers (replication)")
    s.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT", help="a peer node (repeatable)")
    s.add_argument("--config", type=Path, metavar="FILE", help="TOML file with the same keys; flags win")
    s.add_argument("--history", metavar="SIZE", help="log kept as history per volume (default 256M)")
    s.add_argument("--cluster", help="cluster id peers must share (default marsfs)")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("create", parents=[common], help="create a volume; this node becomes its primary")
    s.add_argument("volume")
    s.add_argument("--size", required=True, help="like 512M, 10G, or bytes")
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("delete", parents=[common], help="remove a volume from this node")
    s.add_argument("volume")
    s.add_argument("--force", action="store_true", help="even while it is open")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("status", parents=[common], help="roles, LSNs, lag and errors")
    s.add_argument("volume", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="refresh until interrupted")
    s.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("mark", parents=[common], help="name the current LSN (after a flush)")
    s.add_argument("volume")
    s.add_argument("name")
    s.set_defaults(func=cmd_mark)

    s = sub.add_parser("join", parents=[common], help="become a mirror of VOL")
    s.add_argument("volume")
    s.add_argument("--from", dest="source", required=True, metavar="NODE", help="the node to copy and fetch from")
    s.set_defaults(func=cmd_join)

    s = sub.add_parser("leave", parents=[common], help="stop mirroring VOL (removes the local copy)")
    s.add_argument("volume")
    s.set_defaults(func=cmd_leave)

    for verb in ("pause-fetch", "resume-fetch", "pause-replay", "resume-replay"):
        s = sub.add_parser(verb, parents=[common], help=f"{verb.replace('-', ' ')} of a mirror (persists)")
        s.add_argument("volume")
        s.set_defaults(func=cmd_pause)

    s = sub.add_parser("wait", parents=[common], help="block until a condition holds (for scripts)")
    s.add_argument("volume")
    s.add_argument("--synced", action="store_true", help="this mirror has fetched and replayed everything")
    s.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 1)")
    s.set_defaults(func=cmd_wait)

    s = sub.add_parser("versions", parents=[common], help="list marks, flush points and the retained range")
    s.add_argument("volume")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_versions)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"marsfs: error: {e}", file=sys.stderr)
        return 2
    except MarsError as e:
        print(f"marsfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
