"""Distillation losses against the module contract, each variant checked against a brute-force reference.

References are plain Python over small vocabularies (float64 math on the same fp32 inputs); comparisons use
torch.testing.assert_close at fp32 rtol=1e-5, atol=1e-6 unless a test says otherwise.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from torch.utils._python_dispatch import TorchDispatchMode

from pocketlm.distill import losses
from pocketlm.distill.losses import (
    DIVERGENCES,
    KDLossOutput,
    dense_logprobs,
    kd_loss,
    sparse_logprobs,
)
from pocketlm.core.registry import UnknownNameError

TOL = dict(rtol=1e-5, atol=1e-6)
# (name, params): every registered divergence, with the parametrised ones at a non-default value too.
VARIANTS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.2}),
    ("tv", {}),
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.4}),
    ("skew_reverse_kl", {}),
    ("skew_reverse_kl", {"alpha": 0.4}),
]
VARIANT_IDS = [f"{n}{'-' + '-'.join(f'{k}={v}' for k, v in p.items()) if p else ''}" for n, p in VARIANTS]


# ---------------------------------------------------------------------------------------------- brute force


def xlogy_ratio(a: float, b: float) -> float:
    """a * log(a / b) with 0 log 0 = 0."""
    if a == 0.0:
        return 0.0
    return math.inf if b == 0.0 else a * math.log(a / b)


def ref_divergence(name: str, p: list[float], q: list[float], beta: float = 0.5, alpha: float = 0.1) -> float:
    """One position's divergence from the defining formula; p is the teacher, q the student."""
    kl = lambda a, b: sum(xlogy_ratio(x, y) for x, y in zip(a, b))  # noqa: E731
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        if beta == 0.0:
            return kl(p, q)
        if beta == 1.0:
            return kl(q, p)
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "skew_kl":
        return kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    if name == "skew_reverse_kl":
        return kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q)])
    raise KeyError(name)


def ref_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    z = sum(e)
    return [v / z for v in e]


def ref_dense_buckets(s_row, t_row, tau):
    return ref_softmax(t_row, tau), ref_softmax(s_row, tau)


def ref_sparse_buckets(s_row, topk_lp, topk_idx, tau, tail_lp=None):
    """The sparse definition, in float64 from the module contract: both sides as k + 1 buckets at T=1 (teacher: the
    k cached probs + tail = 1 - their sum clamped at 0, or the cached tail; student: its softmax at the indices + the
    sum of its probs over every other token), then each (k + 1)-way distribution tempered alike: x^(1/tau),
    normalised."""
    p = [math.exp(x) for x in topk_lp]
    p.append(math.exp(tail_lp) if tail_lp is not None else max(0.0, 1.0 - sum(p)))
    q_full = ref_softmax(s_row)
    inside = set(topk_idx)
    q = [q_full[i] for i in topk_idx]
    q.append(sum(v for i, v in enumerate(q_full) if i not in inside))

    def temper(buckets):
        powered = [x ** (1.0 / tau) for x in buckets]
        return [x / sum(powered) for x in powered]

    return temper(p), temper(q)


def ref_kd(student, targets, mask, name, tau, ce_weight, params, teacher=None, topk=None):
    """(loss, kd, ce, n) by explicit loops over positions."""
    b, s, _ = student.shape
    div_sum = ce_sum = 0.0
    n = 0
    for i in range(b):
        for j in range(s):
            if not mask[i, j]:
                continue
            s_row = student[i, j].double().tolist()
            if teacher is not None:
                p, q = ref_dense_buckets(s_row, teacher[i, j].double().tolist(), tau)
            else:
                tail = topk[2][i, j].item() if len(topk) > 2 else None
                p, q = ref_sparse_buckets(s_row, topk[0][i, j].double().tolist(), topk[1][i, j].tolist(), tau, tail)
            div_sum += ref_divergence(name, p, q, **params)
            ce_sum += -math.log(ref_softmax(s_row)[int(targets[i, j])])
            n += 1
    kd = tau**2 * div_sum / n if n else 0.0
    ce = ce_sum / n if n else 0.0
    return (1 - ce_weight) * kd + ce_weight * ce, kd, ce, n


def t32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- fixtures


