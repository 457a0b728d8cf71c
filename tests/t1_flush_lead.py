"""An application flush without a thread hop: the log's group commit led from the trio thread.

* :class:`~marsfs.log.kaio.FdatasyncAio` runs a real fdatasync as a kernel AIO request and
  reports its result; a request the kernel refuses raises and starts nothing.
* :meth:`Log.lead_sync` never blocks: the durable LSN when nothing is to be synced, None while
  another sync is in flight, else a lead that every other sync waits for until
  :meth:`Log.finish_sync`; a failed lead poisons the log as a failed fdatasync always did.
* :func:`~marsfs.node.syncmode.flush_here` makes everything written durable behind a FLUSH
  record, as ``Volume.flush`` in a thread does: through AIO, or through a thread when AIO is
  refused, a rotation is due or another sync is in flight; a failed fdatasync poisons the log
  and stands as the volume's flush fault; a cancelled flush still finishes the sync it led.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from pathlib import Path

import pytest
import trio

from marsfs.errors import LogFailed
from marsfs.log import (
    DEFAULT_SEGMENT_BYTES,
    HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Log,
    RecordType,
    SyncLead,
    encode_payload,
    genesis_chain,
)
from marsfs.log.kaio import FdatasyncAio
from marsfs.node.syncmode import flush_here
from marsfs.volume import Volume

DATA = os.urandom(4096)  # random: stored uncompressed


def _log(tmp_path: Path) -> Log:
    return Log.create(tmp_path / "log", genesis_chain("flush-lead"))


def _volume(tmp_path: Path, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> Volume:
    return Volume.create(tmp_path / "vol", "vol", 1 << 20, sync_interval=None, segment_bytes=segment_bytes)


def test_an_aio_fdatasync_completes_on_its_eventfd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    aio = FdatasyncAio()
    try:
        for i in range(3):  # the context is reused, one request at a time
            os.pwrite(fd, DATA, i * len(DATA))
            aio.submit(fd)
            assert aio.pending
            while (res := aio.reap()) is None:
                select.select([aio.fileno()], [], [], 10)
            assert res == 0 and not aio.pending
    finally:
        aio.close()
        os.close(fd)


def test_a_request_the_kernel_refuses_starts_nothing(tmp_path: Path) -> None:
    aio = FdatasyncAio()
    r, w = os.pipe()  # a pipe has no fsync: EINVAL, as a filesystem without one would say
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)  # a closed fd: EBADF
    try:
        for bad, code in ((r, errno.EINVAL), (fd, errno.EBADF)):
            with pytest.raises(OSError) as e:
                aio.submit(bad)
            assert e.value.errno == code and not aio.pending
    finally:
        aio.close()
        os.close(r)
        os.close(w)


def test_a_lead_holds_every_other_sync_until_it_finishes(tmp_path: Path) -> None:
    log = _log(tmp_path)
    assert log.lead_sync() == 0  # nothing appended: nothing to sync
    lsn = log.append(RecordType.WRITE, 0, encode_payload(DATA))
    lead = log.lead_sync()
    assert isinstance(lead, SyncLead) and lead.upto == lsn and lead.fd == log._segments[-1].fd
    assert log.lead_sync() is None, "a second leader while one syncs"
    log.append(RecordType.WRITE, 4096, encode_payload(DATA))
    done: list[int] = []
    waiter = threading.Thread(target=lambda: done.append(log.sync()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and log.durable_lsn == 0, "a thread's sync went past the lead in flight"
    os.fdatasync(lead.fd)
    assert log.finish_sync(lead, None) == lsn
    waiter.join(10)
    assert done == [2] and log.durable_lsn == 2 and log.lead_sync() == 2
    assert log.sync_latency.snapshot().count == 2
    log.close()


def test_a_failed_lead_poisons_the_log(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.append(RecordType.WRITE, 0, encode_payload(DATA))
    lead = log.lead_sync()
    assert isinstance(lead, SyncLead)
    with pytest.raises(LogFailed, match="fdatasync of the log failed"):
        log.finish_sync(lead, OSError(errno.EIO, os.strerror(errno.EIO)))
    assert log.failed is not None and log.durable_lsn == 0
    with pytest.raises(LogFailed):
        log.append(RecordType.WRITE, 0, encode_payload(DATA))
    with pytest.raises(LogFailed):
        log.lead_sync()
    log.close()


def _last_types(vol: Volume, n: int) -> list[RecordType]:
    return [r.type for r in vol.log.records(vol.log.last_lsn - n + 1)]


def test_flush_here_makes_the_writes_durable_behind_a_flush_record(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    vol = _volume(tmp_path)
    hops: list[object] = []
    real = trio.to_thread.run_sync

    async def counting(fn, *args, **kw):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)

    async def main() -> None:
        for i in range(3):
            vol.write(i * 4096, DATA)
            assert vol.needs_flush
            assert await flush_here(vol) == vol.head_lsn == vol.durable_lsn
            assert not vol.needs_flush
        assert await flush_here(vol) == vol.durable_lsn  # nothing new: no record, no sync

    trio.run(main)
    assert hops == [], "a flush went through a worker thread although AIO works"
    assert _last_types(vol, 2) == [RecordType.WRITE, RecordType.FLUSH] and vol.head_lsn == 6
    assert vol.fault("flush") is None
    vol.close()
    again = Volume.open(tmp_path / "vol", sync_interval=None)
    assert again.head_lsn == 6 and again.read(4096, 4096) == DATA
    again.close()


def test_without_aio_flush_here_uses_a_thread(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    vol.log.no_aio("test")
    assert vol.log.fdatasync_aio() is None

    async def main() -> None:
        vol.write(0, DATA)
        assert await flush_here(vol) == vol.head_lsn == vol.durable_lsn == 2

    trio.run(main)
    assert _last_types(vol, 1) == [RecordType.FLUSH]
    vol.close()


def test_a_flush_record_that_would_rotate_goes_to_a_thread(tmp_path: Path) -> None:
    """The FLUSH record would start a new segment (an fdatasync of the full one): not on the
    trio thread; the thread's flush then appends it after the rotation."""
    segment = SEGMENT_HEADER_SIZE + 3 * (HEADER_SIZE + len(DATA)) + HEADER_SIZE // 2
    vol = _volume(tmp_path, segment_bytes=segment)
    for i in range(3):
        vol.write(i * 4096, DATA)
    assert vol.flush_lead() is None and vol.needs_flush  # nothing appended yet

    async def main() -> None:
        assert await flush_here(vol) == vol.head_lsn == vol.durable_lsn == 4

    trio.run(main)
    assert len(vol.log._segments) == 2 and _last_types(vol, 1) == [RecordType.FLUSH]
    vol.close()


