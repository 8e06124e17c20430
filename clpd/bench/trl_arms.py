"""The arms of ``python -m clpd.bench.trl``, each run in its own forked process on the same work.

clpd: ``clpd_ga1`` (one padded batch), ``clpd_ga4`` (the default: the step's batch sorted by length,
4 padded micro-batches), and where the loop offers padding-free micro-batches ``clpd_packed_ga4``,
``clpd_packed_tok`` (``micro_batch_tokens``) and, on request only, ``clpd_packed_ga1`` (one packed row:
sdpa/eager attention on a CPU computes its block-diagonal mask in full, quadratic in the row).
TRL's GKDTrainer: ``trl_ga1`` (32 x 1, clpd_ga1's shapes), ``trl_ga4_sorted`` (8 x 4 with each step's
batch sorted by length: clpd_ga4's micro-batches) and ``trl_ga4_rebalance`` (transformers'
BatchRebalanceSampler without its shuffle, TRL's own padding-reducing layout). Not used: samplers
that change which examples a step sees (group_by_length, random), SFT's padding_free/packing (GKD
refuses a custom collator there and passes no position_ids); gradient checkpointing, bf16, logging,
saving and evaluation are off in every arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
from typing import Callable, Dict, List, Optional

import torch

from clpd.bench.common import clock, load_shares, loadavg
from clpd.config.enums import Device, LrSchedule, Precision
from clpd.config.model import ModelConfig
from clpd.config.schema import TrainerConfig
from clpd.curriculum.sampler import Sampler
from clpd.data.batching import collate
from clpd.environment import peak_rss_mib, reset_peak_rss
from clpd.data.records import IGNORE_INDEX
from clpd.losses.distill import distill_loss
from clpd.models.tokenizer import build_char_tokenizer

# The (student, teacher) shapes of --shapes. Random weights either way: the numbers are speed only.
SHAPES = {
    # conf/student/micro.yaml and arith_plateau's "large" (0.87M): a 100-row vocabulary
    "arith": (dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192),
              dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)),
    # student=smollm2_cut6 and teachers=smollm2 (SmolLM2-135M-Instruct's config: 49,152 output rows,
    # tied): a real small LM's shapes, where the output layer and the loss over the vocabulary weigh
    # as much as the blocks. The data stays clpd's character-level arith ids (all below 100).
    "smollm2": (dict(hidden_size=576, num_layers=6, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                     vocab_size=49152, max_position_embeddings=8192),
                dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                     vocab_size=49152, max_position_embeddings=8192)),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "clpd" | "trl"
    grad_accum: int = 1
    packed: bool = False
    micro_batch_tokens: bool = False  # clpd: cut micro-batches by --micro-batch-tokens
    layout: str = "sorted"  # trl: "sorted" (sequential, step batch sorted by length) | "rebalance"
    on_policy: bool = False  # the student answers every example itself (clpd.bench.gkd_arms)
    stored: bool = False  # clpd: the teacher's stored top-32 outputs, built before the timed steps
    fused: Optional[bool] = None  # clpd: trainer.fused_loss (None: as the loop decides, where the checkout has it)
    what: str = ""


ARMS = [
    Arm("clpd_ga1", "clpd", 1, what="clpd loop, grad_accum=1: one padded batch of 32"),
    Arm("clpd_ga4", "clpd", 4, what="clpd loop, grad_accum=4 (default): batch sorted by length, 4 padded micro-batches of 8"),
    Arm("clpd_packed_ga4", "clpd", 4, packed=True, what="clpd loop, packing=true, grad_accum=4: 4 packed rows of 8 examples"),
    Arm("clpd_packed_ga1", "clpd", 1, packed=True, what="clpd loop, packing=true, grad_accum=1: one packed row of 32 examples"),
    Arm("clpd_packed_tok", "clpd", 1, packed=True, micro_batch_tokens=True,
        what="clpd loop, packing=true, micro_batch_tokens=N: packed rows of at most N tokens"),
    Arm("clpd_unfused_ga4", "clpd", 4, fused=False,
        what="clpd loop, grad_accum=4, trainer.fused_loss=false: output layers apart from the loss"),
    Arm("clpd_stored_ga4", "clpd", 4, stored=True,
        what="clpd loop, grad_accum=4, distill.teacher_outputs=stored (top 32, built before the timed steps)"),
    Arm("trl_ga1", "trl", 1, what="TRL GKDTrainer, 32 x 1: one padded batch of 32"),
    Arm("trl_ga4_sorted", "trl", 4, what="TRL GKDTrainer, 8 x 4, step batch sorted by length: clpd_ga4's micro-batches"),
    Arm("trl_ga4_rebalance", "trl", 4, layout="rebalance",
        what="TRL GKDTrainer, 4 micro-batches from transformers' BatchRebalanceSampler (shuffle off)"),
]
ARM_NAMES = [a.name for a in ARMS]
# Run only when asked (--arms all, or by name): one packed row of all 32 examples makes sdpa/eager
# attend over the whole row (a block-diagonal mask, computed in full), quadratic in the row's
# length: about 6,300 tokens here, several times slower than any other arm.
OPT_IN = ("clpd_packed_ga1",)


def field_names(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def packing_support() -> Dict[str, bool]:
    """What this checkout's loop offers: padding-free micro-batches and micro-batches by tokens,
    read from the dataclasses' fields."""
    from clpd.training.batches import Batches

    batches, trainer = field_names(Batches), field_names(TrainerConfig)
    return {"packed": "packed" in batches, "micro_batch_tokens": "micro_batch_tokens" in batches,
            "trainer_packing": "packing" in trainer, "trainer_micro_batch_tokens": "micro_batch_tokens" in trainer}


