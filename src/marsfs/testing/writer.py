"""A file writer for crash tests: ``python -m marsfs.testing.writer DIR MANIFEST SEED PREFIX``.

Writes files ``PREFIX-<i>`` with deterministic content into DIR; after each file's fsync (and
its directory's) returns, appends ``name sha256`` to MANIFEST and fsyncs that. So every line
of the manifest names a file whose fsync completed: after any crash it must be whole.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys

from marsfs.fsutil import write_all


def content(seed: int, i: int) -> bytes:
    rng = random.Random(seed * 1_000_003 + i)
    size = rng.choice([1, 4096, 65536, 300_000])
    return rng.randbytes(size // 2) + bytes([i % 251]) * (size - size // 2)


def main(argv: list[str]) -> int:
    target, manifest, seed, prefix = argv[0], argv[1], int(argv[2]), argv[3]
    dfd = os.open(target, os.O_RDONLY)
    with open(manifest, "a") as m:
        i = 0
        while True:
            data = content(seed, i)
            name = f"{prefix}-{i}"
            fd = os.open(os.path.join(target, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)
            m.write(f"{name} {hashlib.sha256(data).hexdigest()}\n")
            m.flush()
            os.fsync(m.fileno())
            i += 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
