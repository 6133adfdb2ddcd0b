"""python benchmarks/bench_table.py OUT/bench_*.json  — `dpft bench --json` files as the Markdown
tables of docs/benchmarks.md (one per file: step time and peak memory, with ratios to non-private)."""

from __future__ import annotations

import json
import sys

ORDER = ["nonprivate", "opacus-hooks", "opacus-ghost"]


def table(path: str) -> str:
    d = json.load(open(path))
    head = (f"**{d['model']}** (pretrained={d['pretrained']}), B = {d['batch_size']}, L = {d['length']}, "
            f"physical batch {d['physical_batch_size']}, {d['optim']}, autocast {d['autocast']}, on {d['device']}, "
            f"torch {d['torch']}, {d['date']} (`{path}`); memory: {d['memory']}")
    mb = d.get("max_batch_limit")
    rows = ["| path | step (ms) | × non-private | peak memory (GiB) | × non-private | "
            + (f"largest batch ≤ {mb} | " if mb else "") + "extras |", "|---" * (7 if mb else 6) + "|"]
    paths = sorted(d["paths"], key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
    for p in paths:
        r = d["paths"][p]
        ratio = lambda k: "—" if r.get(k) is None else f"{r[k]:.2f}"  # noqa: E731
        extras = ", ".join(f"{k[:-5]} {100 * v:.1f} %" for k, v in r.items() if k.endswith("_frac"))
        rows.append(f"| {p} | {1000 * r['step_s']:.1f} | {ratio('time_ratio')} | {r['peak_mem_bytes'] / 2**30:.2f} | "
                    f"{ratio('mem_ratio')} | " + (f"{r.get('max_batch') or '—'} | " if mb else "") + f"{extras} |")
    return head + "\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_table.py FILE.json [...]")
    print("\n".join(table(f) for f in sys.argv[1:]))
