"""The mechanism's randomness: the Gaussian noise and the Poisson masks (`privacy.noise`; the
sampler that draws the masks is `dpft.engine.batches.PoissonBatches`).

Threat model: the adversary reads everything a run publishes (config.yaml, meta.json,
metrics.jsonl, summary.json, W&B, the run name) and the released model; it does not read the
training process' memory or the checkpoint (a private artefact, written owner-only). The Gaussian
mechanism's guarantee needs the noise Z and the Poisson masks to be unknown to that adversary:
anyone who can regenerate Z subtracts it from the released update and reads the clipped sum, and
predictable batches void the subsampling amplification the accountant charges for.

Both come from one *key* and the step number: step t's noise stream and its Poisson mask are
drawn from torch generators seeded with HMAC-SHA256(key, purpose ‖ t) (64 bits each). The modes
differ only in the key:

* ``secure`` (default): a 256-bit key from the OS CSPRNG (``secrets``), held in memory only —
  never written to config, meta, metrics, summary, W&B, the run name or the checkpoint. A resumed
  run draws a fresh key. Noise is drawn as Opacus' ``secure_mode`` draws it, which guards against
  floating-point attacks on the Gaussian sampler (Mironov 2012; Jin et al. 2022, arXiv
  2112.05307): one discarded draw, then (z1+z2+z3+z4)/2, whose std is σC and whose low-order bits
  no longer follow one sampler's lattice (Holohan & Braghin 2021, arXiv 2107.10138 §5.1).
* ``entropy``: the same OS key, one draw per noise entry (Opacus' default noise). Protects
  against everything above except floating-point representation attacks; ~4× cheaper noise.
* ``seeded``: a research simulation on public data. key = SHA-256("dpft-seeded", seed, run id):
  bit-reproducible, and no two different configs (the run id hashes the whole resolved config)
  share draws. **Its ε is not a guarantee against anyone who knows the config**; ledger, summary,
  W&B and reports say so.

What the installed packages allow: Opacus' secure_mode would take noise from torchcsprng; it has no
build for torch ≥ 2 (pip finds no distribution), so within a step the streams come from torch's own
generator (MT19937 on CPU, Philox on CUDA) keyed from the CSPRNG as above. Those streams are not
cryptographically secure end to end, but the adversary only ever sees them added to the clipped
sum, never raw. Data-parallel ranks share the key (rank 0 draws it and broadcasts it over the
process group, never to disk), so all ranks draw the same batch and add the same noise.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import hmac
import secrets
import struct

import torch

from dpft.errors import DpftError

MODES = ("secure", "entropy", "seeded")

GUARANTEE = {
    "secure": "ε holds against an adversary who reads the config, logs, W&B and released model "
              "(noise and batches from an OS-CSPRNG key never written; floating-point guard on)",
    "entropy": "ε holds against an adversary who reads the config, logs, W&B and released model "
               "(noise and batches from an OS-CSPRNG key never written); no floating-point guard",
    "seeded": "SIMULATION: noise and batches are a function of the config (seed and run id); the ε "
              "is NOT a guarantee against anyone who knows the config",
}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise DpftError(f"privacy.noise must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class NoiseSource:
    """The key of a run's mechanism randomness and the per-step generators derived from it.
    Owns no state besides the key: step t's draws depend on (key, t) alone, so a resumed seeded
    run replays them exactly and a resumed secure run (fresh key) draws new ones."""

    def __init__(self, mode: str, key: bytes):
        self.mode = check_mode(mode)
        self._key = key

    @classmethod
    def create(cls, mode: str, seed: int, run_id: str, dist=None) -> "NoiseSource":
        check_mode(mode)
        if mode == "seeded":
            key = hashlib.sha256(f"dpft-seeded\0{int(seed)}\0{run_id}".encode()).digest()
        else:
            key = secrets.token_bytes(32)
            if dist is not None:  # every rank must add the same noise: rank 0's key, in memory only
                key = dist.broadcast_bytes(key)
        return cls(mode, key)

    @property
    def reproducible(self) -> bool:
        return self.mode == "seeded"

    def _seed(self, purpose: bytes, step: int) -> int:
        digest = hmac.new(self._key, purpose + struct.pack(">Q", int(step)), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF

    def generator(self, purpose: str, step: int, device="cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self._seed(purpose.encode(), step))

    def for_step(self, step: int) -> "StepNoise":
        return StepNoise(self, step)

    def __repr__(self) -> str:  # never the key
        return f"NoiseSource(mode={self.mode!r})"

    def __reduce__(self):  # refuse to be pickled into a checkpoint or a sweep job
        raise TypeError("NoiseSource holds the mechanism's key and is never serialised")


class StepNoise:
    """Gaussian noise of one optimizer step; `dp_step` draws every privatised tensor through
    `gaussians`, in the fixed parameter order, so the draws are a function of (key, step)."""

    def __init__(self, source: NoiseSource, step: int):
        self.source, self.step = source, step
        self._gens: dict[str, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        kind = torch.device(device).type
        if kind not in self._gens:
            self._gens[kind] = self.source.generator(f"noise/{kind}", self.step, device)
        return self._gens[kind]

    def gaussian(self, shape, std: float, device) -> torch.Tensor:
        return self.gaussians([(shape, std)], device)[0]

    def gaussians(self, specs, device) -> list[torch.Tensor]:
        """One N(0, std²) tensor per (shape, std) of `specs`, in order (a step's noise: `dp_step` and the
        audit's rebuild both draw through here).

        `seeded` mode, and devices other than the CPU: each tensor in turn from the step's one stream —
        bit for bit what a single `gaussian` per tensor draws. Keyed modes on the CPU: a CPU generator is
        serial, so the tensors of equal std are drawn as ONE vector cut into fixed CHUNK-entry chunks, each
        (in the mode's own way) from a generator seeded from this step's secret stream, on torch's threads
        (`_fill_chunks`); a vector below PARALLEL_MIN entries is drawn from the step's stream itself. The
        chunks depend on neither the thread count (data-parallel ranks draw the same noise) nor how the
        vector is split into tensors' storage, and a model's many small tensors (biases, LayerNorms,
        MiniLM's 384×384 weights) are drawn in parallel with the large ones."""
        secure = self.source.mode == "secure"
        gen = self._gen(device)
        if self.source.mode == "seeded" or torch.device(device).type != "cpu":
            return [torch.zeros(tuple(shape), device=device) if std == 0 else _draw(secure, tuple(shape), std, gen, device)
                    for shape, std in specs]
        out: list = [torch.empty(tuple(shape)) for shape, _ in specs]
        groups: dict[float, list[int]] = {}
        for i, (_, std) in enumerate(specs):
            groups.setdefault(float(std), []).append(i)
        for std, idx in groups.items():  # first-appearance order of the stds: fixed by the parameters' order
            flat = [out[i].view(-1) for i in idx]
            n = sum(len(f) for f in flat)
            if std == 0:
                for f in flat:
                    f.zero_()
            elif n < PARALLEL_MIN:
                z = _draw(secure, (n,), std, gen, device)
                for f, piece in zip(flat, z.split([len(f) for f in flat])):
                    f.copy_(piece)
            else:
                _fill_chunks(secure, flat, std, gen)
        return out


def _fill_chunks(secure: bool, flat: list[torch.Tensor], std: float, gen: torch.Generator) -> None:
    """Fill the 1-D tensors `flat`, read as one vector, with N(0, std²) chunk by chunk: chunk i (entries
    [i·CHUNK, (i+1)·CHUNK)) from a generator seeded with the i-th draw of `gen`; a chunk inside one tensor
    is drawn in place, one that straddles tensors is drawn whole and copied into its pieces."""
    starts = [0]
    for f in flat:
        starts.append(starts[-1] + len(f))
    n = starts[-1]
    cuts = list(range(0, n, CHUNK)) + [n]
    seeds = torch.randint(0, 2**62, (len(cuts) - 1,), generator=gen).tolist()

    def fill(i: int) -> None:
        a, b = cuts[i], cuts[i + 1]
        g = torch.Generator()
        g.manual_seed(int(seeds[i]))
        j = bisect.bisect_right(starts, a) - 1
        if b <= starts[j + 1]:
            _draw_into(secure, flat[j][a - starts[j]:b - starts[j]], std, g)
            return
        z = torch.empty(b - a)
        _draw_into(secure, z, std, g)
        while a < b:
            end = min(b, starts[j + 1])
            flat[j][a - starts[j]:end - starts[j]].copy_(z[a - cuts[i]:end - cuts[i]])
            a, j = end, j + 1

    threads = torch.get_num_threads()
    list(_pool(threads).map(fill, range(len(seeds))) if threads > 1 else map(fill, range(len(seeds))))


# CPU, keyed modes: tensors with at least PARALLEL_MIN entries are drawn in chunks of CHUNK
PARALLEL_MIN = 1 << 18
CHUNK = 1 << 18
_POOLS: dict = {}


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dpft-noise")
    return _POOLS[threads]


def _draw_into(secure: bool, out: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill `out` with N(0, std²) draws from `gen` (torch.normal is empty(...).normal_, so this is the
    same stream as drawing a fresh tensor)."""
    if not secure:
        out.normal_(0.0, std, generator=gen)
        return
    # Opacus secure_mode's draw (opacus/optimizers/optimizer.py::_generate_noise): a discarded
    # draw, then (z1 + z2 + z3 + z4) / 2, against floating-point attacks on the sampler
    torch.normal(0.0, std, size=(1, 1), generator=gen, device=out.device)
    out.normal_(0.0, std, generator=gen)
    scratch = torch.empty_like(out)
    for _ in range(3):
        out.add_(scratch.normal_(0.0, std, generator=gen))
    out.div_(2.0)


def _draw(secure: bool, shape: tuple, std: float, gen: torch.Generator, device) -> torch.Tensor:
    z = torch.empty(shape, device=device)
    _draw_into(secure, z, std, gen)
    return z
