"""Opening a log directory: scan and verify every segment, tell a torn tail from damage.

Theory of operation
-------------------
Only the newest segment of a log grows; a segment is fdatasync'd before the next one is
created, and a new segment appears atomically (see :mod:`marsfs.log.segment`). Hence:

* every segment but the last is complete: any bad record in it is damage;
* in the last segment, a bad record with no verifiable record header after it is a torn tail
  (an append that a crash interrupted) and is cut; a bad record followed by a valid header is
  damage.

Every record is verified (header sum, payload hash, LSN sequence, chain link), and so is every
segment header against the end of the previous segment. The scan stops at the first damaged
record with :class:`~marsfs.errors.LogDamaged` naming segment, byte offset and LSN, and then
holds no file open.

A *restart* (:meth:`marsfs.log.Log.restart`, a resync's switch) replaces the whole log by an
empty one that continues another history. It writes :data:`RESTART_FILE` (the new first LSN's
predecessor and its chain) before it deletes any segment and removes it after the new segment
exists; recovery that finds the file redoes the restart (:func:`finish_restart`), which is
idempotent: delete every segment, make the empty one, remove the file.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from marsfs.errors import LogDamaged, StateError
from marsfs.fsutil import fsync_dir, read_json, write_json
from marsfs.log.record import (
    HEADER_SIZE,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    BadRecord,
    decode_header,
    decode_segment_header,
    verify_link,
    verify_payload,
)
from marsfs.log.segment import SEGMENT_SUFFIX, Segment, named_lsn, segment_name

RESTART_FILE = "restart.json"


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening a log found."""

    segments: int
    records: int
    bytes_scanned: int
    torn_bytes: int  #: bytes cut (or, without repair, ignored) at the tail
    torn_reason: str  #: why the tail was cut; empty when it was clean


def recover(path: Path, *, repair: bool) -> tuple[list[Segment], RecoveryReport]:
    """Verify every segment of the log in ``path``; cut a torn tail (only when ``repair``).

    Returns the segments (all but the last reopened read-only) and what the scan found.
    Raises :class:`LogDamaged` at the first damaged record before the tail.
    """
    for stale in path.glob("*.tmp"):
        stale.unlink()
    if (path / RESTART_FILE).exists():
        state = read_json(path / RESTART_FILE)
        finish_restart(path, int(state["after_lsn"]), bytes.fromhex(state["chain"])).close()
    names = sorted(p.name for p in path.iterdir() if p.name.endswith(SEGMENT_SUFFIX))
    if not names:
        raise StateError(f"no log segments in {path}: the volume's log is missing; "
                         "restore the state directory or resync the volume")
    segments: list[Segment] = []
    scanned = torn = 0
    torn_reason = ""
    expect_lsn: int | None = None
    chain = b""
    for n, name in enumerate(names):
        last = n == len(names) - 1
        try:
            seg, seg_scanned, cut, reason = scan_segment(path / name, expect_lsn, chain, last)
        except BaseException:
            for done in segments:  # a damaged log must not leak the segments scanned so far
                done.close()
            raise
        segments.append(seg)
        scanned += seg_scanned
        expect_lsn, chain = seg.last_lsn + 1, seg.last_chain
        if last and cut:
            torn, torn_reason = cut, reason
            if repair:
                os.ftruncate(seg.fd, seg.end)
                os.fsync(seg.fd)
    for seg in segments[:-1]:
        seg.reopen_readonly()
    records = sum(s.count for s in segments)
    return segments, RecoveryReport(len(segments), records, scanned, torn, torn_reason)


