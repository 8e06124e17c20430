"""Generation, answer extraction and accuracy, scored as lm-evaluation-harness scores gsm8k.

``evaluate`` scores a model in memory; ``evaluate_into`` also writes ``predictions.jsonl`` and
``metrics.json``; ``evaluate_checkpoint`` loads a checkpoint (or any model) first. ``clpd eval``,
the final evaluation of ``clpd train`` and the teacher ladder's accuracies all go through them, so
a student and its teachers are scored the same way.

The metrics say how the model was asked (``prompt``: plain or chat template, the number of solved
examples before each question) and how fast it answered (``generation``: wall time of the
generation, problems/s, generated tokens/s, the process's peak resident memory). With the
calculator on (``calculator``, :mod:`clpd.evaluation.calculator`), each prediction lists its
calculations and the metrics count them; with it off, neither says anything about it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from clpd.config.enums import Device, Precision
from clpd.config.model import ModelConfig, StudentConfig
from clpd.config.schema import BenchmarkConfig
from clpd.data import Problem, load_problems
from clpd.data.prompts import STOP_STRINGS, cut_at_stop, draw_fewshot, encode_prompts, stop_strings
from clpd.environment import max_rss_mib
from clpd.errors import ClpdError
from clpd.evaluation.answers import extract_flexible, extract_strict, is_correct
from clpd.evaluation.calculator import CalculatorProcessor, summarize_calls
from clpd.files import write_json, write_jsonl
from clpd.models.load import (check_source, count_parameters, load_model, load_tokenizer, resolve_device,
                              resolve_precision)
from clpd.progress import plain_lines, progress_bar
from clpd.training.checkpoint import is_clpd_checkpoint, verify_checkpoint


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[List[int]], *,
             batch_size: int, max_new_tokens: int, device: torch.device,
             autocast_dtype: Optional[torch.dtype] = None, console: Optional[Console] = None,
             stops: Sequence[str] = STOP_STRINGS,
             calculator: bool = False) -> tuple[List[str], List[int], Optional[List[List[dict]]]]:
    """Greedy continuations of tokenized prompts, batched with left padding and the KV cache, the
    tokens generated for each (up to and with its eos or stop string; a batch runs on until its
    longest answer is done, so these are the useful tokens, not the work done), and with
    ``calculator`` the calculations of each (:class:`CalculatorProcessor`; None without).

    Prompts are generated longest first so that each batch pads little; the outputs come back in
    the input order. Generation stops at eos or one of ``stops`` (lm-eval's gsm8k ``until``).
    """
    model.to(device).eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: List[str] = [""] * len(prompts)
    new_tokens: List[int] = [0] * len(prompts)
    calls: Optional[List[List[dict]]] = [[] for _ in prompts] if calculator else None
    columns = [TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    plain = plain_lines(console)
    started = time.perf_counter()
    with progress_bar(console, *columns) as progress:
        bar = progress.add_task("eval", total=len(prompts))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = left_padded([prompts[i] for i in rows], pad_id)
            width = ids.shape[1]
            processor = CalculatorProcessor(tokenizer, len(rows)) if calculator else None
            with autocast:
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                    do_sample=False, num_beams=1, use_cache=True, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=pad_id, stop_strings=list(stops), tokenizer=tokenizer,
                    logits_processor=LogitsProcessorList([processor]) if processor else None)
            texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for r, i in enumerate(rows):
                outputs[i] = cut_at_stop(texts[r], stops)
                new_tokens[i] = answer_length(generated[r, width:].tolist(), {tokenizer.eos_token_id, pad_id})
                if processor:
                    calls[i] = processor.calls[r]
            progress.advance(bar, len(rows))
            if plain:
                done = min(start + batch_size, len(order))
                console.print(f"eval {done}/{len(order)}  {time.perf_counter() - started:.0f}s", soft_wrap=True)
    return outputs, new_tokens, calls


def left_padded(prompts: Sequence[List[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``prompts`` as one batch padded on the left, so that every
    row's continuation starts at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(prompt)
        mask[r, width - len(prompt):] = 1
    return ids, mask


@torch.inference_mode()
def sample_answers(model: PreTrainedModel, prompts: Sequence[List[int]], *, eos_id: int, pad_id: int,
                   max_new_tokens: int, temperature: float, top_p: float, autocast=nullcontext()) -> List[List[int]]:
    """A model's sampled answers to tokenized ``prompts``, in one batch with the KV cache (the
    generator of :func:`generate`, sampling): the token ids of each, up to and with its eos, or
    ``max_new_tokens`` of them when it never ended. Pure temperature and nucleus sampling (no top-k,
    none of the model's own generation settings), from the global torch RNG: the caller seeds it;
    ``temperature=0`` decodes greedily."""
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    settings = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                                use_cache=True)
    with autocast:
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=settings)
    rows = generated[:, ids.shape[1]:].tolist()
    return [row[:answer_length(row, {eos_id})] for row in rows]


def answer_length(ids: Sequence[int], ends: set) -> int:
    """Tokens of one generated row up to and with the first end token (eos, or the pad that
    ``generate`` writes after a row has stopped at a stop string); all of them if none."""
    for n, token in enumerate(ids, start=1):
        if token in ends:
            return n
    return len(ids)


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
            **({} if problem.difficulty is None else {"difficulty": problem.difficulty}),
        })
    groups: Dict[float, List[dict]] = defaultdict(list)
    for r in records:  # by the difficulty the data gives, else by reasoning steps
        groups[r.get("difficulty", r["num_steps"])].append(r)
    metrics = {
        "accuracy_strict": _accuracy(records, "correct_strict"),
        "accuracy_flexible": _accuracy(records, "correct_flexible"),
        "n": len(records),
        "by_difficulty": {f"{k:g}": {"n": len(g), "accuracy_strict": _accuracy(g, "correct_strict"),
                                   "accuracy_flexible": _accuracy(g, "correct_flexible")}
                          for k, g in sorted(groups.items())},
    }
    return records, metrics


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem],
             benchmark: BenchmarkConfig, *, batch_size: int, max_new_tokens: int, device: torch.device,
             autocast_dtype: Optional[torch.dtype] = None, console: Optional[Console] = None,
             calculator: bool = False) -> tuple[List[dict], Dict]:
    """Greedy answers to ``problems``, prompted as ``benchmark`` says, scored: (records, metrics).

    With ``calculator``, the results of the annotations the model opens are written by the
    calculator: each record gets ``calculator`` (its calculations) and the metrics their counts."""
    shots = fewshot_examples(problems, benchmark)
    prompts = encode_prompts(problems, tokenizer, benchmark.chat_template, shots)
    started = time.perf_counter()
    outputs, new_tokens, calls = generate(model, tokenizer, prompts, batch_size=batch_size,
                                          max_new_tokens=max_new_tokens, device=device, autocast_dtype=autocast_dtype,
                                          console=console, stops=stop_strings(benchmark.chat_template),
                                          calculator=calculator)
    seconds = time.perf_counter() - started
    records, metrics = score(problems, outputs, numeric=benchmark.numeric_answers())
    for record, n in zip(records, new_tokens):
        record["new_tokens"] = n
    metrics["prompt"] = {"format": "chat_template" if benchmark.chat_template else "plain",
                         "num_fewshot": benchmark.num_fewshot,
                         "mean_tokens": round(sum(map(len, prompts)) / max(len(prompts), 1), 1)}
    metrics["generation"] = {
        "seconds": round(seconds, 2), "problems_per_s": round(len(problems) / seconds, 4) if seconds else None,
        "new_tokens": sum(new_tokens), "tokens_per_s": round(sum(new_tokens) / seconds, 2) if seconds else None,
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
        "peak_rss_mb": round(max_rss_mib(), 1),
    }
    if calls is not None:
        for record, row_calls in zip(records, calls):
            record["calculator"] = row_calls
        metrics["calculator"] = summarize_calls(calls)
    return records, metrics


def fewshot_examples(problems: Sequence[Problem], benchmark: BenchmarkConfig) -> List[List[Problem]]:
    """The solved examples before each problem (``benchmark.num_fewshot`` of ``fewshot_split``;
    none by default)."""
    if benchmark.num_fewshot <= 0:
        return [[] for _ in problems]
    pool = load_problems(benchmark, benchmark.fewshot_split)
    return draw_fewshot(problems, pool, benchmark.num_fewshot, benchmark.fewshot_seed,
                        same_split=benchmark.fewshot_split == benchmark.eval_split)


def evaluate_into(out_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, benchmark: BenchmarkConfig,
                  *, header: Dict, **generation) -> Dict:
    """``model`` on the benchmark's eval split (``benchmark.eval_limit`` problems), written into
    ``out_dir`` as ``predictions.jsonl`` and ``metrics.json`` (``header`` first in the metrics)."""
    problems = load_problems(benchmark, benchmark.eval_split, benchmark.eval_limit)
    if not problems:
        raise ClpdError(f"benchmark={benchmark.label()} split {benchmark.eval_split} has no problems")
    records, metrics = evaluate(model, tokenizer, problems, benchmark, **generation)
    metrics = {**header, "benchmark": benchmark.label(), "split": benchmark.eval_split, **metrics}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", records)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def evaluate_checkpoint(checkpoint: str, benchmark: BenchmarkConfig, out_dir: Path, console: Optional[Console], *,
                        device: Device = Device.auto, precision: Precision = Precision.auto, batch_size: int = 128,
                        max_new_tokens: int = 256, gguf_file: Optional[str] = None,
                        keep_layers: Optional[List[int]] = None, keep_every: Optional[int] = None,
                        calculator: bool = False) -> Dict:
    """Load ``checkpoint`` (a clpd checkpoint, any ``save_pretrained`` folder or a hub id) and
    :func:`evaluate_into` ``out_dir``; with ``keep_layers`` or ``keep_every``, the model cut to
    those blocks (as ``student.init_from`` cuts a student); with ``calculator``, calculator-assisted."""
    check_source(checkpoint, "checkpoint")  # before the (possibly slow) data loading
    folder = Path(checkpoint).expanduser()
    if is_clpd_checkpoint(folder) or folder.name.endswith(".tmp"):
        verify_checkpoint(folder)  # a truncated or half-written checkpoint: one line that says which file
    torch_device = resolve_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    header: Dict = {"checkpoint": checkpoint}
    if keep_layers is None and keep_every is None:
        spec: ModelConfig = ModelConfig(name=checkpoint, path=checkpoint, gguf_file=gguf_file)
    else:
        spec = StudentConfig(name=checkpoint, init_from=checkpoint, gguf_file=gguf_file, keep_layers=keep_layers,
                             keep_every=keep_every)
    tokenizer = load_tokenizer(spec)
    # Weights in the autocast dtype on CUDA halve memory; generation needs no fp32 master copy.
    model = load_model(spec, tokenizer, dtype=autocast_dtype or torch.float32)
    if getattr(model.config, "cut_from", None) and isinstance(spec, StudentConfig):
        header["cut_from"] = model.config.cut_from
    header["parameters"] = count_parameters(model)
    return evaluate_into(out_dir, model, tokenizer, benchmark, header=header, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, device=torch_device, autocast_dtype=autocast_dtype,
                         console=console, calculator=calculator)


def metrics_table(metrics: Dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("difficulty", "n", "strict acc", "flexible acc"):
        table.add_column(column, justify="right")
    for k, m in metrics["by_difficulty"].items():
        table.add_row(k, str(m["n"]), f"{m['accuracy_strict']:.3f}", f"{m['accuracy_flexible']:.3f}")
    table.add_section()
    table.add_row("all", str(metrics["n"]), f"{metrics['accuracy_strict']:.3f}", f"{metrics['accuracy_flexible']:.3f}",
                  style="bold")
    prompt, gen = metrics.get("prompt"), metrics.get("generation")
    if prompt and gen:
        shots = f"{prompt['num_fewshot']}-shot" if prompt["num_fewshot"] else "zero-shot"
        table.caption_justify = "left"
        table.caption = (f"{shots} {prompt['format'].replace('_', ' ')} prompts; {metrics['n']} problems in "
                         f"{gen['seconds']:.1f} s: {gen['problems_per_s'] or 0:.3f} problems/s, "
                         f"{gen['tokens_per_s'] or 0:.1f} generated tokens/s")
        if calc := metrics.get("calculator"):
            table.caption += f"; calculator on: {calc['calls']} calculations, {calc['refused']} refused"
        table.min_width = min(len(table.caption), 100)  # the caption on one line, not wrapped to the columns
    return table
