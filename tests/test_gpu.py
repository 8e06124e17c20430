"""Mixed-precision distillation on a CUDA device, with the training loop's own building blocks.

A tiny from-scratch Qwen2 student (fp32 master weights, run under autocast) learns from a slightly
larger from-scratch teacher whose weights are stored in the low precision, on one fixed batch of
random tokens, through ``clpd.losses.distill_loss`` and the loop's ``build_optimizer`` (fused
AdamW on CUDA). The whole module is skipped without CUDA; ``scripts/device_check.sh`` runs it on a
lent GPU machine.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import List, Optional

import pytest
import torch

from clpd.config.enums import Arch, Precision
from clpd.config.model import ModelConfig
from clpd.config.schema import TrainerConfig
from clpd.training.step import build_optimizer
from clpd.data.records import IGNORE_INDEX
from clpd.losses.distill import distill_loss
from clpd.models.load import load_model, resolve_precision
from clpd.models.tokenizer import build_char_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STUDENT = ModelConfig(name="gpu-student", arch=Arch.qwen2, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=128)
TEACHER = ModelConfig(name="gpu-teacher", arch=Arch.qwen2, hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=192, max_position_embeddings=128)


def _fixed_batch(vocab: int, device: torch.device, batch: int = 4, seq_len: int = 48):
    """One batch of random tokens: the first half of each row is 'prompt' (-100), the rest 'answer'."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
    targets = ids[:, 1:].clone()
    targets[:, : seq_len // 2] = IGNORE_INDEX
    return ids[:, :-1].to(device), torch.ones(batch, seq_len, dtype=torch.long, device=device), targets.to(device)


def distill_steps(device: torch.device, precision: Precision, steps: int, lr: float = 3e-3) -> dict:
    """``steps`` distillation steps on one repeated batch; the per-answer-token losses and what the
    models and logits looked like. Written like the loop: autocast chosen once, GradScaler only
    for fp16, logits freed before backward, clip then step."""
    amp_dtype: Optional[torch.dtype] = resolve_precision(precision, device)
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    # The teacher is stored in the low precision (it is never trained); the student keeps fp32
    # master weights and only computes in the low precision under autocast.
    teacher = load_model(TEACHER, tokenizer, dtype=amp_dtype or torch.float32).to(device).eval().requires_grad_(False)
    student = load_model(STUDENT, tokenizer, dtype=torch.float32).to(device).train()
    trainer = TrainerConfig(max_steps=steps, batch_size=4, grad_accum=1, lr=lr, warmup_steps=0, weight_decay=0.0)
    optimizer = build_optimizer(student, trainer, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    vocab = min(student.get_input_embeddings().num_embeddings, teacher.get_input_embeddings().num_embeddings)
    input_ids, attention_mask, targets = _fixed_batch(min(vocab, len(tokenizer)), device)
    answer_tokens = int((targets != IGNORE_INDEX).sum())
    losses: List[float] = []
    logit_dtypes = set()
    for _ in range(steps):
        with torch.inference_mode(), autocast:
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        with autocast:
            student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits
        logit_dtypes.update({("teacher", teacher_logits.dtype), ("student", student_logits.dtype)})
        loss = distill_loss(student_logits, teacher_logits, targets, loss="forward_kl", alpha=0.0,
                            vocab_size=len(tokenizer)).total / answer_tokens
        del teacher_logits, student_logits
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), trainer.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {
        "losses": losses,
        "loss_dtype": loss.dtype,
        "logit_dtypes": logit_dtypes,
        "teacher_dtypes": {p.dtype for p in teacher.parameters()},
        "student_dtypes": {p.dtype for p in student.parameters()},
        "student_finite": all(bool(torch.isfinite(p).all()) for p in student.parameters()),
        "scale": scaler.get_scale() if scaler.is_enabled() else None,
    }


def test_bf16_distillation_keeps_fp32_master_weights_and_the_loss_falls():
    out = distill_steps(torch.device("cuda"), Precision.bf16, steps=30)
    losses = out["losses"]
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.8 * losses[0], f"forward KL did not fall on a repeated batch: {losses}"
    assert out["teacher_dtypes"] == {torch.bfloat16}
    assert out["student_dtypes"] == {torch.float32}
    assert out["logit_dtypes"] == {("teacher", torch.bfloat16), ("student", torch.bfloat16)}
    assert out["loss_dtype"] == torch.float32  # the KD loss upcasts each chunk to fp32
    assert out["student_finite"]


def test_fp16_autocast_with_a_grad_scaler_gives_finite_losses():
    out = distill_steps(torch.device("cuda"), Precision.fp16, steps=8)
    assert all(math.isfinite(v) for v in out["losses"]), out["losses"]
    assert out["student_dtypes"] == {torch.float32}
    assert out["teacher_dtypes"] == {torch.float16}
    assert out["student_finite"]
    assert out["scale"] is not None and math.isfinite(out["scale"]) and out["scale"] > 0


def test_resolve_precision_auto_picks_bf16_on_this_gpu():
    # H100/H200 (and any Ampere or newer card) support bf16; older cards fall back to fp32.
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert resolve_precision(Precision.auto, torch.device("cuda")) == expected


def test_the_training_command_distils_on_cuda_in_bf16_with_a_progressive_ladder_and_a_lora_student(tmp_path):
    """`clpd train` end to end on the GPU: teachers built in the cache, switched progressively,
    a LoRA student (bf16 base, fp32 adapters) under bf16 autocast; the loss stays finite and falls
    while one teacher supervises (a switch changes the target, so losses across it do not compare)."""
    import json

    from rich.console import Console

    from clpd.commands.run_train import run_train
    from tests.conftest import compose_config

    ladder = ("teachers.ladder=[{name: a, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64},"
              "{name: b, hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}]")
    cfg = compose_config("train", [
        "student.hidden_size=64", "student.num_layers=2", "student.num_heads=4", "student.intermediate_size=128",
        "student.lora.enabled=true", "student.lora.r=8", "student.lora.dropout=0.0",
        "benchmark.train_size=256", "method=none", "distill=forward_kl", "teachers.name=gpu", ladder,
        "teachers.schedule=progressive", "teachers.build.max_steps=10", "teachers.build.warmup_steps=2",
        "teachers.build.eval=false", f"teachers.cache_dir={tmp_path / 'cache'}", "trainer.device=cuda",
        "trainer.precision=bf16", "trainer.max_steps=40", "trainer.warmup_steps=2", "trainer.lr=1e-2",
        "trainer.log_every=1"])
    summary = run_train(cfg, tmp_path / "run", Console(quiet=True))
    assert [(s["step"], s["to"]) for s in summary["teacher_switches"]] == [(0, "a"), (20, "b")]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    assert all(math.isfinite(r["loss"]) for r in records)
    with_b = [r["loss"] for r in records if r["teacher"] == "b"]
    assert sum(with_b[-4:]) < sum(with_b[:4])
    assert (tmp_path / "run" / "checkpoints" / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_fused_output_layer_and_loss_on_cuda_equals_the_unfused_one(loss, monkeypatch):
    """On the GPU in fp32, chunked over rows: the fused loss and its gradients w.r.t. the hidden
    states and the output matrix are those of full logits (as on the CPU)."""
    import clpd.losses.fused as fused
    from clpd.losses.fused import HeadRows

    monkeypatch.setattr(fused, "RECOMPUTE_ABOVE", 0)  # chunks of 64 rows, each recomputed in backward

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 300, 32, 5000
    hidden, weight = torch.randn(n, h, device="cuda", generator=g), torch.randn(v, h, device="cuda", generator=g) * 0.5
    teacher = torch.randn(n, v, device="cuda", generator=g) * 2
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    results = []
    for fuse in (True, False):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        student = HeadRows(hh, ww) if fuse else hh @ ww.T
        terms = distill_loss(student, teacher, targets, loss=loss, alpha=0.3, temperature=2.0, chunk_size=64)
        terms.total.backward()
        results.append((terms.total.detach(), hh.grad, ww.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
