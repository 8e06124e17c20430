"""Prompt format, tokenization with a loss mask, and stop strings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from clpd.data.records import IGNORE_INDEX
from clpd.data.prompts import PROMPT, STOP_STRINGS, cut_at_stop, encode_example, encode_prompt, prompt_text, target_text
from clpd.data.records import Problem
from clpd.errors import ClpdError

GPT2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"

PROBLEM = Problem(id="arith-test-0", question="Ava has 7 pens. She buys 5 more. How many pens does Ava have now?",
                  solution="She buys 5: 7+5 = <<7+5=12>>12\n#### 12", answer="12", num_steps=1, source="arith")

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    if not GPT2.exists():
        pytest.skip(f"{GPT2} not present (the shared tokenizers live next to the repository)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2))


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT
    return t


def test_plain_prompt_is_lm_eval_gsm8k_format(tok):
    assert PROMPT == "Question: {question}\nAnswer:"
    assert prompt_text(PROBLEM, tok, False) == f"Question: {PROBLEM.question}\nAnswer:"


def test_plain_target_starts_with_the_space_delimiter():
    assert target_text(PROBLEM, False) == " " + PROBLEM.solution
    assert target_text(PROBLEM, True) == PROBLEM.solution


def test_decode_is_prompt_plus_target_plus_eos(tok):
    ex = encode_example(PROBLEM, tok, False, max_len=512)
    assert tok.decode(ex["input_ids"]) == prompt_text(PROBLEM, tok, False) + target_text(PROBLEM, False) + tok.eos_token
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["truncated"] is False


def test_no_bos_is_added(tok):
    # GPT-2's bos is its eos: the only one must be the last token
    ex = encode_example(PROBLEM, tok, False, max_len=512)
    assert ex["input_ids"].count(tok.eos_token_id) == 1


def test_labels_are_ignored_exactly_on_the_prompt(tok):
    ex = encode_example(PROBLEM, tok, False, max_len=512)
    prompt = encode_prompt(PROBLEM, tok, False)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and IGNORE_INDEX not in labels[len(prompt):]
    assert tok.decode(ids[len(prompt):]) == " " + PROBLEM.solution + tok.eos_token


def test_an_example_longer_than_max_len_is_dropped_by_default(tok):
    full = encode_example(PROBLEM, tok, False, max_len=512)
    n = len(full["input_ids"])
    exact = encode_example(PROBLEM, tok, False, max_len=n)
    assert exact["truncated"] is False and exact["input_ids"] == full["input_ids"]
    assert encode_example(PROBLEM, tok, False, max_len=n - 3) is None


def test_truncate_left_cuts_the_prompts_start_and_keeps_the_whole_answer(tok):
    full = encode_example(PROBLEM, tok, False, max_len=512)
    n = len(full["input_ids"])
    cut = encode_example(PROBLEM, tok, False, max_len=n - 3, overlong="truncate_left")
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][3:] and cut["labels"] == full["labels"][3:]
    answer = sum(1 for t in full["labels"] if t != IGNORE_INDEX)
    assert encode_example(PROBLEM, tok, False, max_len=answer, overlong="truncate_left") is None  # no prompt left


def test_chat_template_wraps_the_question(chat_tok):
    text = prompt_text(PROBLEM, chat_tok, True)
    assert text == f"<|im_start|>user\n{PROBLEM.question}<|im_end|>\n<|im_start|>assistant\n"
    ex = encode_example(PROBLEM, chat_tok, True, max_len=512)
    prompt = encode_prompt(PROBLEM, chat_tok, True)
    assert chat_tok.decode(ex["input_ids"]) == text + PROBLEM.solution + chat_tok.eos_token
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_chat_template_missing_names_the_tokenizer(tok):
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(ClpdError, match="gpt2.*no chat template"):
        prompt_text(PROBLEM, tok, True)


def test_stop_strings_are_lm_eval_until():
    assert STOP_STRINGS == ["Question:", "</s>", "<|im_end|>", "\n\n"]


@pytest.mark.parametrize("text, expected", [
    (" 7+5 = <<7+5=12>>12\n#### 12\n\nQuestion: Ben has", " 7+5 = <<7+5=12>>12\n#### 12"),
    (" #### 3Question: next", " #### 3"),
    (" #### 3</s>junk", " #### 3"),
    (" #### 3<|im_end|>", " #### 3"),
    (" #### 3", " #### 3"),
    ("Question: at once", ""),
])
def test_cut_at_stop_truncates_at_the_first_stop_string(text, expected):
    assert cut_at_stop(text) == expected
