"""Data-parallel DP training over `torchrun` (`dpft train ... launcher=torchrun nproc=N`).

Privacy assumption: distribution changes *where* the clipped sum is computed, never *what* is
released. Every rank draws the same Poisson logical batch (same key) and clips a disjoint
shard of it (``idx[rank::world]``); the per-rank clipped sums are summed with one all-reduce, so
S = Σ_i w_i g_i over the logical batch exactly as in one process. The noise Z is then drawn once
per step from the same key on every rank (rank 0's OS-entropy key, broadcast over the process group
and never written; dpft/engine/noise.py), so all ranks add the *same* Z and hold
the same privatised gradient (S + Z)/B and the same weights after the step — one Gaussian
mechanism per step with the calibrated σ, accounted once, as without distribution. This is the
mechanism of Opacus' ``DPDDP`` + ``DistributedDPOptimizer`` (clipped per-sample gradients summed
across workers, noise added once) made explicit, because dpft's step clips with its own hooks and
two backward passes (ghost clipping) that DPDDP's gradient hooks would all-reduce twice.

Rank 0 alone writes the run directory (metrics, checkpoints, summary, W&B) and evaluates; the other
ranks compute and write nothing. With dropout on, ranks draw different dropout masks than one
process would, so a run matches the single-process run in distribution; with dropout off it matches
it to float summation order (tested on CPU with gloo).
"""

from __future__ import annotations

import os
import sys

import torch

from dpft.errors import DpftError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def in_worker() -> bool:
    """True inside a process that torchrun started."""
    return all(k in os.environ for k in ENV_KEYS)


class Dist:
    """The process group of one data-parallel run: rank, world size and the two collectives the
    DP step needs."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: list[int]) -> list[int]:
        return idx[self.rank::self.world]

    def sum_(self, tensors: dict[str, torch.Tensor]) -> None:
        """In-place sum over ranks, one flat all-reduce (few large messages beat one per tensor)."""
        import torch.distributed as td

        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors.values()])
        td.all_reduce(flat)
        offset = 0
        for t in tensors.values():
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor of per-example values from all ranks (shards differ in size)."""
        import torch.distributed as td

        n = torch.tensor([t.numel()], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        td.all_gather(sizes, n)
        m = int(max(int(s) for s in sizes))
        padded = torch.zeros(m, dtype=t.dtype, device=self.device)
        padded[: t.numel()] = t.to(self.device)
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        td.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a SIGTERM that reached only some ranks)."""
        import torch.distributed as td

        x = torch.tensor([1.0 if flag else 0.0], device=self.device)
        td.all_reduce(x, op=td.ReduceOp.MAX)
        return bool(x.item() > 0)

    def broadcast_(self, tensors) -> None:
        """Start every rank from rank 0's weights (initialisation or a checkpoint)."""
        import torch.distributed as td

        with torch.no_grad():
            for t in tensors:
                td.broadcast(t.data, src=0)

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Rank 0's bytes on every rank, through the process group only (the noise key: never on
        disk, never in the environment)."""
        import torch.distributed as td

        t = torch.tensor(list(data), dtype=torch.uint8, device=self.device)
        td.broadcast(t, src=0)
        return bytes(t.cpu().tolist())

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()


_CURRENT: Dist | None = None


def current() -> Dist | None:
    """The process group of this run, or None when training in one process."""
    return _CURRENT


def init(device_name: str) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA, one GPU per local rank)."""
    global _CURRENT
    import torch.distributed as td

    if _CURRENT is not None:
        return _CURRENT
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    td.init_process_group(backend="nccl" if use_cuda else "gloo")
    _CURRENT = Dist(rank, world, device)
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    _CURRENT = None


def launch(nproc: int, argv: list[str]) -> int:
    """Start `nproc` local workers running `dpft <argv>` through torchrun's launcher (elastic
    agent, standalone rendezvous). Returns 0, or raises a one-line DpftError naming the first
    failed rank (the workers print their own one-line errors)."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    import logging

    # the agent logs a multi-line failure report per rank; the workers' own one-line errors say why
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "dpft.cli", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise DpftError(f"distributed run failed: rank {rank} exited with code {failure.exitcode} "
                        f"(its error is printed above)") from None
    return 0


def check_config(cfg) -> int:
    """nproc for `launcher=torchrun`, validated."""
    launcher = str(cfg.get("launcher", "local"))
    if launcher not in ("local", "torchrun"):
        raise DpftError(f"launcher must be local or torchrun, got {launcher!r}")
    nproc = cfg.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise DpftError(f"nproc must be an integer ≥ 1, got {nproc!r}")
    if launcher == "torchrun" and torch.cuda.is_available() and str(cfg.runtime.device) != "cpu" \
            and nproc > torch.cuda.device_count():
        raise DpftError(f"nproc={nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return nproc
