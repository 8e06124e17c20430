"""``clpd eval``: accuracy of a checkpoint (or any Hugging Face model) on a benchmark."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console

from clpd.checkpoint import is_clpd_checkpoint, verify_checkpoint
from clpd.config import BenchmarkConfig, BenchmarkName, Device, EvalConfig, ModelConfig, Precision, register_configs, to_object
from clpd.data import load_problems
from clpd.errors import ClpdError
from clpd.evaluate import evaluate, metrics_table
from clpd.models import check_source, load_model, load_tokenizer, resolve_device, resolve_precision
from clpd.runs import recorded_status, run_command, write_json, write_jsonl

log = logging.getLogger("clpd.eval")
register_configs()


def evaluate_checkpoint(checkpoint: str, benchmark: BenchmarkConfig, run_dir: Path, console: Console, *,
                        device: Device = Device.auto, precision: Precision = Precision.auto, batch_size: int = 128,
                        max_new_tokens: int = 256, gguf_file: Optional[str] = None) -> dict:
    """Generate on the eval split, score, and write ``predictions.jsonl`` and ``metrics.json``."""
    check_source(checkpoint, "checkpoint")  # before the (possibly slow) data loading
    folder = Path(checkpoint).expanduser()
    if is_clpd_checkpoint(folder) or folder.name.endswith(".tmp"):
        verify_checkpoint(folder)  # a truncated or half-written checkpoint: one line that says which file
    torch_device = resolve_device(device)
    autocast_dtype = resolve_precision(precision, torch_device)
    problems = load_problems(benchmark, benchmark.eval_split, benchmark.eval_limit)
    if not problems:
        raise ClpdError(f"benchmark={benchmark.name.value} split {benchmark.eval_split} has no problems")

    spec = ModelConfig(name=checkpoint, path=checkpoint, gguf_file=gguf_file)
    tokenizer = load_tokenizer(spec)
    # Weights in the autocast dtype on CUDA halve memory; generation needs no fp32 master copy.
    model = load_model(spec, tokenizer, dtype=autocast_dtype or torch.float32)
    records, metrics = evaluate(
        model, tokenizer, problems, chat_template=benchmark.chat_template,
        numeric=benchmark.name == BenchmarkName.svamp, batch_size=batch_size, max_new_tokens=max_new_tokens,
        device=torch_device, autocast_dtype=autocast_dtype, console=console)
    metrics = {"checkpoint": checkpoint, "benchmark": benchmark.name.value, "split": benchmark.eval_split, **metrics}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(run_dir / "predictions.jsonl", records)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def run_eval(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    ec: EvalConfig = to_object(cfg)
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.json").exists():
        raise ClpdError(f"{run_dir} already holds eval results; choose another hydra.run.dir")
    with recorded_status(run_dir):
        if ec.num_threads:
            torch.set_num_threads(ec.num_threads)
        metrics = evaluate_checkpoint(ec.checkpoint, ec.benchmark, run_dir, console, device=ec.device,
                                      precision=ec.precision, batch_size=ec.batch_size,
                                      max_new_tokens=ec.max_new_tokens, gguf_file=ec.gguf_file)
        console.print(f"checkpoint {ec.checkpoint}", soft_wrap=True)
        console.print(metrics_table(metrics, f"{ec.benchmark.name.value}/{ec.benchmark.eval_split}"))
        console.print(f"predictions and metrics in {run_dir}", soft_wrap=True)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    return run_command("eval", run_eval, cfg)
