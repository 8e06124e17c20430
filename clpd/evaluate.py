"""Generation, answer extraction and accuracy, scored as lm-evaluation-harness scores gsm8k.

``evaluate`` scores a model in memory; ``evaluate_into`` also writes ``predictions.jsonl`` and
``metrics.json``; ``evaluate_checkpoint`` loads a checkpoint (or any model) first. ``clpd eval``,
the final evaluation of ``clpd train`` and the teacher ladder's accuracies all go through them, so
a student and its teachers are scored the same way.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clpd.answers import extract_flexible, extract_strict, is_correct
from clpd.checkpoint import is_clpd_checkpoint, verify_checkpoint
from clpd.config import BenchmarkConfig, BenchmarkName, Device, ModelConfig, Precision
from clpd.data import Problem, load_problems
from clpd.data.prompts import STOP_STRINGS, cut_at_stop, encode_prompt
from clpd.errors import ClpdError
from clpd.files import write_json, write_jsonl
from clpd.models import check_source, load_model, load_tokenizer, resolve_device, resolve_precision


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[List[int]], *,
             batch_size: int, max_new_tokens: int, device: torch.device,
             autocast_dtype: Optional[torch.dtype] = None, console: Optional[Console] = None) -> List[str]:
    """Greedy continuations of tokenized prompts, batched with left padding and the KV cache.

    Prompts are generated longest first so that each batch pads little; the outputs come back in
    the input order. Generation stops at eos or a stop string (lm-eval's gsm8k ``until``).
    """
    model.to(device).eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: List[str] = [""] * len(prompts)
    columns = [TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=console is None) as progress:
        bar = progress.add_task("eval", total=len(prompts))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            with autocast:
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, use_cache=True, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=pad_id, stop_strings=STOP_STRINGS, tokenizer=tokenizer)
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for r, i in enumerate(rows):
                outputs[i] = cut_at_stop(texts[r])
            progress.advance(bar, len(rows))
    return outputs


def _accuracy(rows: Sequence[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")


def score(problems: Sequence[Problem], outputs: Sequence[str], numeric: bool = False) -> tuple[List[dict], Dict]:
    """Per-problem records and the metrics: strict and flexible accuracy, overall and by difficulty."""
    records = []
    for problem, output in zip(problems, outputs, strict=True):
        strict, flexible = extract_strict(output), extract_flexible(output)
        records.append({
            "id": problem.id, "question": problem.question, "gold": problem.answer, "num_steps": problem.num_steps,
            "output": output, "extracted_strict": strict, "extracted_flexible": flexible,
            "correct_strict": is_correct(strict, problem.answer, numeric),
            "correct_flexible": is_correct(flexible, problem.answer, numeric),
        })
    groups: Dict[int, List[dict]] = defaultdict(list)
    for r in records:
        groups[r["num_steps"]].append(r)
    metrics = {
        "accuracy_strict": _accuracy(records, "correct_strict"),
        "accuracy_flexible": _accuracy(records, "correct_flexible"),
        "n": len(records),
        "by_difficulty": {str(k): {"n": len(g), "accuracy_strict": _accuracy(g, "correct_strict"),
                                   "accuracy_flexible": _accuracy(g, "correct_flexible")}
                          for k, g in sorted(groups.items())},
    }
    return records, metrics


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
             benchmark: BenchmarkConfig, *, batch_size: int, max_new_tokens: int, device: torch.device,
             autocast_dtype: Optional[torch.dtype] = None, console: Optional[Console] = None) -> tuple[List[dict], Dict]:
    """Greedy answers to ``problems``, prompted as ``benchmark`` says, scored: (records, metrics)."""
    prompts = [encode_prompt(p, tokenizer, benchmark.chat_template) for p in problems]
    outputs = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       device=device, autocast_dtype=autocast_dtype, console=console)
    return score(problems, outputs, numeric=benchmark.name == BenchmarkName.svamp)


def evaluate_into(out_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, benchmark: BenchmarkConfig,
                  *, header: Dict, **generation) -> Dict:
    """``model`` on the benchmark's eval split (``benchmark.eval_limit`` problems), written into
    ``out_dir`` as ``predictions.jsonl`` and ``metrics.json`` (``header`` first in the metrics)."""
    problems = load_problems(benchmark, benchmark.eval_split, benchmark.eval_limit)
    if not problems:
        raise ClpdError(f"benchmark={benchmark.name.value} split {benchmark.eval_split} has no problems")
    records, metrics = evaluate(model, tokenizer, problems, benchmark, **generation)
    metrics = {**header, "benchmark": benchmark.name.value, "split": benchmark.eval_split, **metrics}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", records)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def evaluate_checkpoint(checkpoint: str, benchmark: BenchmarkConfig, out_dir: Path, console: Optional[Console], *,
                        device: Device = Device.auto, precision: Precision = Precision.auto, batch_size: int = 128,
                        max_new_tokens: int = 256, gguf_file: Optional[str] = None) -> Dict:
    """Load ``checkpoint`` (a clpd checkpoint, any ``save_pretrained`` folder or a hub id) and
    :func:`evaluate_into` ``out_dir``."""
    check_source(checkpoint, "checkpoint")  # before the (possibly slow) data loading
    folder = Path(checkpoint).expanduser()
    if is_clpd_checkpoint(folder) or folder.name.endswith(".tmp"):
        verify_checkpoint(folder)  # a truncated or half-written checkpoint: one line that says which file
    torch_device = resolve_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    spec = ModelConfig(name=checkpoint, path=checkpoint, gguf_file=gguf_file)
    tokenizer = load_tokenizer(spec)
    # Weights in the autocast dtype on CUDA halve memory; generation needs no fp32 master copy.
    model = load_model(spec, tokenizer, dtype=autocast_dtype or torch.float32)
    return evaluate_into(out_dir, model, tokenizer, benchmark, header={"checkpoint": checkpoint}, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, device=torch_device, autocast_dtype=autocast_dtype,
                         console=console)


def metrics_table(metrics: Dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("steps", "n", "strict acc", "flexible acc"):
        table.add_column(column, justify="right")
    for k, m in metrics["by_difficulty"].items():
        table.add_row(k, str(m["n"]), f"{m['accuracy_strict']:.3f}", f"{m['accuracy_flexible']:.3f}")
    table.add_section()
    table.add_row("all", str(metrics["n"]), f"{metrics['accuracy_strict']:.3f}", f"{metrics['accuracy_flexible']:.3f}",
                  style="bold")
    return table
