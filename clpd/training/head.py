"""A model's output layer taken out of its forward, for the fused loss (clpd.losses.fused).

``head_rows(model, batch)`` runs ``model`` with its output layer made the identity, so the
"logits" it returns at the answer positions (``logits_to_keep``) are the last hidden states, and
pairs them with the output matrix: a :class:`~clpd.losses.fused.HeadRows`. The loss then applies
the matrix chunk by chunk. The matrix is the output layer's own parameter (tied to the input
embeddings or not), so its gradient reaches the same parameter; with LoRA on the output layer it is
``W + scaling * B @ A``, made under autograd, so the adapter's matrices get theirs.

Only where the model's logits are exactly ``output_layer(hidden)``: the causal LMs of
``PLAIN_HEADS`` (no logit scaling or soft-capping after the layer), a bias-free output layer, and
LoRA without dropout or DoRA on it. :func:`why_not_fused` says why a model is not.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional

import torch

from clpd.losses.fused import HeadRows

# Causal LMs whose forward ends in ``logits = lm_head(hidden_states)``, nothing after it.
PLAIN_HEADS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")

# trainer.fused_loss=null fuses from this many output rows on: a real vocabulary (SmolLM2's 49,152,
# Qwen's 151,936), where the [rows, V] logits are most of a step's activation memory. Below it (the
# from-scratch models' 100-row character vocabulary) there is nothing to save, and a fused step
# measured the same time as an unfused one (python -m clpd.bench.store step), so those runs keep the
# unfused path and its numbers.
FUSED_MIN_ROWS = 4096


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and PEFT wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def why_not_fused(model: torch.nn.Module) -> Optional[str]:
    """None when ``model``'s output layer can be fused with the loss; otherwise why not, in words."""
    lm = _causal_lm(model)
    if type(lm).__name__ not in PLAIN_HEADS:
        return f"{type(lm).__name__} is not one of the causal LMs whose logits are their output layer's alone"
    head = lm.get_output_embeddings()
    base = getattr(head, "base_layer", head)
    if not isinstance(base, torch.nn.Linear) or base.bias is not None:
        return "its output layer is not a bias-free linear layer"
    if hasattr(head, "lora_A"):
        dropout = [m for m in getattr(head, "lora_dropout", {}).values() if not isinstance(m, torch.nn.Identity)]
        if dropout or any(getattr(head, "use_dora", {}).values()) or getattr(head, "merged", False):
            return "LoRA on its output layer has dropout, DoRA or merged weights"
    return None


def output_rows(model: torch.nn.Module) -> int:
    return _causal_lm(model).get_output_embeddings().weight.shape[0]


def output_matrix(model: torch.nn.Module) -> torch.Tensor:
    """The output layer's effective [V, H] matrix (with its active LoRA adapters added)."""
    head = _causal_lm(model).get_output_embeddings()
    weight = head.weight
    if hasattr(head, "lora_A") and not getattr(head, "disable_adapters", False):
        for name in head.active_adapters:
            if name in head.lora_A:
                weight = weight + head.scaling[name] * (head.lora_B[name].weight @ head.lora_A[name].weight)
    return weight


@contextmanager
def output_layer_skipped(model: torch.nn.Module):
    """Inside: ``model``'s output layer returns its input."""
    head = _causal_lm(model).get_output_embeddings()
    head.forward = _identity  # an instance attribute: shadows the class's forward until deleted
    try:
        yield
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def head_rows(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> HeadRows:
    """``model``'s last hidden states at ``batch``'s kept positions (``logits_to_keep``), with its
    output matrix: what its logits there would be made of."""
    with output_layer_skipped(model):
        hidden = model(**batch).logits
    return HeadRows(hidden, output_matrix(model))