class _FailingAio:
    """An AIO context whose fdatasync fails with EIO (a disk error reported at the fsync)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def submit(self, fd: int) -> None:
        os.write(self.w, b"x")

    def reap(self, *, block: bool = False) -> int | None:
        return errno.EIO


def test_a_failed_aio_fdatasync_poisons_and_stands_as_the_flush_fault(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    vol.log._aio = _FailingAio()  # type: ignore[assignment]

    async def main() -> None:
        vol.write(0, DATA)
        with pytest.raises(LogFailed):
            await flush_here(vol)

    trio.run(main)
    assert vol.durable_lsn == 0 and vol.log.failed is not None and vol.needs_restart
    assert isinstance(vol.fault("flush"), LogFailed)
    with pytest.raises(LogFailed):
        vol.write(0, DATA)


def test_a_cancelled_flush_still_finishes_its_sync(tmp_path: Path) -> None:
    vol = _volume(tmp_path)

    async def main() -> None:
        vol.write(0, DATA)
        with trio.CancelScope() as scope:
            scope.cancel()
            await flush_here(vol)
        assert vol.durable_lsn == vol.head_lsn == 2 and vol.log.lead_sync() == 2

    trio.run(main)
    vol.close()


def test_a_sync_or_rotation_on_the_leaders_own_thread_finishes_its_aio_fdatasync(tmp_path: Path) -> None:
    """The trio thread leads an AIO fdatasync, then (another task) appends a small write that
    has to rotate, or syncs: waiting for the sync in flight on a condition would wait for
    itself. It waits for the AIO request instead and finishes the lead; the leader then finds
    it done."""
    segment = SEGMENT_HEADER_SIZE + 2 * (HEADER_SIZE + len(DATA)) + 2 * HEADER_SIZE  # W F W F
    vol = _volume(tmp_path, segment_bytes=segment)
    log = vol.log
    vol.write(0, DATA)
    lead = vol.flush_lead()
    assert isinstance(lead, SyncLead) and lead.upto == 2
    assert log.start_sync_aio(lead) is not None
    assert log.sync() == 2  # the same thread: no deadlock
    assert vol.flush_poll(lead) == 2 and log.lead_sync() == 2
    vol.write(4096, DATA)
    lead = vol.flush_lead()
    assert isinstance(lead, SyncLead) and log.start_sync_aio(lead) is not None
    vol.write(8192, DATA)  # does not fit: the rotation waits for the lead's fdatasync, here
    assert len(log._segments) == 2 and log.durable_lsn >= 4
    assert vol.flush_poll(lead) == 4
    vol.close()


def test_flushes_beside_a_thread_that_syncs_all_the_time_all_return(tmp_path: Path) -> None:
    """The autosync thread (or a rotation, or close) meets the trio thread's AIO lead in flight
    and waits for it on the condition: the trio task parked on the eventfd must still wake and
    finish it (a blocking reap by the other thread drained the eventfd once, and the flush
    never returned)."""
    vol = _volume(tmp_path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def syncer() -> None:
        while not stop.is_set():
            try:
                vol.log.sync()
            except BaseException as e:
                errors.append(e)
                return

    async def main() -> None:
        for i in range(3000):
            vol.write((i % 64) * 4096, DATA)
            assert await flush_here(vol) >= vol.head_lsn

    t = threading.Thread(target=syncer, daemon=True)
    t.start()
    flusher = threading.Thread(target=trio.run, args=(main,), daemon=True)
    flusher.start()
    flusher.join(120)
    stop.set()
    t.join(10)
    assert not flusher.is_alive(), "a flush never returned"
    assert not errors and vol.durable_lsn == vol.head_lsn
    vol.close()
