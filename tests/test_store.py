"""The store's directory objects and the metric sinks, on their own (the CLI tests cover them
end to end): a run directory's lifecycle, the resume truncation before the metrics sink opens,
and the fan-out."""

from __future__ import annotations

import json

import pytest

from dpft.store import AuditDir, RunDir, Store
from dpft.tracking import MetricSink, Sinks


def test_run_directory_lifecycle_keeps_every_attempt(tmp_path):
    run = Store(tmp_path).run("abc123")
    assert run.status() is None and run.begin("a: 1\n", ["a=1"]) is None  # nothing to archive yet
    meta = {"run_id": "abc123", "status": "running"}
    run.write_meta(meta)
    assert run.status() == "running" and run.config() == {"a": 1}
    run.finish(meta, "interrupted")
    assert run.status() == "interrupted" and "time_end" in run.meta()
    archived = run.begin("a: 2\n", ["a=2"])  # a new attempt: the old one is moved aside, whole
    assert archived is not None and archived.parent.parent == run.path
    assert RunDir(archived).status() == "interrupted" and RunDir(archived).config() == {"a": 1}
    assert run.config() == {"a": 2} and run.status() is None
    run.write_meta(meta)
    run.write_summary({"final": 0.5})
    run.finish(meta, "done")
    assert run.status() == "done" and [r.run_id for r in Store(tmp_path).runs()] == ["abc123"]
    assert Store(tmp_path).find_run("abc").path == run.path


def test_resume_truncates_the_metrics_before_the_sink_appends(tmp_path):
    run = Store(tmp_path).run("r")
    run.path.mkdir(parents=True)
    sink = run.metrics_sink()  # made before the engine truncates, as dpft/run.py does
    run.write_metrics([{"step": s, "x": float(s)} for s in (1, 2, 3, 4)])
    assert run.logged_after(2) == 2  # steps 3 and 4 were released before the crash
    run.truncate_metrics(2)
    sink.log({"step": 3, "x": float("nan")})
    sink.close()
    assert [r["step"] for r in run.metrics()] == [1, 2, 3] and run.last_step() == 3
    assert json.loads(run.metrics_path.read_text().splitlines()[-1])["x"] is None  # NaN → null


def test_audit_directory_is_a_run_directory_with_a_result(tmp_path):
    audit = Store(tmp_path).audit("0123abcd")
    assert isinstance(audit, AuditDir) and audit.result() is None
    audit.begin("a: 1\n")
    audit.write_result({"auc": 0.5})
    assert audit.result() == {"auc": 0.5} and audit.config() == {"a": 1}


class _Recorder(MetricSink):
    def __init__(self, name, calls, fail_close=False):
        self.name, self.calls, self.fail_close = name, calls, fail_close

    def log(self, record):
        self.calls.append((self.name, "log", record["step"]))

    def live(self, record):
        self.calls.append((self.name, "live", record["step"]))

    def log_summary(self, summary):
        self.calls.append((self.name, "summary"))

    def close(self, exit_code=0):
        self.calls.append((self.name, "close", exit_code))
        if self.fail_close:
            raise OSError(f"{self.name} failed")


def test_fan_out_hands_each_record_to_every_sink_and_closes_all():
    calls = []
    sinks = Sinks(_Recorder("a", calls, fail_close=True), None, _Recorder("b", calls))
    sinks.log({"step": 1})
    sinks.live({"step": 1})
    sinks.log_summary({})
    with pytest.raises(OSError, match="a failed"):
        sinks.close(130)
    assert calls == [("a", "log", 1), ("b", "log", 1), ("a", "live", 1), ("b", "live", 1),
                     ("a", "summary"), ("b", "summary"), ("a", "close", 130), ("b", "close", 130)]
