"""The control commands, in one table that both the command line and the daemon read.

Each :class:`Command` says its name, its arguments (:class:`Arg`), its ``--help`` line, how the
command line prints the result (text, and JSON when it has ``--json``) and the daemon-side
handler. ``marsfs.cli`` builds its argparse subcommands from :data:`COMMANDS` (only ``serve``
is its own); the daemon answers the control socket through :func:`dispatch`.

Rules that hold here:

* The request is checked against the table before a handler runs: an unknown command, a
  missing argument, an unknown one or a value of the wrong type is a :class:`UsageError`
  (exit status 2), never a KeyError reported as an internal error; so are a size, history
  window or number of seconds that cannot be read (``--size 12Q``, ``--timeout soon``) and a
  rate of 0 (leaving ``--rate`` out is how to say "no limit"). A readable value that is not
  acceptable (a size of 0 or not a multiple of 512, a volume or node name that breaks the name
  rule) is the node's refusal (exit status 1), as any other.
* Every name a command takes is checked in the command line before the daemon is asked, and
  sizes, windows and rates are read there: a typo needs no daemon, and a malformed name is
  named as such, never answered as an unknown volume or node. The daemon checks again.
* ``wait`` and ``status --watch`` are loops in the command line around ``status``; ``wait``
  has no daemon side. ``ping`` and ``verify-progress`` (what the command line's ``verify`` loop polls) have no
  command line. ``wait --synced`` on a mirror waits until
  it is synced on the word of its source after the wait began (the last check, at the timeout,
  takes the mirror's own ``synced`` as it stands, so ``--timeout 0`` is one check); on a
  primary it waits until every mirror it knows is synced, and refuses at once (exit 1) when it
  knows none.
* Commands that are planned but do not exist yet (:data:`PLANNED`) are on the command
  line all the same and answer with one line saying so (:class:`NotAvailable`, exit status 2),
  never argparse's "invalid choice".
* Names, flags, output text and exit statuses are the user interface: they change only on
  purpose (tests/t4_serve.py and tests/t2_commands.py hold them).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from marsfs.errors import DaemonWentAway, InvalidRequest, MarsError, NotAvailable, UsageError, WrongRole
from marsfs.names import check_node_name, check_volume_name
from marsfs.node.defaults import DEFAULT_SYNC_TIMEOUT as DEFAULT_TIMEOUT
from marsfs.units import human_bytes, parse_size

if TYPE_CHECKING:
    from marsfs.node import Node
    from marsfs.node.cluster import Cluster
    from marsfs.node.syncmode import ModeSetting

# Every command-line process builds this table, so the modules at the top are only those the
# table needs (a create from a shell loop pays its start-up each time: trio, rich and the node
# layer are most of it). Handlers run in the daemon and client loops in the command line; each
# imports the rest where it is used.

VERIFY_POLL = 0.5  #: seconds one verify-progress request waits for the end before it reports progress

#: The command line's way to ask the daemon: ``request(command, args) -> result``.
Request = Callable[[str, dict[str, Any]], Any]
#: Daemon side: an argument's value in the request -> the handler's value (UsageError on a wrong type).
Parse = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Context:
    """What the daemon-side handlers act on."""

    node: Node
    cluster: Cluster
    mount: Path
    forget_volume: Callable[[str], None]  #: tell the FUSE face that a volume's name is gone
    mounted: bool = False  #: ``mount`` is this daemon's live FUSE mount (not in in-process tests)


Handler = Callable[[Context, dict[str, Any]], Awaitable[Any]]
T = TypeVar("T")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``trio.to_thread.run_sync(fn, *args)``: a handler's blocking part (trio is the daemon's,
    imported here so that the command line, which reads the same table, does not load it)."""
    import trio

    return await trio.to_thread.run_sync(fn, *args)


def status_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`marsfs.faces.view.status_table` (the tests and scripts import it here)."""
    from marsfs.faces import view

    return view.status_table(rows)


# ---------------------------------------------------------------------- argument types (daemon side)

def text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"argument {name!r} must be a non-empty string, not {value!r}")
    return value


def volume_name(name: str, value: Any) -> str:
    """A volume's name: a string (else a usage error) that keeps the name rule (else the node's
    refusal, exit status 1, as ``create`` gives it), so that a typo is never answered as an
    unknown volume to create."""
    return check_volume_name(text(name, value))


def node_name(name: str, value: Any) -> str:
    """A node's name (``--from``, ``--peer``, ``--node``), checked like :func:`volume_name`."""
    return check_node_name(text(name, value))


def history_window(name: str, value: Any) -> str:
    """A history window as ``history VOL WINDOW`` gives it: ``default`` or what
    :meth:`Retention.parse` reads; one it cannot read is a usage mistake, like ``serve --history``."""
    window = text(name, value)
    if window != "default":
        from marsfs.volume.retention import Retention

        try:
            Retention.parse(window)
        except InvalidRequest as e:
            raise UsageError(str(e)) from None
    return window


def read_window(text: str) -> str:
    """``history VOL WINDOW`` as the command line checks it (see :func:`history_window`)."""
    return history_window("window", text)


def seconds(text: str) -> float:
    """An argparse ``type`` for a timeout in seconds: a number, at least 0 (``inf``: no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, 0 or more, like 30")
    return value


def interval(text: str) -> float:
    """An argparse ``type`` for the seconds between two refreshes: :func:`seconds`, finite."""
    value = seconds(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds between refreshes, like 1")
    return value


def switch(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"argument {name!r} must be true or false, not {value!r}")
    return value


def size(name: str, value: Any) -> int:
    """Bytes, or a size like ``512M``; a wrong type or an unreadable size is a usage error (a
    readable size the node cannot take, such as one not a multiple of 512, is its refusal)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f"argument {name!r} must be a size (bytes or like 512M), not {value!r}")
    return read_size(str(value))


