"""dpft command line. Heavy libraries (torch, transformers, wandb, pandas) are imported inside
commands so `dpft --help` stays fast."""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from dpft.console import OneLineUsageErrors, cli_errors, error, make_console, setup_logging, silence_stdout
from dpft.errors import DpftError


app = typer.Typer(
    cls=OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Differentially private fine-tuning experiments: train, sweep, report.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

OVERRIDES_HELP = "Hydra overrides: key=value, +key=value, ~key, group=option (e.g. method=dpsgd task=sst2)."


@app.command(context_settings={"ignore_unknown_options": False})
@cli_errors
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", help="Re-run even if this config already finished (the "
                               "earlier attempt is kept under attempts/<k>/)."),
    resume: bool = typer.Option(False, "--resume", help="Require a checkpoint to continue (resuming is the "
                                "default whenever one exists; this fails if there is none)."),
    restart: bool = typer.Option(False, "--restart", help="Start an unfinished run over instead of continuing "
                                 "its checkpoint (the attempt is kept under attempts/<k>/)."),
    wait: bool = typer.Option(False, "--wait", help="If another process is training this config, wait for it "
                              "instead of refusing (then skip it if it finished)."),
) -> None:
    """Compose a config and train it (default: DP-SGD, MiniLM, embedded task, ε=8); run again, an
    interrupted run continues from its checkpoint."""
    from dpft import store
    from dpft.config import compose_run
    from dpft.run import check_flags

    check_flags(force, resume or None, restart)
    spec = compose_run(overrides or [])
    rundir = store.Store(spec.cfg.paths.output_dir).run(spec.run_id)
    path = rundir.path
    if rundir.status() == "done" and not force:  # before torch & co.: skipping is instant
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"{spec.slug} [{spec.run_id}] already done: {path} (use --force to re-run)")
        return
    setup_logging()
    from dpft.engine import distributed
    from dpft.run import AlreadyDone, train_spec

    nproc = distributed.check_config(spec.cfg)
    if spec.cfg.launcher == "torchrun" and not distributed.in_worker():
        distributed.launch(nproc, ["train", *(overrides or []), *(["--force"] if force else []),
                                   *(["--resume"] if resume else []), *(["--restart"] if restart else []),
                                   *(["--wait"] if wait else [])])
        return
    try:
        summary = train_spec(spec, force=force, resume=resume or None, restart=restart, wait=wait)
    except AlreadyDone as e:
        if not distributed.in_worker() or os.environ.get("RANK") == "0":
            typer.echo(f"{spec.slug} [{spec.run_id}] already done: {e.path} (use --force to re-run)")
        return
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            error(_interrupted_message(rundir, overrides or []))
        raise typer.Exit(130) from None
    if not distributed.in_worker() or os.environ.get("RANK") == "0":
        _print_summary(spec, summary, path)


