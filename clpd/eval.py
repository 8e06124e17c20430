"""``clpd eval``: accuracy of a checkpoint (or any Hugging Face model) on a benchmark."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console

from clpd.config import BenchmarkName, EvalConfig, ModelConfig, register_configs, to_object
from clpd.data import load_problems
from clpd.errors import ClpdError
from clpd.evaluate import evaluate, metrics_table
from clpd.models import check_source, load_model, load_tokenizer, resolve_device, resolve_precision
from clpd.runs import recorded_status, run_command, write_json, write_jsonl

log = logging.getLogger("clpd.eval")
register_configs()


def run_eval(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    ec: EvalConfig = to_object(cfg)
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.json").exists():
        raise ClpdError(f"{run_dir} already holds eval results; choose another hydra.run.dir")
    with recorded_status(run_dir):
        if ec.num_threads:
            torch.set_num_threads(ec.num_threads)
        check_source(ec.checkpoint, "checkpoint")  # before the (possibly slow) data loading
        device = resolve_device(ec.device)
        autocast_dtype = resolve_precision(ec.precision, device)
        problems = load_problems(ec.benchmark, ec.benchmark.eval_split, ec.benchmark.eval_limit)
        if not problems:
            raise ClpdError(f"benchmark={ec.benchmark.name.value} split {ec.benchmark.eval_split} has no problems")

        spec = ModelConfig(name=ec.checkpoint, path=ec.checkpoint, gguf_file=ec.gguf_file)
        tokenizer = load_tokenizer(spec)
        # Weights in the autocast dtype on CUDA halve memory; generation needs no fp32 master copy.
        model = load_model(spec, tokenizer, dtype=autocast_dtype or torch.float32)
        records, metrics = evaluate(
            model, tokenizer, problems, chat_template=ec.benchmark.chat_template,
            numeric=ec.benchmark.name == BenchmarkName.svamp, batch_size=ec.batch_size,
            max_new_tokens=ec.max_new_tokens, device=device, autocast_dtype=autocast_dtype, console=console)
        metrics = {"checkpoint": ec.checkpoint, "benchmark": ec.benchmark.name.value,
                   "split": ec.benchmark.eval_split, **metrics}
        write_jsonl(run_dir / "predictions.jsonl", records)
        write_json(run_dir / "metrics.json", metrics)
        console.print(f"checkpoint {ec.checkpoint}", soft_wrap=True)
        console.print(metrics_table(metrics, f"{ec.benchmark.name.value}/{ec.benchmark.eval_split}"))
        console.print(f"predictions and metrics in {run_dir}", soft_wrap=True)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    return run_command("eval", run_eval, cfg)
