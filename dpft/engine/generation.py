"""Causal-LM table-to-text on the shared engine: prompt encoding with the loss on target tokens
only, eval loss / perplexity, and decoding of the eval/test tables (greedy or beam) scored against
all references of each table.

One training sequence = prefix specials + ``task.prompt`` with the linearised table + ``target_prefix``
+ the reference + EOS; labels are -100 on the prompt and padding, so the loss (and the gradient, and
so the privacy unit) covers one (table, text) example's target tokens only.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from dpft.errors import DpftError

log = logging.getLogger("dpft")


class PromptCodec:
    """How a (table, text) pair becomes token ids for one tokenizer and task config."""

    def __init__(self, tokenizer, task_cfg):
        self.tokenizer = tokenizer
        self.template = str(task_cfg.prompt)
        if "{table}" not in self.template:
            raise DpftError(f"task.prompt must contain {{table}}, got {self.template!r}")
        self.target_prefix = str(task_cfg.get("target_prefix", " "))
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise DpftError("the tokenizer has no EOS (or SEP) token to end generated text with")
        self.eos = int(eos)
        self.pad = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos
        self.prefix = self._special_prefix(tokenizer)

    @staticmethod
    def _special_prefix(tokenizer) -> list[int]:
        """The special tokens the tokenizer puts before a text (Llama's BOS, BERT's CLS; none for
        GPT-2/Qwen); trailing specials (BERT's SEP) are left out: EOS ends the target instead."""
        plain = tokenizer("table", add_special_tokens=False)["input_ids"]
        full = tokenizer("table")["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return list(full[:i])
        return []

    def prompts(self, tables: list[str]) -> list[list[int]]:
        texts = [self.template.format(table=t) for t in tables]
        return [self.prefix + ids for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def targets(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer([self.target_prefix + t for t in texts], add_special_tokens=False)["input_ids"]
        return [ids + [self.eos] for ids in enc]


def encode_pairs(codec: PromptCodec, pairs, max_length: int, loss_reduction: str):
    """Right-padded ids with labels = ids on target tokens (incl. EOS) and -100 elsewhere. A
    sequence longer than ``max_length`` loses the end of its target (then it has no EOS); a prompt
    that alone fills ``max_length`` keeps its first ``max_length - 1`` tokens and one target token."""
    from dpft.engine.batches import Encoded

    if loss_reduction not in ("mean", "sum"):
        raise DpftError(f"task.loss_reduction must be mean or sum, got {loss_reduction!r}")
    prompts, targets = codec.prompts(pairs.sources), codec.targets(pairs.targets)
    rows, truncated = [], 0
    for p, t in zip(prompts, targets):
        if len(p) + len(t) > max_length:
            truncated += 1
            p = p[: max_length - 1]
            t = t[: max_length - len(p)]
        rows.append((p, t))
    if truncated:
        log.warning("%d of %d sequences longer than task.max_length=%d were truncated", truncated, len(rows),
                    max_length)
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), codec.pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p):n] = torch.tensor(t)
        mask[i, :n] = 1
    enc = Encoded(ids, mask, labels, None)
    enc.loss_reduction = loss_reduction
    return enc


def eval_loss(model, enc, device, batch_size: int) -> dict:
    """Mean per-sequence loss (the training objective) and token-level perplexity
    exp(Σ NLL / Σ target tokens) on the eval pairs."""
    from dpft.engine.step import token_nll
    from dpft.models import model_inputs

    was_training = model.training
    model.eval()
    seq_losses, nll_total, tokens = [], 0.0, 0
    reduction = getattr(enc, "loss_reduction", "mean")
    with torch.no_grad():
        for start in range(0, len(enc), batch_size):
            b = enc.batch(range(start, min(start + batch_size, len(enc))), device)
            logits = model(**model_inputs(model, b.input_ids, b.attention_mask)).logits
            nll, count = token_nll(logits, b.labels)
            seq_losses.append((nll if reduction == "sum" else nll / count.clamp_min(1)).cpu())
            nll_total += float(nll.double().sum())
            tokens += int(count.sum())
    model.train(was_training)  # Opacus only captures activations in training mode
    loss = float(torch.cat(seq_losses).mean())
    ppl = math.exp(nll_total / tokens) if tokens and nll_total / tokens < 700 else float("inf")
    return {"loss": loss, "perplexity": ppl}


def generate(model, codec: PromptCodec, tables: list[str], device, batch_size: int, decode_cfg,
             max_length: int) -> list[str]:
    """Decode each table's prompt (left-padded batches, sorted by length) with the configured
    greedy/beam search; returns the generated text after the prompt."""
    from transformers import GenerationConfig

    beams = int(decode_cfg.num_beams)
    gen_cfg = GenerationConfig(
        max_new_tokens=int(decode_cfg.max_new_tokens), num_beams=beams, do_sample=False,
        length_penalty=float(decode_cfg.get("length_penalty", 1.0)),
        no_repeat_ngram_size=int(decode_cfg.get("no_repeat_ngram_size", 0) or 0),
        early_stopping=True if beams > 1 else False, pad_token_id=codec.pad, eos_token_id=codec.eos,
        bos_token_id=codec.prefix[0] if codec.prefix else None)
    prompts = [p[:max_length] for p in codec.prompts(tables)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), codec.pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # left padding: generation continues right after the prompt
                    ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[r, width - len(prompts[i]):] = 1
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=gen_cfg)
                texts = codec.tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
                for r, i in enumerate(idx):
                    out[i] = " ".join(texts[r].split())
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


class GenerationEval:
    """Decodes the eval tables at the configured interval (and the test tables once at the end)
    and scores them against every reference of each table."""

    def __init__(self, task_cfg, codec: PromptCodec, data):
        from dpft.engine import nlg_metrics

        nlg_metrics.require()
        self.cfg = task_cfg.decode
        self.codec = codec
        self.max_length = int(task_cfg.max_length)
        every = self.cfg.get("every")
        if every is not None and (isinstance(every, bool) or int(every) < 1):
            raise DpftError(f"task.decode.every must be null or >= 1, got {every!r}")
        if int(self.cfg.num_beams) < 1 or int(self.cfg.max_new_tokens) < 1:
            raise DpftError("task.decode.num_beams and task.decode.max_new_tokens must be >= 1")
        self.every = None if every is None else int(every)
        cap = self.cfg.get("max_tables")
        self.tables, self.refs = data.eval.grouped(cap)
        self.test = None
        if self.cfg.get("test", True) and data.test is not None and len(data.test):
            self.test = data.test.grouped(cap)

    def due(self, step: int, last: int) -> bool:
        """Decode at this eval step? Every eval when ``every`` is null, else multiples of it and the last."""
        return self.every is None or step == last or step % self.every == 0

    def score(self, model, device, batch_size: int, split: str = "eval", out=None, step: int | None = None) -> dict:
        """Decode `split` and score it; `out` (a dpft.store.RunDir) keeps the latest decode."""
        from dpft.engine.nlg_metrics import corpus_metrics

        tables, refs = (self.tables, self.refs) if split == "eval" else self.test
        hyps = generate(model, self.codec, tables, device, batch_size, self.cfg, self.max_length)
        metrics = corpus_metrics(hyps, refs, lowercase=bool(self.cfg.get("lowercase", False)))
        metrics["empty_frac"] = sum(1 for h in hyps if not h) / len(hyps)
        if out is not None:  # the latest decode of each split, for inspection and re-scoring
            out.write_generations(split, [json.dumps({"step": step, "table": t, "output": h, "references": r},
                                                     ensure_ascii=False) for t, h, r in zip(tables, hyps, refs)])
        return metrics
