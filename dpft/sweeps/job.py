"""One sweep job in its own process: ``python -m dpft.sweeps.job --run-id ID [--force] -- OVERRIDES``.

The local executor starts this command per job, submitit pickles ``submitit_entry``; both end in
``run_job``: compose the overrides, check the run id against the plan, train, and turn every
outcome into an exit code (a job's own failure never raises into the sweep).
"""

from __future__ import annotations

import os
import signal
import sys

from dpft.console import error, setup_logging
from dpft.errors import DpftError
from dpft.sweeps.plan import Job


def run_job(overrides: list[str], run_id: str | None = None, force: bool = False) -> tuple[int, str]:
    """Compose, check the id against the plan, train. Returns (exit code, one-line error): 0 done,
    1 crashed, 2 bad input or stale plan, 130 interrupted; never raises for a job's own failure."""
    import traceback

    from dpft.config import compose_run
    from dpft.run import AlreadyDone, train_spec

    try:
        spec = compose_run(overrides)
    except DpftError as e:
        return _failed(2, str(e))
    if run_id and spec.run_id != run_id:
        # The config tree changed since the plan was written; running anyway would file the
        # result under an id the plan (and the report) does not know.
        return _failed(2, f"config for {' '.join(overrides)} now has run id {spec.run_id}, the plan says {run_id}; "
                          "configs changed since planning: re-run `dpft sweep` to re-plan")
    try:
        # re-entering a job continues its checkpoint; a job another process owns is waited for
        train_spec(spec, force=force, wait=True)
    except AlreadyDone:  # finished by a concurrent sweep in the meantime
        return 0, ""
    except KeyboardInterrupt:
        return 130, "interrupted"
    except DpftError as e:
        return _failed(2, str(e))
    except Exception as e:
        traceback.print_exc()
        return 1, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return 0, ""


def _failed(code: int, message: str) -> tuple[int, str]:
    error(message)  # the job's log ends in the same one line `dpft train` would print
    return code, message


def job_command(job: Job, force: bool) -> list[str]:
    return [sys.executable, "-m", "dpft.sweeps.job", "--run-id", job.run_id, *(["--force"] if force else []),
            "--", *job.overrides]


def main(argv: list[str] | None = None) -> int:
    """Entry of one job process: ``python -m dpft.sweeps.job --run-id ID [--force] -- OVERRIDES``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dpft.sweeps.job", description="run one planned sweep job")
    parser.add_argument("--run-id", default=None, help="expected run id (from the plan)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    # Slurm (preemption, time limit), the sweep (Ctrl-C, parent death) and `kill` all send SIGTERM:
    # turn it into the interrupt path so the run records `interrupted` instead of a dead `running`.
    signal.signal(signal.SIGTERM, raise_interrupt)
    return run_job(args.overrides, args.run_id, args.force)[0]


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def submitit_entry(overrides: list[str], run_id: str, force: bool, env: dict[str, str]) -> int:
    """What a submitit job runs (pickled by reference, so dpft must be importable there)."""
    os.environ.update(env)
    setup_logging()
    return run_job(overrides, run_id, force)[0]


if __name__ == "__main__":
    sys.exit(main())
