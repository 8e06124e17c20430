"""Difficulty scorers, rank fusion, the training order, and the score cache."""

from __future__ import annotations

import json
from enum import Enum

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpd.config.model import ModelConfig
from clpd.curriculum.order import order_indices
from clpd.curriculum.score_cache import load_scores, save_scores
from clpd.curriculum.scorers import cot_length, cot_steps, per_example_loss, random_scores, rrf
from clpd.data.records import IGNORE_INDEX
from clpd.data.prompts import encode_example
from clpd.data.records import Problem
from clpd.models.load import load_model, load_tokenizer

PROBLEMS = [
    Problem("t-0", "What is 2 + 3?", "2 + 3 = <<2+3=5>>5\n#### 5", "5", 1, "arith"),
    Problem("t-1", "What is 12 * 4 - 7?", "12 * 4 = <<12*4=48>>48\n48 - 7 = <<48-7=41>>41\n#### 41", "41", 2, "arith"),
    Problem("t-2", "A box has 9 pens. Tom adds 8, then gives 5 away. How many are left?",
            "9 + 8 = <<9+8=17>>17\n17 - 5 = <<17-5=12>>12\n#### 12", "12", 2, "arith"),
    Problem("t-3", "What is (6 + 1) * 3 - 4 / 2?",
            "6 + 1 = <<6+1=7>>7\n7 * 3 = <<7*3=21>>21\n4 / 2 = <<4/2=2>>2\n21 - 2 = <<21-2=19>>19\n#### 19", "19", 4, "arith"),
]


# ---------------------------------------------------------------------------------------------
# Cheap scorers
# ---------------------------------------------------------------------------------------------

def test_cot_steps_is_the_number_of_reasoning_steps_of_each_problem():
    scores = cot_steps(PROBLEMS)
    assert scores.dtype == np.float64 and scores.tolist() == [1.0, 2.0, 2.0, 4.0]


def test_cot_length_counts_the_answer_tokens_of_each_example():
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], "truncated": False},
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "truncated": False},
        {"input_ids": [5, 6], "labels": [IGNORE_INDEX, IGNORE_INDEX], "truncated": True},
    ]
    assert cot_length(examples).tolist() == [3.0, 2.0, 0.0]


def test_cot_length_of_encoded_problems_is_the_solution_characters_plus_space_and_eos():
    tokenizer = load_tokenizer(ModelConfig(name="t"))  # the char tokenizer: one token per character
    examples = [encode_example(p, tokenizer, chat_template=False, max_len=512) for p in PROBLEMS]
    assert cot_length(examples).tolist() == [len(" " + p.solution) + 1 for p in PROBLEMS]


def test_random_scores_are_seeded():
    assert random_scores(5, 3).tolist() == random_scores(5, 3).tolist()
    assert random_scores(5, 3).tolist() != random_scores(5, 4).tolist()
    assert len(random_scores(0, 1)) == 0


# ---------------------------------------------------------------------------------------------
# Reciprocal rank fusion
# ---------------------------------------------------------------------------------------------

def test_rrf_sums_reciprocal_ranks_with_k_60():
    # Scorer a ranks the examples 1, 2, 3 (easy to hard); scorer b ranks them 3, 1, 2.
    # Fused easiness: e0 = 1/61 + 1/63 = 0.03226646, e1 = 1/62 + 1/61 = 0.03252247, e2 = 1/63 + 1/62 = 0.03200205.
    fused = rrf([np.array([10.0, 20.0, 30.0]), np.array([0.9, 0.1, 0.5])])
    assert fused == pytest.approx([-(1 / 61 + 1 / 63), -(1 / 62 + 1 / 61), -(1 / 63 + 1 / 62)], abs=1e-15)
    assert fused == pytest.approx([-0.0322664585, -0.0325224748, -0.0320020481], abs=1e-10)
    assert np.argsort(fused).tolist() == [1, 0, 2]  # example 1 is the easiest, example 2 the hardest


def test_rrf_gives_tied_examples_the_average_of_their_ranks():
    # a = [1, 1, 2]: ranks 1.5, 1.5, 3.  b = [3, 2, 1]: ranks 3, 2, 1.
    # e0 = 1/61.5 + 1/63 = 0.03213318, e1 = 1/61.5 + 1/62 = 0.03238919, e2 = 1/63 + 1/61 = 0.03226646.
    fused = rrf([np.array([1, 1, 2]), np.array([3, 2, 1])])
    assert fused == pytest.approx([-(1 / 61.5 + 1 / 63), -(1 / 61.5 + 1 / 62), -(1 / 63 + 1 / 61)], abs=1e-15)
    assert fused == pytest.approx([-0.0321331785, -0.0323891949, -0.0322664585], abs=1e-10)


def test_rrf_of_one_scorer_keeps_its_order_and_k_changes_the_numbers():
    scores = np.array([0.3, 0.1, 0.7, 0.2])
    assert np.argsort(rrf([scores])).tolist() == np.argsort(scores).tolist()
    assert rrf([scores], k=0) == pytest.approx([-1 / 3, -1 / 1, -1 / 4, -1 / 2])


