"""The one append path of the log (Log._append_locked) through each of its front ends.

* A failed write (ENOSPC, EDQUOT, a short write) in ``append``, ``append_many`` or
  ``append_raw`` leaves the log exactly as before the call: same last LSN and chain, same end
  bytes and file sizes, it accepts the next append, and it reopens clean. It raises NoSpace;
  another OSError raises LogFailed without poisoning; a failed undo poisons.
* ``append_many`` over several segments writes one ``pwritev`` per segment; a failure in a
  later segment keeps the records of the earlier ones (Volume.write indexes them).
* Rotation inside ``append_many`` and ``append_raw``; ``append_raw`` keeps the bytes.
* A full disk while starting a new segment leaves the old one active and writable.

Failures are injected by monkeypatching ``os.pwritev``, ``os.ftruncate`` and ``os.write`` for
the duration of one call; every log is a real directory in ``tmp_path``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import xxhash

from marsfs.errors import LogFailed, NoSpace, RecordRefused
from marsfs.log import HEADER_SIZE, SEGMENT_HEADER_SIZE, Log, Payload, RecordType, encode_payload, genesis_chain
from marsfs.log import record as rec
from marsfs.volume import Volume

GENESIS = genesis_chain("test-append")
SEGMENT_BYTES = 16 * 1024
RECORD = 4096  # logical bytes of the test records; random, so stored uncompressed


def _files(log: Log) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(log.path.iterdir())}


def _state(log: Log) -> tuple[int, bytes, int, dict[str, int], dict[int, str]]:
    return log.last_lsn, log.last_chain, log.end_bytes, _files(log), log.marks


def _payloads(n: int, size: int = RECORD) -> list[tuple[int, Payload]]:
    return [(i * size, encode_payload(os.urandom(size))) for i in range(n)]


def _new_log(tmp_path: Path, records: int = 2, segment_bytes: int = SEGMENT_BYTES) -> Log:
    log = Log.create(tmp_path / "log", GENESIS, segment_bytes=segment_bytes)
    for offset, payload in _payloads(records):
        log.append(RecordType.WRITE, offset, payload)
    return log


def _reopen_same(log: Log, state: tuple[int, bytes, int, dict[str, int], dict[int, str]]) -> None:
    """Close ``log``, reopen it, and check that recovery found exactly ``state``, no tail."""
    log.close()
    again = Log.open(log.path, segment_bytes=log.segment_bytes)
    try:
        assert again.recovery.torn_bytes == 0
        assert _state(again) == state
    finally:
        again.close()


@contextmanager
def _failing(monkeypatch: pytest.MonkeyPatch, name: str, fail: Callable[..., Any], *,
             after: int = 0) -> Iterator[list[int]]:
    """Make ``os.<name>`` call ``fail`` instead, after ``after`` real calls; yields the call count."""
    real = getattr(os, name)
    calls = [0]

    def patched(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] > after:
            return fail(real, *args)
        return real(*args)

    monkeypatch.setattr(os, name, patched)
    try:
        yield calls
    finally:
        monkeypatch.setattr(os, name, real)


def _raise(code: int) -> Callable[..., Any]:
    def fail(real: Any, *args: Any) -> Any:
        raise OSError(code, os.strerror(code))
    return fail


def _short(real: Any, fd: int, bufs: list[bytes], pos: int) -> int:
    """A real partial write: all buffers but the last land, so there is something to undo."""
    assert len(bufs) >= 2
    result: int = real(fd, bufs[:-1], pos)
    return result


def _raw_records(tmp_path: Path, n: int) -> tuple[Log, list[bytes]]:
    """A source log of ``n`` records (marks among them) and their stored bytes."""
    src = Log.create(tmp_path / "src", GENESIS, segment_bytes=64 * 1024 * 1024)
    for i, (offset, payload) in enumerate(_payloads(n)):
        if i % 3 == 2:
            src.append(RecordType.MARK, 0, encode_payload(f"m{i}".encode()))
        else:
            src.append(RecordType.WRITE, offset, payload)
    return src, [src.read_raw(lsn) for lsn in range(1, n + 1)]


FRONT_ENDS = ["append", "append_many", "append_raw"]


def _continuation(log: Log) -> bytes:
    """The stored bytes of a record that continues ``log`` (built by a scratch copy of it)."""
    scratch = log.path.parent / "scratch"
    src = Log.create(scratch, log.chain_at(log.last_lsn), first_lsn=log.last_lsn + 1,
                     segment_bytes=SEGMENT_BYTES)
    try:
        lsn = src.append(RecordType.WRITE, 8192, encode_payload(os.urandom(1024)))
        return src.read_raw(lsn)
    finally:
        src.close()


# ---------------------------------------------------------------------- a failed write undoes itself


@pytest.mark.parametrize("front", FRONT_ENDS)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_space_leaves_the_log_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           front: str, code: int) -> None:
    log = _new_log(tmp_path)
    raw = _continuation(log) if front == "append_raw" else b""
    before = _state(log)
    with _failing(monkeypatch, "pwritev", _raise(code)), pytest.raises(NoSpace) as exc:
        _run(front, log, raw)
    assert exc.value.errno == errno.ENOSPC
    assert "free space" in str(exc.value) and "\n" not in str(exc.value)
    assert _state(log) == before
    _run(front, log, raw)  # not poisoned: the next append goes through
    after = _state(log)
    assert after[0] > before[0]
    _reopen_same(log, after)


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_short_write_is_undone_and_is_no_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: str) -> None:
    log = _new_log(tmp_path)
    raw = _continuation(log) if front == "append_raw" else b""
    before = _state(log)
    with _failing(monkeypatch, "pwritev", _short), pytest.raises(NoSpace, match="short write"):
        _run(front, log, raw)
    assert _state(log) == before  # the partial bytes were cut again
    _reopen_same(log, before)


@pytest.mark.parametrize("front", FRONT_ENDS)
def test_other_write_errors_are_log_failed_without_poisoning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             front: str) -> None:
    log = _new_log(tmp_path)
    raw = _continuation(log) if front == "append_raw" else b""
    before = _state(log)
    with _failing(monkeypatch, "pwritev", _raise(errno.EIO)), pytest.raises(LogFailed) as exc:
        _run(front, log, raw)
    assert exc.value.errno == errno.EIO
    assert _state(log) == before
    _run(front, log, raw)
    _reopen_same(log, _state(log))


def test_a_failed_undo_poisons_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _new_log(tmp_path)
    last = log.last_lsn
    with _failing(monkeypatch, "pwritev", _short), _failing(monkeypatch, "ftruncate", _raise(errno.EIO)):
        with pytest.raises(LogFailed, match="could not be undone"):
            log.append(RecordType.WRITE, 0, encode_payload(os.urandom(RECORD)))
    with pytest.raises(LogFailed, match="failed earlier"):
        log.append(RecordType.FLUSH, 0, encode_payload(b""))
    with pytest.raises(LogFailed):
        log.sync()
    log.close()
    again = Log.open(log.path, segment_bytes=SEGMENT_BYTES)  # recovery cuts the partial record
    try:
        assert again.last_lsn == last
        assert again.recovery.torn_bytes > 0
    finally:
        again.close()


def _run(front: str, log: Log, raw: bytes) -> None:
    if front == "append":
        log.append(RecordType.MARK, 0, encode_payload(f"mark-{log.last_lsn}".encode()))
    elif front == "append_many":
        log.append_many(RecordType.WRITE, _payloads(3, 1024))
    else:
        log.append_raw(raw)


# ---------------------------------------------------------------------- append_many across segments


def test_append_many_rotates_with_one_pwritev_per_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _new_log(tmp_path, records=1)
    items = _payloads(9)  # 4176 bytes a record: 3 fit a 16 KiB segment
    with _failing(monkeypatch, "pwritev", lambda real, *a: real(*a)) as calls:
        last = log.append_many(RecordType.WRITE, items)
    assert last == 10
    segments = [p for p in _files(log) if p.endswith(".seg")]
    assert len(segments) == 4  # 1 + 2, then 3, 3, 1
    assert calls[0] == 4
    for lsn, (offset, payload) in zip(range(2, 11), items, strict=True):
        info = log.info(lsn)
        assert (info.offset, info.length) == (offset, payload.length)
        assert log.read_data(lsn, 0, info.length) == payload.stored
    assert log.durable_lsn >= 7  # rotation made the full segments durable
    _reopen_same(log, _state(log))


def test_append_many_keeps_earlier_segments_when_a_later_one_fails(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = _new_log(tmp_path, records=1)
    items = _payloads(9)
    with _failing(monkeypatch, "pwritev", _raise(errno.ENOSPC), after=2), pytest.raises(NoSpace):
        log.append_many(RecordType.WRITE, items)
    assert log.last_lsn == 1 + 2 + 3  # the first two pwritevs (two segments) stayed
    kept = _state(log)
    for lsn, (_, payload) in zip(range(2, 7), items[:5], strict=True):
        assert log.read_data(lsn, 0, payload.length) == payload.stored
    _reopen_same(log, kept)


def test_append_many_splits_a_batch_at_the_iovec_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = Log.create(tmp_path / "log", GENESIS, segment_bytes=64 * 1024 * 1024)
    items = [(i * 512, encode_payload(bytes([i % 251]) * 16)) for i in range(1200)]
    with _failing(monkeypatch, "pwritev", lambda real, *a: real(*a)) as calls:
        assert log.append_many(RecordType.WRITE, items) == 1200
    assert calls[0] == 3  # 512 + 512 + 176 records
    assert log.read_data(777, 0, 16) == bytes([776 % 251]) * 16
    _reopen_same(log, _state(log))


def test_append_many_of_nothing_appends_nothing(tmp_path: Path) -> None:
    log = _new_log(tmp_path)
    assert log.append_many(RecordType.WRITE, []) == 2
    assert log.last_lsn == 2
    log.close()


def test_volume_write_indexes_what_reached_the_log_before_a_failure(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Volume.write relies on append_many keeping earlier segments: their chunks read back."""
    vol = Volume.create(tmp_path / "v", "v", 1024 * 1024, segment_bytes=160 * 1024, sync_interval=None)
    try:
        data = os.urandom(512 * 1024)  # 8 chunks of 64 KiB; 2 fit a segment
        with _failing(monkeypatch, "pwritev", _raise(errno.ENOSPC), after=1), pytest.raises(NoSpace):
            vol.write(0, data)
        assert vol.head_lsn == 2
        assert vol.read(0, 128 * 1024) == data[: 128 * 1024]
        assert vol.read(128 * 1024, 384 * 1024) == bytes(384 * 1024)
        assert vol.needs_flush
    finally:
        vol.close()


