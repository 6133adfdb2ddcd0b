"""The training set as tensors and the batches drawn from it.

`Encoded` holds a tokenised split; `encode` builds it for classification tasks (generation tasks:
`dpft.engine.generation.encode_pairs`). Each step takes a logical batch of example indices from a
sampler and splits it into physical micro-batches with `chunks`:

* `PoissonBatches` (every DP method): at step t each example joins independently with
  probability q, the sampling the accountants assume. Its randomness is the mechanism's
  (dpft/engine/noise.py): a function of the run's secret key and t, never of the public seed.
* `ShuffleBatches` (the non-private baseline only): fixed-size shuffled batches from the seed,
  with a position that a checkpoint saves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from dpft.engine.step import Batch


@dataclass
class Encoded:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # [N] class ids, or [N, L] token targets for causal LMs (dpft.engine.generation)
    token_type_ids: torch.Tensor | None = None
    loss_reduction: str = "mean"  # causal LMs: per-sequence mean or sum over target tokens

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx, device) -> Batch:
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask = self.attention_mask[idx]
        t = max(int(mask.sum(1).max()), 1) if len(idx) else 1  # trim padding per micro-batch
        take = lambda x: None if x is None else x[idx, :t].to(device)  # noqa: E731
        labels = take(self.labels) if self.labels.dim() == 2 else self.labels[idx].to(device)
        return Batch(take(self.input_ids), mask[:, :t].to(device), labels, take(self.token_type_ids),
                     self.loss_reduction)

    def fingerprint(self) -> str:
        """SHA-256 of the encoded set (shapes, dtypes and bytes). Kept only in the checkpoint
        (private): a resume on other training data is refused."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.attention_mask, self.labels, self.token_type_ids):
            if t is None:
                h.update(b"none")
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def encode(tokenizer, split, max_length: int) -> Encoded:
    cols = list(zip(*split.texts))
    enc = tokenizer(*[list(c) for c in cols[:2]], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels, dtype=torch.long),
                   enc.get("token_type_ids"))


def chunks(enc: Encoded, idx: list[int], size: int, device, autocast: str | None = None) -> list[Batch]:
    """The logical batch `idx` as physical micro-batches of at most `size` examples, each
    trimmed to its own longest sequence. Micro-batching changes memory, never the step: the
    clipped sum runs over all of them before the noise (dpft/engine/step.py)."""
    out = [enc.batch(idx[i:i + size], device) for i in range(0, len(idx), size)]
    for c in out:
        c.autocast = autocast
    return out


class PoissonBatches:
    """Poisson sampling: at step t every example joins independently with probability q (the
    sampling the accountants assume). The mask of step t comes from the noise source's sampler
    stream for t, as Opacus' UniformWithReplacementSampler draws it (``rand(N) < q``)."""

    def __init__(self, n: int, q: float, source, start: int = 1):
        self.n, self.q, self.source = n, float(q), source
        self.step = start - 1

    def __next__(self) -> list[int]:
        self.step += 1
        gen = self.source.generator("poisson", self.step)
        mask = torch.rand(self.n, generator=gen) < self.q
        return mask.nonzero(as_tuple=False).reshape(-1).tolist()


class ShuffleBatches:
    """Fixed-size shuffled batches for the non-private baseline, with a resumable position."""

    def __init__(self, n: int, bs: int, seed: int):
        self.n, self.bs = n, bs
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def __next__(self) -> list[int]:
        if self.pos + self.bs > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        out = self.perm[self.pos:self.pos + self.bs].tolist()
        self.pos += self.bs
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.perm, self.pos = s["perm"], int(s["pos"])
