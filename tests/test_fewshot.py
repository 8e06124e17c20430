"""Few-shot evaluation prompts (``benchmark.num_fewshot``) as lm-evaluation-harness builds gsm8k's,
the chat stop strings, and the prompt and throughput fields of the eval metrics."""

from __future__ import annotations

import random

import pytest
import torch

from clpd.config.enums import Arch, BenchmarkName
from clpd.config.schema import BenchmarkConfig
from clpd.config.model import ModelConfig
from clpd.data import load_problems
from clpd.data.prompts import CHAT_STOP_STRINGS, FEWSHOT_DELIMITER, STOP_STRINGS, cut_at_stop, draw_fewshot, prompt_text, stop_strings
from clpd.data.records import Problem
from clpd.errors import ClpdError
from clpd.evaluation.evaluate import answer_length, evaluate
from clpd.models.load import load_model, load_tokenizer
from tests.conftest import GSM8K_DIR, needs
from tests.test_prompts import CHAT, PROBLEM


def problems(n: int, split: str = "train") -> list:
    return [Problem(id=f"p-{split}-{i}", question=f"q{i}?", solution=f"s{i}\n#### {i}", answer=str(i), num_steps=1,
                    source="arith") for i in range(n)]


def test_the_shots_are_lm_evals_draw_one_random_sample_per_question_in_order():
    pool, questions = problems(50), problems(4, "test")
    shots = draw_fewshot(questions, pool, 5, seed=1234)
    rnd = random.Random(1234)  # lm-eval's default sampler: rnd.sample(docs, k) for each doc in turn
    assert shots == [rnd.sample(pool, 5) for _ in questions]
    assert draw_fewshot(questions[:2], pool, 5, seed=1234) == shots[:2]  # eval_limit does not change the first ones
    assert draw_fewshot(questions, pool, 0) == [[], [], [], []]


def test_shots_from_the_evaluated_split_never_show_the_question_itself():
    pool = problems(6)
    for question, shots in zip(pool, draw_fewshot(pool, pool, 5, seed=0, same_split=True)):
        assert len(shots) == 5 and question not in shots
    with pytest.raises(ClpdError, match="num_fewshot=6: the few-shot split has only 6 problems"):
        draw_fewshot(pool, pool, 6, same_split=True)


def test_a_plain_few_shot_prompt_is_lm_evals_gsm8k_context():
    shots = problems(2)
    text = prompt_text(PROBLEM, None, False, shots)
    assert text == ("Question: q0?\nAnswer: s0\n#### 0\n\nQuestion: q1?\nAnswer: s1\n#### 1\n\n"
                    f"Question: {PROBLEM.question}\nAnswer:")
    assert FEWSHOT_DELIMITER == "\n\n" and prompt_text(PROBLEM, None, False) == f"Question: {PROBLEM.question}\nAnswer:"


def test_a_chat_few_shot_prompt_is_one_turn_per_example(chat_tok):
    text = prompt_text(PROBLEM, chat_tok, True, problems(1))
    assert text == ("<|im_start|>user\nq0?<|im_end|>\n<|im_start|>assistant\ns0\n#### 0<|im_end|>\n"
                    f"<|im_start|>user\n{PROBLEM.question}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def chat_tok():
    tok = load_tokenizer(ModelConfig(name="char"))
    tok.chat_template = CHAT
    return tok


def test_chat_answers_are_not_cut_at_a_blank_line():
    answer = "First, 3 + 4 = 7.\n\nSo the answer is 7.\n#### 7"
    assert cut_at_stop(answer, stop_strings(True)) == answer
    assert cut_at_stop(answer, stop_strings(False)) == "First, 3 + 4 = 7."
    assert stop_strings(False) == STOP_STRINGS and "\n\n" not in CHAT_STOP_STRINGS


def test_answer_length_counts_up_to_and_with_the_first_end_token():
    assert answer_length([5, 6, 2, 2, 2], {2}) == 3
    assert answer_length([5, 6, 7], {2}) == 3


def test_eval_metrics_say_how_the_model_was_asked_and_how_fast_it_answered():
    spec = ModelConfig(name="t", arch=Arch.llama, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                       max_position_embeddings=1024)
    tok = load_tokenizer(spec)
    torch.manual_seed(0)
    model = load_model(spec, tok)
    bench = BenchmarkConfig(name=BenchmarkName.arith, train_size=20, test_size=3, num_fewshot=2)
    test = load_problems(bench, "test")
    records, metrics = evaluate(model, tok, test, bench, batch_size=2, max_new_tokens=5, device=torch.device("cpu"))
    assert metrics["prompt"]["format"] == "plain" and metrics["prompt"]["num_fewshot"] == 2
    assert metrics["prompt"]["mean_tokens"] > 2 * len("Question: ")  # the examples are in the prompt
    g = metrics["generation"]
    assert g["new_tokens"] == sum(r["new_tokens"] for r in records) and 3 <= g["new_tokens"] <= 15
    assert g["problems_per_s"] > 0 and g["tokens_per_s"] > 0 and g["peak_rss_mb"] > 10 and g["batch_size"] == 2


def test_five_shot_gsm8k_prompts_draw_from_the_train_split():
    bench = BenchmarkConfig(name=BenchmarkName.gsm8k, data_dir=str(needs(GSM8K_DIR)), num_fewshot=5)
    test, train = load_problems(bench, "test", 3), load_problems(bench, "train")
    shots = draw_fewshot(test, train, 5, bench.fewshot_seed)
    assert all(len(s) == 5 and all(x.id.startswith("gsm8k-train-") for x in s) for s in shots)
    text = prompt_text(test[0], None, False, shots[0])
    assert text.count("Question: ") == 6 and text.endswith(f"Question: {test[0].question}\nAnswer:")
    assert text.count("\n#### ") == 5  # each example ends with its answer line, as lm-eval's doc_to_target
