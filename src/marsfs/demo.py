"""``scripts/demo``: the main job on an embedded default, printed step by step.

The default run is a two-node cluster on loopback: node ``a`` serves a volume through FUSE,
ext4 lives on it through a loop device, node ``b`` joins as a mirror, and the demo shows the
mirror converging, its copy passing e2fsck with every file intact, and the lag in status.
Needs root, /dev/fuse and loop devices (scripts/demo sets the machine up).

``--core`` runs the storage core alone, without root: create a volume, write, flush, reopen
from disk, verify every byte, open an older version, write back and verify again.
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


def run_cluster(root: Path, size_mib: int, files: int, seed: int) -> None:
    """Two real nodes, ext4 on the primary, a mirror that converges and checks clean."""
    import json
    import os
    import shutil as sh

    from marsfs.testing.harness import Harness
    from marsfs.testing.harness import run as sh_run

    say = print
    rng = random.Random(seed)
    t0 = time.perf_counter()

    def tree(ext: Path, tag: str, n: int) -> dict[str, str]:
        sums: dict[str, str] = {}
        for i in range(n):
            data = _pattern(rng, rng.choice([4096, 65536, MiB]))
            p = ext / f"{tag}-{i}.bin"
            with open(p, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            sums[p.name] = hashlib.sha256(data).hexdigest()
        return sums

    with Harness(root) as h:
        nodes = h.cluster(["a", "b"])
        a, b = nodes["a"], nodes["b"]
        say(f"marsfs demo: node a at {a.mount} (port {h.ports['a']}), node b at {b.mount} (port {h.ports['b']})")
        a.cli("create", "vm", "--size", f"{size_mib}M")
        dev = h.attach(a.image("vm"))
        sh_run(["mkfs.ext4", "-q", dev])
        ext = h.mount_fs(dev, root / "ext")
        say(f"  a: created volume vm ({size_mib} MiB), attached {dev}, ext4 mounted at {ext}")
        sums = tree(ext, "before", files)
        say(f"  a: wrote {files} files with fsync (each fsync is a FLUSH record in the log)")
        b.cli("join", "vm", "--from", "a")
        say("  b: joined vm from a: image copy, then the log")
        sums.update(tree(ext, "after", files))
        say(f"  a: wrote {files} more files while b follows")
        a.cli("mark", "vm", "demo-done")
        r = b.cli("wait", "vm", "--synced", "--timeout", "120", check=False)
        if r.returncode:
            raise SystemExit(f"marsfs demo: the mirror did not sync: {r.stderr.strip()}")
        sa = json.loads(a.cli("status", "vm", "--json").stdout)
        sb = json.loads(b.cli("status", "vm", "--json").stdout)
        say(f"  b: synced: fetched and replayed LSN {sb['replayed_lsn']} of a's {sa['durable_lsn']}, "
            f"lag {sb['lag_bytes']} bytes / {sb['lag_seconds']:.1f} s")
        say("")
        say("\n".join("    " + ln for ln in a.cli("status").stdout.splitlines()))
        say("\n".join("    " + ln for ln in b.cli("status").stdout.splitlines()))
        say("")
        copy = root / "mirror-copy.img"
        sh.copyfile(b.image("vm"), copy)
        sh_run(["e2fsck", "-E", "journal_only", "-y", str(copy)], check=False)
        fsck = sh_run(["e2fsck", "-fn", str(copy)], check=False)
        if fsck.returncode:
            raise SystemExit(f"marsfs demo: e2fsck found problems on the mirror's copy:\n{fsck.stdout}")
        say("  b: a copy of the mirror's image replays its ext4 journal and e2fsck -fn is clean")
        cdev = h.attach(copy)
        cext = h.mount_fs(cdev, root / "copy")
        bad = [n for n, d in sums.items() if hashlib.sha256((cext / n).read_bytes()).hexdigest() != d]
        if bad:
            raise SystemExit(f"marsfs demo: files differ on the mirror: {bad[:5]}")
        say(f"  b: all {len(sums)} fsync'd files are on the mirror, byte for byte")
        h.umount_fs(cext)
        h.detach(cdev)
        h.umount_fs(ext)
        h.detach(dev)
        b.cli("wait", "vm", "--synced", "--timeout", "60")
        same = hashlib.sha256(a.image("vm").read_bytes()).hexdigest() == hashlib.sha256(b.image("vm").read_bytes()).hexdigest()
        say(f"  a and b: after unmounting, the images are {'byte-identical' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit("marsfs demo: the images differ after writes stopped")
    say(f"marsfs demo: OK ({time.perf_counter() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    p.add_argument("--core", action="store_true", help="the storage core alone (no FUSE, no root)")
    p.add_argument("--size", type=int, default=256, help="volume size in MiB (default 256)")
    p.add_argument("--writes", type=int, default=200, help="--core: number of writes (default 200)")
    p.add_argument("--files", type=int, default=20, help="files written before and after the join (default 20)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="marsfs-demo-"))
    try:
        if args.core:
            run(state, args.size * MiB, args.writes, args.seed)
        else:
            run_cluster(state, args.size, args.files, args.seed)
    finally:
        if args.keep:
            print(f"kept {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
