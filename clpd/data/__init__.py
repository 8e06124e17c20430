"""Benchmarks as lists of :class:`Problem` records: a dict of loader functions, no registry."""

from __future__ import annotations

from enum import Enum
from typing import Callable, Dict, List, Optional, Union

from clpd.config.schema import BenchmarkConfig
from clpd.data import arith, gsm8k, jsonl, svamp
from clpd.data.records import Problem, count_steps
from clpd.errors import ClpdError

Loader = Callable[[str, BenchmarkConfig], List[Problem]]

LOADERS: Dict[str, Loader] = {
    "arith": arith.generate,
    "gsm8k": gsm8k.load,
    "svamp": svamp.load,
    "jsonl": jsonl.load,
}


def load_problems(cfg: BenchmarkConfig, split: str, limit: Optional[int] = None) -> List[Problem]:
    """The problems of ``split`` of the benchmark ``cfg.name``, the first ``limit`` of them."""
    name: Union[str, Enum] = cfg.name
    key = name.value if isinstance(name, Enum) else str(name)
    if key not in LOADERS:
        raise ClpdError(f"benchmark.name={key}: unknown benchmark (choose from {', '.join(LOADERS)})")
    problems = LOADERS[key](split, cfg)
    return problems if limit is None else problems[:limit]


__all__ = ["LOADERS", "Problem", "count_steps", "load_problems"]
