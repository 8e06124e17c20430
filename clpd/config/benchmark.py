"""The benchmark a command reads: where its problems come from, which splits, how they are prompted
(a section of the typed configuration, :mod:`clpd.config.schema`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from clpd.config.enums import BenchmarkName
from clpd.errors import Problems


@dataclass
class FieldsConfig:
    """benchmark=jsonl: the names of the fields that hold each part of a problem."""
    question: str = "question"
    answer: str = "answer"  # a number, or a text whose final number is the answer
    solution: Optional[str] = None  # a worked solution to train on (none: evaluation only)
    difficulty: Optional[str] = None  # a number per problem: the curriculum's order instead of a scorer
    id: Optional[str] = None  # none: "<task>-<split>-<row>"


@dataclass
class BenchmarkConfig:
    """Where problems come from. One schema for all benchmarks; fields a benchmark does not use
    are ignored by it (the generator fields only matter for ``arith``)."""

    name: BenchmarkName = BenchmarkName.arith
    # gsm8k: None = the Hugging Face dataset ``hf_path``/``hf_config``; a folder with
    # train.jsonl/test.jsonl in the original format otherwise. svamp: folder with SVAMP.json.
    data_dir: Optional[str] = None
    hf_path: Optional[str] = "openai/gsm8k"
    hf_config: Optional[str] = "main"
    # jsonl: the user's file for every split, or one for the training and one for the evaluation
    # split (clpd/data/jsonl.py); without any, the hub dataset hf_path. task names it in the results.
    path: Optional[str] = None
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    fields: FieldsConfig = field(default_factory=FieldsConfig)
    task: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    train_limit: Optional[int] = None  # first N training problems (None: all)
    eval_limit: Optional[int] = None  # first N evaluation problems (None: all)
    chat_template: bool = False  # wrap question/answer in the tokenizer's chat template
    # Solved examples before each evaluation question, as lm-evaluation-harness's gsm8k (5-shot):
    # drawn with random.Random(fewshot_seed).sample from fewshot_split, anew for each question in
    # order; "Question: ...\nAnswer: <solution>" blocks joined by a blank line, or with
    # chat_template=true user/assistant turns (lm-eval's --fewshot_as_multiturn). Evaluation only:
    # training examples are always zero-shot.
    num_fewshot: int = 0
    fewshot_split: str = "train"
    fewshot_seed: int = 1234
    # arith generator
    seed: int = 1234  # generator seed; the problems are a pure function of these fields
    train_size: int = 20000
    test_size: int = 1000
    max_steps: int = 4  # problems have 1..max_steps reasoning steps (the difficulty)
    min_value: int = 2  # range of the numbers that appear in questions
    max_value: int = 12

    def __post_init__(self) -> None:
        p = Problems()
        for key in ("train_limit", "eval_limit"):
            v = getattr(self, key)
            p.check(v is None or v > 0, f"benchmark.{key}={v} must be > 0 (or null for all)")
        p.check(self.num_fewshot >= 0, f"benchmark.num_fewshot={self.num_fewshot} must be >= 0")
        if self.name == BenchmarkName.jsonl:
            p.check(bool(self.path or self.train_path or self.eval_path or self.hf_path),
                    "benchmark=jsonl needs a file: set benchmark.path=FILE (or train_path/eval_path; .jsonl, .json, "
                    ".csv, .parquet), or benchmark.hf_path=DATASET_ID")
        p.check(self.num_fewshot == 0 or self.name != BenchmarkName.svamp,
                f"benchmark.num_fewshot={self.num_fewshot}: benchmark=svamp has no solutions to show as examples; "
                f"allowed: 0")
        if self.name == BenchmarkName.arith:
            p.check(self.max_steps >= 1, f"benchmark.max_steps={self.max_steps} must be >= 1")
            p.check(1 <= self.min_value <= self.max_value,
                    f"benchmark.min_value={self.min_value}, max_value={self.max_value}: need 1 <= min_value <= max_value")
            p.check(self.train_size >= 0 and self.test_size >= 0, "benchmark.train_size and test_size must be >= 0")
        p.raise_if_any("invalid benchmark config: ")

    def numeric_answers(self) -> bool:
        """Whether answers are compared as numbers (2.50 is 2.5): SVAMP's floats and a file's answers."""
        return self.name in (BenchmarkName.svamp, BenchmarkName.jsonl)

    def label(self) -> str:
        """The benchmark's name in results: a file benchmark's ``task`` (else its file's name)."""
        if self.name != BenchmarkName.jsonl:
            return self.name.value
        return self.task or Path(self.path or self.eval_path or self.train_path or self.hf_path or "jsonl").stem
