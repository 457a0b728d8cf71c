"""The cluster view of ``marsfs status``: status rows (the JSON of
:class:`marsfs.node.state.VolumeStatus`) as text.

Two renderings of the same content, chosen by where the output goes:

* :func:`status_table` is plain text, for a pipe or a file (and for scripts that grep it): one
  line per volume in aligned columns, under it one line per other member of the volume and its
  sync's progress bar in ASCII, then the errors, next steps and warnings. No escape codes ever.
  Its line formats (``VOL: warning: ...``, ``VOL: next: ...``, ``  mirror B: ...``,
  ``VOL: designated primary ...``) are user interface: tests and the docs match on them.
* :func:`render` is the same view for a terminal, with ``rich``: one table whose rows are the
  volumes and, under each, its other members; sync progress as a bar; states, errors and
  warnings in colour.

Both read only the row dicts; keys a row lacks (an older daemon, a hand-made row in a test)
show as empty, never as a KeyError. Nothing here asks the daemon or reads a clock but for the
"published N s ago" ages.
"""

from __future__ import annotations

import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from marsfs.node.state import FailoverLoss
from marsfs.units import human_bytes

Row = Mapping[str, Any]

#: characters of a sync's progress bar
BAR_WIDTH = 20
#: peer states the view warns about (a member that is not keeping up, or has no usable copy yet)
_PEER_WARN = frozenset({"syncing", "resyncing", "disconnected", "stalled", "needs-resync", "split-brain", "failed"})
#: the terminal table's columns of figures (right-aligned)
_RIGHT = frozenset({"EPOCH", "HEAD", "FETCHED", "REPLAYED", "LAG", "FETCH", "REPLAY", "ETA"})
#: colour of each state on a terminal
_STATE_STYLE: Mapping[str, str] = types.MappingProxyType({"up": "green", "synced": "green", "catching-up": "cyan", "syncing": "cyan", "resyncing": "cyan",
                "fetch-paused": "yellow", "replay-paused": "yellow", "disconnected": "yellow", "fenced": "yellow",
                "stalled": "red", "no-space": "red", "failed": "bold red", "split-brain": "bold red",
                "needs-resync": "bold red"})
#: colour of each kind of line under the table on a terminal
_KIND_STYLE: Mapping[str, str] = types.MappingProxyType({"error": "bold red", "warning": "yellow", "next": "cyan",
                                                        "info": ""})


# ------------------------------------------------------------------------------- pieces

def eta_text(eta: float | None) -> str:
    """An ETA in seconds as the view prints it: ``?`` when not known."""
    if eta is None:
        return "?"
    return f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min"


def rate_text(rate: float | None) -> str:
    return f"{human_bytes(int(rate or 0))}/s"


def _lag(r: Row) -> str:
    return f"{human_bytes(r['lag_bytes'])}/{r['lag_seconds']:.1f}s"


def peer_line(p: Row) -> str:
    """One mirror under its primary's row: as the primary sees it from the mirror's ACKs."""
    return (f"  mirror {p['node']}: {p['state']}, lag {_lag(p)} ({p['lag_records']} records), "
            f"fetched {p['fetched_lsn']}, replayed {p['replayed_lsn']}")


def _ago(t: float | None, now: float) -> str:
    return f"{max(0.0, now - t):.0f}s ago" if t else ""


def position_text(p: Row, now: float) -> str:
    """What another member published about its copy, in words (without its name)."""
    heard = f"heard {_ago(p['last_heard'], now)}" if p.get("last_heard") else "not heard directly"
    src = f" of {p['source']}" if p.get("source") else ""
    return (f"{p['role']}{src} {p['state']}, epoch {p['epoch']}, head {p['head_lsn']}, replayed {p['replayed_lsn']}, "
            f"published {_ago(p['updated'], now) or 'never'}, {heard}" + (f"; {p['stale']}" if p.get("stale") else ""))


def _other_positions(r: Row) -> list[Row]:
    """The members' published positions that no peer line already shows."""
    peers = {p["node"] for p in r.get("peers") or ()}
    return [p for p in r.get("positions") or () if p["node"] not in peers]


def in_sync(r: Row) -> bool:
    """Whether the row is of a sync under way (a first copy or a resync) that knows its size."""
    return bool(r.get("sync_bytes"))


def sync_text(r: Row) -> str:
    """A sync's figures after its bar: percent compared, what arrived, rate and ETA."""
    return (f"{100 * (r.get('progress') or 0.0):5.1f}% of {human_bytes(r.get('sync_bytes') or 0)} compared, "
            f"{human_bytes(r.get('sync_received_bytes') or 0)} received, {rate_text(r.get('fetch_rate'))}, "
            f"ETA {eta_text(r.get('eta_seconds'))}")


def ascii_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    done = max(0, min(width, int(fraction * width)))
    return "[" + "#" * done + "-" * (width - done) + "]"


def source_text(r: Row) -> str:
    """A mirror's fetch from its source: rates and the ETA of its lag."""
    return (f"fetch {rate_text(r.get('fetch_rate'))}, replay {rate_text(r.get('replay_rate'))}, "
            f"ETA {eta_text(r.get('eta_seconds'))}")


