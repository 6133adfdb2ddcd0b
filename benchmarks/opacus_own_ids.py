"""HF_HUB_OFFLINE=1 python benchmarks/opacus_own_ids.py

Does the way position/token-type ids reach the model change Opacus' own memory? Opacus 1.6
`make_private` (ghost and hooks) on roberta-base (random init), B = 16, L = 128, AdamW: the model's
own ids (what `model(input_ids, attention_mask)` does) vs dpft's explicit per-example ids
(`dpft.models.model_inputs`). Prints median step time (steps 2-3) and peak RSS above the baseline.
"""
import copy, time, torch, statistics
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset
from dpft.bench import _RssPeak, _batch
from dpft.config import compose_run
from dpft.models import load_classifier, model_inputs
cfg = compose_run(["model=roberta-base", "model.pretrained=false"]).cfg
base = load_classifier(cfg.model, 2, 0)
b = _batch(16, 128, 50265, torch.device("cpu"))
for mode in ("ghost", "hooks"):
  for ids in ("own", "explicit"):
    m = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    dl = DataLoader(TensorDataset(torch.zeros(16)), batch_size=16)
    made = PrivacyEngine().make_private(module=m, optimizer=opt, data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode, criterion=torch.nn.CrossEntropyLoss())
    model, opt = made[0], made[1]; crit = made[2] if mode == "ghost" else torch.nn.CrossEntropyLoss()
    kw = model_inputs(m, b.input_ids, b.attention_mask) if ids == "explicit" else dict(input_ids=b.input_ids, attention_mask=b.attention_mask)
    ts = []
    with _RssPeak() as r:
        for i in range(3):
            t = time.perf_counter()
            crit(model(**kw).logits, b.labels).backward(); opt.step(); opt.zero_grad()
            ts.append(time.perf_counter() - t)
    print(mode, ids, f"{statistics.median(ts[1:]):.2f}s", f"{(r.peak - r.base)/2**30:.2f} GiB", flush=True)
    model._close(); del model, opt, m
