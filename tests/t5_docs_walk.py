"""The user guide and the runbook, walked: every command of their ``sh`` blocks runs as written,
in order, against real daemons, loop devices and ext4, and must succeed. The README's
"A five-minute tour" is walked the same way, alone, in a sandbox of its own (only that section:
the README's setup commands set up the machine and run the test suite).

How a block is read:

* Lines are commands; a line ending in ``\\`` continues on the next; ``#`` comments are
  skipped, except ``# on NODE``, which says on which node the following commands run (a block
  starts on ``node1``). An indented block (inside a list) is read the same.
* ``<!-- walk: kill -KILL NODE -->`` before a block is what the walk does before it (the
  runbook's crash procedure needs a crashed daemon). It is the only thing the docs do not show.

How it runs (the sandbox): one bash session runs every command but ``marsfs serve``, with the
``marsfs`` command on its PATH. ``marsfs serve`` lines start the daemon in the background (as
systemd or tmux would) and wait until it answers. Only paths and addresses are substituted, per
node: ``/var/lib/marsfs`` (the default state directory, which the session also exports as
``MARSFS_STATE`` on each node, as on a real node), ``/mnt/marsfs``, ``/srv/``, ``/tmp/`` and
``/var/tmp/`` become directories of that node in the sandbox, ``/root/`` one directory all
nodes share (so what the docs copy between nodes with scp is there), and ``10.0.0.N:7600`` a
free port on 127.0.0.1. Loop devices are whatever ``losetup --find`` gives, as the docs say.

A command that exits non-zero, or whose output holds a traceback, fails the test with the doc,
line and command. Everything left behind (filesystems, loop devices, daemons, FUSE mounts
under the sandbox) is released by the harness.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from marsfs.testing.harness import Harness, NodeProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WALKED = ("user-guide.md", "runbook.md")
TOUR = (ROOT / "README.md", "A five-minute tour")  #: walked alone: the doc and its section
NODE_COMMENT = re.compile(r"#\s*on (node\d+)\b")
DIRECTIVE = re.compile(r"<!--\s*walk:\s*(.*?)\s*-->")
COMMAND_TIMEOUT = 120.0


@dataclass(frozen=True)
class Step:
    doc: str
    line: int  #: where the command starts in the doc (1-based)
    node: str
    text: str  #: the command as written (continuations joined), or a directive
    directive: bool = False


def section_lines(doc: Path, section: str | None) -> list[str]:
    """``doc``'s lines; with ``section``, blank but for those under ``## section`` (up to the
    next ``## `` heading), so that line numbers stay the doc's."""
    lines = doc.read_text().splitlines()
    if section is None:
        return lines
    start = lines.index(f"## {section}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [ln if start <= i < end else "" for i, ln in enumerate(lines)]


def read_steps(doc: Path, section: str | None = None) -> Iterator[Step]:
    """The commands of ``doc``'s sh blocks (in ``section`` only, if given) and the walk
    directives, in order."""
    lines = section_lines(doc, section)
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        m = DIRECTIVE.fullmatch(stripped)
        if m:
            yield Step(doc.name, i + 1, "", m.group(1), directive=True)
        if stripped != "```sh":
            i += 1
            continue
        node = "node1"
        i += 1
        while lines[i].strip() != "```":
            start, text = i, lines[i].strip()
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            i += 1
            on = NODE_COMMENT.match(text)
            if on:
                node = on.group(1)
            elif text and not text.startswith("#"):
                yield Step(doc.name, start + 1, node, text)
        i += 1


class Shell:
    """One bash session: variables (``$dev``) and exports live across commands and blocks."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def run(self, command: str) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        mark = f"__walk_{uuid.uuid4().hex}__"
        self.proc.stdin.write(f"{{ {command}\n}} </dev/null 2>&1\nprintf '\\n%s %d\\n' {mark} $?\n")
        self.proc.stdin.flush()
        out: list[str] = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return -1, "".join(out) + "\n(the shell exited)"
            if line.startswith(mark):
                return int(line.split()[1]), "".join(out).rstrip("\n")
            out.append(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Walk:
    """The sandbox: nodes by name, their paths and ports, the shell."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.root = harness.root
        self.ports = {"node1": free_port(), "node2": free_port()}
        self.nodes: dict[str, NodeProcess] = {}
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        (self.root / "admin").mkdir()  # /root/ of the docs: the operator's own, on every node (the scp'd files)
        wrapper = bin_dir / "marsfs"
        wrapper.write_text(f'#!/bin/sh\n[ "$1" = serve ] && {{ echo "docs walk: marsfs serve runs on a line of '
                           f'its own" >&2; exit 99; }}\nexec {shlex.quote(sys.executable)} -m marsfs "$@"\n')
        wrapper.chmod(0o755)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
        self.shell = Shell(env)
        self.node = ""
        self._reaping = True
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        """Collect daemons that exited (the docs' ``kill -TERM`` + ``tail --pid`` waits for that)."""
        while self._reaping:
            for n in list(self.nodes.values()):
                if n.proc is not None:
                    n.proc.poll()
            time.sleep(0.05)

    def sandboxed(self, text: str, node: str) -> str:
        here = self.root / node
        table = {"/var/lib/marsfs": f"{here}/state", "/mnt/marsfs": f"{here}/mnt", "/srv/": f"{here}/srv/",
                 "/var/tmp/": f"{here}/tmp/", "/tmp/": f"{here}/tmp/", "/root/": f"{self.root}/admin/",
                 **{f"10.0.0.{n[-1]}:7600": f"127.0.0.1:{port}" for n, port in self.ports.items()}}
        return re.sub("|".join(map(re.escape, table)), lambda m: table[m.group(0)], text)

    def node_process(self, name: str) -> NodeProcess:
        if name not in self.nodes:
            mount = self.root / name / "mnt"
            existed = mount.exists()
            n = NodeProcess(self.root, name, certificates=False)  # the docs issue them
            if not existed:
                mount.rmdir()  # the docs create their mount points themselves
            (self.root / name / "tmp").mkdir(exist_ok=True)
            self.nodes[name] = n
            self.harness.nodes.append(n)
        return self.nodes[name]

    def step(self, step: Step) -> None:
        where = f"{step.doc}:{step.line}: {step.text}"
        if step.directive:
            verb, *args = step.text.split()
            assert verb == "kill" and args[0] == "-KILL" and len(args) == 2, f"unknown walk directive {where}"
            self.nodes[args[1]].kill()
            return
        node = self.node_process(step.node)
        if step.node != self.node:
            self.node = step.node
            rc, out = self.shell.run(f"export MARSFS_STATE={shlex.quote(os.fspath(node.state))}")
            assert rc == 0, out
        command = self.sandboxed(step.text, step.node)
        if step.text.startswith("marsfs serve "):
            self.serve(node, command, where)
            return
        rc, out = self.shell.run(command)
        assert rc == 0 and "Traceback" not in out, (
            f"{where}\n  ran: {command}\n  exit status {rc}, output:\n{out}\n{self.logs()}")

    def serve(self, node: NodeProcess, command: str, where: str) -> None:
        argv = shlex.split(command)[2:]
        extra: list[str] = []
        seen: dict[str, str] = {}
        while argv:
            arg = argv.pop(0)
            if arg in ("--node", "--state", "--mount"):
                seen[arg] = argv.pop(0)
            else:
                extra.append(arg)
        assert seen == {"--node": node.name, "--state": os.fspath(node.state), "--mount": os.fspath(node.mount)}, (
            f"{where}: the walk runs a node's daemon with its own --node, --state and --mount ({seen})")
        assert node.proc is None or node.proc.poll() is not None, f"{where}: {node.name}'s daemon still runs"
        node.extra = extra
        try:
            node.start(timeout=60)
        except RuntimeError as e:
            raise AssertionError(f"{where}\n  ran: {command}\n{e}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}'s daemon log:\n{n.log_tail(15)}" for n in self.nodes.values())

    def close(self) -> None:
        """Hand what the docs left behind to the harness, which releases it in the right order."""
        self._reaping = False
        self.shell.close()
        prefix = os.fspath(self.root) + "/"
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        fuse = {os.fspath(n.mount) for n in self.nodes.values()}
        self.harness.mounts += [Path(m) for m in mounts if m.startswith(prefix) and m not in fuse]
        loops = subprocess.run(["losetup", "-n", "-l", "-O", "NAME,BACK-FILE"], capture_output=True, text=True)
        self.harness.loops += [line.split()[0] for line in loops.stdout.splitlines()
                               if len(line.split()) > 1 and line.split()[1].startswith(prefix)]


def walk(harness: Harness, steps: list[Step]) -> None:
    w = Walk(harness)
    try:
        for step in steps:
            w.step(step)
    finally:
        w.close()


def test_docs_are_walked(harness: Harness) -> None:
    steps = [s for doc in WALKED for s in read_steps(DOCS / doc)]
    assert sum(1 for s in steps if s.text.startswith("marsfs serve")) >= 4  # the parser found the blocks
    walk(harness, steps)


def test_the_readme_tour_is_walked(harness: Harness) -> None:
    steps = list(read_steps(*TOUR))
    assert sum(1 for s in steps if s.text.startswith("marsfs serve")) == 3  # both nodes, then node2 again
    assert not any(s.text.startswith("scripts/") for s in steps)  # never the setup commands
    walk(harness, steps)


@pytest.mark.parametrize("doc, section", [*((d, None) for d in WALKED), ("README.md", TOUR[1])])
def test_every_sh_block_is_read(doc: str, section: str | None) -> None:
    """The reader misses no block: every line of every sh block is a command, a comment or a
    continuation (a block in another form would be skipped silently)."""
    path = TOUR[0] if section else DOCS / doc
    text = "\n".join(section_lines(path, section)) + "\n"
    blocks = re.findall(r"^[ \t]*```sh\n(.*?)^[ \t]*```$", text, flags=re.S | re.M)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    commands = [s for s in read_steps(path, section) if not s.directive]
    assert len(commands) == sum(1 for i, ln in enumerate(lines) if i == 0 or not lines[i - 1].endswith("\\"))
    assert text.count("```sh") == len(blocks) > 0
