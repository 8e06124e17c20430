"""One run on several processes: torchrun starts them, torch.distributed connects them.

``torchrun --nproc_per_node=N -m clpd train ...`` starts N copies of clpd with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` set. :func:`init_from_env` (called by the
CLI before Hydra starts) joins the process group (gloo for CPU tensors, NCCL for CUDA ones) and
agrees on one run dir, so that every rank writes into rank 0's.

What each rank does is decided from :func:`ranks`, a context value rather than a global, so that
the teacher builds that rank 0 runs by itself inside a distributed run are single-process runs
(:func:`single_process`).
"""

from __future__ import annotations

import datetime
import gc
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, TypeVar

import torch
import torch.distributed as dist

from clpd.environment import launched_by_torchrun
from clpd.errors import ClpdError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a run: ``rank`` of ``world_size`` (0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes (metrics, checkpoints, the final evaluation, summaries)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_RANKS: ContextVar[Ranks] = ContextVar("clpd_ranks", default=Ranks())


def ranks() -> Ranks:
    return _RANKS.get()


@contextmanager
def single_process() -> Iterator[None]:
    """Run the block as if there were no other ranks (a teacher build inside a distributed run)."""
    token = _RANKS.set(Ranks())
    try:
        yield
    finally:
        _RANKS.reset(token)


def alone(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run under :func:`single_process`."""
    def wrapped(*args, **kwargs) -> T:
        with single_process():
            return fn(*args, **kwargs)
    return wrapped


def init_from_env(argv: List[str]) -> List[str]:
    """Join the process group torchrun set up; returns ``argv`` with the run dir every rank uses.

    Without ``hydra.run.dir=`` each rank would evaluate Hydra's ``${now:...}`` default itself, a
    second apart at worst, and write into a folder of its own: rank 0 chooses it and broadcasts it.
    Ranks other than 0 write no ``.hydra/`` copy and log to their console only.
    """
    if not launched_by_torchrun():
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise ClpdError("a sweep (-m) cannot run under torchrun: torchrun runs one training run on several "
                        "processes; launch sweeps with hydra/launcher=joblib or submitit instead")
    current = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        # One group for both kinds of tensors: gloo for the CPU, NCCL for CUDA (trainer.device decides which).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    _RANKS.set(current)
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    run_dir = [chosen[-1] if chosen else None]
    if not chosen:
        if current.main:
            run_dir = [os.path.join("outputs", "train", datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))]
        dist.broadcast_object_list(run_dir, src=0)
        argv = [*argv, f"hydra.run.dir={run_dir[0]}"]
    if not current.main:
        argv = [*argv, "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return argv


def shutdown() -> None:
    """Leave the process group.

    gloo's worker threads outlive the group, and the one that ran the last all-reduce releases its
    tensors just after the collective returns; those tensors belong to Python, so that thread needs
    the GIL. A rank that has nothing left to do (every rank but 0) could reach interpreter shutdown
    first, and a thread taking the GIL during shutdown aborts the process ("terminate called without
    an active exception", SIGABRT). The collection (which also frees DistributedDataParallel's
    reference cycles) takes far longer than that release.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if ranks().distributed:
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then on the other ranks: what rank 0 built or cached (teachers,
    difficulty scores) the others then find instead of building it again at the same time."""
    if ranks().main:
        result = fn()
        barrier()
        return result
    barrier()
    return fn()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (a no-op in a single process)."""
    if ranks().distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(value: int) -> int:
    """The largest of the ranks' ``value`` (a no-op in a single process)."""
    if not ranks().distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # a CPU tensor: gloo carries it in a NCCL run too
    return int(tensor.item())


def device_for(device: torch.device) -> torch.device:
    """Each rank's own GPU (``LOCAL_RANK``) when the run is on CUDA."""
    r = ranks()
    if device.type == "cuda" and r.distributed:
        torch.cuda.set_device(r.local_rank)
        return torch.device("cuda", r.local_rank)
    return device


def check_batch(batch_size: int, grad_accum: int, micro_batch_tokens: Optional[int] = None) -> Optional[str]:
    """Each rank takes an equal share of every micro-batch."""
    world = ranks().world_size
    if world > 1 and micro_batch_tokens is not None:  # a micro-batch of one long example has no share for rank 1
        return (f"trainer.micro_batch_tokens={micro_batch_tokens} cannot be used under torchrun (a micro-batch of "
                f"fewer examples than ranks would leave a rank without work); allowed: null, with trainer.grad_accum")
    if world > 1 and batch_size % (grad_accum * world):
        return (f"trainer.batch_size={batch_size} must be divisible by trainer.grad_accum * ranks = "
                f"{grad_accum} * {world} under torchrun (each rank takes an equal share of every micro-batch)")
    return None
