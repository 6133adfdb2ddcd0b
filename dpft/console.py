"""The terminal side of dpft, in one place: logging set-up, one-line errors (bad input → one
`error:` line on stderr and a non-zero exit, never a traceback) and the rich console tables are
printed on. Used by the command line (`dpft.cli`) and by sweep job processes (`dpft.sweeps.job`)."""

from __future__ import annotations

import functools
import logging
import os

import typer

from dpft.errors import DpftError


class OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (unknown option, bad option value, missing argument) as one `error:` line on
    stderr and exit 2, like every other bad input, instead of click's multi-line usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import sys

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            error("aborted")
            sys.exit(1)
        except typer.TyperException as e:  # typer's (vendored) click UsageError, BadParameter, ...
            ctx = getattr(e, "ctx", None)
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            error(" ".join(message.split()) + (f" (see {ctx.command_path} --help)" if ctx else ""))
            sys.exit(getattr(e, "exit_code", 2))
        sys.exit(rv if isinstance(rv, int) else 0)


def error(message: str) -> None:
    """The one line a user sees for bad input."""
    typer.echo(f"error: {message}", err=True)


def cli_errors(fn):
    """Bad input → one line on stderr and exit 2; Ctrl-C → exit 130. Never a traceback for these."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DpftError as e:
            error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `dpft show | head -1`: the reader left; nothing to say, not an error
            silence_stdout()
            raise typer.Exit(0) from None
        except OSError as e:  # the environment: disk full, permission denied, a file where a folder should be
            error(f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else " ".join(str(e).split()))
            raise typer.Exit(2) from None

    return wrapper


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again."""
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a descriptor (tests capture it in memory)
        pass


def make_console(**kw):
    """A rich Console; in a pipe or a file, as wide as the content needs (up to COLUMNS or 200)
    instead of rich's 80, so tables are not wrapped for a terminal that is not there."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 here; a reader that left is not an error
            silence_stdout()
            raise SystemExit(0)

    console = _Console(**kw)
    if not console.is_terminal and "width" not in kw:
        try:
            width = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            width = 200
        console = _Console(width=max(80, width), **kw)
    return console


def setup_logging() -> None:
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dpft").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's per-order RDP chatter
    # Known-harmless: Opacus' backward hooks fire w.r.t. outputs when inputs need no grad; the RDP
    # order grid note is about tightness, and the accountant's ε is what we report.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft → transformers
