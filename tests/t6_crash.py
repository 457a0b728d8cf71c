"""Process crash (G1, G2, G9): SIGKILL a writer at a random moment, then recover.

The child is this file run as a script. It opens a volume and follows a seeded stream of
operations: batches of writes, each batch followed by ``flush()`` and a line ``FLUSHED <n>``
(n = writes done) once the flush returned; now and then a mark, a segment rotation or a
writeback, so that kills also land in the middle of those. The autosync thread runs too.

The parent replays the same stream to know the LSN of every operation, kills the child
0.05-0.5 s after it starts writing, and checks after :meth:`Volume.open`:

* every write of the last ``FLUSHED`` line is in the log (G1);
* the log holds exactly the records the stream produced up to its head: what got lost is a
  suffix (G1), and the image equals the model after those writes (G2);
* every retained version ``[applied, head]`` equals the model at its LSN (G9), also after a
  writeback in the recovered volume.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
if __name__ == "__main__":  # the child: make marsfs importable without installing it
    sys.path.insert(0, str(SRC))

from marsfs.log import RecordType  # noqa: E402
from marsfs.volume import Volume  # noqa: E402
from marsfs.volume.volume import RECORD_CHUNK  # noqa: E402

SIZE = 2 * 1024 * 1024
SEGMENT_BYTES = 128 * 1024
MAX_WRITE = 64 * 1024
RUNS = 20
MAX_OPS = 100_000  # far more than a child gets through before it is killed
assert MAX_WRITE <= RECORD_CHUNK  # one record per write keeps the LSN bookkeeping simple


def _ops(seed: int) -> Iterator[tuple[Any, ...]]:
    """The seeded operation stream shared by child and parent.

    Yields ("write", offset, data), ("flush",), ("mark", name), ("rotate",) and
    ("writeback", fraction | None): writeback to ``applied + fraction * (head - applied)``.
    """
    rng = random.Random(seed)
    marks = 0
    for _ in range(MAX_OPS):
        for _ in range(rng.randint(1, 4)):
            n = rng.choice([rng.randint(1, 512), rng.randint(1, 8192), rng.randint(1, MAX_WRITE)])
            offset = rng.randrange(SIZE - n + 1)
            if rng.random() < 0.7:
                data = rng.randbytes(n)
            else:
                pattern = rng.randbytes(rng.randint(1, 32))
                data = (pattern * (n // len(pattern) + 1))[:n]
            yield ("write", offset, data)
        yield ("flush",)
        r = rng.random()
        if r < 0.25:
            yield ("writeback", None if rng.random() < 0.3 else rng.random())
        elif r < 0.30:
            marks += 1
            yield ("mark", f"m{marks}")
        elif r < 0.35:
            yield ("rotate",)


def child_main(path: str, seed: int) -> None:
    vol = Volume.open(Path(path))  # default sync_interval: autosync runs under the kill as well
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    writes = 0
    for op in _ops(seed):
        kind = op[0]
        if kind == "write":
            vol.write(op[1], op[2])
            writes += 1
        elif kind == "flush":
            vol.flush()
            out.write(f"FLUSHED {writes}\n")
            out.flush()
        elif kind == "mark":
            vol.mark(op[1])
        elif kind == "rotate":
            vol.log.rotate()
        elif kind == "writeback":
            a, h = vol.applied_lsn, vol.head_lsn
            vol.writeback(None if op[1] is None else a + int(op[1] * (h - a)))


class Expected:
    """What the op stream puts into the log: record (type, offset, length) at each LSN."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.records: list[tuple[RecordType, int, bytes | None]] = [(RecordType.FLUSH, 0, None)]  # [0] unused
        self.write_lsns: list[int] = []
        self.stream = _ops(seed)
        self.dirty = False

    def extend_to(self, lsn: int) -> None:
        while len(self.records) <= lsn:
            op = next(self.stream)
            if op[0] == "write":
                self.records.append((RecordType.WRITE, op[1], op[2]))
                self.write_lsns.append(len(self.records) - 1)
                self.dirty = True
            elif op[0] == "flush" and self.dirty:
                self.records.append((RecordType.FLUSH, 0, None))
                self.dirty = False
            elif op[0] == "mark":  # mark = flush (nothing to flush here) + MARK record
                self.records.append((RecordType.MARK, 0, op[1].encode()))

    def writes_upto(self, lsn: int) -> int:
        self.extend_to(lsn + 1)
        return sum(1 for w in self.write_lsns if w <= lsn)

    def images(self, lsns: list[int]) -> dict[int, bytes]:
        """The model image at each of ``lsns`` (ascending)."""
        self.extend_to(lsns[-1])
        img = bytearray(SIZE)
        out: dict[int, bytes] = {}
        at = 1
        for lsn in lsns:
            while at <= lsn:
                kind, off, data = self.records[at]
                if kind == RecordType.WRITE:
                    assert data is not None
                    img[off : off + len(data)] = data
                at += 1
            out[lsn] = bytes(img)
        return out


