"""Table-to-text tasks (E2E, DART) as (table, text) pairs: one pair = one privacy unit.

Sources: the Hugging Face hub (``task.hub``) or ``task.data_dir`` in the official layouts:
* E2E v1.0.0 CSVs (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``; columns ``mr,ref``,
  the test file writes them ``"mr","ref"``). An MR such as ``name[The Vaults], eatType[pub]`` is
  linearised to ``name : The Vaults | eatType : pub``.
* DART v1.1.1 JSON (a list of ``{tripleset: [[s, p, o], ...], annotations: [{source, text}]}``) and
  the WebNLG-style XML of the official test split (``<entry>`` with ``<mtriple>s | p | o</mtriple>``
  and one ``<lex>`` per reference). Triples are linearised to ``s : p : o | s : p : o``.

A table with several references appears once per reference in a split (E2E's train set has ~8.7
rows per MR): the privacy unit is the (table, text) row, as in Li et al. 2022 — a table with k
references contributes up to k examples. Evaluation groups the references by table for
multi-reference scoring (``Pairs.grouped``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dpft.errors import DpftError

log = logging.getLogger("dpft")
_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")


@dataclass
class Pairs:
    """Rows of (linearised table, reference text)."""

    sources: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.sources)

    def grouped(self, max_tables: int | None = None) -> tuple[list[str], list[list[str]]]:
        """Distinct tables in order of first appearance and all their references."""
        refs: dict[str, list[str]] = {}
        for s, t in zip(self.sources, self.targets):
            refs.setdefault(s, []).append(t)
        tables = list(refs)
        if max_tables is not None:
            tables = tables[: int(max_tables)]
        return tables, [refs[t] for t in tables]

    def cap(self, n) -> "Pairs":
        if n is None or int(n) >= len(self):
            return self
        return Pairs(self.sources[: int(n)], self.targets[: int(n)])


def linearize_mr(mr: str, where: str) -> str:
    """``name[The Vaults], eatType[pub]`` → ``name : The Vaults | eatType : pub``."""
    slots, pos = [], 0
    text = mr.strip()
    for m in _MR_SLOT.finditer(text):
        if m.start() != pos:
            break
        slots.append(f"{m.group(1).strip()} : {m.group(2).strip()}")
        pos = m.end()
    if not slots or pos != len(text):
        raise DpftError(f"{where}: not an E2E meaning representation (slot[value], ...): {mr[:80]!r}")
    return " | ".join(slots)


def linearize_triples(triples, where: str) -> str:
    out = []
    for t in triples:
        if not isinstance(t, (list, tuple)) or len(t) != 3:
            raise DpftError(f"{where}: a DART triple must be [subject, relation, object], got {t!r:.80}")
        out.append(" : ".join(" ".join(str(x).split()) for x in t))
    if not out:
        raise DpftError(f"{where}: empty tripleset")
    return " | ".join(out)


# -- readers ---------------------------------------------------------------------------------------

def read_e2e_csv(path: Path, linearize: bool = True) -> Pairs:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DpftError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DpftError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise DpftError(f"{path}: empty file")
    header = [h.strip().lower() for h in rows[0]]
    if "mr" not in header or "ref" not in header:
        raise DpftError(f"{path}: expected E2E columns mr,ref (got {', '.join(rows[0])}); "
                        f"testset.csv has no references: use testset_w_refs.csv")
    i_mr, i_ref = header.index("mr"), header.index("ref")
    sources, targets = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DpftError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
        mr, ref = row[i_mr].strip(), " ".join(row[i_ref].split())
        if not mr or not ref:
            raise DpftError(f"{path}:{lineno}: empty mr or ref")
        sources.append(linearize_mr(mr, f"{path}:{lineno}") if linearize else mr)
        targets.append(ref)
    return Pairs(sources, targets)


def _skipped(where: str, empty: int) -> None:
    if empty:
        log.warning("%s: skipped %d empty reference text(s)", where, empty)


def _dart_examples(items, where: str) -> Pairs:
    sources, targets, empty = [], [], 0
    for i, ex in enumerate(items):
        if not isinstance(ex, dict) or "tripleset" not in ex or "annotations" not in ex:
            raise DpftError(f"{where}: example {i} lacks tripleset/annotations")
        src = linearize_triples(ex["tripleset"], f"{where}: example {i}")
        ann = ex["annotations"]
        if not isinstance(ann, (list, dict)):
            raise DpftError(f"{where}: example {i} annotations must be a list of {{source, text}}")
        texts = ann.get("text", []) if isinstance(ann, dict) else [a.get("text") if isinstance(a, dict) else None
                                                                    for a in ann]
        for t in texts:
            if t is not None and not isinstance(t, str):
                raise DpftError(f"{where}: example {i} has a non-text annotation {t!r:.60}")
            if not t or not t.strip():
                empty += 1
                continue
            sources.append(src)
            targets.append(" ".join(t.split()))
    _skipped(where, empty)
    if not sources:
        raise DpftError(f"{where}: no reference text in any example")
    return Pairs(sources, targets)


def read_dart_json(path: Path) -> Pairs:
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DpftError(f"{path}: not valid UTF-8 JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(raw, list):
        raise DpftError(f"{path}: expected a list of DART examples")
    return _dart_examples(raw, str(path))


def read_webnlg_xml(path: Path) -> Pairs:
    """WebNLG-style XML (DART's official test file): one pair per non-empty ``<lex>`` of each
    ``<entry>`` (the official v1.1.1 test file has 12,552 ``<lex>``, one of them empty: entry Id116)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DpftError(f"{path}: malformed XML ({e})") from None
    entries = root.iter("entry")
    sources, targets, empty = [], [], 0
    for k, entry in enumerate(entries):
        where = f"{path}: entry {entry.get('eid', k + 1)}"
        triples = []
        for mt in entry.iter("mtriple"):
            parts = [p.strip() for p in (mt.text or "").split("|")]
            if len(parts) != 3:
                raise DpftError(f"{where}: <mtriple> must be 'subject | relation | object', got {mt.text!r:.80}")
            triples.append(parts)
        src = linearize_triples(triples, where)
        for lx in entry.iter("lex"):
            t = " ".join((lx.text or "").split())
            if not t:
                empty += 1
                continue
            sources.append(src)
            targets.append(t)
    _skipped(str(path), empty)
    if not sources:
        raise DpftError(f"{path}: no <entry> with a <lex> reference text")
    return Pairs(sources, targets)


def read_file(path: Path, task_cfg) -> Pairs:
    fmt = str(task_cfg.get("format", "e2e"))
    if path.suffix == ".xml":
        return read_webnlg_xml(path)
    if path.suffix == ".json":
        return read_dart_json(path)
    if path.suffix == ".csv":
        return read_e2e_csv(path, bool(task_cfg.get("linearize", True)))
    raise DpftError(f"{path}: unknown {fmt} file type (expected .csv, .json or .xml)")


# -- loading ---------------------------------------------------------------------------------------

def _find(d: Path, names) -> Path | None:
    for name in names or []:
        if (d / name).is_file():
            return d / name
    return None


def load_dir(task_cfg) -> tuple[Pairs, Pairs, Pairs | None, str]:
    d = Path(os.path.expanduser(str(task_cfg.data_dir)))
    if not d.is_dir():
        raise DpftError(f"task.data_dir {d} does not exist or is not a directory")
    out = {}
    for split in ("train", "eval", "test"):
        names = list(task_cfg.files.get(split) or [])
        path = _find(d, names)
        if path is None:
            if split == "test":
                out[split] = None
                continue
            raise DpftError(f"task.data_dir {d}: no {split} file (looked for {', '.join(names)})")
        out[split] = read_file(path, task_cfg)
    return out["train"], out["eval"], out["test"], str(d)


def load_hub(task_cfg) -> tuple[Pairs, Pairs, Pairs | None, str]:
    hub = task_cfg.hub
    ident = hub.path + (f"/{hub.name}" if hub.get("name") else "")
    hint = (f"task {task_cfg.name}: hub dataset {ident} is not reachable; connect to the internet (and "
            f"`pip install dpft[hub]`), or pass task.data_dir=DIR with the official files "
            f"({'/'.join(task_cfg.files.train)}, {'/'.join(task_cfg.files.eval)})")
    try:
        import datasets
    except ImportError:
        raise DpftError(hint) from None
    try:
        ds = datasets.load_dataset(hub.path, hub.get("name"))
    except Exception:  # offline, no cache, or hub error: the same two ways out
        raise DpftError(hint) from None
    out = {}
    for split in ("train", "eval", "test"):
        name = hub.get(f"{split}_split")
        if not name or name not in ds:
            if split == "test":
                out[split] = None
                continue
            raise DpftError(f"task {task_cfg.name}: hub dataset {ident} has no split {name!r}")
        part = ds[name]
        if task_cfg.format == "dart":
            out[split] = _dart_examples(list(part), f"hub:{ident}[{name}]")
        else:
            mrs, refs = part[hub.source_field], part[hub.target_field]
            lin = bool(task_cfg.get("linearize", True))
            out[split] = Pairs([linearize_mr(m, f"hub:{ident}[{name}]") if lin else m for m in mrs],
                               [" ".join(r.split()) for r in refs])
    return out["train"], out["eval"], out["test"], f"hub:{ident}"
