"""The teacher ladder: schedule, cache, residency, vocabulary alignment, and the LoRA student."""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path

import pytest
import torch
from rich.console import Console

import clpd.teachers.live as teachers_module
from clpd.config.model import LoraConfig, ModelConfig, StudentConfig
from clpd.config.enums import Schedule
from clpd.config.schema import TrainerConfig, to_object
from clpd.data import load_problems
from clpd.data.prompts import encode_example
from clpd.errors import ClpdError
from clpd.commands.eval import run_eval
from clpd.evaluation.evaluate import evaluate
from clpd.teachers.ladder import build_config, check_ladder_order, teacher_key
from clpd.losses.distill import distill_loss
from clpd.models.load import apply_lora, load_model, load_tokenizer
from clpd.training.checkpoint import write_checkpoint
from clpd.curriculum.sampler import build_sampler
from clpd.curriculum.stages import stage_starts
from clpd.teachers.schedule import make_schedule, teacher_index
from clpd.commands.run_train import run_train
from tests.conftest import GPT2_DIR, TINY_OVERRIDES, compose_config, needs
from tests.test_loop import run_loop

QUIET = Console(quiet=True)
LADDER = [
    "teachers.ladder=[{name: a, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32},"
    "{name: b, hidden_size: 24, num_layers: 1, num_heads: 2, intermediate_size: 48},"
    "{name: c, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}]",
]


def ladder_overrides(tmp_path: Path, *extra: str) -> list:
    """A tiny student distilled from the three-rung test ladder (built in 2 steps into tmp_path/cache)."""
    return [*TINY_OVERRIDES, "method=none", "distill=forward_kl", "teachers.name=test", *LADDER,
            "teachers.build.max_steps=2", "teachers.build.warmup_steps=1", "teachers.build.batch_size=4",
            "teachers.build.grad_accum=1", f"teachers.cache_dir={tmp_path / 'cache'}", *extra]


def ladder_cfg(tmp_path: Path, *extra: str):
    return compose_config("train", ladder_overrides(tmp_path, *extra))


# --- the schedule ------------------------------------------------------------------------------

def test_strongest_weakest_and_fixed_ignore_the_stages():
    starts = [3, 6]
    for step in range(9):
        assert teacher_index(step, schedule=Schedule.strongest, num_teachers=3, starts=starts) == 2
        assert teacher_index(step, schedule=Schedule.weakest, num_teachers=3, starts=starts) == 0
        assert teacher_index(step, schedule=Schedule.fixed, num_teachers=3, starts=starts, fixed_index=1) == 1


def _three_teachers(tmp_path, *extra):
    return to_object(ladder_cfg(tmp_path, "teachers.schedule=progressive", *extra))


def test_progressive_gives_teacher_k_to_stage_k_over_even_stages(tmp_path):
    tc = _three_teachers(tmp_path, "trainer.max_steps=9")
    starts = stage_starts(tc, build_sampler(tc, None, 100))
    assert starts == [3, 6]
    assert [make_schedule(tc.teachers, starts)(s) for s in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_progressive_follows_explicit_boundaries(tmp_path):
    tc = _three_teachers(tmp_path, "trainer.max_steps=10", "teachers.boundaries=[0.5,0.9]")
    starts = stage_starts(tc, build_sampler(tc, None, 100))
    assert [make_schedule(tc.teachers, starts)(s) for s in range(10)] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2]


@pytest.mark.parametrize("overrides, message", [
    (["teachers.schedule=fixed", "teachers.fixed=zzz"], "teachers.fixed=zzz must name a teacher"),
    (["teachers.boundaries=[0.5]"], "needs 2 values"),
    (["teachers.boundaries=[0.6,0.3]"], "must be increasing fractions"),
])
def test_bad_schedule_settings_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ClpdError, match=message):
        to_object(ladder_cfg(tmp_path, *overrides))


def test_a_distillation_loss_without_teachers_is_refused():
    with pytest.raises(ClpdError, match="needs a teacher ladder"):
        to_object(compose_config("train", ["teachers=none", "method=none", "distill=forward_kl"]))


# --- building and caching the ladder ----------------------------------------------------------

def test_the_cache_key_follows_config_data_and_build_but_not_the_name(tmp_path):
    tc = to_object(ladder_cfg(tmp_path))
    spec = tc.teachers.ladder[0]
    key = teacher_key(spec, tc)
    assert teacher_key(ModelConfig(**{**spec.__dict__, "name": "renamed"}), tc) == key
    assert teacher_key(ModelConfig(**{**spec.__dict__, "hidden_size": 20}), tc) != key
    tc.teachers.build.data_seed += 1
    assert teacher_key(spec, tc) != key
    tc.teachers.build.data_seed -= 1
    tc.teachers.build.max_steps += 1
    assert teacher_key(spec, tc) != key


