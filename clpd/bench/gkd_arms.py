"""The on-policy arms of ``python -m clpd.bench.trl --on-policy``: clpd with ``distill.on_policy=1``
against TRL's GKDTrainer with ``lmbda=1``, where every example of every step is answered by the
student's own sample and the loss is taken on the sampled tokens.

What both do alike: the step's prompts (its batch sorted by length, as clpd sorts it) left-padded
with their attention mask, ``generate`` with the KV cache, pure sampling (``do_sample``,
temperature 1.0, top_p 1.0, top_k 0) up to ``--max-new-tokens`` or the eos, the generalized JSD
with ``--beta`` on the sampled tokens (TRL: ``generalized_jsd_loss``; clpd: ``distill=jsd``, the
same formula), the live teacher in fp32, AdamW and clipping as the off-policy arms set them.

Where they differ by design: clpd samples the whole step's batch in one ``generate``, trains on the
samples right-padded again (the loop's own micro-batches) and applies both output layers to the
sampled positions only; TRL samples each micro-batch on its own (``training_step``), trains on the
left-padded ``generate`` output as it is, and takes full [B, T, V] logits of both models. TRL
divides the loss by the gold answer tokens of the step (``num_items_in_batch`` is counted before it
samples), clpd by the sampled tokens: a scale of the loss that AdamW mostly absorbs, not a cost.

Measured from the outside, the same way in both (:class:`Phases`): wall time inside the student's
``generate``, the teacher's forward, the student's forward outside ``generate`` and the optimizer's
``step``, read at every step boundary; the rest of a step is the loss, backward, clipping and
batching. Sampled tokens are counted from ``generate``'s output in both arms (up to and with the
first eos). TRL's ``generate`` is seeded per call as clpd seeds a step's sampling, so at
grad_accum=1 both sample the same tokens at step 0 (``sample_digests``): the check that both
generate alike.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from clpd.bench.common import clock
from clpd.bench.trl_arms import (Arm, Work, gkd_config, load_pair, probe_kd, run_arm, step_examples, StepSampler,
                                 trainer_config)
from clpd.data.batching import prompt_length
from clpd.data.records import IGNORE_INDEX
from clpd.losses.distill import distill_loss

ON_POLICY_ARMS = [
    Arm("clpd_onpolicy_ga1", "clpd", 1, on_policy=True,
        what="clpd loop, on_policy=1, grad_accum=1: one generate of the step's 32 prompts, one padded batch of samples"),
    Arm("clpd_onpolicy_ga4", "clpd", 4, on_policy=True,
        what="clpd loop, on_policy=1, grad_accum=4: one generate of 32, 4 micro-batches of 8 samples sorted by length"),
    Arm("trl_onpolicy_ga1", "trl", 1, on_policy=True,
        what="TRL GKDTrainer, lmbda=1, 32 x 1: one generate of 32, its output as one batch"),
    Arm("trl_onpolicy_ga4", "trl", 4, on_policy=True,
        what="TRL GKDTrainer, lmbda=1, 8 x 4: a generate of 8 per micro-batch (the step's batch sorted by length)"),
]
PHASES = ("generate", "teacher", "student", "optimizer")  # timed; the rest of a step is what is left
# Examples of the probe batch an on-policy arm scores after training. Not a same-work check here
# (the arms' samples part after step 0, and TRL's loss has another scale): it only shows that both
# trained alike; 8 of the 32 keep it from costing as much as the timed steps at 49,152 rows.
PROBE_EXAMPLES = 8


def probe_of(work: Work) -> Work:
    return dataclasses.replace(work, probe=work.probe[:PROBE_EXAMPLES])


def sample_seed(seed: int, step: int, call: int = 0) -> int:
    """The torch seed clpd's OnPolicy.answer gives step ``step``'s sampling (``call`` 0); later calls
    of the same step (TRL's micro-batches) draw on from seeds of their own."""
    key = [seed, step, 2] if call == 0 else [seed, step, 2, call]
    return int(np.random.default_rng(key).integers(2 ** 62))


class Phases:
    """Cumulative wall seconds of the phases of :data:`PHASES` and counts of what the student
    sampled, read (``snapshot``) at every step boundary; the same hooks in both arms."""

    def __init__(self, eos_id: int) -> None:
        self.eos_id = eos_id
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.counts = dict(generate_calls=0, samples=0, sampled=0, unfinished=0, real=0, generated_positions=0)
        self.digests: List[str] = []  # per generate call: the sampled ids' sha1 (equal where arms sampled alike)
        self.generating = False
        self.started: Dict[str, float] = {}

    def snapshot(self) -> dict:
        return {**self.seconds, **self.counts}

    def watch(self, student: torch.nn.Module, teacher: torch.nn.Module,
              before_generate: Optional[Callable[[], None]] = None) -> None:
        """Time ``student.generate``, both forwards and every optimizer step of this process."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._time_forward(teacher, "teacher")
        self._time_forward(student, "student")
        register_optimizer_step_pre_hook(lambda *_: self._start("optimizer"))
        register_optimizer_step_post_hook(lambda *_: self._stop("optimizer"))
        inner = student.generate

        def generate(*args, **kwargs):
            if before_generate is not None:
                before_generate()
            self.generating = True
            self._start("generate")
            try:
                out = inner(*args, **kwargs)
            finally:
                self._stop("generate")
                self.generating = False
            self._count(kwargs["input_ids"], kwargs["attention_mask"], getattr(out, "sequences", out))
            return out

        student.generate = generate  # an instance attribute: what both loops call

    def _time_forward(self, module: torch.nn.Module, name: str) -> None:
        # The student's forward inside generate is generation's, not training's.
        module.register_forward_pre_hook(lambda *_: None if self.generating else self._start(name))
        module.register_forward_hook(lambda *_: None if self.generating else self._stop(name))

    def _start(self, name: str) -> None:
        self.started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self.started.pop(name)

    def _count(self, prompts: torch.Tensor, mask: torch.Tensor, sequences: torch.Tensor) -> None:
        new = sequences[:, prompts.shape[1]:]
        is_eos = new == self.eos_id
        ended = is_eos.any(dim=1)
        lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, new.shape[1])  # up to and with the first eos
        c = self.counts
        c["generate_calls"] += 1
        c["samples"] += len(new)
        c["sampled"] += int(lengths.sum())
        c["unfinished"] += int((~ended).sum())
        c["real"] += int((mask.sum(dim=1) + lengths - 1).sum())  # a sample's tokens that predict a next one
        c["generated_positions"] += sequences.numel()
        rows = [row[:n] for row, n in zip(new.tolist(), lengths.tolist())]
        self.digests.append(hashlib.sha1(repr(rows).encode()).hexdigest()[:16])


# --- clpd ------------------------------------------------------------------------------------------

def run_clpd_on_policy(work: Work, arm: Arm) -> dict:
    """Child: clpd's loop with ``on_policy=1``, called directly, on the step batches of ``work``."""
    from rich.console import Console

    from clpd.evaluation.evaluate import sample_answers
    from clpd.teachers.live import TeacherPool
    from clpd.training.batches import Batches
    from clpd.training.log import Outputs
    from clpd.training.loop import train
    from clpd.training.on_policy import OnPolicy
    from clpd.training.step import Supervision

    a = work.args
    tokenizer, student, teacher_spec = load_pair(work)
    phases = Phases(tokenizer.eos_token_id)
    seen = {"bounds": [], "phases": [], "positions": [], "micro_batches": [], "clpd_sampled": []}  # per step

    class TimedBatches(Batches):
        def step(self, *args, **kwargs):
            seen["bounds"].append(clock())  # the start of each step, then (below) the end of the last
            seen["phases"].append(phases.snapshot())
            return super().step(*args, **kwargs)

        def answered(self, *args, **kwargs):
            out = super().answered(*args, **kwargs)
            seen["positions"].append(int(out.positions))
            seen["micro_batches"].append(len(out.sampled))
            seen["clpd_sampled"].append(int(out.sampled_tokens))
            return out

    sample = functools.partial(sample_answers, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                               max_new_tokens=a.max_new_tokens, temperature=1.0, top_p=1.0)
    on_policy = OnPolicy(1.0, a.seed, sample, tokenizer.eos_token_id)
    batches = TimedBatches(work.examples, StepSampler(work), work.pad_id,
                           choose=on_policy.choose)
    loss_fn = functools.partial(distill_loss, loss="jsd", alpha=0.0, beta=a.beta, vocab_size=work.vocab)
    teachers = TeacherPool([teacher_spec], tokenizer, device=torch.device("cpu"), dtype=torch.float32)
    teacher, _ = teachers.get(0)  # loaded now to be watched; the loop finds it active
    phases.watch(student, teacher.model)
    supervision = Supervision(loss_fn, teachers, schedule=lambda step: 0, on_policy=on_policy,
                              sampled_loss_fn=functools.partial(loss_fn, gold=False))
    train(student, batches, trainer_config(work, arm), supervision, Outputs(None, Console(quiet=True)),
          device=torch.device("cpu"))
    seen["bounds"].append(clock())  # step k ends where step k+1 starts; the last one when train() returns
    seen["phases"].append(phases.snapshot())
    return {**seen, "sample_digests": phases.digests, "probe_kd": probe_kd(student, teacher.model, probe_of(work))}


# --- TRL -------------------------------------------------------------------------------------------

def prompt_collator(pad_id: int) -> Callable[[List[dict]], Dict[str, torch.Tensor]]:
    """What TRL's own collator (DataCollatorForChatML) gives GKD, from clpd's encoded examples: the
    prompts left-padded with their mask (what it samples from), the gold ids and -100 labels
    left-padded (replaced by the samples; the labels still set ``num_items_in_batch``)."""
    def left(rows: List[List[int]], value: int) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
        for r, row in enumerate(rows):
            out[r, out.shape[1] - len(row):] = torch.tensor(row, dtype=torch.long)
        return out

    def collate_prompts(features: List[dict]) -> Dict[str, torch.Tensor]:
        prompts = [f["input_ids"][:prompt_length(f)] for f in features]
        return {"input_ids": left([f["input_ids"] for f in features], pad_id),
                "attention_mask": left([[1] * len(f["input_ids"]) for f in features], 0),
                "labels": left([f["labels"] for f in features], IGNORE_INDEX),
                "prompts": left(prompts, pad_id), "prompt_attention_mask": left([[1] * len(p) for p in prompts], 0)}

    return collate_prompts


def run_trl_on_policy(work: Work, arm: Arm) -> dict:
    """Child: TRL's GKDTrainer with ``lmbda=1`` on the step batches of ``work``."""
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.gkd import GKDTrainer

    from clpd.models.load import load_model

    a = work.args
    transformers.logging.set_verbosity_error()
    tokenizer, student, teacher_spec = load_pair(work)
    teacher = load_model(teacher_spec, tokenizer).requires_grad_(False).eval()
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]}
            for step in range(len(work.step_batches)) for e in step_examples(work, step)]
    phases = Phases(tokenizer.eos_token_id)
    seen = {"bounds": [None], "phases": [None], "call": (-1, -1)}  # step 0's start is not observed (see run_arm)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["bounds"].append(clock())
            seen["phases"].append(phases.snapshot())

    config = gkd_config(work, arm, lmbda=1.0, beta=a.beta, max_new_tokens=a.max_new_tokens)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=prompt_collator(work.pad_id),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)

    def seed_as_clpd() -> None:  # (step, n): the step's n-th generate; n = 0 gets clpd's seed of the step
        step, n = trainer.state.global_step, seen["call"][1] + 1 if seen["call"][0] == trainer.state.global_step else 0
        seen["call"] = (step, n)
        torch.manual_seed(sample_seed(a.seed, step, n))

    phases.watch(student, teacher, before_generate=seed_as_clpd)
    trainer.train()
    info = {"generation": trainer.generation_config.to_diff_dict(), "lmbda": trainer.lmbda, "beta": trainer.beta,
            "num_items_in_batch_used": bool(trainer.model_accepts_loss_kwargs)}
    step_positions = [b["generated_positions"] - a_["generated_positions"]
                      for a_, b in zip(seen["phases"][1:-1], seen["phases"][2:])]
    return {"bounds": seen["bounds"], "phases": seen["phases"], "positions": [0, *step_positions],
            "micro_batches": [arm.grad_accum] * len(work.step_batches), "sample_digests": phases.digests,
            "probe_kd": probe_kd(trainer.model, teacher, probe_of(work)), "trl": info}