def make_batch(seed: int = 0, b: int = 2, s: int = 5, v: int = 11, scale: float = 2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    teacher = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[0, 0] = True  # never all masked by chance
    return student, teacher, targets, mask


def cache_topk(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the teacher cache stores: top-k log-probs at T=1 and their indices."""
    return torch.topk(F.log_softmax(teacher.float(), dim=-1), k, dim=-1)


# ---------------------------------------------------------------------------------------------- divergences


def test_registry_has_the_six_divergences():
    assert DIVERGENCES.names() == sorted(["forward_kl", "reverse_kl", "jsd", "tv", "skew_kl", "skew_reverse_kl"])


@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_divergence_matches_brute_force(name, params):
    student, teacher, _, _ = make_batch(seed=1)
    t_logp, s_logp = dense_logprobs(student.view(-1, 11), teacher.view(-1, 11), 1.0)
    got = DIVERGENCES.get(name)(t_logp, s_logp, **params)
    want = [
        ref_divergence(name, ref_softmax(t.tolist()), ref_softmax(s.tolist()), **params)
        for s, t in zip(student.view(-1, 11).double(), teacher.view(-1, 11).double())
    ]
    assert got.shape == (10,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), **TOL)


@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_divergence_of_identical_distributions_is_zero(name, params):
    logp = F.log_softmax(torch.randn(6, 9, generator=torch.Generator().manual_seed(2)) * 3, dim=-1)
    got = DIVERGENCES.get(name)(logp, logp.clone(), **params)
    torch.testing.assert_close(got, torch.zeros(6), **TOL)


def test_forward_kl_equals_torch_kl_div():
    student, teacher, _, _ = make_batch(seed=3)
    t_logp, s_logp = dense_logprobs(student.view(-1, 11), teacher.view(-1, 11), 1.0)
    want = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / t_logp.shape[0]
    torch.testing.assert_close(DIVERGENCES.get("forward_kl")(t_logp, s_logp).mean(), want, **TOL)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher, _, _ = make_batch(seed=4)
    t_logp, s_logp = dense_logprobs(student, teacher, 1.0)
    jsd = DIVERGENCES.get("jsd")
    torch.testing.assert_close(jsd(t_logp, s_logp, beta=0.0), DIVERGENCES.get("forward_kl")(t_logp, s_logp), **TOL)
    torch.testing.assert_close(jsd(t_logp, s_logp, beta=1.0), DIVERGENCES.get("reverse_kl")(t_logp, s_logp), **TOL)


def test_jsd_half_is_symmetric_and_at_most_ln2():
    student, teacher, _, _ = make_batch(seed=5, scale=8.0)  # sharp, far-apart distributions approach ln 2
    t_logp, s_logp = dense_logprobs(student, teacher, 1.0)
    jsd = DIVERGENCES.get("jsd")
    torch.testing.assert_close(jsd(t_logp, s_logp, beta=0.5), jsd(s_logp, t_logp, beta=0.5), **TOL)
    assert (jsd(t_logp, s_logp, beta=0.5) <= math.log(2) + 1e-6).all()
    disjoint_t = torch.log(torch.tensor([[1.0, 0.0, 0.0]]))
    disjoint_s = torch.log(torch.tensor([[0.0, 0.5, 0.5]]))
    torch.testing.assert_close(jsd(disjoint_t, disjoint_s, beta=0.5), torch.tensor([math.log(2)]), **TOL)


def test_tv_is_between_zero_and_one():
    student, teacher, _, _ = make_batch(seed=6, scale=10.0)
    t_logp, s_logp = dense_logprobs(student, teacher, 1.0)
    got = DIVERGENCES.get("tv")(t_logp, s_logp)
    assert ((got >= 0) & (got <= 1 + 1e-6)).all()
    one = DIVERGENCES.get("tv")(torch.log(torch.tensor([1.0, 0.0])), torch.log(torch.tensor([0.0, 1.0])))
    torch.testing.assert_close(one, t32(1.0), **TOL)


# ---------------------------------------------------------------------------------------------- dense kd_loss


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_dense_kd_loss_matches_brute_force(name, params, tau):
    student, teacher, targets, mask = make_batch(seed=7)
    out = kd_loss(student, targets, mask, teacher_logits=teacher, loss=name, temperature=tau, ce_weight=0.3, **params)
    loss, kd, ce, n = ref_kd(student, targets, mask, name, tau, 0.3, params, teacher=teacher)
    assert isinstance(out, KDLossOutput) and out.n_tokens == n == int(mask.sum())
    torch.testing.assert_close(out.kd, t32(kd), **TOL)
    torch.testing.assert_close(out.ce, t32(ce), **TOL)
    torch.testing.assert_close(out.loss, t32(loss), **TOL)


def test_kd_term_is_tau_squared_times_mean_tempered_divergence():
    student, teacher, targets, mask = make_batch(seed=8)
    tau = 3.0
    out = kd_loss(student, targets, mask, teacher_logits=teacher, temperature=tau)
    t_logp = F.log_softmax(teacher[mask] / tau, dim=-1)
    s_logp = F.log_softmax(student[mask] / tau, dim=-1)
    per_position = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    torch.testing.assert_close(out.kd, tau**2 * per_position.mean(), **TOL)
    torch.testing.assert_close(out.loss, out.kd, **TOL)  # ce_weight = 0


def test_bf16_inputs_are_computed_in_fp32():
    student, teacher, targets, mask = make_batch(seed=9, dtype=torch.bfloat16)
    t_logp, s_logp = dense_logprobs(student, teacher, 2.0)
    assert t_logp.dtype == s_logp.dtype == torch.float32
    got = kd_loss(student, targets, mask, teacher_logits=teacher, loss="jsd", temperature=2.0, ce_weight=0.5)
    want = kd_loss(student.float(), targets, mask, teacher_logits=teacher.float(), loss="jsd", temperature=2.0,
                   ce_weight=0.5)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, **TOL)


# ---------------------------------------------------------------------------------------------- sparse kd_loss


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_sparse_equals_dense_when_k_is_vocab(name, params, tau):
    student, teacher, targets, mask = make_batch(seed=10)
    kw = dict(loss=name, temperature=tau, ce_weight=0.2, **params)
    dense = kd_loss(student, targets, mask, teacher_logits=teacher, **kw)
    sparse = kd_loss(student, targets, mask, teacher_topk=cache_topk(teacher, 11), **kw)
    torch.testing.assert_close(sparse.loss, dense.loss, **TOL)
    torch.testing.assert_close(sparse.kd, dense.kd, **TOL)


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_sparse_matches_brute_force_buckets(name, params, tau, k):
    student, teacher, targets, mask = make_batch(seed=11)
    topk = cache_topk(teacher, k)
    topk = (topk[0].half(), topk[1].int())  # the cache's storage dtypes
    out = kd_loss(student, targets, mask, teacher_topk=topk, loss=name, temperature=tau, ce_weight=0.25, **params)
    loss, kd, ce, n = ref_kd(student, targets, mask, name, tau, 0.25, params, topk=topk)
    assert out.n_tokens == n
    torch.testing.assert_close(out.kd, t32(kd), **TOL)
    torch.testing.assert_close(out.loss, t32(loss), **TOL)


def test_sparse_logprobs_buckets_are_normalised_log_probs():
    student, teacher, _, _ = make_batch(seed=12)
    lp, idx = cache_topk(teacher, 3)
    t_logp, s_logp = sparse_logprobs(student, lp, idx, 1.5)
    assert t_logp.shape == s_logp.shape == (2, 5, 4)
    torch.testing.assert_close(t_logp.exp().sum(-1), torch.ones(2, 5), **TOL)
    torch.testing.assert_close(s_logp.exp().sum(-1), torch.ones(2, 5), **TOL)
    p, q = ref_sparse_buckets(student[1, 2].double().tolist(), lp[1, 2].double().tolist(), idx[1, 2].tolist(), 1.5)
    torch.testing.assert_close(t_logp[1, 2], torch.tensor(p).log().float(), **TOL)
    torch.testing.assert_close(s_logp[1, 2], torch.tensor(q).log().float(), **TOL)


def exact_cache(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The cache's three tensors (top-k log-probs, indices, exact log tail mass), computed here in float64."""
    logp = F.log_softmax(teacher_logits.double(), dim=-1)
    vals, idx = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, idx, -math.inf), dim=-1)
    return vals.float(), idx, tail.float()


