"""PostgreSQL on a marsfs volume: SIGKILL the primary's daemon under pgbench, fail over, check.

Each run: nodes a (primary) and b (mirror) over mutual TLS; on a, ext4 on a loop device on
the volume's image, a PostgreSQL cluster on it, pgbench TPC-B with a ledger row per
transaction (:mod:`marsfs.testing.postgres`); mid-load a's daemon is SIGKILLed, then
``marsfs primary vm --force`` on b, and on b the image is mounted and PostgreSQL started
(crash recovery). What must hold:

* the database recovers; ``pg_amcheck`` is clean; the TPC-B ledger balances (the sums of
  account, teller and branch balances equal the sum of the history's deltas);
* on a ``sync`` volume, every transaction pgbench reported committed is there, over repeated
  runs, and the failover says no acknowledged write is known lost (with ``--refuse``: "nothing
  acknowledged lost", proven);
* on an ``async`` volume the run reports the loss it sees (committed transactions missing) next
  to the failover's own report, which never claims that nothing acknowledged was lost.

``MARSFS_PG_RUNS`` (default 2) is how many runs of plain sync mode a test session makes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from marsfs.testing.checks import status, wait_for, wait_synced
from marsfs.testing.harness import Harness, free_port
from marsfs.testing.postgres import BALANCES, Postgres, committed, missing, pg_bin, tpcb_script

RUNS = int(os.environ.get("MARSFS_PG_RUNS", "2"))
CASES = [*(("sync", i) for i in range(1, RUNS + 1)), ("sync-refuse", 1), ("async", 1)]


@pytest.fixture
def postgres_bin() -> Path:
    found = pg_bin()
    if found is None or shutil.which("setpriv") is None:
        why = "needs PostgreSQL (Debian's postgresql package: scripts/_bootstrap installs it) and setpriv"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but this machine cannot run the test: {why}")
        pytest.skip(why)
    return found


@pytest.mark.parametrize("mode,run", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_pgbench_survives_sigkill_and_failover(harness: Harness, postgres_bin: Path, mode: str, run: int) -> None:
    os.chmod(harness.root, 0o711)  # the postgres user reaches its data directory and socket under it
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    flags = {"sync": ["--mode", "sync"], "sync-refuse": ["--mode", "sync", "--refuse"], "async": []}[mode]
    a.cli("create", "vm", "--size", "1G", "--thin", *flags)
    b.cli("join", "vm", "--from", "a")
    wait_synced(b, "vm")
    wait_for(lambda: status(b, "vm")["mode"] == ("async" if mode == "async" else "sync"), what="b to learn the mode")

    dev = harness.attach(a.image("vm"))
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    pgdir = harness.mount_fs(dev, harness.root / "a-pg")
    work = harness.root / "work"
    work.mkdir()
    os.chmod(work, 0o1777)
    pg = Postgres(postgres_bin, pgdir / "data", harness.root / "sock", free_port())
    pg.initdb()
    pg.start()
    try:
        pg.prepare_tpcb()
        log_prefix = work / "tx"
        bench = pg.pgbench(tpcb_script(work), log_prefix, clients=4, seconds=120)
        at = 300 + 500 * run  # each run kills at another point of the load
        wait_for(lambda: int(pg.psql("SELECT count(*) FROM ledger")) >= at, timeout=120,
                 what=f"{at} transactions under load")
        a.kill()  # mid-load: the primary's daemon dies
        a.abort()  # its FUSE connection: PostgreSQL gets errors at once instead of waiting
        try:
            out, err = bench.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            bench.kill()
            out, err = bench.communicate()
    finally:
        pg.crash()  # whatever is left of it on a: its disk is gone
    harness.umount_fs(pgdir)
    harness.detach(dev)
    a.unmount()
    reported = committed(log_prefix)
    total = sum(reported.values())
    assert total >= 300, f"pgbench reported {total} transactions committed: {out[-1000:]}{err[-1000:]}"

    result = json.loads(b.cli("primary", "vm", "--force", "--json").stdout)
    loss: dict[str, Any] = result["loss"]
    if mode == "sync-refuse":  # no mirror follows b yet: its flushes would fail; the runbook's next step
        assert "fail with EIO (--refuse) until they do" in result["mode_note"], result
        b.cli("mode", "vm", "async")
    dev = harness.attach(b.image("vm"))
    pgdir = harness.mount_fs(dev, harness.root / "b-pg")  # ext4 replays its journal
    pg = Postgres(postgres_bin, pgdir / "data", harness.root / "sock", free_port())
    pg.start()  # PostgreSQL's crash recovery
    try:
        check = pg.amcheck()
        assert check.returncode == 0, f"pg_amcheck: {check.stdout[-3000:]}{check.stderr[-2000:]}"
        sums = pg.psql(BALANCES).split("|")
        assert len(set(sums)) == 1, f"the TPC-B ledger does not balance: accounts, tellers, branches, history = {sums}"
        lost = missing(pg, reported)
        present = int(pg.psql("SELECT count(*) FROM ledger"))
    finally:
        pg.stop()
    harness.umount_fs(pgdir)
    harness.detach(dev)
    said = result["lost"]
    print(f"\npgbench {mode} run {run}: {total} reported committed, {present} in the ledger after the failover, "
          f"{len(lost)} committed missing; failover: {said}")
    assert loss["mode"] == ("async" if mode == "async" else "sync") and not loss["degraded_since"], loss
    if mode == "async":  # losing the newest commits is allowed; the failover must not have said otherwise
        assert not loss["nothing_acked_lost"] and (loss["at_least"] or not lost), loss
        return
    assert lost == [], f"{len(lost)} transactions reported committed are missing after the failover: {lost[:20]}"
    assert loss["acked_lost"] == 0, loss
    if mode == "sync-refuse":
        assert loss["nothing_acked_lost"] and "nothing acknowledged lost" in said, said
    else:
        assert not loss["nothing_acked_lost"] and "nothing acknowledged known lost" in said, said
