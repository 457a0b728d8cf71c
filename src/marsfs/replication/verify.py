"""Online verify: compare two nodes' images of a volume at one version by block checksums.

Rules that hold here:

* A comparison is *version-exact*: both sides read a pinned view of the same LSN *L*, so a
  write in flight on the primary can never show up as a difference (no false positives),
  and a difference found is a real one in the image of *L* on one of the nodes.
* Who picks *L*: on a mirror, the mirror (its current version, pinned before it asks); on a
  primary, the mirror it compares with (its current version, which the primary must still
  retain: else :class:`VersionNotFound` naming the oldest version here and the ``--history``
  that would keep it). The first SUMS_REQUEST of a connection names *L* (or 0, "your
  current"), and the server keeps that version pinned until the connection ends.
* The image is compared in chunks of :data:`VERIFY_CHUNK` bytes, so progress shows and the
  sums of one chunk (8 bytes per 4 KiB block: 512 KiB for 256 MiB) bound the memory. The
  local sums of a chunk are computed in a worker thread while the peer computes its own.
* The server's side (:func:`pick_version`, :func:`sums_span`) is pure: which version a request
  pins and which range it gets, or the ERROR that refuses it (``version-not-retained``,
  ``out-of-range``). ``server`` does the I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from marsfs.aio import describe
from marsfs.errors import MarsError, PeerError, ProtocolError, VersionNotFound
from marsfs.replication.channel import Channel, ConnectionLost, PeerRefused
from marsfs.replication.fetch import Connect, hello, open_channel
from marsfs.replication.protocol import MAX_SUMS_SPAN, Error, Sums, SumsRequest
from marsfs.volume import Volume, VolumeView
from marsfs.volume.blocksums import BLOCK, SUM_SIZE, block_ranges, block_sums, differing_blocks

logger = logging.getLogger(__name__)

__all__ = ["VERIFY_CHUNK", "VerifyProgress", "VerifyResult", "pick_version", "sums_span", "verify_with"]

VERIFY_CHUNK = 256 * 1024 * 1024
assert VERIFY_CHUNK <= MAX_SUMS_SPAN and VERIFY_CHUNK % BLOCK == 0


# ---------------------------------------------------------------------------- serving side (pure)


def pick_version(req: SumsRequest, oldest: int, current: int, node: str, volume: str) -> int | Error:
    """The version the first SUMS_REQUEST of a connection pins: the one it names, or (0) the
    current one; an ERROR when this node does not hold it (any more, or yet)."""
    lsn = req.lsn or current
    if oldest <= lsn <= current:
        return lsn
    why = "no longer retains" if lsn < oldest else "has not replayed"
    return Error(code="version-not-retained",
                 error=f"{node} {why} lsn-{lsn} of {volume} (it has lsn-{oldest} to lsn-{current})")


def sums_span(req: SumsRequest, pinned: int, size: int) -> tuple[int, int] | Error:
    """``(offset, length)`` of the blocks a request of the pinned version gets (clipped to the
    version's ``size``), or the ERROR refusing it. A request naming another version than the
    one pinned is a protocol error: one connection compares one version."""
    if req.lsn not in (0, pinned):
        raise ProtocolError(f"SUMS_REQUEST: field 'lsn' {req.lsn} is not the version this connection "
                            f"pinned (lsn-{pinned})")
    if req.offset % BLOCK or req.length > MAX_SUMS_SPAN or (req.offset >= size and req.offset):
        return Error(code="out-of-range",
                     error=f"sums of {req.length} bytes at {req.offset} of an image of {size} bytes: ask for "
                           f"4 KiB-aligned ranges inside the image, at most {MAX_SUMS_SPAN} bytes each")
    return req.offset, min(req.length, size - req.offset)


# ---------------------------------------------------------------------------- comparing side


@dataclass
class VerifyProgress:
    """How far one comparison got (read by status and the command line while it runs)."""

    peer: str
    lsn: int = 0  #: the version compared (0 until known)
    size: int = 0  #: bytes to compare (0 until known)
    done: int = 0  #: bytes compared so far


@dataclass
class VerifyResult:
    """The outcome of one comparison: ``differences`` are (offset, length) byte ranges."""

    volume: str
    node: str
    peer: str
    lsn: int
    size: int
    compared: int
    differences: list[tuple[int, int]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {"volume": self.volume, "node": self.node, "peer": self.peer, "lsn": self.lsn, "size": self.size,
                "compared_bytes": self.compared, "identical": self.identical,
                "differences": [{"offset": o, "length": n} for o, n in self.differences]}


async def verify_with(vol: Volume, node: str, cluster: str, peer: str, connect: Connect, *, mine: bool,
                      progress: VerifyProgress, node_id: str = "") -> VerifyResult:
    """Compare ``vol`` here with the same volume on ``peer``. ``mine``: the version is this
    node's current one (a mirror); else the peer's current one (a primary asks a mirror).

    Raises :class:`PeerError` when the peer cannot be reached or refuses, and
    :class:`VersionNotFound` when this node no longer holds the peer's version."""
    cmp = _Comparison(vol, node, peer, progress)
    try:
        if mine:
            await cmp.pin(vol.replayed_lsn)
        try:
            ch, welcome = await open_channel(connect, hello(node, cluster, vol.name, "sums", node_id=node_id))
        except PeerRefused as e:
            raise PeerError(f"{peer} refused to verify {vol.name}: {e.message}") from None
        except (OSError, ConnectionLost, trio.TooSlowError) as e:
            raise PeerError(f"cannot reach peer {peer} to verify {vol.name}: {describe(e)}; "
                            "is its daemon running with --listen?") from None
        try:
            if welcome.uuid != vol.uuid:
                raise PeerError(f"{peer}'s volume {vol.name} is another volume than this node's (uuid "
                                f"{welcome.uuid} there, {vol.uuid} here): there is nothing to compare")
            return await cmp.run(ch)
        except ConnectionLost as e:
            raise PeerError(f"the connection to {peer} broke while verifying {vol.name}: {describe(e)}; "
                            "run marsfs verify again") from None
        finally:
            await ch.aclose()
    finally:
        if cmp.view is not None:
            cmp.view.close()


class _Comparison:
    """One comparison's local side: the pinned view, the chunks, the differences found."""

    def __init__(self, vol: Volume, node: str, peer: str, progress: VerifyProgress) -> None:
        self.vol, self.node, self.peer, self.progress = vol, node, peer, progress
        self.view: VolumeView | None = None

    async def pin(self, lsn: int) -> VolumeView:
        try:
            self.view = await trio.to_thread.run_sync(self.vol.view, lsn)
        except VersionNotFound:
            name, node, peer = self.vol.name, self.node, self.peer
            raise VersionNotFound(
                f"{node} no longer retains lsn-{lsn} of {name}, the version {peer} has (oldest here: "
                f"lsn-{self.vol.oldest_version_lsn}): let {peer} catch up and verify again, or keep more "
                f"history on {node} (marsfs history {name} SIZE, or serve --history)") from None
        return self.view

    async def _mine(self, offset: int) -> bytes:
        view = self.view
        assert view is not None
        return await trio.to_thread.run_sync(block_sums, view.read, offset, min(VERIFY_CHUNK, view.size - offset))

    async def run(self, ch: Channel) -> VerifyResult:
        vol, peer = self.vol, self.peer
        lsn = self.view.lsn if self.view is not None else 0
        offset = 0
        diffs: list[tuple[int, int]] = []
        while True:
            await ch.send_message(SumsRequest(lsn=lsn, offset=offset, length=VERIFY_CHUNK))
            # our sums of the chunk while the peer computes its own (a primary learns the
            # version from the mirror's first answer, and only then can start)
            mine = await self._mine(offset) if self.view is not None else None
            theirs = await _receive_sums(ch, peer, vol.name, lsn, offset)
            if mine is None:
                lsn = theirs.lsn
                await self.pin(lsn)
                mine = await self._mine(offset)
            assert self.view is not None
            size = self.view.size
            if theirs.size != size:
                raise MarsError(f"{vol.name} is {size} bytes at lsn-{lsn} on {self.node} but {theirs.size} "
                                f"bytes on {peer}: the histories differ (see marsfs status {vol.name} on both)")
            if len(theirs.sums) != len(mine):
                raise ProtocolError(f"SUMS: {len(theirs.sums) // SUM_SIZE} sums where "
                                    f"{len(mine) // SUM_SIZE} were asked for")
            diffs += block_ranges(differing_blocks(mine, theirs.sums), offset, size)
            offset += VERIFY_CHUNK
            self.progress.lsn, self.progress.size, self.progress.done = lsn, size, min(offset, size)
            if offset >= size:
                return VerifyResult(volume=vol.name, node=self.node, peer=peer, lsn=lsn, size=size,
                                    compared=size, differences=_merge(diffs))


async def _receive_sums(ch: Channel, peer: str, volume: str, lsn: int, offset: int) -> Sums:
    msg = await ch.receive_message()
    if isinstance(msg, Error):
        raise PeerError(f"{peer} refused to verify {volume}: {msg.error}")
    if not isinstance(msg, Sums):
        raise ProtocolError(f"{msg.TYPE.name} where SUMS was expected")
    if (lsn and msg.lsn != lsn) or msg.offset != offset:
        raise ProtocolError(f"SUMS of lsn-{msg.lsn} at {msg.offset} where lsn-{lsn} at {offset} was asked for")
    return msg


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join ranges that touch across a chunk boundary."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out
