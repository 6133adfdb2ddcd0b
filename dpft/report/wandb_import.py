"""``dpft report --from-wandb``: copy a plan's finished W&B runs into the local store."""

from __future__ import annotations

from dpft.errors import DpftError
from dpft.sweeps.plan import Plan


def pull_from_wandb(plan: Plan, project: str | None = None, entity: str | None = None, api=None) -> dict[str, int]:
    """Copy the plan's finished W&B runs into the local store (runs already done locally are left
    alone). W&B history is read with scan_history (every row, not the sampled history())."""
    from omegaconf import OmegaConf

    from dpft import store

    if api is None:
        try:
            import wandb
        except ImportError:
            raise DpftError("--from-wandb needs wandb installed") from None
        api = wandb.Api()
    first = plan.jobs[0].wandb if plan.jobs else {}
    project = project or first.get("project") or "dpft"
    entity = entity or first.get("entity")
    path = f"{entity}/{project}" if entity else project
    wanted = {j.run_id: j for j in plan.jobs}
    stats = {"pulled": 0, "already_local": 0, "not_finished": 0}
    try:
        remote = list(api.runs(path, filters={"config.dpft/run_id": {"$in": sorted(wanted)}}))
    except Exception as e:
        raise DpftError(f"could not list W&B runs of {path}: {' '.join(str(e).split())[:200]}") from None
    for run in remote:
        rid = (run.config or {}).get("dpft/run_id")
        if rid not in wanted:
            continue
        dest = store.Store(plan.output_dir).run(rid)
        if dest.status() == "done":
            stats["already_local"] += 1
            continue
        if getattr(run, "state", "finished") != "finished":
            stats["not_finished"] += 1
            continue
        config = {k: v for k, v in dict(run.config).items() if k != "dpft/run_id"}
        records = []
        for row in run.scan_history():
            rec = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
            if "_step" in row:
                rec["step"] = int(row["_step"])
            records.append(rec)
        summary_src = getattr(run.summary, "_json_dict", None) or dict(run.summary)
        summary = {k[len("summary/"):]: v for k, v in summary_src.items() if k.startswith("summary/")}
        summary["privacy"] = {k[len("privacy/"):]: v for k, v in summary_src.items() if k.startswith("privacy/")}
        summary.update(run_id=rid, source="wandb")
        # a failed local attempt is kept under attempts/<k>/, as `dpft train` does
        dest.begin(OmegaConf.to_yaml(OmegaConf.create(config)), wanted[rid].overrides)
        dest.write_metrics(records)
        dest.write_summary(summary)
        dest.write_meta({
            "run_id": rid, "slug": wanted[rid].slug, "status": "done", "source": "wandb",
            "wandb_run_id": getattr(run, "id", None), "wandb_path": path, "overrides": wanted[rid].overrides,
        })
        stats["pulled"] += 1
    return stats
