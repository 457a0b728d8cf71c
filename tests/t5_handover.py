"""Planned handovers in a circle, with ext4 on loop devices: A -> B -> C -> A ...

Every cycle the primary attaches its image, mounts ext4, checks every tree written so far,
writes and fsyncs a new one, unmounts and detaches (a handover needs a closed image), and the
next node runs ``marsfs primary vm``. After every switch: the other two follow the new primary,
all three images are identical once synced, and e2fsck finds the filesystem clean.
"""

from __future__ import annotations

from pathlib import Path

from marsfs.testing.checks import check_tree, fsck_clean, sha, status, wait_for, wait_synced, write_tree
from marsfs.testing.harness import Harness, run

CYCLES = 20  #: handovers (20 in CI)
SIZE = "64M"


def test_handover_cycles_keep_every_fsynced_file(harness: Harness, tmp_path: Path) -> None:
    nodes = harness.cluster(["a", "b", "c"])
    order = [nodes["a"], nodes["b"], nodes["c"]]
    order[0].cli("create", "vm", "--size", SIZE)
    for m in order[1:]:
        m.cli("join", "vm", "--from", "a")
    for m in order[1:]:
        wait_synced(m, "vm")
    trees: list[tuple[str, dict[str, str]]] = []
    mnt = tmp_path / "fs"
    for i in range(CYCLES + 1):
        p = order[i % 3]
        dev = harness.attach(p.image("vm"))
        if i == 0:
            run(["mkfs.ext4", "-q", "-F", dev])
        harness.mount_fs(dev, mnt)
        for name, sums in trees:
            check_tree(mnt / name, sums)
        if i == CYCLES:
            harness.umount_fs(mnt)
            harness.detach(dev)
            break
        (mnt / f"c{i}").mkdir()
        trees.append((f"c{i}", write_tree(mnt / f"c{i}", seed=i, files=8)))
        harness.umount_fs(mnt)
        harness.detach(dev)
        n = order[(i + 1) % 3]
        r = n.cli("primary", "vm")
        assert f"epoch {i + 2}" in r.stdout, r.stdout
        others = [m for m in order if m is not n]
        for m in others:
            wait_for(lambda m=m, n=n: (s := status(m, "vm"))["role"] == "mirror" and s["source"] == n.name,
                     timeout=60, what=f"{m.name} to follow {n.name} (cycle {i})")
            wait_synced(m, "vm")
        assert status(n, "vm")["epoch"] == i + 2
        digests = {m.name: sha(m.image("vm")) for m in order}
        assert len(set(digests.values())) == 1, (i, digests)
        fsck_clean(n.image("vm"))
