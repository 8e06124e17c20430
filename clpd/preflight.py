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

Nothing here writes a file, trains, or loads weights; the measured cost is well under a second
for the default configs (a hub model's tokenizer and config come from the local cache or the hub,
as the command would read them anyway).

All problems are collected and reported together, in one line separated by "; ", each naming its
key and the allowed values, as :mod:`clpd.config` does: a user who mistyped two things on a long
command line learns both from one try instead of paying a start-up per mistake. A check that needs
something an earlier one refused (the LoRA check needs the student's tokenizer) is skipped then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence

from clpd.training.checkpoint import COMPLETE, CONFIG_FILE, FINAL, STATE_FILE, latest_checkpoint, verify_checkpoint
from clpd.config.schema import BenchmarkConfig, EvalConfig, TrainConfig
from clpd.config.enums import BenchmarkName
from clpd.config.model import ModelConfig
from clpd.data import arith, load_problems
from clpd.training.distributed import check_batch
from clpd.errors import ClpdError
from clpd.teachers.ladder import ladder_needed, teachers_in_use
from clpd.teachers.live import check_vocabularies
from clpd.models.load import (ADAPTER_CONFIG, architecture_config, check_source, cut_config, gguf_reader_missing, init_source,
                         layers_to_keep, load_tokenizer, local_source, resolve_device, resolve_precision)
from clpd.config.package_paths import is_package_path, package_folder

MODEL_CONFIG = "config.json"  # transformers' CONFIG_NAME: a save_pretrained model folder
# What makes a local folder loadable as a model, in the order clpd's loader tries them.
MODEL_FILES = (MODEL_CONFIG, ADAPTER_CONFIG)
CHECKPOINT_HINT = "a clpd checkpoint is <run>/checkpoints/final or <run>/checkpoints/step-N"


def _fail(problems: List[str]) -> None:
    if problems:  # one line, whatever the messages hold
        raise ClpdError("; ".join(" ".join(p.split()) for p in problems))


def _guard(problems: List[str], prefix: str, check: Callable[[], object]) -> Optional[object]:
    """Run ``check``; a ClpdError becomes a problem (prefixed with the key) and None is returned."""
    try:
        return check()
    except ClpdError as exc:
        problems.append(f"{prefix}: {exc}" if prefix else str(exc))
        return None


# --- paths ---------------------------------------------------------------------------------------

def _local_folder(name: str) -> Optional[Path]:
    """The folder ``name`` names when clpd's loader would read it from disk (it exists here)."""
    try:
        path = Path(local_source(name))
    except ClpdError:  # a pkg: path whose package is not installed: refused by _no_such_path
        return None
    return path if path.exists() else None


def checkpoint_files_problem(path: Path, key: str) -> Optional[str]:
    """A clpd checkpoint's marker and files, by name and size (the sha256 is left to the load)."""
    try:
        verify_checkpoint(path, hashes=False)
    except ClpdError as exc:
        return f"{key}: {exc}"
    return None


def model_folder_problem(name: str, key: str, gguf_file: Optional[str] = None,
                         gguf_key: str = "gguf_file") -> Optional[str]:
    """Why the local path ``name`` (given as ``key``) is not a model folder, or None.

    A model folder has config.json (any save_pretrained folder, a clpd checkpoint without LoRA),
    adapter_config.json (a LoRA adapter), or holds ``gguf_file``. A clpd checkpoint's files are
    checked by name and size too."""
    try:
        folder = Path(local_source(name))  # a pkg: path: its package's folder
    except ClpdError as exc:
        return f"{key}={name}: {str(exc).split(': ', 1)[-1]}"
    if not folder.is_dir():
        return (f"{key}={name}: a file, not a model folder (for a GGUF file set {key} to its folder and "
                f"{gguf_key} to its name)")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            return (f"{gguf_key}={gguf_file}: no such file in {key}={name} "
                    f"(GGUF files there: {', '.join(ggufs) if ggufs else 'none'})")
        return None
    if (folder / COMPLETE).exists() or (folder / CONFIG_FILE).exists() or folder.name.endswith(".tmp"):
        problem = checkpoint_files_problem(folder, key)
        if problem:
            return problem
    if any((folder / f).is_file() for f in MODEL_FILES):
        return None
    hints = []
    run_checkpoint = latest_checkpoint(folder)
    if run_checkpoint is not None:
        hints.append(f"it is a run folder: did you mean {key}={run_checkpoint}?")
    elif (folder / FINAL).is_dir() or (folder / "checkpoints").is_dir():
        hints.append("it looks like a run folder, but holds no complete checkpoint")
    if ggufs:
        hints.append(f"it holds GGUF files: set {gguf_key}= one of {', '.join(ggufs)}")
    return (f"{key}={name}: not a checkpoint or model folder: found none of {', '.join(MODEL_FILES)} there "
            f"({CHECKPOINT_HINT}; a Hugging Face model folder has {MODEL_CONFIG})"
            + "".join(f"; {h}" for h in hints))


def _no_such_path(key: str, value: str, label: str) -> Optional[str]:
    if is_package_path(value):
        try:
            package_folder(value)
        except ClpdError as exc:  # "pkg:x: the Python package x is not installed here (how to install it)"
            return f"{key}={value}{label}: {str(exc).split(': ', 1)[-1]}"
        return None
    try:
        check_source(value, key)
    except ClpdError:
        return f"{key}={value}{label}: no such file or folder"
    return None


def _gguf_problem(key: str, gguf_file: Optional[str], label: str = "") -> Optional[str]:
    if gguf_file and gguf_reader_missing():
        return (f"{key}={gguf_file}{label}: reading a GGUF file needs the gguf package, which is not installed "
                f"(pip install gguf)")
    return None


def model_paths_problems(spec: ModelConfig, key: str, who: str = "") -> List[str]:
    """The local paths of a student or teacher: model folder (or GGUF file in it) and tokenizer."""
    label = f" ({who})" if who else ""
    if spec.path is None:
        missing = spec.tokenizer is not None and _no_such_path(f"{key}.tokenizer", spec.tokenizer, label)
        return [missing] if missing else []
    missing = _no_such_path(f"{key}.path", spec.path, label)
    if missing:
        return [missing]
    if _local_folder(spec.path) is not None:
        problem = model_folder_problem(spec.path, f"{key}.path", spec.gguf_file, f"{key}.gguf_file")
        if problem:  # the teacher's name right after its key
            return [problem.replace(f"={spec.path}:", f"={spec.path}{label}:", 1)
                    .replace(f"={spec.gguf_file}:", f"={spec.gguf_file}{label}:", 1)]
    gguf = _gguf_problem(f"{key}.gguf_file", spec.gguf_file, label)
    return [gguf] if gguf else []


# --- a student cut from another model ---------------------------------------------------------------

def _config_of(spec: ModelConfig, tokenizer=None):
    """``spec``'s transformers config without its weights (None when it cannot be read here: a
    hub id offline, an adapter folder; the loader then says why)."""
    from transformers import AutoConfig

    if spec.path is None:
        return architecture_config(spec, tokenizer) if tokenizer is not None else None
    folder = _local_folder(spec.path)
    if folder is not None and (folder / ADAPTER_CONFIG).is_file():
        return None  # an adapter checkpoint: its base decides
    try:
        return AutoConfig.from_pretrained(str(folder) if folder is not None else spec.path, gguf_file=spec.gguf_file,
                                          trust_remote_code=spec.trust_remote_code)
    except Exception:  # no network, no cached config, an unknown architecture: checked at load time
        return None


def init_from_problems(tc: TrainConfig) -> List[str]:
    """``student.init_from`` and the layers it keeps: the source exists (and its GGUF file, or
    for a ladder name that the ladder will have built it), and every kept layer is one of its
    layers, read from its config (no weights)."""
    s = tc.student
    if s.init_from is None:
        return []
    ladder = list(tc.teachers.ladder)
    source = init_source(s, ladder)
    named = source in ladder
    if named and source.path is None:
        if not ladder_needed(tc):
            return [f"student.init_from={s.init_from}: the teacher {s.init_from} is trained from scratch by the ladder, "
                    f"which this run does not build (it distils from no teacher); give the folder of a built teacher "
                    f"(outputs/teachers/<name>-<key>/checkpoints/final) instead"]
        num_layers = source.num_layers
    else:
        if not named:
            problems = [p for p in (_no_such_path("student.init_from", s.init_from, ""),) if p]
            if not problems and _local_folder(s.init_from) is not None:
                problem = model_folder_problem(s.init_from, "student.init_from", s.gguf_file, "student.gguf_file")
                if problem:
                    problems.append(problem)
            gguf = _gguf_problem("student.gguf_file", s.gguf_file)
            problems += [gguf] if gguf else []
            if problems:
                return problems
        config = _config_of(source)
        if config is None:
            return []  # the tokenizer's load, next, says why the source cannot be read
        num_layers = getattr(config, "num_hidden_layers", None)
        if num_layers is None:
            return [f"student.init_from={s.init_from}: its config has no num_hidden_layers ({config.model_type}); "
                    f"cutting layers needs a decoder whose blocks are model.layers (llama, qwen2, ...)"]
    try:
        layers_to_keep(s, num_layers)
    except ClpdError as exc:
        return [str(exc)]
    return []


def _tokenizer_key(spec: ModelConfig, key: str) -> str:
    if getattr(spec, "init_from", None):
        return f"{key}.init_from={spec.init_from}"
    if spec.path is not None:
        return f"{key}.path={spec.path}"
    return f"{key}.tokenizer={spec.tokenizer}" if spec.tokenizer is not None else key


# --- LoRA on the architecture, without weights ----------------------------------------------------

def lora_layers(spec: ModelConfig, tokenizer, teachers: Sequence[ModelConfig] = ()) -> Optional[dict]:
    """The module names LoRA can target in ``spec``'s architecture, by kind ({"linear": [...],
    "embedding": [...]}, each the full dotted names), from a meta-device model: no weights are read.
    None when the config cannot be read here (a hub id offline, an adapter folder): the student's
    loader checks the targets again on the real model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    if getattr(spec, "init_from", None):  # a cut student: the source's architecture with the kept layers
        config = _config_of(init_source(spec, teachers), tokenizer)
        if config is None or getattr(config, "num_hidden_layers", None) is None:
            return None
        try:
            config = cut_config(config, layers_to_keep(spec, config.num_hidden_layers))
        except ClpdError:
            return None  # refused by init_from_problems
    else:
        config = _config_of(spec, tokenizer)
        if config is None:
            return None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception:
        return None
    kinds: dict = {"linear": [], "embedding": []}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            kinds["linear"].append(name)
        elif isinstance(module, torch.nn.Embedding):
            kinds["embedding"].append(name)
    return kinds


def lora_problem(spec, tokenizer, teachers: Sequence[ModelConfig] = ()) -> Optional[str]:
    """``student.lora.target_modules`` names that match no linear or embedding layer (as peft
    matches them: the whole dotted name, or its last parts); for a cut student, of the cut model."""
    kinds = lora_layers(spec, tokenizer, teachers)
    if kinds is None:
        return None
    names = [n for kind in kinds.values() for n in kind]
    targets = list(spec.lora.target_modules)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return None
    short = {kind: sorted({n.rsplit(".", 1)[-1] for n in ns}) for kind, ns in kinds.items()}
    arch = spec.arch.value if spec.path is None else spec.path
    if getattr(spec, "init_from", None):
        arch = f"cut from {spec.init_from}"
    allowed = f"{', '.join(short['linear'])} (linear layers)"
    if short["embedding"]:
        allowed += f", {', '.join(short['embedding'])} (embeddings)"
    return (f"student.lora.target_modules={targets}: {', '.join(missing)} not a layer of the student's "
            f"architecture ({arch}); allowed: {allowed}")


# --- benchmark files --------------------------------------------------------------------------------

def benchmark_problems(b: BenchmarkConfig, splits: Sequence[tuple[str, str, Optional[int]]]) -> List[str]:
    """``splits``: (key, split name, limit) of each split the command reads, e.g.
    ("benchmark.train_split", "train", None). Local files are read and parsed (they are small);
    a hub dataset is left to the command (nothing is downloaded here)."""
    problems: List[str] = []
    name = b.name.value if hasattr(b.name, "value") else str(b.name)
    seen = set()
    for key, split, limit in splits:
        if split in seen:
            continue
        seen.add(split)
        if name == BenchmarkName.arith.value:
            if split not in arith.SPLITS:
                problems.append(f"{key}={split}: benchmark=arith has no such split; allowed: {', '.join(arith.SPLITS)}")
                continue
            size_key = "train_size" if split == "train" else "test_size"
            if getattr(b, size_key) < 1:
                problems.append(f"benchmark.{size_key}={getattr(b, size_key)}: the {split} split ({key}) would have "
                                f"no problems; allowed: >= 1")
            continue
        if name == BenchmarkName.gsm8k.value:
            if b.data_dir is None:
                continue  # the hub dataset: loaded (or refused) by the command
            folder = Path(b.data_dir).expanduser()
            if not folder.is_dir():
                problems.append(f"benchmark.data_dir={b.data_dir}: no such folder (a folder with train.jsonl and "
                                f"test.jsonl, or null for the hub dataset {b.hf_path})")
                break
            if not (folder / f"{split}.jsonl").is_file():
                have = sorted(p.stem for p in folder.glob("*.jsonl"))
                problems.append(f"{key}={split}: no {split}.jsonl in benchmark.data_dir={b.data_dir}; "
                                f"allowed: {', '.join(have) if have else 'none (no *.jsonl files there)'}")
                continue
        loaded = _guard(problems, "", lambda: load_problems(b, split, limit))
        if loaded is not None and not loaded:
            problems.append(f"{key}={split}: benchmark={name} has no problems in that split")
        if loaded is None and name == BenchmarkName.svamp.value:
            break  # one file for every split: one message
    return problems


# --- the commands -----------------------------------------------------------------------------------

def resume_problem(resume: Optional[str]) -> Optional[str]:
    """``trainer.resume=PATH``: a clpd checkpoint written with its training state."""
    if resume is None or resume == "auto":
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        return None  # the schema check already refused it
    if not (path / COMPLETE).exists():
        hint = ""
        latest = latest_checkpoint(path) or latest_checkpoint(path.parent)
        if latest is not None:
            hint = f"; did you mean trainer.resume={latest}?"
        return (f"trainer.resume={resume}: not a clpd checkpoint: found no {COMPLETE} marker and no {STATE_FILE} there "
                f"({CHECKPOINT_HINT}; or trainer.resume=auto with hydra.run.dir=<run>){hint}")
    problem = checkpoint_files_problem(path, "trainer.resume")
    if problem:
        return problem
    if not (path / STATE_FILE).is_file():
        return (f"trainer.resume={resume}: the checkpoint has no {STATE_FILE}: it holds weights only and cannot be "
                f"resumed from (start a new run from its weights with student.path={resume})")
    return None


def check_train(tc: TrainConfig) -> None:
    """Refuse, in one line, what ``clpd train`` would otherwise find only after building teachers,
    encoding the data or loading weights. ``tc``: the typed config (``clpd.config.to_object``)."""
    p: List[str] = []
    batch = check_batch(tc.trainer.batch_size, tc.trainer.grad_accum, tc.trainer.micro_batch_tokens)  # under torchrun: a share per rank
    if batch:
        p.append(batch)
    t = tc.trainer

    # device and precision (a CUDA-only setting on a CPU)
    device = _guard(p, "", lambda: resolve_device(t.device, "trainer.device"))
    if device is not None:
        _guard(p, "", lambda: resolve_precision(t.precision, device, "trainer.precision"))

    problem = resume_problem(t.resume)
    if problem:
        p.append(problem)

    # paths of the student and of the teachers that will be loaded
    student_paths = model_paths_problems(tc.student, "student")
    p += student_paths
    needed = ladder_needed(tc)
    ladder = {i: tc.teachers.ladder[i] for i in teachers_in_use(tc)}  # by ladder index; the others are never loaded
    teacher_paths = {}
    for i, spec in ladder.items():
        teacher_paths[i] = model_paths_problems(spec, f"teachers.ladder.{i}", f"teacher {spec.name}")
        p += teacher_paths[i]
    if needed and any(spec.path is None for spec in ladder.values()):
        cache = Path(tc.teachers.cache_dir).expanduser()
        if cache.exists() and not cache.is_dir():
            p.append(f"teachers.cache_dir={tc.teachers.cache_dir}: a file, not a folder (the trained teachers go there)")

    # the student's tokenizer, its architecture (vocab rows, LoRA targets) and the teachers' tokenizers
    hub_failed: List[str] = []

    def tokenizer_of(spec: ModelConfig, prefix: str):
        """Load ``spec``'s tokenizer; after one hub load failed (offline: each costs about a minute of
        retries), the other hub ids are not tried: the command stops at the first one anyway."""
        if getattr(spec, "init_from", None):  # a cut student has its source's tokenizer
            spec = init_source(spec, tc.teachers.ladder)
        source = spec.path if spec.path is not None else spec.tokenizer
        remote = source is not None and _local_folder(source) is None
        if remote and hub_failed:
            return None
        tok = _guard(p, prefix, lambda: load_tokenizer(spec))
        if tok is None and remote:
            hub_failed.append(source)
        return tok

    cut_problems = init_from_problems(tc)
    p += cut_problems
    tokenizer = None
    if not student_paths and not cut_problems:
        tokenizer = tokenizer_of(tc.student, _tokenizer_key(tc.student, "student"))
    if tokenizer is not None:
        s = tc.student
        if s.path is None and s.init_from is None and s.vocab_size is not None and s.vocab_size < len(tokenizer):
            p.append(f"student.vocab_size={s.vocab_size} is smaller than the student's tokenizer ({len(tokenizer)} "
                     f"tokens); allowed: >= {len(tokenizer)}, or null (the tokenizer's size)")
        elif s.lora.enabled:
            problem = _guard(p, "", lambda: lora_problem(s, tokenizer, tc.teachers.ladder))
            if problem:
                p.append(problem)
    if ladder:
        for i, spec in ladder.items():
            if teacher_paths[i]:
                continue
            key = f"teachers.ladder.{i}"
            tok = tokenizer_of(spec, f"{_tokenizer_key(spec, key)} (teacher {spec.name})")
            if tok is None:
                continue
            if spec.path is None and spec.vocab_size is not None and spec.vocab_size < len(tok):
                p.append(f"{key}.vocab_size={spec.vocab_size} (teacher {spec.name}) is smaller than its tokenizer "
                         f"({len(tok)} tokens); allowed: >= {len(tok)}, or null")
            if tokenizer is not None:
                where = _tokenizer_key(spec, key) if (spec.path or spec.tokenizer) else f"{key}.tokenizer=null"
                _guard(p, where, lambda: check_vocabularies(tokenizer, tc.student.name, [(spec.name, tok)]))

    # benchmark files: the training split, and the eval split when the run evaluates
    b = tc.benchmark
    splits = [("benchmark.train_split", b.train_split, b.train_limit)]
    if t.eval_at_end or t.eval_every or (needed and tc.teachers.build.eval):
        splits.append(("benchmark.eval_split", b.eval_split, b.eval_limit))
        if b.num_fewshot:
            splits.append(("benchmark.fewshot_split", b.fewshot_split, None))
    p += benchmark_problems(b, splits)
    _fail(p)


def check_eval(ec: EvalConfig) -> None:
    """Refuse, in one line, what ``clpd eval`` would otherwise find only while loading the model
    or the data: a checkpoint that is not one, a missing GGUF file, the benchmark's files, a
    CUDA-only setting on a CPU. ``ec``: the typed config (``clpd.config.to_object``)."""
    p: List[str] = []
    device = _guard(p, "", lambda: resolve_device(ec.device, "device"))
    if device is not None:
        _guard(p, "", lambda: resolve_precision(ec.precision, device, "precision"))
    if ec.checkpoint:
        if is_package_path(ec.checkpoint):
            missing = _no_such_path("checkpoint", ec.checkpoint, "")
            if missing:
                p.append(missing)
        else:
            try:
                check_source(ec.checkpoint, "checkpoint")
            except ClpdError:
                p.append(f"checkpoint={ec.checkpoint}: no such file or folder ({CHECKPOINT_HINT}, any save_pretrained "
                         f"folder, or a Hugging Face id)")
        if _local_folder(ec.checkpoint) is not None:
            problem = model_folder_problem(ec.checkpoint, "checkpoint", ec.gguf_file, "gguf_file")
            if problem:
                p.append(problem)
        gguf = _gguf_problem("gguf_file", ec.gguf_file)
        if gguf:
            p.append(gguf)
        elif not p and (ec.keep_layers is not None or ec.keep_every is not None):  # the cut's layers exist
            config = _config_of(ModelConfig(name=ec.checkpoint, path=ec.checkpoint, gguf_file=ec.gguf_file))
            if config is not None and getattr(config, "num_hidden_layers", None) is not None:
                _guard(p, "", lambda: layers_to_keep(ec, config.num_hidden_layers, prefix="", source_key="checkpoint"))
    b = ec.benchmark
    splits = [("benchmark.eval_split", b.eval_split, b.eval_limit)]
    if b.num_fewshot:
        splits.append(("benchmark.fewshot_split", b.fewshot_split, None))
    p += benchmark_problems(b, splits)
    _fail(p)
