"""Pacing functions: the shape every one of them must have, the published formulas at hand-computed
points, the baby-steps buckets, pool sizes, and the refusal of bad arguments."""

from __future__ import annotations

import math
import re
from enum import Enum

import pytest

from clpd.curriculum.pacing import PACING, pacing_fraction, pool_size
from clpd.curriculum.sampler import Sampler

NAMES = ["none", "linear", "root", "quadratic", "exponential", "log", "geometric", "step"]
STARTS = [0.01, 0.1, 0.25, 0.5, 0.9, 1.0]
SATURATES = [0.1, 0.3, 0.5, 0.8, 1.0]
PROGRESS = [i / 200 for i in range(201)]
EXTRA = [dict(root_p=1.0, num_buckets=2), dict(root_p=2.0, num_buckets=4), dict(root_p=3.5, num_buckets=7)]


def curve(name, start, saturate, **extra):
    points = sorted(set(PROGRESS) | {saturate})
    return points, [pacing_fraction(name, p, start=start, saturate=saturate, **extra) for p in points]


def test_the_pacing_dict_holds_exactly_the_documented_names():
    assert list(PACING) == NAMES


# ---------------------------------------------------------------------------------------------
# Properties of every pacing function over a grid of (start, saturate, root_p, num_buckets)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_pacing_stays_within_start_and_one(name):
    for start in STARTS:
        for saturate in SATURATES:
            for extra in EXTRA:
                _, values = curve(name, start, saturate, **extra)
                assert all(start <= v <= 1.0 for v in values), (start, saturate, extra)


@pytest.mark.parametrize("name", NAMES)
def test_every_pacing_is_non_decreasing_in_progress(name):
    for start in STARTS:
        for saturate in SATURATES:
            for extra in EXTRA:
                _, values = curve(name, start, saturate, **extra)
                assert all(a <= b for a, b in zip(values, values[1:])), (start, saturate, extra)


@pytest.mark.parametrize("name", NAMES)
def test_every_pacing_starts_at_the_start_fraction_and_none_at_one(name):
    for start in STARTS:
        for saturate in SATURATES:
            for extra in EXTRA:
                value = pacing_fraction(name, 0.0, start=start, saturate=saturate, **extra)
                assert value == (1.0 if name == "none" else start)


@pytest.mark.parametrize("name", NAMES)
def test_every_pacing_is_exactly_one_from_saturate_on(name):
    for start in STARTS:
        for saturate in SATURATES:
            for extra in EXTRA:
                points, values = curve(name, start, saturate, **extra)
                assert all(v == 1.0 for p, v in zip(points, values) if p >= saturate), (start, saturate, extra)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("none", "step")])
def test_every_continuous_pacing_is_below_one_just_before_saturate(name):
    # The full set arrives at saturate, not earlier (step reaches it one bucket early: see below).
    assert pacing_fraction(name, 0.49, start=0.1, saturate=0.5) < 1.0


@pytest.mark.parametrize("name", NAMES)
def test_start_one_means_everything_from_the_first_step(name):
    assert all(v == 1.0 for v in curve(name, 1.0, 0.5)[1])


# ---------------------------------------------------------------------------------------------
# The formulas, at points computed by hand
# ---------------------------------------------------------------------------------------------

def test_linear_is_platanios_linear_competence():
    # c(t) = min(1, t (1 - c0) / T + c0); c0 = 0.01, T = 100.
    # t = 50: 50 * 0.99 / 100 + 0.01 = 0.505.   t = 25: 0.2475 + 0.01 = 0.2575.
    assert pacing_fraction("linear", 0.5, start=0.01, saturate=1.0) == pytest.approx(0.505, abs=1e-12)
    assert pacing_fraction("linear", 0.25, start=0.01, saturate=1.0) == pytest.approx(0.2575, abs=1e-12)
    # T is saturate * (training length): T = 50 of 100 steps, t = 25 is half way, 0.505 again.
    assert pacing_fraction("linear", 0.25, start=0.01, saturate=0.5) == pytest.approx(0.505, abs=1e-12)


def test_root_is_platanios_root_p_competence():
    # c(t) = min(1, (t (1 - c0^p) / T + c0^p)^(1/p)).
    # p = 2 ("sqrt"), c0 = 0.01, T = 100, t = 50: sqrt(0.5 * 0.9999 + 0.0001) = sqrt(0.50005) = 0.70714213564...
    assert pacing_fraction("root", 0.5, start=0.01, saturate=1.0) == pytest.approx(0.7071421356, abs=1e-9)
    # p = 2, c0 = 0.1, t = 25: sqrt(0.25 * 0.99 + 0.01) = sqrt(0.2575) = 0.50744457825...
    assert pacing_fraction("root", 0.25, start=0.1, saturate=1.0) == pytest.approx(0.5074445783, abs=1e-9)
    # p = 3, c0 = 0.1, t = 50: (0.5 * 0.999 + 0.001)^(1/3) = 0.5005^(1/3) = 0.79396500468...
    assert pacing_fraction("root", 0.5, start=0.1, saturate=1.0, root_p=3.0) == pytest.approx(0.7939650047, abs=1e-9)


