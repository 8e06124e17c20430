"""The records the data flows in: the :class:`Problem` every benchmark produces (and the step count
used as its difficulty), and the mark of a token that no loss is taken on (:data:`IGNORE_INDEX`) in
the encoded examples' labels."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

IGNORE_INDEX = -100  # the label of a token no loss is taken on (prompt, padding), as torch's cross_entropy expects

# GSM8K's calculator annotations: ``<<16-3-4=9>>``.
ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class Problem:
    id: str  # unique within a split: "gsm8k-test-17", "arith-train-5", "svamp-chal-1"
    question: str
    solution: str  # GSM8K-format chain of thought: reasoning lines, last line "#### <answer>"
    answer: str  # final answer as text, normalised: no commas, no "$", no trailing "." ("1000", "-3", "2.5")
    num_steps: int  # difficulty feature: number of reasoning steps
    source: str  # "arith" | "gsm8k" | "svamp", or a file benchmark's task name
    # A difficulty the data gives (a file benchmark's difficulty field): the curriculum orders by it
    # instead of a scorer, and evaluation groups by it instead of num_steps.
    difficulty: Optional[float] = None


def count_steps(solution: str) -> int:
    """Reasoning steps in a GSM8K-format solution.

    The number of calculator annotations ``<<...>>`` when there are any (GSM8K annotates each
    calculation), else the number of non-empty lines before the ``####`` line; at least 1.
    """
    n = len(ANNOTATION.findall(solution))
    if n:
        return n
    lines = solution.split("\n")
    end = len(lines)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith("####"):
            end = i
            break
    return max(1, sum(1 for line in lines[:end] if line.strip()))


def format_number(x: float) -> str:
    """51.0 -> "51", 2.5 -> "2.5" (shortest text that reads back as the same float)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def normalize_answer(text: str) -> str:
    """The text of a final answer as stored in :class:`Problem`: stripped, no commas, no ``$``,
    no trailing ``.``."""
    s = text.strip().replace(",", "").replace("$", "").strip()
    if s.endswith("."):
        s = s[:-1]
    return s