def under_lines(r: Row) -> list[str]:
    """The plain lines under a volume's row: its sync, its source, each other member."""
    lines = []
    now = time.time()
    if in_sync(r):
        lines.append(f"  sync {ascii_bar(r.get('progress') or 0.0)} {sync_text(r)}")
    elif r.get("state") in ("syncing", "resyncing"):
        lines.append("  sync: waiting for the source to pick the version to sync to")
    elif r.get("role") == "mirror" and r.get("source"):
        lines.append(f"  source {r['source']}: {source_text(r)}")
    lines += mode_lines(r)
    lines += [peer_line(p) for p in r.get("peers") or ()]
    lines += [f"  node {p['node']}: {position_text(p, now)}" for p in _other_positions(r)]
    return lines


def mode_lines(r: Row) -> list[str]:
    """A sync volume's line: where it stands on its primary (the mode only, elsewhere)."""
    if r.get("mode") != "sync":
        return []
    sm = r.get("sync_mode")
    if not sm:
        return ["  replication sync (its primary's flushes wait for mirrors)"]
    refuse = ", refuse" if sm["refuse"] else ""
    return [f"  replication sync: {sm['state']} ({sm['mirrors']} mirror(s), timeout {sm['timeout']:g} s{refuse}); "
            f"acknowledged up to LSN {sm['acked_lsn']}, held by {', '.join(sm['holding']) or 'no mirror'}"]


def view_warnings(r: Row) -> list[str]:
    """Warnings the view adds from a row's figures: members not keeping up or without a usable
    copy (the node's own warnings, log space and TLS among them, are in ``warnings``)."""
    out = []
    now = time.time()
    for p in r.get("peers") or ():
        if p["state"] not in _PEER_WARN:
            continue
        if p["state"] in ("syncing", "resyncing"):
            left = f"; {human_bytes(p['dropped'])} of changed extents to copy" if p.get("dropped") else ""
            out.append(f"mirror {p['node']} is {p['state']}: not a usable copy of {r['volume']} until its sync "
                       f"is done{left}")
        else:
            seen = f", last ACK {_ago(p['last_seen'], now)}" if p.get("last_seen") else ""
            out.append(f"mirror {p['node']} is {p['state']}: lag {_lag(p)} ({p['lag_records']} records){seen}")
    return out


def split_version_lines(r: Row) -> list[str]:
    """One line per split version of a volume (its space, and how to inspect or discard it),
    and their total when there are several."""
    vol, versions = r["volume"], r.get("split_versions") or []
    lines = []
    for v in versions:
        held = f", read by clone(s) {', '.join(v['clones'])}" if v.get("clones") else ""
        lines.append(f"{vol}: split version {v['name']} ({v['node']}'s writes after lsn-{v['fork_lsn']}): "
                     f"{human_bytes(v['disk_bytes'])} on disk{held}; inspect: marsfs clone {vol}@{v['name']} NEWVOL; "
                     f"discard: marsfs discard {vol}@{v['name']}")
    if len(versions) > 1:
        lines.append(f"{vol}: split versions take {human_bytes(r.get('split_versions_bytes') or 0)} on disk")
    return lines


def meta_lines(r: Row) -> list[str]:
    """What the cluster metadata says of a volume: its designated primary and members (each
    member's published position is under the volume's row)."""
    if not r.get("designated_primary"):
        return []
    return [f"{r['volume']}: designated primary {r['designated_primary']}, members "
            f"{', '.join(r.get('members') or []) or 'none'}"]


def tls_line(rows: Sequence[Row]) -> list[str]:
    """How this node talks to its peers (the same on every row), once."""
    tls = next((r["tls"] for r in rows if r.get("tls")), None)
    if tls is None:
        return []
    node = rows[0].get("node", "this node")
    if tls.get("mode") != "mutual-tls":
        return [f"node {node}: peers over plain TCP (--insecure)"]
    return [f"node {node}: peers over mutual TLS; its certificate expires {tls.get('certificate_expires')} "
            f"(in {tls.get('certificate_days_left', 0):.0f} days)"]


