"""SVAMP (Patel et al., 2021): 1000 one- and two-step word problems, for evaluation only.

SVAMP has no chain of thought, so ``solution`` is just ``#### <answer>``. It is read from a local
``SVAMP.json`` (the file of the original repository); there is no hub loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

from clpd.config.schema import BenchmarkConfig
from clpd.data.records import Problem, format_number
from clpd.errors import ClpdError

FILE = "SVAMP.json"
OPERATOR = re.compile(r"[-+*/]")
HOW_TO = f"set benchmark.data_dir=PATH, a folder with {FILE} (or the file itself)"


def _path(cfg: BenchmarkConfig) -> Path:
    if cfg.data_dir is None:
        raise ClpdError(f"benchmark=svamp is local-only: {HOW_TO}")
    p = Path(cfg.data_dir).expanduser()
    if p.is_dir():
        p = p / FILE
    if not p.is_file():
        raise ClpdError(f"benchmark.data_dir={cfg.data_dir}: no {FILE} there; {HOW_TO}")
    return p


def load(split: str, cfg: BenchmarkConfig) -> List[Problem]:
    """All 1000 problems, whatever the split name (SVAMP has a single evaluation set)."""
    path = _path(cfg)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClpdError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ClpdError(f"{path}: expected a JSON list of problems, got {type(records).__name__}")
    out: List[Problem] = []
    for i, rec in enumerate(records):
        try:
            body = str(rec["Body"]).strip()
            if not body.endswith("."):
                body += "."
            answer = format_number(rec["Answer"])
            n_ops = len(OPERATOR.findall(str(rec["Equation"])))
            out.append(Problem(id=f"svamp-{rec['ID']}", question=f"{body} {str(rec['Question']).strip()}",
                               solution=f"#### {answer}", answer=answer, num_steps=max(1, n_ops), source="svamp"))
        except (KeyError, TypeError, ValueError) as e:
            raise ClpdError(f"{path}: problem {i}: needs ID, Body, Question, Equation and a numeric Answer ({_what(e)})") from e
    return out


def _what(e: Exception) -> str:
    return f"missing {e}" if isinstance(e, KeyError) else str(e)
