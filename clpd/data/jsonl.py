"""A benchmark from the user's own file: JSONL, a JSON list, CSV or Parquet (``datasets``' local
loaders), or a Hugging Face dataset, mapped to problems by field names.

``benchmark.path`` serves every split, ``train_path`` and ``eval_path`` the training and the
evaluation split (the few-shot split reads the file of its name: ``train`` or ``eval``); without
any path, ``hf_path``/``hf_config`` name a hub dataset whose splits are ``train_split`` and
``eval_split``. ``benchmark.fields`` names the fields: the question and the answer (a number, or a
text whose final number is taken: after ``####`` when there is one, else the last number), and
optionally a worked solution (what a student trains on), a difficulty (the curriculum's order)
and an id. Answers are compared numerically, as SVAMP's are.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from clpd.config.schema import BenchmarkConfig
from clpd.data.records import Problem, count_steps, format_number, normalize_answer
from clpd.errors import ClpdError, first_line

log = logging.getLogger("clpd.data")

# File extension -> the ``datasets`` builder that reads it.
# A number in a text answer: "1,234", "-3", "2.5".
NUMBERS = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def split_path(cfg: BenchmarkConfig, split: str) -> tuple[str, Optional[str]]:
    """(the setting's key, the local file) of ``split``; (``benchmark.hf_path``, None) for a hub dataset."""
    if split == cfg.train_split and cfg.train_path:
        return "benchmark.train_path", cfg.train_path
    if split == cfg.eval_split and cfg.eval_path:
        return "benchmark.eval_path", cfg.eval_path
    if cfg.path:
        return "benchmark.path", cfg.path
    return "benchmark.hf_path", None


def file_problem(cfg: BenchmarkConfig, split: str) -> Optional[str]:
    """What is wrong with the local file of ``split`` before it is read (None if nothing)."""
    key, path = split_path(cfg, split)
    if path is None:
        return None if cfg.hf_path else (f"benchmark=jsonl needs a file: set benchmark.path=FILE (or train_path/"
                                         f"eval_path; .jsonl, .json, .csv, .parquet), or hf_path=DATASET_ID")
    file = Path(path).expanduser()
    if not file.is_file():
        return f"{key}={path}: no such file"
    if file.suffix.lower() not in FORMATS:
        return f"{key}={path}: unknown file type '{file.suffix}'; allowed: {', '.join(FORMATS)}"
    return None


def read_rows(cfg: BenchmarkConfig, split: str) -> tuple[str, Sequence[Mapping[str, Any]]]:
    """(where the rows came from, the rows) of ``split``, through ``datasets``."""
    problem = file_problem(cfg, split)
    if problem:
        raise ClpdError(problem)
    key, path = split_path(cfg, split)
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)  # a file it cannot read: our one line, not its log and ours
    try:
        if path is None:
            return f"{cfg.hf_path} ({cfg.hf_config or 'default'}, split {split})", \
                datasets.load_dataset(cfg.hf_path, cfg.hf_config, split=split)
        builder = FORMATS[Path(path).suffix.lower()]
        return path, datasets.load_dataset(builder, data_files=str(Path(path).expanduser()), split="train")
    except Exception as e:  # unreadable, malformed, no network, no such dataset or split
        where = f"{key}={path}" if path else f"benchmark.hf_path={cfg.hf_path} (split {split})"
        raise ClpdError(f"{where}: could not be read ({first_line(e)})") from e
    finally:
        datasets.logging.set_verbosity(verbosity)


def answer_number(value: Any) -> Optional[str]:
    """The final answer as normalised text ("1234", "-3", "2.5"), or None if it holds no number.

    A number is taken as it is; a text gives the number after its last ``####`` if it has one,
    else its last number ("1,234" and "$5." included)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return _number(value)
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    last = NUMBERS.findall(text)
    return _number(normalize_answer(text)) or (_number(last[-1].replace(",", "")) if last else None)


def _number(x: Any) -> Optional[str]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return format_number(v) if math.isfinite(v) else None


def _solution(text: Any, answer: str) -> str:
    """A worked solution in the GSM8K format: its reasoning, then ``#### <answer>`` (added when the
    solution does not end with one)."""
    s = str(text).rstrip()
    return s if "####" in s else f"{s}\n#### {answer}"


def _difficulty(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v):
        raise ClpdError(f"{where}: the difficulty {value!r} is not a number (benchmark.fields.difficulty)")
    return v


def check_fields(cfg: BenchmarkConfig, where: str, columns: Sequence[str]) -> None:
    f = cfg.fields
    for key in ("question", "answer", "solution", "difficulty", "id"):
        name = getattr(f, key)
        if name is not None and name not in columns:
            raise ClpdError(f"benchmark.fields.{key}={name}: no such field in {where}; fields found: "
                            f"{', '.join(columns) if columns else 'none'}")


def load(split: str, cfg: BenchmarkConfig) -> List[Problem]:
    """The problems of ``split``, in file order; a row whose answer holds no number is left out
    (and counted in a warning), a file where no answer does is refused."""
    where, rows = read_rows(cfg, split)
    columns = list(rows.column_names)
    check_fields(cfg, where, columns)
    f, task = cfg.fields, cfg.label()
    problems: List[Problem] = []
    skipped: List[int] = []
    for i, row in enumerate(rows):
        answer = answer_number(row[f.answer])
        if answer is None:
            skipped.append(i)
            continue
        solution = _solution(row[f.solution], answer) if f.solution else f"#### {answer}"
        problems.append(Problem(
            id=str(row[f.id]) if f.id else f"{task}-{split}-{i}", question=str(row[f.question]).strip(),
            solution=solution, answer=answer, num_steps=count_steps(solution), source=task,
            difficulty=_difficulty(row[f.difficulty], f"{where}: row {i}") if f.difficulty else None))
    if skipped and not problems:
        raise ClpdError(f"{where}: no answer in benchmark.fields.answer={f.answer} is a number "
                        f"(first: {rows[skipped[0]][f.answer]!r})")
    if skipped:
        log.warning("%s: %d of %d answers (benchmark.fields.answer=%s) hold no number and are left out (rows %s)",
                    where, len(skipped), len(rows), f.answer, ", ".join(map(str, skipped[:10])) +
                    (", ..." if len(skipped) > 10 else ""))
    return problems
