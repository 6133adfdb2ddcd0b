"""Everything a run needs before its first step, built before the run directory is touched.

data → tokenizer → encoded splits → model (on its device, then PEFT) → method → σ calibration.
Everything that can fail on bad input (data, model, sizes, δ, calibration, the ε ceiling) fails
here, so a refused run writes nothing.

Public numbers fixed here: N (the training-set size; `dpft audit` counts all its candidate
canaries, in or out), q = B/N, δ, σ and the step count. None depends on the private data beyond N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dpft.config import RunSpec, grad_sample_refusal
from dpft.data.tasks import Split, TaskData, is_generation, load_task
from dpft.engine import accountant as acct
from dpft.engine import noise
from dpft.engine.batches import Encoded, encode
from dpft.errors import DpftError
from dpft.methods import build_method


@dataclass
class Prepared:
    spec: RunSpec
    data: TaskData
    train_enc: Encoded
    eval_enc: Encoded
    model: torch.nn.Module
    method: object
    device: torch.device
    steps: int
    sample_rate: float
    delta: float | None
    sigma: float | None
    info: dict = field(default_factory=dict)
    # N that q = B/N, δ and the noise normaliser B are computed from: len(train_enc), unless the
    # caller declared another public N (`dpft audit`: all m candidate canaries count as present)
    dataset_size: int | None = None

    gen: object | None = None  # generation tasks: dpft.engine.generation.GenerationEval

    def data_fingerprint(self) -> str:
        """Hash of the encoded training set: kept in checkpoints (private) so that a resume on
        other data is refused."""
        if "data_fingerprint" not in self.info:
            self.info["data_fingerprint"] = self.train_enc.fingerprint()
        return self.info["data_fingerprint"]

    def public_n(self) -> int:
        return self.dataset_size if self.dataset_size is not None else len(self.train_enc)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DpftError(f"runtime.device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DpftError(f"runtime.device={name} but no CUDA device is available")
    return dev


def plan_steps(cfg, sample_rate: float) -> int:
    if cfg.train.steps is not None:
        return int(cfg.train.steps)
    return max(1, math.ceil(float(cfg.train.epochs) / sample_rate))


def prepare(spec: RunSpec, extra_train: Split | None = None, extra_public_n: int | None = None) -> Prepared:
    """The run's data, model, method and public privacy parameters.

    `extra_train` (classification tasks) are rows appended to the task's training split, and
    `extra_public_n` is how many rows they count for in the public N (default: their number). A
    caller whose extra rows are a secret subset of a public candidate set passes the candidate
    count, so that q, σ and δ do not depend on which rows are in (`dpft audit`: its canaries)."""
    from dpft.models import apply_peft, load_classifier, load_tokenizer

    cfg = spec.cfg
    if cfg.runtime.num_threads:
        torch.set_num_threads(int(cfg.runtime.num_threads))
    device = resolve_device(str(cfg.runtime.device))
    method = build_method(cfg)
    if method.private:  # the method's own rules (e.g. no ghost/bk for per-group clipping), before any write
        refused = grad_sample_refusal(cfg, method)
        if refused:
            raise DpftError(refused)
    data = load_task(cfg.task)
    n = len(data.train)
    if extra_train is not None:
        if is_generation(cfg.task):
            raise DpftError(f"extra training rows need a classification task; task {cfg.task.name} is generation")
        data.train = Split(list(data.train.texts) + list(extra_train.texts),
                           list(data.train.labels) + list(extra_train.labels))
        n += len(extra_train) if extra_public_n is None else int(extra_public_n)
    elif extra_public_n is not None:  # candidates that add no rows (gradient canaries) still count in N
        n += int(extra_public_n)
    bs = int(cfg.train.batch_size)
    if bs > n:
        raise DpftError(f"train.batch_size={bs} is larger than the training set ({n} examples)")
    q = bs / n
    steps = plan_steps(cfg, q)
    delta = sigma = None
    if method.private:
        noise.check_mode(str(cfg.privacy.get("noise", "secure")))
        delta = float(cfg.privacy.delta) if cfg.privacy.delta is not None else acct.default_delta(n)
        # δ ≥ 1/N admits mechanisms that publish one example outright (N is public, as in q)
        if delta >= 1.0 / n and not bool(cfg.privacy.get("unsafe_delta", False)):
            raise DpftError(f"δ={delta:.3g} is ≥ 1/N = 1/{n} ({'derived as N^-1.1' if cfg.privacy.delta is None else 'privacy.delta'}): "
                            "such a δ permits releasing an example outright; lower it, add data, or set "
                            "privacy.unsafe_delta=true")
        sigma = (float(cfg.privacy.noise_multiplier) if cfg.privacy.noise_multiplier is not None
                 else acct.calibrate_sigma(float(cfg.privacy.epsilon), delta, q, steps, cfg.privacy.accountant))
        ceiling = cfg.privacy.get("max_epsilon")
        if ceiling is not None:
            planned = acct.Accountant(cfg.privacy.accountant, history=[(sigma, q, steps)]).epsilon(delta)
            if planned > float(ceiling):
                raise DpftError(f"the planned run spends ε={planned:.3f} > "
                                f"privacy.max_epsilon={ceiling}; refusing to train")
    tokenizer = load_tokenizer(cfg.model)
    gen = None
    if is_generation(cfg.task):  # causal LM, loss on target tokens, decoding metrics
        from dpft.engine import generation
        from dpft.models import load_causal_lm

        codec = generation.PromptCodec(tokenizer, cfg.task)
        red = str(cfg.task.get("loss_reduction", "mean"))
        train_enc = generation.encode_pairs(codec, data.train, int(cfg.task.max_length), red)
        eval_enc = generation.encode_pairs(codec, data.eval, int(cfg.task.max_length), red)
        gen = generation.GenerationEval(cfg.task, codec, data)
        # Opacus ghost clipping refuses tied *trainable* input/output embeddings; hooks handle
        # tying exactly, and under LoRA the embedding is frozen
        untie = (method.private and str(cfg.engine.grad_sample_mode) in ("ghost", "bk")
                 and not cfg.model.get("peft"))
        model = load_causal_lm(cfg.model, int(cfg.seed), untie=untie)
    else:
        train_enc = encode(tokenizer, data.train, int(cfg.task.max_length))
        eval_enc = encode(tokenizer, data.eval, int(cfg.task.max_length))
        model = load_classifier(cfg.model, len(data.labels), int(cfg.seed))
    model.to(device)  # before any wrapping (Opacus #820: moving after PEFT/hooks corrupts updates)
    model = apply_peft(model, cfg.model)
    return Prepared(spec, data, train_enc, eval_enc, model, method, device, steps, q, delta, sigma, dataset_size=n,
                    gen=gen)
