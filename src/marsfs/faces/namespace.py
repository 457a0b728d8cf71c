"""What the mounted tree looks like: names, inodes, lookup counts and attributes, as plain data.

This module is the FUSE face's model and imports no pyfuse3 (``faces.fuse`` is the adapter
that speaks to the kernel; the split is borg's ``vfs.py`` / ``fuse.py``). It is driven by the
adapter's requests and reads the node through :class:`Catalog`, so tests run it against a
fake catalog without a mount.

The tree::

    /                                 the root directory (ROOT_INODE)
    /<vol>.img                        one regular file per volume, size = volume size
    /.versions/                       history (not listed in the root, like ZFS's hidden .zfs)
    /.versions/<vol>/                 one directory per volume
    /.versions/<vol>/<version>.img    a read-only version: lsn-<N>, <mark> or an ISO-8601 time
    /.versions/<vol>/split-<node>-<lsn>.img  a resolved split brain's losing state (volume.splits)

Rules that hold here:

* Every inode stands for one :class:`Entry`: a kind plus what it shows. A primary's
  ``<vol>.img`` is one entry (``version`` None: the live image), with the same inode for as
  long as the volume exists. On a mirror every lookup resolves to the entry of the newest
  replayed version (``version`` = its LSN; entry timeout 0): an open file keeps its inode,
  hence its version, while replay goes on, and because each version has its own inode the
  kernel's page cache never mixes versions.
* ``.versions/<vol>/<name>.img`` is resolved on lookup by the volume (:meth:`Image.find_version`):
  the name must name a version in the window and, on a mirror, one it has replayed; otherwise
  the lookup finds nothing (ENOENT). Each (volume, LSN) is one VERSION entry, so every name of
  the same version (``lsn-7``, a mark at 7, a time whose flush point is 7) is the same inode.
  ``lsn-N`` and mark names always mean the same version (entry timeout as usual); a time may
  name a newer flush point later (a time in the future), so its entry timeout is 0.
* ``split-<node>-<lsn>.img`` names a split version (a standalone file the volume keeps); it is
  listed after the versions, its inode lives as long as the volume, and it never changes.
* ``.versions`` is not listed in the root: tools that walk the mount (or glob ``*.img``) see the
  images only. A directory listing is a snapshot taken at opendir (:meth:`Namespace.directory`),
  so that the kernel's successive readdir calls page through one list while flushes go on.
* The kernel counts lookups per inode (each ``lookup`` reply and each readdirplus entry is
  one) and gives them back with asynchronous FORGETs. A version inode is freed only when its
  count reaches zero: a FORGET that arrives after a new lookup of the same inode must not free
  it. The live image's inode is never freed while its volume exists.
* A deleted volume's entries go at once (:meth:`Namespace.forget_volume`); an inode that no
  longer stands for a volume on the node resolves to nothing (ENOENT in the adapter).
* Only what is complete is listed: a mirror whose image copy is still running is not a volume
  of the node yet.
* Nothing is removed through the mount (EPERM): volumes go with ``marsfs delete``, split
  versions with ``marsfs discard`` (:meth:`Namespace.removal_hint` names the command).
"""

from __future__ import annotations

import enum
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from marsfs.errors import VersionNotFound
from marsfs.volume import VersionInfo
from marsfs.volume.splits import SplitInfo, parse_split_name
from marsfs.volume.versions import parse_time_ns

ROOT_INODE = 1  #: the FUSE root inode (pyfuse3.ROOT_INODE; the adapter asserts they agree)
SUFFIX = ".img"
VERSIONS = ".versions"  #: the history directory in the root
TIMEOUT = 1.0  #: entry and attribute timeout of everything that does not change under a name
BLOCK_SIZE = 4096


class Image(Protocol):
    """What the namespace reads of a volume."""

    @property
    def size(self) -> int: ...

    def size_at(self, lsn: int) -> int:
        """The size of version ``lsn`` (a volume grows at a RESIZE record)."""
        ...

    @property
    def replayed_lsn(self) -> int: ...

    def find_version(self, spec: str) -> int:
        """The LSN ``spec`` names, if a reader may open it now; VersionNotFound otherwise."""
        ...

    def version_listing(self) -> list[VersionInfo]: ...

    def version_timestamp_ns(self, lsn: int) -> int: ...

    def splits(self) -> list[SplitInfo]: ...


