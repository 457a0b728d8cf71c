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
* A signal that interrupts the leader's own blocking wait for its AIO fdatasync does not end
  it; a wait that fails for good poisons the log, and the flush never counts that fdatasync as
  done. A lead its own thread finished keeps the eventfd to itself until its task claims it.
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


@pytest.mark.allow_log("the kernel refused AIO for fdatasync")
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


@pytest.mark.allow_log("the kernel refused AIO for fdatasync")
def test_a_kernel_without_aio_is_said_once_and_flushes_go_on_in_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No AIO syscalls (another architecture, a seccomp filter): the log falls back to threads
    for good, and says so once, not at every fsync and not never."""
    def refuse() -> None:
        raise OSError(errno.ENOSYS, "no AIO syscall numbers for this machine")

    monkeypatch.setattr("marsfs.log.log.FdatasyncAio", refuse)
    vol = _volume(tmp_path)
    assert vol.log.aio_refused == ""
    with caplog.at_level("WARNING", logger="marsfs.log.log"):
        async def main() -> None:
            for i in range(3):
                vol.write(i * 4096, DATA)
                assert await flush_here(vol) == vol.head_lsn == vol.durable_lsn

        trio.run(main)
    assert vol.log.fdatasync_aio() is None
    assert vol.log.aio_refused == "no AIO syscall numbers for this machine"
    said = [r for r in caplog.records if "refused AIO" in r.getMessage()]
    assert len(said) == 1 and "no AIO syscall numbers" in said[0].getMessage()
    vol.close()


@pytest.mark.allow_log("the kernel refused AIO for fdatasync")
def test_a_refused_io_submit_falls_back_for_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vol = _volume(tmp_path)
    aio = vol.log.fdatasync_aio()
    assert aio is not None

    def submit(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    aio.submit = submit  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="marsfs.log.log"):
        async def main() -> None:
            for i in range(2):
                vol.write(i * 4096, DATA)
                assert await flush_here(vol) == vol.head_lsn == vol.durable_lsn

        trio.run(main)
    assert vol.log.aio_refused == "io_submit: Invalid argument"
    assert len([r for r in caplog.records if "refused AIO" in r.getMessage()]) == 1
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


def _interrupt_first_blocking_wait(aio: FdatasyncAio, monkeypatch: pytest.MonkeyPatch,
                                   err: OSError) -> list[int]:
    """Make the first blocking io_getevents of ``aio`` fail with ``err`` (before the kernel
    is asked); returns the list that counts how often that happened."""
    real = aio._call
    hits: list[int] = []

    def call(number: int, *args: object) -> int:
        if number == aio._getevents and args[-1] is None and not hits:
            hits.append(number)
            raise err
        return real(number, *args)

    monkeypatch.setattr(aio, "_call", call)
    return hits


def _own_thread_rotation(tmp_path: Path) -> tuple[Volume, SyncLead]:
    """An AIO lead in flight on this thread, then a write that must rotate (so this thread
    waits for its own request, blocking)."""
    segment = SEGMENT_HEADER_SIZE + (HEADER_SIZE + len(DATA)) + HEADER_SIZE + HEADER_SIZE // 2  # W F
    vol = _volume(tmp_path, segment_bytes=segment)
    vol.write(0, DATA)
    lead = vol.flush_lead()
    assert isinstance(lead, SyncLead) and lead.upto == 2
    assert vol.log.start_sync_aio(lead) is not None
    return vol, lead


def test_a_signal_during_the_leaders_own_wait_does_not_end_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """io_getevents fails with EINTR when a signal arrives (the trio thread gets the daemon's
    signals) and the kernel never restarts it: the request is still in flight, so the wait
    goes on; it must neither raise out of the rotation nor leave the lead half finished."""
    vol, lead = _own_thread_rotation(tmp_path)
    assert vol.log._aio is not None
    hits = _interrupt_first_blocking_wait(vol.log._aio, monkeypatch, InterruptedError(errno.EINTR, "signal"))
    vol.write(4096, DATA)  # does not fit: rotates, waiting for its own AIO fdatasync here
    assert hits and len(vol.log._segments) == 2 and vol.log.durable_lsn == 2
    assert vol.flush_poll(lead) == 2 and vol.log.failed is None
    vol.close()


def test_a_failed_wait_for_the_leaders_own_aio_fdatasync_poisons(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for the request fails for good (its outcome unknown): as a failed fdatasync, the
    log is poisoned and the flush that led it fails; it never reports the records durable."""
    vol, lead = _own_thread_rotation(tmp_path)
    assert vol.log._aio is not None
    _interrupt_first_blocking_wait(vol.log._aio, monkeypatch, OSError(errno.EINVAL, "io_getevents"))
    with pytest.raises(LogFailed):
        vol.write(4096, DATA)
    assert vol.log.durable_lsn == 0 and vol.log.failed is not None
    with pytest.raises(LogFailed):
        vol.flush_poll(lead)


def test_a_failed_look_at_the_aio_fdatasync_poisons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trio thread's non-blocking look at its request fails (outcome unknown): the log is
    poisoned and the lead finished, so no later sync, rotation or close waits for it for ever."""
    vol = _volume(tmp_path)
    vol.write(0, DATA)
    lead = vol.flush_lead()
    assert isinstance(lead, SyncLead) and vol.log.start_sync_aio(lead) is not None
    aio = vol.log._aio
    assert aio is not None
    real = aio._call

    def call(number: int, *args: object) -> int:
        if number == aio._getevents:
            raise OSError(errno.EINVAL, "io_getevents")
        return real(number, *args)

    monkeypatch.setattr(aio, "_call", call)
    select.select([aio.fileno()], [], [], 30)
    with pytest.raises(LogFailed):
        vol.flush_poll(lead)
    assert vol.log.failed is not None and vol.log.durable_lsn == 0 and not vol.log._syncing
    monkeypatch.undo()
    vol.log.close()  # waits for no sync (the volume's close refuses a poisoned log)


def test_no_new_aio_request_until_the_leader_claims_what_its_thread_finished(tmp_path: Path) -> None:
    """The trio thread finished its own AIO lead in a rotation and left the parked task a
    wake-up on the eventfd. A new request on the same eventfd before that task looked would
    let the new one's poll drain the wake-up (the parked fsync would never return) or have two
    tasks wait on one fd: the next lead goes to a thread until the first is claimed."""
    vol, lead = _own_thread_rotation(tmp_path)
    log = vol.log
    vol.write(4096, DATA)  # does not fit: rotates, finishing the AIO lead on this thread
    assert log.durable_lsn == 2
    aio = log.fdatasync_aio()
    assert aio is not None
    assert select.select([aio], [], [], 0)[0]  # the parked task's wake-up
    second = vol.flush_lead()
    assert isinstance(second, SyncLead)
    assert log.start_sync_aio(second) is None  # not on that eventfd yet
    assert vol.flush_complete(second) >= 3
    claimed = vol.flush_poll(lead)  # the first task claims its lead and its wake-up
    assert claimed is not None and claimed >= 2
    assert not select.select([aio], [], [], 0)[0]
    vol.write(8192, DATA)
    third = vol.flush_lead()
    assert isinstance(third, SyncLead) and log.start_sync_aio(third) is not None  # AIO again
    while (lsn := vol.flush_poll(third)) is None:
        select.select([aio], [], [], 5)
    assert lsn == third.upto and log.failed is None
    vol.close()
