"""Coverage-guided fuzzing of what a peer or a disk hands a node, with atheris (libFuzzer).

    scripts/fuzz TARGET [--seconds S] [--runs N] [--out DIR]

TARGET is one of ``frames``, ``message``, ``record``, ``meta`` (marsfs.testing.fuzz says what
each takes) or ``all`` (each in turn, S seconds each). It starts from the seed corpus in
``tests/corpus/TARGET/`` and keeps what it finds in ``DIR/TARGET/`` (default under /var/tmp), so
the checked-in corpus changes only by hand. An input that makes anything but the project's own
errors escape is a finding: libFuzzer writes it to ``DIR/TARGET/crash-*`` and this exits 1;
add it to ``tests/corpus/TARGET/`` with the fix, where tests/t0_fuzz_corpus.py keeps it
fixed. Memory is bounded by libFuzzer's ``-rss_limit_mb`` (1 GiB: a frame is at most 8 MiB).
Not part of the test suite; the suite replays the corpus and hypothesis mutations of it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("frames", "message", "record", "meta")


def fuzz_one(target: str, seconds: int, runs: int, out: Path) -> int:
    """Run atheris on one target in this process (libFuzzer owns the process from here)."""
    import atheris

    with atheris.instrument_imports(include=["marsfs"]):
        from marsfs.testing import fuzz

    work = out / target
    work.mkdir(parents=True, exist_ok=True)
    fn = fuzz.targets().by_name[target]

    def one(data: bytes) -> None:
        fuzz.run_one(fn, data)

    args = [sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=1024", "-timeout=20",
            f"-artifact_prefix={work}/", os.fspath(work), os.fspath(ROOT / "tests" / "corpus" / target)]
    if runs:
        args.insert(1, f"-runs={runs}")
    atheris.Setup(args, one)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/fuzz", description=(__doc__ or "").splitlines()[0])
    p.add_argument("target", choices=(*NAMES, "all"))
    p.add_argument("--seconds", type=int, default=60, help="time per target (default 60)")
    p.add_argument("--runs", type=int, default=0, help="stop after this many inputs (default: no limit)")
    p.add_argument("--out", type=Path, default=Path("/var/tmp/marsfs-fuzz"), help="where found inputs go")
    args = p.parse_args(argv)
    if args.target != "all":
        return fuzz_one(args.target, args.seconds, args.runs, args.out)
    failed = []
    for name in NAMES:  # libFuzzer ends its process: one child per target
        cmd = [sys.executable, __file__, name, "--seconds", str(args.seconds), "--runs", str(args.runs),
               "--out", os.fspath(args.out)]
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        print(f"scripts/fuzz: findings in {', '.join(failed)}: see {args.out}/TARGET/crash-*", file=sys.stderr)
        return 1
    print(f"scripts/fuzz: no findings in {', '.join(NAMES)} ({args.seconds} s each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