def read_size(text: str) -> int:
    """A size as the command line reads it: unreadable is a usage mistake (exit status 2)."""
    try:
        return parse_size(text)
    except MarsError as e:
        raise UsageError(str(e)) from None


def count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"argument {name!r} must be a whole number, not {value!r}")
    return value


def duration(name: str, value: Any) -> float:
    """Seconds, as a request carries them (a sync volume's ``--timeout``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"argument {name!r} must be a number of seconds, not {value!r}")
    return float(value)


def rate(name: str, value: Any) -> int:
    """Bytes per second above 0, like ``50M``: 0 is refused, not taken as "no limit" (leaving
    the option out is the way to say that)."""
    bps = size(name, value)
    if bps <= 0:
        raise UsageError(f"rate {value!r}: give bytes per second above 0, like 50M (without --rate the "
                         "source's serve --sync-rate applies, unlimited by default)")
    return bps


def read_rate(text: str) -> int:
    """``--rate`` as the command line reads it (see :func:`rate`)."""
    return rate("rate", text)


@dataclass(frozen=True)
class Arg:
    """One argument: its argparse form and its checks on both sides of the control socket."""

    name: str  #: the key in the request and the argparse ``dest``
    help: str | None = None
    flag: str | None = None  #: like ``--size``; None: positional
    required: bool = True
    parse: Parse = text
    check: Callable[[Any], Any] | None = None  #: the command line's own check/conversion before asking
    wire: bool = True  #: False: an option of the command line only (``--json``, ``--watch``)
    cli_type: Callable[[str], Any] | None = None  #: argparse ``type`` of a command-line-only option
    default: Any = None
    metavar: str | None = None
    hidden: bool = False  #: not shown by ``--help``
    nargs: str | None = None  #: argparse ``nargs`` of a positional (default: one, or ``?`` if not required)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {}
        if self.help is not None or self.hidden:
            kw["help"] = argparse.SUPPRESS if self.hidden else self.help
        if self.metavar is not None:
            kw["metavar"] = self.metavar
        if self.flag is None:
            if self.nargs is not None:
                kw["nargs"] = self.nargs
            elif not self.required:
                kw["nargs"] = "?"
            parser.add_argument(self.name, **kw)
        elif self.parse is switch:
            parser.add_argument(self.flag, dest=self.name, action="store_true", **kw)
        else:
            if self.cli_type is not None:
                kw["type"] = self.cli_type
            if self.default is not None:
                kw["default"] = self.default
            if self.required:
                kw["required"] = True
            parser.add_argument(self.flag, dest=self.name, **kw)

    def from_request(self, command: str, request: Mapping[str, Any]) -> Any:
        value = request.get(self.name)
        if value is None:
            if self.required:
                raise UsageError(f"{command}: missing argument {self.name!r}")
            return False if self.parse is switch else None
        return self.parse(self.name, value)


@dataclass(frozen=True)
class Command:
    """One control command: see the module docstring."""

    name: str
    help: str | None  #: the ``--help`` line; None: not a command of the command line
    args: tuple[Arg, ...] = ()
    handler: Handler | None = None  #: None: no daemon side (a command-line loop)
    text: Callable[[Any, argparse.Namespace], str] | None = None  #: the result as the command line prints it
    json: Callable[[Any, argparse.Namespace], Any] | None = None  #: what ``--json`` prints (needs a JSON arg)
    client: Callable[[Command, argparse.Namespace, Request], int] | None = None  #: a command-line loop
    description: str | None = None  #: what ``COMMAND --help`` says above the options (default: ``help``)

    def __post_init__(self) -> None:
        assert (self.json is not None) == any(a.name == "json" for a in self.args), self.name

    def add_parser(self, sub: Any, parents: list[argparse.ArgumentParser]) -> None:
        """Add this command to argparse's subparsers (``sub``)."""
        assert self.help is not None, self.name
        p = sub.add_parser(self.name, parents=parents, help=self.help, description=self.description or self.help)
        for arg in self.args:
            arg.add_to(p)

    def request_args(self, args: argparse.Namespace) -> dict[str, Any]:
        """The request for the daemon from parsed command-line arguments, after the client-side checks."""
        out = {}
        for a in self.args:
            if a.wire:
                value = getattr(args, a.name)
                out[a.name] = a.check(value) if a.check is not None and value is not None else value
        return out

    def parse_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The handler's arguments from a request; UsageError for anything malformed."""
        wire = [a for a in self.args if a.wire]
        unknown = sorted(set(request) - {a.name for a in wire})
        if unknown:
            raise UsageError(f"{self.name}: unknown argument(s) {', '.join(map(repr, unknown))}")
        return {a.name: a.from_request(self.name, request) for a in wire}

    def show(self, args: argparse.Namespace, result: Any) -> None:
        if self.json is not None and args.json:
            print(json.dumps(self.json(result, args), indent=1), flush=True)
        elif self.text is not None:
            print(self.text(result, args), flush=True)


def run(command: Command, args: argparse.Namespace, request: Request) -> int:
    """Run ``command`` for the command line: ask the daemon, print the result; the exit status."""
    if command.client is not None:
        return command.client(command, args, request)
    command.show(args, request(command.name, command.request_args(args)))
    return 0


async def dispatch(ctx: Context, cmd: str, request: Mapping[str, Any]) -> Any:
    """Answer one control request (the daemon side of the control socket)."""
    command = COMMANDS.get(cmd)
    if command is None or command.handler is None:
        raise UsageError(f"unknown command {cmd!r}")
    return await command.handler(ctx, command.parse_request(request))