SMOOTH = [v for v in VARIANTS if v[0] != "tv"]
SMOOTH_IDS = [i for i, v in zip(VARIANT_IDS, VARIANTS) if v[0] != "tv"]


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("k", [1, 5, 39, 40])
@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_sparse_student_equal_to_teacher_is_a_minimum_of_zero(name, params, k, tau):
    """Issue #17 item 1: a student whose logits are the teacher's has loss 0 for every divergence, tau and k (the
    old code tempered the teacher's tail as one token and the student's token by token: forward KL 3.4 at V 2000,
    k 32, tau 2). Smooth divergences have a zero gradient there; TV, |x| at 0, is not differentiable at its
    minimum, so for it (and for all) nearby students must score higher."""
    logits = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(50)) * 3
    targets, mask = torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool)
    cache = exact_cache(logits, k)
    student = logits.clone().requires_grad_()
    out = kd_loss(student, targets, mask, teacher_topk=cache, loss=name, temperature=tau, **params)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert abs(out.loss.item()) < 1e-6
    if name != "tv":
        assert grad.abs().max().item() < 1e-6
    g = torch.Generator().manual_seed(51)
    for _ in range(3):
        nearby = logits + 0.05 * torch.randn(logits.shape, generator=g)
        assert kd_loss(nearby, targets, mask, teacher_topk=cache, loss=name, temperature=tau,
                       **params).loss.item() > 1e-6


@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_sparse_issue_case_vocab_2000_k_32_tau_2(name, params):
    """The issue's measured case: V 2000, k 32, tau 2 (configs/tiny-local.yaml's temperature), a teacher with about
    0.2 of its mass outside the top 32. Student = teacher: loss 0 (was forward KL 3.41, JSD 0.87) and, but for TV,
    gradient 0 (was 0.14 for forward KL). Another student: the float64 reference from the definition."""
    g = torch.Generator().manual_seed(52)
    teacher = torch.randn(1, 4, 2000, generator=g) * 3.2
    targets, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool)
    cache = exact_cache(teacher, 32)
    assert 0.1 < cache[2].exp().mean().item() < 0.3
    student = teacher.clone().requires_grad_()
    out = kd_loss(student, targets, mask, teacher_topk=cache, loss=name, temperature=2.0, **params)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert abs(out.loss.item()) < 1e-6
    if name != "tv":
        assert grad.norm().item() < 1e-6
    other = teacher + torch.randn(teacher.shape, generator=g)
    got = kd_loss(other, targets, mask, teacher_topk=cache, loss=name, temperature=2.0, ce_weight=0.3, **params)
    loss, kd, _, _ = ref_kd(other, targets, mask, name, 2.0, 0.3, params, topk=cache)
    torch.testing.assert_close(got.kd, t32(kd), **TOL)
    torch.testing.assert_close(got.loss, t32(loss), **TOL)


