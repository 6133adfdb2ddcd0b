"""The store's layout has one home: dpft/store.py names every file and folder under
``paths.output_dir`` (runs/<id>/config.yaml, meta.json, …, sweeps/<name>/plan.jsonl, audits/,
reports/, attempts/); every other module asks a Store/RunDir/SweepDir/AuditDir/ReportDir.

The scan reads string literals (not docstrings or comments, which may describe the layout) from
the AST of every module outside dpft/store.py. A file name is flagged wherever it appears as a
path-like literal (no spaces); a folder name only where it is used as a path: an operand of ``/``,
an argument of ``Path(...)``/``joinpath``/``os.path.join``, a comparison (``p.name != "attempts"``)
or part of a literal with a slash. ``Path(__file__).parent / "sweeps"`` and ``Path.cwd() / "sweeps"``
(the sweep-file library and the user's sweep files, not the store) are not store paths."""

from __future__ import annotations

import ast
from pathlib import Path

import dpft

PACKAGE = Path(dpft.__file__).resolve().parent
FILES = ("config.yaml", "overrides.yaml", "meta.json", "summary.json", "metrics.jsonl", "checkpoint.pt",
         "plan.jsonl", "sweep.yaml", "sweep.json", "audit.json", "canaries.jsonl")
FOLDERS = ("runs", "sweeps", "audits", "reports", "attempts", "logs", "submitit")
PATH_CALLS = ("Path", "joinpath", "join", "PurePath")


def _docstrings(tree: ast.AST) -> set[int]:
    """Expression statements that are bare strings: docstrings and string comments."""
    return {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def _outside_store(node: ast.AST) -> bool:
    """`Path(__file__)...` or `Path.cwd()...`: a path in the source tree or the working directory."""
    text = ast.unparse(node)
    return "__file__" in text or "cwd()" in text


def findings(source: str, filename: str = "<string>") -> list[str]:
    """`file:line: literal` for every store file or folder name spelled in `source`."""
    tree = ast.parse(source, filename)
    skip = _docstrings(tree)
    parents = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
            continue
        value = node.value
        if not value or any(ch.isspace() for ch in value):
            continue  # prose (messages, help texts) may describe the layout
        parts = [p for p in value.split("/") if p]
        hit = any(p in FILES for p in parts) or value == ".log" or value.startswith("generations_")
        if not hit and "/" in value:
            hit = any(p in FOLDERS for p in parts)
        if not hit and value in FOLDERS:
            parent = parents.get(id(node))
            if isinstance(parent, ast.JoinedStr):
                parent = parents.get(id(parent))
            if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div):
                other = parent.left if parent.right is node else parent.right
                hit = not _outside_store(other)
            elif isinstance(parent, ast.Compare):
                hit = True
            elif isinstance(parent, ast.Call):
                f = parent.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                hit = name in PATH_CALLS
        if hit:
            out.append(f"{filename}:{node.lineno}: {value!r}")
    return out


def scan(package: Path) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        if rel.as_posix() == "dpft/store.py":
            continue
        out += findings(path.read_text(encoding="utf-8"), rel.as_posix())
    return out


def test_no_module_outside_the_store_names_a_store_file_or_folder():
    found = scan(PACKAGE)
    assert not found, "store layout spelled outside dpft/store.py (ask a Store/RunDir instead):\n" + "\n".join(found)


def test_the_scan_catches_each_way_a_layout_name_was_spelled():
    # the spellings the store replaced (engine/train.py, run.py, launch.py, audit.py, cli.py, report.py)
    caught = """
p = run_path / "metrics.jsonl"
meta = read_json(path / "meta.json")
msg = f"after step {last_step(path / 'metrics.jsonl')}"
CHECKPOINT = "checkpoint.pt"
root = Path(output_dir) / "runs"
while (path / "attempts" / str(k)).exists(): pass
keep = [p for p in path.iterdir() if p.name != "attempts"]
log = logs / f"{run_id}.log"
out = Path(out_dir) / f"generations_{split}.jsonl"
d = os.path.join(output_dir, "audits")
"""
    assert len(findings(caught)) == 10, findings(caught)
    allowed = '''
"""Docstrings may say runs/<id>/meta.json and metrics.jsonl."""
@app.command(name="runs")
def f():
    return "no run in runs/ yet: see outputs/runs" + (over or "runs")
PACKAGE_SWEEPS = Path(__file__).resolve().parent / "sweeps"
dirs = [Path.cwd() / "sweeps"]
'''
    assert findings(allowed) == []