def finish_restart(path: Path, after_lsn: int, chain: bytes) -> Segment:
    """Make the log in ``path`` an empty one that continues after ``after_lsn`` from ``chain``;
    returns its (writable) segment. Every step is durable before the next, and running it
    again after a crash anywhere ends in the same log."""
    marker = path / RESTART_FILE
    if not marker.exists():
        write_json(marker, {"after_lsn": after_lsn, "chain": chain.hex()})
    for seg in path.iterdir():
        if seg.name.endswith(SEGMENT_SUFFIX):
            seg.unlink()
    fsync_dir(path)
    new = Segment.create(path, after_lsn + 1, chain)
    try:
        marker.unlink()
        fsync_dir(path)
    except BaseException:
        new.close()
        raise
    return new


def _has_valid_header_after(buf: mmap.mmap, start: int) -> bool:
    """Is there any verifiable record header at or after ``start``? (damage vs torn tail)"""
    at = buf.find(RECORD_MAGIC, start)
    while at >= 0:
        try:
            decode_header(buf[at : at + HEADER_SIZE])
            return True
        except BadRecord:
            at = buf.find(RECORD_MAGIC, at + 1)
    return False


def scan_segment(path: Path, expect_lsn: int | None, chain: bytes,
                 last: bool) -> tuple[Segment, int, int, str]:
    """Verify one segment. Returns the segment, bytes scanned, bytes of torn tail and why.

    ``expect_lsn`` and ``chain`` are where the previous segment ended (None for the first
    segment, which may start anywhere). Only the ``last`` segment may have a torn tail, and only
    it is opened read-write.
    """
    # the LSN a damaged segment header is reported at: its first, as expected or as named
    first = expect_lsn if expect_lsn is not None else named_lsn(path.name)
    fd = os.open(path, os.O_RDWR if last else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < SEGMENT_HEADER_SIZE:
            raise LogDamaged(path.name, 0, first, "segment shorter than its header")
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            buf = memoryview(mm)
            try:
                # A BadRecord's traceback pins the memoryview slices it was given, and a pinned
                # slice makes closing the mmap fail (BufferError): so remember the reason and
                # raise LogDamaged only after the handler has dropped the BadRecord.
                bad = ""
                try:
                    sh = decode_segment_header(buf[:SEGMENT_HEADER_SIZE])
                except BadRecord as e:
                    bad = e.reason
                if bad:
                    raise LogDamaged(path.name, 0, first, bad)
                if expect_lsn is not None and (sh.first_lsn != expect_lsn or sh.prev_chain != chain):
                    raise LogDamaged(path.name, 0, expect_lsn,
                                     f"segment starts at LSN {sh.first_lsn} or with another chain "
                                     "than the previous segment ends; a segment is missing or foreign")
                if path.name != segment_name(sh.first_lsn):
                    raise LogDamaged(path.name, 0, sh.first_lsn, "segment file name does not match its header")
                seg = Segment(path, sh.first_lsn, sh.prev_chain, fd, SEGMENT_HEADER_SIZE)
                pos = SEGMENT_HEADER_SIZE
                lsn = sh.first_lsn
                prev = sh.prev_chain
                while pos < size:
                    try:
                        h = decode_header(buf[pos : pos + HEADER_SIZE])
                        verify_payload(h, buf[pos + HEADER_SIZE : pos + HEADER_SIZE + h.stored_len])
                    except BadRecord as e:
                        bad = e.reason
                    if bad:
                        if last and not _has_valid_header_after(mm, pos + 1):
                            seg.end = pos  # the torn record is cut here, and appends go here
                            return seg, pos, size - pos, bad
                        raise LogDamaged(path.name, pos, lsn, bad)
                    try:  # a verified record that does not continue the log was never torn
                        verify_link(h, buf[pos : pos + HEADER_SIZE], lsn, prev)
                    except BadRecord as e:
                        bad = e.reason
                    if bad:
                        raise LogDamaged(path.name, pos, lsn, bad)
                    seg.add(h, pos)
                    prev = h.chain
                    pos += h.size
                    lsn += 1
                seg.end = pos
                return seg, size, 0, ""
            finally:
                buf.release()
    except BaseException:
        os.close(fd)
        raise