def zero_tail_cache(b=1, s=3, v=7):
    """Teacher top-2 whose mass is exactly 1 (tail exactly 0), with a zero bucket inside the top-k too (rows 0, 2),
    or a sum above 1, as fp16 rounding of a confident teacher gives, clamped to a zero tail (row 1)."""
    lp = torch.tensor([[[0.0, -math.inf], [math.log(0.6), math.log(0.41)], [-math.inf, 0.0]]])
    idx = torch.tensor([[[3, 1], [0, 6], [2, 5]]])
    return lp.expand(b, s, 2).half(), idx.expand(b, s, 2)


FINITE_ON_ZERO_TAIL = [v for v in VARIANTS if v[0] != "reverse_kl"]


@pytest.mark.parametrize("name,params", FINITE_ON_ZERO_TAIL, ids=[i for i, v in zip(VARIANT_IDS, VARIANTS)
                                                                   if v[0] != "reverse_kl"])
def test_zero_teacher_tail_gives_finite_value_and_gradient(name, params):
    lp, idx = zero_tail_cache()
    t_logp, _ = sparse_logprobs(torch.zeros(1, 3, 7), lp, idx, 1.0)
    assert torch.isneginf(t_logp[..., -1]).all()  # the tail is an exact zero, not a tiny float
    student = torch.randn(1, 3, 7, generator=torch.Generator().manual_seed(13)).requires_grad_()
    for tau in (1.0, 2.0):
        out = kd_loss(student, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool),
                      teacher_topk=(lp, idx), loss=name, temperature=tau, ce_weight=0.1, **params)
        (grad,) = torch.autograd.grad(out.loss, student)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


def test_reverse_kl_on_zero_teacher_tail_is_inf_not_nan():
    """The student puts mass where the teacher puts exactly none: reverse KL is +inf, as its formula says."""
    lp, idx = zero_tail_cache()
    out = kd_loss(torch.randn(1, 3, 7), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool),
                  teacher_topk=(lp, idx), loss="reverse_kl")
    assert torch.isposinf(out.loss)


@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_sparse_full_vocab_gradients_are_finite(name, params):
    """k == V: the tail is empty for both sides (0 vs 0) and every divergence stays finite, gradient included."""
    student, teacher, targets, mask = make_batch(seed=14)
    student.requires_grad_()
    out = kd_loss(student, targets, mask, teacher_topk=cache_topk(teacher, 11), loss=name, **params)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(student.grad).all()


# ---------------------------------------------------------------------------------------------- masking, mixing


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_masked_positions_do_not_change_the_loss(sparse):
    student, teacher, targets, mask = make_batch(seed=15)
    student.requires_grad_()

    def run(st, te, tg):
        kw = dict(teacher_topk=cache_topk(te, 5)) if sparse else dict(teacher_logits=te)
        return kd_loss(st, tg, mask, loss="jsd", temperature=2.0, ce_weight=0.5, **kw).loss

    base = run(student, teacher, targets)
    (grad,) = torch.autograd.grad(base, student)
    off = ~mask[..., None]
    changed = run(torch.where(off, student * 7 + 3, student), torch.where(off, -teacher, teacher),
                  torch.where(mask, targets, -100))
    torch.testing.assert_close(changed, base, **TOL)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_all_masked_is_zero_and_backward_works(sparse, chunk_size):
    student, teacher, targets, _ = make_batch(seed=16)
    student.requires_grad_()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    kw = dict(teacher_topk=cache_topk(teacher, 4)) if sparse else dict(teacher_logits=teacher)
    out = kd_loss(student, targets, mask, loss="skew_reverse_kl", ce_weight=0.3, chunk_size=chunk_size, **kw)
    assert out.n_tokens == 0 and out.loss.item() == out.kd.item() == out.ce.item() == 0.0
    out.loss.backward()
    assert (student.grad == 0).all()


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_ce_weight_mixes_kd_and_cross_entropy(w):
    student, teacher, targets, mask = make_batch(seed=17)
    out = kd_loss(student, targets, mask, teacher_logits=teacher, loss="tv", temperature=2.0, ce_weight=w)
    kd_only = kd_loss(student, targets, mask, teacher_logits=teacher, loss="tv", temperature=2.0).loss
    ce = F.cross_entropy(student[mask], targets[mask])
    torch.testing.assert_close(out.ce, ce, **TOL)
    torch.testing.assert_close(out.loss, (1 - w) * kd_only + w * ce, **TOL)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_chunked_equals_unchunked_in_value_and_gradient(sparse):
    student, teacher, targets, mask = make_batch(seed=18, b=3, s=6)
    kw = dict(teacher_topk=cache_topk(teacher, 4)) if sparse else dict(teacher_logits=teacher)
    results = []
    for chunk_size in (None, 4, 1):  # N is not a multiple of 4
        st = student.clone().requires_grad_()
        out = kd_loss(st, targets, mask, loss="jsd", beta=0.3, temperature=1.5, ce_weight=0.4,
                      chunk_size=chunk_size, **kw)
        out.loss.backward()
        results.append((out.loss.detach(), out.kd, out.ce, st.grad))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------- gradients


