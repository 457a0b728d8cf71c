"""verify over the real Server in one process (memory streams, MockClock, real Volumes).

* A mirror compares at its own current version, a primary at its mirror's; identical images
  are identical while the primary goes on writing (version-exact: no false positives).
* Blocks corrupted directly in a mirror's base image are reported exactly, chunk after chunk.
* Refusals: a version the primary no longer retains (on either side of the conversation), a
  volume of the same name that is another volume, and requests a server must not answer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from marsfs.aio import single_error
from marsfs.errors import PeerError, ProtocolError, VersionNotFound
from marsfs.replication import verify
from marsfs.replication.channel import ConnectionLost
from marsfs.replication.fetch import hello, open_channel
from marsfs.replication.protocol import Error, Sums, SumsRequest
from marsfs.replication.server import PeerTable, Server
from marsfs.replication.verify import VerifyProgress, verify_with
from marsfs.testing.memnet import CLUSTER, SIZE, Link, copy_image, primary, server_for, write
from marsfs.testing.runner import run as run_mock
from marsfs.volume import Volume
from marsfs.volume.blocksums import BLOCK


def run(fn: Callable[[], Awaitable[None]]) -> None:
    """Under the MockClock, which never jumps while a worker thread runs: these tests wait for
    nothing but worker threads (sums, writes), which a loaded machine makes slow, not wrong."""
    run_mock(fn, limit=120.0)


def served(vol: Volume, node: str) -> Server:
    return Server(node, CLUSTER, lambda name: vol if name == vol.name else None, lambda name: 3, PeerTable())


def mirror_of(a: Volume, tmp_path: Path) -> Volume:
    """A mirror of ``a`` at ``a``'s durable LSN, built by the real image copy."""
    async def main() -> Volume:
        async with trio.open_nursery() as nursery:
            b = await copy_image(Link(nursery, server_for(a).handle), tmp_path / "b" / "vm")
            nursery.cancel_scope.cancel()
        return b

    out: list[Volume] = []

    async def keep() -> None:
        out.append(await main())

    run(keep)
    return out[0]


def compare(vol: Volume, server: Server, *, mine: bool, peer: str = "a") -> verify.VerifyResult:
    """Run verify_with over a memory link to ``server``; checks the progress it reported."""
    out: list[verify.VerifyResult] = []
    progress = VerifyProgress(peer=peer)

    async def main() -> None:
        with single_error():
            async with trio.open_nursery() as nursery:
                link = Link(nursery, server.handle)
                out.append(await verify_with(vol, "b" if mine else "a", CLUSTER, peer, link.connect, mine=mine,
                                             progress=progress))
                nursery.cancel_scope.cancel()

    run(main)
    assert progress.done == progress.size == out[0].size and progress.lsn == out[0].lsn
    return out[0]


def test_identical_images_at_the_mirrors_version_while_the_primary_writes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "VERIFY_CHUNK", 1024 * 1024)  # several chunks
    a = primary(tmp_path)
    b = mirror_of(a, tmp_path)
    try:
        lsn = b.replayed_lsn
        for seed in range(2, 6):  # the primary moves on: the mirror's version is what is compared
            write(a, seed, 30)
        r = compare(b, served(a, "a"), mine=True)
        assert r.identical and r.lsn == lsn < a.head_lsn and r.size == r.compared == SIZE
        r = compare(a, served(b, "b"), mine=False, peer="b")  # the primary asks the mirror for its version
        assert r.identical and r.lsn == lsn and r.node == "a" and r.peer == "b"
        assert a.read(0, SIZE) != b.read(0, SIZE)  # yet the images differ now: no false positive
    finally:
        a.close()
        b.close()


def test_concurrent_writes_never_show_as_differences(tmp_path: Path) -> None:
    a = primary(tmp_path)
    b = mirror_of(a, tmp_path)
    server = served(a, "a")
    found: list[verify.VerifyResult] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, server.handle)

            async def writer() -> None:
                for seed in range(10, 40):
                    await trio.to_thread.run_sync(write, a, seed, 8)

            nursery.start_soon(writer)
            for _ in range(5):
                found.append(await verify_with(b, "b", CLUSTER, "a", link.connect, mine=True,
                                               progress=VerifyProgress(peer="a")))
            nursery.cancel_scope.cancel()

    try:
        run(main)
        assert all(r.identical for r in found)
    finally:
        a.close()
        b.close()


