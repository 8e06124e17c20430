"""Benchmarks: the arith generator, GSM8K and SVAMP loaders, and the dispatcher."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from clpd.evaluation.answers import extract_flexible, extract_strict, is_correct
from clpd.config.schema import BenchmarkConfig
from clpd.config.enums import BenchmarkName
from clpd.data import LOADERS, Problem, load_problems
from clpd.data import arith, gsm8k, svamp
from clpd.data.records import count_steps
from clpd.errors import ClpdError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_DIR = SHARED_DATA / "gsm8k"
SVAMP_DIR = SHARED_DATA / "svamp"

# "<<12-3=9>>" with integer operands; "a op b" is also shown before " = <<".
CALC = re.compile(r"(\d+)([-+*/])(\d+) = <<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)$")


def small(**kw) -> BenchmarkConfig:
    base = dict(name=BenchmarkName.arith, train_size=2000, test_size=400)
    base.update(kw)
    return BenchmarkConfig(**base)


def needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data lives next to the repository)")


# --------------------------------------------------------------------------- count_steps


def test_count_steps_counts_calculator_annotations():
    assert count_steps("a <<1+2=3>>3 and <<3*2=6>>6\nb <<6-1=5>>5\n#### 5") == 3


def test_count_steps_without_annotations_counts_reasoning_lines():
    assert count_steps("First line.\n\nSecond line.\n#### 4") == 2


def test_count_steps_is_at_least_one():
    assert count_steps("#### 51") == 1


# --------------------------------------------------------------------------- arith


@pytest.fixture(scope="module")
def arith_splits():
    cfg = small()
    return cfg, arith.generate("train", cfg), arith.generate("test", cfg)


def test_arith_sizes_and_ids(arith_splits):
    cfg, train, test = arith_splits
    assert len(train) == cfg.train_size and len(test) == cfg.test_size
    assert [p.id for p in train[:3]] == ["arith-train-0", "arith-train-1", "arith-train-2"]
    assert len({p.id for p in test}) == len(test)
    assert all(p.source == "arith" for p in train + test)


def test_arith_is_deterministic_for_a_seed(arith_splits):
    cfg, train, test = arith_splits
    assert arith.generate("train", cfg) == train
    assert arith.generate("test", cfg) == test


def test_arith_a_prefix_does_not_depend_on_the_size(arith_splits):
    cfg, train, _ = arith_splits
    assert arith.generate("train", dataclasses.replace(cfg, train_size=50)) == train[:50]


def test_arith_another_seed_gives_other_problems(arith_splits):
    cfg, train, _ = arith_splits
    other = arith.generate("train", dataclasses.replace(cfg, seed=cfg.seed + 1, train_size=200))
    assert len({p.question for p in other} & {p.question for p in train[:200]}) < 10


def test_arith_train_and_test_are_disjoint(arith_splits):
    _, train, test = arith_splits
    assert not {p.question for p in train} & {p.question for p in test}


def test_arith_validation_shares_no_question_with_train_or_test(arith_splits):
    """Settings chosen on validation are chosen without the test split, and no training split of
    any seed (a teacher's, drawn with another seed) can hold a validation question."""
    cfg, train, test = arith_splits
    validation = arith.generate("validation", cfg)
    other_train = arith.generate("train", dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert len(validation) == cfg.test_size
    assert validation[0].id == "arith-validation-0"
    questions = {p.question for p in validation}
    assert not questions & {p.question for p in train + other_train + test}
    assert {p.num_steps for p in validation} == {p.num_steps for p in test}


def test_arith_annotations_are_correct_arithmetic(arith_splits):
    _, train, test = arith_splits
    for p in train + test:
        *lines, last = p.solution.split("\n")
        value = None
        for line in lines:
            m = CALC.search(line)
            assert m, line
            a, op, b, a2, op2, b2, r, shown = m.groups()
            assert (a, op, b) == (a2, op2, b2), f"shown expression differs from the annotation: {line}"
            a, b, r = int(a), int(b), int(r)
            expected = {"+": a + b, "-": a - b, "*": a * b}.get(op)
            if op == "/":
                assert a % b == 0, line
                expected = a // b
            assert r == expected and shown == str(r), line
            assert value is None or a == value, "each step starts from the previous result"
            value = r
        assert last == f"#### {value}" and p.answer == str(value)


def test_arith_starts_from_the_number_in_the_question(arith_splits):
    _, train, _ = arith_splits
    for p in train[:500]:
        start = re.match(r"\w+ (?:has|starts with) (\d+) ", p.question).group(1)
        assert p.solution.startswith(start) or f": {start}" in p.solution.split("\n")[0]


def test_arith_num_steps_is_the_number_of_annotated_lines(arith_splits):
    _, train, test = arith_splits
    for p in train + test:
        assert p.num_steps == len(p.solution.split("\n")) - 1 == p.solution.count("<<") == count_steps(p.solution)


def test_arith_every_difficulty_from_1_to_max_steps_appears(arith_splits):
    cfg, train, test = arith_splits
    for split in (train, test):
        assert {p.num_steps for p in split} == set(range(1, cfg.max_steps + 1))


def test_arith_values_are_non_negative_integers(arith_splits):
    cfg, train, _ = arith_splits
    for p in train:
        for a, b, r in re.findall(r"<<(-?\d+)[-+*/](-?\d+)=(-?[\d.]+)>>", p.solution):
            assert int(a) >= 0 and int(b) >= 0 and re.fullmatch(r"\d+", r), p.solution
        assert not re.search(r"-\s*\d", p.question)
        assert re.fullmatch(r"\d+", p.answer)


def test_arith_add_and_subtract_operands_stay_in_range(arith_splits):
    cfg, train, _ = arith_splits
    for p in train:
        for a, op, b in re.findall(r"<<(\d+)([-+])(\d+)=", p.solution):
            assert cfg.min_value <= int(b) <= cfg.max_value


def test_arith_multiplies_only_small_values_and_divides_by_2_to_4(arith_splits):
    cfg, train, _ = arith_splits
    ops = set()
    for p in train:
        for a, op, b in re.findall(r"<<(\d+)([-+*/])(\d+)=", p.solution):
            ops.add(op)
            if op == "*":
                assert int(b) in (2, 3) and int(a) <= cfg.max_value
            if op == "/":
                assert int(b) in (2, 3, 4)
    assert ops == {"+", "-", "*", "/"}


def test_arith_wording_varies(arith_splits):
    _, train, _ = arith_splits
    names = {p.question.split()[0] for p in train}
    items = {re.match(r"\w+ (?:has|starts with) \d+ (\w+)\.", p.question).group(1) for p in train}
    asks = {p.question.rsplit(". ", 1)[1].split()[3] for p in train}  # "does" / "now?" ...
    prefixes = {line.split(":")[0] for p in train for line in p.solution.split("\n")[:-1] if ":" in line}
    assert len(names) >= 10 and len(items) >= 8 and len(asks) >= 2 and len(prefixes) >= 10


def test_arith_length_budget_holds_on_average():
    cfg = BenchmarkConfig()  # the defaults: what training sees
    by_k = defaultdict(list)
    for p in arith.generate("test", cfg):
        by_k[p.num_steps].append(len(p.question) + len(p.solution))
    mean = {k: statistics.mean(v) for k, v in by_k.items()}
    assert mean[1] <= 110
    per_step = (mean[cfg.max_steps] - mean[1]) / (cfg.max_steps - 1)
    assert per_step <= 52


def test_arith_unknown_split_is_a_clpd_error():
    with pytest.raises(ClpdError, match="train, validation, test"):
        arith.generate("dev", small())


# --------------------------------------------------------------------------- gsm8k


def write_jsonl(folder: Path, name: str, lines) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"question": "Q?", "answer": "It is 2+3=<<2+3=5>>5\nThen 5*200=<<5*200=1000>>1000\n#### 1,000"})


