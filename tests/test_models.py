"""The model factory, the character tokenizer, and checkpoints that plain transformers loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from clpd.config.enums import Arch, Precision
from clpd.config.model import ModelConfig
from clpd.errors import ClpdError
from clpd.models.load import load_model, load_tokenizer, resolve_precision
from clpd.models.tokenizer import build_char_tokenizer
from tests.conftest import GPT2_DIR, needs

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=128)


def test_char_tokenizer_is_one_token_per_character_and_round_trips():
    tok = build_char_tokenizer()
    text = "Question: Ava has 7 pens.\nAnswer: 7+5 = <<7+5=12>>12\n#### 12"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_char_tokenizer_reloads_with_plain_transformers_without_clpd(tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    code = ("import sys; sys.modules['clpd'] = None\n"  # importing clpd would fail here
            "from transformers import AutoTokenizer\n"
            f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
            "ids = t('7+5 = 12\\n', add_special_tokens=False).input_ids\n"
            "assert t.decode(ids) == '7+5 = 12\\n', t.decode(ids)\n"
            "print(len(ids), t.eos_token, t.pad_token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["9", "</s>", "<pad>"]


@pytest.mark.parametrize("arch", [Arch.llama, Arch.qwen2])
def test_from_scratch_models_of_both_architectures_match_the_tokenizer(arch):
    spec = ModelConfig(name="t", arch=arch, num_kv_heads=1, **TINY)
    tok = load_tokenizer(spec)
    model = load_model(spec, tok)
    assert model.config.model_type == arch.value
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tok))


def test_from_scratch_weights_are_a_function_of_the_seed():
    spec = ModelConfig(name="t", **TINY)
    tok = load_tokenizer(spec)
    weights = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        weights.append(load_model(spec, tok).get_input_embeddings().weight)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_a_from_scratch_model_can_use_an_existing_tokenizer():
    spec = ModelConfig(name="t", tokenizer=str(needs(GPT2_DIR)), **TINY)
    tok = load_tokenizer(spec)
    assert tok.pad_token_id == tok.eos_token_id  # GPT-2 has no pad token; eos stands in (masked anyway)
    assert load_model(spec, tok).get_input_embeddings().num_embeddings == len(tok) == 50257


def test_a_missing_local_path_is_refused_by_name_before_any_download():
    with pytest.raises(ClpdError, match="/does/not/exist: no such file or folder"):
        load_tokenizer(ModelConfig(name="t", path="/does/not/exist"))


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_cuda():
    assert resolve_precision(Precision.auto, torch.device("cpu")) is None
    assert resolve_precision(Precision.bf16, torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ClpdError, match="fp16 needs a CUDA device"):
        resolve_precision(Precision.fp16, torch.device("cpu"))
