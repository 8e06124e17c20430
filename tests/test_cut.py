"""Students cut from a model (``student.init_from`` + ``keep_layers``/``keep_every``), on tiny
from-scratch Llama and Qwen2 models: what the cut keeps, that keeping everything changes nothing,
the parameter count, checkpoints plain transformers loads, and bad input refused before any work.
(tests/test_smollm2.py does the same with the real SmolLM2-135M-Instruct.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from clpd.config.enums import Arch
from clpd.config.schema import EvalConfig, to_object
from clpd.config.model import ModelConfig, StudentConfig
from clpd.errors import ClpdError
from clpd.models.load import (count_parameters, cut_layers, decoder_layers, init_source, layers_to_keep, load_model,
                         load_tokenizer)
from clpd.commands.run_train import run_train
from tests.conftest import TINY_OVERRIDES, compose_config
from tests.test_bad_input import run_clpd

QUIET = Console(quiet=True)
SHAPE = dict(hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, intermediate_size=64, max_position_embeddings=128)


def source_model(arch: Arch, seed: int = 0, **shape):
    spec = ModelConfig(name=f"src-{arch.value}", arch=arch, **{**SHAPE, **shape})
    tok = load_tokenizer(spec)
    torch.manual_seed(seed)
    return load_model(spec, tok).eval(), tok


def block_parameters(model, i: int) -> int:
    return sum(p.numel() for p in decoder_layers(model)[i].parameters())


@pytest.mark.parametrize("arch", [Arch.llama, Arch.qwen2])
@pytest.mark.parametrize("tied", [True, False])
def test_keeping_every_layer_gives_the_sources_logits_exactly(arch, tied):
    model, tok = source_model(arch, tie_embeddings=tied)
    cut = cut_layers(model, list(range(5))).eval()
    ids = torch.randint(0, len(tok), (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as in batched generation
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, cut(input_ids=ids, attention_mask=mask).logits)
    assert cut is not model and cut.config.num_hidden_layers == 5


@pytest.mark.parametrize("arch", [Arch.llama, Arch.qwen2])
def test_a_cut_keeps_the_embeddings_norm_head_and_the_chosen_blocks(arch):
    model, _ = source_model(arch, tie_embeddings=False)
    keep = [0, 2, 4]
    cut = cut_layers(model, keep, source="src")
    source_state, cut_state = model.state_dict(), cut.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(source_state[name], cut_state[name])
    for new, old in enumerate(keep):
        for key, value in decoder_layers(model)[old].state_dict().items():
            assert torch.equal(cut_state[f"model.layers.{new}.{key}"], value)
    # each block has its own index: the KV cache is indexed by it
    assert [layer.self_attn.layer_idx for layer in decoder_layers(cut)] == [0, 1, 2]
    assert cut.config.cut_from == {"model": "src", "layers": keep, "num_layers": 5}
    if arch == Arch.qwen2:  # per-layer settings are cut with the blocks
        assert len(cut.config.layer_types) == 3
    # the source is unchanged
    assert model.config.num_hidden_layers == 5 and len(decoder_layers(model)) == 5


@pytest.mark.parametrize("arch", [Arch.llama, Arch.qwen2])
@pytest.mark.parametrize("keep", [[0], [1, 3], [0, 1, 2, 3, 4]])
def test_the_cut_students_parameter_count_is_what_the_config_says(arch, keep):
    model, _ = source_model(arch)
    cut = cut_layers(model, keep)
    dropped = [i for i in range(5) if i not in keep]
    assert count_parameters(cut) == count_parameters(model) - sum(block_parameters(model, i) for i in dropped)
    assert cut.config.num_hidden_layers == len(keep) == len(decoder_layers(cut))


def test_greedy_generation_of_a_cut_model_is_the_same_with_and_without_the_kv_cache():
    model, tok = source_model(Arch.qwen2, seed=3)
    cut = cut_layers(model, [1, 4]).eval()
    ids = torch.randint(0, len(tok), (1, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(cut.generate(ids, use_cache=True, **kwargs), cut.generate(ids, use_cache=False, **kwargs))


def test_layers_to_keep_explicit_every_kth_and_all():
    s = StudentConfig(name="s", init_from="src", keep_layers=[4, 0, 2])
    assert layers_to_keep(s, 30) == [0, 2, 4]  # the source's order
    assert layers_to_keep(StudentConfig(name="s", init_from="src", keep_every=5), 30) == [0, 5, 10, 15, 20, 25]
    assert layers_to_keep(StudentConfig(name="s", init_from="src", keep_every=2), 5) == [0, 2, 4]
    assert layers_to_keep(StudentConfig(name="s", init_from="src"), 3) == [0, 1, 2]
    with pytest.raises(ClpdError, match=r"student.keep_layers=\[0, 30\]: \[30\] out of range: student.init_from=src "
                                        r"has 30 layers; allowed: 0..29"):
        layers_to_keep(StudentConfig(name="s", init_from="src", keep_layers=[0, 30]), 30)


@pytest.mark.parametrize("fields, message", [
    (dict(keep_layers=[]), "student.keep_layers=[] must name at least one layer"),
    (dict(keep_layers=[0, 2, 2, 0]), "student.keep_layers=[0, 2, 2, 0]: [0, 2] repeated"),
    (dict(keep_layers=[-1]), "student.keep_layers=[-1]: layers are numbered from 0"),
    (dict(keep_layers=[0], keep_every=2), "student.keep_layers and student.keep_every: set one"),
    (dict(keep_every=0), "student.keep_every=0 must be >= 1"),
    (dict(path="some/model"), "student.path=some/model and student.init_from=src: set one"),
])
def test_a_bad_cut_is_refused_by_the_schema_naming_the_key(fields, message):
    with pytest.raises(ClpdError, match="invalid student config") as err:
        StudentConfig(name="s", init_from="src", **fields)
    assert message in str(err.value)


def test_keep_layers_without_init_from_is_refused():
    with pytest.raises(ClpdError, match="student.keep_layers needs student.init_from"):
        StudentConfig(name="s", keep_layers=[0])


def test_init_from_a_ladder_name_is_that_teacher_else_a_path():
    ladder = [ModelConfig(name="small"), ModelConfig(name="big", path="/models/big", gguf_file="b.gguf")]
    assert init_source(StudentConfig(name="s", init_from="big"), ladder) is ladder[1]
    other = init_source(StudentConfig(name="s", init_from="/models/x", gguf_file="x.gguf"), ladder)
    assert (other.path, other.gguf_file) == ("/models/x", "x.gguf")


@pytest.fixture(scope="module")
def saved_source(tmp_path_factory) -> Path:
    """A tiny Qwen2 with the character tokenizer, saved as any Hugging Face model folder is."""
    model, tok = source_model(Arch.qwen2, seed=1)
    folder = tmp_path_factory.mktemp("source")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_student_cut_from_a_folder_has_its_tokenizer_and_its_blocks(saved_source):
    student = StudentConfig(name="s", init_from=str(saved_source), keep_layers=[0, 4])
    tok = load_tokenizer(student)
    assert tok.get_vocab() == load_tokenizer(ModelConfig(name="src", path=str(saved_source))).get_vocab()
    model = load_model(student, tok)
    assert model.config.num_hidden_layers == 2 and model.config.model_type == "qwen2"
    assert model.config.cut_from["layers"] == [0, 4] and model.config.cut_from["num_layers"] == 5


def test_a_cut_students_checkpoint_loads_in_plain_transformers_with_the_same_logits(tmp_path):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "student=tiny_qwen2",
                                   "student.num_layers=3", "trainer.max_steps=1", "trainer.eval_at_end=false"])
    source = run_train(cfg, tmp_path / "source", QUIET)["checkpoint"]
    cut = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, f"student.init_from={source}",
                                   "student.keep_layers=[0,2]", "trainer.max_steps=2", "trainer.eval_at_end=false"])
    summary = run_train(cut, tmp_path / "cut", QUIET)
    final = summary["checkpoint"]
    config = json.loads((Path(final) / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["cut_from"]["layers"] == [0, 2]
    code = ("import sys, torch; sys.modules['clpd'] = None\n"  # importing clpd would fail here
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({final!r}).eval(); t = AutoTokenizer.from_pretrained({final!r})\n"
            "ids = t('Question: 2+3?', return_tensors='pt', add_special_tokens=False).input_ids\n"
            "print(sum(p.numel() for p in m.parameters()), m(ids).logits[0, -1].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    spec = to_object(cut).student
    tok = load_tokenizer(spec)
    mine = load_model(ModelConfig(name="final", path=final), tok).eval()
    ids = tok("Question: 2+3?", return_tensors="pt", add_special_tokens=False).input_ids
    assert int(out[0]) == summary["student_parameters"] == count_parameters(mine)
    assert torch.allclose(torch.tensor(json.loads(out[1])), mine(ids).logits[0, -1].detach(), atol=1e-5)


def test_a_student_cut_from_a_from_scratch_teacher_of_the_ladder_by_name(tmp_path):
    """The embedded ladder's teachers are trained first, then the student is cut from one by name."""
    cfg = compose_config("train", [
        *TINY_OVERRIDES, "teachers.ladder=[{name: big, arch: llama, hidden_size: 32, num_layers: 3, num_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 256}]", "teachers.schedule=strongest",
        f"teachers.cache_dir={tmp_path / 'teachers'}", "teachers.build.max_steps=2", "teachers.build.eval=false",
        "teachers.build.batch_size=4", "teachers.build.grad_accum=1", "distill=forward_kl", "curriculum=none",
        "student.init_from=big", "student.keep_layers=[0,2]", "trainer.max_steps=2", "trainer.eval_at_end=false"])
    summary = run_train(cfg, tmp_path / "run", QUIET)
    config = json.loads((Path(summary["checkpoint"]) / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 32
    assert config["cut_from"]["model"].startswith(str(tmp_path / "teachers" / "big-"))


def test_eval_of_a_model_cut_to_some_layers(saved_source, tmp_path):
    from clpd.commands.eval import run_eval

    cfg = compose_config("eval", [f"checkpoint={saved_source}", "keep_layers=[1]", "benchmark.test_size=3",
                                  "max_new_tokens=4", f"hydra.run.dir={tmp_path}"])
    metrics = run_eval(cfg, tmp_path / "eval", QUIET)
    assert metrics["cut_from"]["layers"] == [1] and metrics["n"] == 3
    assert metrics["parameters"] == count_parameters(load_model(
        StudentConfig(name="s", init_from=str(saved_source), keep_layers=[1]), load_tokenizer(ModelConfig(name="c", path=str(saved_source)))))


def test_eval_config_checks_the_cut_too():
    with pytest.raises(ClpdError, match=r"keep_layers=\[3, 3\]: \[3\] repeated"):
        EvalConfig(checkpoint="x", keep_layers=[3, 3])


# --- bad input through the command line: one line naming the key, before any work ---------------------

CASES = {
    "keep_layers out of range of a folder": (
        "train", ["+experiment=arith_sft", "student.init_from={source}", "student.keep_layers=[0,5]"],
        ["student.keep_layers=[0, 5]: [5] out of range", "has 5 layers; allowed: 0..4"]),
    "keep_layers out of range of a ladder teacher": (
        "train", ["+experiment=arith_kd", "student.init_from=large", "student.keep_layers=[4]"],
        ["student.keep_layers=[4]: [4] out of range: student.init_from=large has 4 layers; allowed: 0..3"]),
    "keep_layers empty": ("train", ["student.init_from={source}", "student.keep_layers=[]"],
                          ["student.keep_layers=[] must name at least one layer"]),
    "keep_layers repeated": ("train", ["student.init_from={source}", "student.keep_layers=[1,1]"],
                             ["student.keep_layers=[1, 1]: [1] repeated"]),
    "keep_layers without init_from": ("train", ["student.keep_layers=[0]"],
                                      ["student.keep_layers needs student.init_from"]),
    "init_from missing folder": ("train", ["student.init_from=/does/not/exist"],
                                 ["student.init_from=/does/not/exist: no such file or folder"]),
    "init_from gguf not in the folder": (
        "train", ["student.init_from={source}", "student.gguf_file=model.Q4.gguf"],
        ["student.gguf_file=model.Q4.gguf: no such file in student.init_from={source}", "GGUF files there: none"]),
    "init_from a from-scratch teacher the run does not build": (
        "train", ["+experiment=arith_sft", "teachers=arith_tiny", "student.init_from=large"],
        ["student.init_from=large: the teacher large is trained from scratch by the ladder, which this run does not build"]),
    "init_from a package that is not installed": (
        "train", ["student.init_from=pkg:no_such_clpd_test_package"],
        ["student.init_from=pkg:no_such_clpd_test_package: the Python package no_such_clpd_test_package is not installed"]),
    "lora target the cut model does not have": (
        "train", ["+experiment=arith_sft", "student.init_from={source}", "student.keep_layers=[0,1]",
                  "student.lora.enabled=true", "student.lora.target_modules=[model.layers.3.self_attn.q_proj]"],
        ["student.lora.target_modules=['model.layers.3.self_attn.q_proj']: model.layers.3.self_attn.q_proj not a "
         "layer of the student's architecture (cut from {source})", "allowed: down_proj, gate_proj, k_proj"]),
    "student gguf of a ladder teacher": (
        "train", ["+experiment=arith_kd", "student.init_from=large", "student.gguf_file=x.gguf"],
        ["student.gguf_file=x.gguf: student.init_from=large names a teacher of the ladder"]),
    "teacher path a package that is not installed": (
        "train", ["+experiment=arith_kd", "teachers.ladder.2.path=pkg:no_such_clpd_test_package"],
        ["teachers.ladder.2.path=pkg:no_such_clpd_test_package (teacher large): the Python package "
         "no_such_clpd_test_package is not installed"]),
    "eval keep_layers out of range": ("eval", ["checkpoint={source}", "keep_layers=[7]"],
                                      ["keep_layers=[7]: [7] out of range: checkpoint={source} has 5 layers"]),
    "eval checkpoint a package that is not installed": (
        "eval", ["checkpoint=pkg:no_such_clpd_test_package"],
        ["checkpoint=pkg:no_such_clpd_test_package: the Python package no_such_clpd_test_package is not installed"]),
    "eval gguf not in a package folder": (
        "eval", ["checkpoint=pkg:clpd", "gguf_file=nope.gguf"],
        ["gguf_file=nope.gguf: no such file in checkpoint=", "GGUF files there: none"]),
    "eval few-shot split missing": (
        "eval", ["checkpoint={source}", "benchmark.num_fewshot=2", "benchmark.fewshot_split=dev"],
        ["benchmark.fewshot_split=dev: benchmark=arith has no such split; allowed: train, validation, test"]),
    "eval few-shot on svamp": ("eval", ["checkpoint={source}", "benchmark=svamp", "benchmark.num_fewshot=5"],
                               ["benchmark.num_fewshot=5: benchmark=svamp has no solutions"]),
    "eval few-shot negative": ("eval", ["checkpoint={source}", "benchmark.num_fewshot=-1"],
                               ["benchmark.num_fewshot=-1 must be >= 0"]),
}


@pytest.mark.parametrize("command, overrides, expected", list(CASES.values()), ids=list(CASES))
def test_a_bad_cut_or_source_is_refused_in_one_line_before_any_work(command, overrides, expected, saved_source,
                                                                    tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clpd"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    run, cache = tmp_path / "run", tmp_path / "cache"
    cache.mkdir()
    args = [command, f"hydra.run.dir={run}"]
    if command == "train":
        args += [f"teachers.cache_dir={cache}", "teachers.build.max_steps=2", "teachers.build.eval=false",
                 "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.batch_size=4", "trainer.grad_accum=1"]
    args += [o.format(source=saved_source) for o in overrides]
    status, lines, stdout = run_clpd(args, capsys)
    assert status != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"clpd {command}: error:"), lines[0]
    for text in expected:
        assert text.format(source=saved_source) in lines[0], lines[0]
    assert "Traceback" not in lines[0] + stdout
    assert not any(cache.iterdir()), "a teacher was built"
    assert not (run / "checkpoints").exists()
