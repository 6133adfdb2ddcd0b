"""The import layout holds: no import cycles among dpft's modules and `dpft --help` stays light.

The import graph is read from the source with ``ast``, every ``import``/``from … import`` counted,
also the lazy ones inside functions (they run sooner or later, and a cycle through them is still a
tangle a reader has to follow). An edge goes to the module a statement names: ``from dpft.x import
y`` points at ``dpft.x.y`` when that is a module, else at ``dpft.x`` (``y`` is a name defined there).
Importing ``dpft.x.y`` also runs ``dpft/x/__init__.py``; that implicit edge to a parent package is
not counted, as for any package whose ``__init__`` re-exports its submodules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dpft

ROOT = Path(dpft.__file__).resolve().parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module → the dpft modules it imports (anywhere in its body)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` steps above this one
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                # `import dpft.a.b` names dpft.a.b; a name inside a module points at that module
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and t != "dpft":
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# The layers, lowest first (README "Architecture", docs/architecture.md). A module imports only its
# own layer or lower ones; a subsystem package's modules share their package's layer.
LAYERS = [
    ["dpft", "dpft.errors", "dpft.console"],
    ["dpft.hub", "dpft.optim", "dpft.tracking", "dpft.store"],
    ["dpft.config", "dpft.data", "dpft.models"],
    ["dpft.methods"],
    ["dpft.engine"],
    ["dpft.run", "dpft.audit", "dpft.bench", "dpft.browse"],
    ["dpft.sweeps"],
    ["dpft.report"],
    ["dpft.cli"],
]


def layer_of(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (i, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def test_no_import_cycles_among_dpft_modules():
    graph = import_graph()
    assert "dpft.cli" in graph and graph["dpft.cli"], "the graph reader found no imports"
    assert cycles(graph) == []


def test_no_upward_imports():
    """Lazy imports inside functions count: `import dpft.engine.optim` from dpft/methods/base.py
    (the old layout) is an upward import."""
    graph = import_graph()
    assert all(layer_of(m) >= 0 for m in graph)
    assert upward_imports(graph) == []
    assert upward_imports({"dpft.methods.base": {"dpft.engine.step"}, "dpft.engine.step": {"dpft.models"}}) == \
        [("dpft.methods.base", "dpft.engine.step")]


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is reported."""
    pkg = tmp_path / "dpft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dpft.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (pkg / "c.py").write_text("import dpft.a\n")
    graph = import_graph(pkg)
    assert graph["dpft.a"] == {"dpft.sub.b"} and graph["dpft.sub.b"] == {"dpft.a"}
    assert cycles(graph) == [["dpft.a", "dpft.sub.b"]]


def test_help_does_not_import_torch():
    code = ("import sys\nfrom dpft.cli import main\nsys.argv = ['dpft', '--help']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "sweep" in out.stdout and out.stdout.strip().endswith("NO-TORCH"), (out.stdout, out.stderr)
