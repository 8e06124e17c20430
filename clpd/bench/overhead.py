"""CLPD's own cost per step: what a clpd step does beyond a standard_kd step, measured.

Both arms train the same student on the same teacher; what differs is bookkeeping around the
model: clpd draws each batch from a paced pool of a difficulty order (the sampler), finds the
stage and the teacher of the step (the schedule), and describes the pool for the log; standard_kd
draws from the whole set in random order and always asks the strongest teacher. This script times
exactly those calls, as ``clpd.training.loop.train`` makes them, for every step of the default job's 700
(``schedule_step``, ``lr_at``, ``Batches.step`` -- which also sorts, cuts and lays out the
micro-batches --, the schedule, ``Sampler.describe``), in each arm's own configuration
(``method=clpd`` and ``method=standard_kd`` composed as the CLI does, on the arith data), and the
model step both arms share: ``optimizer_step`` of the micro student against the arith large
teacher shape (random weights) on one fixed batch of 32. The overhead is

    (model step + clpd's bookkeeping) / (model step + standard_kd's bookkeeping)

so "the same teacher, batch and examples" holds by construction: the model step is one and the
same measurement. Rounds alternate the arms; medians and min-max are printed.

    python -m clpd.bench.overhead                    # ~1-2 min on 2 cores
    python -m clpd.bench.overhead --rounds 1 --steps 50 --model-steps 3    # seconds
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from clpd.bench.common import rounds
from clpd.config.model import ModelConfig
from clpd.config.schema import register_configs, to_object
from clpd.curriculum.sampler import build_sampler
from clpd.curriculum.scorers import compute_scores, is_curriculum
from clpd.curriculum.stages import stage_starts
from clpd.data import load_problems
from clpd.data.prompts import encode_problems
from clpd.losses.distill import distill_loss
from clpd.models.load import load_model
from clpd.models.tokenizer import build_char_tokenizer
from clpd.teachers.live import LiveTeacher
from clpd.teachers.schedule import make_schedule
from clpd.training.batches import Batches
from clpd.training.schedule import lr_at, schedule_step
from clpd.training.step import build_optimizer, optimizer_step


def arm(method: str, limit: int | None):
    """The typed config, examples, sampler-backed Batches and schedule of ``method=...``."""
    register_configs()
    with initialize_config_module(config_module="clpd.conf", version_base="1.3"):
        tc = to_object(compose(config_name="train", overrides=[f"method={method}"]))
    tokenizer = build_char_tokenizer()
    problems = load_problems(tc.benchmark, tc.benchmark.train_split, limit or tc.benchmark.train_limit)
    problems, examples, _ = encode_problems(problems, tokenizer, tc.benchmark.chat_template, tc.trainer.max_length,
                                            tc.trainer.overlong.value)
    c = tc.curriculum
    scores = compute_scores(c, problems, examples, tc.seed, {}) if is_curriculum(c) else None
    sampler = build_sampler(tc, scores, len(examples))
    schedule = make_schedule(tc.teachers, stage_starts(tc, sampler))
    return tc, tokenizer, Batches(examples, sampler, tokenizer.pad_token_id), schedule


def bookkeeping_seconds(tc, batches: Batches, schedule, steps: int) -> float:
    """Mean seconds per step of the loop's calls around the model (see the module docstring)."""
    cfg, micro = tc.trainer, tc.trainer.batch_size // tc.trainer.grad_accum
    tokens = 0
    start = time.perf_counter()
    for step in range(steps):
        at = schedule_step(step, tokens, cfg)
        lr_at(at, cfg)
        batch = batches.step(step, at, micro)
        schedule(at)
        batches.sampler.describe(at)
        tokens += batch.tokens
    return (time.perf_counter() - start) / steps


def model_step_seconds(tc, tokenizer, batches: Batches, steps: int) -> float:
    """Mean seconds of ``optimizer_step``: micro student, arith large-teacher shape, one fixed batch."""
    torch.manual_seed(0)
    student = load_model(tc.student, tokenizer).train()
    teacher_spec = next(t for t in tc.teachers.ladder if t.name == "large")
    teacher = load_model(ModelConfig(**{**vars(teacher_spec), "path": None}), tokenizer).eval().requires_grad_(False)
    optimizer = build_optimizer(student, tc.trainer, fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = batches.step(0, 0, tc.trainer.batch_size // tc.trainer.grad_accum)
    loss_fn = functools.partial(distill_loss, loss="forward_kl", alpha=0.0, vocab_size=len(tokenizer))
    run = functools.partial(optimizer_step, student, optimizer, scaler, batch.micro_batches,
                            answer_tokens=batch.answer_tokens, loss_fn=loss_fn, teacher=LiveTeacher(teacher),
                            autocast=torch.autocast("cpu", enabled=False), grad_clip=1.0)
    run()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        run()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m clpd.bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=700, help="bookkeeping steps per arm and round (the default job's 700)")
    p.add_argument("--model-steps", type=int, default=20, help="timed optimizer steps per round")
    p.add_argument("--train-limit", type=int, default=None, help="the first N training problems (default: all)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = {m: arm(m, args.train_limit) for m in ("standard_kd", "clpd")}
    tc, tokenizer, batches, _ = arms["standard_kd"]
    times = {"standard_kd": [], "clpd": [], "model": []}
    for _, order in rounds(args.rounds, ["standard_kd", "clpd"]):
        for name in order:
            a_tc, _, a_batches, a_schedule = arms[name]
            times[name].append(bookkeeping_seconds(a_tc, a_batches, a_schedule, args.steps))
        times["model"].append(model_step_seconds(tc, tokenizer, batches, args.model_steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds; "
          f"bookkeeping over {args.steps} steps, model step over {args.model_steps}")
    for name, values in times.items():
        print(f"  {name:12s} median {med[name] * 1e3:8.3f} ms/step  (min {min(values) * 1e3:.3f}, max {max(values) * 1e3:.3f})")
    ratio = (med["model"] + med["clpd"]) / (med["model"] + med["standard_kd"])
    print(f"clpd step / standard_kd step = ({med['model'] * 1e3:.2f} + {med['clpd'] * 1e3:.3f}) / "
          f"({med['model'] * 1e3:.2f} + {med['standard_kd'] * 1e3:.3f}) ms = {ratio:.4f}x")


if __name__ == "__main__":
    main()
