"""How long a resumable checkpoint takes to write (and to verify), and how big it is.

Writes, with clpd's own ``write_checkpoint``, the checkpoint a training run writes at a
``trainer.save_every`` step: weights (or the LoRA adapter), tokenizer, ``training_state.pt``
(optimizer after one step, GradScaler, RNG states), the manifest and the ``COMPLETE`` marker with
every file's sha256. Models are built from their configs with random weights: nothing is
downloaded, and the sizes are those of the real architectures.

    python -m clpd.bench.checkpoint                    # micro (the default student) and Qwen2.5-0.5B + LoRA r=16
    python -m clpd.bench.checkpoint --models micro --repeat 5

The Qwen2.5-0.5B student saves only its adapter (its base is a hub model, never copied); the
micro student is trained fully, so its checkpoint holds all weights.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from clpd.config.model import LoraConfig, ModelConfig
from clpd.config.schema import TrainerConfig
from clpd.models.load import apply_lora, count_parameters, load_model, load_tokenizer
from clpd.training.checkpoint import verify_checkpoint, write_checkpoint
from clpd.training.state import TrainState, rng_state
from clpd.training.step import build_optimizer

MODELS = {
    # conf/student/micro.yaml
    "micro": (ModelConfig(name="micro", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192,
                          max_position_embeddings=512), None),
    # Qwen/Qwen2.5-0.5B-Instruct's config.json, with the LoRA of conf/experiment/gsm8k.yaml
    "qwen2.5-0.5b-lora": (ModelConfig(name="qwen2.5-0.5b", arch="qwen2", hidden_size=896, num_layers=24, num_heads=14,
                                      num_kv_heads=2, intermediate_size=4864, max_position_embeddings=32768,
                                      vocab_size=151936, tie_embeddings=True), LoraConfig(enabled=True, r=16, alpha=32)),
}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def after_one_step(name: str) -> tuple:
    """(model, tokenizer, TrainState) of ``name``, random weights, its optimizer after one step (so
    the optimizer has its moments to save)."""
    spec, lora = MODELS[name]
    tokenizer = load_tokenizer(ModelConfig(name="char"))
    torch.manual_seed(0)
    model = load_model(spec, tokenizer)
    if lora is not None:
        model.config._name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"  # as loaded from the hub: the adapter names it
        model = apply_lora(model, lora)
    optimizer = build_optimizer(model, TrainerConfig(), fused=False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    state = TrainState(step=1, optimizer=optimizer.state_dict(),
                       scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(), rng=rng_state())
    return model, tokenizer, state


def measure(name: str, root: Path, repeat: int) -> None:
    """``repeat`` writes and verifications of ``name``'s checkpoint: one line of medians."""
    model, tokenizer, state = after_one_step(name)
    cfg = OmegaConf.create({"student": name})
    writes, verifies = [], []
    for i in range(repeat):
        path = root / f"{name}-{i}"
        writes.append(write_checkpoint(path, model=model, tokenizer=tokenizer, cfg=cfg, state=state,
                                       manifest={"bench": True}))
        started = time.perf_counter()
        verify_checkpoint(path)
        verifies.append(time.perf_counter() - started)
        size = folder_bytes(path)
        if i < repeat - 1:
            shutil.rmtree(path)
    write_s, verify_s = statistics.median(writes), statistics.median(verifies)
    print(f"{name:20} {count_parameters(model) / 1e6:8.2f}M {count_parameters(model, True) / 1e6:9.2f}M "
          f"{size / 1e6:9.1f}MB {write_s:8.3f} {verify_s:9.3f} {size / 1e6 / write_s:7.0f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clpd.bench.checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeat", type=int, default=3, help="timed saves per model (the median is reported)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)

    root = Path(args.dir or tempfile.mkdtemp(prefix="clpd-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, writing under {root}")
    print(f"{'model':20} {'params':>9} {'trainable':>10} {'checkpoint':>11} {'write s':>8} {'verify s':>9} {'MB/s':>7}")
    try:
        for name in args.models:
            measure(name, root, args.repeat)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
