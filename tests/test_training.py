"""The shared training utilities against their definitions: schedule values worked out by hand, sampler orders
rebuilt from the seeded permutations they are defined by, the optimiser step against a hand-made update."""
import math

import pytest
import torch

from pocketlm.training import (
    apply_update, autocast, balanced_batches, batch_indices, cosine_schedule, cosine_with_warmup, optimizer_step,
    shuffled_batches, warmup_steps,
)


def test_cosine_with_warmup_by_hand():
    f = cosine_with_warmup(4, 20, 0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # (step + 1) / warmup
    assert f(4) == pytest.approx(1.0)  # decay starts at the peak
    assert f(12) == pytest.approx(0.55)  # half way through the decay: 0.1 + 0.9 · 0.5 · (1 + cos(π/2))
    assert f(20) == pytest.approx(0.1) and f(35) == pytest.approx(0.1)  # the floor, and after the end
    g = cosine_with_warmup(0, 10, 0.0)  # no warmup: cosine from the first step
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)


def test_warmup_steps_of_a_share():
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(0.001, 10) == 1  # a positive share warms up for at least one step
    assert warmup_steps(0.0, 100) == 0
    assert warmup_steps(0.25, 10) == 2  # Python's round: half to even


def test_the_vlm_schedule_by_hand():
    """What `vlm.train.optimise` schedules: warm-up over a share of the steps, then cosine to a tenth."""
    f = cosine_with_warmup(warmup_steps(0.1, 100), 100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # (55 - 10) / 90 = ½ of the decay
    assert f(99) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))


def test_cosine_schedule_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = cosine_schedule(opt, 2, 6, 0.5)
    lrs = []
    for _ in range(7):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.5 + 0.5 * math.cos(math.pi / 4), 1.5,
                                 1.5 - 0.5 * math.cos(math.pi / 4), 1.0])


def test_batch_indices_are_the_seeded_epoch_permutations():
    n, b, seed = 10, 3, 7
    per_epoch = n // b  # 3 batches an epoch, the 10th block dropped
    for step in range(8):
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert torch.equal(batch_indices(n, b, seed, step), order[offset * b:(offset + 1) * b])
    epoch0 = torch.cat([batch_indices(n, b, seed, s) for s in range(per_epoch)]).tolist()
    assert len(set(epoch0)) == 9  # one epoch: no repeats
    with pytest.raises(ValueError, match="fewer than one batch"):
        batch_indices(2, 3, 0, 0)


def test_shuffled_batches_stream_one_generator():
    g = torch.Generator().manual_seed(5)
    first, second = torch.randperm(7, generator=g), torch.randperm(7, generator=g)
    got = list(shuffled_batches(7, 3, 4, seed=5))
    want = [first[0:3], first[3:6], second[0:3], second[3:6]]  # a new shuffle when fewer than 3 rows are left
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == 4


def test_balanced_batches_are_seeded_and_cover_each_group():
    groups = ["a"] * 3 + ["b"] * 30
    batches = list(balanced_batches(groups, 6, 20, seed=1))
    assert all(torch.equal(x, y) for x, y in zip(batches, balanced_batches(groups, 6, 20, seed=1)))
    drawn = torch.cat(batches).tolist()
    a = [i for i in drawn if groups[i] == "a"]
    assert sorted(a[:3]) == [0, 1, 2]  # each pass over a group is a permutation of it


def test_optimizer_step_clips_updates_and_clears():
    """SGD with lr 0.5 on loss = 3·x + 4·y: the gradient (3, 4) has norm 5, clipped to 1 → (0.6, 0.8)."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss = (p * torch.tensor([3.0, 4.0])).sum() + 1.0
    assert optimizer_step(loss, opt, sched, [p]) == 1.0
    torch.testing.assert_close(p.detach(), torch.tensor([-0.3, -0.4]))
    assert p.grad is None


def test_apply_update_returns_the_lr_it_used():
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
    for want in (1.0, 0.5, 1 / 3):
        p.grad = torch.ones(1)
        assert apply_update(opt, sched) == pytest.approx(want)
    assert p.item() == pytest.approx(1 - 1 - 0.5 - 1 / 3) and p.grad is None


def test_autocast_is_bf16_only_when_asked():
    x = torch.ones(2, 2)
    with autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (x @ x).dtype == torch.float32
