"""One factory for students and teachers.

A model is either pretrained (``spec.path``: a Hugging Face id or a local ``save_pretrained``
folder, optionally a GGUF file inside it) or built from scratch from the architecture fields of
:class:`~clpd.config.ModelConfig` (Llama or Qwen2) with random weights. Everything that leaves this
module is a plain transformers object, so checkpoints load without clpd.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen2Config)

from clpd.config import Arch, Device, LoraConfig, ModelConfig, Precision
from clpd.errors import ClpdError
from clpd.tokenizer import build_char_tokenizer

ARCH_CONFIGS = {Arch.llama: LlamaConfig, Arch.qwen2: Qwen2Config}


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else (absolute, relative, home, deeper) is a path.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_source(name: str, what: str = "model") -> None:
    """Refuse a local path that does not exist before anything tries to download it."""
    if _looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise ClpdError(f"{what} {name}: no such file or folder")


def _from_pretrained(loader, name: str, what: str, **kwargs):
    check_source(name, what)
    try:
        return loader.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().exists() else name, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # missing or damaged files, no network, not a model folder
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClpdError(f"could not load {what} '{name}': {first_line}") from exc


def load_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerBase:
    if spec.path is not None:
        tokenizer = _from_pretrained(AutoTokenizer, spec.path, f"tokenizer of '{spec.name}'",
                                     gguf_file=spec.gguf_file, trust_remote_code=spec.trust_remote_code)
    elif spec.tokenizer is not None:
        tokenizer = _from_pretrained(AutoTokenizer, spec.tokenizer, f"tokenizer of '{spec.name}'")
    else:
        tokenizer = build_char_tokenizer()
    if tokenizer.eos_token_id is None:
        raise ClpdError(f"tokenizer of '{spec.name}' has no eos token; clpd needs one to end answers")
    if tokenizer.pad_token_id is None:
        # GPT-2 and some Llama tokenizers have no pad token; padding is masked out, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def architecture_config(spec: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    config_class = ARCH_CONFIGS[spec.arch]
    if spec.vocab_size is not None and spec.vocab_size < len(tokenizer):
        raise ClpdError(f"model '{spec.name}': vocab_size={spec.vocab_size} is smaller than its tokenizer ({len(tokenizer)} tokens)")
    return config_class(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_model(spec: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build or load the model of ``spec`` on the CPU; the caller moves it to its device.

    From-scratch weights depend on the torch seed at call time: seed before calling.
    """
    adapter = Path(spec.path).expanduser() / ADAPTER_CONFIG if spec.path is not None else None
    if adapter is not None and adapter.exists():
        model = _load_adapter(spec, adapter.parent, dtype)
    elif spec.path is not None:
        model = _from_pretrained(AutoModelForCausalLM, spec.path, f"model '{spec.name}'", dtype=dtype,
                                 gguf_file=spec.gguf_file, trust_remote_code=spec.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(architecture_config(spec, tokenizer), dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ClpdError(f"model '{spec.name}' has {model.get_input_embeddings().num_embeddings} embedding rows "
                        f"but its tokenizer has {len(tokenizer)} tokens")
    return model


ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"  # beside an adapter: the from-scratch base model it was trained on


def _load_adapter(spec: ModelConfig, folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """A peft LoRA checkpoint: its base model (a hub id, a folder, or the ``base/`` folder saved
    beside the adapter for from-scratch students) with the adapter on top."""
    from peft import PeftModel

    base_ref = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    base_path = str(folder / BASE_DIR) if (folder / BASE_DIR).exists() else base_ref
    if not base_path:
        raise ClpdError(f"{folder}: the adapter names no base model (base_model_name_or_path)")
    base = _from_pretrained(AutoModelForCausalLM, base_path, f"base model of adapter '{spec.name}'", dtype=dtype)
    return PeftModel.from_pretrained(base, str(folder))


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> PreTrainedModel:
    """Freeze ``model`` and add trainable LoRA adapters (kept in fp32 even on a bf16 base)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ClpdError(f"student.lora.target_modules: {missing} not in the model (its linear layers include "
                        f"{sorted(n for n in present if n.endswith('proj'))})")
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def resolve_device(device: Device, key: str = "device") -> torch.device:
    """``key``: the config key the value came from, for the error message (``trainer.device`` in train)."""
    if device == Device.cuda and not torch.cuda.is_available():
        raise ClpdError(f"{key}=cuda but no CUDA device is available; allowed here: auto, cpu")
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def resolve_precision(precision: Precision, device: torch.device, key: str = "precision") -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32).

    ``auto`` is bf16 on CUDA devices that support it and fp32 everywhere else: on a CPU, bf16
    autocast is slower than fp32 on most machines and fp16 is not supported. ``key``: the config
    key the value came from, for the error message (``trainer.precision`` in train).
    """
    if precision == Precision.auto:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == Precision.fp16 and device.type != "cuda":
        raise ClpdError(f"{key}=fp16 needs a CUDA device (it uses a GradScaler); allowed on a CPU: auto, fp32, bf16")
    return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]
