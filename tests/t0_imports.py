"""The package's import graph: no cycles, and no layer imports a higher one.

Read from the source with :mod:`ast`, so imports under ``TYPE_CHECKING`` and inside functions
count as much as those at the top: a type-only back reference is still a class pointing back
at its user. The layers, lowest first, are docs/architecture.md's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src" / "marsfs"

#: lowest first; a module may import its own layer and those before it. ``testing`` is the
#: kit the tests use and may import anything; only :data:`KIT_USERS` import it.
LAYERS = ["base", "log", "volume", "replication", "node", "faces", "cli"]
BASE = {"errors", "units", "fsutil", "aio", "names", "stats"}
#: the demo walks a cluster the way the suite does, so it starts nodes with the test kit
KIT_USERS = {"marsfs.demo"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``marsfs`` module ``path`` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("marsfs"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if not mod.startswith("marsfs"):
                continue
            # `from marsfs.volume import resync` imports a module, not a name: the edge goes to
            # it (Python runs the package's __init__ first, but a package being initialised is
            # already in sys.modules, so that is no cycle); a name goes to the module it is in
            subs = {a.name for a in node.names
                    if (ROOT.parent / (mod + "." + a.name).replace(".", "/")).with_suffix(".py").exists()}
            found.update(f"{mod}.{a}" for a in subs)
            if len(subs) < len(node.names):
                found.add(mod)
    return found


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        # importing a package runs its __init__; importing marsfs.x.y also imports marsfs.x
        edges[name] = {m for m in imports_of(path) if m in mods and m != name}
    return edges


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    """The graph, read once for the module's tests (reading it parses every module)."""
    return graph()


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    top = parts[1]
    if top in BASE:
        return "base"
    if top in ("cli", "demo", "__main__"):
        return "cli"
    return top


def test_the_graph_is_read() -> None:
    g = graph()
    assert "marsfs.node.node" in g and any(m.startswith("marsfs.volume") for m in g["marsfs.node.node"])
    assert len(g) > 40


def test_no_import_cycle() -> None:
    """Depth-first search for a back edge; the message names the whole cycle."""
    g = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(graph()))
def test_no_layer_imports_a_higher_one(module: str, edges: dict[str, set[str]]) -> None:
    mine = layer_of(module)
    if mine == "testing":
        return
    for dep in edges[module]:
        theirs = layer_of(dep)
        if theirs == "testing":
            assert module in KIT_USERS, f"{module} imports the test kit {dep}"
            continue
        assert LAYERS.index(theirs) <= LAYERS.index(mine), f"{module} ({mine}) imports {dep} ({theirs})"


@pytest.mark.parametrize("layer", ["node", "faces"])
def test_the_layer_table_lists_each_module_once(layer: str) -> None:
    """docs/architecture.md's row for ``layer`` names every module of the package, once."""
    doc = (ROOT.parent.parent / "docs" / "architecture.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith(f"| {layer} |"))
    listed = re.findall(r"`([a-z_]+\.py)`", row)
    modules = sorted(p.name for p in (ROOT / layer).glob("*.py") if p.name != "__init__.py")
    assert sorted(listed) == modules, f"the {layer} row lists {sorted(listed)}; the package holds {modules}"


#: what a command-line process must not load: each is tens of milliseconds of start-up, paid by
#: every ``marsfs create`` of a script (the daemon's event loop, the terminal view, certificates,
#: the node, volume and log layers)
DAEMON_ONLY = ("trio", "rich", "cryptography", "pyfuse3", "lz4", "marsfs.node.node", "marsfs.node.cluster",
               "marsfs.volume.volume", "marsfs.log.log", "marsfs.faces.control", "marsfs.faces.view")


@pytest.mark.parametrize("argv", [["create", "vm", "--size", "1G"], ["delete", "vm"], ["mark", "vm", "m"]])
def test_the_command_line_starts_without_the_daemon_s_modules(argv: list[str]) -> None:
    """Parse a command as ``marsfs`` does and build its request; then look what got imported."""
    import subprocess
    import sys

    code = ("import sys\nfrom marsfs.cli import build_parser\nfrom marsfs.faces.commands import COMMANDS\n"
            f"args = build_parser().parse_args({argv!r})\nCOMMANDS[args.command].request_args(args)\n"
            "print(' '.join(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(ROOT.parent), "PATH": "/usr/bin:/bin"})
    loaded = set(r.stdout.split())
    assert not [m for m in DAEMON_ONLY if m in loaded], f"marsfs {' '.join(argv)} imports daemon modules"
