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

from pocketlm.distill.losses import (
    DIVERGENCES,
    KDLossOutput,
    dense_logprobs,
    kd_loss,
    sparse_logprobs,
)
from pocketlm.registry import UnknownNameError

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


def ref_sparse_buckets(s_row, topk_lp, topk_idx, tau):
    """Teacher: k cached probs + tail = 1 - their sum, tempered as k+1 pseudo-tokens (p_i^(1/tau), normalised).
    Student: its tempered softmax at the indices + the sum of its tempered probs over every other token."""
    probs = [math.exp(x) for x in topk_lp]
    probs.append(max(0.0, 1.0 - sum(probs)))
    powered = [x ** (1.0 / tau) for x in probs]
    p = [x / sum(powered) for x in powered]
    q_full = ref_softmax(s_row, tau)
    q = [q_full[i] for i in topk_idx]
    q.append(sum(v for i, v in enumerate(q_full) if i not in set(topk_idx)))
    return p, q


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
                p, q = ref_sparse_buckets(s_row, topk[0][i, j].double().tolist(), topk[1][i, j].tolist(), tau)
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


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name,params", VARIANTS, ids=VARIANT_IDS)
def test_sparse_matches_brute_force_buckets(name, params, tau):
    student, teacher, targets, mask = make_batch(seed=11)
    topk = cache_topk(teacher, 4)
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
