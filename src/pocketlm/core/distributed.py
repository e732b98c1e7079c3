"""Running the same commands on many processes: launched by `torchrun` / `accelerate launch`, never by us.

pocketlm does not schedule processes. When a launcher has started N of them (``WORLD_SIZE`` > 1 in the
environment), :func:`init` joins the process group through accelerate (gloo on CPU, NCCL on GPUs), and the
helpers here split work by rank and put the answers back together:

* scoring and generation give every rank an interleaved share of the (length-sorted) items and all-gather the
  per-item answers, so every rank ends with the full, ordered list — the figures computed from it (sums first,
  then divisions) are those of one process;
* training splits each global micro-batch across ranks (DDP averages the gradients: the same step as one process
  with the same global batch);
* the teacher cache is built shard by shard, rank r taking shards r, r + N, ...; rank 0 writes the one manifest.

With one process every helper is a no-op, so single-process code paths are the distributed ones with N = 1.
"""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


def init() -> None:
    """Join the process group a launcher set up (``WORLD_SIZE`` > 1); nothing to do otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(_leave)


def _leave() -> None:
    """Leave the process group before the interpreter exits: left to static destructors, a gloo worker thread
    could be torn down while still joinable and abort the process ("terminate called without an active
    exception", seen once under torchrun on 2 cores)."""
    if is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """This process's device: ``cuda:<local rank>`` where there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing shared caches); the others run it after, finding the caches made."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def share(items: Sequence[T]) -> list[T]:
    """This rank's interleaved share of ``items`` (items r, r + N, ...): balanced when items are sorted by cost."""
    return list(items[rank() :: world_size()])


def gather_shares(local: list[T], n: int) -> list[T]:
    """Reassemble per-rank answers made by :func:`share` into the full list of ``n``, on every rank."""
    world = world_size()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. the outcome of a check only rank 0 made)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a list of floats over ranks (fp64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()