def test_a_build_override_trains_one_teacher_longer_and_changes_only_its_cache_key(tmp_path):
    plain = to_object(ladder_cfg(tmp_path))
    longer = to_object(ladder_cfg(tmp_path, "+teachers.build_overrides.b.max_steps=7"))
    assert [build_config(t, longer).max_steps for t in longer.teachers.ladder] == [2, 7, 2]  # teachers.build.max_steps=2 elsewhere
    keys = [teacher_key(t, plain) for t in plain.teachers.ladder]
    assert [teacher_key(t, longer) == k for t, k in zip(longer.teachers.ladder, keys)] == [True, False, True]


def test_a_build_override_must_name_a_build_setting(tmp_path):
    with pytest.raises(ClpdError, match=r"teachers.build_overrides.b.steps: not a build setting; "
                                        r"allowed: data_seed, seed, max_steps"):
        to_object(ladder_cfg(tmp_path, "+teachers.build_overrides.b.steps=7"))


def test_a_build_override_for_a_teacher_not_in_the_ladder_is_ignored_with_a_warning(tmp_path, caplog):
    # A ladder whose medium teacher has a build of its own (arith_tiny, +experiment=arith): a ladder
    # given on the command line replaces the teachers but not that entry.
    with caplog.at_level(logging.WARNING, logger="clpd.config"):
        tc = to_object(ladder_cfg(tmp_path, "++teachers.build_overrides.medium.max_steps=7"))
    assert "teachers.build_overrides.medium: no teacher of that name in the ladder ['a', 'b', 'c']; ignored" in caplog.text
    assert [build_config(t, tc).max_steps for t in tc.teachers.ladder] == [2, 2, 2]


def test_missing_teachers_are_trained_once_and_then_reused(tmp_path):
    run_train(ladder_cfg(tmp_path, "teachers.build_only=true"), tmp_path / "first", QUIET)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))  # .locks
    assert len(cached) == 3 and all((tmp_path / "cache" / c / "checkpoints" / "final").exists() for c in cached)
    stamps = {c: (tmp_path / "cache" / c / "summary.json").stat().st_mtime_ns for c in cached}
    rows = run_train(ladder_cfg(tmp_path, "teachers.build_only=true"), tmp_path / "second", QUIET)["teachers"]
    assert {c: (tmp_path / "cache" / c / "summary.json").stat().st_mtime_ns for c in cached} == stamps
    assert [r["name"] for r in rows] == ["a", "b", "c"] and all(r["accuracy_strict"] is not None for r in rows)
    assert rows[0]["parameters"] < rows[1]["parameters"] < rows[2]["parameters"]


def test_a_ladder_that_does_not_grow_is_warned_about(caplog):
    tok = load_tokenizer(ModelConfig(name="s"))
    big, small = ModelConfig(name="big", hidden_size=32, num_layers=2, num_heads=2), ModelConfig(name="small", hidden_size=16, num_layers=1, num_heads=2)
    with caplog.at_level(logging.WARNING, logger="clpd.teachers.live"):
        check_ladder_order([big, small], tok)
    assert "not increasing in parameter count" in caplog.text


# --- distillation with a schedule, and residency ----------------------------------------------

def test_progressive_distillation_switches_teachers_and_holds_one_at_a_time(tmp_path, monkeypatch):
    alive: list = []
    resident_counts: list = []
    original = teachers_module.load_model

    def tracked_load(*args, **kwargs):
        model = original(*args, **kwargs)
        alive.append(weakref.ref(model))
        resident_counts.append(sum(r() is not None for r in alive))
        return model

    monkeypatch.setattr(teachers_module, "load_model", tracked_load)
    cfg = ladder_cfg(tmp_path, "teachers.schedule=progressive", "trainer.max_steps=5")
    summary = run_train(cfg, tmp_path / "run", QUIET)
    assert [(s["step"], s["from"], s["to"]) for s in summary["teacher_switches"]] == \
        [(0, None, "a"), (2, "a", "b"), (3, "b", "c")]  # even stages of 5 steps start at 2 and 3
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"event"' in line]
    assert events == summary["teacher_switches"]
    assert resident_counts == [1, 1, 1]  # the previous teacher was freed before each new one loaded
    loss = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    assert len(loss) == 5 and all(v == v and v >= 0 for v in loss)


