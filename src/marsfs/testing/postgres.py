"""PostgreSQL on a marsfs volume, for the database tests and the fsync benchmark.

A :class:`Postgres` is one server process on a data directory (on ext4 on a loop device on a
marsfs image, in the tests), run as the ``postgres`` user with ``setpriv`` (no fork, so the
process this module started is the postmaster, and its backends share its process group),
listening on a Unix socket only. What a test needs of it: ``initdb``, start and wait until it
answers, ``psql``, pgbench (:func:`pgbench_args`: a TPC-B script that also writes one ledger
row per transaction, the client and its own running number, so that every transaction pgbench
reported committed can be looked for afterwards), and a stop or a crash of the whole process
group.

:func:`committed` reads pgbench's per-transaction logs (``-l``): a line is written only after
the transaction's COMMIT returned, so client ``c``'s ``n`` lines mean its transactions 1..n
were reported committed. :func:`missing` compares them with the ledger rows present.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

SCALE = 1
#: TPC-B as pgbench's built-in script, plus a ledger row per transaction: (client, seq), where
#: seq counts the client's transactions (pgbench keeps a client's variables across them)
TPCB_LEDGER = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
\\set seq :seq + 1
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO ledger (client, seq) VALUES (:client_id, :seq);
END;
"""
#: the TPC-B invariant: every balance moved by the deltas the history holds
BALANCES = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
            "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)")


def pg_bin() -> Path | None:
    """The newest PostgreSQL server's bin directory (Debian's layout), None if none is installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def as_postgres(*cmd: str | os.PathLike[str]) -> list[str]:
    return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", *(os.fspath(c) for c in cmd)]


class Postgres:
    """One PostgreSQL server on ``data``, its socket in ``sock`` (see the module)."""

    def __init__(self, bin_dir: Path, data: Path, sock: Path, port: int = 5432) -> None:
        self.bin = bin_dir
        self.data = data
        self.sock = sock
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = sock / f"postgres-{port}.log"

    def initdb(self) -> None:
        """A new cluster in ``data`` (made and given to the postgres user)."""
        self.data.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "postgres:postgres", os.fspath(self.data)], check=True)
        os.chmod(self.data, 0o700)
        r = subprocess.run(as_postgres(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres"),
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"initdb failed: {r.stdout[-2000:]}{r.stderr[-2000:]}"

    def start(self, timeout: float = 120) -> None:
        """Start the server (crash recovery first, if the data directory needs it) and wait
        until it answers."""
        self.sock.mkdir(parents=True, exist_ok=True)
        os.chmod(self.sock, 0o1777)
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(
                as_postgres(self.bin / "postgres", "-D", self.data, "-p", str(self.port), "-k", self.sock,
                            "-c", "listen_addresses=", "-c", "max_wal_size=256MB", "-c", "min_wal_size=32MB",
                            "-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "full_page_writes=on"),
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited {self.proc.returncode} at start:\n{self.log_tail()}")
            r = subprocess.run([self.bin / "pg_isready", "-h", self.sock, "-p", str(self.port)], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"postgres did not answer within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def conn(self) -> list[str]:
        return ["-h", os.fspath(self.sock), "-p", str(self.port), "-U", "postgres"]

    def psql(self, sql: str, timeout: float = 120) -> str:
        r = subprocess.run([self.bin / "psql", *self.conn(), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
                            "postgres"], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"psql {sql!r} failed: {r.stderr[-2000:]}"
        return r.stdout.strip()

    def prepare_tpcb(self, scale: int = SCALE) -> None:
        """pgbench's tables at ``scale``, the ledger table, and a checkpoint."""
        r = subprocess.run([self.bin / "pgbench", *self.conn(), "-i", "-s", str(scale), "-q", "postgres"],
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"pgbench -i failed: {r.stderr[-2000:]}"
        self.psql("CREATE TABLE ledger (client int, seq bigint, PRIMARY KEY (client, seq))")
        self.psql("CHECKPOINT")

    def pgbench(self, script: Path, log_prefix: Path, *, clients: int, seconds: int, extra: tuple[str, ...] = ()
                ) -> subprocess.Popen[str]:
        """pgbench running ``script`` (started, not waited for), a per-transaction log per thread."""
        return subprocess.Popen(
            [self.bin / "pgbench", *self.conn(), "-n", "-f", os.fspath(script), "-D", "seq=0", "-c", str(clients),
             "-j", str(min(clients, 2)), "-T", str(seconds), "-l", f"--log-prefix={log_prefix}", *extra, "postgres"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    def amcheck(self) -> subprocess.CompletedProcess[str]:
        """``pg_amcheck`` of every database, heap and B-tree indexes (amcheck installed if missing)."""
        return subprocess.run([self.bin / "pg_amcheck", *self.conn(), "--all", "--install-missing",
                               "--heapallindexed"], capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)

    def stop(self, timeout: float = 60) -> None:
        """A fast shutdown (SIGINT), then SIGKILL of the process group if it does not end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.crash()

    def crash(self) -> None:
        """SIGKILL the postmaster and its backends (its process group: it started it)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def tpcb_script(where: Path) -> Path:
    path = where / "tpcb-ledger.sql"
    path.write_text(TPCB_LEDGER)
    return path


def committed(log_prefix: Path) -> dict[int, int]:
    """Client -> how many transactions pgbench reported committed (its ``-l`` lines; a line
    whose time is not a number is a failed transaction, not counted)."""
    counts: dict[int, int] = defaultdict(int)
    for f in log_prefix.parent.glob(f"{log_prefix.name}.*"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                counts[int(parts[0])] += 1
    return dict(counts)


def missing(pg: Postgres, reported: dict[int, int]) -> list[tuple[int, int]]:
    """The (client, seq) of transactions reported committed that the database lacks."""
    rows = pg.psql("SELECT client, seq FROM ledger")
    present = {(int(c), int(s)) for c, s in (line.split("|") for line in rows.splitlines() if line)}
    return sorted((c, s) for c, n in reported.items() for s in range(1, n + 1) if (c, s) not in present)