def unavailable_reason(arm: Arm, support: Dict[str, bool], trl_ok: bool) -> Optional[str]:
    if arm.kind == "trl" and not trl_ok:
        return "trl is not installed"
    if arm.packed and not support["packed"]:
        return "clpd.training.batches.Batches has no 'packed' field (padding-free micro-batches not in this checkout)"
    if arm.micro_batch_tokens and not support["micro_batch_tokens"]:
        return "clpd.training.batches.Batches has no 'micro_batch_tokens' field"
    return None


def trl_version() -> Optional[str]:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def preimport(trl_too: bool) -> None:
    """Import what the arms use before forking them (imports run no torch kernels), so no arm
    pays for them and every arm starts from the same interpreter state."""
    import rich.console  # noqa: F401

    import clpd.models.load  # noqa: F401
    import clpd.teachers.live  # noqa: F401
    import clpd.training.loop  # noqa: F401

    if trl_too:
        import datasets  # noqa: F401
        import transformers.trainer  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401


# --- the work --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Work:
    """What every arm does: the examples, each step's batch, the models' folders."""
    examples: List[dict]
    step_batches: List[List[int]]  # example indices of each optimizer step (warm-up included)
    probe: List[int]  # a fixed batch every arm scores after training (the same-work check)
    pad_id: int
    vocab: int
    student_dir: str
    teacher_dir: str
    args: argparse.Namespace


def step_examples(work: Work, step: int, sort: bool = True) -> List[dict]:
    batch = [work.examples[i] for i in work.step_batches[step]]
    return sorted(batch, key=lambda e: len(e["input_ids"])) if sort else batch  # stable, as clpd sorts


def real_tokens(examples: List[dict]) -> int:
    return sum(len(e["input_ids"]) - 1 for e in examples)