# ---------------------------------------------------------------------- handlers (daemon side)

async def _ping(ctx: Context, a: dict[str, Any]) -> Any:
    return {"node": ctx.node.name, "pid": os.getpid(), "mount": str(ctx.mount)}


async def _create(ctx: Context, a: dict[str, Any]) -> Any:
    from marsfs.node import status

    mode = _setting(a) if a["mode"] is not None else _setting(a, "async") if _sync_options(a) else None
    await _in_thread(functools.partial(ctx.node.create, a["volume"], a["size"], thin=a["thin"], mode=mode))
    return status.volume_status(ctx.node, a["volume"]).to_json()


def _sync_options(a: dict[str, Any]) -> list[str]:
    """The options of sync mode given in a request."""
    return ([f"--{k}" for k in ("mirrors",) if a[k] is not None] + (["--timeout"] if a["sync_timeout"] is not None else [])
            + (["--refuse"] if a["refuse"] else []))


def _setting(a: dict[str, Any], mode: str | None = None) -> ModeSetting:
    """The replication mode a ``create`` or ``mode`` request asks for."""
    from marsfs.node.syncmode import check_setting

    mode = mode or a["mode"]
    given = _sync_options(a)
    if mode != "sync" and given:
        raise UsageError(f"{', '.join(given)} go(es) with sync mode: marsfs mode {a['volume']} sync {' '.join(given)}")
    try:  # a value the command line gave that no setting has is a usage mistake, as --size 12Q is
        return check_setting(mode, a["mirrors"] if a["mirrors"] is not None else 1,
                             a["sync_timeout"] if a["sync_timeout"] is not None else DEFAULT_TIMEOUT, a["refuse"])
    except InvalidRequest as e:
        raise UsageError(str(e)) from None


async def _mode(ctx: Context, a: dict[str, Any]) -> Any:
    name = a["volume"]
    setting = _setting(a)
    await _in_thread(ctx.node.set_mode, name, setting)
    ctx.cluster.gossip_now()
    d = ctx.node.meta.designated(name)
    primary = d.node if d is not None else ctx.node.name
    return {"volume": name, "mode": setting.mode.value, "mirrors": setting.mirrors, "timeout": setting.timeout,
            "refuse": setting.refuse, "described": setting.describe(), "primary": primary,
            "here": primary == ctx.node.name}


def _mode_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    where = ("this node is its primary and acts on it at once" if r["here"] else
             f"its primary {r['primary']} acts on it once the cluster metadata brings it there (about a second)")
    return f"{r['volume']}: replication mode {r['described']}; {where}"


async def _delete(ctx: Context, a: dict[str, Any]) -> Any:
    name = a["volume"]
    if ctx.node.is_mirror(name) and name in ctx.node.failed:  # only its directory is left: leave it
        result = await ctx.cluster.leave(name)
        ctx.forget_volume(name)
        return {"deleted": result["volume"]}
    if ctx.node.is_mirror(name):
        raise WrongRole(f"volume {name!r} is a mirror on node {ctx.node.name}; stop mirroring with marsfs leave")
    mirrors = ctx.cluster.mirrors_of(name)
    await _in_thread(functools.partial(ctx.node.delete, name, force=a["force"], mirrors=mirrors))
    ctx.forget_volume(name)
    return {"deleted": name}


async def _status(ctx: Context, a: dict[str, Any]) -> Any:
    return ctx.cluster.status(a["volume"])


async def _join(ctx: Context, a: dict[str, Any]) -> Any:
    return await ctx.cluster.join(a["volume"], a["source"], seed=a["seed"], rate=a["rate"] or 0, thin=a["thin"])


async def _invalidate(ctx: Context, a: dict[str, Any]) -> Any:
    return await ctx.cluster.invalidate(a["volume"], rate=a["rate"] or 0)


async def _leave(ctx: Context, a: dict[str, Any]) -> Any:
    if a["node"]:
        return await ctx.cluster.leave_node(a["volume"], a["node"], force=a["force"])
    if a["force"]:
        raise UsageError("leave --force goes with --node NAME (removing a dead node); to leave here: "
                         f"marsfs leave {a['volume']}")
    result = await ctx.cluster.leave(a["volume"])
    ctx.forget_volume(a["volume"])
    return result


def _pause(what: str, paused: bool) -> Handler:
    async def handler(ctx: Context, a: dict[str, Any]) -> Any:
        return ctx.cluster.set_paused(a["volume"], what, paused)

    return handler


async def _mark(ctx: Context, a: dict[str, Any]) -> Any:
    lsn = await _in_thread(ctx.node.mark, a["volume"], a["name"])
    return {"volume": a["volume"], "mark": a["name"], "lsn": lsn}


async def _versions(ctx: Context, a: dict[str, Any]) -> Any:
    from marsfs.node import status

    vol = ctx.node.volume(a["volume"])
    return {"volume": vol.name, "oldest_lsn": vol.oldest_version_lsn, "head_lsn": vol.replayed_lsn,
            "oldest_timestamp_ns": vol.oldest_version_timestamp_ns, "history": ctx.node.history_of(vol.name).describe(),
            "versions": [{"lsn": v.lsn, "kind": v.kind, "name": v.name, "timestamp_ns": v.timestamp_ns}
                         for v in vol.versions()],
            "split_versions": [v.to_json() for v in status.split_versions(ctx.node, vol.name)]}