def test_gradcheck_dense_jsd_float64():
    student, teacher, targets, mask = make_batch(seed=19, b=1, s=3, v=5, scale=1.0, dtype=torch.float64)
    fn = lambda s: kd_loss(s, targets, mask, teacher_logits=teacher, loss="jsd", beta=0.3,  # noqa: E731
                           temperature=2.0, ce_weight=0.2).loss
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(),))


@pytest.mark.parametrize("name", ["forward_kl", "skew_reverse_kl"])
def test_gradcheck_sparse_float64(name):
    student, teacher, targets, mask = make_batch(seed=20, b=1, s=3, v=6, scale=1.0, dtype=torch.float64)
    lp, idx = torch.topk(F.log_softmax(teacher, dim=-1), 3, dim=-1)
    fn = lambda s: kd_loss(s, targets, mask, teacher_topk=(lp, idx), loss=name, temperature=1.5,  # noqa: E731
                           chunk_size=2).loss
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(),))


# ---------------------------------------------------------------------------------------------- errors


def test_bad_arguments_are_errors_that_name_them():
    student, teacher, targets, mask = make_batch(seed=21)
    run = lambda **kw: kd_loss(student, targets, mask, **kw)  # noqa: E731
    with pytest.raises(UnknownNameError, match="forward_kl.*jsd.*reverse_kl.*skew_kl.*skew_reverse_kl.*tv"):
        run(teacher_logits=teacher, loss="kl")
    with pytest.raises(ValueError, match="exactly one"):
        run()
    with pytest.raises(ValueError, match="exactly one"):
        run(teacher_logits=teacher, teacher_topk=cache_topk(teacher, 3))
    with pytest.raises(ValueError, match="beta"):
        run(teacher_logits=teacher, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        run(teacher_logits=teacher, loss="skew_kl", alpha=-0.1)
    with pytest.raises(ValueError, match="alpha"):  # a parameter the divergence does not take
        run(teacher_logits=teacher, loss="jsd", alpha=0.1)
    with pytest.raises(ValueError, match="beta"):  # validated even when every position is masked
        kd_loss(student, targets, torch.zeros_like(mask), teacher_logits=teacher, loss="jsd", beta=-1.0)
    for tau in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            run(teacher_logits=teacher, temperature=tau)
    with pytest.raises(ValueError, match="ce_weight"):
        run(teacher_logits=teacher, ce_weight=1.2)
    with pytest.raises(ValueError, match="chunk_size"):
        run(teacher_logits=teacher, chunk_size=0)
    with pytest.raises(ValueError, match="teacher_logits"):
        run(teacher_logits=teacher[..., :5])


# ---------------------------------------------------------------------------------------------- peer: TRL


def _trl_generalized_jsd_loss():
    pytest.importorskip("trl", reason="peer library TRL not installed; install with .[bench]")
    with warnings.catch_warnings():  # trl.experimental warns on import
        warnings.simplefilter("ignore")
        try:
            from trl import GKDTrainer
        except ImportError:  # TRL >= 1.x moved GKD under trl.experimental
            from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
def test_matches_trl_generalized_jsd_loss(beta):
    """TRL: no tau**2 factor, 'batchmean' over positions whose label is not -100; beta=0 / 1 are its forward /
    reverse KL. Compared with our forward_kl at beta=0 and our jsd otherwise."""
    trl_loss = _trl_generalized_jsd_loss()
    student, teacher, targets, mask = make_batch(seed=22)
    tau = 2.0
    labels = torch.where(mask, targets, -100)
    want = trl_loss(student, teacher, labels=labels, beta=beta, temperature=tau)
    name = "forward_kl" if beta == 0.0 else "jsd"
    params = {} if beta == 0.0 else {"beta": beta}
    ours = kd_loss(student, targets, mask, teacher_logits=teacher, loss=name, temperature=tau, **params)
    torch.testing.assert_close(ours.kd / tau**2, want.float(), **TOL)


def test_cached_tail_equals_recomputed_tail_and_keeps_reverse_kl_finite():
    """The teacher cache stores the exact log tail mass; given it, the sparse loss equals the recomputed-tail form,
    and a confident teacher whose fp16 top-k sums to >= 1 no longer makes reverse KL infinite."""
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(2, 3, 40, generator=g) * 3
    s_logits = torch.randn(2, 3, 40, generator=g)
    logp = torch.log_softmax(t_logits, -1)
    vals, idx = logp.topk(6, -1)
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    tgt = torch.zeros(2, 3, dtype=torch.long)
    for name in DIVERGENCES.names():
        a = kd_loss(s_logits, tgt, mask, teacher_topk=(vals, idx), loss=name).loss
        b = kd_loss(s_logits, tgt, mask, teacher_topk=(vals, idx, tail), loss=name).loss
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a very confident teacher: in fp16 its top-k rounds to a full (or over-full) distribution
    sharp = torch.log_softmax(t_logits * 20, -1)
    v, i = sharp.topk(6, -1)
    tail = torch.logsumexp(sharp.scatter(-1, i, float("-inf")), -1)
    s = s_logits.clone().requires_grad_(True)
    out = kd_loss(s, tgt, mask, teacher_topk=(v.half(), i, tail), loss="reverse_kl")
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------------- student buckets
# _SparseStudentLogProbs (one softmax buffer, one-pass backward) against the plain autograd formulation it replaced,
# kept in the module as _sparse_student_logprobs_reference.


def _reference_student_buckets(student_logits, idx, temperature, targets=None):
    """Drop-in for losses._student_buckets built on the reference: (buckets, lse - z[targets] or lse)."""
    z32 = losses._upcast(student_logits)  # once, so that a half-precision gradient is rounded once
    z = z32 if temperature == 1.0 else z32 / temperature
    lse = torch.logsumexp(z, dim=-1)
    second = lse if targets is None else lse - z.gather(-1, targets.long()[..., None]).squeeze(-1)
    return losses._sparse_student_logprobs_reference(z32, idx, temperature), second


def _distinct_topk_indices(n, v, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])


