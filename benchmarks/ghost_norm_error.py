"""python benchmarks/ghost_norm_error.py [--tsv ../shared/data/sst2/dev.tsv] [--n 16] [--length 128]

How loose a rigorous fp32 error bound on the Linear ghost norm would be on real data (docs/benchmarks.md §2).
For each example i and encoder nn.Linear layer: the true per-sample gradient norm² n² = ‖Σ_t g_t a_tᵀ‖²
(float64) and S = Σ_t ‖g_t‖‖a_t‖. The Gram form Σ_ts (g_t·g_s)(a_t·a_s) in fp32 has error up to
k·u·S² (k ≈ d_in + d_out + L², u = 2⁻²⁴), i.e. k·u·S²/n² relative to n². Real MiniLM-L6 weights.
"""

from __future__ import annotations

import argparse
import csv
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tsv", default="../shared/data/sst2/dev.tsv", help="GLUE TSV with sentence/label columns")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    args = ap.parse_args()

    from dpft.config import compose_run
    from dpft.models import load_classifier, load_tokenizer, model_inputs

    torch.manual_seed(0)  # dropout is on (train mode, as in training)
    cfg = compose_run([]).cfg
    model = load_classifier(cfg.model, 2, 0).train()
    tok = load_tokenizer(cfg.model)
    with open(args.tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[: args.n]
    enc = tok([r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=args.length,
              return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    acts, grads = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "encoder" in name:
            mod.register_forward_hook(lambda m, i, o, n=name: acts.__setitem__(n, i[0].detach().double()))
            mod.register_full_backward_hook(lambda m, gi, go, n=name: grads.__setitem__(n, go[0].detach().double()))
    out = model(**model_inputs(model, enc["input_ids"], enc["attention_mask"]))
    torch.nn.functional.cross_entropy(out.logits, labels, reduction="sum").backward()

    u = 2.0 ** -24
    print(f"{'layer':55s} {'median S²/n²':>13s} {'median bound/n²':>16s} {'max bound/n²':>13s}")
    per_layer = []
    for name in acts:
        A, G = acts[name], grads[name]
        S = (G.norm(dim=-1) * A.norm(dim=-1)).sum(1)
        n = torch.einsum("bti,btj->bij", G, A).flatten(1).norm(dim=1)
        k = A.shape[-1] + G.shape[-1] + args.length ** 2
        rel = k * u * S**2 / n**2
        per_layer.append((name, float((S**2 / n**2).median()), float(rel.median()), float(rel.max())))
        print(f"{name:55s} {per_layer[-1][1]:13.2f} {per_layer[-1][2]:16.2e} {per_layer[-1][3]:13.2e}")
    print(f"median over layers of median S²/n²: {statistics.median(x[1] for x in per_layer):.2f}; "
          f"layers where the bound exceeds 1 % of n² for the median example: "
          f"{sum(x[2] > 0.01 for x in per_layer)}/{len(per_layer)}")


if __name__ == "__main__":
    main()