async def _history(ctx: Context, a: dict[str, Any]) -> Any:
    name, window = a["volume"], a["window"]
    if window is not None:
        from marsfs.volume import Retention

        own = None if window == "default" else Retention.parse(window)
        await _in_thread(ctx.node.set_history, name, own)
    own_window = ctx.node.own_history(name)
    return {"volume": name, "history": ctx.node.history_of(name).describe(), "own": own_window is not None,
            "node_default": ctx.node.history.describe()}


def _history_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    if r["own"]:
        return (f"{r['volume']}: history window {r['history']} (this volume's own; the node's is "
                f"{r['node_default']}; back to it with: marsfs history {r['volume']} default)")
    return f"{r['volume']}: history window {r['history']} (the node's, from serve --history)"


async def _primary(ctx: Context, a: dict[str, Any]) -> Any:
    return await ctx.cluster.primary(a["volume"], force=a["force"], accept_loss=a["accept_loss"])


async def _clone(ctx: Context, a: dict[str, Any]) -> Any:
    source, version = clone_spec(a["version"])
    vol = await _in_thread(ctx.node.clone, source, version, a["volume"])
    from marsfs.node import status

    return {**status.volume_status(ctx.node, vol.name).to_json(), "image": str(ctx.mount / f"{vol.name}.img")}


async def _discard(ctx: Context, a: dict[str, Any]) -> Any:
    name, split = clone_spec(a["version"], "discard", "vm@split-node2-4711")
    from marsfs.node import status

    before = {v.name: v for v in status.split_versions(ctx.node, name)}
    info = await _in_thread(ctx.node.discard_split_version, name, split)
    kept = before.get(info.name)
    return {"volume": name, "discarded": info.name, "freed_bytes": kept.disk_bytes if kept is not None else 0}


def _discard_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    return (f"discarded split version {r['discarded']} of {r['volume']}: {human_bytes(r['freed_bytes'])} freed "
            "(once no reader has it open)")


async def _resize(ctx: Context, a: dict[str, Any]) -> Any:
    name, new = a["volume"], a["size"]
    lsn = await _in_thread(ctx.node.resize, name, new)
    from marsfs.faces.namespace import SUFFIX

    image = ctx.mount / f"{name}{SUFFIX}"
    if ctx.mounted:
        # the kernel owns a cached image's size (writeback cache): tell it by a truncate through
        # the mount, from a worker thread while this trio thread answers its SETATTR
        try:
            await _in_thread(os.truncate, image, new)
        except OSError as e:
            raise MarsError(f"volume {name} is {new} bytes now, but the kernel still shows {image} with its old "
                            f"size ({e.strerror}); run marsfs resize {name} {new} again") from None
    return {"volume": name, "size": new, "lsn": lsn, "image": str(image)}


def _resize_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    if r["lsn"] is None:
        return f"{r['volume']} is {human_bytes(r['size'])} already: nothing to do"
    return (f"resized {r['volume']} to {human_bytes(r['size'])} ({r['size']} bytes) at lsn-{r['lsn']}; a loop "
            f"device on {r['image']} sees it after: losetup -c DEVICE")


def _resize_client(command: Command, args: argparse.Namespace, request: Request) -> int:
    """Ask for the resize. A daemon that goes away before it answers may have applied it (the
    RESIZE record is in the log): ask once more for the volume's size, and say what is known."""
    wanted = command.request_args(args)
    name, new = wanted["volume"], wanted["size"]
    try:
        result = request(command.name, wanted)
    except DaemonWentAway:
        try:
            row = request("status", {"volume": name})[0]
        except MarsError:
            raise DaemonWentAway(f"the daemon went away during the resize of {name} to {human_bytes(new)} ({new} "
                                 f"bytes); it may have applied it: once the daemon runs again, marsfs status {name} "
                                 f"shows the size (run marsfs resize {name} {new} again if it is smaller)") from None
        if row["size"] < new:
            raise DaemonWentAway(f"the daemon went away during the resize of {name}, which did not apply: it is still "
                                 f"{human_bytes(row['size'])} ({row['size']} bytes); run marsfs resize {name} {new} "
                                 "again") from None
        print(f"{name} is {human_bytes(row['size'])} ({row['size']} bytes) now: the resize applied, although the "
              "daemon went away before it answered; a loop device on its image sees it after: losetup -c DEVICE",
              flush=True)
        return 0
    command.show(args, result)
    return 0


async def _verify(ctx: Context, a: dict[str, Any]) -> Any:
    return {"jobs": ctx.cluster.verify(a["volume"], a["peer"])}


async def _verify_progress(ctx: Context, a: dict[str, Any]) -> Any:
    return await ctx.cluster.verify_progress(a["job"], VERIFY_POLL)


# ---------------------------------------------------------------------- the command line's side

def clone_spec(spec: str, command: str = "clone",
               like: str = "vm@lsn-42, vm@before-upgrade, vm@split-node2-4711 or vm@2026-11-23T10:00:00Z"
               ) -> tuple[str, str]:
    """``VOL@VERSION`` -> ``(VOL, VERSION)``; the first ``@`` splits (volume names have none)."""
    source, sep, version = spec.partition("@")
    if not sep or not version:
        raise UsageError(f"{command} {spec!r}: give VOL@VERSION, like {like}")
    check_volume_name(source)
    return source, version