class Catalog(Protocol):
    """What the namespace reads of the node (a :class:`marsfs.node.Node` is one)."""

    @property
    def volumes(self) -> Mapping[str, Image]: ...

    def is_mirror(self, name: str) -> bool: ...


class EntryKind(enum.Enum):
    ROOT = "root"
    IMAGE = "image"  #: ``<vol>.img``: the live image on a primary, a replayed version on a mirror
    VERSIONS = "versions"  #: ``.versions``
    VERSION_DIR = "version-dir"  #: ``.versions/<vol>``
    VERSION = "version"  #: ``.versions/<vol>/<name>.img``: the version after LSN ``version``
    SPLIT = "split"  #: ``.versions/<vol>/<split>.img``: a split version (``split`` is its name)


@dataclass(frozen=True)
class Entry:
    """What one inode shows. Hashable: it is the key of the inode table."""

    kind: EntryKind
    volume: str = ""
    version: int | None = None  #: None: the live (writable) image; an LSN: that version, read-only
    split: str = ""  #: a SPLIT entry's split version name

    @property
    def writable(self) -> bool:
        return self.kind is EntryKind.IMAGE and self.version is None

    @property
    def is_dir(self) -> bool:
        return self.kind in _DIRS


_DIRS = (EntryKind.ROOT, EntryKind.VERSIONS, EntryKind.VERSION_DIR)
_PER_VOLUME = (EntryKind.IMAGE, EntryKind.VERSION_DIR, EntryKind.VERSION, EntryKind.SPLIT)
ROOT = Entry(EntryKind.ROOT)
VERSIONS_ENTRY = Entry(EntryKind.VERSIONS)


@dataclass(frozen=True)
class Attributes:
    """An inode's attributes as the kernel sees them (the adapter copies them into pyfuse3's type)."""

    inode: int
    mode: int
    nlink: int
    size: int
    mtime_ns: int  #: also ctime and atime
    entry_timeout: float
    attr_timeout: float
    uid: int = 0
    gid: int = 0
    blksize: int = BLOCK_SIZE

    @property
    def blocks(self) -> int:
        return self.size // 512


@dataclass(frozen=True)
class DirEntry:
    name: str
    attrs: Attributes
    next_id: int  #: the readdir offset that continues after this entry


def image_name(volume: str) -> str:
    return volume + SUFFIX