def test_rrf_refuses_arrays_of_different_lengths_nan_and_negative_k():
    with pytest.raises(ValueError, match="length 3"):
        rrf([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError, match="NaN"):
        rrf([np.array([1.0, np.nan])])
    with pytest.raises(ValueError, match="k="):
        rrf([np.zeros(2)], k=-1)
    with pytest.raises(ValueError, match="at least one"):
        rrf([])


# ---------------------------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------------------------

def test_easy_to_hard_sorts_by_ascending_difficulty_and_hard_to_easy_by_descending():
    scores = [0.5, 0.1, 0.9, 0.3]
    assert order_indices(scores, "easy_to_hard", seed=0) == [1, 3, 0, 2]
    assert order_indices(scores, "hard_to_easy", seed=0) == [2, 0, 3, 1]


def test_random_order_is_a_seeded_permutation_that_ignores_the_scores():
    a = order_indices([0.0] * 20, "random", seed=1)
    assert sorted(a) == list(range(20))
    assert order_indices(list(range(20)), "random", seed=1) == a
    assert order_indices([0.0] * 20, "random", seed=2) != a


def test_ties_are_broken_the_same_way_for_a_seed_and_can_differ_for_another():
    scores = [2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    orders = {seed: order_indices(scores, "easy_to_hard", seed) for seed in range(6)}
    for seed, order in orders.items():
        assert order == order_indices(scores, "easy_to_hard", seed)
        assert {scores[i] for i in order[:6]} == {1} and {scores[i] for i in order[6:]} == {2}
    assert len({tuple(o) for o in orders.values()}) > 1


def test_unknown_order_is_refused_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown order 'shuffled'; allowed: easy_to_hard, hard_to_easy, random"):
        order_indices([1.0], "shuffled", seed=0)


def test_a_str_enum_names_an_order_like_its_value():
    class Order(str, Enum):
        hard_to_easy = "hard_to_easy"

    assert order_indices([1, 3, 2], Order.hard_to_easy, seed=0) == [1, 2, 0]


# ---------------------------------------------------------------------------------------------
# Loss under a model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    # The training runs keep both cores busy; two torch threads fighting over them make a tiny
    # model's step ~100x slower than one thread does.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model_and_examples():
    spec = ModelConfig(name="t", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    model = load_model(spec, tokenizer)
    examples = [encode_example(p, tokenizer, chat_template=False, max_len=512) for p in PROBLEMS]
    return model, tokenizer, examples


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model_and_examples()


def reference_loss(model, example) -> float:
    """The mean answer-token cross-entropy of one example alone: no batch, no padding."""
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX).item()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_per_example_loss_in_batches_equals_one_example_at_a_time(tiny, packed):
    model, tokenizer, examples = tiny
    assert len({len(e["input_ids"]) for e in examples}) == len(examples)  # lengths differ: batches are padded
    expected = [reference_loss(model, e) for e in examples]
    for batch_size in (1, 3, 8):
        got = per_example_loss(model, examples, batch_size=batch_size, device="cpu", pad_id=tokenizer.pad_token_id,
                               packed=packed)
        assert got == pytest.approx(expected, abs=1e-5)


def test_per_example_loss_restores_training_mode_and_scores_no_answer_tokens_as_zero(tiny):
    model, tokenizer, examples = tiny
    cut = {"input_ids": examples[0]["input_ids"][:5], "labels": [IGNORE_INDEX] * 5, "truncated": True}
    model.train()
    got = per_example_loss(model, [cut, examples[1]], batch_size=2, device="cpu", pad_id=tokenizer.pad_token_id)
    assert model.training
    packed = per_example_loss(model, [cut, examples[1]], batch_size=2, device="cpu", pad_id=tokenizer.pad_token_id,
                              packed=True)
    assert packed == pytest.approx(got, abs=1e-5)
    assert got[0] == 0.0 and got[1] == pytest.approx(reference_loss(model, examples[1]), abs=1e-5)


def test_an_example_the_model_memorised_gets_the_lowest_loss():
    model, tokenizer, examples = _tiny_model_and_examples()  # a fresh model: this test trains it
    memorised = 2
    ids = torch.tensor([examples[memorised]["input_ids"]])
    labels = torch.tensor(examples[memorised]["labels"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        logits = model(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    losses = per_example_loss(model, examples, batch_size=4, device="cpu", pad_id=tokenizer.pad_token_id)
    assert int(np.argmin(losses)) == memorised
    assert losses[memorised] < 0.5 * min(np.delete(losses, memorised))


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

META = {"scorer": "student_loss", "model": "tiny", "data": "abc123", "num_examples": 3}


def test_saved_scores_load_back_exactly_for_the_same_meta(tmp_path):
    scores = np.array([0.1, 1 / 3, 2.718281828459045])
    path = tmp_path / "cache" / "scores.json"
    save_scores(path, scores, META)
    loaded = load_scores(path, dict(META))
    assert loaded is not None and loaded.tolist() == scores.tolist()
    assert json.loads(path.read_text())["meta"] == META
    assert [p.name for p in path.parent.iterdir()] == ["scores.json"]  # no temporary file left behind


@pytest.mark.parametrize("change", [{"scorer": "teacher_loss"}, {"model": "other"}, {"data": "def456"},
                                    {"num_examples": 4}, {"extra": 1}])
def test_cached_scores_are_ignored_when_the_meta_changed(tmp_path, change):
    path = tmp_path / "scores.json"
    save_scores(path, np.zeros(3), META)
    assert load_scores(path, {**META, **change}) is None


def test_a_missing_or_corrupt_cache_loads_as_none(tmp_path):
    assert load_scores(tmp_path / "absent.json", META) is None
    (tmp_path / "bad.json").write_text('{"meta": ')
    assert load_scores(tmp_path / "bad.json", META) is None


def test_saving_again_replaces_the_cache(tmp_path):
    path = tmp_path / "scores.json"
    save_scores(path, np.zeros(3), META)
    save_scores(path, np.ones(3), META)
    assert load_scores(path, META).tolist() == [1.0, 1.0, 1.0]
