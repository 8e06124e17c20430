"""Stored teacher outputs (clpd/teachers/store.py): what a store holds, that training on it is
training on the live teacher when nothing is cut, and that a wrong or damaged store is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from clpd.config.model import ModelConfig
from clpd.data.batching import answer_mask, collate, pack
from clpd.errors import ClpdError
from clpd.losses.sparse import top_k_outputs
from clpd.models.load import load_model
from clpd.teachers.store import TeacherStore, build_store, store_dir, store_key
from clpd.models.tokenizer import build_char_tokenizer
from clpd.commands.run_train import run_train
from tests.conftest import REPO, clpd_trains_at_once, compose_config
from tests.test_teachers import ladder_overrides

QUIET = Console(quiet=True)


def encoded(n: int = 12) -> list:
    """n encoded arith-like examples of different lengths: a prompt (no loss) and an answer."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        prompt, answer = rng.integers(3, 20, 3 + i % 4).tolist(), rng.integers(3, 20, 2 + i % 5).tolist()
        out.append({"id": i, "input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def tiny_teacher(tmp_path: Path) -> tuple[ModelConfig, object]:
    tokenizer = build_char_tokenizer()
    spec = ModelConfig(name="t", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = load_model(spec, tokenizer)
    model.save_pretrained(tmp_path / "teacher")
    return ModelConfig(name="t", path=str(tmp_path / "teacher")), tokenizer


def build(tmp_path: Path, examples: list, top_k, batch_size: int = 5):
    spec, tokenizer = tiny_teacher(tmp_path)
    key = store_key(spec, examples, top_k=top_k, width=len(tokenizer), max_length=512, dtype=torch.float32)
    folder = store_dir(tmp_path / "cache", spec.name, key)
    build_store(spec, examples, key, folder, tokenizer=tokenizer, batch_size=batch_size, device=torch.device("cpu"),
                dtype=torch.float32, autocast_dtype=None, console=QUIET)
    return spec, tokenizer, key, folder


def as_stored(top):
    """A TopK as a compact store gives it back: each row's ids ascending, its logits and tail less
    the row's largest logit (the same divergences: a shift per row)."""
    indices, order = top.indices.sort(dim=1)
    largest = top.values.max(dim=1, keepdim=True).values
    return indices, top.values.gather(1, order) - largest, top.tail_lse - largest[:, 0]


def assert_stored(got, expected) -> None:
    """``got`` holds ``expected``'s ids, and its logits and tail up to the compact rows' rounding:
    half a 10-bit mu-law step at the row's scale (at most 1.2e-3 of its largest gap), half of 2^-14
    for the tail."""
    indices, values, tail_lse = as_stored(expected)
    assert torch.equal(got.indices, indices)
    gap = -values.min(dim=1, keepdim=True).values
    assert ((got.values - values).abs() <= 1.2e-3 * gap + 1e-6).all()
    torch.testing.assert_close(got.tail_lse, tail_lse, rtol=0, atol=4e-5)


def test_a_store_holds_the_teachers_top_k_at_every_answer_position_whatever_the_batch_layout(tmp_path):
    examples = encoded()
    spec, tokenizer, key, folder = build(tmp_path, examples, top_k=4)
    store = TeacherStore(folder, key)
    model = load_model(spec, tokenizer).eval()
    width = len(tokenizer)
    micro = [7, 2, 11, 0]  # any examples, in any order: rows come back in that order
    for layout in (collate([examples[i] for i in micro], tokenizer.pad_token_id), pack([examples[i] for i in micro])):
        targets = layout.pop("targets")
        keep = answer_mask(targets)
        with torch.inference_mode():
            live = model(**layout, logits_to_keep=keep, use_cache=False).logits
        assert_stored(store.rows(micro, torch.device("cpu")), top_k_outputs(live, 4, width))
    assert store.marker["rows"] == sum(int((torch.tensor(e["labels"][1:]) != -100).sum()) for e in examples)


def test_the_batch_size_of_the_build_does_not_change_the_store(tmp_path):
    examples = encoded()
    *_, key1, one = build(tmp_path / "a", examples, top_k=3, batch_size=1)
    *_, key2, many = build(tmp_path / "b", examples, top_k=3, batch_size=12)
    np.testing.assert_array_equal(np.load(one / "offsets.npy"), np.load(many / "offsets.npy"))
    # The logits of two batch layouts differ in their last bits, which may tip a value's code: the
    # rows are compared decoded, to within one code step of the row's largest gap.
    a, b = (TeacherStore(folder, key).rows(range(len(examples)), torch.device("cpu"))
            for folder, key in ((one, key1), (many, key2)))
    assert torch.equal(a.indices, b.indices)
    gap = -a.values.min(dim=1, keepdim=True).values
    assert ((a.values - b.values).abs() <= 2.4e-3 * gap + 1e-5).all()
    torch.testing.assert_close(a.tail_lse, b.tail_lse, rtol=0, atol=1e-4)


def test_the_key_covers_k_the_data_and_the_teacher(tmp_path):
    examples = encoded()
    spec, tokenizer = tiny_teacher(tmp_path)
    def key(examples=examples, **changes):
        return store_key(spec, examples, **{"top_k": 4, "width": len(tokenizer), "max_length": 512,
                                            "dtype": torch.float32, **changes}).digest()
    assert len({key(), key(top_k=8), key(examples=examples[:-1]), key(dtype=torch.bfloat16)}) == 4
    assert store_key(spec, examples, top_k=None, width=len(tokenizer), max_length=512,
                     dtype=torch.float32).top_k == len(tokenizer)  # null: every row


def test_a_store_for_another_teacher_or_a_damaged_file_is_refused_in_one_line(tmp_path):
    examples = encoded()
    spec, tokenizer, key, folder = build(tmp_path, examples, top_k=4)
    other = store_key(spec, examples[:-1], top_k=4, width=len(tokenizer), max_length=512, dtype=torch.float32)
    with pytest.raises(ClpdError, match="built for other training data"):
        TeacherStore(folder, other)
    marker = json.loads((folder / "store.json").read_text())
    marker["key"]["teacher"]["weights"] = {"model.safetensors": "0" * 64}
    (folder / "store.json").write_text(json.dumps(marker))
    with pytest.raises(ClpdError, match="built for another teacher"):
        TeacherStore(folder, key)
    spec2, _, key2, folder2 = build(tmp_path / "again", examples, top_k=4)
    data = (folder2 / "rows.npy").read_bytes()
    (folder2 / "rows.npy").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ClpdError, match=r"damaged \(rows.npy"):
        TeacherStore(folder2, key2)


# --- end to end --------------------------------------------------------------------------------

def kd_overrides(tmp_path: Path, *extra: str) -> list:
    return ladder_overrides(tmp_path, "method=standard_kd", "trainer.max_steps=4", "trainer.grad_accum=2",
                            "trainer.eval_at_end=false", *extra)


def kd_cfg(tmp_path: Path, *extra: str):
    return compose_config("train", kd_overrides(tmp_path, *extra))


def test_stored_outputs_of_every_row_train_the_student_the_live_teacher_trains(tmp_path):
    live = run_train(kd_cfg(tmp_path), tmp_path / "live", QUIET)
    stored = run_train(kd_cfg(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=null"), tmp_path / "stored", QUIET)
    assert live["teacher_outputs"] == {"source": "live"}
    assert stored["teacher_outputs"]["source"] == "stored" and stored["teacher_outputs"]["stores"][0]["teacher"] == "c"
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in ("live", "stored")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    weights = [load_file(tmp_path / run / "checkpoints" / "final" / "model.safetensors") for run in ("live", "stored")]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5)


def test_a_top_k_store_trains_and_is_built_once_for_the_runs_that_share_it(tmp_path):
    first = run_train(kd_cfg(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=4"), tmp_path / "one", QUIET)
    second = run_train(kd_cfg(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=4", "seed=1"), tmp_path / "two", QUIET)
    assert first["teacher_outputs"]["stores"] == second["teacher_outputs"]["stores"]
    assert len(list((tmp_path / "cache" / "outputs").glob("c-k4-*"))) == 1
    assert np.isfinite(first["final_loss"]) and np.isfinite(second["final_loss"])


def test_resuming_a_stored_run_gives_the_weights_of_the_run_that_never_stopped(tmp_path):
    stored = ("distill.teacher_outputs=stored", "distill.top_k=4", "trainer.max_steps=6")
    run_train(kd_cfg(tmp_path, *stored), tmp_path / "straight", QUIET)
    run_train(kd_cfg(tmp_path, *stored, "trainer.save_every=3"), tmp_path / "halves", QUIET)
    # Start again from step 3 of the second run, as a resume after a stop there does.
    run_train(kd_cfg(tmp_path, *stored, "trainer.resume=" + str(tmp_path / "halves" / "checkpoints" / "step-0000003")),
              tmp_path / "resumed", QUIET)
    a = load_file(tmp_path / "straight" / "checkpoints" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "final" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("extra, message", [
    (["distill.top_k=0"], "distill.top_k=0 must be >= 1"),
    (["distill.top_k=100000"], "distill.top_k=100000 is larger than the vocabulary"),
    (["distill=sft"], "distill.teacher_outputs=stored needs a teacher's loss term"),
    (["distill.alpha=1.0"], "distill.teacher_outputs=stored needs a teacher's loss term"),
])
def test_bad_stored_settings_are_refused_before_any_teacher_is_trained(tmp_path, extra, message):
    with pytest.raises(ClpdError, match=message):
        run_train(kd_cfg(tmp_path, "distill.teacher_outputs=stored", *extra), tmp_path / "run", QUIET)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("c-*"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_truncated_store_stops_the_run_before_its_first_step(tmp_path):
    run_train(kd_cfg(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=4"), tmp_path / "one", QUIET)
    [folder] = (tmp_path / "cache" / "outputs").glob("c-k4-*")
    data = (folder / "rows.npy").read_bytes()
    (folder / "rows.npy").write_bytes(data[:-8])
    with pytest.raises(ClpdError, match=r"damaged \(rows.npy"):
        run_train(kd_cfg(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=4"), tmp_path / "two", QUIET)
    assert not (tmp_path / "two" / "checkpoints").exists()


@pytest.mark.slow
def test_two_runs_that_need_one_missing_store_build_it_once_and_both_finish(tmp_path):
    # The ladder first (so that the two runs meet at the store, not at the teacher).
    run_train(kd_cfg(tmp_path, "teachers.build_only=true"), tmp_path / "ladder", QUIET)
    overrides = kd_overrides(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=4", "distill.store_batch_size=1")
    runs = clpd_trains_at_once(overrides, [tmp_path / "one", tmp_path / "two"], cwd=REPO)
    both = "".join(out for _, out in runs)
    assert [rc for rc, _ in runs] == [0, 0], both[-6000:]
    # One run builds the store, the other reads it: after waiting on the entry's lock if it came
    # while the build ran, or at once if it came after (start-up under load decides which; the
    # wait itself is tested deterministically in tests/test_cache.py).
    assert both.count("storing teacher c's top-4 logits") == 1, both[-4000:]
    assert both.count("teacher c: reusing stored outputs") == 1, both[-4000:]
    assert len(list((tmp_path / "cache" / "outputs").glob("c-k4-*"))) == 1


def test_the_plan_names_the_stores_a_run_would_read(tmp_path):
    from rich.console import Console as RichConsole

    from clpd.commands.plan import run_plan

    console = RichConsole(record=True, width=200)
    run_plan(kd_cfg(tmp_path, "distill.teacher_outputs=stored", "distill.top_k=8"), tmp_path / "plan", console)
    line = next(line for line in console.export_text().splitlines() if line.startswith("teacher outputs:"))
    assert line.startswith("teacher outputs: stored, top-8 (built first when not in")
    assert line.endswith(" for c")  # standard KD: the strongest rung alone
