"""Clones: writable local volumes that start as another volume's version, copying nothing.

Theory of operation
-------------------
A clone of volume *S* at LSN *L* is a volume of its own (own uuid, own log starting at LSN 1
from its own genesis chain, own extent index) whose base is *S*'s image after *L* instead of a
file: a read of a range the clone has not written goes to a :class:`~marsfs.volume.VolumeView`
of *S* at *L*, a range it wrote comes from its own log. The view pins *S*'s writeback at *L*
(the shared version index makes that cheap), so *S*'s base and log keep what *L* needs for as
long as the clone exists; replication of *S* (fetch, replay) goes on.

Rules that hold here:

* The link (:class:`CloneLink`: source name, *L*, source uuid) is part of the clone's
  ``volume.json``, written with it atomically: a directory is a clone from its first moment.
* A clone never writes back: its ``base.img`` is a sparse file nobody reads, its writes stay in
  its log (which grows with what is written to it). Clones are for inspection, tests and
  recovery (fsck, mount, copy files out), not for long-lived heavy writing.
* A clone is readable and writable only while attached to its source's view
  (:meth:`Volume.attach_source`); a detached clone (its source is missing, is another volume
  of that name, or no longer retains *L*) refuses every read and write with StateError and can
  only be deleted.
* A clone never holds up its source's resync: before a resync of the source switches, each of
  its clones takes its *own copy* (:meth:`Volume.own_copy`): *S* at *L* is copied into the
  clone's ``base.img`` (zeros stay holes), made durable, and only then ``own`` is set in the
  link (``volume.json``, atomically) and the view closed. From then on the clone reads its own
  base below what it wrote, pins nothing and needs no source (it survives the source's
  deletion); a crash before ``own`` is written leaves a clone that reads through as before.
* A clone is not a source: cloning a clone is refused for now (the restart order would have to
  follow chains), and so is serving it to peers (clones are local).
* A clone of a split version (``VOL@split-<node>-<lsn>``, :mod:`marsfs.volume.splits`) reads
  below what it wrote from that standalone file instead of a view: it pins nothing of *S*'s
  log or base (writeback, resyncs and switches go on), and the split version cannot be
  discarded while the clone exists. Its link names the split (``split``); *L* is the split's
  head LSN, the loser's version it holds (for the record; it is not a version of *S*'s history).

Attachment (:func:`check_source`, :func:`pin_source`) works on a :class:`CloneSource`: the few
public methods of the source volume it needs, so this module never imports the volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from marsfs.errors import InvalidRequest, StateError, VersionNotFound
from marsfs.volume.splits import SplitView
from marsfs.volume.views import VolumeView


@dataclass(frozen=True, slots=True)
class CloneLink:
    """What a clone is made of: volume ``source`` (identified by ``source_uuid``) after ``lsn``,
    or, with ``split``, that split version of it; ``own``: the clone's base image holds that
    version itself (it reads no source any more)."""

    source: str
    lsn: int
    source_uuid: str
    split: str = ""  #: the split version's name (``split-<node>-<lsn>``); "": a version of the log
    own: bool = False

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "lsn": self.lsn, "source_uuid": self.source_uuid}
        if self.split:
            d["split"] = self.split
        if self.own:
            d["own"] = True
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> CloneLink:
        try:
            return cls(source=str(d["source"]), lsn=int(d["lsn"]), source_uuid=str(d["source_uuid"]),
                       split=str(d.get("split", "")), own=bool(d.get("own", False)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"{where}: unreadable clone link ({e!r}); delete the clone") from None

    def describe(self) -> str:
        """``VOL@lsn-L`` or ``VOL@split-N-L``: what status shows as ``clone_of``."""
        return f"{self.source}@{self.split or f'lsn-{self.lsn}'}"


class CloneSource(Protocol):
    """What a clone is attached to: a volume (:class:`marsfs.volume.Volume` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def uuid(self) -> str: ...

    @property
    def clone_of(self) -> CloneLink | None: ...

    @property
    def oldest_version_lsn(self) -> int: ...

    def view(self, lsn: int) -> VolumeView:
        """Open (and pin) version ``lsn``."""
        ...

    def split_view(self, name: str) -> SplitView:
        """Open split version ``name``."""
        ...


def check_source(source: CloneSource) -> None:
    """InvalidRequest when ``source`` cannot be cloned (it is a clone itself)."""
    if source.clone_of is not None:
        raise InvalidRequest(f"volume {source.name!r} is itself a clone (of {source.clone_of.describe()}); "
                             "a clone of a clone is not supported yet: clone the original volume")


def pin_source(link: CloneLink, clone: str, source: CloneSource) -> VolumeView | SplitView:
    """Open the version of ``source`` that clone ``clone`` (linked by ``link``) reads below what it
    wrote: pins the source at the clone's LSN, or opens its split version. StateError or
    VersionNotFound, in one line, when that cannot be done."""
    assert source.name == link.source, (source.name, link.source)
    if source.uuid != link.source_uuid:
        raise StateError(f"clone {clone}: volume {source.name} on this node is not the volume it was "
                         f"cloned from (uuid {source.uuid}, not {link.source_uuid}); "
                         f"delete the clone: marsfs delete {clone}")
    if link.split:
        try:
            return source.split_view(link.split)
        except VersionNotFound:
            raise VersionNotFound(f"clone {clone}: volume {source.name} no longer has split version {link.split}; "
                                  f"delete the clone: marsfs delete {clone}") from None
    try:
        return source.view(link.lsn)
    except VersionNotFound:
        raise VersionNotFound(f"clone {clone}: volume {source.name} no longer retains lsn-{link.lsn} "
                              f"(oldest is lsn-{source.oldest_version_lsn}); "
                              f"delete the clone: marsfs delete {clone}") from None
