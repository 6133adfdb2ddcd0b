"""dpft command line. Heavy libraries (torch, transformers, wandb, pandas) are imported inside
commands so `dpft --help` stays fast."""

from __future__ import annotations

import functools
import logging
import sys
from typing import List, Optional

import typer

from dpft.errors import DpftError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    help="Differentially private fine-tuning experiments: train, sweep, report.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

OVERRIDES_HELP = "Hydra overrides: key=value, +key=value, ~key, group=option (e.g. method=dpsgd task=sst2)."


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def cli_errors(fn):
    """Bad input → one line on stderr and exit 2; Ctrl-C → exit 130. Never a traceback for these."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DpftError as e:
            _err(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _setup_logging() -> None:
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dpft").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's per-order RDP chatter
    # Known-harmless: Opacus' backward hooks fire w.r.t. outputs when inputs need no grad; the RDP
    # order grid note is about tightness, and the accountant's ε is what we report.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the")


@app.command(context_settings={"ignore_unknown_options": False})
@cli_errors
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    force: bool = typer.Option(False, "--force", help="Re-run even if this config already finished."),
) -> None:
    """Compose a config and train it (default: DP-SGD, MiniLM, embedded task, ε=8)."""
    _setup_logging()
    from dpft.config import compose_run
    from dpft.run import AlreadyDone, train_spec

    spec = compose_run(overrides or [])
    try:
        summary = train_spec(spec, force=force)
    except AlreadyDone as e:
        typer.echo(f"{spec.slug} [{spec.run_id}] already done: {e.path} (use --force to re-run)")
        return
    _print_summary(spec, summary)


def _print_summary(spec, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.slug}  [{spec.run_id}]", show_header=False)
    metric = summary["metric"]
    fmt = lambda v: "—" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    table.add_row(f"final {metric}", fmt(summary["final"]))
    table.add_row(f"best {metric}", fmt(summary["best"]))
    table.add_row("steps to 90% / 95% of target", f"{fmt(summary['steps_to_90'])} / {fmt(summary['steps_to_95'])}"
                  f"  (target {fmt(summary['target'])})")
    p = summary["privacy"]
    if p.get("private"):
        table.add_row("ε spent (δ)", f"{p['epsilon']:.4f}  (δ={p['delta']:.3g}, {p['accountant']}; "
                      f"independent {fmt(p['epsilon_independent'])})")
        table.add_row("σ, C, q, steps", f"{p['sigma']:.4f}, {p['clip_norm']}, {p['sample_rate']:.4g}, {p['steps']}")
    else:
        table.add_row("ε spent", "∞ (non-private)")
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    Console(stderr=False).print(table)


@app.command()
@cli_errors
def show(overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False)) -> None:
    """Print the composed, resolved config and its run id."""
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.syntax import Syntax

    from dpft.config import compose_run

    spec = compose_run(overrides or [])
    console = Console()
    console.print(f"# run id: {spec.run_id}   slug: {spec.slug}")
    text = OmegaConf.to_yaml(spec.cfg, resolve=True)
    if console.is_terminal:
        console.print(Syntax(text, "yaml"))
    else:
        typer.echo(text)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
