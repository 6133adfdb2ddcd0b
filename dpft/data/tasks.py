"""Load a task's train/eval examples as (texts, labels) from the embedded generator, a local
directory (GLUE TSV or the JSON subset layout), or the Hugging Face hub."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dpft.errors import DpftError

# GLUE TSV column names differ from the hub's for MNLI.
ALIASES = {"premise": ["sentence1"], "hypothesis": ["sentence2"], "is_duplicate": ["label"],
           "gold_label": ["label"], "label": ["gold_label", "is_duplicate"]}


@dataclass
class Split:
    texts: list[tuple[str, ...]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    train: Split  # or table2text.Pairs for generation tasks
    eval: Split
    labels: list[str]  # [] for generation tasks
    source: str  # where the data came from, recorded in meta.json
    test: object | None = None  # generation tasks: test Pairs, decoded once at the end


def is_generation(task_cfg) -> bool:
    kind = str(task_cfg.get("kind", "classification"))
    if kind not in ("classification", "generation"):
        raise DpftError(f"task.kind must be classification or generation, got {kind!r}")
    return kind == "generation"


def load_task(task_cfg) -> TaskData:
    if is_generation(task_cfg):
        return _load_generation(task_cfg)
    if task_cfg.source == "synthetic":
        from dpft.data.synthetic import make_split

        train = Split(*make_split(task_cfg.num_train, task_cfg.data_seed))
        ev = Split(*make_split(task_cfg.num_eval, task_cfg.data_seed + 1))
        data = TaskData(train, ev, list(task_cfg.labels), f"synthetic(seed={task_cfg.data_seed})")
    elif task_cfg.get("data_dir"):
        data = _load_dir(task_cfg)
    else:
        data = _load_hub(task_cfg)
    data.train = _cap(data.train, task_cfg.get("max_train_examples"))
    data.eval = _cap(data.eval, task_cfg.get("max_eval_examples"))
    if len(data.train) == 0 or len(data.eval) == 0:
        raise DpftError(f"task {task_cfg.name}: empty train or eval split ({data.source})")
    return data


def _load_generation(task_cfg) -> TaskData:
    from dpft.data import table2text

    load = table2text.load_dir if task_cfg.get("data_dir") else table2text.load_hub
    train, ev, test, source = load(task_cfg)
    train, ev = train.cap(task_cfg.get("max_train_examples")), ev.cap(task_cfg.get("max_eval_examples"))
    if len(train) == 0 or len(ev) == 0:
        raise DpftError(f"task {task_cfg.name}: empty train or eval split ({source})")
    return TaskData(train, ev, [], source, test=test)


def _cap(split: Split, n) -> Split:
    if n is None or n >= len(split):
        return split
    return Split(split.texts[: int(n)], split.labels[: int(n)])


def _label_index(task_cfg, raw, where: str) -> int:
    labels = [str(x) for x in task_cfg.labels]
    key = str(raw).strip()
    if key in labels:
        return labels.index(key)
    raise DpftError(f"{where}: label {key!r} is not one of {labels}")


def _find(dir_: Path, names) -> Path | None:
    for name in names:
        if (dir_ / name).is_file():
            return dir_ / name
    return None


def _load_dir(task_cfg) -> TaskData:
    d = Path(os.path.expanduser(str(task_cfg.data_dir)))
    if not d.is_dir():
        raise DpftError(f"task.data_dir {d} does not exist or is not a directory")
    splits = {}
    for split in ("train", "eval"):
        path = _find(d, task_cfg.files[split])
        if path is None:
            raise DpftError(f"task.data_dir {d}: no {split} file (looked for {', '.join(task_cfg.files[split])})")
        reader = _read_json if path.suffix == ".json" else _read_tsv
        splits[split] = reader(path, task_cfg)
    return TaskData(splits["train"], splits["eval"], [str(x) for x in task_cfg.labels], str(d))


def _column(header: list[str], name: str, path: Path) -> int:
    for cand in [name, *ALIASES.get(name, [])]:
        if cand in header:
            return header.index(cand)
    raise DpftError(f"{path}: no column {name!r} (columns: {', '.join(header)})")


def _read_tsv(path: Path, task_cfg) -> Split:
    # QUOTE_NONE: raw GLUE rows may start with a stray quote that a CSV reader would merge.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise DpftError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise DpftError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    cols = [_column(header, f, path) for f in task_cfg.text_fields]
    lab = _column(header, task_cfg.label_field, path)
    texts, labels = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < len(header):
            raise DpftError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
        texts.append(tuple(row[c].strip() for c in cols))
        labels.append(_label_index(task_cfg, row[lab], f"{path}:{lineno}"))
    return Split(texts, labels)


def _read_json(path: Path, task_cfg) -> Split:
    """The subset layout: {"0": {"text_a": ..., "text_b": ..., "label": "..."}, ...}."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DpftError(f"{path}: not valid UTF-8 JSON ({e})") from None
    items = list(raw.values()) if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise DpftError(f"{path}: expected an object of examples or a list")
    fields = ["text_a", "text_b"][: len(task_cfg.text_fields)]
    texts, labels = [], []
    for i, ex in enumerate(items):
        if not isinstance(ex, dict) or any(f not in ex for f in fields) or "label" not in ex:
            raise DpftError(f"{path}: example {i} lacks {fields + ['label']}")
        texts.append(tuple(str(ex[f]) for f in fields))
        labels.append(_label_index(task_cfg, ex["label"], f"{path}: example {i}"))
    return Split(texts, labels)


def _load_hub(task_cfg) -> TaskData:
    hint = (f"task {task_cfg.name}: hub dataset {task_cfg.hub.path}/{task_cfg.hub.name} is not reachable;"
            f" connect to the internet (and `pip install dpft[hub]`), or pass task.data_dir=DIR with"
            f" GLUE TSV ({'/'.join(task_cfg.files.train)}) or JSON-subset files")
    try:
        import datasets
    except ImportError:
        raise DpftError(hint) from None
    try:
        ds = datasets.load_dataset(task_cfg.hub.path, task_cfg.hub.name)
    except Exception:  # offline, no cache, or hub error: the same two ways out
        raise DpftError(hint) from None
    out = {}
    for split, name in (("train", task_cfg.hub.train_split), ("eval", task_cfg.hub.eval_split)):
        part = ds[name]
        texts = list(zip(*[part[f] for f in task_cfg.text_fields]))
        out[split] = Split([tuple(t) for t in texts], [int(x) for x in part["label"]])
    return TaskData(out["train"], out["eval"], [str(x) for x in task_cfg.labels],
                    f"hub:{task_cfg.hub.path}/{task_cfg.hub.name}")
