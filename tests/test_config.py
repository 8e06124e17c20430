"""Every shipped config composes and validates; bad values are refused before any work, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from clpd.config.schema import BenchmarkConfig, TrainConfig, TrainerConfig, to_object
from clpd.errors import ClpdError
from tests.conftest import REPO, compose_config

CONF = REPO / "conf"
GROUPS = ["student", "teachers", "curriculum", "distill", "benchmark", "trainer", "method"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_validates(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group in ("distill", "method"):  # distillation needs a ladder to learn from
            overrides.append("teachers=arith_tiny")
        if group == "teachers" and option == "none":  # the default method (clpd) distils
            overrides.append("method=sft")
        if group == "benchmark" and option == "svamp":
            cfg = compose_config("eval", [*overrides, "checkpoint=some/model"])
        elif group == "benchmark" and option == "jsonl":  # the user's file, evaluation only without solutions
            cfg = compose_config("eval", [*overrides, "checkpoint=some/model", "benchmark.path=problems.jsonl"])
        else:
            cfg = compose_config("train", overrides)
        assert to_object(cfg) is not None


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    assert isinstance(to_object(compose_config("train", [f"+experiment={experiment}"])), TrainConfig)


def test_the_config_groups_named_in_the_design_exist():
    for group in [*GROUPS, "experiment"]:
        assert options(group), f"conf/{group}/ has no option"


def test_an_unknown_enum_value_is_refused_with_the_allowed_values():
    with pytest.raises(ConfigCompositionException) as info:
        compose_config("train", ["trainer.precision=fp8"])
    message = str(info.value.__cause__)
    assert "fp8" in message and all(v in message for v in ("auto", "fp32", "bf16", "fp16"))


def test_an_unknown_group_option_is_refused_with_the_available_ones():
    with pytest.raises(MissingConfigException) as info:
        compose_config("train", ["benchmark=nope"])
    assert set(info.value.options) >= {"arith", "gsm8k", "svamp"}


def test_an_unknown_key_is_refused():
    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["trainer.no_such_key=1"])


def test_cross_field_problems_are_reported_together_each_naming_its_key():
    cfg = compose_config("train", ["trainer.batch_size=3", "trainer.grad_accum=2", "trainer.lr=-1"])
    with pytest.raises(ClpdError) as info:
        to_object(cfg)
    message = str(info.value)
    assert "trainer.batch_size=3" in message and "trainer.grad_accum=2" in message and "trainer.lr=-1" in message
    assert "\n" not in message


def test_svamp_is_refused_for_training_because_it_has_no_solutions():
    with pytest.raises(ClpdError, match="svamp"):
        to_object(compose_config("train", ["benchmark=svamp"]))


def test_eval_needs_a_checkpoint():
    with pytest.raises(ClpdError, match="checkpoint is required"):
        to_object(compose_config("eval", []))


def test_schema_checks_run_on_plain_construction_too():
    with pytest.raises(ClpdError, match="benchmark.min_value"):
        BenchmarkConfig(min_value=10, max_value=5)
    with pytest.raises(ClpdError, match="trainer.max_steps"):
        TrainerConfig(max_steps=0)


def test_yaml_files_are_shipped_inside_the_package():
    import clpd.conf

    assert (Path(clpd.conf.__file__).parent / "train.yaml").exists()


def test_distill_loss_allows_exactly_sft_and_every_divergence_of_the_losses():
    from clpd.config.enums import DistillLoss
    from clpd.losses.divergences import LOSS_NAMES

    assert [loss.value for loss in DistillLoss] == list(LOSS_NAMES)