class Namespace:
    """The inode table and lookup counts of one mount, over a node's volumes."""

    def __init__(self, catalog: Catalog, *, now_ns: int | None = None) -> None:
        self.catalog = catalog
        self._inodes: dict[Entry, int] = {ROOT: ROOT_INODE}
        self._entries: dict[int, Entry] = {ROOT_INODE: ROOT}
        self._lookups: Counter[int] = Counter()  # the kernel's lookup count per inode
        self._next_inode = ROOT_INODE + 1
        self._mtime: dict[str, int] = {}
        self._started_ns = time.time_ns() if now_ns is None else now_ns

    # ------------------------------------------------------------------ names

    def listing(self) -> list[str]:
        """The volumes shown in the root, in readdir order."""
        return sorted(self.catalog.volumes)

    def _volume_of(self, filename: str) -> str | None:
        if not filename.endswith(SUFFIX):
            return None
        name = filename[: -len(SUFFIX)]
        return name if name in self.catalog.volumes else None

    def _image_entry(self, volume: str) -> Entry:
        """The entry ``<volume>.img`` resolves to now (a mirror: its current version's)."""
        version = self.catalog.volumes[volume].replayed_lsn if self.catalog.is_mirror(volume) else None
        return Entry(EntryKind.IMAGE, volume, version)

    def _inode_of(self, entry: Entry) -> int:
        ino = self._inodes.get(entry)
        if ino is None:
            ino = self._inodes[entry] = self._next_inode
            self._entries[ino] = entry
            self._next_inode += 1
        return ino

    def entry(self, inode: int) -> Entry | None:
        """What ``inode`` shows, or None when it shows nothing (any more)."""
        entry = self._entries.get(inode)
        if entry is None or (entry.kind in _PER_VOLUME and entry.volume not in self.catalog.volumes):
            return None
        return entry

    def _resolve(self, parent: Entry, filename: str) -> tuple[Entry, bool] | None:
        """The entry ``filename`` names in ``parent`` and whether the name is stable (a time
        is not), or None."""
        if parent.kind is EntryKind.ROOT:
            if filename == VERSIONS:
                return VERSIONS_ENTRY, True
            volume = self._volume_of(filename)
            return None if volume is None else (self._image_entry(volume), True)
        if parent.kind is EntryKind.VERSIONS:
            if filename not in self.catalog.volumes:
                return None
            return Entry(EntryKind.VERSION_DIR, filename), True
        if parent.kind is EntryKind.VERSION_DIR and filename.endswith(SUFFIX):
            spec = filename[: -len(SUFFIX)]
            if parse_split_name(spec) is not None:
                image = self.catalog.volumes[parent.volume]
                if not any(s.name == spec for s in image.splits()):
                    return None
                return Entry(EntryKind.SPLIT, parent.volume, split=spec), True
            try:
                lsn = self.catalog.volumes[parent.volume].find_version(spec)
            except VersionNotFound:
                return None
            return Entry(EntryKind.VERSION, parent.volume, lsn), parse_time_ns(spec) is None
        return None

    def removal_hint(self, parent: int, filename: str) -> str:
        """What to run instead of removing ``filename`` in ``parent`` through the mount."""
        pentry = self.entry(parent)
        found = self._resolve(pentry, filename) if pentry is not None and pentry.is_dir else None
        entry = found[0] if found is not None else None
        if entry is not None and entry.kind is EntryKind.SPLIT:
            return f"discard a split version with: marsfs discard {entry.volume}@{entry.split}"
        if entry is not None and entry.kind is EntryKind.IMAGE:
            return f"delete a volume with: marsfs delete {entry.volume}"
        if entry is not None and entry.kind is EntryKind.VERSION:
            return "versions go by themselves when the history window passes them"
        return "nothing is removed through the mount (volumes: marsfs delete; split versions: marsfs discard)"

    # ------------------------------------------------------------------ the kernel's references

    def lookup(self, parent: int, filename: str) -> Attributes | None:
        """Resolve ``filename`` in ``parent`` and count the kernel's new reference; None: no such name."""
        pentry = self.entry(parent)
        if pentry is None or not pentry.is_dir:
            return None
        if filename in (".", ".."):  # the kernel does not count these
            if filename == "." or pentry.kind is EntryKind.ROOT:
                return self.attributes(parent)
            up = ROOT if pentry.kind is EntryKind.VERSIONS else VERSIONS_ENTRY
            return self._attributes(self._inode_of(up))
        found = self._resolve(pentry, filename)
        if found is None:
            return None
        entry, stable = found
        attrs = self._attributes(self._inode_of(entry))
        if not stable:
            attrs = replace(attrs, entry_timeout=0)
        self._lookups[attrs.inode] += 1
        return attrs

    def directory(self, inode: int) -> list[tuple[str, Entry]] | None:
        """A snapshot of what directory ``inode`` lists (None: not a directory), for readdir."""
        entry = self.entry(inode)
        if entry is None or not entry.is_dir:
            return None
        if entry.kind is EntryKind.ROOT:
            return [(image_name(v), self._image_entry(v)) for v in self.listing()]
        if entry.kind is EntryKind.VERSIONS:
            return [(v, Entry(EntryKind.VERSION_DIR, v)) for v in self.listing()]
        image = self.catalog.volumes[entry.volume]
        return [*((v.name + SUFFIX, Entry(EntryKind.VERSION, entry.volume, v.lsn)) for v in image.version_listing()),
                *((s.name + SUFFIX, Entry(EntryKind.SPLIT, entry.volume, split=s.name)) for s in image.splits())]

    def readdir(self, start_id: int, listing: list[tuple[str, Entry]] | None = None) -> Iterator[DirEntry]:
        """Entries of ``listing`` (a :meth:`directory` snapshot; default: the root now) from
        offset ``start_id``. Each one the kernel accepts is a lookup: the adapter calls
        :meth:`counted` for it (readdirplus)."""
        entries = self.directory(ROOT_INODE) if listing is None else listing
        assert entries is not None
        for i in range(start_id, len(entries)):
            name, entry = entries[i]
            if entry.volume and entry.volume not in self.catalog.volumes:
                continue  # deleted since the snapshot
            yield DirEntry(name, self._attributes(self._inode_of(entry)), i + 1)

    def counted(self, inode: int) -> None:
        """The kernel took a reference to ``inode`` outside :meth:`lookup` (a readdirplus entry)."""
        self._lookups[inode] += 1

    def forget(self, pairs: Iterable[tuple[int, int]]) -> None:
        """The kernel dropped ``nlookup`` references per inode (FORGET, BATCH_FORGET).

        FORGETs are asynchronous: the kernel may have looked the same inode up again before
        this one arrives, so only a count of zero frees it, and only a version inode is freed."""
        for ino, nlookup in pairs:
            left = self._lookups[ino] - nlookup
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            entry = self._entries.get(ino)
            if entry is not None and entry.version is not None:
                del self._entries[ino]
                self._inodes.pop(entry, None)

    def forget_volume(self, volume: str) -> str:
        """A volume was deleted (or left): drop its entries (image, versions directory and
        versions). Returns the filename the kernel must forget (the adapter invalidates it)."""
        for entry in [e for e in self._inodes if e.volume == volume and e.kind in _PER_VOLUME]:
            self._entries.pop(self._inodes.pop(entry), None)
        self._mtime.pop(volume, None)
        return image_name(volume)

    def lookups(self, inode: int) -> int:
        """The kernel's current lookup count of ``inode`` (for statistics and tests)."""
        return self._lookups[inode]

    def __len__(self) -> int:
        """How many inodes the table holds, the root included."""
        return len(self._entries)

    # ------------------------------------------------------------------ attributes

    def touch(self, volume: str, mtime_ns: int | None = None) -> None:
        """Record a new mtime for ``volume``'s image: a write, or an mtime-only SETATTR."""
        self._mtime[volume] = time.time_ns() if mtime_ns is None else mtime_ns

    def attributes(self, inode: int) -> Attributes | None:
        """The attributes of ``inode``, or None when it shows nothing (any more)."""
        if self.entry(inode) is None:
            return None
        return self._attributes(inode)

    def versions_inode(self) -> int | None:
        """The inode of ``.versions`` if the kernel may know it (for invalidations)."""
        return self._inodes.get(VERSIONS_ENTRY)

    def _attributes(self, inode: int) -> Attributes:
        entry = self._entries[inode]
        if entry.kind is EntryKind.ROOT:
            return Attributes(inode, stat.S_IFDIR | 0o755, 2, 0, self._started_ns, TIMEOUT, TIMEOUT)
        if entry.kind in (EntryKind.VERSIONS, EntryKind.VERSION_DIR):
            return Attributes(inode, stat.S_IFDIR | 0o555, 2, 0, self._started_ns, TIMEOUT, TIMEOUT)
        if entry.kind is EntryKind.VERSION:
            assert entry.version is not None
            image = self.catalog.volumes[entry.volume]
            return Attributes(inode, stat.S_IFREG | 0o400, 1, image.size_at(entry.version),
                              image.version_timestamp_ns(entry.version) or self._started_ns, TIMEOUT, TIMEOUT)
        if entry.kind is EntryKind.SPLIT:
            info = next((s for s in self.catalog.volumes[entry.volume].splits() if s.name == entry.split), None)
            size, mtime = (info.size, int(info.saved * 1e9)) if info is not None else (0, self._started_ns)
            return Attributes(inode, stat.S_IFREG | 0o400, 1, size, mtime, TIMEOUT, TIMEOUT)
        assert entry.kind is EntryKind.IMAGE, entry
        image = self.catalog.volumes[entry.volume]
        return Attributes(  # a mirror's image is a version: the size of its LSN (resize)
            inode, stat.S_IFREG | (0o600 if entry.writable else 0o400), 1,
            image.size if entry.version is None else image.size_at(entry.version),
            self._mtime.get(entry.volume, self._started_ns),
            entry_timeout=TIMEOUT if entry.version is None else 0,  # a mirror: every open looks up the newest version
            attr_timeout=TIMEOUT)
