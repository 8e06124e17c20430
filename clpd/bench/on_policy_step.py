"""``python -m clpd.bench.store onpolicy``: on-policy optimizer steps (``distill.on_policy=1``) of a
Qwen-shaped random student with a live teacher, through the loop's own ``draw_batch`` and
``step_on``: the student samples answers to the step's prompts (clpd's sampler, one batched
``generate`` with the KV cache, temperature 1, top_p 1), the teacher scores the sampled tokens, and
the student trains on them (forward KL). Arms: ``onpolicy`` and ``onpolicy_fused``
(``trainer.fused_loss``), interleaved in rounds.

Per arm: samples/s and sampled tokens/s over whole steps, and where a step's time goes: generation,
the teacher's transformer body (its forward hooks fence the GPU with ``synchronize``), and the rest
(the student's forward and backward, the output layers and the loss, the optimizer). Random weights
seldom sample the eos, so nearly every sample runs to ``--max-new-tokens``: the budget's worst case."""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from typing import Dict, List

import torch

from clpd.bench.common import PRESETS, machine, report_args, rounds, write_report
from clpd.bench.store_build import placement
from clpd.bench.store_step import Workload, check_run_args, reload, save_initial, step_workload
from clpd.losses.distill import distill_loss

ON_POLICY_ARMS = ("onpolicy", "onpolicy_fused")


class TeacherClock:
    """Wall seconds inside the teacher's transformer body, fenced by ``sync`` at both ends."""

    def __init__(self, body: torch.nn.Module, sync) -> None:
        self.seconds, self.started = 0.0, None
        body.register_forward_pre_hook(lambda *_: self._start(sync))
        body.register_forward_hook(lambda *_: self._stop(sync))

    def _start(self, sync) -> None:
        sync()
        self.started = time.perf_counter()

    def _stop(self, sync) -> None:
        sync()
        self.seconds += time.perf_counter() - self.started


