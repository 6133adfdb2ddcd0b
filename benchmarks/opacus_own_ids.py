"""HF_HUB_OFFLINE=1 python benchmarks/opacus_own_ids.py

Does the way position/token-type ids reach the model change Opacus' own memory? Opacus 1.6
`make_private` (ghost and hooks, through `dpft.bench.opacus_reference`) on roberta-base (random
init), B = 16, L = 128, AdamW: the model's own ids (what `model(input_ids, attention_mask)` does) vs
dpft's explicit per-example ids (`dpft.models.model_inputs`). Prints median step time (steps 2-3)
and peak RSS above the baseline (docs/benchmarks.md §2).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from dpft.bench import _RssPeak, fixed_batch, opacus_reference
from dpft.config import compose_run
from dpft.models import load_classifier


def main() -> None:
    cfg = compose_run(["model=roberta-base", "model.pretrained=false"]).cfg
    base = load_classifier(cfg.model, 2, 0)
    chunks = fixed_batch(16, 128, int(base.config.vocab_size), 16, torch.device("cpu"))
    for mode in ("ghost", "hooks"):
        for explicit in (False, True):
            model = copy.deepcopy(base).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            model, _, step = opacus_reference(model, mode, 1.0, opt, 16, chunks, explicit_ids=explicit)
            times = []
            with _RssPeak() as rss:
                for _ in range(3):
                    t = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t)
            print(mode, "explicit" if explicit else "own", f"{statistics.median(times[1:]):.2f}s",
                  f"{(rss.peak - rss.base) / 2**30:.2f} GiB", flush=True)
            model._close()  # remove Opacus' hooks
            del model, opt


if __name__ == "__main__":
    main()
