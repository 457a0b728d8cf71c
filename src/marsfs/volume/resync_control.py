"""Resync control: when a volume may begin a resync, when it may switch, and what it says meanwhile.

The mechanism (staging, the switch, the merge) is :mod:`marsfs.volume.resync`; the
orchestration that needs the volume's locks and state is :mod:`marsfs.volume.resyncing`. What
lives here are its rules, as pure functions of what the volume tells them, so that each is
stated once:

* A resync targets the same volume (uuid), never a smaller or unaligned size (volumes never
  shrink), never a clone, and only one runs at a time (:func:`check_begin`).
* While one runs the volume takes no appends (:func:`busy` is what they raise).
* A switch waits (:func:`switch_waits`) for readers of versions older than the previous switch,
  for the previous switch's merge, for open versions below the resync's base *F* (writeback
  never passes a pinned view, and must reach *F*), and for version indexes being built. What
  it waits for is named: each open version by LSN and since when, and the clone holding it if
  one does (a clone waits only when it could not take its own copy, see
  :mod:`marsfs.volume.clone`).

Nothing here takes a lock or holds state: :class:`~marsfs.volume.resyncing.ResyncRunner` calls
these under the volume lock.
"""

from __future__ import annotations

import time

from marsfs.errors import InvalidRequest, MarsError, VolumeBusy


def check_begin(name: str, uuid: str, size: int, is_clone: bool, running: int | None, *, target_uuid: str,
                target_size: int) -> None:
    """Refuse a resync of volume ``name`` (``uuid``, ``size`` bytes, a clone or not, ``running``:
    the target LSN of a resync already running, or None) to an image of ``target_uuid`` and
    ``target_size`` bytes, with the reason and what to do."""
    if target_uuid != uuid:
        raise InvalidRequest(f"refused to resync volume {name} (uuid {uuid}) from an image of another "
                             f"volume (uuid {target_uuid}); delete this volume first to replace it")
    if target_size < size or target_size % 512:
        raise InvalidRequest(f"refused to resync volume {name} of {size} bytes to an image of {target_size} "
                             "bytes: volumes never shrink (and sizes are multiples of 512)")
    if is_clone:
        raise InvalidRequest(f"volume {name} is a clone; a clone cannot be resynced")
    if running is not None:
        raise VolumeBusy(f"a resync of volume {name} (to lsn-{running}) is already running; "
                         "continue or abort it")


def busy(name: str, target_lsn: int) -> VolumeBusy:
    """What an append to volume ``name`` meets while a resync to ``target_lsn`` runs."""
    return VolumeBusy(f"volume {name} is being resynced to lsn-{target_lsn} of another node and takes "
                      f"no writes until that finishes; see marsfs status {name}")


def switch_waits(base: int, *, merging: bool, old_views: int, merge_fault: MarsError | None,
                 pinned: list[tuple[int, float]], building: int, holders: dict[int, str] | None = None,
                 old_pins: list[tuple[int, float]] | None = None) -> str:
    """Why a resync from ``base`` cannot switch now ("" if it can): ``merging`` (the previous
    switch is not merged yet, ``merge_fault`` says why when writeback fails), ``old_views`` open
    from before it, ``pinned`` (the open versions' LSNs, ascending, each with when it was
    opened, epoch seconds), ``building`` version indexes being built; ``holders``: LSN -> who
    holds it, when known (a clone that could not take its own copy, and why); ``old_pins``:
    the versions (LSN, since) of ``old_views`` still open, as far as known."""
    assert old_views >= 0 and building >= 0, (old_views, building)
    if merging and old_views:
        named = ", ".join(f"lsn-{lsn} (open since {_when(since)})" for lsn, since in old_pins or ())
        return (f"{old_views} reader(s) of versions older than the previous resync are still open"
                + (f": {named}" if named else "") + "; they close when their readers do (close the file or "
                ".versions/ image, umount, losetup -d)")
    if merging:
        return f"the previous resync is not merged into the base image yet: {merge_fault}"
    below = [(lsn, since) for lsn, since in pinned if lsn < base]
    if below:
        named = ", ".join(f"lsn-{lsn} (open since {_when(since)}"
                          + (f"; held by {(holders or {})[lsn]}" if lsn in (holders or {}) else "") + ")"
                          for lsn, since in below)
        return (f"{len(below)} open version(s) older than lsn-{base}: {named}; they close when their readers "
                "do (close the file or .versions/ image, umount, losetup -d)")
    if building:
        return "a version is being opened"
    return ""


def _when(epoch_seconds: float) -> str:
    """``2026-12-02 18:03:02 UTC``: when a version was opened, as status says it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_seconds))