def _primary_client(command: Command, args: argparse.Namespace, request: Request) -> int:
    """Ask for the handover and, while the daemon works on it, show how many records are left
    to fetch (from ``status``: its ``handover`` figures)."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["result"] = request(command.name, command.request_args(args))
        except BaseException as e:  # raised again in the main thread
            outcome["error"] = e

    worker = threading.Thread(target=ask, name="marsfs-primary", daemon=True)
    worker.start()
    shown: Any = None
    while True:
        worker.join(0.2)
        if not worker.is_alive():
            break
        try:
            progress = request("status", {"volume": args.volume})[0].get("handover")
        except MarsError:
            continue
        if progress and progress != shown:
            left = progress.get("to_fetch")
            print(f"{args.volume}: handover from {progress['from']}: {progress['phase']}"
                  + (f", {left} records to fetch" if left is not None else ""), flush=True)
            shown = progress
    if "error" in outcome:
        raise outcome["error"]
    command.show(args, outcome["result"])
    return 0


def _primary_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    head = f"{r['volume']}: primary on this node now (epoch {r['epoch']}, writes from LSN {r['start_lsn']})"
    if "loss" in r:
        note = f"\n{r['mode_note']}" if r.get("mode_note") else ""
        return f"{head}; failover without {r['from']}: {r['lost']}{note}"
    follows = "which follows it now" if r.get("follows", True) else "which follows it once it hears of the claim"
    return f"{head}; handed over from {r['from']}, {follows}; nothing lost"


def _clone_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    return (f"cloned {r['clone_of']} as {r['volume']}: writable at {r['image']}; it holds that version of "
            f"{r['clone_of'].split('@')[0]} until: marsfs delete {r['volume']}")


def _status_loop(command: Command, args: argparse.Namespace, request: Request) -> int:
    """``status``; with ``--watch`` again every ``--interval`` seconds. A terminal gets the
    cluster view of :mod:`marsfs.faces.view` in colour, refreshed in place; anything else (a
    file, a pipe) plain text with no escape codes, with ``--watch`` one snapshot per interval,
    each after an empty line. ``--json`` prints the rows (each snapshot) whatever the output."""
    if args.json or not sys.stdout.isatty():
        first = True
        while True:
            rows = request("status", command.request_args(args))
            if args.watch and not args.json and not first:
                print()
            first = False
            command.show(args, rows)
            if not args.watch:
                return 0
            time.sleep(args.interval)
    from rich.live import Live

    from marsfs.faces import view

    console = view.terminal()
    if not args.watch:
        console.print(view.render(request("status", command.request_args(args))))
        return 0
    with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            live.update(view.render(request("status", command.request_args(args))), refresh=True)
            time.sleep(args.interval)


def _wait(command: Command, args: argparse.Namespace, request: Request) -> int:
    """Block until VOL is synced: this node's mirror of it, or every mirror of this primary."""
    from marsfs.node.volstate import Role

    if not args.synced:
        raise UsageError("say what to wait for: --synced")
    check_volume_name(args.volume)  # wait asks only status, whose request it builds itself
    start = time.monotonic()
    deadline = None if args.timeout is None else start + args.timeout
    while True:
        last_check = deadline is not None and time.monotonic() >= deadline
        row = request("status", {"volume": args.volume})[0]
        if Role(row["role"]) == Role.CLONE:
            raise MarsError(f"{args.volume} is a clone on node {row['node']} ({row.get('clone_of')}): a local "
                            "volume, never replicated, so there is nothing to wait for")
        if Role(row["role"]) == Role.PRIMARY:
            if _mirrors_synced(args.volume, row):
                return 0
        elif _mirror_synced(args.volume, row, waited=time.monotonic() - start, last_check=last_check):
            return 0
        if last_check:
            raise MarsError(f"{args.volume} not synced after {args.timeout:g} s: {_not_synced(row)}")
        time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))


def _mirror_synced(volume: str, row: Mapping[str, Any], *, waited: float, last_check: bool) -> bool:
    """Whether this mirror is synced. Before the deadline only on the word of a heartbeat sent
    after the wait began (a write the caller just made on the primary is then included)."""
    from marsfs.node.volstate import STOPPED, VolumeState

    if VolumeState(row["state"]) in STOPPED:
        raise MarsError(f"{volume} cannot become synced: state {row['state']}; " + "; ".join(row["errors"])
                        + (f"; next: {row['next']}" if row.get("next") else ""))
    if VolumeState(row["state"]) != VolumeState.SYNCED:
        return False
    age = row.get("heartbeat_age")
    return last_check or (age is not None and age < waited)


def _mirrors_synced(volume: str, row: Mapping[str, Any]) -> bool:
    """Whether every mirror this primary knows has fetched and replayed all it has made durable."""
    peers = row.get("peers") or []
    if not peers:
        raise MarsError(f"{volume} is primary on node {row['node']} and has no mirrors to wait for; "
                        f"run marsfs wait {volume} --synced on a mirror, or add one with marsfs join")
    return all(_peer_synced(p, row) for p in peers)