# ---------------------------------------------------------------------- append_raw


def test_append_raw_rotates_and_keeps_the_bytes(tmp_path: Path) -> None:
    src, raws = _raw_records(tmp_path, 12)
    dst = Log.create(tmp_path / "dst", GENESIS, segment_bytes=SEGMENT_BYTES)
    try:
        for raw in raws:
            dst.append_raw(memoryview(raw))
        assert len([p for p in _files(dst) if p.endswith(".seg")]) > 1
        assert [dst.read_raw(lsn) for lsn in range(1, 13)] == raws
        assert dst.last_chain == src.last_chain
        assert dst.marks == src.marks
        state = _state(dst)
    finally:
        src.close()
    _reopen_same(dst, state)


def test_append_raw_refuses_what_does_not_continue_or_verify(tmp_path: Path) -> None:
    src, raws = _raw_records(tmp_path, 4)
    src.close()
    dst = Log.create(tmp_path / "dst", GENESIS, segment_bytes=SEGMENT_BYTES)
    dst.append_raw(raws[0])
    before = _state(dst)
    with pytest.raises(RecordRefused, match="does not continue"):
        dst.append_raw(raws[2])  # a gap
    with pytest.raises(RecordRefused, match="does not continue"):
        dst.append_raw(raws[0])  # a repeat
    bad = bytearray(raws[1])
    bad[-1] ^= 1
    with pytest.raises(RecordRefused, match="checksum"):
        dst.append_raw(bytes(bad))
    with pytest.raises(RecordRefused, match="past the end"):
        dst.append_raw(raws[1], volume_size=RECORD)  # a WRITE at 4096 of a 4096-byte volume
    # a forged record: checksums right, but its "lz4" payload is no compression of 4096 bytes
    junk = b"\xff" * 64
    forged = rec.Payload(rec.Flags.LZ4, RECORD, junk, xxhash.xxh3_128_digest(junk))
    head, _ = rec.encode_header(RecordType.WRITE, 2, 0, forged, 1, dst.last_chain)
    with pytest.raises(RecordRefused, match="does not decompress"):
        dst.append_raw(head + junk)
    assert _state(dst) == before
    dst.append_raw(raws[1], volume_size=2 * RECORD)
    _reopen_same(dst, _state(dst))