def test_root_with_p_one_is_linear():
    for p in PROGRESS:
        assert pacing_fraction("root", p, start=0.2, saturate=0.8, root_p=1.0) == pytest.approx(
            pacing_fraction("linear", p, start=0.2, saturate=0.8), abs=1e-12)


def test_quadratic_exponential_log_and_geometric_at_half_way():
    # quadratic, c0 = 0.1: 0.1 + 0.9 * 0.5^2 = 0.325
    assert pacing_fraction("quadratic", 0.5, start=0.1, saturate=1.0) == pytest.approx(0.325, abs=1e-12)
    # exponential, a = 5: 0.1 + 0.9 * (e^2.5 - 1) / (e^5 - 1) = 0.1 + 0.9 * 11.18249 / 147.41316 = 0.168272
    assert pacing_fraction("exponential", 0.5, start=0.1, saturate=1.0) == pytest.approx(0.168272, abs=1e-6)
    # log: 0.1 + 0.9 * ln(1 + (e - 1) / 2) = 0.1 + 0.9 * ln(1.859141) = 0.1 + 0.9 * 0.620115 = 0.658103
    assert pacing_fraction("log", 0.5, start=0.1, saturate=1.0) == pytest.approx(0.658103, abs=1e-6)
    # geometric, c0 = 0.2: 0.2^(1 - 0.5) = 0.4472136; at a quarter: 0.2^0.75 = 0.2990698
    assert pacing_fraction("geometric", 0.5, start=0.2, saturate=1.0) == pytest.approx(0.4472136, abs=1e-7)
    assert pacing_fraction("geometric", 0.25, start=0.2, saturate=1.0) == pytest.approx(0.2990698, abs=1e-7)


def test_geometric_grows_by_a_constant_factor_per_equal_stretch_of_progress():
    values = [pacing_fraction("geometric", p, start=0.01, saturate=1.0) for p in (0.0, 0.25, 0.5, 0.75)]
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([0.01 ** -0.25] * 3)  # 100^(1/4) = 3.1623 each quarter


def test_slow_start_and_fast_start_functions_are_on_their_side_of_linear():
    args = dict(start=0.1, saturate=1.0)
    lin = pacing_fraction("linear", 0.5, **args)
    assert pacing_fraction("exponential", 0.5, **args) < pacing_fraction("quadratic", 0.5, **args) < lin
    assert pacing_fraction("geometric", 0.5, **args) < lin
    assert pacing_fraction("root", 0.5, **args) > lin and pacing_fraction("log", 0.5, **args) > lin


# ---------------------------------------------------------------------------------------------
# Baby steps
# ---------------------------------------------------------------------------------------------

def test_step_with_start_one_over_b_adds_b_equal_buckets_in_b_equal_stretches():
    # B = 4, start = 1/4: 1/4 of the data on [0, 1/4) of the ramp, 2/4 on [1/4, 1/2), 3/4 on [1/2, 3/4), all after.
    f = lambda p: pacing_fraction("step", p, start=0.25, saturate=1.0, num_buckets=4)  # noqa: E731
    assert [f(p) for p in (0.0, 0.2, 0.25, 0.49, 0.5, 0.74, 0.75, 0.9, 1.0)] == \
        [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0, 1.0]


def test_step_splits_what_the_start_set_leaves_into_b_minus_one_equal_buckets():
    # B = 4, start = 0.1: levels 0.1, 0.1 + 0.9/3 = 0.4, 0.7, 1.0; saturate 0.8 stretches the ramp over 80% of training.
    f = lambda p: pacing_fraction("step", p, start=0.1, saturate=0.8, num_buckets=4)  # noqa: E731
    assert [f(p) for p in (0.0, 0.19, 0.2, 0.39, 0.4, 0.59, 0.6, 0.8, 1.0)] == pytest.approx(
        [0.1, 0.1, 0.4, 0.4, 0.7, 0.7, 1.0, 1.0, 1.0])


