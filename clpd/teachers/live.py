"""Live teachers during training: the vocabulary check and device residency.

* ``check_vocabularies``: token-level distillation needs one vocabulary for student and teachers.
* ``TeacherPool`` keeps only the active teacher loaded; a switch frees the old one first.

Building the ladder's from-scratch teachers is :mod:`clpd.teachers.ladder`.
"""

from __future__ import annotations

import gc
from typing import Dict, Optional, Sequence, Union

import torch
from transformers import PreTrainedTokenizerBase

from clpd.config.model import ModelConfig
from clpd.errors import ClpdError
from clpd.losses.fused import HeadRows
from clpd.models.load import load_model
from clpd.training.head import head_rows, why_not_fused


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------

def check_vocabularies(student_tok: PreTrainedTokenizerBase, student_name: str,
                       teachers: Sequence[tuple[str, PreTrainedTokenizerBase]]) -> None:
    """Token-level distillation compares distributions row by row: the tokenizers must agree."""
    vocab = student_tok.get_vocab()
    for name, tok in teachers:
        if tok.get_vocab() != vocab:
            raise ClpdError(f"teacher '{name}' ({len(tok)} tokens, {tok.name_or_path}) and student '{student_name}' "
                            f"({len(student_tok)} tokens, {student_tok.name_or_path}) have different tokenizers; "
                            f"token-level distillation needs one shared vocabulary")


# ---------------------------------------------------------------------------------------------
# Residency
# ---------------------------------------------------------------------------------------------

class LiveTeacher:
    """A loaded teacher model; ``logits`` runs it on a micro-batch (the step's :class:`Teacher`):
    its logits, or with ``fused`` (and a model whose output layer allows it) their makings, the
    hidden states and output matrix that the fused loss multiplies out chunk by chunk."""

    def __init__(self, model: torch.nn.Module, fused: bool = False) -> None:
        self.model = model
        self.fused = fused and why_not_fused(model) is None

    def logits(self, batch: Dict[str, torch.Tensor], examples: torch.Tensor, autocast) -> Union[torch.Tensor, HeadRows]:
        # no_grad, not inference_mode: the chunked loss reads (and its checkpoints keep) these logits
        # as they are, where inference tensors would first have to be copied (one more [N, V] matrix).
        with torch.no_grad(), autocast:
            return head_rows(self.model, batch) if self.fused else self.model(**batch).logits


class TeacherPool:
    """Loads teachers on demand and keeps only the active one: on a switch the old teacher is
    released (and CUDA's cache emptied) *before* the new one is loaded, so the device never holds
    two. Teachers are frozen, in eval mode, in ``dtype`` (bf16 on CUDA); ``fused``: they hand the
    loss their output layer (with a fused student)."""

    def __init__(self, specs: Sequence[ModelConfig], tokenizer: PreTrainedTokenizerBase, *,
                 device: torch.device, dtype: torch.dtype, fused: bool = False) -> None:
        self.fused = fused
        self.specs = list(specs)
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.active_index: Optional[int] = None
        self.teacher: Optional[LiveTeacher] = None

    def get(self, index: int) -> tuple[LiveTeacher, bool]:
        """The teacher ``index``, and whether this call switched to it."""
        if index == self.active_index:
            return self.teacher, False
        self.release()
        model = load_model(self.specs[index], self.tokenizer, dtype=self.dtype)
        model.requires_grad_(False)
        self.teacher = LiveTeacher(model.to(self.device).eval(), self.fused)
        self.active_index = index
        return self.teacher, True

    def name(self, index: Optional[int]) -> Optional[str]:
        return None if index is None else self.specs[index].name

    def release(self) -> None:
        self.teacher = None
        self.active_index = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def teacher_dtype(autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """Teachers only run forward passes: in the autocast dtype when there is one (bf16 on CUDA)."""
    return autocast_dtype or torch.float32
