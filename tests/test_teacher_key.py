"""The cache key of a from-scratch teacher holds exactly what changes its weights; the folder of its
cached evaluation holds what changes its scores.

Every field of the benchmark and trainer configs is changed in turn to another valid value: a
training field renames the teacher's folder (it is trained again), an evaluation-only field leaves
it and renames only the evaluation folder (the cached teacher is evaluated again), and a field that
neither trains nor scores (logging, checkpoints, threads) leaves both. A new config field that is
not classified in clpd/teachers/ladder.py fails here.
"""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import Any, List

import pytest

from clpd.config.schema import BenchmarkConfig, FieldsConfig, TeacherBuildConfig, TrainConfig, TrainerConfig, to_object
from clpd.data import load_problems
from clpd.data.prompts import encode_problems
from clpd.errors import ClpdError
from clpd.models.load import load_tokenizer
from clpd.teachers import ladder
from clpd.teachers.ladder import _eval_dir, teacher_dir, teacher_key, teacher_train_config
from tests.conftest import compose_config

BENCHMARK_FIELDS = {f.name for f in dataclasses.fields(BenchmarkConfig)}
TRAINER_FIELDS = {f.name for f in dataclasses.fields(TrainerConfig)}
BUILD_FIELDS = {f.name for f in dataclasses.fields(TeacherBuildConfig)}

BENCHMARK_TRAINING = set(ladder.BENCHMARK_TRAINING_FIELDS)
BENCHMARK_EVAL_ONLY = set(ladder.BENCHMARK_EVAL_ONLY_FIELDS)
TRAINER_TRAINING = set(ladder.TRAINER_TRAINING_FIELDS)
TRAINER_SET_FOR_TEACHER = set(ladder.TRAINER_SET_FOR_TEACHER_FIELDS)
TRAINER_UNKEYED = set(ladder.TRAINER_UNKEYED_FIELDS)
TRAINER_SCORING = set(ladder.TRAINER_SCORING_FIELDS)


@pytest.fixture(scope="module")
def tc() -> TrainConfig:
    """The default train config: the arith_tiny ladder of from-scratch teachers."""
    return to_object(compose_config("train", []))


@pytest.fixture(scope="module")
def file_tc() -> TrainConfig:
    """The default train config on a file benchmark (benchmark=jsonl), whose settings only it reads."""
    return to_object(compose_config("train", ["benchmark=jsonl", "benchmark.path=problems.jsonl",
                                              "benchmark.fields.solution=work"]))


def as_built(tc: TrainConfig) -> TrainConfig:
    """``tc`` with every teacher built as teachers.build says (no teachers.build_overrides)."""
    return dataclasses.replace(tc, teachers=dataclasses.replace(tc.teachers, build_overrides={}))


def on(tc: TrainConfig, file_tc: TrainConfig, name: str) -> TrainConfig:
    """The config a benchmark field is varied in: a file benchmark's own settings on one."""
    return file_tc if name in ladder.FILE_BENCHMARK_FIELDS else tc


def candidates(value: Any, kind: Any) -> List[Any]:
    """Other values of a field's type, to try in order (the first valid one is used)."""
    if typing.get_origin(kind) is typing.Union:  # Optional[X]: a value of X, or None
        inner = next(a for a in typing.get_args(kind) if a is not type(None))
        return [None, *candidates(value, inner)] if value is not None else candidates(None, inner)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [m for m in kind if m != value]
    if kind is bool:
        return [not value] if value is not None else [True, False]
    if kind is int:
        return [value + 1, value * 2] if value is not None else [64, 1]
    if kind is float:
        return [value / 2, value + 0.1]
    if kind is str:
        return [f"{value}-other", "auto"] if value is not None else ["other", "auto"]
    if kind is FieldsConfig:
        return [dataclasses.replace(value, question=f"{value.question}-other")]
    raise AssertionError(f"no alternative values for a field of type {kind}; add them to candidates()")


def varied(tc: TrainConfig, section: str, name: str) -> TrainConfig:
    """``tc`` with ``<section>.<name>`` set to another value that every config check accepts
    (``build``: teachers.build, checked through the teacher's training run it configures)."""
    config = tc.teachers.build if section == "build" else getattr(tc, section)
    kind = typing.get_type_hints(type(config))[name]
    for value in candidates(getattr(config, name), kind):
        try:
            changed = dataclasses.replace(config, **{name: value})
            if section == "build":
                out = dataclasses.replace(tc, teachers=dataclasses.replace(tc.teachers, build=changed))
                teacher_train_config(out.teachers.ladder[-1], out)
                return out
            return dataclasses.replace(tc, **{section: changed})
        except ClpdError:
            continue
    raise AssertionError(f"{section}.{name}: no valid alternative value among {candidates(getattr(config, name), kind)}")