def _peer_synced(p: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    """Whether a mirror, as its primary sees it, has fetched and replayed all the primary made durable."""
    from marsfs.node.volstate import VolumeState

    return VolumeState(p["state"]) == VolumeState.SYNCED and p["replayed_lsn"] >= row["durable_lsn"]


def _not_synced(row: Mapping[str, Any]) -> str:
    from marsfs.node.volstate import Role

    if Role(row["role"]) == Role.PRIMARY:
        return "; ".join(f"mirror {p['node']} is {p['state']}, lag {p['lag_records']} records / "
                         f"{human_bytes(p['lag_bytes'])} / {p['lag_seconds']:.1f} s"
                         for p in row["peers"] if not _peer_synced(p, row))
    return (f"state {row['state']}, lag {row['lag_records']} records / {human_bytes(row['lag_bytes'])} / "
            f"{row['lag_seconds']:.1f} s")


#: how often a progress line is printed when stderr is not a terminal (a terminal redraws one line)
PROGRESS_LINE_EVERY = 5.0


def _sync_client(command: Command, args: argparse.Namespace, request: Request) -> int:
    """``join`` and ``invalidate``: ask the daemon; with ``--wait`` follow the sync on stderr
    until it is done (the copy switched and the mirror fetches the log)."""
    command.show(args, request(command.name, command.request_args(args)))
    if args.wait:
        follow_sync(args.volume, request)
    return 0


#: seconds ``join --wait`` waits after the switch for the mirror's fetch of the log to connect
SETTLE_AFTER_SYNC = 10.0


def follow_sync(volume: str, request: Request, *, out: TextIO | None = None,
                every: float = PROGRESS_LINE_EVERY, settle: float = SETTLE_AFTER_SYNC) -> dict[str, Any]:
    """Show a sync's progress until it is done; returns the last status row. A terminal gets
    one line redrawn; anything else a line every ``every`` seconds (and the first one).

    Right after the switch the mirror's fetch of the log reconnects (``disconnected`` for a
    moment): the final line waits up to ``settle`` seconds for the state that follows, and
    says "reconnecting" rather than a momentary ``disconnected``."""
    from marsfs.node.volstate import STOPPED, SYNCS, VolumeState

    out = out if out is not None else sys.stderr
    tty = out.isatty()
    shown: float | None = None
    done_at: float | None = None
    while True:
        row: dict[str, Any] = request("status", {"volume": volume})[0]
        if VolumeState(row["state"]) in STOPPED:
            if tty and shown is not None:
                print(file=out)
            raise MarsError(f"{volume}: the sync stopped: state {row['state']}; " + "; ".join(row["errors"]))
        if VolumeState(row["state"]) not in SYNCS:
            done_at = time.monotonic() if done_at is None else done_at
            disconnected = VolumeState(row["state"]) == VolumeState.DISCONNECTED
            if disconnected and time.monotonic() - done_at < settle:
                time.sleep(0.1)
                continue
            if tty and shown is not None:
                print(file=out)
            now = (f"reconnecting to {row.get('source') or 'its source'} to fetch the log (see: marsfs status "
                   f"{volume})" if disconnected else row["state"])
            print(f"{volume}: synced to LSN {row['durable_lsn']}; now {now}", file=out, flush=True)
            return row
        now = time.monotonic()
        if tty:
            print("\r" + progress_line(row) + "\x1b[K", end="", file=out, flush=True)
            shown = now
        elif shown is None or now - shown >= every:
            print(progress_line(row), file=out, flush=True)
            shown = now
        time.sleep(0.2)


def progress_line(row: Mapping[str, Any]) -> str:
    """A sync's progress in one line: percent compared, what arrived, rate and ETA."""
    total = row.get("sync_bytes") or 0
    if not total:
        return f"{row['volume']}: {row['state']}: waiting for the source to pick the version to sync to"
    from marsfs.faces import view

    when = view.eta_text(row.get("eta_seconds"))
    return (f"{row['volume']}: {row['state']} {100 * (row.get('progress') or 0.0):5.1f}% of "
            f"{human_bytes(total)} compared, {human_bytes(row.get('sync_received_bytes') or 0)} received, "
            f"{human_bytes(int(row.get('fetch_rate') or 0))}/s, ETA {when}")


def _seed_arg(value: str) -> str:
    """The seed file as the daemon must read it: an absolute path."""
    return os.path.abspath(value)


def _versions_text(r: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"volume {r['volume']}: versions lsn-{r['oldest_lsn']} to lsn-{r['head_lsn']} are retained"]
    if "history" in r:
        when = r["oldest_timestamp_ns"]
        since = time.strftime(", written %Y-%m-%dT%H:%M:%SZ", time.gmtime(when / 1e9)) if when else ""
        lines.append(f"  oldest available: lsn-{r['oldest_lsn']}{since}; history window: {r['history']}")
    for v in r["versions"]:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["timestamp_ns"] / 1e9)) if v["timestamp_ns"] else ""
        lines.append(f"  lsn-{v['lsn']:<10} {v['kind']:<6} {v['name'] if v['kind'] == 'mark' else '':<20} {when}")
    for v in r.get("split_versions") or ():
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["saved"]))
        lines.append(f"  {v['name']:<14} {'split':<6} {human_bytes(v['disk_bytes']) + ' on disk':<20} {when}")
    return "\n".join(lines)


def _verify_client(command: Command, args: argparse.Namespace, request: Request) -> int:
    """Start the comparisons, follow them (a progress line on stderr when it is a terminal),
    print each result. Exit 0 when every image is identical, 1 when any differs or a
    comparison failed (the failure is one line on stderr)."""
    jobs = request("verify", command.request_args(args))["jobs"]
    tty = sys.stderr.isatty()
    results: list[dict[str, Any]] = []
    failed = False
    for job in jobs:
        while True:
            try:
                r = request("verify-progress", {"job": job})
            except MarsError as e:
                _clear_progress(tty)
                print(f"marsfs: error: {e}", file=sys.stderr, flush=True)
                failed = True
                break
            if r["state"] == "done":
                _clear_progress(tty)
                results.append(r)
                if not args.json:
                    print(_verify_text(r), flush=True)
                break
            if tty and r["size"]:
                print(f"\rverifying {args.volume} with {r['peer']} at lsn-{r['lsn']}: "
                      f"{100 * r['done'] // r['size']}% ({human_bytes(r['done'])} of {human_bytes(r['size'])})",
                      end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=1), flush=True)
    return 1 if failed or not all(r["identical"] for r in results) else 0


def _clear_progress(tty: bool) -> None:
    if tty:
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)


