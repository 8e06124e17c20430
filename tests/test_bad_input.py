"""Bad input is refused in one line that names the key (and the allowed values), before any work.

Every case runs ``clpd <command> ...`` in this process (``clpd.cli.main``: no interpreter start-up
per case) with ``hydra.run.dir`` and ``teachers.cache_dir`` under the test's tmp dir, and checks:
a non-zero exit, exactly one line of error output, starting ``clpd <command>: error:``, holding
the key and the allowed values, no traceback; and for ``train`` that the teacher cache is still
empty (no teacher was built, no teacher folder created) and the run dir holds no checkpoints.

The train cases also pass a tiny teacher build and student run (``SAFETY``, before the case's own
overrides): should a check ever move back behind the teacher build, the case fails in seconds on
the cache check instead of training a ladder for minutes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from clpd import cli
from tests.conftest import GPT2_DIR, GSM8K_DIR, SVAMP_DIR

SAFETY = ["teachers.build.max_steps=2", "teachers.build.eval=false", "trainer.max_steps=2", "trainer.warmup_steps=0",
          "trainer.batch_size=4", "trainer.grad_accum=1"]

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not here (../shared holds the local stand-ins)")


# id: (command, overrides, substrings the one error line must hold); {name} is a path made by _paths
CASES = {
    # student
    "student arch unknown": ("train", ["student.arch=gpt2"], ["student.arch", "llama, qwen2"]),
    "student heads do not divide hidden": ("train", ["student.num_heads=3"],
                                           ["student.hidden_size=64 must be divisible by student.num_heads=3"]),
    "student path missing": ("train", ["student.path=/does/not/exist"],
                             ["student.path=/does/not/exist: no such file or folder"]),
    "student path not a model folder": ("train", ["student.path={empty}"],
                                        ["student.path={empty}: not a checkpoint or model folder",
                                         "config.json, adapter_config.json"]),
    "student gguf without path": ("train", ["student.gguf_file=model.gguf"],
                                  ["student.gguf_file needs student.path"]),
    "student vocab smaller than tokenizer": ("train", ["student.vocab_size=10"],
                                             ["student.vocab_size=10", "allowed: >= 100"]),
    "student tokenizer missing": ("train", ["student.tokenizer=/does/not/exist"],
                                  ["student.tokenizer=/does/not/exist: no such file or folder"]),
    # LoRA
    "lora target typo with a ladder to build": (
        "train", ["+experiment=arith_kd", "student.lora.enabled=true", "student.lora.target_modules=[nope]"],
        ["student.lora.target_modules=['nope']", "nope not a layer",
         "allowed: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (linear layers)"]),
    "lora target typo on a pretrained student folder": (
        "train", ["+experiment=arith_sft", "student.path={pretrained}", "student.lora.enabled=true",
                  "student.lora.target_modules=[q_proj,qkv]"],
        ["student.lora.target_modules=['q_proj', 'qkv']: qkv not a layer", "allowed: down_proj, gate_proj, k_proj"]),
    "lora rank zero": ("train", ["student.lora.enabled=true", "student.lora.r=0"], ["student.lora.r=0 must be >= 1"]),
    # teachers
    "teacher path missing": ("train", ["+experiment=arith_kd", "teachers.ladder.2.path=/does/not/exist"],
                             ["teachers.ladder.2.path=/does/not/exist (teacher large): no such file or folder"]),
    "teacher path not a model folder": ("train", ["+experiment=arith_kd", "teachers.schedule=progressive",  # uses small
                                                  "teachers.ladder.0.path={empty}"],
                                        ["teachers.ladder.0.path={empty} (teacher small): not a checkpoint or model",
                                         "found none of config.json, adapter_config.json"]),
    "teacher tokenizer differs from the student's": (
        "train", ["+experiment=arith_kd", "teachers.ladder=[{{name: big, tokenizer: '%s'}}]" % GPT2_DIR],
        ["teachers.ladder.0.tokenizer=", "have different tokenizers"]),
    "teacher schedule unknown": ("train", ["teachers.schedule=bogus"],
                                 ["teachers.schedule", "strongest, weakest, progressive, fixed"]),
    "fixed teacher not in the ladder": ("train", ["teachers.schedule=fixed", "teachers.fixed=huge"],
                                        ["teachers.fixed=huge", "['small', 'medium', 'large']"]),
    "teacher boundaries count": ("train", ["teachers.boundaries=[0.5]"], ["teachers.boundaries=[0.5] needs 2 values"]),
    "teacher build override typo": ("train", ["++teachers.build_overrides.small.max_stepz=3"],
                                    ["teachers.build_overrides.small.max_stepz", "allowed: data_seed, seed, max_steps"]),
    "teacher cache dir is a file": ("train", ["teachers.cache_dir={file}"],
                                    ["teachers.cache_dir={file}: a file, not a folder"]),
    # curriculum
    "curriculum pacing unknown": ("train", ["curriculum.pacing=foo"], ["curriculum.pacing", "none, linear, root"]),
    "curriculum start out of range": ("train", ["curriculum.start=1.5"], ["curriculum.start=1.5 must be in (0, 1]"]),
    "teacher_loss teacher not in the ladder": (
        "train", ["curriculum.difficulty=teacher_loss", "curriculum.teacher=giant"],
        ["curriculum.teacher=giant must name a teacher of the ladder", "['small', 'medium', 'large']"]),
    # distill
    "distill loss unknown": ("train", ["distill.loss=kl"], ["distill.loss", "forward_kl", "reverse_kl"]),
    "distillation without teachers": ("train", ["teachers=none", "distill=forward_kl"],
                                      ["distill.loss=forward_kl needs a teacher ladder"]),
    "distill temperature zero": ("train", ["distill.temperature=0"], ["distill.temperature=0", "must be > 0"]),
    "vocabulary slice of zero rows": ("train", ["distill.vocab_slice_size=0"],
                                      ["distill.vocab_slice_size=0 must be >= 1 (or null for whole rows)"]),
    # benchmark
    "benchmark unknown": ("train", ["benchmark=nope"], ["benchmark", "available: arith, gsm8k, jsonl, svamp"]),
    "benchmark data dir missing": ("train", ["benchmark=gsm8k", "benchmark.data_dir=/does/not/exist"],
                                   ["benchmark.data_dir=/does/not/exist: no such folder"]),
    "gsm8k broken line": ("train", ["benchmark=gsm8k", "benchmark.data_dir={broken}"],
                          ["{broken}/train.jsonl:2: not valid JSON"]),
    "gsm8k split file missing": ("train", ["benchmark=gsm8k", f"benchmark.data_dir={GSM8K_DIR}",
                                           "benchmark.eval_split=dev"],
                                 ["benchmark.eval_split=dev: no dev.jsonl", "allowed: test, test_socratic, train"]),
    "svamp for training": ("train", ["benchmark=svamp", f"benchmark.data_dir={SVAMP_DIR}"],
                           ["benchmark=svamp is for evaluation only", "arith or gsm8k"]),
    "arith split unknown": ("train", ["benchmark.train_split=dev"],
                            ["benchmark.train_split=dev", "allowed: train, validation, test"]),
    "arith empty training split": ("train", ["benchmark.train_size=0"], ["benchmark.train_size=0", "allowed: >= 1"]),
    # trainer
    "precision unknown": ("train", ["trainer.precision=fp8"], ["trainer.precision", "auto, fp32, bf16, fp16"]),
    "stage placement unknown": ("train", ["curriculum.stage_placement=middle"],
                                ["curriculum.stage_placement", "pool, steps, band"]),
    "batch not divisible by grad_accum": ("train", ["trainer.batch_size=30", "trainer.grad_accum=4"],
                                          ["trainer.batch_size=30 must be divisible by trainer.grad_accum=4"]),
    "max_steps zero": ("train", ["trainer.max_steps=0"], ["trainer.max_steps=0 must be >= 1"]),
    "resume from a folder that is not a checkpoint": (
        "train", ["trainer.resume={empty}"], ["trainer.resume={empty}: not a clpd checkpoint", "COMPLETE"]),
    "resume from a run folder": ("train", ["trainer.resume={old_run}"],
                                 ["trainer.resume={old_run}: not a clpd checkpoint",
                                  "did you mean trainer.resume={old_run}/checkpoints/final"]),
    "resume from a missing folder": ("train", ["trainer.resume=/does/not/exist"],
                                     ["trainer.resume=/does/not/exist", "expected auto or a checkpoint folder"]),
    "fp16 on a CPU": ("train", ["trainer.precision=fp16", "trainer.device=cpu"],
                      ["trainer.precision=fp16 needs a CUDA device", "allowed on a CPU: auto, fp32, bf16"]),
    "cuda without CUDA": pytest.param("train", ["trainer.device=cuda"],
                                      ["trainer.device=cuda", "allowed here: auto, cpu"], marks=NO_CUDA),
    "unknown trainer key": ("train", ["trainer.max_step=5"], ["trainer.max_step", "Key 'max_step' not in 'TrainerConfig'; allowed: max_steps, max_tokens,"]),
    "two mistakes reported together": ("train", ["student.path=/does/not/exist", "benchmark.train_split=dev"],
                                       ["student.path=/does/not/exist", "; benchmark.train_split=dev"]),
    # eval
    "eval checkpoint is not a checkpoint": ("eval", ["checkpoint={empty}"],
                                            ["checkpoint={empty}: not a checkpoint or model folder",
                                             "found none of config.json, adapter_config.json",
                                             "<run>/checkpoints/final"]),
    "eval checkpoint is a run folder": ("eval", ["checkpoint={old_run}"],
                                        ["checkpoint={old_run}: not a checkpoint or model folder",
                                         "did you mean checkpoint={old_run}/checkpoints/final"]),
    "eval checkpoint missing": ("eval", ["checkpoint=/does/not/exist"], ["checkpoint=/does/not/exist: no such file"]),
    "eval without a checkpoint": ("eval", [], ["checkpoint is required"]),
    "eval damaged checkpoint": ("eval", ["checkpoint={damaged}"],
                                ["checkpoint: checkpoint {damaged} is damaged: model.safetensors has 3 bytes, 8 were written"]),
    "eval gguf file missing": ("eval", ["checkpoint={model}", "gguf_file=model.gguf"],
                               ["gguf_file=model.gguf: no such file in checkpoint={model}", "GGUF files there: none"]),
    "eval svamp without data": ("eval", ["checkpoint={model}", "benchmark=svamp"],
                                ["benchmark=svamp is local-only", "benchmark.data_dir=PATH"]),
    # a file benchmark (benchmark=jsonl): fields named {"problem", "final", "level", "work"}
    "file benchmark field missing": ("eval", ["checkpoint={model}", "benchmark=jsonl", "benchmark.path={problems}"],
                                     ["benchmark.fields.question=question: no such field in {problems}",
                                      "fields found: problem, final, level, work"]),
    "file benchmark path missing": ("eval", ["checkpoint={model}", "benchmark=jsonl", "benchmark.path=/no/such.jsonl"],
                                    ["benchmark.path=/no/such.jsonl: no such file"]),
    "file benchmark of an unknown type": ("eval", ["checkpoint={model}", "benchmark=jsonl", "benchmark.path={file}"],
                                          ["benchmark.path={file}: unknown file type ''", "allowed: .jsonl, .json, .csv"]),
    "file benchmark unreadable": ("eval", ["checkpoint={model}", "benchmark=jsonl", "benchmark.path={corrupt}"],
                                  ["benchmark.path={corrupt}: could not be read"]),
    "file benchmark without a numeric answer": (
        "eval", ["checkpoint={model}", "benchmark=jsonl", "benchmark.path={problems}", "benchmark.fields.question=problem",
                 "benchmark.fields.answer=work"],
        ["{problems}: no answer in benchmark.fields.answer=work is a number (first: 'She has some.')"]),
    "file benchmark without solutions for training": (
        "train", ["benchmark=jsonl", "benchmark.path={problems}", "benchmark.fields.question=problem",
                  "benchmark.fields.answer=final"],
        ["benchmark.fields.solution=null: training needs a worked solution", "for clpd eval only"]),
    "eval fp16 on a CPU": ("eval", ["checkpoint={model}", "precision=fp16", "device=cpu"],
                           ["precision=fp16 needs a CUDA device", "allowed on a CPU: auto, fp32, bf16"]),
}

NEEDS = {"teacher tokenizer differs from the student's": GPT2_DIR,
         "lora target typo on a pretrained student folder": GPT2_DIR, "gsm8k split file missing": GSM8K_DIR,
         "svamp for training": SVAMP_DIR}


def _params():
    for name, case in CASES.items():
        if not hasattr(case, "marks"):  # a plain (command, overrides, expected) tuple
            case = pytest.param(*case)
        marks = list(case.marks) + ([_needs(NEEDS[name])] if name in NEEDS else [])
        yield pytest.param(*case.values, marks=marks, id=name)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretrained model folder without weights (config and tokenizer only): enough for every
    check, which must not load weights. A tiny Llama with the GPT-2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = tmp_path_factory.mktemp("pretrained")
    if GPT2_DIR.exists():
        AutoTokenizer.from_pretrained(str(GPT2_DIR)).save_pretrained(folder)
    LlamaConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64).save_pretrained(folder)
    return folder


def _paths(tmp: Path) -> dict:
    """Folders that look like something they are not."""
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model\n")
    model = tmp / "model"  # passes the folder check (config.json); never loaded: the case fails earlier
    model.mkdir()
    (model / "config.json").write_text("{}\n")
    old_run = tmp / "old_run"  # a run folder, given where a checkpoint is expected
    for step in ("step-0000010", "final"):
        (old_run / "checkpoints" / step).mkdir(parents=True)
        (old_run / "checkpoints" / step / "COMPLETE").write_text(json.dumps({"files": {}}))
    damaged = tmp / "damaged"  # a clpd checkpoint whose weights were truncated
    damaged.mkdir()
    (damaged / "config.json").write_text("{}\n")
    (damaged / "model.safetensors").write_bytes(b"abc")
    (damaged / "COMPLETE").write_text(json.dumps({"files": {"model.safetensors": {"bytes": 8, "sha256": "0"}}}))
    broken = tmp / "gsm8k"
    broken.mkdir()
    good = json.dumps({"question": "1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
    (broken / "train.jsonl").write_text(good + "\n" + '{"question": "broken", "answer": \n')
    (broken / "test.jsonl").write_text(good + "\n")
    file = tmp / "a_file"
    file.write_text("")
    problems = tmp / "problems.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "Ava has 3 pens. She buys 2 more. How many pens now?", "final": "5", "level": 1, "work": "She has some."},
        {"problem": "Ben has 1,200 coins. He gets 34 more. How many now?", "final": "1,234", "level": 2, "work": "No."}]))
    corrupt = tmp / "problems.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    return {"empty": empty, "model": model, "old_run": old_run, "damaged": damaged, "broken": broken, "file": file,
            "problems": problems, "corrupt": corrupt}


def run_clpd(args: list, capsys) -> tuple[int, list, str]:
    """``clpd *args`` in this process: (exit status, the non-empty lines of error output, stdout)."""
    try:
        status, message = cli.main(args), ""
    except SystemExit as exc:  # run_command ends a single run's user error with SystemExit("clpd ...: error: ...")
        status, message = (1, exc.code) if isinstance(exc.code, str) else (exc.code, "")
    out = capsys.readouterr()
    lines = [line for line in (out.err + "\n" + message).splitlines() if line.strip()]
    return status, lines, out.out


@pytest.mark.parametrize("command, overrides, expected", list(_params()))
def test_bad_input_is_refused_in_one_line_before_any_work(command, overrides, expected, tmp_path, capsys,
                                                          monkeypatch, pretrained):
    paths = {**_paths(tmp_path), "pretrained": pretrained}
    monkeypatch.chdir(tmp_path)  # anything written to a relative default path would land here
    monkeypatch.setattr(sys, "argv", ["clpd"])  # cli.main rewrites sys.argv for Hydra
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    run, cache = tmp_path / "run", tmp_path / "cache"
    cache.mkdir()
    args = [command, f"hydra.run.dir={run}"]
    if command == "train":
        args += [f"teachers.cache_dir={cache}", *SAFETY]
    args += [o.format(**paths) for o in overrides]

    status, lines, stdout = run_clpd(args, capsys)

    assert status != 0
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"clpd {command}: error:"), line
    for text in expected:
        assert text.format(**paths) in line, line
    assert "Traceback" not in line + stdout
    assert not any(cache.iterdir()), f"a teacher folder was created: {list(cache.iterdir())}"
    assert not (run / "checkpoints").exists()
    assert not (tmp_path / "outputs").exists()