# --- the split of a step ---------------------------------------------------------------------------

def run_on_policy_arm(work: Work, arm: Arm) -> dict:
    """Child: an on-policy arm's run, timed as ``run_arm`` times every arm, with its sampled tokens/s
    and the split of its steps."""
    out = run_arm(work, arm, run_on_policy)
    return {**out, **phase_split(out, work.args.warmup)}


def run_on_policy(work: Work, arm: Arm) -> dict:
    """Child: an on-policy arm, its per-step real tokens (the samples' own) for ``run_arm``."""
    out = (run_clpd_on_policy if arm.kind == "clpd" else run_trl_on_policy)(work, arm)
    marks = out["phases"]
    out["step_real_tokens"] = [0 if p is None else q["real"] - p["real"] for p, q in zip(marks, marks[1:])]
    return out


def phase_split(out: dict, warmup: int) -> dict:
    """Sampled tokens/s and where the timed steps' wall time went, per step (``run_arm``'s ``out``)."""
    first, last = out["phases"][warmup], out["phases"][-1]
    steps = len(out["phases"]) - 1 - warmup
    spent = {name: last[name] - first[name] for name in PHASES}
    spent["rest"] = out["seconds"] - sum(spent.values())
    counts = {k: last[k] - first[k] for k in ("generate_calls", "samples", "sampled", "unfinished",
                                                "generated_positions")}
    return {"sampled_tokens": counts["sampled"], "sampled_tok_s": counts["sampled"] / out["seconds"],
            "sampled_per_step": counts["sampled"] / steps, "samples_per_step": counts["samples"] / steps,
            "unfinished_share": counts["unfinished"] / max(counts["samples"], 1),
            "generate_calls_per_step": counts["generate_calls"] / steps,
            "generated_positions_per_step": counts["generated_positions"] / steps,
            "split_s_per_step": {k: v / steps for k, v in spent.items()},
            "split_share": {k: v / out["seconds"] for k, v in spent.items()}}