def gsm8k_cfg(folder) -> BenchmarkConfig:
    return BenchmarkConfig(name=BenchmarkName.gsm8k, data_dir=str(folder))


def test_gsm8k_local_fields_and_normalised_answer(tmp_path):
    write_jsonl(tmp_path, "train.jsonl", [GOOD, "", GOOD])  # a blank line is skipped
    problems = gsm8k.load("train", gsm8k_cfg(tmp_path))
    assert [p.id for p in problems] == ["gsm8k-train-0", "gsm8k-train-1"]
    p = problems[0]
    assert p.answer == "1000" and p.num_steps == 2 and p.source == "gsm8k" and p.question == "Q?"
    assert p.solution.endswith("#### 1,000")


@pytest.mark.parametrize("bad, what", [
    ("{not json", "not valid JSON"),
    (json.dumps({"question": "Q?"}), "missing key 'answer'"),
    (json.dumps({"question": "Q?", "answer": "It is 5"}), "####"),
    (json.dumps(["Q?", "5"]), "JSON object"),
])
def test_gsm8k_broken_line_names_file_and_line(tmp_path, bad, what):
    path = write_jsonl(tmp_path, "test.jsonl", [GOOD, "", bad])
    with pytest.raises(ClpdError) as e:
        gsm8k.load("test", gsm8k_cfg(tmp_path))
    msg = str(e.value)
    assert f"{path}:3:" in msg and what in msg and "\n" not in msg