def _interrupted_message(rundir, overrides: list[str]) -> str:
    """The one line Ctrl-C leaves: where the run stopped and the command that continues it."""
    import shlex

    path = rundir.path
    again = " ".join(["dpft", "train", *map(shlex.quote, overrides)])
    if rundir.has_checkpoint():
        return f"interrupted after step {rundir.last_step()}; its last checkpoint is in {path}; " \
               f"resume with: {again}"
    return f"interrupted before any checkpoint ({path}); `{again}` starts it again from step 1"


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _print_summary(spec, summary: dict, path=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    p = summary["privacy"]
    spent = f"  ε spent {p['epsilon']:.4g}" if p.get("private") and isinstance(p.get("epsilon"), (int, float)) else ""
    # escape: rich would read "[a692c970dac7]" as a markup tag and print nothing
    table = Table(title=escape(f"{spec.slug}  [{spec.run_id}]{spent}"), show_header=False)
    metric = summary["metric"]
    table.add_row(f"final {escape(metric)}", _fmt(summary["final"]))
    table.add_row(f"best {escape(metric)}", _fmt(summary["best"]))
    if summary.get("test_metrics"):  # generation tasks: the test tables decoded after training
        table.add_row(f"test {escape(metric)}", _fmt(summary["test_metrics"].get(metric)))
    table.add_row("steps to 90% / 95% of target", f"{_fmt(summary['steps_to_90'])} / {_fmt(summary['steps_to_95'])}"
                  f"  (target {_fmt(summary['target'])})")
    if p.get("private"):
        table.add_row("ε spent (δ)", escape(f"{p['epsilon']:.4f}  (δ={p['delta']:.3g}, {p['accountant']})"))
        indep = f"{_fmt(p.get('epsilon_independent'))}"
        if p.get("accountants_disagree"):
            table.add_row("[bold red]accountants disagree[/]",
                          f"[bold red]independent ε = {escape(indep)} vs {p['epsilon']:.4f}: check the ledger[/]")
        else:
            table.add_row(escape(f"independent ε ({p.get('independent_accountant', 'dp_accounting')})"), escape(indep))
        table.add_row("σ, C, q, steps", f"{p['sigma']:.4f}, {p['clip_norm']}, {p['sample_rate']:.4g}, {p['steps']}")
        if p.get("steps_charged_twice"):
            table.add_row("steps charged twice", f"{p['steps_charged_twice']} (logged before a crash, re-run with fresh noise)")
        if p.get("noise"):
            style = "bold yellow" if p.get("simulation") else ""
            guarantee = escape(f"{p['noise']}: {p.get('guarantee', '')}")
            table.add_row("noise", f"[{style}]{guarantee}[/]" if style else guarantee)
        if summary.get("nonprivate_metrics"):
            table.add_row("non-private metrics", escape(f"{len(summary['nonprivate_metrics'])} train/* keys "
                                                        "(outside the guarantee; diagnostics.nonprivate=false drops them)"))
    else:
        table.add_row("ε spent", "∞ (non-private)")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    if path is not None:
        table.add_row("run dir", escape(str(path)))
    make_console().print(table)


@app.command()
@cli_errors
def show(overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False)) -> None:
    """Print the composed, resolved config and its run id."""
    from omegaconf import OmegaConf
    from rich.syntax import Syntax

    from dpft.config import compose_run

    spec = compose_run(overrides or [])
    console = make_console()
    console.print(f"# run id: {spec.run_id}   slug: {spec.slug}", markup=False, highlight=False)
    text = OmegaConf.to_yaml(spec.cfg, resolve=True)
    if console.is_terminal:
        console.print(Syntax(text, "yaml"))
    else:
        typer.echo(text)

def _overrides_and_paths(tokens: list[str]) -> tuple[list[str], str | None]:
    """Split `paths.output_dir=DIR` (where the store lives) from the other overrides."""
    out, other = None, []
    for tok in tokens:
        if tok.startswith("paths.output_dir="):
            out = tok.split("=", 1)[1]
        else:
            other.append(tok)
    return other, out


def _list_sweeps_table(console) -> None:
    from rich.table import Table

    from dpft.sweeps.spec import PACKAGE_SWEEPS, list_sweeps

    table = Table(title="sweeps: dpft sweep NAME \\[overrides], dpft report NAME", title_justify="left")
    table.add_column("name", style="cyan", no_wrap=True)
    table.add_column("what")
    for name, path in list_sweeps().items():
        para = []  # the first comment paragraph that is not a command line, up to its first sentence
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            text = line.lstrip("#").strip()
            if not line.startswith("#") or (not text and para):
                break
            if text and not text.startswith("dpft "):
                para.append(text)
        first = " ".join(para).split(". ")[0].rstrip(".")
        where = "" if path.resolve().parent == PACKAGE_SWEEPS else f"  ({path})"
        table.add_row(name, first + where)
    console.print(table)


