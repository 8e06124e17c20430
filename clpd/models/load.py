"""One factory for students and teachers.

A model is either pretrained (``spec.path``: a Hugging Face id, a local ``save_pretrained``
folder or a ``pkg:`` package folder (:mod:`clpd.config.package_paths`), optionally with a GGUF file inside it),
built from scratch from the architecture fields of :class:`~clpd.config.ModelConfig` (Llama or
Qwen2) with random weights, or, for a student, cut from another model (``student.init_from``:
:func:`cut_layers`). Everything that leaves this module is a plain transformers object, so
checkpoints load without clpd.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from safetensors import SafetensorError
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen2Config)

from clpd.config.enums import Arch, Device, Precision
from clpd.config.model import LoraConfig, ModelConfig, StudentConfig
from clpd.errors import ClpdError, first_line
from clpd.config.package_paths import is_package_path, package_folder
from clpd.models.gguf import converted_folder
from clpd.models.tokenizer import build_char_tokenizer

log = logging.getLogger("clpd.models.load")

ARCH_CONFIGS = {Arch.llama: LlamaConfig, Arch.qwen2: Qwen2Config}


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else (absolute, relative, home, deeper) is a path.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_source(name: str, what: str = "model") -> None:
    """Refuse a local path that does not exist, or a ``pkg:`` path whose package is not installed,
    before anything tries to download it."""
    if is_package_path(name):
        try:
            package_folder(name)
        except ClpdError as exc:
            raise ClpdError(f"{what} {exc}") from None
    elif _looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise ClpdError(f"{what} {name}: no such file or folder")


def local_source(name: str) -> str:
    """What transformers is given for ``name``: the folder of a ``pkg:`` path or of a local path
    (``~`` expanded), or the name itself (a hub id)."""
    if is_package_path(name):
        return str(package_folder(name))
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def _from_pretrained(loader, name: str, what: str, **kwargs):
    check_source(name, what)
    if kwargs.get("gguf_file"):
        _require_gguf(what)
    try:
        return loader.from_pretrained(local_source(name), **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:  # missing or damaged files, no network, not a model folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClpdError(f"could not load {what} '{name}': {first}") from exc


def gguf_reader_missing() -> bool:
    """Whether the ``gguf`` package, which transformers needs to read GGUF files, is missing."""
    return importlib.util.find_spec("gguf") is None


def _require_gguf(what: str) -> None:
    if gguf_reader_missing():
        raise ClpdError(f"{what}: reading a GGUF file needs the gguf package (pip install gguf)")


def pretrained_source(spec: ModelConfig, what: str) -> tuple[str, Optional[str]]:
    """What transformers reads for ``spec.path``: ``(path, gguf_file)``. A local GGUF file is read
    through its converted folder (:mod:`clpd.models.gguf`: parsed and dequantized once, not at
    every load), so the pair is then ``(that folder, None)``."""
    if not spec.gguf_file:
        return spec.path, None
    check_source(spec.path, what)
    _require_gguf(what)
    try:
        folder = converted_folder(local_source(spec.path), spec.gguf_file, spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ClpdError(f"could not load {what} '{spec.path}': {first_line(exc)}") from exc
    return (str(folder), None) if folder is not None else (spec.path, spec.gguf_file)


def _load_pretrained_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerBase:
    what = f"tokenizer of '{spec.name}'"
    path, gguf_file = pretrained_source(spec, what)
    return _from_pretrained(AutoTokenizer, path, what, gguf_file=gguf_file, trust_remote_code=spec.trust_remote_code)


def load_tokenizer(spec: ModelConfig, teachers: Sequence[ModelConfig] = ()) -> PreTrainedTokenizerBase:
    """The tokenizer of ``spec``; a student cut from another model (``init_from``) has that
    model's tokenizer. ``teachers``: the ladder, whose names ``init_from`` may use."""
    if getattr(spec, "init_from", None):
        return load_tokenizer(init_source(spec, teachers))
    if spec.path is not None:
        tokenizer = _load_pretrained_tokenizer(spec)
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


def load_model(spec: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype = torch.float32,
               teachers: Sequence[ModelConfig] = ()) -> PreTrainedModel:
    """Build or load the model of ``spec`` on the CPU; the caller moves it to its device.

    From-scratch weights depend on the torch seed at call time: seed before calling. A student
    with ``init_from`` is cut from that model (``teachers``: the ladder, with the folders of its
    built from-scratch rungs, whose names ``init_from`` may use).
    """
    if getattr(spec, "init_from", None):
        return _cut_student(spec, tokenizer, dtype, teachers)
    adapter = Path(local_source(spec.path)) / ADAPTER_CONFIG if spec.path is not None else None
    if adapter is not None and adapter.exists():
        model = _load_adapter(spec, adapter.parent, dtype)
    elif spec.path is not None:
        path, gguf_file = pretrained_source(spec, f"model '{spec.name}'")
        model = _from_pretrained(AutoModelForCausalLM, path, f"model '{spec.name}'", dtype=dtype,
                                 gguf_file=gguf_file, trust_remote_code=spec.trust_remote_code)
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


# --- students cut from a model ----------------------------------------------------------------------

