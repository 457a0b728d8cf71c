"""The mounted tree as plain data: names, inodes per version, the kernel's lookup counts, FORGET."""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from marsfs.errors import VersionNotFound
from marsfs.faces.namespace import ROOT_INODE, TIMEOUT, EntryKind, Namespace
from marsfs.volume import VersionInfo
from marsfs.volume.splits import SplitInfo


@dataclass
class FakeVolume:
    """An :class:`~marsfs.faces.namespace.Image` of one size that retains no versions."""

    size: int
    replayed_lsn: int = 0

    def size_at(self, lsn: int) -> int:
        return self.size

    def find_version(self, spec: str) -> int:
        raise VersionNotFound(spec)

    def version_listing(self) -> list[VersionInfo]:
        return []

    def version_timestamp_ns(self, lsn: int) -> int:
        return 0

    def splits(self) -> list[SplitInfo]:
        return []


@dataclass
class FakeNode:
    volumes: dict[str, FakeVolume] = field(default_factory=dict)
    mirrors: set[str] = field(default_factory=set)

    def is_mirror(self, name: str) -> bool:
        return name in self.mirrors


def make() -> tuple[FakeNode, Namespace]:
    node = FakeNode({"a": FakeVolume(1 << 20), "b": FakeVolume(2 << 20, replayed_lsn=5)}, {"b"})
    return node, Namespace(node, now_ns=1000)


def test_lookup_names_and_attributes() -> None:
    _, ns = make()
    a = ns.lookup(ROOT_INODE, "a.img")
    assert a is not None and a.inode != ROOT_INODE
    assert stat.S_ISREG(a.mode) and a.mode & 0o777 == 0o600 and a.size == 1 << 20 and a.blocks == 2048
    assert (a.entry_timeout, a.attr_timeout, a.mtime_ns, a.nlink) == (TIMEOUT, TIMEOUT, 1000, 1)
    assert ns.lookup(ROOT_INODE, "a.img") == a  # the live image keeps its inode
    for missing in ("a", "c.img", "a.img.img", ".img", "a.IMG"):
        assert ns.lookup(ROOT_INODE, missing) is None
    assert ns.lookup(a.inode, "a.img") is None  # only the root has entries
    root = ns.lookup(ROOT_INODE, ".")
    assert root is not None and root.inode == ROOT_INODE and stat.S_ISDIR(root.mode) and root.nlink == 2
    assert ns.lookups(ROOT_INODE) == 0  # "." and ".." are not counted
    entry = ns.entry(a.inode)
    assert entry is not None and entry.kind is EntryKind.IMAGE and entry.volume == "a" and entry.writable
    assert ns.entry(9999) is None and ns.attributes(9999) is None


def test_mirror_lookups_resolve_to_the_current_version() -> None:
    node, ns = make()
    v5 = ns.lookup(ROOT_INODE, "b.img")
    assert v5 is not None and v5.mode & 0o777 == 0o400 and v5.entry_timeout == 0 and v5.attr_timeout == TIMEOUT
    entry = ns.entry(v5.inode)
    assert entry is not None and entry.version == 5 and not entry.writable
    assert ns.lookup(ROOT_INODE, "b.img") == v5  # same version: same inode
    node.volumes["b"].replayed_lsn = 9  # replay went on
    v9 = ns.lookup(ROOT_INODE, "b.img")
    assert v9 is not None and v9.inode != v5.inode
    assert ns.entry(v5.inode) is not None  # the old version stays while the kernel holds it
    node.volumes["b"].replayed_lsn = 5
    again = ns.lookup(ROOT_INODE, "b.img")
    assert again is not None and again.inode == v5.inode  # a version still known keeps its inode


def test_forget_frees_version_inodes_only_at_zero() -> None:
    node, ns = make()
    v5 = ns.lookup(ROOT_INODE, "b.img")
    assert v5 is not None
    ns.lookup(ROOT_INODE, "b.img")
    assert ns.lookups(v5.inode) == 2
    node.volumes["b"].replayed_lsn = 6
    ns.forget([(v5.inode, 1)])
    assert ns.entry(v5.inode) is not None and ns.lookups(v5.inode) == 1
    ns.forget([(v5.inode, 1)])
    assert ns.entry(v5.inode) is None and ns.lookups(v5.inode) == 0
    node.volumes["b"].replayed_lsn = 5
    fresh = ns.lookup(ROOT_INODE, "b.img")
    assert fresh is not None and fresh.inode != v5.inode  # freed inodes are never reused


def test_asynchronous_forget_after_a_relookup_does_not_free() -> None:
    _, ns = make()
    first = ns.lookup(ROOT_INODE, "b.img")
    assert first is not None
    # The kernel drops its reference and looks the name up again; its FORGET for the first
    # reference arrives only after the second lookup was answered.
    second = ns.lookup(ROOT_INODE, "b.img")
    assert second is not None and second.inode == first.inode
    ns.forget([(first.inode, 1)])
    assert ns.entry(first.inode) is not None and ns.lookups(first.inode) == 1
    assert ns.attributes(first.inode) == second


def test_forget_never_frees_the_live_image_or_the_root() -> None:
    _, ns = make()
    a = ns.lookup(ROOT_INODE, "a.img")
    assert a is not None
    ns.forget([(a.inode, 1), (ROOT_INODE, 1)])
    assert ns.entry(a.inode) is not None and ns.entry(ROOT_INODE) is not None
    again = ns.lookup(ROOT_INODE, "a.img")
    assert again is not None and again.inode == a.inode


def test_forget_volume() -> None:
    node, ns = make()
    a = ns.lookup(ROOT_INODE, "a.img")
    b = ns.lookup(ROOT_INODE, "b.img")
    assert a is not None and b is not None
    ns.touch("a", 7)
    del node.volumes["a"]
    assert ns.entry(a.inode) is None and ns.lookup(ROOT_INODE, "a.img") is None  # gone at once, by name too
    assert ns.forget_volume("a") == "a.img"
    node.volumes["a"] = FakeVolume(4096)  # a new volume of the same name
    new = ns.lookup(ROOT_INODE, "a.img")
    assert new is not None and new.inode != a.inode and new.size == 4096 and new.mtime_ns == 1000
    ns.forget([(a.inode, 1)])  # the kernel's late FORGET of the old inode changes nothing
    assert ns.entry(new.inode) is not None and ns.entry(b.inode) is not None


def test_listing_and_readdir() -> None:
    node, ns = make()
    node.volumes["0"] = FakeVolume(512)
    assert ns.listing() == ["0", "a", "b"]
    entries = list(ns.readdir(0))
    assert [(d.name, d.next_id) for d in entries] == [("0.img", 1), ("a.img", 2), ("b.img", 3)]
    assert [d.name for d in ns.readdir(2)] == ["b.img"] and list(ns.readdir(3)) == []
    assert all(ns.lookups(d.attrs.inode) == 0 for d in entries)  # counted only once the kernel took it
    ns.counted(entries[2].attrs.inode)
    assert ns.lookups(entries[2].attrs.inode) == 1
    lookup = ns.lookup(ROOT_INODE, "b.img")
    assert lookup is not None and lookup.inode == entries[2].attrs.inode  # readdir and lookup agree


def test_mtime() -> None:
    _, ns = make()
    a = ns.lookup(ROOT_INODE, "a.img")
    assert a is not None
    ns.touch("a", 5000)
    got = ns.attributes(a.inode)
    assert got is not None and got.mtime_ns == 5000
    ns.touch("a")
    got = ns.attributes(a.inode)
    assert got is not None and got.mtime_ns > 5000
