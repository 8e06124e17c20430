"""``clpd plan``: the timeline a ``clpd train`` config would follow, without training.

It composes exactly the training config, scores the data when no model is needed, and prints the
stages (step range, teacher, pool size, difficulty range); ``plan.json`` holds the per-step pool
and teacher, and ``plan.png`` draws the pacing curve with the teacher stages shaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from clpd.config.enums import Difficulty, DistillLoss, Keep, Targets, TeacherOutputs
from clpd.config.schema import TrainConfig, register_configs, to_object
from clpd.curriculum.sampler import build_sampler
from clpd.curriculum.scorers import compute_scores, given_difficulty, is_curriculum, needs_model, scorers
from clpd.curriculum.stages import stage_at, stage_starts
from clpd.data import load_problems
from clpd.data.prompts import encode_problems
from clpd.errors import ClpdError
from clpd.models.load import load_tokenizer
from clpd.files import atomic_path, write_json
from clpd.teachers.ladder import distilling_teachers, teachers_in_use
from clpd.training.on_policy import chosen
from clpd.commands.job import run_command
from clpd.teachers.schedule import make_schedule, warn_idle_teachers

register_configs()


def timeline(tc: TrainConfig, scores: Optional[np.ndarray], n: int) -> dict:
    """Per step: stage, teacher index (None without distillation), pool size and its difficulty
    range; the same functions the training run uses, so the two agree step by step."""
    sampler = build_sampler(tc, scores, n)
    starts = stage_starts(tc, sampler)
    distills = tc.distill.loss != DistillLoss.sft
    schedule = make_schedule(tc.teachers, starts) if distills else None
    steps = []
    share = tc.distill.on_policy
    for step in range(tc.trainer.max_steps):
        info = sampler.describe(step)
        own = {"on_policy": int(chosen(share, tc.seed, step, tc.trainer.batch_size).sum())} if share > 0 else {}
        steps.append({"step": step, "stage": stage_at(step, starts), "teacher": schedule(step) if schedule else None,
                      **info, **own})
    return {"n": n, "stage_starts": starts, "teachers": [t.name for t in tc.teachers.ladder] if distills else [],
            "steps": steps}


def stage_rows(plan: dict) -> List[dict]:
    """Consecutive steps with the same stage and teacher, as table rows."""
    rows: List[dict] = []
    for s in plan["steps"]:
        if rows and rows[-1]["stage"] == s["stage"] and rows[-1]["teacher"] == s["teacher"]:
            row = rows[-1]
        else:
            row = {"stage": s["stage"], "teacher": s["teacher"], "first": s["step"], "pool": [s["pool"], s["pool"]],
                   "difficulty": None, "on_policy": 0}
            rows.append(row)
        row["last"] = s["step"]
        row["on_policy"] += s.get("on_policy", 0)
        row["pool"][1] = s["pool"]
        if "difficulty" in s:
            lo, hi = s["difficulty"]
            row["difficulty"] = [lo if row["difficulty"] is None else min(lo, row["difficulty"][0]),
                                 hi if row["difficulty"] is None else max(hi, row["difficulty"][1])]
    return rows


def plan_table(tc: TrainConfig, plan: dict, scored_at_train_time: bool) -> Table:
    table = Table(title=f"plan: {tc.trainer.max_steps} steps, {plan['n']} examples, {tc.curriculum.order.value} by "
                        f"{tc.curriculum.difficulty.value}, pacing {tc.curriculum.pacing.value}")
    share = tc.distill.on_policy
    for column in ("stage", "steps", "teacher", "pool size", "difficulty", *(["on-policy"] if share > 0 else [])):
        table.add_column(column, justify="right")
    for r in stage_rows(plan):
        teacher = plan["teachers"][r["teacher"]] if r["teacher"] is not None else "- (gold)"
        difficulty = ("computed at train time" if scored_at_train_time
                      else f"{r['difficulty'][0]:g} .. {r['difficulty'][1]:g}" if r["difficulty"] else "-")
        examples = (r["last"] - r["first"] + 1) * tc.trainer.batch_size
        own = [f"{r['on_policy']}/{examples} ({r['on_policy'] / examples:.0%})"] if share > 0 else []
        table.add_row(str(r["stage"]), f"{r['first']}-{r['last']}", teacher, f"{r['pool'][0]} -> {r['pool'][1]}",
                      difficulty, *own)
    return table


def plot_plan(tc: TrainConfig, plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in plan["steps"]]
    fraction = [s["pool"] / plan["n"] for s in plan["steps"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.cm.Blues(np.linspace(0.15, 0.45, max(len(stage_rows(plan)), 1)))
    for color, r in zip(colors, stage_rows(plan)):
        label = plan["teachers"][r["teacher"]] if r["teacher"] is not None else f"stage {r['stage']} (gold)"
        ax.axvspan(r["first"], r["last"] + 1, color=color, alpha=0.6, label=f"stage {r['stage']}: {label}"
                   if r["teacher"] is not None else label)
    ax.plot(steps, fraction, color="black", linewidth=2, label=f"pool ({tc.curriculum.pacing.value} pacing)")
    ax.set_xlim(0, tc.trainer.max_steps)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of the ordered training set available")
    ax.set_title(f"{tc.curriculum.order.value} by {tc.curriculum.difficulty.value}, start {tc.curriculum.start}, "
                 f"saturate {tc.curriculum.saturate}; teachers: {tc.teachers.schedule.value}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)  # the format: tmp's suffix is .tmp
    plt.close(fig)


def run_plan(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    tc: TrainConfig = to_object(cfg)
    console = console or Console()
    problems = load_problems(tc.benchmark, tc.benchmark.train_split, tc.benchmark.train_limit)
    if not problems:
        raise ClpdError(f"benchmark={tc.benchmark.label()} split {tc.benchmark.train_split} has no problems")
    c = tc.curriculum
    given = given_difficulty(problems) is not None
    if given:
        console.print(f"difficulty: the benchmark's field {tc.benchmark.fields.difficulty} (instead of "
                      f"curriculum.difficulty={c.difficulty.value})")
    at_train_time = needs_model(c) and not given
    scores = None
    if not at_train_time:
        examples = None
        if Difficulty.cot_length in scorers(c):  # needs the student's tokenizer, not its weights
            tokenizer = load_tokenizer(tc.student)
            problems, examples, _ = encode_problems(problems, tokenizer, tc.benchmark.chat_template,
                                                    tc.trainer.max_length, tc.trainer.overlong.value)
        scores = compute_scores(c, problems, examples, tc.seed)
    elif is_curriculum(c) and c.order != c.order.random:
        console.print(f"[yellow]difficulty={c.difficulty.value} needs a model: the order is computed at train time; "
                      f"pool sizes and teachers below do not depend on it[/]")
    plan = timeline(tc, scores, len(problems))
    warn_idle_teachers(tc, plan["stage_starts"])
    # The rungs clpd train would load, and so build when they are not in the cache (standard KD: one).
    plan["teachers_in_use"] = [tc.teachers.ladder[i].name for i in teachers_in_use(tc)]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "plan.json", plan)
    plot_plan(tc, plan, run_dir / "plan.png")
    console.print(plan_table(tc, plan, at_train_time))
    if plan["teachers_in_use"]:
        console.print(f"teachers loaded (trained first when not in teachers.cache_dir={tc.teachers.cache_dir}): "
                      f"{', '.join(plan['teachers_in_use'])}", soft_wrap=True)
    if tc.distill.teacher_outputs == TeacherOutputs.stored:
        kept = f"top-{tc.distill.top_k}" if tc.distill.top_k else "every row"
        console.print(f"teacher outputs: stored, {kept} (built first when not in {tc.teachers.cache_dir}/outputs) for "
                      f"{', '.join(tc.teachers.ladder[i].name for i in distilling_teachers(tc))}", soft_wrap=True)
    if tc.distill.targets == Targets.teacher:
        d, g = tc.distill, tc.distill.teacher_generation
        kept = "those with the gold answer" if d.keep == Keep.correct else "all of them"
        console.print(f"targets: solutions written by {', '.join(tc.teachers.ladder[i].name for i in distilling_teachers(tc))} "
                      f"({d.teacher_samples} per prompt, up to {g.max_new_tokens} tokens, "
                      f"{'greedy' if g.temperature == 0 else f'temperature {g.temperature}, top_p {g.top_p}'}; kept: {kept}), "
                      f"each stage on its teacher's", soft_wrap=True)
    if tc.distill.on_policy > 0:
        g = tc.distill.generation
        console.print(f"on-policy: each example is the student's own sample with probability {tc.distill.on_policy} "
                      f"(up to {g.max_new_tokens} tokens, temperature {g.temperature}, top_p {g.top_p}), scored by the "
                      f"stage's teacher; cross-entropy on the gold rest", soft_wrap=True)
    console.print(f"plan.json and plan.png in {run_dir}", soft_wrap=True)
    return plan


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    return run_command("plan", run_plan, cfg)