def test_teachers_with_padded_output_rows_of_different_sizes_use_the_shared_rows(tmp_path):
    # Like Qwen2.5: 1.5B/3B have 151936 output rows, 7B 152064, the tokenizer fewer than both.
    qwen = ["student.arch=qwen2", "student.hidden_size=16", "student.num_heads=2", "student.intermediate_size=32",
            "student.vocab_size=151936", "trainer.batch_size=2", "trainer.grad_accum=1", "trainer.max_length=64",
            "trainer.overlong=truncate_left"]
    teacher = ("teachers.ladder=[{name: wide, arch: qwen2, hidden_size: 16, num_layers: 1, num_heads: 2,"
               " intermediate_size: 32, vocab_size: 152064, tie_embeddings: false}]")
    cfg = compose_config("train", [*TINY_OVERRIDES, *qwen, "distill=forward_kl", teacher, "teachers.build.max_steps=1",
                                   "teachers.build.warmup_steps=0", "teachers.build.batch_size=2",
                                   "teachers.build.grad_accum=1", "teachers.build.eval=false",
                                   f"teachers.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2"])
    summary = run_train(cfg, tmp_path / "run", QUIET)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]

    # What the loop's loss does with such logits: rows past the tokenizer never count.
    tokens = 100
    student, teacher_logits = torch.randn(1, 4, 151936), torch.randn(1, 4, 152064)
    targets = torch.randint(0, tokens, (1, 4))
    changed = teacher_logits.clone()
    changed[..., tokens:] += 50.0
    loss = lambda t: distill_loss(student, t, targets, loss="forward_kl", alpha=0.0, vocab_size=tokens).total
    assert torch.equal(loss(teacher_logits), loss(changed))


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path):
    cfg = compose_config("train", [*TINY_OVERRIDES, "distill=forward_kl",
                                   f"teachers.ladder=[{{name: gpt2ish, tokenizer: '{needs(GPT2_DIR)}', hidden_size: 16,"
                                   " num_layers: 1, num_heads: 2, intermediate_size: 32}]",
                                   f"teachers.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ClpdError, match="teacher 'gpt2ish'.*different tokenizers"):
        run_train(cfg, tmp_path / "run", QUIET)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "cache").exists()


# --- the LoRA student --------------------------------------------------------------------------

def test_a_lora_student_changes_only_its_adapters_and_reloads_with_the_same_predictions(tmp_path):
    spec = StudentConfig(name="s", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                         lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    tok = load_tokenizer(spec)
    torch.manual_seed(0)
    base = load_model(spec, tok)
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    import copy

    scratch = copy.deepcopy(base)
    model = apply_lora(base, spec.lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    from clpd.config.schema import BenchmarkConfig

    bench = BenchmarkConfig(train_size=64, test_size=8, max_steps=2)
    examples = [encode_example(p, tok, False, 256) for p in load_problems(bench, "train")]
    cfg = TrainerConfig(max_steps=3, batch_size=4, grad_accum=1, warmup_steps=0, lr=1e-2, log_every=1)
    run_loop(model, examples, cfg, tmp_path / "m.jsonl")

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())

    from omegaconf import OmegaConf

    write_checkpoint(tmp_path / "final", model=model, tokenizer=tok, cfg=OmegaConf.create({"note": "test"}), base=scratch)
    assert (tmp_path / "final" / "adapter_config.json").exists() and (tmp_path / "final" / "base").exists()
    reloaded_base = {k: v for k, v in load_model(ModelConfig(name="b", path=str(tmp_path / "final" / "base")), tok).state_dict().items()}
    assert all(torch.equal(reloaded_base[k], pristine[k]) for k in pristine)

    problems = load_problems(bench, "test")
    _, in_memory = evaluate(model, tok, problems, bench, batch_size=8, max_new_tokens=12, device=torch.device("cpu"))
    metrics = run_eval(compose_config("eval", [f"checkpoint={tmp_path / 'final'}", "benchmark.train_size=64",
                                               "benchmark.test_size=8", "benchmark.max_steps=2", "max_new_tokens=12"]),
                       tmp_path / "eval", QUIET)
    saved_outputs = [json.loads(line)["output"] for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    memory_records, _ = evaluate(model, tok, problems, bench, batch_size=8, max_new_tokens=12, device=torch.device("cpu"))
    assert saved_outputs == [r["output"] for r in memory_records]
    assert metrics["accuracy_strict"] == in_memory["accuracy_strict"]
