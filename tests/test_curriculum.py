"""The curriculum in a run: stages from pacing, the method presets, `clpd plan` = what training does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from clpd.config.schema import to_object
from clpd.curriculum.order import order_indices
from clpd.curriculum.sampler import Sampler, build_sampler, pool_function
from clpd.curriculum.stages import stage_starts
from clpd.teachers.schedule import warn_idle_teachers
from clpd.errors import ClpdError
from clpd.commands.plan import run_plan
from clpd.commands.run_train import run_train
from tests.conftest import compose_config

QUIET = Console(quiet=True)
METHODS = ["sft", "standard_kd", "curriculum_only", "teacher_schedule_only", "clpd"]
TINY_LADDER = ("teachers.ladder=[{name: a, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32},"
               "{name: b, hidden_size: 24, num_layers: 1, num_heads: 2, intermediate_size: 48},"
               "{name: c, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}]")


def arith_cfg(cache: Path, *extra: str):
    """+experiment=arith shrunk: tiny student and ladder, 100 problems, 12 steps, a log line per step."""
    return compose_config("train", [
        "+experiment=arith", TINY_LADDER, f"teachers.cache_dir={cache}", "teachers.build.max_steps=2",
        "teachers.build.warmup_steps=0", "teachers.build.batch_size=4", "teachers.build.grad_accum=1",
        "teachers.build.eval=false", "student.hidden_size=16", "student.num_layers=1", "student.num_heads=2",
        "student.intermediate_size=32", "benchmark.train_size=100", "benchmark.test_size=8",
        "trainer.max_steps=12", "trainer.batch_size=4", "trainer.grad_accum=1", "trainer.warmup_steps=1",
        "trainer.log_every=1", "trainer.save=false", *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teachers")


@pytest.mark.parametrize("method", METHODS)
def test_a_run_follows_the_plan_step_by_step(method, cache, tmp_path):
    plan = run_plan(arith_cfg(cache, f"method={method}"), tmp_path / "plan", QUIET)
    assert (tmp_path / "plan" / "plan.png").stat().st_size > 0
    run_train(arith_cfg(cache, f"method={method}"), tmp_path / "run", QUIET)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    planned_teachers = [plan["teachers"][s["teacher"]] if s["teacher"] is not None else None for s in plan["steps"]]
    assert [r["pool"] for r in logged] == [s["pool"] for s in plan["steps"]]
    assert [r["teacher"] for r in logged] == planned_teachers
    assert [r.get("difficulty") for r in logged] == [s.get("difficulty") for s in plan["steps"]]


def test_what_each_method_does(cache, tmp_path):
    def plan_of(method):
        return run_plan(arith_cfg(cache, f"method={method}"), tmp_path / method, QUIET)

    full = [100] * 12
    sft, kd, cur, sched, clpd = (plan_of(m) for m in METHODS)
    assert [s["pool"] for s in sft["steps"]] == full and sft["teachers"] == []
    assert [s["pool"] for s in kd["steps"]] == full and {s["teacher"] for s in kd["steps"]} == {2}
    assert [s["pool"] for s in cur["steps"]][0] == 20 and [s["pool"] for s in cur["steps"]] != full
    assert {s["teacher"] for s in cur["steps"]} == {2}
    assert [s["teacher"] for s in sched["steps"]] == [0] * 4 + [1] * 4 + [2] * 4  # even stages
    assert [s["pool"] for s in sched["steps"]] == full
    # CLPD: the teacher changes when the pool reaches the next third of the ordered data.
    pools, teachers = [s["pool"] for s in clpd["steps"]], [s["teacher"] for s in clpd["steps"]]
    for step, teacher in enumerate(teachers):
        assert teacher == sum(pools[step] >= need for need in (34, 67))
    assert teachers[0] == 0 and teachers[-1] == 2


def test_curriculum_stages_begin_where_the_pool_reaches_each_difficulty_band():
    tc = to_object(compose_config("train", ["+experiment=arith", "method=clpd", "curriculum.pacing=linear",
                                            "curriculum.start=0.1", "curriculum.saturate=1.0", "trainer.max_steps=100"]))
    # linear: fraction(step) = 0.1 + 0.9 * step / 100. A third of 900 examples (300) is first reached
    # at step 26 (0.334 >= 1/3; step 25 gives 0.325), two thirds (600) at step 63 (0.667 >= 2/3).
    starts = stage_starts(tc, build_sampler(tc, None, 900))
    pool = pool_function(tc, 900)
    assert starts == [26, 63]
    assert pool(25) < 300 <= pool(26) and pool(62) < 600 <= pool(63)


def test_without_pacing_stages_follow_explicit_boundaries():
    tc = to_object(compose_config("train", ["+experiment=arith", "method=teacher_schedule_only",
                                            "curriculum.stage_boundaries=[0.5,0.75]", "trainer.max_steps=100"]))
    assert stage_starts(tc, build_sampler(tc, None, 900)) == [50, 75]


def placed(placement: str, scores, *extra: str):
    """The stage starts of a 3-teacher CLPD run of 100 steps under linear pacing from 0.1 to 1.0."""
    tc = to_object(compose_config("train", ["+experiment=arith", "method=clpd", "curriculum.pacing=linear",
                                            "curriculum.start=0.1", "curriculum.saturate=1.0", "trainer.max_steps=100",
                                            f"curriculum.stage_placement={placement}", *extra]))
    sampler = build_sampler(tc, np.asarray(scores, dtype=float), len(scores))
    starts = stage_starts(tc, sampler)
    return starts, [sampler.describe(s) for s in starts]


# 1000 problems of 4 difficulty levels: 100 of level 1, 200 of 2, 300 of 3, 400 of 4.
LEVELS = np.repeat([1, 2, 3, 4], [100, 200, 300, 400])


def test_stages_placed_by_pool_growth_add_a_third_of_the_data_each():
    starts, pools = placed("pool", LEVELS)
    assert starts == [26, 63] and [p["pool"] for p in pools] == [334, 667]


def test_stages_placed_by_steps_split_the_steps_evenly_whatever_the_pool_holds():
    starts, _ = placed("steps", LEVELS)
    assert starts == [33, 67]


def test_stages_placed_by_band_begin_when_the_pool_first_holds_the_next_band_of_levels():
    # 4 levels in 3 bands: [1], [2], [3, 4]. Level 2 begins at the 101st problem of the order (pool
    # 109 at step 1, 100 at step 0); level 3 at the 301st (pool 307 at step 23, 298 at step 22).
    starts, pools = placed("band", LEVELS)
    assert starts == [1, 23]
    assert [p["difficulty"] for p in pools] == [[1.0, 2.0], [1.0, 3.0]]


def test_band_placement_needs_as_many_levels_as_stages():
    with pytest.raises(ClpdError, match="the difficulty has 2 levels for 3 stages; allowed: at least as many"):
        placed("band", np.repeat([1, 2], [500, 500]))


def test_a_pool_that_starts_past_the_first_stage_leaves_the_weakest_teacher_idle_and_says_so(caplog):
    # From 0.4 of the data the pool holds more than the first third at step 0: stage 0, and with it
    # the weakest teacher, gets no step under pool placement; even steps give every teacher a third.
    def clpd_from(placement):
        tc = to_object(compose_config("train", ["+experiment=arith", "method=clpd", "curriculum.pacing=linear",
                                                "curriculum.start=0.4", "trainer.max_steps=100",
                                                f"curriculum.stage_placement={placement}"]))
        return tc, stage_starts(tc, build_sampler(tc, LEVELS.astype(float), len(LEVELS)))

    tc, starts = clpd_from("pool")
    weakest = tc.teachers.ladder[0].name
    with caplog.at_level(logging.WARNING, logger="clpd.teachers.schedule"):
        assert starts[0] == 0 and warn_idle_teachers(tc, starts) == [weakest]
    assert f"no step for {weakest}, whose stage is empty under curriculum.stage_placement=pool" in caplog.text
    assert warn_idle_teachers(*clpd_from("steps")) == []


def test_without_pacing_every_placement_splits_the_steps_evenly():
    for placement in ("pool", "steps", "band"):
        assert placed(placement, LEVELS, "curriculum.pacing=none")[0] == [33, 67]


def test_same_seed_same_batches_and_another_seed_other_batches():
    def batches(seed):
        tc = to_object(compose_config("train", ["+experiment=arith", "method=clpd", f"seed={seed}",
                                                "trainer.max_steps=50"]))
        sampler = Sampler(list(range(1000)), 8, seed=seed, pool_size=pool_function(tc, 1000))
        return [sampler.batch(step) for step in range(50)]

    assert batches(0) == batches(0)
    assert batches(0) != batches(1)


def test_the_sampler_describes_the_difficulty_range_of_the_head_of_the_order():
    scores = [0.5, 0.1, 0.9, 0.3]
    pool = {0: 1, 1: 3, 2: 99}.__getitem__  # step -> pool size; 99 is capped at the 4 examples
    easy_first = Sampler(order_indices(scores, "easy_to_hard", seed=0), 2, seed=0, pool_size=pool, scores=scores)
    assert [easy_first.describe(s) for s in range(3)] == [
        {"pool": 1, "difficulty": [0.1, 0.1]}, {"pool": 3, "difficulty": [0.1, 0.5]}, {"pool": 4, "difficulty": [0.1, 0.9]}]
    unordered = Sampler([0, 2, 1, 3], 2, seed=0, pool_size=pool, scores=scores)  # min and max, not the ends
    assert unordered.describe(1) == {"pool": 3, "difficulty": [0.1, 0.9]}
    assert Sampler([0, 2, 1, 3], 2, seed=0, pool_size=pool).describe(1) == {"pool": 3}  # no scores, no range


@pytest.mark.parametrize("override, message", [
    ("curriculum.start=1.5", "curriculum.start=1.5 must be in (0, 1]"),
    ("curriculum.saturate=0", "curriculum.saturate=0.0 must be in (0, 1]"),
    ("curriculum.stage_boundaries=[0.7,0.3]", "must be increasing fractions"),
    ("curriculum.stage_placement=band curriculum.order=random", "needs a difficulty order"),
    ("curriculum.difficulty=teacher_loss", "curriculum.teacher=None must name a teacher of the ladder"),
])
def test_bad_curriculum_settings_are_refused_before_any_work(override, message):
    with pytest.raises(ClpdError) as info:
        to_object(compose_config("train", ["+experiment=arith", *override.split()]))
    assert message in str(info.value)


def test_a_model_scorer_is_computed_once_and_cached_next_to_the_run(cache, tmp_path):
    cfg = arith_cfg(cache, "method=curriculum_only", "curriculum.difficulty=student_loss", "trainer.max_steps=2")
    run_train(cfg, tmp_path / "run", QUIET)
    cached = json.loads((tmp_path / "run" / "difficulty.json").read_text())
    assert cached["meta"]["difficulty"] == "student_loss" and len(cached["scores"]) == 100
    plan = run_plan(arith_cfg(cache, "method=curriculum_only", "curriculum.difficulty=student_loss"), tmp_path / "p", QUIET)
    assert all("difficulty" not in s for s in plan["steps"])  # needs a model: shown as computed at train time
