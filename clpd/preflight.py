"""Every check of a command's config that needs no training and no weights, run before any work.

``clpd train`` calls :func:`check_train` right after the schema checks (before a teacher is built,
data is encoded or a weight is loaded); ``clpd eval`` calls :func:`check_eval`. What is checked:

* paths: the student's and every teacher's model, tokenizer and GGUF file that look local exist,
  and a pretrained local folder is a model folder (``config.json``, or a LoRA adapter);
* LoRA: ``student.lora.target_modules`` against the layers of the student's architecture, built on
  the meta device from its config (``architecture_config`` from scratch, ``AutoConfig`` for a
  pretrained model): no weights are read;
* tokenizers: student and teachers share one vocabulary (tokenizers are small and load fast);
* benchmark files: the data folder, the split files, and every line of them parsed (the loaders
  name the file and line); the arith generator is only checked for its split names and sizes (its
  problems cannot be malformed, and generating 20,000 of them costs 0.3 s);
* ``trainer.resume``: a clpd checkpoint (its ``COMPLETE`` marker, its files and their sizes, and
  ``training_state.pt``); the sha256 of each file is left to the resume itself;
* device and precision: CUDA is there when asked for; fp16 only on CUDA;
* eval: ``checkpoint`` is a checkpoint or model folder, and says which files it looked for.

Each check lives with the code that owns its concept (:mod:`clpd.models.path_checks`,
:mod:`clpd.models.architecture_checks`, :mod:`clpd.data.checks`, :mod:`clpd.training.resume`,
:mod:`clpd.training.distributed`); this module only calls them in order. Nothing here writes a file, trains, or loads weights; the measured cost is well under a second
for the default configs (a hub model's tokenizer and config come from the local cache or the hub,
as the command would read them anyway).

All problems are collected and reported together, in one line separated by "; ", each naming its
key and the allowed values, as :mod:`clpd.config` does (:class:`clpd.errors.Problems`): a user who mistyped two things on a long
command line learns both from one try instead of paying a start-up per mistake. A check that needs
something an earlier one refused (the LoRA check needs the student's tokenizer) is skipped then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from clpd.config.enums import TeacherOutputs
from clpd.config.model import ModelConfig
from clpd.config.package_paths import is_package_path
from clpd.config.schema import EvalConfig, TrainConfig
from clpd.data.checks import benchmark_problems
from clpd.errors import ClpdError, Problems
from clpd.models.architecture_checks import init_from_problems, lora_problem, tokenizer_key
from clpd.models.load import check_source, init_source, layers_to_keep, load_tokenizer, resolve_device, resolve_precision
from clpd.models.path_checks import config_of, gguf_problem, local_folder, model_folder_problem, model_paths_problems, no_such_path
from clpd.teachers.ladder import ladder_needed, teachers_in_use
from clpd.teachers.live import check_vocabularies
from clpd.teachers.store import check_top_k
from clpd.training.checkpoint import CHECKPOINT_HINT
from clpd.training.distributed import check_batch, ranks
from clpd.training.resume import resume_problem


def check_device(p: Problems, device_setting, precision_setting, prefix: str = "") -> None:
    """CUDA is there when asked for; fp16 only on CUDA."""
    device = p.guard("", lambda: resolve_device(device_setting, f"{prefix}device"))
    if device is not None:
        p.guard("", lambda: resolve_precision(precision_setting, device, f"{prefix}precision"))


class Tokenizers:
    """Loads the tokenizers the checks need, once each; after one hub load failed (offline: each
    costs about a minute of retries), the other hub ids are not tried: the command stops at the
    first one anyway."""

    def __init__(self, p: Problems, ladder) -> None:
        self.p, self.ladder, self.hub_failed = p, ladder, []

    def of(self, spec: ModelConfig, prefix: str):
        if getattr(spec, "init_from", None):  # a cut student has its source's tokenizer
            spec = init_source(spec, self.ladder)
        source = spec.path if spec.path is not None else spec.tokenizer
        remote = source is not None and local_folder(source) is None
        if remote and self.hub_failed:
            return None
        tok = self.p.guard(prefix, lambda: load_tokenizer(spec))
        if tok is None and remote:
            self.hub_failed.append(source)
        return tok


def check_student(p: Problems, tc: TrainConfig, tokenizers: Tokenizers):
    """The student's paths, its cut, its tokenizer, vocabulary rows and LoRA targets; returns its
    tokenizer (None where a check refused what it needs)."""
    paths = model_paths_problems(tc.student, "student")
    cut = init_from_problems(tc, ladder_needed(tc))
    p += paths + cut
    if paths or cut:
        return None
    tokenizer = tokenizers.of(tc.student, tokenizer_key(tc.student, "student"))
    if tokenizer is None:
        return None
    s = tc.student
    if s.path is None and s.init_from is None and s.vocab_size is not None and s.vocab_size < len(tokenizer):
        p.append(f"student.vocab_size={s.vocab_size} is smaller than the student's tokenizer ({len(tokenizer)} "
                 f"tokens); allowed: >= {len(tokenizer)}, or null (the tokenizer's size)")
    elif s.lora.enabled:
        problem = p.guard("", lambda: lora_problem(s, tokenizer, tc.teachers.ladder))
        if problem:
            p.append(problem)
    return tokenizer


def check_teachers(p: Problems, tc: TrainConfig, tokenizers: Tokenizers, student_tokenizer) -> None:
    """The paths of the teachers the run loads (the others are never loaded), the cache folder of
    the ones it trains, their tokenizers and vocabulary rows, and one vocabulary with the student."""
    ladder = {i: tc.teachers.ladder[i] for i in teachers_in_use(tc)}  # by ladder index
    paths: Dict[int, List[str]] = {}
    for i, spec in ladder.items():
        paths[i] = model_paths_problems(spec, f"teachers.ladder.{i}", f"teacher {spec.name}")
        p += paths[i]
    if ladder_needed(tc) and any(spec.path is None for spec in ladder.values()):
        cache = Path(tc.teachers.cache_dir).expanduser()
        if cache.exists() and not cache.is_dir():
            p.append(f"teachers.cache_dir={tc.teachers.cache_dir}: a file, not a folder (the trained teachers go there)")
    for i, spec in ladder.items():
        if paths[i]:
            continue
        key = f"teachers.ladder.{i}"
        tok = tokenizers.of(spec, f"{tokenizer_key(spec, key)} (teacher {spec.name})")
        if tok is None:
            continue
        if spec.path is None and spec.vocab_size is not None and spec.vocab_size < len(tok):
            p.append(f"{key}.vocab_size={spec.vocab_size} (teacher {spec.name}) is smaller than its tokenizer "
                     f"({len(tok)} tokens); allowed: >= {len(tok)}, or null")
        if student_tokenizer is not None:
            where = tokenizer_key(spec, key) if (spec.path or spec.tokenizer) else f"{key}.tokenizer=null"
            p.guard(where, lambda: check_vocabularies(student_tokenizer, tc.student.name, [(spec.name, tok)]))


def train_splits(tc: TrainConfig) -> List[tuple]:
    """The benchmark splits a training run reads: the training split, and the eval (and few-shot)
    split when the run or its teacher builds evaluate."""
    b, t = tc.benchmark, tc.trainer
    splits = [("benchmark.train_split", b.train_split, b.train_limit)]
    if t.eval_at_end or t.eval_every or (ladder_needed(tc) and tc.teachers.build.eval):
        splits.append(("benchmark.eval_split", b.eval_split, b.eval_limit))
        if b.num_fewshot:
            splits.append(("benchmark.fewshot_split", b.fewshot_split, None))
    return splits


def check_train(tc: TrainConfig) -> None:
    """Refuse, in one line, what ``clpd train`` would otherwise find only after building teachers,
    encoding the data or loading weights. ``tc``: the typed config (``clpd.config.schema.to_object``)."""
    p = Problems()
    t = tc.trainer
    batch = check_batch(t.batch_size, t.grad_accum, t.micro_batch_tokens)  # under torchrun: a share per rank
    if batch:
        p.append(batch)
    # Each rank's share of a step would hold a different number of samples of different lengths.
    p.check(tc.distill.on_policy == 0 or ranks().world_size == 1,
            f"distill.on_policy={tc.distill.on_policy} runs in one process, not under torchrun ({ranks().world_size} "
            f"ranks); allowed: one process per run (a sweep runs several at once), or distill.on_policy=0")
    check_device(p, t.device, t.precision, "trainer.")
    problem = resume_problem(t.resume)
    if problem:
        p.append(problem)
    tokenizers = Tokenizers(p, tc.teachers.ladder)
    tokenizer = check_student(p, tc, tokenizers)
    check_teachers(p, tc, tokenizers, tokenizer)
    if tokenizer is not None and tc.distill.teacher_outputs == TeacherOutputs.stored:
        p.guard("", lambda: check_top_k(tc.distill.top_k, len(tokenizer)))
    p += benchmark_problems(tc.benchmark, train_splits(tc))
    p.raise_if_any()


def checkpoint_problems(ec: EvalConfig) -> List[str]:
    """``checkpoint`` (and ``gguf_file``) name a checkpoint or model folder, a package folder or a
    hub id; a cut (``keep_layers``/``keep_every``) names layers the model has."""
    p = Problems()
    if is_package_path(ec.checkpoint):
        missing = no_such_path("checkpoint", ec.checkpoint, "")
        if missing:
            p.append(missing)
    else:
        try:
            check_source(ec.checkpoint, "checkpoint")
        except ClpdError:
            p.append(f"checkpoint={ec.checkpoint}: no such file or folder ({CHECKPOINT_HINT}, any save_pretrained "
                     f"folder, or a Hugging Face id)")
    if local_folder(ec.checkpoint) is not None:
        problem = model_folder_problem(ec.checkpoint, "checkpoint", ec.gguf_file, "gguf_file")
        if problem:
            p.append(problem)
    gguf = gguf_problem("gguf_file", ec.gguf_file)
    if gguf:
        p.append(gguf)
    elif not p and (ec.keep_layers is not None or ec.keep_every is not None):  # the cut's layers exist
        config = config_of(ModelConfig(name=ec.checkpoint, path=ec.checkpoint, gguf_file=ec.gguf_file))
        if config is not None and getattr(config, "num_hidden_layers", None) is not None:
            p.guard("", lambda: layers_to_keep(ec, config.num_hidden_layers, prefix="", source_key="checkpoint"))
    return p


def check_eval(ec: EvalConfig) -> None:
    """Refuse, in one line, what ``clpd eval`` would otherwise find only while loading the model
    or the data: a checkpoint that is not one, a missing GGUF file, the benchmark's files, a
    CUDA-only setting on a CPU. ``ec``: the typed config (``clpd.config.schema.to_object``)."""
    p = Problems()
    check_device(p, ec.device, ec.precision)
    if ec.checkpoint:
        p += checkpoint_problems(ec)
    b = ec.benchmark
    splits = [("benchmark.eval_split", b.eval_split, b.eval_limit)]
    if b.num_fewshot:
        splits.append(("benchmark.fewshot_split", b.fewshot_split, None))
    p += benchmark_problems(b, splits)
    p.raise_if_any()