def test_step_with_two_buckets_is_bengio_two_stage_curriculum():
    f = lambda p: pacing_fraction("step", p, start=0.3, saturate=1.0, num_buckets=2)  # noqa: E731
    assert [f(p) for p in (0.0, 0.49, 0.5, 1.0)] == [0.3, 0.3, 1.0, 1.0]


def test_step_takes_exactly_num_buckets_distinct_values():
    for b in (2, 3, 5, 8):
        assert len(set(curve("step", 0.05, 0.7, num_buckets=b)[1])) == b


# ---------------------------------------------------------------------------------------------
# Pool sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_pool_size_is_monotone_within_one_and_n_and_full_from_saturate(name):
    for n in (1, 7, 100):
        for start in (0.001, 0.1, 0.5):
            sizes = [pool_size(name, s, 40, n, start=start, saturate=0.75) for s in range(41)]
            assert all(1 <= z <= n for z in sizes)
            assert all(a <= b for a, b in zip(sizes, sizes[1:]))
            assert all(z == n for s, z in enumerate(sizes) if s >= 30)  # 30 / 40 = saturate


def test_pool_size_is_the_ceiling_of_the_fraction_and_at_least_one():
    assert pool_size("linear", 0, 10, 30, start=0.1, saturate=1.0) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert pool_size("linear", 0, 10, 25, start=0.1, saturate=1.0) == 3  # ceil(2.5)
    assert pool_size("linear", 5, 10, 100, start=0.01, saturate=1.0) == 51  # ceil(0.505 * 100) = ceil(50.5)
    assert pool_size("linear", 0, 10, 5, start=0.01, saturate=1.0) == 1  # ceil(0.05), and never 0
    assert pool_size("none", 0, 10, 5, start=0.01, saturate=1.0) == 5


def test_pool_size_drives_the_sampler_to_draw_only_from_the_head_of_the_order():
    order = list(range(99, -1, -1))  # any order: the sampler takes its first pool_size(step) entries
    pool = lambda s: pool_size("step", s, 8, 100, start=0.25, saturate=1.0, num_buckets=4)  # noqa: E731
    sampler = Sampler(order, batch_size=16, seed=0, pool_size=pool)
    for s in range(8):
        assert set(sampler.batch(s)) <= set(order[:pool(s)])
    assert pool(0) == 25 and pool(2) == 50 and pool(7) == 100


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

GOOD = dict(start=0.1, saturate=0.5, root_p=2.0, num_buckets=4)


@pytest.mark.parametrize("key, value, allowed", [
    ("start", 0.0, "(0, 1]"), ("start", 1.5, "(0, 1]"), ("start", -0.1, "(0, 1]"), ("start", math.nan, "(0, 1]"),
    ("saturate", 0.0, "(0, 1]"), ("saturate", 1.01, "(0, 1]"),
    ("root_p", 0.5, ">= 1"), ("root_p", math.inf, ">= 1"),
    ("num_buckets", 1, ">= 2"), ("num_buckets", 2.5, ">= 2"),
])
def test_bad_parameters_are_refused_naming_the_parameter_and_its_range(key, value, allowed):
    for name in ("linear", "none"):  # checked whatever the pacing, so a bad config fails early
        with pytest.raises(ValueError, match=rf"^{key}=.*{re.escape(allowed)}"):
            pacing_fraction(name, 0.5, **{**GOOD, key: value})


@pytest.mark.parametrize("progress", [-0.01, 1.01, math.nan])
def test_progress_outside_zero_one_is_refused(progress):
    with pytest.raises(ValueError, match=r"progress=.*\[0, 1\]"):
        pacing_fraction("linear", progress, start=0.1, saturate=0.5)


def test_unknown_pacing_is_refused_listing_every_name():
    with pytest.raises(ValueError, match="unknown pacing 'cosine'") as info:
        pacing_fraction("cosine", 0.5, start=0.1, saturate=0.5)
    assert all(name in str(info.value) for name in NAMES)


@pytest.mark.parametrize("kwargs, key", [
    (dict(step=-1, max_steps=10, n=5), "step"), (dict(step=11, max_steps=10, n=5), "step"),
    (dict(step=0, max_steps=0, n=5), "max_steps"), (dict(step=0, max_steps=10, n=0), "n"),
])
def test_pool_size_refuses_bad_step_counts(kwargs, key):
    with pytest.raises(ValueError, match=rf"^{key}="):
        pool_size("linear", start=0.1, saturate=0.5, **kwargs)


def test_a_str_enum_names_a_pacing_like_its_value():
    class Pacing(str, Enum):
        root = "root"

    assert pacing_fraction(Pacing.root, 0.5, start=0.01, saturate=1.0) == pacing_fraction("root", 0.5, start=0.01, saturate=1.0)
