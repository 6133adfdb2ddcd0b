"""Task loading: embedded generator, GLUE TSV (quoting off), JSON subsets, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpft.config import compose_run
from dpft.data.synthetic import make_split
from dpft.data.tasks import load_task
from dpft.errors import DpftError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _task(*overrides):
    return compose_run(list(overrides)).cfg.task


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_split(2000, 7), make_split(2000, 7)
    assert a == b and make_split(2000, 8) != a
    assert 0.45 < sum(a[1]) / 2000 < 0.55
    negated = [t for (t,), y in zip(*a) if " not " in f" {t} " and y == 1]
    assert negated, "negation must flip polarity in some positives"


def test_glue_tsv_with_stray_quote(tmp_path):
    (tmp_path / "train.tsv").write_text('index\tquestion\tsentence\tlabel\n0\t"What is it?\tA stray quote.\tentailment\n'
                                        "1\tWho?\tNobody .\tnot_entailment\n")
    (tmp_path / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWhy?\tBecause .\tentailment\n")
    data = load_task(_task("task=qnli", f"task.data_dir={tmp_path}"))
    assert len(data.train) == 2, "a CSV reader with quoting would merge the rows"
    assert data.train.texts[0] == ('"What is it?', "A stray quote.") and data.train.labels == [0, 1]


def test_tsv_with_utf8_byte_order_mark(tmp_path):
    """Files saved by spreadsheet tools start with a BOM; the header must still read 'sentence'."""
    (tmp_path / "train.tsv").write_bytes("\ufeffsentence\tlabel\nfine film .\t1\nbad .\t0\n".encode("utf-8"))
    (tmp_path / "dev.tsv").write_bytes("\ufeffsentence\tlabel\nok .\t1\n".encode("utf-8"))
    data = load_task(_task("task=sst2", f"task.data_dir={tmp_path}"))
    assert data.train.texts == [("fine film .",), ("bad .",)] and data.train.labels == [1, 0]
    assert len(data.eval) == 1


def test_json_subset_layout(tmp_path):
    ex = {"0": {"text_a": "q1", "text_b": "q2", "label": "1"}, "1": {"text_a": "a", "text_b": "b", "label": "0"}}
    for name in ("train.json", "dev.json"):
        (tmp_path / name).write_text(json.dumps(ex))
    data = load_task(_task("task=qqp", f"task.data_dir={tmp_path}"))
    assert data.train.texts == [("q1", "q2"), ("a", "b")] and data.train.labels == [1, 0]


@pytest.mark.parametrize("content,message", [
    ("sentence\tlabel\nfine .\t7\n", "label '7' is not one of"),
    ("text\tlabel\nfine .\t1\n", "no column 'sentence'"),
    ("", "empty file"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok .\t1\n")
    with pytest.raises(DpftError, match=message):
        load_task(_task("task=sst2", f"task.data_dir={tmp_path}"))


def test_non_utf8_file(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok .\t1\n")
    with pytest.raises(DpftError, match="not UTF-8"):
        load_task(_task("task=sst2", f"task.data_dir={tmp_path}"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
@pytest.mark.parametrize("task,sub,n_train,n_eval", [
    ("sst2", "sst2", 67349, 872),
    ("qnli", "qnli/subset_powerfulpromptft", 8999, 1000),
    ("qqp", "qqp/subset_powerfulpromptft", 8999, 1000),
    ("mnli", "mnli/subset_powerfulpromptft", 8999, 1000),
])
def test_real_shared_data(task, sub, n_train, n_eval):
    data = load_task(_task(f"task={task}", f"task.data_dir={SHARED / sub}"))
    assert (len(data.train), len(data.eval)) == (n_train, n_eval)
    assert set(data.train.labels) == set(range(len(data.labels)))


@pytest.mark.skipif(not (SHARED / "qnli" / "dev.tsv").is_file(), reason="../shared/data not present")
def test_real_qnli_dev_keeps_all_rows_with_stray_quotes(tmp_path):
    (tmp_path / "dev.tsv").symlink_to(SHARED / "qnli" / "dev.tsv")
    (tmp_path / "train.tsv").symlink_to(SHARED / "qnli" / "dev.tsv")
    data = load_task(_task("task=qnli", f"task.data_dir={tmp_path}"))
    assert len(data.eval) == 5463
