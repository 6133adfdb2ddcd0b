"""Evaluation on the public evaluation set: when (`eval_steps`), what (`evaluate`: accuracy/F1
for classification, loss and perplexity for causal LMs; decoding metrics are
`dpft.engine.generation.GenerationEval`, beside it) and how fast a run got there (`steps_to`)."""

from __future__ import annotations

import torch

from dpft.engine.batches import Encoded


def evaluate(model, enc: Encoded, device, batch_size: int, task_cfg) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    if enc.labels.dim() == 2:  # causal LM: eval loss and perplexity (decoding metrics: prep.gen)
        from dpft.engine.generation import eval_loss

        return eval_loss(model, enc, device, batch_size)
    was_training = model.training
    model.eval()
    preds = []
    from dpft.models import model_inputs

    with torch.no_grad():
        for start in range(0, len(enc), batch_size):
            b = enc.batch(range(start, min(start + batch_size, len(enc))), device)
            logits = model(**model_inputs(model, b.input_ids, b.attention_mask, b.token_type_ids)).logits
            preds.append(logits.argmax(-1).cpu())
    model.train(was_training)  # Opacus only captures activations in training mode
    y, p = enc.labels.numpy(), torch.cat(preds).numpy()
    out = {"accuracy": float(accuracy_score(y, p))}
    if "f1" in list(task_cfg.get("extra_metrics", []) or []):
        out["f1"] = float(f1_score(y, p))
    return out


def steps_to(evals: list[dict], key: str, threshold: float) -> int | None:
    for rec in evals:
        if rec.get(key) is not None and rec[key] >= threshold:
            return int(rec["step"])
    return None


def eval_steps(cfg, steps: int) -> set[int]:
    """The steps that evaluate: every `train.eval_every`, each of `train.eval_at`, and the last."""
    out = {steps}
    if cfg.train.eval_every:
        out.update(range(int(cfg.train.eval_every), steps + 1, int(cfg.train.eval_every)))
    out.update(int(s) for s in cfg.train.eval_at if 0 < int(s) <= steps)
    return out
