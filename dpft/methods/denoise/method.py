"""The ``denoise`` method: DP-SGD whose privatised linear-layer gradients are denoised before the
optimizer step (module docstring of ``dpft.methods.denoise``: pure post-processing)."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import torch
from torch import nn

from dpft.errors import DpftError
from dpft.methods.base import Method, cfg_bool, cfg_number, register
from dpft.methods.denoise.rows import check_args, denoise_rows

log = logging.getLogger("dpft")


def _linear_weights(model: nn.Module, params: dict[str, nn.Parameter]) -> list[str]:
    """Trainable 2-D weights of nn.Linear (and GPT-2-style Conv1D, a transposed linear) modules, in
    model order. Embeddings, biases and LayerNorm are never matrices of a linear map."""
    names = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
            pname = f"{mname}.weight" if mname else "weight"
            if pname in params and params[pname].dim() == 2 and pname not in names:
                names.append(pname)
    return names


def _head_names(model: nn.Module, names: list[str]) -> set[str]:
    """Weights outside a Hugging Face model's base model (the classifier / LM head). A model without
    a base model is all body."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return set()
    return {n for n in names if not n.startswith(prefix + ".")}


@register("denoise")
class Denoise(Method):
    """DP-SGD whose privatised linear-layer gradients are denoised by RMT shrinkage before the
    optimizer step (module docstring). Clipping, noise and accounting are DP-SGD's, unchanged."""

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        self.kappa = cfg_number(m, "kappa", 1.02)
        self.norm_correction = cfg_bool(m, "norm_correction", True)
        self.include_head = cfg_bool(m, "include_head", True)
        self.fast = cfg_bool(m, "fast", True)
        self.empty_policy = str(m.get("empty_policy", "keep"))
        self.shrinker = str(m.get("shrinker", "optimal"))
        self.test_iters = int(cfg_number(m, "test_iters", 20))
        self.margin = cfg_number(m, "test_margin", 0.01)
        stop = m.get("stop_after", None)
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop < 0):
            raise DpftError(f"method.stop_after must be null or an integer ≥ 0, got {stop!r}")
        self.stop_after = stop
        try:
            check_args(self.kappa, self.empty_policy, self.test_iters, self.margin, self.shrinker)
        except ValueError as e:
            raise DpftError(f"method.{e}") from None
        self.seed = int(cfg.get("seed", 0) or 0)
        self.targets: list[str] = []
        self._gens: dict[str, torch.Generator] = {}
        self._diag: dict[str, float] = {}
        self.failures_total = 0

    def setup(self, model, params, privacy) -> None:
        super().setup(model, params, privacy)
        linear = _linear_weights(model, params)
        head = _head_names(model, linear)
        self.targets = [n for n in linear if self.include_head or n not in head]
        if not self.targets:
            raise DpftError("method=denoise found no trainable linear weight matrix to denoise"
                            + ("" if self.include_head else " (method.include_head=false)"))
        log.info("denoise: %d linear weight matrices (%d in the head%s), κ=%.3g, shrinker %s, norm correction %s",
                 len(self.targets), len(head & set(self.targets)),
                 "" if self.include_head else ", head excluded", self.kappa, self.shrinker,
                 "on" if self.norm_correction else "off")

    def _gen(self, device: torch.device) -> torch.Generator:
        # keyed by device type: a checkpoint written by data-parallel rank 0 ("cuda:0") restores
        # on rank r's own GPU (torch.device("cuda") is the rank's current device)
        key = device.type
        if key not in self._gens:
            # own stream: the fast path's random starts must not shift dropout or the noise draws
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed + 7919)
        return self._gens[key]

    def active(self, step: int) -> bool:
        return self.stop_after is None or step <= self.stop_after

    def postprocess(self, grads, noise_std, step):
        if not self.active(step):
            self._diag = {"active": 0.0, "layers": float(len(self.targets)), "layers_denoised": 0.0,
                          "denoise_time_s": 0.0}
            return grads
        t0 = time.perf_counter()
        out = dict(grads)
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name in self.targets:
            g = grads[name]
            groups[(max(g.shape), min(g.shape), str(g.device))].append(name)
        ranks: dict[str, int] = {}
        tops: list[float] = []
        failed = exact = retries = 0
        cuda = False
        for (_, _, dev), names in groups.items():
            cuda |= dev.startswith("cuda")
            # orient every matrix tall so n × m and m × n gradients share one batch; views, not a
            # stacked copy: the threshold test reads each matrix in place
            mats = [(grads[n].mT if grads[n].shape[0] < grads[n].shape[1] else grads[n]).float() for n in names]
            rows, D, info = denoise_rows(mats, [noise_std[n] for n in names], kappa=self.kappa,
                                         norm_correction=self.norm_correction, empty_policy=self.empty_policy,
                                         fast=self.fast, test_iters=self.test_iters, margin=self.margin,
                                         gen=self._gen(mats[0].device), shrinker=self.shrinker)
            for j, i in enumerate(rows.tolist()):
                n = names[i]
                d = D[j].mT if grads[n].shape[0] < grads[n].shape[1] else D[j]
                out[n] = d.contiguous().to(grads[n].dtype)
            for i, n in enumerate(names):
                ranks[n] = int(info.rank[i])
            tops.extend(float(x) for x in info.top_ratio if math.isfinite(float(x)))
            failed += int(info.failed.sum())
            exact += int(info.exact.sum())
            retries += info.retries
        if cuda:
            torch.cuda.synchronize()
        self.failures_total += failed
        r = list(ranks.values())
        self._diag = {
            "active": 1.0,
            "layers": float(len(r)),
            "layers_denoised": float(sum(1 for k in r if k > 0)),
            "rank_mean": sum(r) / len(r),
            "rank_max": float(max(r)),
            "top_over_edge_max": max(tops) if tops else float("nan"),
            "exact_decompositions": float(exact),
            "svd_retries": float(retries),
            "svd_failures": float(failed),
            "svd_failures_total": float(self.failures_total),
            "denoise_time_s": time.perf_counter() - t0,
        }
        self._diag.update({f"rank/{n}": float(k) for n, k in ranks.items()})
        return out

    def diagnostics(self) -> dict[str, float]:
        return dict(self._diag)

    def state_dict(self) -> dict:
        return {"svd_failures_total": self.failures_total,
                "generators": {k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.failures_total = int(state.get("svd_failures_total", 0))
        for k, st in state.get("generators", {}).items():
            self._gen(torch.device(torch.device(k).type)).set_state(st)