def _rows_with_tail_mass(log10_tails, v=40, k=5, seed=0):
    """One row per entry: logits whose non-top-k tokens hold about 10**t of the mass (t = None: a random row),
    with the top-k at random distinct positions. Returns (z [n, v] fp32, idx [n, k], exact tail masses fp64)."""
    g = torch.Generator().manual_seed(seed)
    idx = _distinct_topk_indices(len(log10_tails), v, k, seed)
    rows = []
    for t, ix in zip(log10_tails, idx):
        z = torch.randn(v, generator=g, dtype=torch.float64)
        if t is not None:
            inside = torch.zeros(v, dtype=torch.bool)
            inside[ix] = True
            z = torch.where(inside, 0.5 * z, 0.5 * z - 40.0)  # the tail far below, then moved to mass 10**t
            mass = lambda zz: (torch.logsumexp(zz[~inside], 0) - torch.logsumexp(zz, 0)).item()  # noqa: E731
            for _ in range(3):  # shifting the tail by d changes its log-mass by about d while it is small
                z = torch.where(inside, z, z + (t * math.log(10) - mass(z)))
        rows.append(z.float())
    z = torch.stack(rows)
    tails = torch.tensor([(torch.logsumexp(r.double().scatter(0, ix, -math.inf), 0)
                           - torch.logsumexp(r.double(), 0)).item() for r, ix in zip(z, idx)], dtype=torch.float64)
    return z, idx, tails


def _function_vs_reference(z, idx, tau, targets=None, seed=0, grad_tol=TOL):
    """Values and gradients (for random upstream gradients) of the Function and of the reference."""
    g = torch.Generator().manual_seed(seed)
    results = []
    for impl in (losses._student_buckets, _reference_student_buckets):
        zz = z.clone().requires_grad_()
        s, second = impl(zz, idx, tau, targets)
        results.append((s, second, zz))
    (s, second, zz), (s_ref, second_ref, zz_ref) = results
    torch.testing.assert_close(s, s_ref, **TOL)
    torch.testing.assert_close(second, second_ref, **TOL)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    gs = torch.where(torch.isinf(s_ref), 0.0, gs)  # an empty bucket (-inf) gets no gradient from a real loss
    h = torch.randn(second.shape, generator=g, dtype=torch.float64).to(second.dtype)
    grads = []
    for s_, sec, leaf in ((s, second, zz), (s_ref, second_ref, zz_ref)):
        objective = (torch.where(torch.isinf(s_), 0.0, s_) * gs).sum() + (sec * h).sum()
        grads.append(torch.autograd.grad(objective, leaf)[0])
    assert grads[0].dtype == z.dtype and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], **grad_tol)
    return s


@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("with_targets", [False, True], ids=["lse", "ce"])
def test_student_buckets_function_matches_reference(tau, with_targets):
    g = torch.Generator().manual_seed(30)
    z = torch.randn(6, 50, generator=g) * 3
    idx = _distinct_topk_indices(6, 50, 7, seed=31)
    targets = torch.randint(0, 50, (6,), generator=g) if with_targets else None
    targets = None if targets is None else torch.where(torch.arange(6) == 0, idx[:, 0], targets)  # target in K too
    _function_vs_reference(z, idx, tau, targets)


