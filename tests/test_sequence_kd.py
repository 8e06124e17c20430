"""Sequence-level KD (``distill.targets=teacher``): each teacher of the schedule writes solutions to
the training prompts once (stored and keyed like its outputs), the student trains on them, all or
only those with the gold answer; and the CoT-derived difficulty scorer reads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from clpd.commands.plan import run_plan
from clpd.config.model import ModelConfig
from clpd.config.schema import SamplingConfig
from clpd.teachers.solutions import solutions_key
from clpd.commands.run_train import run_train
from clpd.data.batching import prompt_length
from clpd.data.records import IGNORE_INDEX
from clpd.training.batches import Batches
from clpd.training.targets import TeacherTargets
from tests.conftest import TINY_OVERRIDES, compose_config
from tests.test_teacher_store import encoded, kd_cfg

QUIET = Console(quiet=True)
WRITE = ("distill.targets=teacher", "distill.teacher_generation.max_new_tokens=12")


def steps_of(run_dir: Path) -> list:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "event" not in r]


# --- the batches ---------------------------------------------------------------------------------

class Fixed:
    """A sampler whose every step draws examples 0..n-1."""

    def __init__(self, n: int) -> None:
        self.n = n

    def batch(self, step: int, at: int) -> list:
        return list(range(self.n))

    def describe(self, at: int) -> dict:
        return {"pool": self.n}


def test_a_step_trains_on_the_active_teachers_kept_solutions_and_leaves_out_examples_without_one():
    examples = encoded(4)
    # teacher 0 kept one solution for examples 0-2 and none for 3; teacher 1 kept two for each
    answers = {0: [[[7, 8, 9]], [[7]], [[5, 5, 5, 5]], []],
               1: [[[11, 2], [12, 3, 4]] for _ in range(4)]}
    targets = TeacherTargets(answers, schedule=lambda at: 0 if at < 10 else 1, seed=0)
    batches = Batches(examples, Fixed(4), pad_id=0, targets=targets)

    early = batches.step(0, 0, micro_size=4)
    assert early.left_out == 1 and len(early.examples) == 3
    for e in early.examples:
        i = e["id"]
        n = prompt_length(e)
        assert e["input_ids"][:n] == examples[i]["input_ids"][:prompt_length(examples[i])]
        assert e["input_ids"][n:] == answers[0][i][0] and e["labels"][n:] == answers[0][i][0]
        assert e["labels"][:n] == [IGNORE_INDEX] * n
    assert early.answer_tokens == 3 + 1 + 4

    late = [batches.step(s, 20, micro_size=4) for s in range(8)]
    assert all(b.left_out == 0 for b in late)
    picked = {tuple(e["input_ids"][prompt_length(e):]) for b in late for e in b.examples}
    assert picked == {(11, 2), (12, 3, 4)}  # each step draws one of the two kept solutions, seeded
    assert [b.examples for b in late] == [batches.step(s, 20, micro_size=4).examples for s in range(8)]

    # Each micro-batch names its solutions' rows in the teacher's list of kept solutions, where
    # stored outputs built on them are found: teacher 0 kept one each for examples 0-2 (rows 0-2),
    # teacher 1 two for each (example i's are rows 2i and 2i + 1).
    assert early.micro_batches[0]["index"].tolist() == [e["id"] for e in early.examples]
    for b in late:
        rows = b.micro_batches[0]["index"].tolist()
        assert rows == [2 * e["id"] + answers[1][e["id"]].index(e["input_ids"][prompt_length(e):]) for e in b.examples]
        listed = targets.solution_examples(1, examples)
        assert [listed[r]["input_ids"] for r in rows] == [e["input_ids"] for e in b.examples]


# --- runs ----------------------------------------------------------------------------------------

def test_each_teacher_writes_its_solutions_once_and_the_student_trains_on_them(tmp_path):
    summary = run_train(kd_cfg(tmp_path, *WRITE, "teachers.schedule=progressive"), tmp_path / "one", QUIET)
    entries = sorted((tmp_path / "cache" / "solutions").glob("*-n1-*"))
    assert [p.name.split("-")[0] for p in entries] == ["a", "b", "c"]  # the progressive schedule's three rungs
    written = summary["teacher_outputs"]["solutions"]
    assert summary["teacher_outputs"]["targets"] == "teacher" and [w["teacher"] for w in written] == ["a", "b", "c"]
    for w in written:
        assert w["answers"] == w["kept"] == 64 and w["examples_without"] == 0  # keep=all: every prompt's solution
        assert sum(level["answers"] for level in w["by_difficulty"].values()) == 64
        assert 0 <= w["correct"] <= w["answers"] and 0 <= w["finished"] <= w["answers"]
    assert all(r["left_out"] == 0 for r in steps_of(tmp_path / "one"))

    stamps = {p: (p / "solutions.json").stat().st_mtime_ns for p in entries}
    run_train(kd_cfg(tmp_path, *WRITE, "teachers.schedule=progressive", "trainer.max_steps=1"), tmp_path / "two", QUIET)
    assert {p: (p / "solutions.json").stat().st_mtime_ns for p in entries} == stamps  # the same key: read, not written


def test_stored_outputs_on_written_solutions_train_the_student_the_live_teachers_train(tmp_path):
    # Two sampled solutions per prompt: a step reads the stored rows of the one it drew.
    written = (*WRITE, "teachers.schedule=progressive", "distill.teacher_samples=2",
               "distill.teacher_generation.temperature=1.0", "trainer.max_steps=6")
    live = run_train(kd_cfg(tmp_path, *written), tmp_path / "live", QUIET)
    stored = run_train(kd_cfg(tmp_path, *written, "distill.teacher_outputs=stored", "distill.top_k=null"),
                       tmp_path / "stored", QUIET)
    stores = stored["teacher_outputs"]["stores"]
    assert [s["teacher"] for s in stores] == ["a", "b", "c"]
    for store, solutions in zip(stores, stored["teacher_outputs"]["solutions"]):
        marker = json.loads((Path(store["folder"]) / "store.json").read_text())
        assert marker["examples"] == solutions["kept"] == 2 * 64  # one stored example per kept solution
    losses = [[r["loss"] for r in steps_of(tmp_path / run)] for run in ("live", "stored")]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_the_key_of_written_solutions_holds_what_changes_them():
    spec = ModelConfig(name="t", path=str(Path(__file__).parent), hidden_size=8)  # any folder: its files are hashed
    examples = encoded(6)
    key = lambda **kw: solutions_key(spec, kw.get("examples", examples), samples=kw.get("samples", 1),  # noqa: E731
                                     decoding=kw.get("decoding", SamplingConfig()), seed=kw.get("seed", 0),
                                     dtype=torch.float32).digest()
    other_prompt = [dict(examples[0], input_ids=[1, *examples[0]["input_ids"][1:]]), *examples[1:]]
    variants = [key(samples=2), key(seed=1), key(decoding=SamplingConfig(temperature=0.5)),
                key(decoding=SamplingConfig(max_new_tokens=7)), key(examples=other_prompt)]
    assert len({key(), *variants}) == 6
    # greedy decoding writes the same solutions whatever the seed: runs of every seed share them
    greedy = SamplingConfig(temperature=0.0)
    assert key(decoding=greedy, seed=1) == key(decoding=greedy, seed=0) != key(decoding=greedy, samples=2)
    same_prompts = [dict(e, labels=[IGNORE_INDEX if t == IGNORE_INDEX else 0 for t in e["labels"]]) for e in examples]
    assert key(examples=same_prompts) == key()  # only the prompts: the gold answers do not change what a teacher writes


def test_keep_correct_keeps_only_solutions_with_the_gold_answer_and_counts_them(tmp_path):
    summary = run_train(kd_cfg(tmp_path, *WRITE, "distill.keep=correct", "distill.teacher_samples=2",
                               "distill.teacher_generation.temperature=1.0"), tmp_path / "run", QUIET)
    [written] = summary["teacher_outputs"]["solutions"]  # standard KD: the strongest teacher alone
    assert written["answers"] == 128 and written["kept"] == written["correct"]
    table = _table(tmp_path, "c")
    kept_per_example = np.bincount(np.array(table["example"])[np.array(table["correct"], dtype=bool)], minlength=64)
    assert written["examples_without"] == int((kept_per_example == 0).sum())
    steps = steps_of(tmp_path / "run")
    assert all(0 <= r["left_out"] <= 4 for r in steps)
    if written["examples_without"] == 64:  # a 2-step teacher may solve nothing: then every example is left out
        assert all(r["left_out"] == 4 for r in steps)


def _table(tmp_path: Path, teacher: str) -> dict:
    from datasets import load_from_disk

    [entry] = (tmp_path / "cache" / "solutions").glob(f"{teacher}-*")
    return load_from_disk(str(entry / "table")).to_dict()


def test_the_same_key_writes_the_same_solutions(tmp_path):
    sampled = (*WRITE, "distill.teacher_samples=2", "distill.teacher_generation.temperature=1.0", "trainer.max_steps=1")
    run_train(kd_cfg(tmp_path, *sampled), tmp_path / "x", QUIET)
    a = _table(tmp_path, "c")
    shutil.rmtree(tmp_path / "cache" / "solutions")  # written again, by the same teacher
    run_train(kd_cfg(tmp_path, *sampled), tmp_path / "y", QUIET)
    b = _table(tmp_path, "c")
    assert a["answer_ids"] == b["answer_ids"] and a["text"] == b["text"]
    assert any(x != y for x, y in zip(a["answer_ids"][:64], a["answer_ids"][64:]))  # two samples, not one twice


def test_the_cot_derived_scorer_orders_by_the_steps_of_the_teachers_own_solution(tmp_path):
    cfg = kd_cfg(tmp_path, "curriculum=easy_to_hard", "curriculum.difficulty=teacher_cot_steps", "curriculum.teacher=b",
                 "distill.teacher_generation.max_new_tokens=12")
    run_train(cfg, tmp_path / "run", QUIET)
    from clpd.data.records import count_steps

    table = _table(tmp_path, "b")
    expected = np.zeros(64)
    for i, j, text in zip(table["example"], table["sample"], table["text"]):
        if j == 0:
            expected[i] = count_steps(text)
    scores = json.loads((tmp_path / "run" / "difficulty.json").read_text())["scores"]
    np.testing.assert_array_equal(scores, expected)


def test_clpd_plan_names_the_targets_each_teacher_writes(tmp_path):
    console = Console(record=True, width=200)
    run_plan(kd_cfg(tmp_path, *WRITE, "teachers.schedule=progressive", "distill.keep=correct"), tmp_path / "plan", console)
    printed = console.export_text()
    assert "targets: solutions written by a, b, c" in printed and "gold answer" in printed


@pytest.mark.parametrize("extra, message", [
    (None, "distill.targets=teacher needs a teacher ladder"),
    (["distill.targets=teacher", "distill.teacher_samples=0"], "distill.teacher_samples=0 must be >= 1"),
    (["distill.targets=teacher", "distill.teacher_samples=3"], "writes the same solution each time"),
    (["distill.targets=teacher", "distill.keep=some"], "keep"),
    (["curriculum.difficulty=teacher_cot_steps", "curriculum.teacher=zz"], "must name a teacher of the ladder for teacher_cot_steps"),
])
def test_bad_sequence_kd_settings_are_refused_before_any_teacher_writes(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):  # ClpdError, or Hydra's for a value that is not allowed
        cfg = (compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "distill.targets=teacher"])
               if extra is None else kd_cfg(tmp_path, *extra))
        run_train(cfg, tmp_path / "run", QUIET)
    assert not (tmp_path / "cache" / "solutions").exists()
