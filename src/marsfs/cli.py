"""The ``marsfs`` command line: ``serve`` runs a node; every other verb asks its daemon.

The verbs other than ``serve`` come from the command table (:mod:`marsfs.faces.commands`):
their arguments, help and output are defined there once, for this parser and for the daemon.

Exit statuses (docs/user-guide.md, "Errors", lists them for users):

* 0: done. 1: refused or failed (the daemon's or the node's refusal, no daemon running, a
  file that cannot be written, a verify that found differences, a wait that timed out).
* 2: a usage mistake: the command line itself is wrong (argparse's convention): an unknown
  command or option, a missing argument, a value that cannot be read; for ``serve`` every
  mistake in its flags or config file, so that a service manager does not restart it.
* 130: interrupted (Ctrl-C); 141: the reader went away (``marsfs status --watch | head``),
  as SIGPIPE ends other tools.

Every error is exactly one line on stderr that says what to do, usage errors included
(:class:`Parser` prints argparse's complaint and where the help is, not the usage block), and
no traceback for anything a user or the machine can cause: an ``OSError`` that no layer turned
into a :class:`MarsError` still ends as one line. A planned command that does not exist yet
(:data:`marsfs.faces.commands.PLANNED`) says so in one line, whatever its arguments (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from marsfs.errors import MarsError, UsageError
from marsfs.faces.commands import COMMANDS, PLANNED, Request, run
from marsfs.node.defaults import DEFAULT_CLUSTER, NODE_DAYS

DEFAULT_STATE = "/var/lib/marsfs"


class Parser(argparse.ArgumentParser):
    """argparse, with its complaints in one line: what is wrong and where the help is (exit 2).

    Subparsers are of this class too (argparse makes them of their parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see: {self.prog} --help\n")


def _state(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "state", None) or os.environ.get("MARSFS_STATE") or DEFAULT_STATE)


def _requester(state: Path) -> Request:
    """Ask the daemon of ``state`` over its control socket."""
    from marsfs.faces.client import call

    def request(cmd: str, args: dict[str, Any]) -> Any:
        return call(state, cmd, **args)

    return request


def cmd_serve(args: argparse.Namespace) -> int:
    from marsfs.faces.config import load_config
    from marsfs.faces.daemon import configure_logging, serve

    configure_logging(args.verbose)
    flags = {"node": args.node, "state": getattr(args, "state", None), "mount": args.mount,
             "listen": args.listen, "peer": args.peer, "history": args.history, "cluster": args.cluster,
             "stop_timeout": args.stop_timeout, "log_space": args.log_space, "sync_rate": args.sync_rate,
             "tls_dir": args.tls_dir, "insecure": args.insecure, "metrics": args.metrics}
    cfg = load_config(args.config, flags)
    return serve(cfg)