def init_source(student: StudentConfig, teachers: Sequence[ModelConfig] = ()) -> ModelConfig:
    """The model ``student.init_from`` names: the teacher of that name in ``teachers`` (a ladder
    name wins over a hub id spelled the same), else a folder, hub id or ``pkg:`` path, with the
    student's ``gguf_file`` and ``trust_remote_code``."""
    for teacher in teachers:
        if teacher.name == student.init_from:
            return teacher
    return ModelConfig(name=student.init_from, path=student.init_from, gguf_file=student.gguf_file,
                       trust_remote_code=student.trust_remote_code)


def layers_to_keep(cut, num_layers: int, prefix: str = "student.", source_key: str = "init_from") -> List[int]:
    """The source's blocks a cut keeps, in order: ``cut.keep_layers``, every ``cut.keep_every``-th
    from the first (0, k, 2k, ...: DistilBERT's "one layer out of two" for k = 2), or all. Refuses
    layers the source does not have, naming the allowed range. ``cut``: a StudentConfig (keys
    ``student.keep_layers``, source ``student.init_from``) or an EvalConfig (``prefix=""``,
    ``source_key="checkpoint"``)."""
    if cut.keep_layers is not None:
        keep = sorted(cut.keep_layers)
        outside = [i for i in keep if not 0 <= i < num_layers]
        if outside:
            raise ClpdError(f"{prefix}keep_layers={list(cut.keep_layers)}: {outside} out of range: "
                            f"{prefix}{source_key}={getattr(cut, source_key)} has {num_layers} layers; "
                            f"allowed: 0..{num_layers - 1}")
        return keep
    if cut.keep_every is not None:
        return list(range(0, num_layers, cut.keep_every))
    return list(range(num_layers))


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The block list of a decoder-only transformers model (``model.model.layers`` in Llama,
    Qwen2, Mistral, Qwen3, ...); refuses architectures laid out otherwise."""
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(model.config, "num_hidden_layers"):
        raise ClpdError(f"cutting layers needs a decoder whose blocks are model.layers (llama, qwen2, ...); "
                        f"{type(model).__name__} ({model.config.model_type}) is laid out otherwise")
    return layers


# Config entries with one value per block, cut with the blocks: Qwen2's (and Qwen3's, Gemma's)
# sliding or full attention per layer; SmolLM3's layers without RoPE.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def cut_config(config, keep: Sequence[int], source: Optional[str] = None):
    """A copy of ``config`` for the blocks ``keep`` of its ``num_hidden_layers`` (refuses any
    other list: empty, repeated or out of range); ``cut_from`` records where they came from."""
    n = config.num_hidden_layers
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ClpdError(f"layers to keep {list(keep)}: need distinct layers in 0..{n - 1}")
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(keep)
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(config, key, [value[i] for i in keep])
    config.cut_from = {"model": source or config.model_type, "layers": list(keep), "num_layers": n}
    return config


def cut_layers(model: PreTrainedModel, keep: Sequence[int], source: Optional[str] = None) -> PreTrainedModel:
    """A new model of ``model``'s architecture with its embeddings, final norm, head and the
    blocks ``keep`` (renumbered 0..len(keep)-1 in that order); ``model`` is left unchanged.

    The new model is built from a copy of the config with ``num_hidden_layers = len(keep)`` (and
    the per-layer lists, e.g. Qwen2's ``layer_types``, cut the same way) and loaded from
    ``model``'s state dict: every module gets its own layer index (the KV cache is indexed by it),
    and the checkpoint is a plain model of a known architecture. ``config.cut_from`` records the
    source and the kept layers. Keeping every block gives ``model``'s logits exactly.
    """
    layers = decoder_layers(model)
    config = cut_config(model.config, keep, source or getattr(model, "name_or_path", "") or model.config.model_type)
    student = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    prefix = _layers_prefix(model, layers)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in model.state_dict().items():
        match = re.match(rf"{re.escape(prefix)}(\d+)\.(.*)", key)
        if match is None:
            state[key] = tensor
        elif int(match.group(1)) in new_index:
            state[f"{prefix}{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def _layers_prefix(model: PreTrainedModel, layers: torch.nn.ModuleList) -> str:
    """The state-dict prefix of the block list ("model.layers.")."""
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise ClpdError(f"{type(model).__name__}: its block list is not a submodule")  # not reached for HF models


def _cut_student(spec: StudentConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype,
                 teachers: Sequence[ModelConfig]) -> PreTrainedModel:
    source_spec = init_source(spec, teachers)
    if source_spec.path is None:
        raise ClpdError(f"student.init_from={spec.init_from}: the teacher {source_spec.name} has no weights yet (a "
                        f"from-scratch teacher is trained by the ladder before the student is cut from it)")
    source = load_model(source_spec, tokenizer, dtype=dtype)
    if hasattr(source, "merge_and_unload"):  # a LoRA checkpoint: cut the model it stands for
        source = source.merge_and_unload()
    keep = layers_to_keep(spec, len(decoder_layers(source)))
    student = cut_layers(source, keep, source=source_spec.path)
    log.info("student %s: cut from %s, layers %s of %d: %.2fM parameters (the source: %.2fM)", spec.name,
             source_spec.name, keep, len(decoder_layers(source)), count_parameters(student) / 1e6,
             count_parameters(source) / 1e6)
    return student


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