def summarize_on_policy(results: Dict[str, List[dict]], arms: List[Arm], twins: Dict[str, str]) -> Dict[str, dict]:
    """Per arm: median sampled tokens/s and its ratio to the best TRL arm and to the TRL arm of the
    same micro-batches (overall and per round), sampled tokens per step, the median split."""
    summary = {}
    for arm in arms:
        runs = [r for r in results[arm.name] if "error" not in r]
        if runs:
            tok = [r["sampled_tok_s"] for r in runs]
            summary[arm.name] = {
                "median_sampled_tok_s": statistics.median(tok), "min_sampled_tok_s": min(tok),
                "max_sampled_tok_s": max(tok), "median_real_tok_s": statistics.median(r["real_tok_s"] for r in runs),
                "sampled_per_step": statistics.mean(r["sampled_per_step"] for r in runs),
                "unfinished_share": statistics.mean(r["unfinished_share"] for r in runs),
                "generate_calls_per_step": runs[0]["generate_calls_per_step"],
                "split_s_per_step": {k: statistics.median(r["split_s_per_step"][k] for r in runs)
                                     for k in runs[0]["split_s_per_step"]},
                "first_step_digests": first_step_digests(runs[0])}
    trl = [k for k in summary if k.startswith("trl_")]
    best = max(trl, key=lambda k: summary[k]["median_sampled_tok_s"]) if trl else None
    for name, s in summary.items():
        for label, other in (("best_trl", best), ("twin", twins.get(name))):
            if other in summary:
                s[f"{label}_name"] = other
                s[f"sampled_ratio_to_{label}"] = s["median_sampled_tok_s"] / summary[other]["median_sampled_tok_s"]
                s[f"round_sampled_ratios_to_{label}"] = round_ratios(results[name], results[other])
                s[f"same_first_samples_as_{label}"] = s["first_step_digests"] == summary[other]["first_step_digests"]
    return summary