def _run_child(path: Path, seed: int, delay: float) -> tuple[int, str]:
    """Start the writer, kill it ``delay`` s after it is ready; returns (last n flushed, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, __file__, str(path), str(seed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready = proc.stdout.readline()
        if ready != "READY\n":
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"writer did not start: {ready!r}\n{err}")
        time.sleep(delay)
        assert proc.poll() is None, f"writer ended before it was killed:\n{proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    flushed = 0
    for line in rest.splitlines(keepends=True):
        if line.startswith("FLUSHED ") and line.endswith("\n"):
            flushed = int(line.split()[1])
    return flushed, err


def _check_recovered(vol: Volume, exp: Expected, flushed: int, where: str) -> None:
    head, applied = vol.head_lsn, vol.applied_lsn
    assert applied <= vol.durable_lsn == head
    k = exp.writes_upto(head)
    assert k >= flushed, f"{where}: {flushed} writes were flushed but only {k} survived (head {head})"

    # The log is the expected one up to its head (whatever got lost is a suffix).
    for rec in vol.log.records():
        kind, off, data = exp.records[rec.lsn]
        assert rec.type == kind, f"{where}: record {rec.lsn} is {rec.type!r}, expected {kind!r}"
        if kind == RecordType.WRITE:
            assert data is not None
            assert (rec.offset, rec.length) == (off, len(data)), f"{where}: record {rec.lsn}"
            assert vol.log.read_data(rec.lsn, 0, rec.length) == data, f"{where}: payload of {rec.lsn}"
        elif kind == RecordType.MARK:
            assert data is not None
            assert vol.log.marks[rec.lsn] == data.decode()

    # Every retained version, and the current image, equal the model (G2, G9).
    lsns = list(range(applied, head + 1))
    if len(lsns) > 12:
        lsns = sorted({applied, head, *random.Random(head).sample(lsns, 10)})
    images = exp.images(lsns)
    assert vol.read(0, SIZE) == images[head], f"{where}: image differs from the model after {k} writes"
    for lsn in lsns:
        with vol.view(lsn) as view:
            got = view.read(0, SIZE)
        if got != images[lsn]:
            diff = next(i for i in range(SIZE) if got[i] != images[lsn][i])
            pytest.fail(f"{where}: version lsn-{lsn} differs from the model at byte {diff} "
                        f"(applied {applied}, head {head})")


@pytest.mark.slow
def test_sigkill_loses_only_unflushed_suffix() -> None:
    root = Path(tempfile.mkdtemp(prefix="marsfs-test-crash-"))
    try:
        timing = random.Random()
        total_flushed = 0
        for run in range(RUNS):
            seed = 1000 + run
            path = root / f"v{run}"
            Volume.create(path, f"c{run}", SIZE, segment_bytes=SEGMENT_BYTES, sync_interval=None).close()
            delay = timing.uniform(0.05, 0.5)
            flushed, err = _run_child(path, seed, delay)
            where = f"run {run} (seed {seed}, killed after {delay:.3f} s, {flushed} writes flushed)"
            total_flushed += flushed
            exp = Expected(seed)

            vol = Volume.open(path, sync_interval=None)
            try:
                _check_recovered(vol, exp, flushed, where)
                # Writing back what was recovered keeps every version right.
                vol.writeback(vol.applied_lsn + (vol.head_lsn - vol.applied_lsn) // 2)
                _check_recovered(vol, exp, flushed, where + ", after writeback")
            finally:
                vol.close()
            shutil.rmtree(path)
        assert total_flushed > RUNS, "the writers hardly got anything flushed: the test tests nothing"
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Killed(Exception):
    """Stands for SIGKILL at a chosen point inside the volume code."""


def test_writeback_interrupted_before_applied_is_persisted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic twin of the random kill: the base holds records that applied.json does not.

    Writeback has written records ``(A, T]`` to the base (fdatasync'd, even) when the process
    dies before ``A = T`` is persisted. After recovery every retained version must still equal
    the model, in particular the oldest one, which reads unwritten ranges from the base.
    """
    import marsfs.volume.writeback as volmod
    from marsfs.fsutil import write_json

    path = tmp_path / "v"
    seed = 7
    Volume.create(path, "w", SIZE, segment_bytes=SEGMENT_BYTES, sync_interval=None).close()
    vol = Volume.open(path, sync_interval=None)
    exp = Expected(seed)
    for op in _ops(seed):
        if op[0] == "write":
            vol.write(op[1], op[2])
        elif op[0] == "flush":
            vol.flush()
            if vol.head_lsn >= 40:
                break
        elif op[0] == "mark":
            vol.mark(op[1])
        elif op[0] == "rotate":
            vol.log.rotate()
    vol.writeback(10)
    real_write_json = write_json

    def dying_write_json(file: Path, obj: dict[str, Any]) -> None:
        if file.name == "applied.json" and obj.get("applied_lsn") != vol.applied_lsn:
            raise _Killed
        real_write_json(file, obj)

    monkeypatch.setattr(volmod, "write_json", dying_write_json)
    with pytest.raises(_Killed):
        vol.writeback(30)
    monkeypatch.undo()
    # The process is gone: nothing of the old Volume object runs again.
    vol.log.close()
    os.close(vol._base_fd)

    vol = Volume.open(path, sync_interval=None)
    try:
        assert vol.applied_lsn in (10, 30)
        _check_recovered(vol, exp, 0, "after a writeback died")
        vol.writeback()
        _check_recovered(vol, exp, 0, "after the next writeback")
    finally:
        vol.close()


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]))
