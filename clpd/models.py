"""One factory for students and teachers.

A model is either pretrained (``spec.path``: a Hugging Face id or a local ``save_pretrained``
folder, optionally a GGUF file inside it) or built from scratch from the architecture fields of
:class:`~clpd.config.ModelConfig` (Llama or Qwen2) with random weights. Everything that leaves this
module is a plain transformers object, so checkpoints load without clpd.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen2Config)

from clpd.config import Arch, Device, ModelConfig, Precision
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
    except (OSError, ValueError) as exc:  # missing files, no network, not a model folder
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
    return config_class(
        vocab_size=len(tokenizer),
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
    if spec.path is not None:
        model = _from_pretrained(AutoModelForCausalLM, spec.path, f"model '{spec.name}'", dtype=dtype,
                                 gguf_file=spec.gguf_file, trust_remote_code=spec.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_config(architecture_config(spec, tokenizer), dtype=dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ClpdError(f"model '{spec.name}' has {model.get_input_embeddings().num_embeddings} embedding rows "
                        f"but its tokenizer has {len(tokenizer)} tokens")
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def resolve_device(device: Device) -> torch.device:
    if device == Device.cuda and not torch.cuda.is_available():
        raise ClpdError("device=cuda but no CUDA device is available; allowed: auto, cpu, cuda")
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def resolve_precision(precision: Precision, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32).

    ``auto`` is bf16 on CUDA devices that support it and fp32 everywhere else: on a CPU, bf16
    autocast is slower than fp32 on most machines and fp16 is not supported.
    """
    if precision == Precision.auto:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == Precision.fp16 and device.type != "cuda":
        raise ClpdError("precision=fp16 needs a CUDA device (it uses a GradScaler); on a CPU use fp32 or bf16")
    return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]
