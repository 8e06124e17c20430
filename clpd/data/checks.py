"""Checks of a benchmark's files before a command reads them: split names and sizes of the
generator, the data folder and its split files, every line of them parsed."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from clpd.config.schema import BenchmarkConfig
from clpd.config.enums import BenchmarkName
from clpd.data import arith, jsonl, load_problems
from clpd.errors import Problems


def benchmark_problems(b: BenchmarkConfig, splits: Sequence[tuple[str, str, Optional[int]]]) -> List[str]:
    """``splits``: (key, split name, limit) of each split the command reads, e.g.
    ("benchmark.train_split", "train", None). Local files are read and parsed (they are small);
    a hub dataset is left to the command (nothing is downloaded here)."""
    problems = Problems()
    name = b.name.value if hasattr(b.name, "value") else str(b.name)
    seen = set()
    for key, split, limit in splits:
        if split in seen:
            continue
        seen.add(split)
        if name == BenchmarkName.arith.value:
            if split not in arith.SPLITS:
                problems.append(f"{key}={split}: benchmark=arith has no such split; allowed: {', '.join(arith.SPLITS)}")
                continue
            size_key = "train_size" if split == "train" else "test_size"
            if getattr(b, size_key) < 1:
                problems.append(f"benchmark.{size_key}={getattr(b, size_key)}: the {split} split ({key}) would have "
                                f"no problems; allowed: >= 1")
            continue
        if name == BenchmarkName.gsm8k.value:
            if b.data_dir is None:
                continue  # the hub dataset: loaded (or refused) by the command
            folder = Path(b.data_dir).expanduser()
            if not folder.is_dir():
                problems.append(f"benchmark.data_dir={b.data_dir}: no such folder (a folder with train.jsonl and "
                                f"test.jsonl, or null for the hub dataset {b.hf_path})")
                break
            if not (folder / f"{split}.jsonl").is_file():
                have = sorted(p.stem for p in folder.glob("*.jsonl"))
                problems.append(f"{key}={split}: no {split}.jsonl in benchmark.data_dir={b.data_dir}; "
                                f"allowed: {', '.join(have) if have else 'none (no *.jsonl files there)'}")
                continue
        if name == BenchmarkName.jsonl.value:
            missing = jsonl.file_problem(b, split)
            if missing:
                if missing not in problems:  # one file can serve several splits: one message
                    problems.append(missing)
                continue
            if jsonl.split_path(b, split)[1] is None:
                continue  # a hub dataset: loaded (or refused) by the command
        loaded = problems.guard("", lambda: load_problems(b, split, limit))
        if loaded is not None and not loaded:
            problems.append(f"{key}={split}: benchmark={name} has no problems in that split")
        if loaded is None and name == BenchmarkName.svamp.value:
            break  # one file for every split: one message
    return problems