def test_gsm8k_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ClpdError) as e:
        gsm8k.load("test", gsm8k_cfg(tmp_path / "nope"))
    assert str(e.value) == f"benchmark.data_dir={tmp_path / 'nope'}: no such folder"


def test_gsm8k_missing_split_lists_the_splits_there(tmp_path):
    write_jsonl(tmp_path, "train.jsonl", [GOOD])
    write_jsonl(tmp_path, "test_socratic.jsonl", [GOOD])
    with pytest.raises(ClpdError) as e:
        gsm8k.load("test", gsm8k_cfg(tmp_path))
    msg = str(e.value)
    assert "test.jsonl" in msg and "test_socratic, train" in msg and "\n" not in msg


def test_gsm8k_hub_failure_is_a_clpd_error_pointing_at_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ClpdError) as e:
        gsm8k.load("test", BenchmarkConfig(name=BenchmarkName.gsm8k))
    msg = str(e.value)
    assert "openai/gsm8k" in msg and "benchmark.data_dir=PATH" in msg and "\n" not in msg


def test_gsm8k_hub_rows_become_problems(monkeypatch):
    import datasets

    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        return [json.loads(GOOD)]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    problems = gsm8k.load("test", BenchmarkConfig(name=BenchmarkName.gsm8k))
    assert calls == [("openai/gsm8k", "main", "test")]
    assert problems[0].id == "gsm8k-test-0" and problems[0].answer == "1000"


@pytest.fixture(scope="module")
def real_gsm8k():
    needs(GSM8K_DIR)
    cfg = gsm8k_cfg(GSM8K_DIR)
    return gsm8k.load("train", cfg), gsm8k.load("test", cfg)


def test_gsm8k_real_sizes_and_unique_ids(real_gsm8k):
    train, test = real_gsm8k
    assert (len(train), len(test)) == (7473, 1319)
    for split in real_gsm8k:
        assert len({p.id for p in split}) == len(split)
        assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in split)
        assert all(p.num_steps >= 1 for p in split)


def test_gsm8k_gold_solutions_score_100_percent_strict_and_flexible(real_gsm8k):
    _, test = real_gsm8k
    for p in test:
        output = " " + p.solution  # lm-eval's target delimiter is a space
        assert is_correct(extract_strict(output), p.answer), p.id
        assert is_correct(extract_flexible(output), p.answer), p.id


