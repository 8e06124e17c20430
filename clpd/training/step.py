"""One optimizer step: what the student learns from (:class:`Supervision`), the teacher interface
the step reads (:class:`Teacher`, :class:`Teachers`), and :func:`optimizer_step`.

One optimizer step = ``trainer.grad_accum`` micro-batches of the batch the sampler draws for that
step. The loss is summed over answer tokens and divided by the answer tokens of the *whole*
accumulated batch, so splitting a batch into micro-batches does not change the update.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol, Sequence, Union

import torch

from clpd.config.schema import TrainerConfig
from clpd.data.batching import answer_mask
from clpd.training.distributed import all_reduce_sum, ranks
from clpd.training.on_policy import OnPolicy
from clpd.losses.distill import LossTerms, distill_loss
from clpd.losses.fused import HeadRows
from clpd.losses.sparse import TopK
from clpd.training.head import head_rows


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig, fused: bool) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying norms and biases only hurts (nanoGPT, GPT-2 recipe).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused)


# (student logits or HeadRows, teacher outputs or None, targets of the answer rows) -> the summed loss
LossFn = Callable[[Union[torch.Tensor, HeadRows], Optional[Union[torch.Tensor, TopK, HeadRows]], torch.Tensor], LossTerms]


class Teacher(Protocol):
    """What a step reads from a teacher: its outputs at a micro-batch's answer positions, full
    logits ``[answer positions, V]`` or their makings (:class:`HeadRows`) from a live model, or
    their stored top-k (:class:`TopK`). The step never asks which kind it has (clpd.teachers.live
    and clpd.teachers.store give them; the loss takes each)."""

    def logits(self, batch: Dict[str, torch.Tensor], examples: torch.Tensor, autocast) -> Union[torch.Tensor, TopK, HeadRows]:
        """``batch``: the micro-batch's model inputs on the device (``logits_to_keep`` selects the
        answer positions); ``examples``: their indices in the training set; ``autocast``: the
        student's autocast context."""


class Teachers(Protocol):
    """The ladder's teachers during training: ``get(index)`` gives teacher ``index`` and whether
    that call switched to it (only the active one is held), ``name`` a teacher's name,
    ``release`` frees the active one."""

    active_index: Optional[int]

    def get(self, index: int) -> tuple[Teacher, bool]: ...

    def name(self, index: Optional[int]) -> Optional[str]: ...

    def release(self) -> None: ...


def sft_loss(student_logits: Union[torch.Tensor, HeadRows], teacher_logits: Optional[torch.Tensor],
             targets: torch.Tensor, slice_size: Optional[int] = None) -> LossTerms:
    return distill_loss(student_logits, None, targets, loss="sft", alpha=1.0, slice_size=slice_size)


@dataclass
class StepResult:
    loss: float  # per answer token; nan/inf when the step was not applied
    terms: Dict[str, torch.Tensor]  # "ce" and "kd" per answer token, when both were computed (on the device)
    grad_norm: float  # before clipping; nan when the step was not applied
    answer_tokens: int

    @property
    def applied(self) -> bool:
        return math.isfinite(self.loss)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   micro_batches: Sequence[Dict[str, torch.Tensor]], *, answer_tokens: int, loss_fn: LossFn,
                   teacher: Optional[Teacher], autocast, grad_clip: float,
                   sampled: Sequence[Dict[str, torch.Tensor]] = (), sampled_tokens: int = 0,
                   sampled_loss_fn: Optional[LossFn] = None, fused: bool = False) -> StepResult:
    """Accumulate the gradients of ``micro_batches`` (one step's batch, or this rank's share of
    it) and update the weights.

    Each micro-batch's summed loss is divided by ``answer_tokens``, the answer tokens of the whole
    step over all ranks, so two micro-batches give the update of one batch of the same examples,
    and N ranks the update of one process. A non-finite loss never reaches the weights: the step is
    then not applied on any rank (the caller decides what that means).

    ``sampled``: micro-batches of the student's own answers (on-policy), ``sampled_tokens`` of the
    step's answer tokens, taken by ``sampled_loss_fn`` (the divergence alone). Their term is logged
    as ``kd_sampled``, per sampled token; ``ce`` and ``kd`` are per gold answer token.

    ``fused``: the student's output layer runs inside the loss (:func:`~clpd.training.head.head_rows`),
    so no [answer positions, V] logits are held.
    """
    world = ranks().world_size
    device = next(model.parameters()).device
    step_loss = torch.zeros((), device=device)
    terms: Dict[str, torch.Tensor] = {}
    gold_tokens = max(answer_tokens - sampled_tokens, 1)
    parts_of = [(mb, loss_fn, False) for mb in micro_batches] + [(mb, sampled_loss_fn, True) for mb in sampled]
    for i, (mb, loss_of, own) in enumerate(parts_of):
        mb = dict(mb)
        examples = mb.pop("index", None)  # indices into the training set: where stored teacher outputs are found
        mb = {k: v.to(device) for k, v in mb.items()}
        # Logits at answer positions only: both models apply their output layer (152k rows for Qwen)
        # to the positions the loss reads, flattened to [answer positions, V] in row-major order.
        targets = mb.pop("targets")
        keep = answer_mask(targets)
        targets = targets[keep]
        mb["logits_to_keep"], mb["use_cache"] = keep, False  # no cache: packed rows' bounds come from position_ids
        teacher_logits = None if teacher is None else teacher.logits(mb, examples, autocast)
        # DDP all-reduces gradients in the backward of the last micro-batch only.
        sync = model.no_sync() if world > 1 and i < len(parts_of) - 1 else nullcontext()
        with sync:
            with autocast:
                logits = head_rows(model, mb) if fused else model(**mb).logits
            parts = loss_of(logits, teacher_logits, targets)
            loss = parts.total / max(answer_tokens, 1)
            # Free both models' logits before backward: they are the largest activations, and
            # keeping them would raise the backward's peak memory.
            del logits, teacher_logits
            scaler.scale(loss * world).backward()  # DDP averages over ranks; the loss is a sum over them
        step_loss += loss.detach()  # stays on the device: .item() here would sync every micro-batch
        if own:
            terms["kd_sampled"] = terms.get("kd_sampled", 0.0) + parts.kd.detach() / max(sampled_tokens, 1)
        elif parts.ce is not None and parts.kd is not None:  # both terms of a mixed loss: logged apart
            for name in ("ce", "kd"):
                terms[name] = terms.get(name, 0.0) + getattr(parts, name).detach() / gold_tokens

    # One sync per optimizer step, before the update (under fp16 the scaler skips inf *gradients*
    # by itself; this is the loss): the sum over ranks, so that all of them step or none.
    totals = all_reduce_sum(torch.stack([step_loss, *terms.values()]))
    loss_now = totals[0].item()
    terms = dict(zip(terms, totals[1:]))
    grad_norm = float("nan")
    if math.isfinite(loss_now):
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf")))
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_now, terms, grad_norm, answer_tokens)


@dataclass
class Supervision:
    """What the student learns from: ``loss_fn(student_logits, teacher_logits or None, targets)``,
    and for distillation the teachers with ``schedule(schedule_step)`` naming each step's teacher;
    on-policy, also the student's own answers (``on_policy``) and their loss (``sampled_loss_fn``);
    ``fused``: the loss takes the student's output layer (trainer.fused_loss)."""
    loss_fn: LossFn = sft_loss
    teachers: Optional[Teachers] = None
    schedule: Optional[Callable[[int], int]] = None
    on_policy: Optional[OnPolicy] = None
    sampled_loss_fn: Optional[LossFn] = None
    fused: bool = False
