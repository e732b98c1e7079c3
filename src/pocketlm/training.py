"""What distillation (`distill/trainer.py`) and VLM training (`vlm/train.py`, `vlm/pretrain_vit.py`) share: the
learning-rate schedule, the batch samplers, bf16 autocast and the optimiser step.

Every sampler is a pure function of its seed: the same seed gives the same batches in any process. Two orders
exist because two kinds of loop use them: `batch_indices` gives micro-batch number ``step`` on its own (each epoch
a permutation seeded by (seed, epoch)), so a resumed distillation run needs only its step to know its data
position; `shuffled_batches` and `balanced_batches` stream the batches of a whole VLM stage from one generator.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch


# ---------------------------------------------------------------------------------------------- schedule
def warmup_steps(fraction: float, total: int) -> int:
    """Warm-up steps for a share ``fraction`` of ``total`` steps: at least one when the share is positive."""
    return max(1, round(fraction * total)) if fraction > 0 else 0


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor of each step: linear warmup to the peak over ``warmup`` steps, then cosine decay to ``min_ratio``
    × peak at ``total`` steps (and ``min_ratio`` after)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """`cosine_with_warmup` as the optimizer's scheduler (its state dict resumes it)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, total, min_ratio))


# ---------------------------------------------------------------------------------------------- samplers
def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Row ids of batch number ``step``: epochs are seeded permutations of range(n) (each seeded by seed and
    epoch alone), the last partial batch of each dropped."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n} training blocks are fewer than one batch of {batch_size}")
    epoch, offset = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    return order[offset * batch_size : (offset + 1) * batch_size]


def shuffled_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches from seeded shuffles of range(n), drawn one after the other from one generator
    (a new shuffle when fewer than ``batch_size`` rows are left)."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


def balanced_batches(groups: Sequence[str], batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches in which every group has the same expected share: each row picks a group uniformly
    at random, then the next item of that group's own seeded shuffle (a new shuffle each time a group runs out),
    so a rare group is seen as often as a common one and every item of a group comes once per pass."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(set(groups))
    members = {n: torch.tensor([i for i, x in enumerate(groups) if x == n]) for n in names}
    order = {n: members[n][torch.randperm(len(members[n]), generator=g)] for n in names}
    pos = dict.fromkeys(names, 0)
    for _ in range(steps):
        batch = []
        for k in torch.randint(len(names), (batch_size,), generator=g).tolist():
            n = names[k]
            if pos[n] == len(order[n]):
                order[n], pos[n] = members[n][torch.randperm(len(members[n]), generator=g)], 0
            batch.append(int(order[n][pos[n]]))
            pos[n] += 1
        yield torch.tensor(batch)


# ---------------------------------------------------------------------------------------------- the step
def autocast(device_type: str, precision: str):
    """bf16 autocast of the forward passes when ``precision`` is "bf16" (weights, gradients and optimizer stay
    fp32); a no-op context otherwise."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def apply_update(optimizer: torch.optim.Optimizer, scheduler) -> float:
    """With the gradients in place (and clipped): step the optimizer and the schedule and clear the gradients;
    returns the learning rate the update used."""
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, params,
                   max_grad_norm: float = 1.0) -> float:
    """Backward, clip the gradient norm at ``max_grad_norm``, update (`apply_update`); the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    apply_update(optimizer, scheduler)
    return loss.item()
