"""A sweep file → a frozen plan of jobs, and the state of each planned job in the store.

``make_plan`` expands the grid with Hydra's own parser and ``BasicSweeper.split_arguments`` (so
``a=1,2``, ``range()``, ``choice()`` and ``glob()`` mean what they mean in Hydra, and command-line
overrides replace or narrow file axes key by key, as in ``--multirun``), composes every job
through ``compose_run`` (a malformed grid or a bad value fails here, before any job runs), and
records one resolved config per job in ``<output_dir>/sweeps/<name>/plan.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from dpft.errors import DpftError
from dpft.sweeps.spec import SweepFile, read_sweep_file


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("See https://hydra.cc")[0].split())


def expand(sweep: SweepFile, cli_overrides: Iterable[str] = ()) -> tuple[list[list[str]], list[str]]:
    """For each grid block, the Cartesian product of file overrides, the block and CLI overrides
    (later sources replace earlier ones key by key, keeping the axis' position); blocks in file
    order. Returns (override lists, swept keys)."""
    jobs, axes = [], []
    for i, block, cli in _select_blocks(sweep, [str(o) for o in cli_overrides]):
        where = "grid" if len(sweep.grid) == 1 else f"grid[{i}]"
        j, a = _expand_block(sweep, block, where, cli)
        jobs += j
        axes += [k for k in a if k not in axes]
    if len(sweep.grid) > 1:  # a key fixed inside each block but different across blocks is an axis too
        values: dict[str, set] = {}
        for job in jobs:
            kv = dict(o.split("=", 1) for o in job if "=" in o)
            for k in {k for jb in jobs for o in jb if "=" in o for k in [o.split("=", 1)[0]]}:
                values.setdefault(k, set()).add(kv.get(k))
        order = [o.split("=", 1)[0] for jb in jobs for o in jb if "=" in o]
        for k in dict.fromkeys(order):
            # a knob only some blocks set (a method's own, absent on baseline rows) is not an axis
            if len(values[k] - {None}) > 1 and k not in axes:
                axes.append(k)
    return jobs, axes


def _override_values(line: str) -> tuple[str, set[str] | None]:
    """(key, the values a `key=value` / `key=a,b` / `key=range(..)` override takes), or (key, None)
    for overrides that are not a plain value list (deletions, appends, globs, intervals)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        [o] = OverridesParser.create().parse_overrides([line])
    except (HydraException, ValueError):
        return line.split("=", 1)[0], None  # _expand_block reports the malformed override
    key = o.get_key_element()
    if o.is_delete() or o.is_add() or o.is_force_add():
        return key, None
    try:
        if o.is_sweep_override():
            return key, set(o.sweep_string_iterator())
        return key, {o.get_value_element_as_str()}
    except HydraException:
        return key, None


def _select_blocks(sweep: SweepFile, cli: list[str]) -> list[tuple[int, dict[str, str], list[str]]]:
    """Blocks of a multi-block grid that the command line keeps, each with the CLI overrides that
    apply to it. A key that some blocks sweep but others do not name (a method's own knob, absent
    on its baseline rows) narrows only the blocks that name it; a key whose values exclude a
    block's values entirely drops that block (`task=sst2` runs the SST-2 block, not the QNLI block
    re-labelled sst2), unless it excludes every block, which is a replacement as with one block."""
    if len(sweep.grid) < 2:
        return [(0, sweep.grid[0], cli)] if sweep.grid else []
    file_keys = {o.split("=", 1)[0] for o in sweep.overrides}
    kept = list(range(len(sweep.grid)))
    per_block = {i: list(cli) for i in kept}
    for line in cli:
        key, values = _override_values(line)
        named = [i for i, b in enumerate(sweep.grid) if key in b]
        if not named:
            continue
        if key not in file_keys:
            for i in kept:
                if i not in named:
                    per_block[i].remove(line)
        if values is None:
            continue
        block_values = {i: _override_values(f"{key}={sweep.grid[i][key]}")[1] for i in named}
        disjoint = [i for i in named if block_values[i] is not None and not (block_values[i] & values)]
        if len([i for i in named if i in kept and i not in disjoint]) > 0:
            kept = [i for i in kept if i not in disjoint]
    return [(i, sweep.grid[i], per_block[i]) for i in kept]


def _expand_block(sweep: SweepFile, block: dict[str, str], where_grid: str,
                  cli_overrides: Iterable[str]) -> tuple[list[list[str]], list[str]]:
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from dpft.config import CONF_DIR

    cli = [str(o) for o in cli_overrides]
    for tok in cli:
        if tok.startswith("-"):
            raise DpftError(f"unknown option '{tok}'; Hydra overrides look like key=value, +key=value, ~key")
    sources = [("overrides", o) for o in sweep.overrides]
    sources += [(f"{where_grid}.{k}", f"{k}={v}") for k, v in block.items()]
    sources += [("command line", o) for o in cli]

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # glob() lists a config group's options, which needs the loader of dpft's config tree
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        parsed = []
        for where, line in sources:
            try:
                parsed.extend(parser.parse_overrides([line]))
            except HydraException as e:
                raise DpftError(f"sweep {sweep.name}: malformed {where} '{line}': {_one_line(e)}") from None
        # The same key-by-key merge split_arguments does, to know which keys are still axes
        # after the command line narrowed or replaced them.
        merged: dict[str, Any] = {}
        for o in parsed:
            merged[o.get_key_element()] = o
        try:
            [jobs] = BasicSweeper.split_arguments(parsed, max_batch_size=None)
            axes = [k for k, o in merged.items() if o.is_sweep_override() and len(list(o.sweep_string_iterator())) > 1]
        except HydraException as e:
            raise DpftError(f"sweep {sweep.name}: {_one_line(e)} "
                            "(only discrete sweeps: a,b  range()  choice()  glob())") from None
    GlobalHydra.instance().clear()
    # split_arguments rebuilds non-sweep overrides as key=value, which turns `~key` into
    # `~key=null` (a different override); put the user's spelling back.
    restore = {f"{o.get_key_element()}={o.get_value_element_as_str()}": o.input_line
               for o in parsed if not o.is_sweep_override() and o.is_delete()}
    jobs = [[restore.get(x, x) for x in job] for job in jobs]
    if not jobs:
        raise DpftError(f"sweep {sweep.name}: the grid is empty")
    return jobs, axes


@dataclass
class Job:
    run_id: str
    slug: str
    overrides: list[str]
    axes: dict[str, str]
    choices: dict[str, Any]
    config: dict
    wandb: dict = field(default_factory=dict)

    def describe(self) -> str:
        return " ".join(f"{k.lstrip('+~')}={v}" for k, v in self.axes.items()) or self.slug


@dataclass
class Plan:
    name: str
    jobs: list[Job]
    output_dir: Path
    source: str = ""
    cli_overrides: list[str] = field(default_factory=list)
    grid_points: int = 0

    @property
    def sweep_dir(self):
        """The plan's dpft.store.SweepDir."""
        from dpft import store

        return store.Store(self.output_dir).sweep(self.name)

    @property
    def duplicates(self) -> int:
        return self.grid_points - len(self.jobs)


def _axis_values(job: list[str], axes: list[str]) -> dict[str, str]:
    out = {}
    for item in job:
        key, _, value = item.partition("=")
        if key in axes:
            out[key] = value
    return out


def make_plan(sweep: SweepFile, cli_overrides: Iterable[str] = (),
              on_progress: Callable[[int, int], None] | None = None) -> Plan:
    """Expand and compose every job; identical configs (same run id) collapse into one job."""
    from dpft.config import compose_run, semantic_config
    from omegaconf import OmegaConf

    cli = list(cli_overrides)
    points, axes = expand(sweep, cli)
    jobs: dict[str, Job] = {}
    output_dirs = set()
    for i, overrides in enumerate(points):
        if on_progress:
            on_progress(i, len(points))
        axis_values = _axis_values(overrides, axes)
        try:
            spec = compose_run(overrides)
        except DpftError as e:
            where = " ".join(f"{k}={v}" for k, v in axis_values.items())
            at = f" ({where})" if where else ""
            raise DpftError(f"sweep {sweep.name}: job {i + 1}/{len(points)}{at}: {e}") from None
        output_dirs.add(str(spec.cfg.paths.output_dir))
        if spec.run_id in jobs:
            continue
        w = OmegaConf.select(spec.cfg, "logger.wandb")
        jobs[spec.run_id] = Job(
            run_id=spec.run_id, slug=spec.slug, overrides=list(spec.overrides), axes=axis_values,
            choices=dict(sorted(spec.choices.items())), config=semantic_config(spec.cfg),
            wandb={"project": w.project, "entity": w.entity} if w is not None else {},
        )
    if len(output_dirs) != 1:
        raise DpftError(f"sweep {sweep.name}: every job must write to one paths.output_dir, got {sorted(output_dirs)}")
    return Plan(name=sweep.name, jobs=list(jobs.values()), output_dir=Path(output_dirs.pop()),
                source=str(sweep.path), cli_overrides=cli, grid_points=len(points))


def write_plan(plan: Plan, sweep: SweepFile) -> Path:
    """plan.jsonl (one resolved job per line) and a copy of the sweep file, so the plan can be
    reported on later even if the file changes or lives elsewhere."""
    return plan.sweep_dir.write_plan([asdict(j) for j in plan.jobs], sweep.text, {
        "name": plan.name, "source": plan.source, "cli_overrides": plan.cli_overrides,
        "sha256": hashlib.sha256(sweep.text.encode()).hexdigest(), "jobs": len(plan.jobs),
        "grid_points": plan.grid_points,
    })


def read_plan(output_dir: str | os.PathLike, name: str) -> Plan | None:
    from dpft import store

    d = store.Store(output_dir).sweep(name)
    path = d.plan_path
    if not path.is_file():
        return None
    jobs = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DpftError(f"{path}: not UTF-8 text; re-create it with `dpft sweep {name} --dry-run`") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            jobs.append(Job(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise DpftError(f"{path}:{n}: not a plan line ({e}); "
                            f"re-create it with `dpft sweep {name} --dry-run`") from None
    info = d.info() or {}
    return Plan(name=name, jobs=jobs, output_dir=Path(output_dir), source=info.get("source", ""),
                cli_overrides=info.get("cli_overrides", []), grid_points=info.get("grid_points", len(jobs)))


def plan_sweep_file(plan: Plan) -> SweepFile | None:
    """The frozen copy of the sweep file written next to the plan."""
    p = plan.sweep_dir.frozen_sweep
    if not p.is_file():
        return None
    return read_sweep_file(p, plan.name)


def job_state(output_dir: str | os.PathLike, run_id: str) -> str:
    """missing | done | failed | interrupted | running (alive) | stale (a dead 'running')."""
    from dpft import store

    run = store.Store(output_dir).run(run_id)
    status = run.status()
    if status is None:
        return "missing"
    if status == "running":
        return "running" if run.alive() else "stale"
    return status
