"""Answer extraction and matching, exactly as lm-evaluation-harness scores gsm8k.

Checked against EleutherAI/lm-evaluation-harness ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (version 3),
``lm_eval/filters/extraction.py`` (``RegexFilter``) and ``exact_match_hf_evaluate`` in
``lm_eval/api/metrics.py``:

- strict-match: ``regex`` filter with ``#### (\\-?[0-9\\.\\,]+)`` and ``take_first``: the first match.
- flexible-extract: the same filter with ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` and ``group_select: -1``:
  the last match; ``findall`` gives a tuple of groups there, and lm-eval takes the non-empty one.
  The filter strips the extracted text.
- exact_match with ``regexes_to_ignore`` ``,`` ``\\$`` ``(?s).*#### `` ``\\.$`` (removed with
  ``re.sub`` in that order, on the prediction and on the reference), ``ignore_case``, no
  punctuation removal.

Differences: where lm-eval returns the fallback text ``[invalid]`` when nothing matches (which
never equals a number), these functions return None and ``is_correct(None, ...)`` is False.
``normalize`` also strips surrounding whitespace; lm-eval compares without stripping, but its
filter already strips the prediction and the gold solution has none, so the scores agree.
``numeric=True`` (for SVAMP, whose answers are floats) has no lm-eval counterpart.
"""

from __future__ import annotations

import math
import re
from typing import Optional

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
REGEXES_TO_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
NUMERIC_TOLERANCE = 1e-6


def _pick(match) -> str:
    if isinstance(match, tuple):
        match = [m for m in match if m][0]
    return match.strip()


def extract_strict(text: str) -> Optional[str]:
    """The number after the first ``#### ``, or None."""
    found = STRICT.findall(text)
    return _pick(found[0]) if found else None


def extract_flexible(text: str) -> Optional[str]:
    """The last number-like span of the text (``$1,000.`` included as is), or None."""
    found = FLEXIBLE.findall(text)
    return _pick(found[-1]) if found else None


def normalize(s: str) -> str:
    for pattern in REGEXES_TO_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower().strip()


def is_correct(pred: Optional[str], gold: str, numeric: bool = False) -> bool:
    """lm-eval's exact match after :func:`normalize`; with ``numeric``, equal as floats within 1e-6."""
    if pred is None:
        return False
    p, g = normalize(pred), normalize(gold)
    if not numeric:
        return p == g
    try:
        a, b = float(p), float(g)
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= NUMERIC_TOLERANCE