@app.command(name="sweep")
@cli_errors
def sweep_cmd(
    name: Optional[str] = typer.Argument(None, show_default=False,
                                         help="Sweep name (see `dpft sweep` for the list) or path to a sweep .yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides that replace or narrow the sweep's axes "
                                                    "(e.g. seed=0, task=sst2,qnli, paths.output_dir=DIR).",
                                                    show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write and show the plan, run nothing."),
    executor: str = typer.Option("local", "--executor", "-e", help="local | inline | slurm | submitit-local"),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Parallel jobs (local: default one per "
                                          "GPU, else 1; slurm: array parallelism)."),
    force: bool = typer.Option(False, "--force", help="Re-run every job, finished ones included."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-run jobs that failed before."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop everything at the first failed job."),
    submitit: Optional[List[str]] = typer.Option(None, "--submitit", help="submitit parameter KEY=VALUE, repeatable "
                                                 "(e.g. slurm_partition=gpu timeout_min=240 slurm_setup=[...])."),
) -> None:
    """Run a paper table: expand NAME's grid, write the plan, run the missing jobs (resumable)."""

    console = make_console()
    if not name:
        _list_sweeps_table(console)
        return
    import yaml

    from dpft.sweeps.executors import EXECUTORS, make_executor
    from dpft.sweeps.plan import make_plan, write_plan
    from dpft.sweeps.scheduler import run_plan
    from dpft.sweeps.spec import load_sweep

    if executor not in EXECUTORS:
        raise DpftError(f"unknown executor '{executor}'; choose one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise DpftError("--workers must be >= 1")
    params = {}
    for item in submitit or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DpftError(f"--submitit expects KEY=VALUE, got '{item}'")
        params[key] = yaml.safe_load(value)
    from dpft.sweeps.spec import find_sweep

    found = find_sweep(name)
    if not found.read_bytes().strip():  # YAML reads it as null: an empty grid, i.e. one default job
        raise DpftError(f"sweep file {found} is empty; a sweep needs overrides and/or a grid "
                        "(see dpft/sweeps/kappa.yaml)")
    sweep = load_sweep(name)
    with console.status(f"composing the jobs of {sweep.name}…"):
        plan = make_plan(sweep, overrides or [])
    plan_path = write_plan(plan, sweep)
    _show_plan(console, plan, plan_path)
    if dry_run:
        return
    setup_logging()
    ex = make_executor(executor, plan, force, workers, params)
    if hasattr(ex, "describe"):
        console.print(ex.describe(), highlight=False)
    result = run_plan(plan, ex, force=force, retry_failed=retry_failed, fail_fast=fail_fast, console=console)
    from dpft.sweeps.display import counts

    c = counts(result.tasks)
    console.print("sweep " + plan.name + ": " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())), highlight=False)
    for t in result.failed:
        console.print(f"  failed {t.job.run_id} {t.job.describe()}: {t.note}", highlight=False, markup=False)
    if result.interrupted:
        error("interrupted; run the same command again to resume")
    elif result.failed:
        error(f"{len(result.failed)} job(s) failed" + ("" if retry_failed else "; re-run with --retry-failed"))
    else:
        console.print(f"report: dpft report {name}" + (f" paths.output_dir={plan.output_dir}"
                      if str(plan.output_dir) != "outputs" else ""), highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _show_plan(console, plan, plan_path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from dpft.sweeps.plan import job_state

    states = [job_state(plan.output_dir, j.run_id) for j in plan.jobs]
    summary = {}
    for s in states:
        summary[s] = summary.get(s, 0) + 1
    dup = f", {plan.duplicates} grid points share a config" if plan.duplicates else ""
    common = [o for o in plan.jobs[0].overrides if all(o in j.overrides for j in plan.jobs)]
    # title and caption as lines of their own: as a table's they would wrap to its width; and
    # escaped where they reach markup: a list value (`target_modules=[query]`) is not a tag
    console.print(f"plan {plan.name}: {len(plan.jobs)} jobs{dup}  → {plan_path}", markup=False, highlight=False,
                  soft_wrap=True)
    table = Table()
    for col in ("#", "run id", "state", "job"):
        table.add_column(col, overflow="fold")
    for i, (job, st) in enumerate(zip(plan.jobs, states), 1):
        rest = [o for o in job.overrides if o not in common]
        table.add_row(str(i), job.run_id, st, escape(" ".join(rest) or job.describe()))
    console.print(table)
    console.print("every job: dpft train " + " ".join(common), markup=False, highlight=False, soft_wrap=True)
    console.print("states: " + ", ".join(f"{v} {k}" for k, v in sorted(summary.items())), highlight=False)


@app.command(name="report")
@cli_errors
def report_cmd(
    name: str = typer.Argument(..., help="Sweep name or path to a sweep .yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="paths.output_dir=DIR to read another store; other "
                                                    "overrides re-expand the grid instead of reading the saved plan.",
                                                    show_default=False),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write the report (default "
                                      "<output_dir>/reports/<name>)."),
    from_wandb: bool = typer.Option(False, "--from-wandb", help="First pull the plan's finished runs from W&B "
                                    "into the local store (needs network and credentials)."),
    wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="W&B project (default: the runs' "
                                                "logger.wandb.project)."),
    wandb_entity: Optional[str] = typer.Option(None, "--wandb-entity", help="W&B entity."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Also draw the PNG/PDF curves."),
) -> None:
    """Render a sweep's table (Markdown, LaTeX, CSV, terminal) and curves from the local run store."""
    from pathlib import Path


    from dpft import report as rp
    from dpft.sweeps.plan import make_plan, plan_sweep_file, read_plan
    from dpft.sweeps.spec import load_sweep

    console = make_console()
    grid_overrides, output_dir = _overrides_and_paths(overrides or [])
    sweep, not_found = None, None
    try:
        sweep = load_sweep(name)
    except DpftError as e:  # the saved plan (with its frozen copy of the file) may still be in the store
        not_found = e
    if output_dir is None:
        from dpft.config import compose_run

        output_dir = str(compose_run([]).cfg.paths.output_dir)
    plan = None if grid_overrides else read_plan(output_dir, sweep.name if sweep else Path(name).stem)
    if plan is None:
        if sweep is None:
            raise not_found
        with console.status(f"expanding {sweep.name}…"):
            plan = make_plan(sweep, [*grid_overrides, f"paths.output_dir={output_dir}"])
    frozen = plan_sweep_file(plan) if sweep is None else None
    block = sweep.report if sweep is not None else (frozen.report if frozen else {})
    if from_wandb:
        stats = rp.pull_from_wandb(plan, wandb_project, wandb_entity)
        console.print("W&B: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items()), highlight=False)
    from dpft import store

    out_dir = Path(out) if out else store.Store(output_dir).report(plan.name).path
    rep = rp.render(plan, block, out_dir, plots=plots)
    console.print(rp.rich_table(rep))
    if rep.missing:
        console.print(f"{len(rep.missing)} of {len(plan.jobs)} planned runs not finished: "
                      + ", ".join(j.run_id for j in rep.missing[:10]) + (" …" if len(rep.missing) > 10 else ""),
                      highlight=False)
    for f in rep.files:
        console.print(f"wrote {f}", highlight=False)


def _output_dir(output_dir: Optional[str]) -> str:
    if output_dir is not None:
        return output_dir
    from dpft.config import compose_run

    return str(compose_run([]).cfg.paths.output_dir)


@app.command(name="runs")
@cli_errors
def runs_cmd(
    filters: Optional[List[str]] = typer.Argument(None, show_default=False, help="KEY=VALUE filters, all must hold: "
                                                  "a config group (method=denoise, task=sst2), any dotted config key "
                                                  "(privacy.epsilon=3, train.steps=30), status=done; "
                                                  "paths.output_dir=DIR reads another store."),
    limit: int = typer.Option(50, "--limit", "-n", help="Show the newest N runs (0 = all)."),
) -> None:
    """List the runs in the store, newest first: id, slug, status, ε spent, final metric, age."""
    from rich.markup import escape
    from rich.table import Table

    from dpft import browse, store

    tokens, output_dir = _overrides_and_paths(filters or [])
    output_dir = _output_dir(output_dir)
    wanted = browse.parse_filters(tokens)
    records = browse.select([browse.record(r) for r in store.Store(output_dir).runs()], wanted)
    records.sort(key=lambda r: r.age_s)
    total = len(records)
    if limit > 0:
        records = records[:limit]
    where = escape(str(store.Store(output_dir).runs_root))
    shown = f"{len(records)} of {total}" if len(records) < total else str(total)
    table = Table(title=f"{shown} run(s) in {where}" + (escape(f"  ({' '.join(tokens)})") if tokens else ""),
                  title_justify="left")
    for col in ("run id", "slug", "status", "step", "ε spent", "final", "age"):
        table.add_column(col, justify="right" if col in ("step", "ε spent", "final", "age") else "left",
                         no_wrap=col in ("run id", "status", "age"), overflow="fold")
    style = {"done": "green", "running": "yellow", "failed": "bold red", "interrupted": "magenta", "stale": "magenta"}
    for r in records:
        final = "—" if r.final is None else (f"{r.metric} {r.final:.4f}" if isinstance(r.final, (int, float))
                                             else f"{r.metric} {r.final}")
        st = r.status
        table.add_row(r.run_id, escape(r.slug), f"[{style[st]}]{st}[/]" if st in style else escape(st),
                      f"{r.step}/{r.steps}" if r.steps else str(r.step), browse.fmt_eps(r.epsilon), escape(final),
                      browse.age(r.age_s))
    make_console().print(table)


@app.command(name="diff")
@cli_errors
def diff_cmd(
    a: str = typer.Argument(..., help="Run id or a unique prefix of one."),
    b: str = typer.Argument(..., help="Run id or a unique prefix of one."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="The store (default paths.output_dir)."),
) -> None:
    """Two runs side by side: the config keys that differ, then their metrics and privacy."""
    from rich.markup import escape
    from rich.table import Table

    from dpft import browse, store

    output_dir = _output_dir(output_dir)
    ra, rb = (browse.record(store.Store(output_dir).find_run(ref)) for ref in (a, b))
    console = make_console()
    cfg = Table(title=f"config: {ra.run_id} vs {rb.run_id}", title_justify="left")
    for col in ("key", ra.run_id, rb.run_id):
        cfg.add_column(col, overflow="fold")
    rows = browse.config_diff(ra, rb)
    for key, va, vb in rows:
        cfg.add_row(escape(key), escape(str(va)), escape(str(vb)))
    if rows:
        console.print(cfg)
    else:
        console.print("config: identical (the same run id with --force re-runs, or a hand-edited store)",
                      highlight=False, markup=False)
    res = Table(title="result", title_justify="left")
    for col in ("", ra.run_id, rb.run_id):
        res.add_column(col, overflow="fold")
    for label, va, vb in browse.metric_rows(ra, rb):
        res.add_row(escape(label), escape(va), escape(vb))
    console.print(res)
    console.print(f"{ra.run_id}: {ra.path}\n{rb.run_id}: {rb.path}", highlight=False, markup=False)


@app.command()
@cli_errors
def bench(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    paths: str = typer.Option("nonprivate,dpsgd-hooks,dpsgd-ghost", help="Comma-separated: nonprivate, "
                              "<method>-hooks|ghost|bk (the method's extras are timed too, e.g. grape-ghost), "
                              "opacus-hooks, opacus-ghost (Opacus' own make_private, the comparator)."),
    batch: int = typer.Option(32, help="Logical batch size (fixed, not Poisson, for timing)."),
    length: int = typer.Option(128, help="Sequence length."),
    steps: int = typer.Option(5, help="Timed steps per path (median reported)."),
    warmup: int = typer.Option(2, help="Untimed warm-up steps per path."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="CUDA only: also find each path's largest "
                                            "physical batch ≤ this whose step fits in memory (doubling, then bisection)."),
    interleave: bool = typer.Option(False, "--interleave", help="Build every path first, then run the steps "
                                    "round-robin over the paths; ratios are medians of per-round ratios (robust to a "
                                    "machine whose speed drifts; every path's model in memory at once)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Time non-private vs DP step paths side by side on this device; print ratios."""
    import json as _json

    from dpft.bench import bench as run_bench
    from dpft.bench import parse_path
    from dpft.config import compose_run
    from dpft.engine.prepare import resolve_device

    setup_logging()
    spec = compose_run(overrides or [])
    if batch < 1 or length < 1 or steps < 1 or warmup < 0 or (max_batch is not None and max_batch < 1):
        raise DpftError("--batch, --length, --steps and --max-batch must be >= 1, --warmup >= 0")
    if interleave and warmup < 2:
        raise DpftError("--interleave needs --warmup >= 2 (each path's memory is measured over its warm-up steps)")
    device = resolve_device(str(spec.cfg.runtime.device))
    path_list = [p.strip() for p in paths.split(",") if p.strip()]
    if not path_list:
        raise DpftError("--paths is empty; e.g. --paths nonprivate,dpsgd-hooks,dpsgd-ghost")
    for p in path_list:  # all paths checked before any is timed
        if p != "nonprivate":
            parse_path(p)
    out = run_bench(spec.cfg, path_list, batch, length, steps, warmup, device, max_batch=max_batch,
                    interleave=interleave)
    if as_json:
        typer.echo(_json.dumps(out, indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table(title=f"dpft bench: {out['model']} B={batch} L={length} on {out['device']}",
                  caption=f"memory: {out['memory']}; {out['schedule']}")
    cols = ["path", "step (ms)", "× non-private", "peak mem (MiB)", "× non-private", "extras"]
    if max_batch is not None:
        cols.insert(5, f"largest batch ≤ {max_batch}")
    for col in cols:
        table.add_column(col, justify="right" if col != "path" else "left")
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for name, r in out["paths"].items():
        extras = ", ".join(f"{k}={100 * v:.2f}%" for k, v in r.items() if k.endswith("_frac"))
        row = [name, f"{1000 * r['step_s']:.1f}", fmt(r.get("time_ratio"), ".2f"),
               f"{r['peak_mem_bytes'] / 2**20:.0f}", fmt(r.get("mem_ratio"), ".2f"), extras]
        if max_batch is not None:
            row.insert(5, fmt(r.get("max_batch"), "d"))
        table.add_row(*row)
    make_console().print(table)


@app.command()
@cli_errors
def audit(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP + " Without debug=..., the "
                                                    "debug=audit preset (tiny, ε=2, δ=1e-5; seconds on a CPU).",
                                                    show_default=False),
    canaries: int = typer.Option(500, "--canaries", "-m", help="Canaries m; each joins the training set with "
                                 "probability 1/2."),
    length: int = typer.Option(8, "--canary-length", help="Random words per canary (per text field)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the ε lower bound."),
    canary: str = typer.Option("input", "--canary", help="Canaries: input (random-word sentences, the whole data "
                               "path) | gradient (white-box: auditor-chosen per-sample gradients, clipped and "
                               "noised as an example's; docs/audit.md)."),
    score: Optional[str] = typer.Option(None, "--score", help="Membership score. input: embedding (default; how far "
                                        "the canary's own word-embedding rows moved) | loss (its loss decrease). "
                                        "gradient: iterates (default; every step's privatised release) | final "
                                        "(the final model only)."),
    force: bool = typer.Option(False, "--force", help="Re-run an audit that already has an audit.json."),
) -> None:
    """Empirical privacy audit: train once with canaries (one-run audit, Steinke et al. 2023) and
    turn a membership test on them into a lower bound on ε, compared with the claimed ε.
    Exit 1 if the bound exceeds the claim, or (--canary gradient) if the releases contradict the
    ledger's noise or sensitivity."""
    setup_logging()

    from dpft.audit import rich_table, run_audit
    from dpft.config import compose_run

    tokens = list(overrides or [])
    if not any(t.split("=", 1)[0].lstrip("+~") == "debug" for t in tokens):
        tokens.insert(0, "debug=audit")
    spec = compose_run(tokens)
    res = run_audit(spec, canaries, length, confidence, score=score, force=force, kind=canary)
    make_console().print(rich_table(res))
    if res.skipped:
        typer.echo(f"already audited: {res.path} (use --force to re-run)")
    r = res.result
    if r["violation"]:
        if r.get("exceeds_claim", True):
            error(f"the empirical ε lower bound {r['epsilon_lower_bound']:.3f} exceeds the claimed ε = "
                  f"{r['claimed_epsilon']:.3f} (δ={r['delta']:.3g}) at {100 * r['confidence']:.0f}% confidence: "
                  "the mechanism leaks more than it accounts for")
        else:
            failed = [k.replace("_", " ") for k, v in r["mechanism_checks"].items()
                      if isinstance(v, dict) and v["failed"]]
            error(f"the releases contradict the ledger's mechanism ({', '.join(failed)} check failed at "
                  f"p < {r['mechanism_checks']['significance']:g}): less noise or more sensitivity than it "
                  "accounts for")
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # the reader of our stdout left (`dpft runs | head -3`)
        silence_stdout()
        raise SystemExit(0) from None


if __name__ == "__main__":  # pragma: no cover
    main()
