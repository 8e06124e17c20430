"""Teacher-written solutions (sequence-level KD, ``distill.targets=teacher``): each teacher of the
schedule answers every training prompt ``distill.teacher_samples`` times, once, and every run that
needs the same answers reads them.

Kept like the stored teacher outputs (:mod:`clpd.teachers.store`): a cache entry
``<teachers.cache_dir>/solutions/<teacher>-n<samples>-<key>``, built under a file lock into a
temporary folder and renamed when complete, ``solutions.json`` (key, counts) written last. The key
covers the teacher's weights and architecture, the encoded prompts, the number of samples, the
decoding settings (``distill.teacher_generation``), the seed when it samples (greedy decoding writes
the same solutions for every seed, so runs of all seeds share them) and the dtype the teacher ran in.
The rows are a ``datasets`` Arrow table (memory-mapped when read): example, sample, the answer's
token ids and text, its extracted final answer, whether that is the gold answer, whether the
answer ended (eos) within the budget. Answers are extracted and compared as ``clpd eval`` does
(the number after ``####``, numerically where the benchmark says so).
"""

from __future__ import annotations

import gc
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from rich.console import Console

from clpd.cache import build_once
from clpd.config.model import ModelConfig
from clpd.config.schema import SamplingConfig
from clpd.data.batching import prompt_length
from clpd.data.records import Problem, count_steps
from clpd.errors import ClpdError
from clpd.evaluation.answers import extract_strict, is_correct
from clpd.evaluation.evaluate import sample_answers
from clpd.files import digest, fingerprint, plain_json, write_json
from clpd.models.load import load_model
from clpd.training.checkpoint import weights_fingerprint

MARKER = "solutions.json"  # written last: a folder without it is not a finished entry
TABLE = "table"  # the datasets Arrow table, saved with save_to_disk


@dataclass(frozen=True)
class SolutionsKey:
    teacher: dict  # architecture settings and the sha256 of the weight files
    prompts: str  # fingerprint of the encoded prompts (the student's tokenizer, the prompt format)
    samples: int
    decoding: dict  # max_new_tokens, temperature, top_p
    seed: Optional[int]  # None for greedy decoding, which no seed changes
    dtype: str

    def digest(self) -> str:
        return digest(asdict(self))


def prompts_of(examples: Sequence[dict]) -> List[List[int]]:
    return [e["input_ids"][:prompt_length(e)] for e in examples]


def solutions_key(spec: ModelConfig, examples: Sequence[dict], *, samples: int, decoding: SamplingConfig, seed: int,
                  dtype: torch.dtype) -> SolutionsKey:
    if spec.path is None:
        raise ClpdError(f"teacher {spec.name} has no weights yet: build the ladder before its solutions")
    architecture = {k: v for k, v in plain_json(spec).items() if k not in ("name", "path")}
    return SolutionsKey({"architecture": architecture, "weights": weights_fingerprint(spec.path)},
                        fingerprint(prompts_of(examples)), samples, plain_json(decoding),
                        seed if decoding.temperature > 0 else None, str(dtype).removeprefix("torch."))


def solutions_dir(cache_dir: str | Path, name: str, key: SolutionsKey) -> Path:
    return Path(cache_dir) / "solutions" / f"{name}-n{key.samples}-{key.digest()}"


def write_solutions(model: torch.nn.Module, tokenizer, problems: Sequence[Problem], examples: Sequence[dict],
                    key: SolutionsKey, *, numeric: bool, batch_size: int, autocast) -> Dict[str, list]:
    """The teacher's answers to every prompt, ``key.samples`` times, as the table's columns. Prompts
    go in length order ``batch_size`` at a time; sample j of each batch from a generator seeded by
    ``(seed, j, batch)``, so the answers do not depend on what else the process sampled."""
    prompts = prompts_of(examples)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    columns: Dict[str, list] = defaultdict(list)
    eos = tokenizer.eos_token_id
    for j in range(key.samples):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.default_rng([key.seed or 0, j, start, 4]).integers(2 ** 62)))
                answers = sample_answers(model, [prompts[i] for i in rows], eos_id=eos, pad_id=tokenizer.pad_token_id,
                                         autocast=autocast, **key.decoding)
            for i, answer in zip(rows, answers):
                text = tokenizer.decode(answer, skip_special_tokens=True)
                extracted = extract_strict(text)
                columns["example"].append(i)
                columns["sample"].append(j)
                columns["answer_ids"].append(answer)
                columns["text"].append(text)
                columns["extracted"].append(extracted)
                columns["correct"].append(is_correct(extracted, problems[i].answer, numeric))
                columns["finished"].append(bool(answer) and answer[-1] == eos)
    return dict(columns)


def counts(columns: Dict[str, list], problems: Sequence[Problem]) -> dict:
    """How many answers were written, ended and had the gold answer, overall and by difficulty."""
    by = defaultdict(lambda: [0, 0])
    for i, correct in zip(columns["example"], columns["correct"]):
        p = problems[i]
        level = by[p.difficulty if p.difficulty is not None else p.num_steps]
        level[0] += 1
        level[1] += int(correct)
    return {"answers": len(columns["example"]), "finished": sum(columns["finished"]), "correct": sum(columns["correct"]),
            "by_difficulty": {str(k): {"answers": v[0], "correct": v[1]} for k, v in sorted(by.items())}}


