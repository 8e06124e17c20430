"""benchmark=jsonl: any math benchmark from a file (JSONL, a JSON list, CSV, Parquet), mapped by
field names, defined in the user's own config folder and scored as SVAMP is (numerically)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from clpd.config.enums import BenchmarkName
from clpd.config.schema import BenchmarkConfig, FieldsConfig
from clpd.curriculum.scorers import compute_scores
from clpd.config.schema import CurriculumConfig
from clpd.data import load_problems
from clpd.data.jsonl import answer_number
from clpd.errors import ClpdError
from tests.conftest import SVAMP_DIR, needs
from tests.test_cli import CLPD

# Problems in a schema none of the built-in loaders reads: the answer as text with a thousands
# separator, the difficulty in a field of its own, the worked solution under another name.
ROWS = [
    {"problem": "Ava has 1,200 coins. She gets 34 more. How many coins does she have now?", "final": "1,234",
     "level": 1, "work": "1200+34 = <<1200+34=1234>>1234"},
    {"problem": "Ben has 6 pens. He doubles them, then gives away 2. How many pens now?", "final": "10",
     "level": 2, "work": "6*2 = <<6*2=12>>12\n12-2 = <<12-2=10>>10\n#### 10"},
    {"problem": "Zoe has 9 plums. She eats half of 4 of them. How many now?", "final": 7.0, "level": 3,
     "work": "4/2 = <<4/2=2>>2\n9-2 = <<9-2=7>>7"},
]


def file_benchmark(path: Path, **fields) -> BenchmarkConfig:
    f = {"question": "problem", "answer": "final", "solution": "work", "difficulty": "level", **fields}
    return BenchmarkConfig(name=BenchmarkName.jsonl, path=str(path), hf_path=None, hf_config=None,
                           fields=FieldsConfig(**f))


def write(path: Path, rows: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows).astype({"final": str})
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_gives_the_same_problems(tmp_path, suffix):
    problems = load_problems(file_benchmark(write(tmp_path / f"problems{suffix}", ROWS)), "test")
    assert [p.question for p in problems] == [r["problem"] for r in ROWS]
    assert [p.answer for p in problems] == ["1234", "10", "7"]
    assert [p.difficulty for p in problems] == [1.0, 2.0, 3.0]
    assert [p.id for p in problems] == ["problems-test-0", "problems-test-1", "problems-test-2"]
    # a solution without a final line gets one, so a student learns to write "#### <answer>"
    assert problems[0].solution == "1200+34 = <<1200+34=1234>>1234\n#### 1234"
    assert problems[1].solution == ROWS[1]["work"]
    assert [p.num_steps for p in problems] == [1, 2, 2]


def test_an_answer_is_a_number_or_the_final_number_of_a_text():
    assert answer_number(42) == "42"
    assert answer_number(2.50) == "2.5"
    assert answer_number("1,234") == "1234"
    assert answer_number("$5.") == "5"
    assert answer_number("She has 3 + 4 = 7 apples.") == "7"
    assert answer_number("6*2 = 12\n#### 1,000") == "1000"
    assert answer_number("none") is None
    assert answer_number(True) is None
    assert answer_number(float("nan")) is None


def test_rows_without_a_numeric_answer_are_left_out_and_counted(tmp_path, caplog):
    rows = [*ROWS, {**ROWS[0], "final": "unknown"}, {**ROWS[1], "final": None}]
    problems = load_problems(file_benchmark(write(tmp_path / "p.jsonl", rows)), "test")
    assert len(problems) == 3
    assert "2 of 5 answers (benchmark.fields.answer=final) hold no number and are left out (rows 3, 4)" in caplog.text


def test_ids_task_and_separate_files_per_split(tmp_path):
    train = write(tmp_path / "train.jsonl", [{**r, "key": f"t{i}"} for i, r in enumerate(ROWS)])
    test = write(tmp_path / "test.csv", ROWS[:1])
    cfg = replace(file_benchmark(tmp_path / "unused.jsonl", id="key"), path=None, train_path=str(train),
                  eval_path=str(test), task="mine")
    assert [p.id for p in load_problems(cfg, "train")] == ["t0", "t1", "t2"]
    (only,) = load_problems(replace(cfg, fields=replace(cfg.fields, id=None)), "test")
    assert (only.id, only.source, cfg.label()) == ("mine-test-0", "mine", "mine")


def test_a_dataset_by_name_reads_its_splits_through_datasets(tmp_path):
    # hf_path takes a hub id; a local dataset folder (one file per split) goes through the same call.
    write(tmp_path / "train.jsonl", ROWS)
    write(tmp_path / "test.jsonl", ROWS[:2])
    cfg = replace(file_benchmark(tmp_path / "unused.jsonl"), path=None, hf_path=str(tmp_path), task="local")
    assert [len(load_problems(cfg, split)) for split in ("train", "test")] == [3, 2]
    with pytest.raises(ClpdError, match=r"benchmark.hf_path=.* \(split dev\): could not be read"):
        load_problems(cfg, "dev")


def test_the_curriculum_orders_by_the_difficulty_field_instead_of_a_scorer(tmp_path):
    problems = load_problems(file_benchmark(write(tmp_path / "p.jsonl", [ROWS[2], ROWS[0], ROWS[1]])), "train")
    scores = compute_scores(CurriculumConfig(), problems, None, seed=0)  # the default scorer is cot_steps
    assert scores.tolist() == [3.0, 1.0, 2.0]
    without = load_problems(file_benchmark(tmp_path / "p.jsonl", difficulty=None), "train")
    assert compute_scores(CurriculumConfig(), without, None, seed=0).tolist() == [2.0, 1.0, 2.0]  # steps


def test_a_field_that_is_not_there_is_named_with_the_fields_found(tmp_path):
    cfg = file_benchmark(write(tmp_path / "p.jsonl", ROWS), question="question")
    with pytest.raises(ClpdError, match="benchmark.fields.question=question: no such field in .*p.jsonl; "
                                        "fields found: problem, final, level, work"):
        load_problems(cfg, "test")


def test_svamp_scores_the_same_from_its_own_loader_and_as_a_file(tmp_path, monkeypatch):
    """The same problems, prompts and scoring: a model's outputs and every score agree row by row."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clpd.evaluation import evaluate as evaluation
    from clpd.models.tokenizer import build_char_tokenizer

    folder = needs(SVAMP_DIR)
    builtin = BenchmarkConfig(name=BenchmarkName.svamp, data_dir=str(folder))
    problems = load_problems(builtin, "test")[:48]
    rows = [{"question": p.question, "answer": p.answer, "steps": p.num_steps} for p in problems]
    as_file = BenchmarkConfig(name=BenchmarkName.jsonl, path=str(write(tmp_path / "svamp.jsonl", rows)), hf_path=None,
                              fields=FieldsConfig(difficulty="steps"))
    from_file = load_problems(as_file, "test")
    assert [(p.question, p.answer) for p in from_file] == [(p.question, p.answer) for p in problems]

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64))
    generation = {"batch_size": 16, "max_new_tokens": 24, "device": torch.device("cpu")}
    one, _ = evaluation.evaluate(model, tokenizer, problems, builtin, **generation)
    two, _ = evaluation.evaluate(model, tokenizer, from_file, as_file, **generation)
    assert [r["output"] for r in one] == [r["output"] for r in two]  # the same prompts

    # Answers a model could give: right as written, right as another number's text (2.50 for 2.5), wrong.
    def answers(model, tokenizer, prompts, **kwargs):
        gold = [p.answer for p in problems]
        outputs = [f"#### {g}" if i % 3 == 0 else f"#### {float(g):.2f}" if i % 3 == 1 else "#### 99999"
                   for i, g in enumerate(gold)]
        return outputs, [5] * len(outputs), None
    monkeypatch.setattr(evaluation, "generate", answers)
    one, metrics_one = evaluation.evaluate(model, tokenizer, problems, builtin, **generation)
    two, metrics_two = evaluation.evaluate(model, tokenizer, from_file, as_file, **generation)
    assert [r["correct_strict"] for r in one] == [r["correct_strict"] for r in two]
    assert metrics_one["accuracy_strict"] == metrics_two["accuracy_strict"] == 32 / 48
    assert metrics_one["by_difficulty"] == metrics_two["by_difficulty"]