def test_student_buckets_at_a_real_vocabulary_size_are_as_accurate_as_the_reference():
    """V = 49152 (SmolLM2), k = 64, logits around 20 (4 rows): both forms against an fp64 ground truth (the same
    formulation on the fp64-converted inputs). At this size the plain forms differ from each other by ~ulp(lse)
    (the reference's tail is a difference of two rounded logsumexps), so the check is: no larger error than the
    reference's, in values (buckets and CE) and in gradient."""
    g = torch.Generator().manual_seed(45)
    n, v, k = 4, 49152, 64
    for scale, tau in ((1.0, 1.0), (3.0, 1.0), (8.0, 2.0)):
        z = torch.randn(n, v, generator=g) * scale + 20.0
        idx = _distinct_topk_indices(n, v, k, seed=46)
        idx[:2] = z[:2].topk(k, dim=-1).indices  # rows where the student agrees with the teacher
        targets = idx[:, 5]
        weights, h = torch.randn(n, k + 1, generator=g), torch.randn(n, generator=g)
        got = []
        for impl, x in ((losses._student_buckets, z), (_reference_student_buckets, z),
                        (_reference_student_buckets, z.double())):
            x = x.clone().requires_grad_()
            s, ce = impl(x, idx, tau, targets)
            (grad,) = torch.autograd.grad((s * weights.to(s.dtype)).sum() + (ce * h.to(s.dtype)).sum(), x)
            got.append([t.detach().double() for t in (s, ce, grad)])
        new, ref, truth = got
        for name, a, b, t in zip(("buckets", "ce", "grad"), new, ref, truth):
            err, ref_err = (a - t).abs().max().item(), (b - t).abs().max().item()
            assert err <= 1.5 * ref_err + 1e-7, f"{name} (scale {scale}, tau {tau}): {err:.2e} vs {ref_err:.2e}"


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_student_buckets_when_top_k_holds_almost_all_mass(tau):
    """Tails from 1e-3 down to 1e-60: the tail is summed over the non-top-k tokens (no 1 - sum cancellation), and
    rows below sqrt(fp32 tiny) ~ 1e-19, where those terms could underflow, take the exact masked-logsumexp path."""
    log10_tails = [None, -3, -7, -9, -12, -18, -25, -40, -60]
    z, idx, tails = _rows_with_tail_mass(log10_tails)
    for want, t in zip(tails.tolist(), log10_tails):  # the fixture does what it says
        assert t is None or abs(want / math.log(10) - t) < 0.05
    targets = idx[:, 1].clone()
    s = _function_vs_reference(z, idx, tau, targets)
    if tau == 1.0:  # against the fp64 ground truth too: the tail mass itself to ~1e-6 relative, however small
        torch.testing.assert_close(s[:, -1].double(), tails, rtol=1e-7, atol=1e-6)


def test_student_buckets_with_underflowing_tail_and_minus_inf_logits():
    """A tail e^-200 below the top-k (every tail q_j is 0 in fp32), and -inf logits in and outside the top-k."""
    g = torch.Generator().manual_seed(32)
    z = torch.randn(3, 12, generator=g)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    z[0, 3:] -= 200.0
    z[1, 4] = -math.inf  # a top-k token the student excludes
    z[2, 9:] = -math.inf  # part of the tail excluded
    s = _function_vs_reference(z, idx, 1.0, targets=torch.tensor([1, 3, 6]))
    assert torch.isfinite(s[0]).all() and torch.isneginf(s[1, 1])


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_student_buckets_full_vocabulary_has_empty_tail(tau):
    g = torch.Generator().manual_seed(33)
    z = torch.randn(4, 9, generator=g) * 2
    idx = torch.stack([torch.randperm(9, generator=g) for _ in range(4)])
    s = _function_vs_reference(z, idx, tau, targets=torch.tensor([0, 3, 8, 2]))
    assert torch.isneginf(s[:, -1]).all()