def build_models(student_dir: str, teacher_dir: str, seed: int, threads: int, shapes: str) -> dict:
    """Child: the student and teacher, random weights, saved once for every arm."""
    from transformers.utils import logging as hf_logging

    from clpd.models.load import count_parameters, load_model

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    tokenizer = build_char_tokenizer()
    out = {}
    student_shape, teacher_shape = SHAPES[shapes]
    for name, shape, folder, offset in (("student", student_shape, student_dir, 0),
                                        ("teacher", teacher_shape, teacher_dir, 1)):
        torch.manual_seed(seed + offset)
        model = load_model(ModelConfig(name=name, **{"max_position_embeddings": 512, **shape}), tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[f"{name}_params"] = count_parameters(model)
        out[f"{name}_attn"] = model.config._attn_implementation
        out[f"{name}_vocab_rows"] = model.get_output_embeddings().weight.shape[0]
    try:
        from clpd.data.batching import packing_is_exact
    except ImportError:
        out["packing_exact"] = None
    else:
        out["packing_exact"] = bool(packing_is_exact(load_model(ModelConfig(name="s", path=student_dir), tokenizer)))
    return out


def probe_kd(student: torch.nn.Module, teacher: torch.nn.Module, work: Work) -> float:
    """Forward KL to the teacher per answer token on a fixed probe batch (another draw of the
    pool): equal across arms (to float noise) when they made the same updates."""
    batch = collate([work.examples[i] for i in work.probe], work.pad_id)
    student.eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
        terms = distill_loss(s, t, batch["targets"], loss="forward_kl", alpha=0.0, vocab_size=work.vocab)
    answers = int((batch["targets"] != IGNORE_INDEX).sum())
    return float(terms.total) / max(answers, 1)


class StepSampler(Sampler):
    """The step batches of a benchmark's work, whatever clpd's sampler would draw."""

    def __init__(self, work: "Work") -> None:
        super().__init__(range(len(work.examples)), work.args.batch_size, 0)
        self.table = work.step_batches

    def batch(self, step, at=None):
        return list(self.table[step])


def load_pair(work: Work) -> tuple:
    """(tokenizer, student, teacher spec) of ``work``'s saved models."""
    from clpd.models.load import load_model

    tokenizer = build_char_tokenizer()
    student = load_model(ModelConfig(name="student", path=work.student_dir), tokenizer)
    return tokenizer, student, ModelConfig(name="teacher", path=work.teacher_dir)


# --- clpd ------------------------------------------------------------------------------------------

def trainer_config(work: Work, arm: Arm) -> TrainerConfig:
    a = work.args
    extra = {}
    names = field_names(TrainerConfig)
    if "packing" in names:
        extra["packing"] = arm.packed
    if "micro_batch_tokens" in names and arm.micro_batch_tokens:
        extra["micro_batch_tokens"] = a.micro_batch_tokens
    return TrainerConfig(max_steps=len(work.step_batches), batch_size=a.batch_size, grad_accum=arm.grad_accum, lr=a.lr,
                         lr_schedule=LrSchedule.constant, warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                         grad_clip=1.0, log_every=len(work.step_batches) + 1, save=False, eval_at_end=False,
                         precision=Precision.fp32, device=Device.cpu, num_threads=a.threads, **extra)


# --- TRL -------------------------------------------------------------------------------------------

def trl_collator(pad_id: int, positions: List[int]) -> Callable[[List[dict]], Dict[str, torch.Tensor]]:
    """clpd's collate before its shift, plus an attention mask: right-padded ids, -100 labels (TRL
    shifts); each micro-batch's padded positions are appended to ``positions``."""
    def collate_trl(features: List[dict]) -> Dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        positions.append(ids.numel())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate_trl


def gkd_config(work: Work, arm: Arm, **gkd):
    """Off-policy forward KL (lmbda=0, beta=0) unless ``gkd`` says otherwise, clpd's optimizer
    settings, everything else off."""
    from trl.experimental.gkd import GKDConfig

    a = work.args
    return GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=True, seed=a.seed,
        max_steps=len(work.step_batches), per_device_train_batch_size=a.batch_size // arm.grad_accum,
        gradient_accumulation_steps=arm.grad_accum, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        **{"lmbda": 0.0, "beta": 0.0, "temperature": 1.0, "seq_kd": False, **gkd},
        bf16=False, fp16=False, gradient_checkpointing=False,  # both on by SFTConfig's defaults
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, dataloader_drop_last=False,
        train_sampling_strategy="sequential" if arm.layout == "sorted" else "batch_rebalance",
        remove_unused_columns=False,
        # transformers 5 renamed gradient_checkpointing (a deprecated alias, which warns when it is the one set)
        **({"activation_checkpointing": False} if "activation_checkpointing" in field_names(GKDConfig) else {}),
    )


def trl_info(trainer, config) -> dict:
    """How TRL actually ran: its optimizer, whether it divided by the step's answer tokens, the GKD knobs."""
    model = trainer.model
    checkpointing = (getattr(model, "is_activation_checkpointing") if hasattr(type(model), "is_activation_checkpointing")
                     else getattr(model, "is_gradient_checkpointing", False))
    return {"optimizer": type(trainer.optimizer).__name__ if trainer.optimizer is not None else None,
            "optim": str(config.optim), "optimizer_defaults": {k: str(v) for k, v in trainer.optimizer.defaults.items()},
            "num_items_in_batch_used": bool(trainer.model_accepts_loss_kwargs),
            "activation_checkpointing": bool(checkpointing),
            "bf16": bool(config.bf16), "lmbda": config.lmbda, "beta": config.beta, "seq_kd": config.seq_kd}


