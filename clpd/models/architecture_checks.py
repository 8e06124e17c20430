"""Checks of a student's architecture without its weights: the layers a cut student keeps
(``student.init_from``), and LoRA's target modules on a meta-device model."""

from __future__ import annotations

from typing import List, Optional, Sequence

from clpd.models.path_checks import config_of, gguf_problem, local_folder, model_folder_problem, no_such_path
from clpd.config.schema import TrainConfig
from clpd.config.model import ModelConfig
from clpd.errors import ClpdError
from clpd.models.load import (cut_config, init_source,
                         layers_to_keep)


def init_from_problems(tc: TrainConfig, builds_ladder: bool) -> List[str]:
    """``student.init_from`` and the layers it keeps: the source exists (and its GGUF file, or
    for a ladder name that the ladder will have built it), and every kept layer is one of its
    layers, read from its config (no weights)."""
    s = tc.student
    if s.init_from is None:
        return []
    ladder = list(tc.teachers.ladder)
    source = init_source(s, ladder)
    named = source in ladder
    if named and source.path is None:
        if not builds_ladder:
            return [f"student.init_from={s.init_from}: the teacher {s.init_from} is trained from scratch by the ladder, "
                    f"which this run does not build (it distils from no teacher); give the folder of a built teacher "
                    f"(outputs/teachers/<name>-<key>/checkpoints/final) instead"]
        num_layers = source.num_layers
    else:
        if not named:
            problems = [p for p in (no_such_path("student.init_from", s.init_from, ""),) if p]
            if not problems and local_folder(s.init_from) is not None:
                problem = model_folder_problem(s.init_from, "student.init_from", s.gguf_file, "student.gguf_file")
                if problem:
                    problems.append(problem)
            gguf = gguf_problem("student.gguf_file", s.gguf_file)
            problems += [gguf] if gguf else []
            if problems:
                return problems
        config = config_of(source)
        if config is None:
            return []  # the tokenizer's load, next, says why the source cannot be read
        num_layers = getattr(config, "num_hidden_layers", None)
        if num_layers is None:
            return [f"student.init_from={s.init_from}: its config has no num_hidden_layers ({config.model_type}); "
                    f"cutting layers needs a decoder whose blocks are model.layers (llama, qwen2, ...)"]
    try:
        layers_to_keep(s, num_layers)
    except ClpdError as exc:
        return [str(exc)]
    return []



def tokenizer_key(spec: ModelConfig, key: str) -> str:
    if getattr(spec, "init_from", None):
        return f"{key}.init_from={spec.init_from}"
    if spec.path is not None:
        return f"{key}.path={spec.path}"
    return f"{key}.tokenizer={spec.tokenizer}" if spec.tokenizer is not None else key



def lora_layers(spec: ModelConfig, tokenizer, teachers: Sequence[ModelConfig] = ()) -> Optional[dict]:
    """The module names LoRA can target in ``spec``'s architecture, by kind ({"linear": [...],
    "embedding": [...]}, each the full dotted names), from a meta-device model: no weights are read.
    None when the config cannot be read here (a hub id offline, an adapter folder): the student's
    loader checks the targets again on the real model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if getattr(spec, "init_from", None):  # a cut student: the source's architecture with the kept layers
        config = config_of(init_source(spec, teachers), tokenizer)
        if config is None or getattr(config, "num_hidden_layers", None) is None:
            return None
        try:
            config = cut_config(config, layers_to_keep(spec, config.num_hidden_layers))
        except ClpdError:
            return None  # refused by init_from_problems
    else:
        config = config_of(spec, tokenizer)
        if config is None:
            return None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception:
        return None
    kinds: dict = {"linear": [], "embedding": []}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            kinds["linear"].append(name)
        elif isinstance(module, torch.nn.Embedding):
            kinds["embedding"].append(name)
    return kinds



def lora_problem(spec, tokenizer, teachers: Sequence[ModelConfig] = ()) -> Optional[str]:
    """``student.lora.target_modules`` names that match no linear or embedding layer (as peft
    matches them: the whole dotted name, or its last parts); for a cut student, of the cut model."""
    kinds = lora_layers(spec, tokenizer, teachers)
    if kinds is None:
        return None
    names = [n for kind in kinds.values() for n in kind]
    targets = list(spec.lora.target_modules)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return None
    short = {kind: sorted({n.rsplit(".", 1)[-1] for n in ns}) for kind, ns in kinds.items()}
    arch = spec.arch.value if spec.path is None else spec.path
    if getattr(spec, "init_from", None):
        arch = f"cut from {spec.init_from}"
    allowed = f"{', '.join(short['linear'])} (linear layers)"
    if short["embedding"]:
        allowed += f", {', '.join(short['embedding'])} (embeddings)"
    return (f"student.lora.target_modules={targets}: {', '.join(missing)} not a layer of the student's "
            f"architecture ({arch}); allowed: {allowed}")