def test_student_buckets_repeated_indices_are_still_differentiated_correctly():
    """torch.topk never repeats an index, but a repeated one is handled like the reference (k < V)."""
    g = torch.Generator().manual_seed(34)
    z = torch.randn(3, 10, generator=g)
    idx = torch.tensor([[1, 1, 4], [2, 5, 2], [7, 8, 9]])
    _function_vs_reference(z, idx, 1.3, targets=torch.tensor([1, 0, 9]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_student_buckets_half_precision_logits(dtype):
    """Computed in fp32 from the exactly upcast logits; the gradient comes back in the input dtype."""
    g = torch.Generator().manual_seed(35)
    z = (torch.randn(5, 30, generator=g) * 3).to(dtype)
    idx = _distinct_topk_indices(5, 30, 4, seed=36)
    for tau in (1.0, 2.0):
        s, _ = losses._student_buckets(z, idx, tau)
        assert s.dtype == torch.float32
        # values at fp32 tolerance; gradients rounded (once) to the input dtype: at most one ulp apart
        _function_vs_reference(z, idx, tau, targets=idx[:, 0], grad_tol={})


@pytest.mark.parametrize("case", ["random", "tempered", "full_vocab", "tiny_tail_fallback", "repeated_index"])
def test_student_buckets_gradcheck_float64(case):
    g = torch.Generator().manual_seed(37)
    v, k, tau = 7, 3, 1.0
    z = torch.randn(3, v, generator=g, dtype=torch.float64)
    idx = torch.tensor([[0, 2, 5], [1, 3, 6], [4, 5, 0]])
    if case == "tempered":
        tau = 1.7
    elif case == "full_vocab":
        k = v
        idx = torch.stack([torch.randperm(v, generator=g) for _ in range(3)])
    elif case == "tiny_tail_fallback":  # tail ~ e^-400 < sqrt(fp64 tiny) ~ 1e-154: the exact path, in fp64 too
        z[0] = torch.where(torch.isin(torch.arange(v), idx[0]), z[0] + 400.0, z[0])
    elif case == "repeated_index":
        idx = torch.tensor([[0, 0, 5], [1, 3, 6], [4, 4, 4]])
    targets = torch.tensor([2, 0, 6])

    def fn(zz):
        s, ce = losses._SparseStudentLogProbs.apply(zz, idx, tau, targets)
        return (s[:, :k] if k == v else s), ce  # an empty tail is a constant -inf

    assert torch.autograd.gradcheck(fn, (z.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda zz: losses._SparseStudentLogProbs.apply(zz, idx, tau)[0][:, :k],
                                    (z,))


def test_student_buckets_backward_twice_with_retain_graph():
    """The first backward may reuse the saved softmax buffer for the gradient only when the graph is not kept:
    retained backwards agree with each other, with the last (buffer-reusing) one and with the reference."""
    g = torch.Generator().manual_seed(38)
    z = (torch.randn(4, 20, generator=g) * 2).requires_grad_()
    idx = _distinct_topk_indices(4, 20, 3, seed=39)
    weights = torch.randn(4, 4, generator=g)
    objectives = []
    for impl in (losses._student_buckets, _reference_student_buckets):
        s, ce = impl(z, idx, 1.0, idx[:, 2])
        objectives.append((s * weights).sum() + ce.sum())
    (ref,) = torch.autograd.grad(objectives[1], z)
    (first,) = torch.autograd.grad(objectives[0], z, retain_graph=True)
    objectives[0].backward(retain_graph=True)
    objectives[0].backward()  # this one may donate the buffer
    torch.testing.assert_close(first, ref, **TOL)
    torch.testing.assert_close(z.grad, 2 * first, **TOL)


def _grad_fn_names(t):
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_sparse_logprobs_uses_the_function():
    student, teacher, _, _ = make_batch(seed=40)
    lp, idx = cache_topk(teacher, 3)
    _, s_logp = sparse_logprobs(student.requires_grad_(), lp, idx, 2.0)
    assert any("SparseStudentLogProbs" in n for n in _grad_fn_names(s_logp))


class _CountNewFullSizeTensors(TorchDispatchMode):
    """Counts ops that allocate a new tensor of exactly `numel` elements (not views, in-place or out= ops)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._schema.is_mutable or func.is_view:
            return out
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.numel() == self.numel and o.untyped_storage().data_ptr() not in inputs:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("ce_weight", [0.0, 0.5, 1.0])
def test_sparse_step_at_tau_1_allocates_one_full_size_buffer(ce_weight):
    """Forward and backward of the sparse loss at tau = 1 (fp32, unchunked) allocate a single [N, V] tensor, the
    softmax buffer, which backward turns into the gradient in place; the CE (logged or trained) only gathers."""
    student, teacher, targets, mask = make_batch(seed=41, b=2, s=4, v=64)
    mask = torch.ones_like(mask)
    topk = cache_topk(teacher, 6)
    st = student.clone().requires_grad_()
    with _CountNewFullSizeTensors(st.numel()) as counter:
        out = kd_loss(st, targets, mask, teacher_topk=topk, loss="forward_kl", ce_weight=ce_weight)
        out.loss.backward()
    assert counter.ops == ["aten._softmax.default"]
    ref = F.cross_entropy(student.view(-1, 64), targets.view(-1))
    torch.testing.assert_close(out.ce, ref, **TOL)


# ------------------------------------------------------------------ kd_loss with the Function vs the reference form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sparse_kd_loss_matches_reference_formulation(tau, ce_weight, chunk_size, dtype, monkeypatch):
    """kd_loss (masked rows, chunked or not, CE logged or trained) equals the same call where the student buckets
    and the CE come from the plain autograd formulation, in value and in gradient."""
    student, teacher, targets, mask = make_batch(seed=42, b=3, s=5, v=23, scale=3.0, dtype=dtype)
    topk = cache_topk(teacher, 5)
    results = []
    for impl in (losses._student_buckets, _reference_student_buckets):
        monkeypatch.setattr(losses, "_student_buckets", impl)
        st = student.clone().requires_grad_()
        out = kd_loss(st, targets, mask, teacher_topk=topk, loss="jsd", beta=0.3, temperature=tau,
                      ce_weight=ce_weight, chunk_size=chunk_size)
        out.loss.backward()
        results.append((out.loss.detach(), out.kd, out.ce, st.grad))
    for name, got, want in zip(("loss", "kd", "ce", "grad"), *results):
        tol = {} if name == "grad" and dtype == torch.bfloat16 else TOL  # bf16 gradients: bf16 tolerance
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    assert (results[0][3][~mask] == 0).all()


def test_teacher_topk_with_mismatched_indices_is_refused():
    """Mutation survivor (docs/MUTATION.md): log-probs and indices of different k, leading dims right."""
    student, teacher, targets, mask = make_batch(seed=60)
    lp, idx = cache_topk(teacher, 4)
    with pytest.raises(ValueError, match="teacher_topk"):
        kd_loss(student, targets, mask, teacher_topk=(lp, idx[..., :3]))