def test_a_benchmark_from_the_users_config_folder_trains_and_evaluates(tmp_path):
    """benchmark/mine.yaml outside the package, found through hydra.searchpath (train) and
    CLPD_CONFIG_PATH (eval)."""
    from clpd.data import arith

    source = BenchmarkConfig(train_size=48, test_size=12, max_steps=3)
    def rows(split):
        return [{"problem": p.question, "final": f"{int(p.answer):,}", "level": p.num_steps,
                 "work": p.solution.rsplit("\n####", 1)[0]} for p in arith.generate(split, source)]
    write(tmp_path / "train.jsonl", rows("train"))
    write(tmp_path / "test.jsonl", rows("test"))
    conf = tmp_path / "my_conf" / "benchmark"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        "defaults: [jsonl, _self_]\n"
        "task: mine\n"
        f"train_path: {tmp_path / 'train.jsonl'}\n"
        f"eval_path: {tmp_path / 'test.jsonl'}\n"
        "fields: {question: problem, answer: final, solution: work, difficulty: level}\n")
    tiny = ["student.hidden_size=32", "student.num_layers=1", "student.num_heads=2", "student.intermediate_size=64",
            "trainer.max_steps=3", "trainer.batch_size=4", "trainer.warmup_steps=1", "trainer.eval_max_new_tokens=16"]
    run = tmp_path / "run"
    train = subprocess.run([CLPD, "train", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "benchmark=mine",
                            "method=none", "teachers=none", "distill=sft", "curriculum=easy_to_hard", *tiny,
                            f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] == 48 and summary["eval"]["benchmark"] == "mine"
    scores = json.loads((run / "difficulty.json").read_text())["scores"]
    assert scores == [float(r["level"]) for r in rows("train")]  # the data's difficulty, not a scorer's

    out = tmp_path / "eval"
    evaluated = subprocess.run([CLPD, "eval", f"checkpoint={run / 'checkpoints' / 'final'}", "benchmark=mine",
                                "max_new_tokens=16", f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300, env={**os.environ, "CLPD_CONFIG_PATH": str(tmp_path / "my_conf")})
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["benchmark"], metrics["n"]) == ("mine", 12)
    assert set(metrics["by_difficulty"]) <= {"1", "2", "3"}
    assert metrics["accuracy_strict"] == summary["eval"]["accuracy_strict"]  # the same model, scored the same way