def _verify_text(r: Mapping[str, Any]) -> str:
    head = f"{r['volume']} on {r['node']} and {r['peer']}"
    if r["identical"]:
        return f"{head}: identical at lsn-{r['lsn']} ({r['compared_bytes']} bytes compared)"
    diffs = r["differences"]
    total = sum(d["length"] for d in diffs)
    lines = [f"{head}: {len(diffs)} differing range(s), {total} bytes ({human_bytes(total)}) at lsn-{r['lsn']} "
             f"({r['compared_bytes']} bytes compared)"]
    lines += [f"  offset {d['offset']} length {d['length']} ({human_bytes(d['offset'])} +{human_bytes(d['length'])})"
              for d in diffs]
    return "\n".join(lines)


def _invalidate_text(r: dict[str, Any], a: argparse.Namespace) -> str:
    if r.get("split_version"):
        return (f"split brain of {r['volume']} resolved on this node: its divergent state is kept as "
                f".versions/{r['volume']}/{r['split_version']}; resyncing from {r['source']} what either side "
                f"wrote after lsn-{r['fork_lsn']}; follow with: marsfs status {r['volume']}")
    return (f"invalidated {r['volume']}: resyncing the whole image from {r['source']}, copying only blocks that "
            f"differ; it serves its last version until then; follow with: marsfs status {r['volume']}")


def _leave_text(r: Mapping[str, Any], a: argparse.Namespace) -> str:
    if "node" in r:
        return (f"removed node {r['node']} from {r['volume']}: its position no longer holds the log "
                f"(members now: {', '.join(r['members']) or 'none'})")
    return f"left {r['volume']} (no longer fetching from {r['left']}; local copy removed)"


def _pause_command(name: str) -> Command:
    verb, what = name.split("-")
    return Command(name, f"{name.replace('-', ' ')} of a mirror (persists)", (VOLUME,),
                   _pause(what, verb == "pause"), text=lambda r, a: f"{name.replace('-', ' ')}: {r['volume']}")


def _planned(name: str, what: str) -> Command:
    def client(command: Command, args: argparse.Namespace, request: Request) -> int:
        raise NotAvailable(f"{name} is not available yet (planned: {what})")

    return Command(name, "planned, not available yet",
                   (Arg("args", required=False, wire=False, nargs="*", hidden=True),), client=client)


#: Commands that are planned but do not exist yet, and what each will do.
PLANNED: Mapping[str, str] = types.MappingProxyType({
})

VOLUME = Arg("volume", parse=volume_name, check=check_volume_name)


def _mode_arg(value: str) -> str:
    if value not in ("async", "sync"):
        raise UsageError(f"replication mode {value!r}: give async or sync")
    return value


SYNC_OPTIONS = (
    Arg("mirrors", "sync: how many mirrors must hold a flush (default 1)", flag="--mirrors", required=False,
        parse=count, cli_type=int, metavar="N"),
    # not "timeout": the control socket's call() takes that as its own
    Arg("sync_timeout", f"sync: seconds a flush waits for them before the volume degrades to async (default "
                   f"{DEFAULT_TIMEOUT:g})", flag="--timeout", required=False, parse=duration, cli_type=float,
        metavar="S"),
    Arg("refuse", "sync: while degraded, fail flushes with EIO instead of completing them", flag="--refuse",
        required=False, parse=switch),
)
JSON = Arg("json", flag="--json", required=False, parse=switch, wire=False)
RATE = Arg("rate", "limit this sync's data to RATE bytes/s, above 0 (like 50M; default: the source's --sync-rate)",
           flag="--rate", required=False, parse=rate, check=read_rate, metavar="RATE")
WAIT = Arg("wait", "show progress and return when the sync is done", flag="--wait", required=False, parse=switch,
           wire=False)


def _join_text(r: dict[str, Any], a: argparse.Namespace) -> str:
    from marsfs.node.volstate import VolumeState

    if VolumeState(r["state"]) == VolumeState.RESYNCING:
        return (f"joining {r['volume']} from {r['source']}: resyncing the image it has here, copying only blocks "
                f"that differ; follow with: marsfs status {r['volume']}")
    seeded = f" from seed {r['seed']}" if r.get("seed") else ""
    return (f"joining {r['volume']} from {r['source']}: syncing {human_bytes(r['size'])}{seeded}, copying only "
            f"blocks that differ; follow with: marsfs status {r['volume']}  (or marsfs wait {r['volume']} --synced)")

