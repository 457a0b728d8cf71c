"""What an operator is told, through real daemons, where the words depend on the cluster.

* While a mirror's first copy runs, commands on the volume there say it is still being copied
  and to wait (``marsfs wait VOL --synced``), never "no volume ... create it".

(The same words in-process, with ``create``'s, and the refusals of ``leave`` on an open mirror
and of a handover to a lost primary: tests/t2_commands.py, tests/t3_handover.py.)
"""

from __future__ import annotations

import random

from marsfs.testing.checks import write_synced
from marsfs.testing.harness import Harness

MiB = 1 << 20


def test_commands_during_a_first_sync_say_it_is_being_copied(harness: Harness) -> None:
    nodes = harness.cluster(["a", "b"])
    a, b = nodes["a"], nodes["b"]
    a.cli("create", "vm", "--size", "16M")
    write_synced(a.image("vm"), 0, random.Random(1).randbytes(2 * MiB))
    b.cli("join", "vm", "--from", "a", "--rate", "64K")  # 2 MiB to send: a copy of half a minute
    for args in (("clone", "vm@lsn-0", "c"), ("verify", "vm"), ("pause-fetch", "vm")):
        r = b.cli(*args, check=False)
        assert r.returncode == 1, (args, r)
        assert "'vm' is still being copied to node b from a (its first sync)" in r.stderr, (args, r.stderr)
        assert "marsfs wait vm --synced" in r.stderr and "create it" not in r.stderr, (args, r.stderr)