def run_trl(work: Work, arm: Arm) -> dict:
    """Child: TRL's GKDTrainer, off-policy forward KL, on the step batches of ``work``."""
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl.experimental.gkd import GKDTrainer

    from clpd.models.load import load_model

    transformers.logging.set_verbosity_error()
    tokenizer, student, teacher_spec = load_pair(work)
    teacher = load_model(teacher_spec, tokenizer).requires_grad_(False).eval()
    # One row per example, in step order; "sorted": each step's batch sorted by length, so 8 x 4
    # micro-batches are clpd's. The rebalance sampler sorts each step's 32 itself.
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]}
            for step in range(len(work.step_batches)) for e in step_examples(work, step, sort=arm.layout == "sorted")]
    lengths = [len(r["input_ids"]) for r in rows]
    positions: List[int] = []  # per micro-batch, in the order the Trainer collates them
    bounds: List[Optional[tuple]] = [None]  # the start of step 0 is not observed; step k >= 1 starts where k-1 ends

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bounds.append(clock())

    class StepOrderGKD(GKDTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if arm.layout == "rebalance":  # transformers' own sampler, without its shuffle: clpd's step batches
                return BatchRebalanceSampler(lengths, effective_batch_size=work.args.batch_size, dp_size=1,
                                             grad_accum=arm.grad_accum, shuffle=False, drop_last=False)
            return super()._get_train_sampler(train_dataset)

    config = gkd_config(work, arm)
    # A datasets.Dataset, as TRL requires (it refuses a list); pre-tokenized, so SFT's preparation is skipped.
    trainer = StepOrderGKD(model=student, teacher_model=teacher, args=config,
                           data_collator=trl_collator(work.pad_id, positions), train_dataset=Dataset.from_list(rows),
                           processing_class=tokenizer, callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the end-of-training summary line
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no")
    ga = arm.grad_accum
    step_positions = [sum(positions[k * ga:(k + 1) * ga]) for k in range(len(work.step_batches))]
    return {"bounds": bounds, "positions": step_positions, "micro_batches": [ga] * len(work.step_batches),
            "probe_kd": probe_kd(trainer.model, teacher, work), "trl": trl_info(trainer, config)}


def run_arm(work: Work, arm: Arm, run: Callable[[Work, Arm], dict]) -> dict:
    """Child: one arm's run (``run``: clpd.bench.clpd_arm.run_clpd, :func:`run_trl`, or an
    on-policy arm's), its timed steps
    read from the step boundaries it recorded, its real tokens those of the step batches unless
    the run counted its own (``step_real_tokens``: the samples of on-policy arms)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of from_pretrained
    torch.set_num_threads(work.args.threads)
    reset = reset_peak_rss()
    rss_start = peak_rss_mib("VmRSS")  # inherited from the parent (imports, data): the same in every arm
    load_before = loadavg()
    out = run(work, arm)
    w = work.args.warmup
    bounds = out.pop("bounds")  # len = steps + 1: the start of every step, then the end of the last
    assert len(bounds) == len(work.step_batches) + 1, (len(bounds), len(work.step_batches))
    timed = [b[0] - a[0] for a, b in zip(bounds[w:-1], bounds[w + 1:])]
    first, last = bounds[w], bounds[-1]
    seconds = last[0] - first[0]
    per_step = out.pop("step_real_tokens", None) or [real_tokens(step_examples(work, s))
                                                     for s in range(len(work.step_batches))]
    tokens = sum(per_step[w:])
    positions = sum(out["positions"][w:])
    out.update(seconds=seconds, real_tokens=tokens, padded_positions=positions, real_tok_s=tokens / seconds,
               positions_s=positions / seconds, median_step_s=statistics.median(timed),
               **load_shares(first, last), step_s=timed,
               peak_rss_mib=peak_rss_mib(), peak_rss_reset=reset, rss_start_mib=rss_start,
               loadavg_1m=[load_before, loadavg()], threads=torch.get_num_threads())
    return out
