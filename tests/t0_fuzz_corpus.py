"""The seed corpus of the fuzz targets (``tests/corpus/TARGET/``), replayed and mutated.

What holds (marsfs.testing.fuzz has the targets; ``scripts/fuzz`` runs atheris on them):

* the corpus is current: every seed :func:`write_corpus` makes is in ``tests/corpus`` byte for
  byte, and every message type has a valid seed, so a new message cannot go unfuzzed;
* every ``ok-*`` input is accepted, every ``bad-*`` one is refused with the project's own error,
  and any other file there (an input a fuzzer found, kept with its fix) raises nothing else;
* no input, and no hypothesis mutation of one (bytes flipped, cut, inserted, spliced), lets
  another exception escape, and none makes decoding hold more than a bounded amount of memory.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marsfs.replication.protocol import FrameDecoder, MsgType
from marsfs.testing.fuzz import Targets, run_one, targets, write_corpus

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(p for p in CORPUS.glob("*/*") if p.is_file())
FUZZ = int(os.environ.get("MARSFS_FUZZ_EXAMPLES", "300"))  #: a soak sets it higher
PEAK = 48 << 20  #: bytes one input may make decoding allocate (a frame is at most 8 MiB)


@pytest.fixture(scope="module")
def fuzz_targets() -> Iterator[Targets]:
    t = targets()
    try:
        yield t
    finally:
        t.close()


def test_the_corpus_is_current(tmp_path: Path) -> None:
    counts = write_corpus(tmp_path)
    for made in sorted(tmp_path.glob("*/*")):
        kept = CORPUS / made.parent.name / made.name
        assert kept.is_file() and kept.read_bytes() == made.read_bytes(), \
            f"{kept} is missing or stale: regenerate with write_corpus(Path('tests/corpus'))"
    assert set(counts) == {p.name for p in CORPUS.iterdir()}, "a target without seeds, or seeds of no target"


def test_every_message_type_has_a_valid_seed() -> None:
    seen = set()
    for p in (CORPUS / "frames").glob("ok-*"):
        seen |= {f.type for f in FrameDecoder().feed(p.read_bytes())}
    assert seen == set(MsgType), f"message types without a seed: {sorted(set(MsgType) - seen)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_seed_is_accepted_or_refused_as_its_name_says(path: Path, fuzz_targets: Targets) -> None:
    target = fuzz_targets.by_name[path.parent.name]
    tracemalloc.start()
    try:
        refused = run_one(target, path.read_bytes())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if path.name.startswith("ok-"):
        assert refused is None, f"{path.name} is valid but was refused ({refused})"
    elif path.name.startswith("bad-"):
        assert refused is not None, f"{path.name} must be refused but was accepted"
    assert peak < PEAK, f"{path.name}: decoding held {peak} bytes"


def _mutate(data: bytes, edits: list[tuple[int, int, int]], other: bytes) -> bytes:
    """Apply (kind, position, byte) edits: flip, delete, insert, cut, splice with another seed."""
    buf = bytearray(data)
    for kind, pos, b in edits:
        at = pos % (len(buf) + 1)
        if kind == 0 and buf:
            buf[at % len(buf)] ^= b or 1
        elif kind == 1 and buf:
            del buf[at % len(buf)]
        elif kind == 2:
            buf.insert(at, b)
        elif kind == 3:
            del buf[at:]
        else:
            buf[at:] = other[pos % (len(other) + 1):]
    return bytes(buf)


@settings(max_examples=FUZZ, deadline=None)
@given(st.sampled_from(FILES), st.sampled_from(FILES),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_seeds_raise_only_our_own_errors(path: Path, other: Path, edits: list[tuple[int, int, int]]) -> None:
    t = targets()
    try:
        run_one(t.by_name[path.parent.name], _mutate(path.read_bytes(), edits, other.read_bytes()))
    finally:
        t.close()
