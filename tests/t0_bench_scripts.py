"""The pure parts of the benchmark scripts: where the debootstrap benchmark finds its Debian
mirror in apt's sources, the alternating-runs ratio the benchmarks report, and the order of the
runs (every measured run between two baseline runs)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture
def scripts() -> Iterator[tuple[ModuleType, ModuleType]]:
    """``benchlib`` and ``bench_debootstrap``, imported as the scripts import each other."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("benchlib"), importlib.import_module("bench_debootstrap")
    finally:
        sys.path.remove(str(SCRIPTS))


DEB822 = """\
Types: deb
# a snapshot, commented out
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
"""


def test_the_mirror_comes_from_the_deb_stanza_of_the_suite(scripts: tuple[ModuleType, ModuleType]) -> None:
    _lib, deb = scripts
    assert deb.deb822_mirrors(DEB822, "bookworm") == ["http://mirror.example/debian"]
    assert deb.deb822_mirrors(DEB822, "bookworm-security") == ["http://mirror.example/debian-security"]
    assert deb.deb822_mirrors(DEB822, "trixie") == []
    disabled = DEB822.replace("Types: deb\n# a", "Enabled: no\nTypes: deb\n# a", 1)
    assert deb.deb822_mirrors(disabled, "bookworm") == []


def test_one_line_sources_with_options_and_comments(scripts: tuple[ModuleType, ModuleType]) -> None:
    _lib, deb = scripts
    text = ("# deb http://old.example/debian bookworm main\n"
            "deb-src http://src.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://one.example/debian bookworm main\n"
            "deb http://two.example/debian bookworm-updates main  # updates\n")
    assert deb.one_line_mirrors(text, "bookworm") == ["http://one.example/debian"]
    assert deb.one_line_mirrors(text, "bookworm-updates") == ["http://two.example/debian"]


def test_apt_mirror_reads_both_kinds_of_file(scripts: tuple[ModuleType, ModuleType], tmp_path: Path) -> None:
    _lib, deb = scripts
    (tmp_path / "sources.list.d").mkdir()
    assert deb.apt_mirror("bookworm", tmp_path) is None
    (tmp_path / "sources.list").write_text("deb http://one.example/debian bookworm main\n")
    assert deb.apt_mirror("bookworm", tmp_path) == "http://one.example/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert deb.apt_mirror("bookworm", tmp_path) == "http://mirror.example/debian"  # deb822 first, as apt today


def test_each_run_against_the_mean_of_its_baseline_neighbours(scripts: tuple[ModuleType, ModuleType]) -> None:
    lib, _deb = scripts
    runs = [("A", 10.0), ("C", 15.0), ("A", 20.0), ("C", None), ("A", 30.0), ("C", 60.0), ("X", 1.0), ("C", 5.0)]
    # 15 / mean(10, 20); the failed run gives nothing; 60 / 30 (X is no baseline); the last has no A beside it
    assert lib.pair_ratios(runs, "C", "A") == [1.0, 2.0]
    assert lib.pair_ratios([("A", None), ("C", 3.0), ("A", 6.0)], "C", "A") == [0.5]


def test_every_measured_run_sits_between_two_plain_runs(scripts: tuple[ModuleType, ModuleType]) -> None:
    _lib, deb = scripts
    assert deb.order(2, False) == ["plain", "mirror", "plain", "mirror", "plain"]
    assert deb.order(1, True) == ["plain", "mirror", "alone", "plain"]
    times = {"plain": 20.0, "mirror": 30.0, "alone": 25.0}
    results = [deb.Result(k, debootstrap_s=times[k], syncfs_s=1.0, umount_s=1.0) for k in deb.order(2, True)]
    assert deb.ratios(results, "mirror") == [1.5, 1.5]
    assert deb.ratios(results, "alone") == [1.25, 1.25]
    assert deb.ratios(results, "mirror", total=True) == [32 / 22, 32 / 22]


def test_the_targets_table_gets_one_row_refreshed_in_place(scripts: tuple[ModuleType, ModuleType],
                                                           tmp_path: Path) -> None:
    _lib, deb = scripts
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# B\n\n| target | from | result |\n|---|---|---|\n| core: x | foundation | met |\n\nWhere\n")
    results = [deb.Result("plain", debootstrap_s=10.0, syncfs_s=0.0, umount_s=0.0, fsck="clean"),
               deb.Result("mirror", debootstrap_s=15.0, syncfs_s=0.0, umount_s=0.0, fsck="clean",
                          mirror_fsck="clean", synced_after_s=0.5),
               deb.Result("plain", debootstrap_s=10.0, syncfs_s=0.0, umount_s=0.0, fsck="clean")]
    deb.target_row(doc, results, 1.0, False)
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| debootstrap:")]
    assert len(rows) == 1 and "missed: 1.50" in rows[0] and "e2fsck clean" in rows[0]
    assert doc.read_text().index("| core: x") < doc.read_text().index("| debootstrap:") < doc.read_text().index("Where")
    results[1].debootstrap_s, results[1].mirror_fsck = 11.0, "e2fsck exited 4: ..."
    deb.target_row(doc, results, 3.0, True)
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| debootstrap:")]
    assert len(rows) == 1 and "met: 1.10" in rows[0] and "disturbed" in rows[0] and "found errors" in rows[0]


def test_a_report_quotes_the_command_line_without_where_files_go(scripts: tuple[ModuleType, ModuleType]) -> None:
    benchlib, _ = scripts
    argv = ["--runtime", "8", "--out", "docs/b.md", "--json=/tmp/x.json", "--dir", "/var/tmp", "--mirror", "M",
            "--quick"]
    assert benchlib.shown_args(argv) == ["--runtime", "8", "--mirror", "M", "--quick"]
    assert benchlib.shown_args(argv, "--mirror") == ["--runtime", "8", "--quick"]
    assert benchlib.shown_args(["--mirror=M", "--repeat", "2"], "--mirror") == ["--repeat", "2"]