# ---------------------------------------------------------------------- rotation on a full disk


def test_no_space_for_a_new_segment_keeps_the_old_one_active(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _new_log(tmp_path, records=3)  # the segment is full: the next record rotates
    before = _state(log)
    with _failing(monkeypatch, "write", _raise(errno.ENOSPC)), pytest.raises(NoSpace, match="new log segment"):
        log.append(RecordType.WRITE, 0, encode_payload(os.urandom(RECORD)))
    assert _state(log)[:3] == before[:3]
    assert _files(log) == before[3]  # no .tmp left behind
    log.append(RecordType.FLUSH, 0, encode_payload(b""))  # still fits: the old segment is still writable
    assert log.last_lsn == 4
    log.append(RecordType.WRITE, 0, encode_payload(os.urandom(RECORD)))  # rotates now
    assert log.last_lsn == 5 and len(_files(log)) == 2
    _reopen_same(log, _state(log))


def test_record_sizes_are_what_the_tests_assume() -> None:
    payload = encode_payload(os.urandom(RECORD))
    assert HEADER_SIZE + len(payload.stored) == 4176
    assert SEGMENT_HEADER_SIZE + 3 * 4176 <= SEGMENT_BYTES < SEGMENT_HEADER_SIZE + 4 * 4176


def test_make_room_rotates_before_the_append_and_fits_says_when_it_must(tmp_path: Path) -> None:
    log = _new_log(tmp_path, records=2)  # 64 + 2 * 4176 bytes of 16 KiB: one more fits, two do not
    assert log.fits(RECORD) and not log.fits(2 * RECORD, 2)
    log.make_room(RECORD)  # it fits: nothing happens
    assert len(_files(log)) == 1
    log.make_room(2 * RECORD, 2)
    assert len(_files(log)) == 2 and log.fits(2 * RECORD, 2) and log.durable_lsn == 2
    state = _state(log)
    log.append_many(RecordType.WRITE, _payloads(2))
    assert _files(log).keys() == state[3].keys()  # the append itself did not rotate
    _reopen_same(log, _state(log))


def test_writers_that_waited_for_a_sync_at_a_rotation_rotate_once(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation waits for the group commit in flight, and meanwhile another writer may come,
    wait too, and find the rotation done: it must append to the new segment, not start another."""
    import threading

    log = _new_log(tmp_path, records=3)
    real = os.fdatasync
    entered, release = threading.Event(), threading.Event()

    def slow(fd: int) -> None:
        if not entered.is_set():  # the leader's fdatasync: held until both writers wait
            entered.set()
            assert release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    leader = threading.Thread(target=log.sync)
    leader.start()
    assert entered.wait(10)
    writers = [threading.Thread(target=log.append, args=(RecordType.WRITE, 0, p)) for _, p in _payloads(2)]
    for w in writers:
        w.start()
    while len(log._synced._waiters) < 2:  # type: ignore[attr-defined]
        threading.Event().wait(0.001)  # both wait for the leader, inside the rotation
    release.set()
    for t in (leader, *writers):
        t.join(10)
    assert log.last_lsn == 5
    assert len(_files(log)) == 2, "the second writer started a segment of its own"
    _reopen_same(log, _state(log))


def test_reads_do_not_wait_for_a_rotation_a_write_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Volume.write starts a segment before it takes the volume lock (Log.make_room), so reads,
    which take that lock, go on while the rotation's fdatasync waits for the disk."""
    import threading

    vol = Volume.create(tmp_path / "v", "v", 1024 * 1024, segment_bytes=SEGMENT_BYTES, sync_interval=None)
    try:
        first = os.urandom(3 * RECORD)
        vol.write(0, first)  # 64 + 3 * 4176 bytes: the next 4 KiB record does not fit
        assert vol.write_blocks(RECORD) and not vol.write_blocks(RECORD // 4)
        old_fd = vol.log._segments[-1].fd
        real = os.fdatasync
        entered, release = threading.Event(), threading.Event()

        def slow(fd: int) -> None:
            if fd == old_fd:
                entered.set()
                assert release.wait(10)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", slow)
        data = os.urandom(RECORD)
        writer = threading.Thread(target=vol.write, args=(8 * RECORD, data))
        writer.start()
        try:
            assert entered.wait(10), "the write did not rotate"
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(vol.read(0, 3 * RECORD)))
            reader.start()
            reader.join(10)
            assert got == [first], "the read waited for the rotation"
            assert writer.is_alive()
        finally:
            release.set()
            writer.join(10)
        assert vol.read(8 * RECORD, RECORD) == data and len(_files(vol.log)) == 2
    finally:
        vol.close()


def test_a_read_without_the_lock_finds_its_record_while_a_trim_is_half_done(tmp_path: Path) -> None:
    """Trim drops a segment from ``_segments`` and then from ``_firsts``; a reader (writeback
    trims beside a volume's reads) may look in between: it must still find its record."""
    log = _new_log(tmp_path, records=3)
    log.append(RecordType.WRITE, 0, _payloads(1)[0][1])  # rotates: records 1-3, then 4
    log.append(RecordType.WRITE, 0, _payloads(1)[0][1])
    log.append(RecordType.WRITE, 0, _payloads(1)[0][1])
    log.rotate()
    payload = _payloads(1)[0][1]
    lsn = log.append(RecordType.WRITE, 0, payload)
    assert len(log._segments) == 3
    first = log._segments.pop(0)  # what trim does first; _firsts still lists it
    try:
        assert log.read_data(lsn, 0, RECORD) == payload.stored
        assert log.read_data(5, 0, RECORD) == log.read_stored(5)
    finally:
        log._segments.insert(0, first)
    log.close()
