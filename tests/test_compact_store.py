"""The compact rows of stored teacher outputs (clpd/teachers/compact.py): ids round-trip exactly,
any range of rows decodes from its own bytes, the loss on decoded rows is the loss on the fp32
top-k within 1e-3, and a store in the format before is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpd.bench.common import Shape, qwen_model
from clpd.config.model import ModelConfig
from clpd.config.schema import TrainConfig
from clpd.data import load_problems
from clpd.data.batching import answer_mask, collate
from clpd.data.prompts import encode_problems
from clpd.errors import ClpdError
from clpd.losses.divergences import DIVERGENCES
from clpd.losses.sparse import TopK, sparse_kd_loss_sum, top_k_outputs
from clpd.models.load import load_model
from clpd.models.tokenizer import build_char_tokenizer
from clpd.teachers.compact import Layout, decode, encode, from_bits, ids_from_bits, ids_to_bits, read_rows, to_bits, write_rows
from clpd.teachers.store import TeacherStore
from tests.test_teacher_store import build, encoded

QWEN_ROWS = 151936


def random_rows(rng: np.random.Generator, n: int, k: int, width: int) -> tuple:
    """n rows of k distinct ids below ``width``, logits and tails with a large spread."""
    ids = np.stack([rng.choice(width, k, replace=False) for _ in range(n)]).astype(np.int32)
    return ids, rng.normal(5.0, 4.0, (n, k)).astype(np.float32), rng.normal(0.0, 4.0, n).astype(np.float32)


@pytest.mark.parametrize("width", [100, 49152, QWEN_ROWS])
def test_ids_round_trip_exactly_in_fixed_bits_and_elias_fano(width):
    rng = np.random.default_rng(width)
    bits = int(np.ceil(np.log2(width)))  # 151,936 rows: 18 bits
    ids = rng.integers(0, width, (64, 32))
    assert np.array_equal(from_bits(to_bits(ids, bits), bits), ids)
    for k in (1, 8, 32, min(128, width)):
        layout = Layout(k, width)
        rows = np.sort(np.stack([rng.choice(width, k, replace=False) for _ in range(40)]), axis=1)
        assert np.array_equal(ids_from_bits(ids_to_bits(rows, layout), layout), rows)
        assert decode(encode(*random_rows(rng, 40, k, width), layout), layout)[0].shape == (40, k)


def test_the_top_32_of_151936_rows_take_under_100_bytes_a_row():
    # 453 bits of ids (Elias-Fano; 18-bit ids would take 576), 5 for the top, 31 * 10 of values, 6 + 20 of scale and tail
    assert Layout(32, QWEN_ROWS).row_bits == 794


@pytest.mark.parametrize("k, width", [(32, QWEN_ROWS), (8, 49152), (5, 100), (1, 7), (7, 7)])
def test_a_range_of_rows_decodes_as_the_same_rows_of_the_whole_stream(k, width):
    rng = np.random.default_rng(k)
    layout = Layout(k, width)
    ids, values, tails = random_rows(rng, 57, k, width)
    bits = encode(ids, values, tails, layout)
    stream = np.zeros(layout.stream_bytes(57), dtype=np.uint8)
    for first, stop in [(20, 33), (0, 7), (50, 57), (33, 50), (7, 20)]:  # written in any order, as the builder does
        write_rows(stream, first, bits[first:stop], layout)
    whole = decode(read_rows(stream, 0, 57, layout), layout)
    for first, count in [(0, 1), (13, 9), (3, 54), (56, 1)]:
        part = decode(read_rows(stream, first, count, layout), layout)
        for got, expected in zip(part, whole):
            assert np.array_equal(got, expected[first:first + count])
    indices, values_back, tails_back = whole
    assert np.array_equal(indices, np.sort(ids, axis=1))
    order = np.argsort(ids, axis=1)
    largest = values.max(axis=1, keepdims=True)
    gaps = largest - np.take_along_axis(values, order, axis=1)
    # Half a code step at the row's scale: 1023 codes over log(1 + 4) of mu-law, the scale at most
    # 2^(1/4) above the largest gap: at most 1.2e-3 of that gap.
    assert (np.abs(values_back + gaps) <= 1.2e-3 * gaps.max(axis=1, keepdims=True) + 1e-6).all()
    assert (np.abs(tails_back - (tails - largest[:, 0])) <= 2 ** -15 + 1e-5).all()


def compact(top: TopK, width: int) -> TopK:
    layout = Layout(top.indices.size(1), width)
    arrays = decode(encode(top.indices.numpy(), top.values.numpy(), top.tail_lse.numpy(), layout), layout)
    return TopK(*(torch.from_numpy(a) for a in arrays))


def worst_relative_error(student: torch.Tensor, top: TopK, width: int, rows: int, temperature: float = 1.0) -> dict:
    """Per divergence, the largest relative difference of the summed loss over ``rows``-row
    micro-batches between the fp32 top-k and its compact rows. The student's logits are taken in
    fp64: a KL near 0 in fp32 carries rounding of about 1e-3 of itself, which is not the store's."""
    stored, worst = compact(top, width), {}
    for name in DIVERGENCES:
        for a in range(0, student.size(0), rows):
            loss = [float(sparse_kd_loss_sum(student[a:a + rows].double(), TopK(*(t[a:a + rows] for t in which)),
                                             torch.zeros(min(rows, student.size(0) - a), dtype=torch.long),
                                             divergence=name, temperature=temperature, chunk_size=64))
                    for which in (top, stored)]
            worst[name] = max(worst.get(name, 0.0), abs(loss[1] - loss[0]) / abs(loss[0]))
    return worst


