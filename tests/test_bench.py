"""`dpft bench` measures every requested path side by side and reports ratios to non-private."""

from __future__ import annotations

import json


def test_bench_json_side_by_side(dpft):
    r = dpft("bench", "debug=tiny", "--batch", "8", "--length", "16", "--steps", "2", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["paths"]) == {"nonprivate", "dpsgd-hooks", "dpsgd-ghost"}
    assert out["paths"]["nonprivate"]["time_ratio"] == 1.0
    for res in out["paths"].values():
        assert res["step_s"] > 0 and res["steps"] == 2 and res["time_ratio"] > 0
    assert out["device"].startswith("cpu") and out["batch_size"] == 8 and out["length"] == 16


def test_bench_rejects_bad_sizes(dpft):
    r = dpft("bench", "debug=tiny", "--batch", "0")
    assert r.exit_code == 2 and "--batch" in r.stderr