# --- every field is classified -----------------------------------------------------------------------

def test_every_benchmark_field_is_either_a_training_or_an_evaluation_field():
    assert BENCHMARK_TRAINING | BENCHMARK_EVAL_ONLY == BENCHMARK_FIELDS
    assert not BENCHMARK_TRAINING & BENCHMARK_EVAL_ONLY
    assert len(ladder.BENCHMARK_TRAINING_FIELDS) + len(ladder.BENCHMARK_EVAL_ONLY_FIELDS) == len(BENCHMARK_FIELDS)


def test_every_trainer_field_is_training_set_for_the_teacher_or_unkeyed():
    groups = [ladder.TRAINER_TRAINING_FIELDS, ladder.TRAINER_SET_FOR_TEACHER_FIELDS, ladder.TRAINER_UNKEYED_FIELDS]
    assert set().union(*groups) == TRAINER_FIELDS
    assert sum(map(len, groups)) == len(TRAINER_FIELDS)  # no field twice
    assert TRAINER_SCORING <= TRAINER_UNKEYED


def test_the_trainer_fields_set_for_the_teacher_are_those_its_run_does_not_take_from_the_trainer(tc):
    spec = tc.teachers.ladder[-1]
    run = teacher_train_config(spec, tc)
    for name in sorted(TRAINER_FIELDS):
        same = teacher_train_config(spec, varied(tc, "trainer", name)) == run
        assert same == (name in TRAINER_SET_FOR_TEACHER), f"trainer.{name}"


def training_examples(tc: TrainConfig) -> list:
    """What the first teacher's training run learns from: its training problems, encoded."""
    spec = tc.teachers.ladder[-1]
    run: TrainConfig = to_object(teacher_train_config(spec, tc))
    b, t = run.benchmark, run.trainer
    problems = load_problems(b, b.train_split, b.train_limit)
    return encode_problems(problems, load_tokenizer(spec), b.chat_template, t.max_length, t.overlong.value)[1]


# A training split of 100 problems: quick to generate, and longer than the limit varied() sets (64).
SMALL_SPLIT = ["benchmark.train_size=100"]


@pytest.mark.parametrize("name", sorted(BENCHMARK_EVAL_ONLY))
def test_an_evaluation_only_benchmark_field_leaves_the_teachers_training_examples_as_they_are(name):
    small = to_object(compose_config("train", SMALL_SPLIT))
    assert training_examples(varied(small, "benchmark", name)) == training_examples(small)


@pytest.mark.parametrize("name", ["train_size", "train_limit", "max_steps", "min_value", "max_value"])
def test_an_arith_training_field_changes_the_teachers_training_examples(name):
    small = to_object(compose_config("train", SMALL_SPLIT))
    assert training_examples(varied(small, "benchmark", name)) != training_examples(small)


# Named here on their own, not read from the tuples of clpd/teachers/ladder.py: the settings a user
# changes to evaluate, log or save differently, and the trainer settings a teacher is trained with.
NEVER_RETRAIN = [
    ("benchmark", "eval_split"), ("benchmark", "eval_limit"), ("benchmark", "test_size"), ("benchmark", "seed"),
    ("benchmark", "num_fewshot"), ("benchmark", "fewshot_split"), ("benchmark", "fewshot_seed"),
    ("trainer", "eval_at_end"), ("trainer", "eval_every"), ("trainer", "eval_every_limit"),
    ("trainer", "eval_batch_size"), ("trainer", "eval_max_new_tokens"), ("trainer", "log_every"),
    ("trainer", "save"), ("trainer", "save_every"), ("trainer", "keep_last"), ("trainer", "resume"),
    ("trainer", "resume_force"), ("trainer", "tensorboard"), ("trainer", "eval_calculator"),
    ("trainer", "fused_loss"),
]
RETRAIN = [
    ("benchmark", "name"), ("benchmark", "train_split"), ("benchmark", "train_limit"), ("benchmark", "train_size"),
    ("benchmark", "chat_template"), ("trainer", "weight_decay"), ("trainer", "grad_clip"), ("trainer", "lr_schedule"),
    ("trainer", "min_lr_ratio"), ("trainer", "adam_beta1"), ("trainer", "adam_beta2"), ("trainer", "max_length"),
    ("trainer", "overlong"), ("trainer", "precision"), ("trainer", "device"), ("trainer", "packing"),
    ("trainer", "micro_batch_tokens"),
]