def cmd_cluster(args: argparse.Namespace) -> int:
    """``marsfs cluster init`` and ``add-node``: files only, no daemon."""
    from marsfs.node import tls

    if args.cluster_command == "init":
        try:
            made = tls.init_ca(args.dir, args.cluster)
        except OSError as e:
            raise _files_error(e, "--dir", args.dir) from None
        if args.json:
            print(json.dumps({"dir": os.fspath(made.dir), "cluster": made.cluster,
                              "expires": made.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        else:
            print(f"made the CA of cluster {made.cluster} in {made.dir} (valid until {made.not_after:%Y-%m-%d}); "
                  f"keep {made.dir / tls.CA_KEY} safe; next, for each node: "
                  f"marsfs cluster add-node NAME --ca {made.dir} --out DIR")
        return 0
    if args.days <= 0:
        raise UsageError(f"--days {args.days}: give the days the certificate is valid, above 0")
    try:
        issued = tls.add_node(args.ca, args.name, args.out, days=args.days)
    except OSError as e:
        inside_out = e.filename is not None and Path(os.path.abspath(args.out)) in (
            Path(os.path.abspath(e.filename)), *Path(os.path.abspath(e.filename)).parents)
        raise (_files_error(e, "--out", args.out) if inside_out else _files_error(e, "--ca", args.ca)) from None
    if args.json:
        print(json.dumps({"node": issued.node, "cluster": issued.cluster, "dir": os.fspath(issued.dir),
                          "expires": issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    else:
        print(f"issued node {issued.node}'s certificate of cluster {issued.cluster} into {issued.dir} "
              f"({tls.CA_CERT}, {tls.NODE_CERT}, {tls.NODE_KEY}; valid until {issued.not_after:%Y-%m-%d}); install: "
              f"copy the three files to {issued.node}'s STATE/{tls.TLS_DIR}/ (or give serve --tls-dir), "
              f"{tls.NODE_KEY} mode 0600, then start or restart its daemon")
    return 0


def _files_error(e: OSError, flag: str, path: Path) -> MarsError:
    """A certificate file that cannot be read or written, as one line naming the flag."""
    why = "not a directory" if isinstance(e, FileExistsError | NotADirectoryError) else e.strerror or str(e)
    where = f"{e.filename}: " if e.filename and os.fspath(e.filename) != os.fspath(path) else ""
    want = "the directory marsfs cluster init --dir made" if flag == "--ca" else "a directory that can be made and written"
    return MarsError(f"cannot use {flag} {path}: {where}{why}; give {flag} {want}")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--state", default=argparse.SUPPRESS, metavar="DIR",
                        help=f"the node's state directory (default: $MARSFS_STATE or {DEFAULT_STATE})")
    p = Parser(prog="marsfs", parents=[common],
               description="Asynchronous log-shipping replication of volume images (FUSE).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", parents=[common], help="run a node in the foreground")
    s.add_argument("--node", help="this node's name (immutable for a state directory)")
    s.add_argument("--mount", type=Path, metavar="DIR", help="where the volume images appear")
    s.add_argument("--listen", metavar="HOST:PORT", help="address for peers (replication)")
    s.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT", help="another node of the cluster (repeatable; not this node itself)")
    s.add_argument("--config", type=Path, metavar="FILE", help="TOML file with the same keys; flags win")
    s.add_argument("--history", action="append", metavar="SIZE|DURATION",
                   help="history kept per volume: a size (10G), a duration (24h, also s, min, d, w) or both "
                        "(10G,24h, or the flag twice): versions within either stay openable (default 256M)")
    s.add_argument("--log-space", metavar="SIZE|PCT%",
                   help="limit for the log bytes of all volumes together: a size (20G) or a percentage of the "
                        "state filesystem (10%%), at most its size; default: half of its free space plus what the logs take")
    s.add_argument("--cluster", help="cluster id peers must share, not empty (default marsfs)")
    s.add_argument("--stop-timeout", metavar="S",
                   help="on SIGTERM, wait up to S seconds for open volumes to close (default 30; 0: stop at "
                        "once; inf: no limit); a second SIGTERM forces the stop")
    s.add_argument("--sync-rate", metavar="RATE",
                   help="limit the fast sync data this node sends to each mirror to RATE bytes/s, above 0, like 50M "
                        "(default: unlimited; join/invalidate --rate limits one sync further)")
    s.add_argument("--tls-dir", type=Path, metavar="DIR",
                   help="ca.crt, node.crt and node.key of this node (default STATE/tls; made by marsfs cluster add-node)")
    s.add_argument("--insecure", action="store_true",
                   help="talk to peers over plain TCP without certificates: anyone who reaches the port can act as a "
                        "node (tests and trials only)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (see docs/metrics.md)")
    s.add_argument("-v", "--verbose", action="store_true")

    c = sub.add_parser("cluster", parents=[common], help="the cluster's certificates (no daemon needed)",
                       description="Make the cluster's certificate authority and issue each node's certificate.")
    csub = c.add_subparsers(dest="cluster_command", metavar="init|add-node", required=True)
    ci = csub.add_parser("init", help="make the cluster's CA in CA_DIR (ca.crt, ca.key)")
    ci.add_argument("--dir", type=Path, required=True, metavar="CA_DIR",
                    help="where the CA goes; keep it off the nodes, safe (its key admits nodes)")
    ci.add_argument("--cluster", default=DEFAULT_CLUSTER,
                    help=f"the cluster id, as serve --cluster gives it (default {DEFAULT_CLUSTER})")
    ci.add_argument("--json", action="store_true")
    ca = csub.add_parser("add-node", help="issue NAME's ca.crt, node.crt and node.key into DIR (also: renew)")
    ca.add_argument("name", metavar="NAME")
    ca.add_argument("--ca", type=Path, required=True, metavar="CA_DIR", help="the directory cluster init made")
    ca.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="where the three files go: the node's STATE/tls, or a directory to copy there")
    ca.add_argument("--days", type=int, default=NODE_DAYS, help=f"validity in days (default {NODE_DAYS})")
    ca.add_argument("--json", action="store_true")

    for command in COMMANDS.values():
        if command.help is not None:
            command.add_parser(sub, [common])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in PLANNED:  # what parse_args says; a planned command takes anything
        prog = " ".join(["marsfs", args.command, *([args.cluster_command] if args.command == "cluster" else [])])
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(unknown)}; see: {prog} --help\n")
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "cluster":
            return cmd_cluster(args)
        return run(COMMANDS[args.command], args, _requester(_state(args)))
    except MarsError as e:  # a UsageError too: its message says what to give (exit 2)
        print(f"marsfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (status --watch | head): no traceback, and none again when
        # Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # what no layer turned into a MarsError: still one line, no traceback
        where = f" {e.filename}" if e.filename else ""
        print(f"marsfs: error: cannot use{where}: {e.strerror or e}; check the path and its permissions",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
