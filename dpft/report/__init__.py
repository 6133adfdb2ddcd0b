"""`dpft report NAME`: the runs of one sweep plan → Markdown / LaTeX / CSV tables and curves.

Only the run store is read (``outputs/runs/<run_id>/``), and only the run ids in the sweep's plan,
so other experiments in the same store never leak into a table. Every number is recomputed from
``metrics.jsonl`` (evaluation records), which makes runs pulled from W&B (`--from-wandb`) and
local runs indistinguishable. Outputs are byte-stable: rows and columns follow the plan's order,
floats have fixed formats, and nothing depends on time, paths or library-generated ids.

The ``report:`` block of a sweep file says what to tabulate; see ``dpft/sweeps/kappa.yaml``. Its
``compare:`` list states claims (treatment vs baseline rows, paired run for run) that are tested with
an exact sign test and a seeded bootstrap interval; see the README's "Claims" and any ``*-cpu.yaml``.

Modules, in the order a report is made: ``spec`` (the report block), ``labels`` (config values as
row/column labels), ``collect`` (runs from the store, measures), ``stats`` and ``claims`` (the
``compare:`` tests), ``tables`` (``build``: cells and caption), ``formats`` (md, tex, csv, terminal),
``plots`` (curves), ``render`` (write them all), ``wandb_import`` (``--from-wandb``).
"""

from dpft.report.formats import rich_table
from dpft.report.render import render
from dpft.report.tables import Report, build
from dpft.report.wandb_import import pull_from_wandb

__all__ = ["Report", "build", "pull_from_wandb", "render", "rich_table"]