@pytest.mark.parametrize("section,name", NEVER_RETRAIN)
def test_evaluating_logging_or_saving_differently_never_retrains_a_teacher(tc, section, name):
    spec = tc.teachers.ladder[-1]
    assert teacher_key(spec, varied(tc, section, name)) == teacher_key(spec, tc)


@pytest.mark.parametrize("section,name", RETRAIN)
def test_other_training_data_or_trainer_settings_retrain_a_teacher(tc, section, name):
    spec = tc.teachers.ladder[-1]
    assert teacher_key(spec, varied(tc, section, name)) != teacher_key(spec, tc)


# --- the teacher's key --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BENCHMARK_FIELDS))
def test_a_benchmark_field_is_in_the_key_when_it_changes_the_training_data(tc, file_tc, name):
    tc = on(tc, file_tc, name)
    changed = varied(tc, "benchmark", name)
    for spec in tc.teachers.ladder:
        assert (teacher_key(spec, changed) != teacher_key(spec, tc)) == (name in BENCHMARK_TRAINING), name


@pytest.mark.parametrize("name", ladder.FILE_BENCHMARK_FIELDS)
def test_a_file_benchmarks_settings_leave_the_other_benchmarks_teachers_and_evaluations_as_they_were(tc, name):
    changed = varied(tc, "benchmark", name)
    for spec in tc.teachers.ladder:
        assert (teacher_dir(spec, changed), _eval_dir(spec, changed)) == (teacher_dir(spec, tc), _eval_dir(spec, tc))


@pytest.mark.parametrize("name", sorted(TRAINER_FIELDS))
def test_a_trainer_field_is_in_the_key_when_the_teachers_run_trains_with_it(tc, name):
    changed = varied(tc, "trainer", name)
    for spec in tc.teachers.ladder:
        assert (teacher_key(spec, changed) != teacher_key(spec, tc)) == (name in TRAINER_TRAINING), name


@pytest.mark.parametrize("name", sorted(BUILD_FIELDS))
def test_every_build_setting_but_whether_to_evaluate_is_in_the_key(tc, name):
    tc = as_built(tc)
    changed = varied(tc, "build", name)
    spec = tc.teachers.ladder[-1]
    assert (teacher_key(spec, changed) != teacher_key(spec, tc)) == (name not in ladder.BUILD_EVAL_ONLY_FIELDS)


def test_the_key_follows_the_architecture_but_not_the_name(tc):
    tc = as_built(tc)  # a renamed teacher is built alike
    spec = tc.teachers.ladder[-1]
    assert teacher_key(dataclasses.replace(spec, name="renamed"), tc) == teacher_key(spec, tc)
    assert teacher_key(dataclasses.replace(spec, num_layers=spec.num_layers + 1), tc) != teacher_key(spec, tc)


def test_an_evaluation_limit_in_a_sweep_reuses_the_ladder(tc):
    # clpd train -m ... benchmark.eval_limit=200: the cached teachers are evaluated again, not trained.
    limited = to_object(compose_config("train", ["benchmark.eval_limit=200"]))
    for spec in tc.teachers.ladder:
        assert teacher_dir(spec, limited) == teacher_dir(spec, tc)
        assert _eval_dir(spec, limited) != _eval_dir(spec, tc)


# --- the evaluation folder ---------------------------------------------------------------------------

@pytest.mark.parametrize("section,name", sorted([("benchmark", n) for n in BENCHMARK_FIELDS]
                                                + [("trainer", n) for n in TRAINER_FIELDS]))
def test_the_evaluation_folder_changes_with_what_trains_or_scores_the_teacher(tc, file_tc, section, name):
    tc = on(tc, file_tc, name) if section == "benchmark" else tc
    changed = varied(tc, section, name)
    spec = tc.teachers.ladder[-1]
    scores = name in (BENCHMARK_FIELDS if section == "benchmark" else TRAINER_TRAINING | TRAINER_SCORING)
    assert (_eval_dir(spec, changed) != _eval_dir(spec, tc)) == scores, f"{section}.{name}"
    assert _eval_dir(spec, changed).parent == teacher_dir(spec, changed)


def test_the_evaluation_folder_names_the_benchmark_and_its_seed(tc):
    name = _eval_dir(tc.teachers.ladder[-1], tc).name
    assert name.startswith(f"eval-{tc.benchmark.name.value}-seed{tc.benchmark.seed}-")