def build_solutions(spec: ModelConfig, problems: Sequence[Problem], examples: Sequence[dict], key: SolutionsKey,
                    folder: Path, *, tokenizer, numeric: bool, batch_size: int, device: torch.device,
                    dtype: torch.dtype, autocast_dtype: Optional[torch.dtype], console: Console) -> bool:
    """Make ``folder`` hold ``spec``'s solutions (once, under the entry's lock); True when built here."""
    from datasets import Dataset

    def build(tmp: Path) -> None:
        console.print(f"[bold]teacher {spec.name} writes {key.samples} solution(s)[/] to each of {len(examples)} "
                      f"training prompts into {folder}", soft_wrap=True)
        started = time.perf_counter()
        model = load_model(spec, tokenizer, dtype=dtype).to(device).eval()
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
        columns = write_solutions(model, tokenizer, problems, examples, key, numeric=numeric, batch_size=batch_size,
                                  autocast=autocast)
        del model
        gc.collect()
        tmp.mkdir(parents=True)
        Dataset.from_dict(columns).save_to_disk(str(tmp / TABLE))
        marker = {"key": asdict(key), "teacher": spec.name, "build_s": round(time.perf_counter() - started, 2),
                  **counts(columns, problems)}
        write_json(tmp / MARKER, marker)
        console.print(f"teacher {spec.name}: {marker['correct']}/{marker['answers']} solutions with the gold answer, "
                      f"{marker['finished']} ended within {key.decoding['max_new_tokens']} tokens, "
                      f"{marker['build_s']:.0f}s", soft_wrap=True)

    return build_once(folder, build, what=f"teacher {spec.name}'s solutions", complete=lambda p: (p / MARKER).is_file())


class TeacherSolutions:
    """One teacher's written solutions, read from the cache entry."""

    def __init__(self, folder: Path, key: SolutionsKey) -> None:
        from datasets import load_from_disk

        try:
            self.marker = json.loads((folder / MARKER).read_text())
            self.table = load_from_disk(str(folder / TABLE))
        except (OSError, ValueError) as exc:
            raise ClpdError(f"teacher solutions {folder} are incomplete or damaged ({exc}); delete the folder and "
                            f"they are written again") from None
        if self.marker.get("key") != asdict(key):
            raise ClpdError(f"teacher solutions {folder} were written for another teacher, prompts or decoding; "
                            f"delete the folder or point teachers.cache_dir elsewhere")
        self.folder = folder

    def steps(self, n: int) -> np.ndarray:
        """The CoT-derived difficulty of each of the ``n`` training examples: the reasoning steps of
        the teacher's first solution to it (``count_steps``, as for the gold solutions)."""
        out = np.zeros(n, dtype=np.float64)
        columns = self.table.select_columns(["example", "sample", "text"]).to_dict()
        for i, j, text in zip(columns["example"], columns["sample"], columns["text"]):
            if j == 0:
                out[i] = count_steps(text)
        return out

    def kept(self, n: int, correct_only: bool) -> List[List[List[int]]]:
        """Per training example (``n`` of them), the token ids of its kept solutions, in sample order."""
        out: List[List[List[int]]] = [[] for _ in range(n)]
        columns = self.table.select_columns(["example", "sample", "answer_ids", "correct"]).to_dict()
        for i, j, answer, correct in sorted(zip(columns["example"], columns["sample"], columns["answer_ids"],
                                                columns["correct"])):
            if correct or not correct_only:
                out[i].append(answer)
        return out


def prepare_solutions(specs: Sequence[ModelConfig], used: Sequence[int], problems: Sequence[Problem],
                      examples: Sequence[dict], *, cache_dir: str, samples: int, decoding: SamplingConfig, seed: int,
                      tokenizer, numeric: bool, batch_size: int, device: torch.device, dtype: torch.dtype,
                      autocast_dtype: Optional[torch.dtype], console: Console) -> Dict[int, TeacherSolutions]:
    """The solutions of the rungs ``used`` (indices into ``specs``), written where missing, open."""
    out: Dict[int, TeacherSolutions] = {}
    for index in used:
        spec = specs[index]
        key = solutions_key(spec, examples, samples=samples, decoding=decoding, seed=seed, dtype=dtype)
        folder = solutions_dir(cache_dir, spec.name, key)
        build_solutions(spec, problems, examples, key, folder, tokenizer=tokenizer, numeric=numeric,
                        batch_size=batch_size, device=device, dtype=dtype, autocast_dtype=autocast_dtype, console=console)
        out[index] = TeacherSolutions(folder, key)
    return out


def describe_solutions(solutions: Dict[int, TeacherSolutions], specs: Sequence[ModelConfig], correct_only: bool,
                       n: int) -> List[dict]:
    """For summary.json: per teacher, its entry, how many solutions it wrote, ended, had the gold
    answer and were kept, how many examples kept none, and the counts by difficulty."""
    rows = []
    for i, s in sorted(solutions.items()):
        kept = s.kept(n, correct_only)
        m = s.marker
        rows.append({"teacher": specs[i].name, "folder": str(s.folder), "answers": m["answers"], "finished": m["finished"],
                     "correct": m["correct"], "kept": sum(map(len, kept)), "examples_without": sum(not k for k in kept),
                     "by_difficulty": m["by_difficulty"]})
    return rows