# --------------------------------------------------------------------------- svamp


@pytest.fixture(scope="module")
def real_svamp():
    needs(SVAMP_DIR)
    return svamp.load("test", BenchmarkConfig(name=BenchmarkName.svamp, data_dir=str(SVAMP_DIR)))


def test_svamp_has_1000_numeric_problems(real_svamp):
    assert len(real_svamp) == 1000
    assert len({p.id for p in real_svamp}) == 1000 and real_svamp[0].id == "svamp-chal-1"
    for p in real_svamp:
        float(p.answer)
        assert not p.answer.endswith(".0")
        assert p.solution == f"#### {p.answer}" and p.num_steps in (1, 2) and p.source == "svamp"


def test_svamp_question_is_body_then_question(real_svamp):
    p = real_svamp[0]
    assert p.question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
                          "How much do you have to pay to buy each pack?")
    assert p.answer == "51"


def test_svamp_data_dir_may_be_the_json_file(real_svamp):
    cfg = BenchmarkConfig(name=BenchmarkName.svamp, data_dir=str(SVAMP_DIR / "SVAMP.json"))
    assert svamp.load("whatever", cfg) == real_svamp


def test_svamp_answers_compare_numerically(real_svamp):
    assert is_correct("51.0", real_svamp[0].answer, numeric=True)
    assert is_correct("51", "51.0", numeric=True)
    assert not is_correct("51", "51.0")  # strings differ: SVAMP needs numeric=True
    assert not is_correct("50", real_svamp[0].answer, numeric=True)


def test_svamp_number_formatting():
    assert svamp.format_number(51.0) == "51" and svamp.format_number(2.5) == "2.5"
    assert svamp.format_number(-3.0) == "-3"


def test_svamp_without_data_dir_says_it_is_local_only():
    with pytest.raises(ClpdError, match="local-only.*benchmark.data_dir"):
        svamp.load("test", BenchmarkConfig(name=BenchmarkName.svamp))


def test_svamp_missing_file(tmp_path):
    with pytest.raises(ClpdError, match="no SVAMP.json"):
        svamp.load("test", BenchmarkConfig(name=BenchmarkName.svamp, data_dir=str(tmp_path)))


def test_svamp_bad_json_names_the_file(tmp_path):
    (tmp_path / "SVAMP.json").write_text('[{"ID": "x",', encoding="utf-8")
    with pytest.raises(ClpdError) as e:
        svamp.load("test", BenchmarkConfig(name=BenchmarkName.svamp, data_dir=str(tmp_path)))
    assert str(tmp_path / "SVAMP.json") in str(e.value)


# --------------------------------------------------------------------------- dispatch


def test_loaders_is_a_dict_of_the_three_benchmarks():
    assert set(LOADERS) == {b.value for b in BenchmarkName}


def test_load_problems_dispatches_on_the_name_and_keeps_the_first_limit():
    cfg = small(test_size=30)
    some = load_problems(cfg, "test", limit=5)
    assert some == arith.generate("test", cfg)[:5] and all(isinstance(p, Problem) for p in some)
    assert len(load_problems(cfg, "test")) == 30


def test_load_problems_accepts_a_plain_string_name(tmp_path):
    write_jsonl(tmp_path, "test.jsonl", [GOOD] * 3)
    cfg = gsm8k_cfg(tmp_path)
    cfg.name = "gsm8k"
    assert [p.id for p in load_problems(cfg, "test", limit=2)] == ["gsm8k-test-0", "gsm8k-test-1"]


def test_load_problems_unknown_name_lists_the_valid_ones():
    cfg = small()
    cfg.name = "math"
    with pytest.raises(ClpdError, match="arith, gsm8k, svamp"):
        load_problems(cfg, "test")
