"""Shared fixtures: the local stand-ins for hub data, and tiny configs composed like the CLI does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from clpd.config.schema import register_configs

# Under pytest-xdist each worker takes its share of the cores: torch's default, a thread per core in
# every worker, would put several busy threads on each core. The commands a test starts inherit it
# (the tests of thread settings take OMP_NUM_THREADS out of their commands' environment themselves).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # GSM8K, SVAMP and the GPT-2 tokenizer; never copied into the repo
GSM8K_DIR = SHARED / "data" / "gsm8k"
SVAMP_DIR = SHARED / "data" / "svamp"
GPT2_DIR = SHARED / "tokenizers" / "gpt2"

# A student and a benchmark small enough for a test to train in seconds on 2 CPU cores.
TINY_OVERRIDES = [
    "student.hidden_size=32", "student.num_layers=1", "student.num_heads=2", "student.intermediate_size=64",
    "benchmark.train_size=64", "benchmark.test_size=16", "benchmark.max_steps=2",
    "trainer.max_steps=3", "trainer.batch_size=4", "trainer.warmup_steps=1", "trainer.log_every=1",
    "trainer.eval_max_new_tokens=16",
]


@pytest.fixture(scope="session", autouse=True)
def clpd_cache_dir(tmp_path_factory):
    """clpd's own cache (GGUF files converted once) in one folder for the whole test run, shared by
    the tests and the commands they start, never the user's ``~/.cache/clpd``. Under pytest-xdist
    the workers share it (its entries are built once under a file lock, the others wait), and pytest
    removes it with the run's other old temporary folders; alone, it is removed at the end."""
    shared = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if shared:
        folder = tmp_path_factory.getbasetemp().parent / "clpd-cache"
        folder.mkdir(exist_ok=True)
    else:
        folder = tmp_path_factory.mktemp("clpd-cache")
    before = os.environ.get("CLPD_CACHE_DIR")
    os.environ["CLPD_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        del os.environ["CLPD_CACHE_DIR"]
    else:
        os.environ["CLPD_CACHE_DIR"] = before
    if not shared:
        shutil.rmtree(folder, ignore_errors=True)


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared holds the local stand-ins for the hubs)")
    return path


def compose_config(config_name: str, overrides: List[str]) -> DictConfig:
    """Compose like ``clpd <command> overrides`` does, without the Hydra runtime (Compose API)."""
    register_configs()
    with initialize_config_module(config_module="clpd.conf", version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def tiny_train_cfg() -> DictConfig:
    return compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES])


def clpd_trains_at_once(overrides: List[str], run_dirs: List[Path], cwd: Path, timeout: int = 600) -> list:
    """``clpd train OVERRIDES hydra.run.dir=D`` for each D, started together (the clpd of this
    interpreter's environment); returns (returncode, stdout+stderr) of each once all have ended."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    runs = [subprocess.Popen(["clpd", "train", *overrides, f"hydra.run.dir={d}"], cwd=cwd, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PATH": path})
            for d in run_dirs]
    outputs = [r.communicate(timeout=timeout)[0] for r in runs]
    return [(r.returncode, out) for r, out in zip(runs, outputs)]