def run_on_policy_arm(work: Workload, arm: str, initial, teacher_clock: TeacherClock, args) -> dict:
    """``--warmup`` untimed and ``--steps`` timed on-policy steps from the initial student."""
    from clpd.config.schema import TrainerConfig
    from clpd.curriculum.sampler import Sampler
    from clpd.evaluation.evaluate import sample_answers
    from clpd.teachers.live import LiveTeacher
    from clpd.training.batches import Batches
    from clpd.training.loop import draw_batch, step_on
    from clpd.training.on_policy import OnPolicy
    from clpd.training.step import Supervision, build_optimizer

    where, fused = work.where, arm.endswith("_fused")
    reload(work.student, initial)
    cfg = TrainerConfig(lr=args.lr, grad_accum=args.grad_accum, batch_size=args.batch_size)
    optimizer = build_optimizer(work.student, cfg, fused=where.cuda)
    scaler = torch.amp.GradScaler(where.device.type, enabled=False)
    sample = functools.partial(sample_answers, eos_id=args.eos_id, pad_id=work.pad_id, autocast=where.autocast(),
                               max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    on_policy = OnPolicy(1.0, args.seed, sample, args.eos_id)
    kd = functools.partial(distill_loss, loss="forward_kl", alpha=0.0, vocab_size=work.width)
    supervision = Supervision(kd, on_policy=on_policy, sampled_loss_fn=functools.partial(kd, gold=False), fused=fused)
    batches = Batches(work.examples, Sampler(range(len(work.examples)), args.batch_size, seed=args.seed),
                      work.pad_id, choose=on_policy.choose)
    teacher = LiveTeacher(work.teacher, fused=fused)
    micro = args.batch_size // args.grad_accum
    steps = []
    for i in range(args.warmup + args.steps):
        where.sync()
        t0, teacher_before = time.perf_counter(), teacher_clock.seconds
        batch, said = draw_batch(batches, supervision, work.student, i, 0, micro)
        step_on(work.student, optimizer, scaler, batch, supervision, where.autocast(), cfg.grad_clip, teacher)
        where.sync()
        if i >= args.warmup:
            steps.append({"step_s": time.perf_counter() - t0, "generate_s": said["sample_s"],
                          "teacher_s": teacher_clock.seconds - teacher_before, "samples": said["samples"],
                          "sampled_tokens": said["sampled_tokens"], "unfinished": said["unfinished_samples"]})
    del optimizer
    return summarize_steps(steps)


def summarize_steps(steps: List[dict]) -> dict:
    total = sum(s["step_s"] for s in steps)
    parts = {k: sum(s[k] for s in steps) for k in ("generate_s", "teacher_s")}
    rest = total - parts["generate_s"] - parts["teacher_s"]
    return {"steps": steps, "mean_step_s": total / len(steps),
            "samples_per_s": sum(s["samples"] for s in steps) / total,
            "sampled_tokens_per_s": sum(s["sampled_tokens"] for s in steps) / total,
            "unfinished": sum(s["unfinished"] for s in steps), "samples": sum(s["samples"] for s in steps),
            "split": {"generate": parts["generate_s"] / total, "teacher": parts["teacher_s"] / total,
                      "rest": rest / total}}


def on_policy_args(args: argparse.Namespace) -> None:
    args.preset, args.top_k = "qwen", 1
    args.student = args.student or PRESETS["qwen2.5-0.5b"]
    args.teacher = args.teacher or PRESETS["qwen2.5-1.5b"]
    check_run_args(args, "onpolicy", ON_POLICY_ARMS, ("steps", "rounds", "batch_size", "grad_accum", "max_new_tokens"))


def cmd_on_policy(args: argparse.Namespace) -> int:
    on_policy_args(args)
    where = placement(args, "onpolicy")
    t0 = time.perf_counter()
    work = step_workload(args, where)
    args.eos_id = work.width - 1  # any id: random weights sample it about once in width draws
    work.teacher.eval().requires_grad_(False)
    clock = TeacherClock(work.teacher.get_decoder(), where.sync)
    print(f"on-policy steps: student {work.describe['student']}, teacher {work.describe['teacher']}, "
          f"{args.batch_size} prompts of {args.seq_len - round(args.seq_len * args.answer_fraction)} tokens, "
          f"{args.max_new_tokens} new tokens each, micro-batches of {args.batch_size // args.grad_accum}; "
          f"{where.describe()}; setup {time.perf_counter() - t0:.1f}s", flush=True)
    initial = save_initial(work.student, None) if where.cuda else {k: v.clone() for k, v in
                                                                    work.student.state_dict().items()}
    runs: Dict[str, List[dict]] = {arm: [] for arm in args.arms}
    for r, order in rounds(args.rounds, args.arms):
        for arm in order:
            out = run_on_policy_arm(work, arm, initial, clock, args)
            runs[arm].append(out)
            split = ", ".join(f"{k} {v:.0%}" for k, v in out["split"].items())
            print(f"round {r + 1} {arm:<15} {out['mean_step_s']:.3f} s/step  {out['samples_per_s']:.1f} samples/s  "
                  f"{out['sampled_tokens_per_s']:,.0f} sampled tokens/s  ({split}; {out['unfinished']} of "
                  f"{out['samples']} samples unfinished)", flush=True)
    summary = {arm: {"median_step_s": statistics.median(r["mean_step_s"] for r in rs),
                     "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
                     "sampled_tokens_per_s": statistics.median(r["sampled_tokens_per_s"] for r in rs),
                     "split": {k: statistics.median(r["split"][k] for r in rs) for k in ("generate", "teacher", "rest")}}
               for arm, rs in runs.items()}
    print(f"\nmedian over {args.rounds} rounds:")
    for arm, s in summary.items():
        print(f"{arm:<15} {s['median_step_s']:.3f} s/step {s['samples_per_s']:>8.1f} samples/s "
              f"{s['sampled_tokens_per_s']:>10,.0f} sampled tokens/s  generate {s['split']['generate']:.0%} "
              f"teacher {s['split']['teacher']:.0%} rest {s['split']['rest']:.0%}")
    write_report(args.json, {"subcommand": "onpolicy", "command": sys.argv, "environment": machine(where),
                             "args": report_args(args), "workload": work.describe, "summary": summary, "runs": runs})
    return 0