def footer(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """The lines after the table, each with its kind (error, next, warning, info)."""
    out: list[tuple[str, str]] = []
    for r in rows:
        vol = r["volume"]
        out += [(f"{vol}: error: {e}", "error") for e in r.get("errors") or ()]
        if r.get("next"):
            out.append((f"{vol}: next: {r['next']}", "next"))
        out += [(f"{vol}: warning: {w}", "warning") for w in [*(r.get("warnings") or ()), *view_warnings(r)]]
    for r in rows:
        out += [(f"{r['volume']}: clone {c['name']} holds lsn-{c['lsn']}", "info") for c in r.get("clones") or ()]
    for r in rows:
        out += [(x, "warning") for x in split_version_lines(r)]
    for r in rows:
        if r.get("failover_loss"):
            out.append((f"{r['volume']}: {FailoverLoss.from_json(r['failover_loss']).describe()}", "warning"))
    for r in rows:
        out += [(x, "info") for x in meta_lines(r)]
    out += [(x, "info") for x in tls_line(rows)]
    return out


NO_VOLUMES = "no volumes (create one with: marsfs create NAME --size SIZE)"


# ------------------------------------------------------------------------------- plain

def status_table(rows: Sequence[Row]) -> str:
    """The volumes as plain text: a table; under each volume's row its sync, its source and one
    line per other member; then errors, next steps and warnings."""
    if not rows:
        return NO_VOLUMES
    head = ["VOLUME", "ROLE", "STATE", "EPOCH", "SIZE", "HEAD", "DURABLE", "APPLIED", "OLDEST", "LOG", "LAG", "OPEN"]
    table: list[list[str] | str] = [head]
    for r in rows:
        table.append([r["volume"], r["role"], r["state"], str(r["epoch"]), human_bytes(r["size"]),
                      str(r["head_lsn"]), str(r["durable_lsn"]), str(r["applied_lsn"]),
                      str(r["oldest_version_lsn"]), human_bytes(r["log_bytes"]),
                      _lag(r), str(r["open_handles"])])
        table += under_lines(r)
    widths = [max(len(row[i]) for row in table if isinstance(row, list)) for i in range(len(head))]
    lines = [row if isinstance(row, str) else "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in table]
    return "\n".join(lines + [text for text, _ in footer(rows)])


# ------------------------------------------------------------------------------- terminal

def _bar(fraction: float, width: int = BAR_WIDTH) -> Text:
    """A progress bar that reads without colour too (a terminal capture, a screen reader)."""
    done = max(0, min(width, int(fraction * width)))
    return Text("█" * done, style="green") + Text("░" * (width - done), style="grey50")


def _state(state: str) -> Text:
    return Text(state, style=_STATE_STYLE.get(state, ""))


def _lsn(v: Any) -> str:
    return "" if v is None else str(v)


def render(rows: Sequence[Row]) -> RenderableType:
    """The cluster view for a terminal: one table (each volume's row on this node, under it
    every other member), then errors, next steps and warnings in colour."""
    if not rows:
        return Text(NO_VOLUMES)
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    right: JustifyMethod = "right"
    for name in ("VOLUME", "NODE", "ROLE", "STATE", "EPOCH", "HEAD", "FETCHED", "REPLAYED", "LAG", "FETCH", "REPLAY",
                 "ETA", "SYNC"):
        table.add_column(name, justify=right if name in _RIGHT else "left", no_wrap=True)
    now = time.time()
    for r in rows:
        mirror = r.get("role") == "mirror"
        sync: RenderableType = ""
        if in_sync(r):
            sync = _bar(r.get("progress") or 0.0) + Text(
                f" {100 * (r.get('progress') or 0.0):5.1f}% of {human_bytes(r.get('sync_bytes') or 0)}, "
                f"{human_bytes(r.get('sync_received_bytes') or 0)} received")
        elif r.get("state") in ("syncing", "resyncing"):
            sync = Text("waiting for the source to pick the version", style="cyan")
        elif r.get("mode") == "sync":  # the replication mode, and where a primary stands
            sm = r.get("sync_mode")
            sync = Text(f"mode sync: {sm['state']}" if sm else "mode sync",
                        style="yellow" if sm and sm["state"] != "in-sync" else "green")
        src = f" of {r['source']}" if mirror and r.get("source") else ""
        table.add_row(Text(r["volume"], style="bold"), Text(r.get("node", ""), style="bold"),
                      r["role"] + src, _state(r["state"]), str(r["epoch"]), _lsn(r["head_lsn"]),
                      _lsn(r.get("fetched_lsn")), _lsn(r.get("replayed_lsn")), _lag(r),
                      rate_text(r.get("fetch_rate")) if mirror else "",
                      rate_text(r.get("replay_rate")) if mirror else "",
                      eta_text(r.get("eta_seconds")) if mirror else "", sync)
        for p in r.get("peers") or ():
            table.add_row("", f"└ {p['node']}", p.get("role", "mirror"), _state(p["state"]), "", "",
                          _lsn(p["fetched_lsn"]), _lsn(p["replayed_lsn"]), _lag(p), "", "", "",
                          Text(f"dropped: {human_bytes(p['dropped'])} to copy", style="yellow")
                          if p.get("dropped") else "")
        for p in _other_positions(r):
            seen = f"published {_ago(p['updated'], now)}" + (f"; {p['stale']}" if p.get("stale") else "")
            src = f" of {p['source']}" if p.get("source") else ""
            table.add_row("", f"└ {p['node']}", p["role"] + src, _state(p["state"]), str(p["epoch"]),
                          _lsn(p["head_lsn"]), "", _lsn(p["replayed_lsn"]), "", "", "", "",
                          Text(seen, style="grey50" if not p.get("stale") else "yellow"))
    lines = [Text(text, style=_KIND_STYLE[kind]) for text, kind in footer(rows)]
    return Group(table, *([Text("")] if lines else []), *lines)


def terminal() -> Console:
    """A console on stdout for a terminal: colour as the terminal supports it (and NO_COLOR)."""
    return Console(force_terminal=True, highlight=False, soft_wrap=False)