COMMANDS: Mapping[str, Command] = types.MappingProxyType({c.name: c for c in (
    Command("ping", None, handler=_ping),
    Command("create", "create a volume; this node becomes its primary",
            (VOLUME,
             Arg("size", "like 512M, 10G, or bytes", flag="--size", parse=size, check=read_size),
             Arg("thin", "do not reserve the base image on disk (writes fail with ENOSPC if the disk fills)",
                 flag="--thin", required=False, parse=switch),
             Arg("mode", "replication mode: async (default) or sync (a flush waits for mirrors)", flag="--mode",
                 required=False, metavar="MODE", check=_mode_arg),
             *SYNC_OPTIONS),
            _create, text=lambda r, a: f"created volume {r['volume']} ({human_bytes(r['size'])}"
                                       f"{', thin' if a.thin else ''}), primary on node {r['node']}"
                                       f"{', replication sync' if r.get('mode') == 'sync' else ''}"),
    Command("delete", "remove a volume from this node",
            (Arg("volume", "the volume (a primary's or a clone)", parse=volume_name, check=check_volume_name),
             Arg("force", "even while it is open (a loop device, a mount) or has mirrors; never while "
                          "clones read from it (delete them first)",
                 flag="--force", required=False, parse=switch)),
            _delete, text=lambda r, a: f"deleted volume {a.volume}",
            description="remove a volume and its history from this node: a primary's, after its mirrors left "
                        "(marsfs leave VOL on each), or a clone; a mirror's copy goes with marsfs leave VOL "
                        "instead"),
    Command("status", "roles, LSNs, lag and errors",
            (Arg("volume", required=False, parse=volume_name, check=check_volume_name), JSON,
             Arg("watch", "refresh until interrupted", flag="--watch", required=False, parse=switch, wire=False),
             Arg("interval", flag="--interval", required=False, wire=False, cli_type=interval, default=1.0,
                 hidden=True)),
            _status, text=lambda rows, a: status_table(rows),
            json=lambda rows, a: rows[0] if a.volume else rows, client=_status_loop),
    Command("mark", "name the current LSN (after a flush)", (VOLUME, Arg("name")),
            _mark, text=lambda r, a: f"marked {r['volume']} at LSN {r['lsn']} as {r['mark']}"),
    Command("join", "become a mirror of VOL",
            (VOLUME, Arg("source", "the node to copy and fetch from", flag="--from", metavar="NODE", parse=node_name,
                         check=check_node_name),
             Arg("seed", "start from this image file (e.g. restored from a backup) instead of zeros",
                 flag="--seed", required=False, metavar="FILE", check=_seed_arg),
             Arg("thin", "do not reserve the copy's base image on disk (its writeback fails with ENOSPC if the "
                         "disk fills)", flag="--thin", required=False, parse=switch),
             RATE, WAIT),
            _join, text=_join_text, client=_sync_client),
    Command("invalidate", "discard this node's divergent or damaged copy and resync it",
            (VOLUME, RATE, WAIT),
            _invalidate, text=_invalidate_text, client=_sync_client),
    Command("leave", "stop mirroring VOL here; --node N --force: remove dead node N",
            (VOLUME,
             Arg("node", "remove this dead node from the volume (run on a survivor)", flag="--node",
                 required=False, metavar="NAME", parse=node_name, check=check_node_name),
             Arg("force", "with --node: yes, the node is dead", flag="--force", required=False, parse=switch)),
            _leave, text=_leave_text),
    *(_pause_command(n) for n in ("pause-fetch", "resume-fetch", "pause-replay", "resume-replay")),
    Command("wait", "block until a condition holds (for scripts)",
            (VOLUME,
             Arg("synced", "this mirror has fetched and replayed everything", flag="--synced", required=False,
                 parse=switch, wire=False),
             Arg("timeout", "give up after S seconds (exit 1)", flag="--timeout", required=False, wire=False,
                 cli_type=seconds, metavar="S")),
            client=_wait),
    Command("versions", "list marks, flush points and the retained range", (VOLUME, JSON),
            _versions, text=_versions_text, json=lambda r, a: r),
    Command("history", "show or set a volume's history window",
            (VOLUME, Arg("window", "a size, a duration or both, like 10G, 24h or 10G,24h; 'default': the "
                                   "node's window again", required=False, metavar="WINDOW", parse=history_window,
                         check=read_window), JSON),
            _history, text=_history_text, json=lambda r, a: r),
    Command("clone", "writable copy-on-write volume from a version",
            (Arg("version", "the volume and version: lsn-N, a mark, an ISO-8601 UTC time or a split version",
                 metavar="VOL@VERSION", check=lambda v: (clone_spec(v), v)[1]),
             Arg("volume", "the new volume's name", metavar="NEWVOL", parse=volume_name, check=check_volume_name), JSON),
            _clone, text=_clone_text, json=lambda r, a: r),
    Command("discard", "remove a split version a resolved split brain kept",
            (Arg("version", "the volume and split version, like vm@split-node2-4711", metavar="VOL@SPLIT",
                 check=lambda v: (clone_spec(v, "discard", "vm@split-node2-4711"), v)[1]),),
            _discard, text=_discard_text),
    Command("primary", "make this node the primary (handover; --force: failover)",
            (VOLUME, Arg("force", "the primary cannot be reached: become primary with what this node has "
                                  "(loses what it did not fetch; status says how much); refused while a "
                                  "reachable member holds more; in a split brain: keep this node's side",
                         flag="--force", required=False, parse=switch),
             Arg("accept_loss", "with --force: even though a reachable member holds more (it is lost)",
                 flag="--accept-loss", required=False, parse=switch), JSON),
            _primary, text=_primary_text, json=lambda r, a: r, client=_primary_client),
    Command("verify", "compare images at the same version by checksums",
            (VOLUME, Arg("peer", "the node to compare with (default: a mirror's source; on a primary: every "
                                 "mirror it knows)", flag="--peer", required=False, metavar="NODE", parse=node_name,
                         check=check_node_name), JSON),
            _verify, json=lambda r, a: r, client=_verify_client),
    Command("verify-progress", None, (Arg("job"),), _verify_progress),
    Command("mode", "replication mode of a volume: async or sync",
            (VOLUME, Arg("mode", "async, or sync: a flush completes once N mirrors hold it in their logs (degrades "
                                 "to async when they do not answer within the timeout)", metavar="MODE",
                         check=_mode_arg),
             *SYNC_OPTIONS, JSON),
            _mode, text=_mode_text, json=lambda r, a: r,
            description="set the replication mode of a volume, online, on any of its nodes (it is kept in the "
                        "cluster metadata, so a new primary keeps it): async (the default: a flush waits for this "
                        "node's disk only) or sync (a flush also waits until N mirrors hold it durably; when they do "
                        "not within the timeout the volume runs degraded, as async, until they caught up again)"),
    Command("resize", "grow a volume (on its primary)",
            (VOLUME, Arg("size", "the new size, like 20G, or bytes; never smaller", parse=size, check=read_size)),
            _resize, text=_resize_text, client=_resize_client),
    *(_planned(name, what) for name, what in PLANNED.items()),
)})
