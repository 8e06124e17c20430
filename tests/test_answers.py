"""Answer extraction and matching: lm-evaluation-harness's gsm8k strict-match and flexible-extract."""

from __future__ import annotations

import pytest

from clpd.evaluation.answers import extract_flexible, extract_strict, is_correct, normalize


def test_strict_takes_the_number_after_the_first_hashes():
    assert extract_strict("So 3+4 = 7\n#### 7\n#### 9") == "7"


def test_strict_needs_hashes_and_a_space():
    assert extract_strict("The answer is 7") is None
    assert extract_strict("####7") is None


def test_strict_keeps_commas_and_minus():
    assert extract_strict("#### -1,250") == "-1,250"


def test_flexible_takes_the_last_number():
    assert extract_flexible("She had 12 and gave 5, so 7 are left.\n#### 7") == "7"
    assert extract_flexible("3 apples plus 4 apples is 7 apples") == "7"


def test_flexible_keeps_dollar_commas_and_period_that_normalize_removes():
    text = "The total is $1,000."
    assert extract_flexible(text) == "$1,000."
    assert normalize(extract_flexible(text)) == "1000"
    assert is_correct(extract_flexible(text), "1000")


def test_flexible_single_digit_and_negative():
    assert extract_flexible("x is 5") == "5"
    assert extract_flexible("it drops to -3") == "-3"
    assert is_correct(extract_flexible("the change is -12."), "-12")


def test_flexible_matches_any_two_number_characters_like_lm_eval():
    # "(-?[$0-9.,]{2,})" also matches ".." -- lm-eval has the same quirk, so we keep it
    assert extract_flexible("7 then ..") == ".."


def test_no_number_gives_none_and_none_is_wrong():
    assert extract_strict("no idea") is None and extract_flexible("no idea") is None
    assert not is_correct(None, "7")
    assert not is_correct(None, "7", numeric=True)


@pytest.mark.parametrize("raw, expected", [
    ("1,000", "1000"), ("$5", "5"), ("5.", "5"), ("5.5", "5.5"), ("-3", "-3"), (" 7 ", "7"),
    ("It is 2+2=4\n#### 4", "4"), ("ABC", "abc"),
])
def test_normalize_is_lm_eval_exact_match_preprocessing(raw, expected):
    assert normalize(raw) == expected


def test_normalize_removes_only_one_trailing_period():
    assert normalize("5..") == "5."


def test_trailing_period_on_the_prediction_is_ignored():
    assert is_correct("18.", "18")


def test_decimals_are_not_rounded_in_string_mode():
    assert not is_correct("18.0", "18")
    assert is_correct("18.0", "18", numeric=True)


def test_numeric_mode_tolerance_and_garbage():
    assert is_correct("2.5000001", "2.5", numeric=True)
    assert not is_correct("2.51", "2.5", numeric=True)
    assert not is_correct("1.2.3", "1.2", numeric=True)
    assert is_correct("$1,000.", "1000.0", numeric=True)