def first_step_digests(run: dict) -> List[str]:
    """The sample digests of step 0 (the first ``generate_calls_per_step`` calls)."""
    return run["sample_digests"][:round(run["generate_calls_per_step"])]


def round_ratios(runs: List[dict], other: List[dict]) -> List[float]:
    theirs = {r["round"]: r["sampled_tok_s"] for r in other if "error" not in r}
    return [r["sampled_tok_s"] / theirs[r["round"]] for r in runs if "error" not in r and r["round"] in theirs]


def on_policy_table(summary: Dict[str, dict], arms: List[Arm]) -> str:
    head = (f"{'arm':<18} {'sampled tok/s':>13} {'min-max':>13} {'x best TRL':>10} {'x twin':>7} {'per round':>11} "
            f"{'real tok/s':>10} {'sampled/step':>12} {'ended':>5} {'gen calls':>9}   step split, s: "
            f"{' '.join(f'{k:>9}' for k in (*PHASES, 'rest'))}")
    lines = [head, "-" * len(head)]
    for arm in arms:
        s = summary.get(arm.name)
        if s is None:
            continue
        per_round = s.get("round_sampled_ratios_to_twin") or []
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
        split = " ".join(f"{s['split_s_per_step'][k]:>9.3f}" for k in (*PHASES, "rest"))
        lines.append(f"{arm.name:<18} {s['median_sampled_tok_s']:>13,.0f} {s['min_sampled_tok_s']:>6,.0f}-"
                     f"{s['max_sampled_tok_s']:<6,.0f} {ratio(s, 'best_trl'):>10} {ratio(s, 'twin'):>7} {spread:>11} "
                     f"{s['median_real_tok_s']:>10,.0f} {s['sampled_per_step']:>12,.0f} "
                     f"{1 - s['unfinished_share']:>5.0%} {s['generate_calls_per_step']:>9.0f}                  {split}")
    same = [f"{name} and {s['twin_name']}: {'the same' if s['same_first_samples_as_twin'] else 'different'}"
            for name, s in summary.items() if "twin_name" in s and s["generate_calls_per_step"] == 1
            and summary[s["twin_name"]]["generate_calls_per_step"] == 1]
    if same:
        lines += ["", "step 0's sampled tokens (one generate per step in both): " + "; ".join(same)]
    return "\n".join(lines)


def ratio(s: dict, label: str) -> str:
    return f"{s[f'sampled_ratio_to_{label}']:.2f}x" if f"sampled_ratio_to_{label}" in s else "-"