def test_blocks_corrupted_in_the_mirrors_base_are_reported_exactly(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "VERIFY_CHUNK", 1024 * 1024)
    a = primary(tmp_path)
    b = mirror_of(a, tmp_path)
    try:
        rng = random.Random(7)
        blocks = sorted(rng.sample(range(SIZE // BLOCK), 4))
        fd = os.open(b.path / "base.img", os.O_WRONLY)
        try:
            for blk in blocks:
                os.pwrite(fd, rng.randbytes(BLOCK), blk * BLOCK)
        finally:
            os.close(fd)
        want = [(blk * BLOCK, BLOCK) for blk in blocks]
        r = compare(b, served(a, "a"), mine=True)
        assert r.differences == want and not r.identical
        r = compare(a, served(b, "b"), mine=False, peer="b")
        assert r.differences == want
        assert r.to_json()["differences"] == [{"offset": o, "length": n} for o, n in want]
    finally:
        a.close()
        b.close()


def test_a_version_the_primary_no_longer_retains_is_refused_on_both_sides(tmp_path: Path) -> None:
    a = primary(tmp_path)
    b = mirror_of(a, tmp_path)
    try:
        write(a, 9, 10)
        a.writeback(max_bytes=None)  # the mirror's version is gone from the primary
        with pytest.raises(VersionNotFound, match=rf"^a no longer retains lsn-{b.replayed_lsn} of vm, the version b "
                                                  rf"has \(oldest here: lsn-{a.applied_lsn}\).*marsfs history vm"):
            compare(a, served(b, "b"), mine=False, peer="b")
        with pytest.raises(PeerError, match=rf"a refused to verify vm: a no longer retains lsn-{b.replayed_lsn} "
                                            rf"of vm \(it has lsn-{a.applied_lsn} to lsn-{a.head_lsn}\)"):
            compare(b, served(a, "a"), mine=True)
    finally:
        a.close()
        b.close()


def test_another_volume_of_the_same_name_is_not_compared(tmp_path: Path) -> None:
    a = primary(tmp_path)
    other = Volume.create(tmp_path / "x" / "vm", "vm", SIZE, sync_interval=None)
    try:
        with pytest.raises(PeerError, match="is another volume than this node's"):
            compare(other, served(a, "a"), mine=True)
        with pytest.raises(PeerError, match="a refused to verify vm: node a has no volume 'vm'"):
            compare(other, Server("a", CLUSTER, lambda name: None, lambda name: 0, PeerTable()), mine=True)
    finally:
        a.close()
        other.close()


def test_server_refuses_ranges_outside_the_image_and_a_second_version(tmp_path: Path) -> None:
    a = primary(tmp_path)
    server = served(a, "a")
    lsn = a.head_lsn

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            link = Link(nursery, server.handle)
            ch, _ = await open_channel(link.connect, hello("b", CLUSTER, "vm", "sums"))
            await ch.send_message(SumsRequest(lsn=0, offset=SIZE - BLOCK, length=10 * BLOCK))
            got = await ch.receive_message()
            assert isinstance(got, Sums) and got.lsn == lsn and got.size == SIZE and len(got.sums) == 8
            await ch.send_message(SumsRequest(lsn=lsn, offset=SIZE, length=BLOCK))
            refused = await ch.receive_message()
            assert isinstance(refused, Error) and refused.code == "out-of-range"
            await ch.aclose()
            ch, _ = await open_channel(link.connect, hello("b", CLUSTER, "vm", "sums"))
            await ch.send_message(SumsRequest(lsn=lsn, offset=0, length=BLOCK))
            assert isinstance(await ch.receive_message(), Sums)
            assert a.open_versions.views(lsn) == 1  # pinned while the connection lasts
            await ch.send_message(SumsRequest(lsn=lsn - 1, offset=0, length=BLOCK))
            with pytest.raises(ConnectionLost):  # the server hangs up on a protocol error
                await ch.receive_message()
            await ch.aclose()
            await trio.sleep(0.1)
            assert not a.open_versions  # and unpinned when it ends
            nursery.cancel_scope.cancel()

    try:
        run(main)
    finally:
        a.close()


def test_pure_serving_rules() -> None:
    req = SumsRequest(lsn=0, offset=0, length=BLOCK)
    assert verify.pick_version(req, 3, 9, "a", "vm") == 9
    assert verify.pick_version(SumsRequest(lsn=5, offset=0, length=1), 3, 9, "a", "vm") == 5
    too_new = verify.pick_version(SumsRequest(lsn=10, offset=0, length=1), 3, 9, "a", "vm")
    assert isinstance(too_new, Error) and "a has not replayed lsn-10 of vm" in too_new.error
    assert verify.sums_span(SumsRequest(lsn=9, offset=BLOCK, length=10 * BLOCK), 9, 3 * BLOCK + 5) == (BLOCK, 2 * BLOCK + 5)
    unaligned = verify.sums_span(SumsRequest(lsn=9, offset=5, length=BLOCK), 9, SIZE)
    assert isinstance(unaligned, Error) and unaligned.code == "out-of-range"
    with pytest.raises(ProtocolError, match="is not the version this connection pinned"):
        verify.sums_span(SumsRequest(lsn=8, offset=0, length=BLOCK), 9, SIZE)
