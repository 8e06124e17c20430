"""``clpd eval``: accuracy of a checkpoint (or any Hugging Face model) on a benchmark."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

from clpd.config.schema import EvalConfig, register_configs, to_object
from clpd.errors import ClpdError
from clpd.commands.job import recorded_status, run_command

log = logging.getLogger("clpd.commands.eval")
register_configs()


def run_eval(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    # Imported here, not at the top: Hydra validates the config before main runs, and a refused
    # override should not wait for torch and transformers to load.
    import torch

    from clpd.evaluation.evaluate import evaluate_checkpoint, metrics_table
    from clpd.preflight import check_eval

    ec: EvalConfig = to_object(cfg)
    check_eval(ec)  # a folder that is not a checkpoint, missing files: one line, before any work
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.json").exists():
        raise ClpdError(f"{run_dir} already holds eval results; choose another hydra.run.dir")
    with recorded_status(run_dir):
        if ec.num_threads:
            torch.set_num_threads(ec.num_threads)
        metrics = evaluate_checkpoint(ec.checkpoint, ec.benchmark, run_dir, console, device=ec.device,
                                      precision=ec.precision, batch_size=ec.batch_size,
                                      max_new_tokens=ec.max_new_tokens, gguf_file=ec.gguf_file,
                                      keep_layers=ec.keep_layers, keep_every=ec.keep_every,
                                      calculator=ec.calculator)
        console.print(f"checkpoint {ec.checkpoint}", soft_wrap=True)
        console.print(metrics_table(metrics, f"{ec.benchmark.label()}/{ec.benchmark.eval_split}"))
        console.print(f"predictions and metrics in {run_dir}", soft_wrap=True)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    return run_command("eval", run_eval, cfg)
