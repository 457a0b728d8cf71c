"""``scripts/demo``: the main job on an embedded default, printed step by step.

For now it exercises the storage core on one node: create a volume in a temporary state
directory, write a recognisable pattern, flush (the durability point), simulate a daemon
restart by reopening from disk, verify every byte, look at an older version, write back
to the base image and verify again. Each step prints what happened and what it proves.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import tempfile
import time
from pathlib import Path

from marsfs.volume import Volume

MiB = 1024 * 1024


def _pattern(rng: random.Random, n: int) -> bytes:
    """Half compressible text, half random: shows lz4 used only where it helps."""
    text = (b"marsfs demo block %d " % rng.randrange(1 << 30)) * (n // 40 + 1)
    return text[: n // 2] + rng.randbytes(n - n // 2)


def run(state: Path, size: int, writes: int, seed: int) -> None:
    rng = random.Random(seed)
    model = bytearray(size)
    say = print
    say(f"marsfs demo: state dir {state}")
    t0 = time.perf_counter()
    vol = Volume.create(state / "volumes" / "demo", "demo", size)
    say(f"  created volume 'demo' of {size // MiB} MiB (sparse base image, empty log)")

    for _ in range(writes):
        n = rng.choice([4096, 65536, MiB])
        off = rng.randrange(0, size - n + 1) // 512 * 512
        data = _pattern(rng, n)
        vol.write(off, data)
        model[off : off + n] = data
    first_flush = vol.flush()
    say(f"  wrote {writes} blocks of 4 KiB to 1 MiB; flush made LSN {first_flush} durable")
    older = bytes(model)
    for _ in range(writes // 4):
        off = rng.randrange(0, size // 4096) * 4096
        data = rng.randbytes(4096)
        vol.write(off, data)
        model[off : off + 4096] = data
    head = vol.flush()
    log_bytes = vol.log.end_bytes
    say(f"  wrote {writes // 4} more 4 KiB blocks, flushed at LSN {head}; log holds {log_bytes / MiB:.1f} MiB")
    vol.close()
    say("  closed the volume (as a daemon stop would)")

    vol = Volume.open(state / "volumes" / "demo")
    rep = vol.log.recovery
    say(f"  reopened: recovery verified {rep.records} records in {rep.segments} segment(s), "
        f"{rep.bytes_scanned / MiB:.1f} MiB, torn tail: {rep.torn_bytes} bytes")
    assert vol.read(0, size) == model, "image differs after restart"
    say(f"  image after restart equals what was written: sha256 {hashlib.sha256(model).hexdigest()[:16]}")
    with vol.view(first_flush) as view:
        assert view.read(0, size) == older, "historical version differs"
    say(f"  version lsn-{first_flush} (before the last {writes // 4} writes) opens read-only and is exact")
    applied = vol.writeback()
    say(f"  writeback applied LSN 1..{applied} to the base image; log now {vol.log.end_bytes / MiB:.1f} MiB")
    assert vol.read(0, size) == model, "image differs after writeback"
    vol.close()
    vol = Volume.open(state / "volumes" / "demo")
    assert vol.read(0, size) == model, "image differs after writeback and restart"
    vol.close()
    say(f"  after writeback and another restart the image is still exact ({time.perf_counter() - t0:.2f} s in all)")
    say("marsfs demo: OK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="volume size in MiB (default 64)")
    p.add_argument("--writes", type=int, default=200, help="number of writes (default 200)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    args = p.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="marsfs-demo-"))
    try:
        run(state, args.size * MiB, args.writes, args.seed)
    finally:
        if args.keep:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
