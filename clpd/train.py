"""``clpd train``: distil (or fine-tune) a student on a benchmark's training split."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from clpd.config import TrainConfig, register_configs, to_object
from clpd.curriculum.sampler import Sampler
from clpd.data import load_problems
from clpd.data.prompts import encode_example
from clpd.errors import ClpdError
from clpd.loop import train
from clpd.models import count_parameters, load_model, load_tokenizer, resolve_device, resolve_precision
from clpd.runs import recorded_status, run_command, save_checkpoint, write_json

log = logging.getLogger("clpd.train")
register_configs()


def run_train(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    """Train as ``cfg`` says and write everything into ``run_dir``; returns the summary."""
    tc: TrainConfig = to_object(cfg)  # every schema check runs here, before any work
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "checkpoints" / "final").exists():
        raise ClpdError(f"{run_dir} already holds a finished run; choose another hydra.run.dir")
    with recorded_status(run_dir):
        started = time.perf_counter()
        if tc.trainer.num_threads:
            torch.set_num_threads(tc.trainer.num_threads)
        device = resolve_device(tc.trainer.device)
        autocast_dtype = resolve_precision(tc.trainer.precision, device)

        problems = load_problems(tc.benchmark, tc.benchmark.train_split, tc.benchmark.train_limit)
        if not problems:
            raise ClpdError(f"benchmark={tc.benchmark.name.value} split {tc.benchmark.train_split} has no problems")
        tokenizer = load_tokenizer(tc.student)
        examples = [encode_example(p, tokenizer, tc.benchmark.chat_template, tc.trainer.max_seq_len) for p in problems]
        truncated = sum(e["truncated"] for e in examples)
        if truncated:
            log.warning("%d of %d examples were longer than trainer.max_seq_len=%d and were truncated",
                        truncated, len(examples), tc.trainer.max_seq_len)

        torch.manual_seed(tc.seed)  # from-scratch weights are a function of the seed
        model = load_model(tc.student, tokenizer)
        log.info("student %s: %.2fM parameters (%.2fM trainable); %d training problems from %s; device %s, %s",
                 tc.student.name, count_parameters(model) / 1e6, count_parameters(model, True) / 1e6, len(examples),
                 tc.benchmark.name.value, device, autocast_dtype or torch.float32)

        sampler = Sampler(range(len(examples)), tc.trainer.batch_size, seed=tc.seed)
        result = train(model, examples, sampler, tc.trainer, pad_id=tokenizer.pad_token_id, device=device,
                       autocast_dtype=autocast_dtype, metrics_path=run_dir / "metrics.jsonl", console=console)

        checkpoint = run_dir / "checkpoints" / "final"
        if tc.trainer.save:
            checkpoint.parent.mkdir(exist_ok=True)
            save_checkpoint(model, tokenizer, cfg, checkpoint)
        summary = {
            "steps": result.steps, "final_loss": result.final_loss, "tokens_seen": result.tokens_seen,
            "answer_tokens_seen": result.answer_tokens_seen, "train_time_s": round(result.wall_time_s, 2),
            "wall_time_s": round(time.perf_counter() - started, 2), "student_parameters": count_parameters(model),
            "train_examples": len(examples), "truncated_examples": truncated,
            "checkpoint": str(checkpoint) if tc.trainer.save else None,
        }
        write_json(run_dir / "summary.json", summary)
        console.print(f"[bold green]done[/] {result.steps} steps in {result.wall_time_s:.0f}s, final loss "
                      f"{result.final_loss:.4f}; run dir {run_dir}", soft_wrap=True)
    return summary


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    return run_command("train", run_train, cfg)