def trained(model: torch.nn.Module, examples: list, steps: int, pad_id: int) -> torch.nn.Module:
    """``model`` after ``steps`` steps of cross-entropy on ``examples`` (16 a step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = collate([examples[i] for i in torch.randint(0, len(examples), (16,), generator=g).tolist()], pad_id)
        targets = batch.pop("targets")
        loss = F.cross_entropy(model(**batch, use_cache=False).logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_the_loss_on_a_trained_teachers_compact_rows_is_within_1e_3_of_the_fp32_top_k():
    tc, tokenizer = TrainConfig(), build_char_tokenizer()
    _, examples, _ = encode_problems(load_problems(tc.benchmark, "train", 400), tokenizer, tc.benchmark.chat_template,
                                     tc.trainer.max_length)
    torch.manual_seed(0)
    teacher = trained(load_model(ModelConfig(name="t", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                                 tokenizer), examples, 30, tokenizer.pad_token_id)
    torch.manual_seed(1)  # a student part of the way: closer to the teacher, so a smaller loss to get right
    student = trained(load_model(ModelConfig(name="s", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                                 tokenizer), examples, 10, tokenizer.pad_token_id)
    batch = collate(examples[-24:], tokenizer.pad_token_id)
    keep = answer_mask(batch.pop("targets"))
    with torch.no_grad():
        t_logits, s_logits = (m(**batch, logits_to_keep=keep, use_cache=False).logits for m in (teacher, student))
    width = len(tokenizer)
    assert (t_logits.max(-1).values - t_logits.topk(32).values[:, -1]).median() > 3  # trained: a spread of logits
    for k in (8, 32):
        for temperature in (1.0, 2.0):
            worst = worst_relative_error(s_logits, top_k_outputs(t_logits, k, width), width, 16, temperature)
            assert max(worst.values()) < 1e-3, (k, temperature, worst)


def test_the_loss_on_a_random_152k_row_teachers_compact_rows_is_within_1e_3_of_the_fp32_top_k():
    # The size benchmark's teacher (clpd.bench.store size), another seed as the student: nearly flat
    # logits, where the tail holds almost all the mass and its 20 bits carry the error.
    shape = Shape(16, 1, 2, 1, 32, QWEN_ROWS, tied=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, QWEN_ROWS, (4, 64), generator=g)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, 32:] = True
    with torch.no_grad():
        t_logits, s_logits = (qwen_model(shape, 64, seed).eval()(input_ids=ids, logits_to_keep=positions,
                                                                 use_cache=False).logits for seed in (0, 1))
    for k in (8, 32, 128):
        worst = worst_relative_error(s_logits, top_k_outputs(t_logits, k, QWEN_ROWS), QWEN_ROWS, 128)
        assert max(worst.values()) < 1e-3, (k, worst)


def test_a_store_in_the_format_before_is_refused_in_one_line_that_names_the_fix(tmp_path):
    *_, key, folder = build(tmp_path, encoded(), top_k=4)
    marker = json.loads((folder / "store.json").read_text())
    assert marker["format"] == 2 and sorted(marker["files"]) == ["offsets.npy", "rows.npy"]
    del marker["format"]  # as format 1 wrote it
    (folder / "store.json").write_text(json.dumps(marker))
    with pytest.raises(ClpdError) as refused:
        TeacherStore(folder, key)
    message = str(refused.value)
    assert "\n" not in message and "store format 1" in message and "reads format 2" in message
    assert "delete the folder" in message and "teachers.build_only=true distill.teacher_outputs=stored" in message
