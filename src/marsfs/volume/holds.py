"""Holds: what keeps a volume's log from being deleted, and what a mirror missed when it did not.

A hold is a name and an LSN: the log after that LSN stays until the hold moves or goes. A
mirror's position on its primary is such a hold, under the key :func:`mirror_hold` makes;
every place that reads or writes a mirror's hold goes through :func:`mirror_hold` and
:func:`hold_mirror`, so the key's form has one home.

:class:`HoldLedger` is one volume's book of them (G8):

* ``holds.json`` in the volume directory maps each hold key to its LSN (the mirror's ACKed
  position). :meth:`HoldLedger.hold` is cheap (the trio loop calls it at every ACK) and only
  marks the book dirty; :meth:`HoldLedger.persist` writes it (once per maintenance pass), so a
  primary restart keeps holding a disconnected mirror's log.
* When log space runs out the log is *dropped* for a mirror behind the cut
  (:meth:`HoldLedger.drop`): the extents of the records it misses go into its persisted
  :class:`~marsfs.volume.changes.ChangeSet` *before* the log goes, and from then on it counts
  as at the drop point (:meth:`HoldLedger.floor`). Its set is cleared once its position passes
  the drop point (it caught up) or it leaves.
* A cleared set's file is removed by the next :meth:`HoldLedger.persist`, after ``holds.json``
  is written: a crash in between leaves a set whose mirror is past it (or gone), which opening
  clears.
* Invariant (asserted when a key is released): a set exists only for a key that holds the log.
* The ledger shares its volume's lock (an RLock) for its memory; the caller of
  :meth:`HoldLedger.persist` and :meth:`HoldLedger.drop` holds the volume's writeback lock (only
  writeback trims the log), so nothing is trimmed while they run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from marsfs.errors import DiskFailed, StateError
from marsfs.fsutil import read_json, write_json
from marsfs.log import io_error
from marsfs.volume import changes as ch
from marsfs.volume.changes import ChangeSet

_MIRROR = "mirror:"
HOLDS_FILE = "holds.json"  #: the hold keys' positions, persisted


def mirror_hold(node: str) -> str:
    """The hold key under which mirror ``node``'s position holds a primary's log."""
    assert node and not node.startswith(_MIRROR), node
    return _MIRROR + node


def hold_mirror(key: str) -> str | None:
    """The mirror whose position ``key`` is, or None for a hold that is no mirror's."""
    return key[len(_MIRROR):] if key.startswith(_MIRROR) else None


def read_holds(volume_dir: Path) -> dict[str, int]:
    """The persisted positions of a volume (none when there is no file)."""
    try:
        d = read_json(volume_dir / HOLDS_FILE)
        return {str(k): int(v) for k, v in d.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, AttributeError) as e:
        raise StateError(f"{volume_dir / HOLDS_FILE}: unreadable mirror positions ({e}); remove the file (the "
                         "mirrors then resync if their log is gone)") from None


#: ``(after, upto) -> merged (offset, length) ranges`` of the WRITE records in between, or None
#: when the log no longer holds them all (``Volume.extents_between`` under the writeback lock).
ExtentsBetween = Callable[[int, int], "list[tuple[int, int]] | None"]


class HoldLedger:
    """One volume's holds and the change sets of its mirrors whose log was dropped."""

    def __init__(self, volume_dir: Path, volume_name: str, lock: threading.RLock) -> None:
        self._dir = volume_dir
        self._name = volume_name
        self._lock = lock
        self._holds: dict[str, int] = read_holds(volume_dir)
        self._changes: dict[str, ChangeSet] = ch.load_all(volume_dir)
        self._stale: set[str] = set()  #: sets cleared in memory, their files not yet removed
        self._dirty = False
        for key, cs in list(self._changes.items()):
            if key not in self._holds or self._holds[key] >= cs.upto:  # cleared before a crash
                del self._changes[key]
                self._stale.add(key)

    def _check(self) -> None:
        assert self._changes.keys() <= self._holds.keys(), (set(self._changes), set(self._holds))

    def _at(self, key: str, lsn: int) -> int:
        """Where ``key`` (at ``lsn``) holds the log: a dropped mirror counts as at its drop point."""
        cs = self._changes.get(key)
        return lsn if cs is None else max(lsn, cs.upto)

    def floor(self, default: int) -> int:
        """The log must keep every record after this: the oldest hold; ``default`` if none."""
        with self._lock:
            floors = [self._at(k, lsn) for k, lsn in self._holds.items()]
        return min(floors, default=default)

    def hold(self, key: str, lsn: int) -> None:
        """Keep records after ``lsn`` for ``key``; clears its set once ``lsn`` passes the drop point."""
        with self._lock:
            if self._holds.get(key) != lsn:
                self._holds[key] = lsn
                self._dirty = True
            cs = self._changes.get(key)
            if cs is not None and lsn >= cs.upto:
                del self._changes[key]
                self._stale.add(key)

    def release(self, key: str) -> None:
        """Forget ``key`` (its mirror left): its position and its set."""
        with self._lock:
            if self._holds.pop(key, None) is not None:
                self._dirty = True
            if self._changes.pop(key, None) is not None:
                self._stale.add(key)
            self._check()

    def positions(self) -> dict[str, int]:
        """Hold key -> its position (a copy)."""
        with self._lock:
            return dict(self._holds)

    def dropped(self) -> dict[str, ChangeSet]:
        """Hold key -> its set, for every key whose log was dropped (copies)."""
        with self._lock:
            return {k: cs.copy() for k, cs in self._changes.items()}

    def changes_of(self, key: str) -> ChangeSet | None:
        """A copy of ``key``'s set, None if its log was never dropped (or it caught up)."""
        with self._lock:
            cs = self._changes.get(key)
            return None if cs is None else cs.copy()

    def persist(self) -> None:
        """Write the positions if they changed, then remove the files of cleared sets.
        Caller holds the writeback lock."""
        with self._lock:
            holds = dict(self._holds) if self._dirty else None
            self._dirty = False
            stale = set(self._stale)
        try:
            if holds is not None:
                write_json(self._dir / HOLDS_FILE, holds)
            for key in stale:
                ch.remove(self._dir, key)
        except OSError as e:
            with self._lock:
                self._dirty = self._dirty or holds is not None
            raise io_error(f"cannot persist the mirror positions of volume {self._name}", e, DiskFailed) from e
        with self._lock:
            self._stale -= stale

    def drop(self, upto: int, extents_between: ExtentsBetween) -> None:
        """Every key whose position is behind ``upto`` misses records ``(its position, upto]``
        from now on: add their extents to its set, persisted before the log goes. Caller holds
        the writeback lock."""
        with self._lock:
            behind = {k: self._at(k, lsn) for k, lsn in self._holds.items()}
        if any(at < upto for at in behind.values()):
            self.persist()  # opening keeps a set only for a mirror holds.json knows
        for key, at in behind.items():
            if at >= upto:
                continue
            extents = extents_between(at, upto)
            assert extents is not None, f"records after the hold at {at} were trimmed"
            with self._lock:
                if key not in self._holds:
                    continue  # it left meanwhile
                cs = self._changes.get(key) or ChangeSet(at, at)
                cs.update(extents)
                cs.upto = max(cs.upto, upto)
                snapshot = cs.copy()
            try:
                ch.save(self._dir, key, snapshot)
            except OSError as e:
                raise io_error(f"cannot persist the changed ranges of volume {self._name} for {key}", e,
                               DiskFailed) from e
            with self._lock:
                self._changes[key] = cs
                self._stale.discard(key)
