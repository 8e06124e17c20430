"""GSM8K: the Hugging Face dataset (``openai/gsm8k``), or a local copy of the original jsonl files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Mapping

from clpd.config.schema import BenchmarkConfig
from clpd.data.records import Problem, count_steps, normalize_answer
from clpd.errors import ClpdError, first_line


def _problem(split: str, i: int, question: str, solution: str) -> Problem:
    return Problem(id=f"gsm8k-{split}-{i}", question=question, solution=solution,
                   answer=normalize_answer(solution.rsplit("####", 1)[1]),
                   num_steps=count_steps(solution), source="gsm8k")


def _from_hub(split: str, cfg: BenchmarkConfig) -> List[Problem]:
    try:
        import datasets

        rows: Iterable[Mapping] = datasets.load_dataset(cfg.hf_path, cfg.hf_config, split=split)
        out = []
        for i, row in enumerate(rows):
            if "####" not in row["answer"]:
                raise ValueError(f"record {i} has no '####' line in its answer")
            out.append(_problem(split, i, row["question"], row["answer"]))
        return out
    except ClpdError:
        raise
    except Exception as e:  # no network, no such dataset/config/split, a changed schema
        raise ClpdError(f"could not load the dataset {cfg.hf_path} ({cfg.hf_config}, split {split}): {first_line(e)}; "
                        f"offline, use benchmark.data_dir=PATH (a folder with train.jsonl/test.jsonl)") from e


def _from_folder(split: str, cfg: BenchmarkConfig) -> List[Problem]:
    folder = Path(cfg.data_dir).expanduser()
    if not folder.is_dir():
        raise ClpdError(f"benchmark.data_dir={cfg.data_dir}: no such folder")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise ClpdError(f"benchmark.data_dir={cfg.data_dir}: no file {path.name} for split '{split}' "
                        f"(splits there: {', '.join(have) if have else 'none, no *.jsonl files'})")
    out: List[Problem] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ClpdError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise ClpdError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(rec).__name__}")
            for key in ("question", "answer"):
                if not isinstance(rec.get(key), str):
                    raise ClpdError(f"{where}: missing key '{key}' (a string)" if key not in rec
                                    else f"{where}: '{key}' must be a string")
            if "####" not in rec["answer"]:
                raise ClpdError(f"{where}: the answer has no '#### <number>' final line")
            out.append(_problem(split, len(out), rec["question"], rec["answer"]))
    return out


def load(split: str, cfg: BenchmarkConfig) -> List[Problem]:
    """The problems of one split, ids ``gsm8k-{split}-{i}`` in file order."""
    return _from_hub(split, cfg) if cfg.data_dir is None else _from_folder(split, cfg)
