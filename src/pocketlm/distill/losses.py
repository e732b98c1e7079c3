"""Distillation losses over temperature-scaled distributions, dense (full vocabulary) or sparse (teacher top-k).

Shape legend: b batch, s sequence, V vocabulary, k cached teacher top-k, N unmasked positions, C buckets
(C = V dense, C = k + 1 sparse).

Contract (every variant below, dense or sparse, chunked or not, is tested against it):
- Inputs are already aligned: position t of the student and of the teacher both predict token t + 1; the caller
  shifts. ``targets[t]`` is that next token.
- Softmax / log-softmax run in fp32 (at least: fp64 input stays fp64) whatever the input dtype.
- Positions where ``mask`` is False are excluded. The KD term is the mean over unmasked positions of the
  per-position divergence (a sum over the vocabulary, or over the buckets), multiplied by tau**2 (Hinton et al.
  2015, "Distilling the Knowledge in a Neural Network": keeps gradient scale independent of tau). tau**2 is applied
  to every divergence alike.
- CE is the student's cross-entropy on ``targets`` at temperature 1, averaged over the same positions.
- loss = (1 - ce_weight) * KD + ce_weight * CE. All positions masked -> every term is 0, with a gradient path
  (backward works and gives zero gradients, never NaN).
- Zero-probability buckets follow 0 * log 0 = 0, with no NaN in value or gradient. A divergence that is truly
  infinite stays +inf (e.g. reverse KL where the teacher gives 0 to a bucket the student does not).
- Teacher tensors are treated as data: the trainer passes them without gradient. (Dense teacher gradients do flow
  if the caller lets them; the sparse teacher tail is not meant to be differentiated.)

Sparse form (a teacher cache of top-k log-probs at T=1 and their indices): both sides are compared on the same
k + 1 outcomes, the k cached tokens and one tail bucket, and both sides' buckets are made the same way. At T=1 the
teacher's buckets are its k log-probs plus its tail log(1 - sum exp(topk)) (or the exact tail log-mass cached
beside them; clamped at 0; an exactly empty tail is log 0 = -inf; if k == V the tail is empty by construction),
and the student's are its log-probs at the same indices plus its exact tail logsumexp(z over the non-top-k tokens)
- logsumexp(z). Temperature is then applied to each (k + 1)-way distribution alike: log_softmax(buckets / tau),
i.e. p_c^(1/tau) / sum_c' p_c'^(1/tau) over the k + 1 buckets. Why: the cache holds only the tail's mass at T=1,
and the teacher's tempered tail mass depends on how that mass is spread over the tail tokens, which is unknown;
tempering the student's tail token by token but the teacher's as one bucket compares two different things, and the
loss is then not 0 at student = teacher (vocabulary 2000, k 32, tau 2: forward KL 3.4, issue #17). Tempering both
coarse distributions keeps every divergence a true divergence between two distributions on the same k + 1
outcomes: 0, with zero gradient, exactly when the student's buckets equal the teacher's, for every tau and k. It
equals the dense loss at tau = 1 and when k == V (tempering a full distribution is log_softmax(z / tau)); for
tau != 1 and k < V the tail bucket is not the tempered tail of either model, only the same function of both.

Divergences (registry ``DIVERGENCES``, each fn(t_logp [..., C], s_logp [..., C], **params) -> [...]):
forward_kl KL(p_T || q_S) (Hinton); reverse_kl KL(q_S || p_T) (MiniLLM, Gu et al. 2024); jsd generalised JSD
with beta (GKD, Agarwal et al. 2024, in TRL's convention: M = beta p_T + (1 - beta) q_S,
JSD = beta KL(p_T || M) + (1 - beta) KL(q_S || M), with beta = 0 -> forward KL and beta = 1 -> reverse KL as TRL
special-cases them, although the formula itself tends to 0 at both ends); tv 0.5 sum |p_T - q_S|;
skew_kl KL(p_T || alpha p_T + (1 - alpha) q_S) and skew_reverse_kl KL(q_S || alpha q_S + (1 - alpha) p_T)
(DistiLLM, Ko et al. 2024, alpha = 0.1). All are true divergences (zero for identical inputs), not cross-entropies.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from pocketlm.core.registry import Registry

Divergence = Callable[..., Tensor]
DIVERGENCES: Registry[Divergence] = Registry("distillation loss")

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------- primitives


def _upcast(x: Tensor) -> Tensor:
    """At least fp32 (a no-op, no copy, for fp32 and fp64 input)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_c p (log p - log q) over the last dim, with 0 log 0 = 0 in value and gradient."""
    p = logp.exp()
    # Where p == 0 both the term and its gradient must be 0; log p - log q may be -inf - -inf = NaN there, which
    # torch.where discards in value and (its gradient being multiplied by the False mask) in backward too.
    diff = torch.where(p == 0, 0.0, logp - logq)
    return (p * diff).sum(-1)


def _log_mixture(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w p + (1 - w) q), NaN-free in gradient where p = q = 0 (logaddexp(-inf, -inf) backprops NaN)."""
    if w == 0.0:
        return logq
    if w == 1.0:
        return logp
    a = logp + math.log(w)
    b = logq + math.log1p(-w)
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    mixed = torch.logaddexp(a.masked_fill(both_zero, 0.0), b.masked_fill(both_zero, 0.0))
    return mixed.masked_fill(both_zero, _NEG_INF)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); x = 0 gives -inf."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ---------------------------------------------------------------------------------------------------- divergences


@DIVERGENCES.register("forward_kl")
def forward_kl(t_logp: Tensor, s_logp: Tensor) -> Tensor:
    """KL(p_T || q_S): mass-covering (Hinton et al. 2015)."""
    return _kl(t_logp, s_logp)


@DIVERGENCES.register("reverse_kl")
def reverse_kl(t_logp: Tensor, s_logp: Tensor) -> Tensor:
    """KL(q_S || p_T): mode-seeking (MiniLLM, Gu et al. 2024)."""
    return _kl(s_logp, t_logp)


@DIVERGENCES.register("jsd")
def jsd(t_logp: Tensor, s_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD (GKD, Agarwal et al. 2024), TRL convention; beta = 0 / 1 are forward / reverse KL."""
    _check_unit_interval("beta", beta)
    if beta == 0.0:
        return forward_kl(t_logp, s_logp)
    if beta == 1.0:
        return reverse_kl(t_logp, s_logp)
    log_m = _log_mixture(t_logp, s_logp, beta)
    return beta * _kl(t_logp, log_m) + (1.0 - beta) * _kl(s_logp, log_m)


@DIVERGENCES.register("tv")
def tv(t_logp: Tensor, s_logp: Tensor) -> Tensor:
    """Total variation distance 0.5 sum |p_T - q_S|, in [0, 1]."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


@DIVERGENCES.register("skew_kl")
def skew_kl(t_logp: Tensor, s_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL(p_T || alpha p_T + (1 - alpha) q_S) (DistiLLM, Ko et al. 2024)."""
    _check_unit_interval("alpha", alpha)
    return _kl(t_logp, _log_mixture(t_logp, s_logp, alpha))


@DIVERGENCES.register("skew_reverse_kl")
def skew_reverse_kl(t_logp: Tensor, s_logp: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL(q_S || alpha q_S + (1 - alpha) p_T) (DistiLLM, Ko et al. 2024)."""
    _check_unit_interval("alpha", alpha)
    return _kl(s_logp, _log_mixture(s_logp, t_logp, alpha))


# ---------------------------------------------------------------------------------------------------- student buckets


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph / create_graph), i.e. whether saved tensors may
    be read again; True when unknown, so that nothing saved is overwritten."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


class _SparseStudentLogProbs(torch.autograd.Function):
    """Student buckets ``[z_K - lse, log sum_{j not in K} e^z_j - lse]`` [N, k + 1] and ``lse - z[targets]``
    [N] (just ``lse`` when ``targets`` is None), with z = logits / tau (computed in at least fp32),
    lse = logsumexp(z), K the indices ``idx`` [N, k]. At tau = 1 the second output is the CE, for free.

    Same values as ``_sparse_student_logprobs_reference`` (up to fp32 rounding), cheaper: forward makes one
    softmax buffer q [N, V] and three reductions (max z, max q, tail sum), with no masked copy of z and no second
    exp pass; backward writes the whole gradient with one pass over that buffer, in place when the graph is not
    kept (``_graph_is_kept``), so a step allocates a single [N, V] fp32 tensor (plus z / tau at tau != 1 and the
    fp32 copy of half-precision logits). With g the incoming
    gradient of the k + 1 buckets, h that of the second output and G = sum(g) - h,
    dL/dz_j = (g_j [j in K] + g_tail q_j / q_tail [j not in K] - q_j G - h [j = target]) / tau.

    Tail: summed directly over the non-top-k q_j (the top-k entries zeroed), so there is no cancellation when the
    top-k holds almost all the mass. Rows whose tail mass is below sqrt(finfo.tiny) (where q_j could lose digits
    to underflow) are recomputed exactly, like the reference, from z with the top-k masked to -inf; the buffer
    then holds q_j / q_tail for them (``scale`` 1) instead of q_j (``scale`` their sum over the tail). An empty tail (k == V, or
    only -inf logits outside K) is log 0 = -inf with a zero gradient. ``idx`` entries are expected distinct (as
    ``torch.topk`` gives); repeated ones are still differentiated correctly for k < V.
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, idx: Tensor, temperature: float, targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        z = _upcast(logits)
        if temperature != 1.0:
            z = z.div_(temperature) if z is not logits else z / temperature
        q = torch.softmax(z, dim=-1)  # [N, V], the buffer saved for backward
        # q is proportional to e^(z - max z), its largest entry being 1 / S' (S' the kernel's own sum, which for a
        # large V can be ~1e-5 off), so lse = max z + log(sum q / max q) with sum q from accurate reductions: the
        # non-top-k part after zeroing the top-k, plus the top-k entries (each index once).
        log_qmax = q.amax(dim=-1, keepdim=True).log()
        q_top = q.gather(-1, idx)  # [N, k]
        if idx.shape[-1] > 1:
            sorted_idx, order = idx.sort(dim=-1)
            repeat = F.pad(sorted_idx[:, 1:] == sorted_idx[:, :-1], (1, 0))
            top_sum = q_top.gather(-1, order).masked_fill(repeat, 0.0).sum(dim=-1, keepdim=True)
        else:
            top_sum = q_top.sum(dim=-1, keepdim=True)
        q.scatter_(-1, idx, 0.0)
        scale = q.sum(dim=-1, keepdim=True)  # [N, 1] tail mass, in q's units
        log_total = (scale + top_sum).log()
        lse = z.amax(dim=-1, keepdim=True) - log_qmax + log_total  # [N, 1]
        s_top = z.gather(-1, idx) - lse  # [N, k]
        second = lse if targets is None else lse - z.gather(-1, targets[:, None])  # [N, 1]
        s_tail = scale.log() - log_total
        exact = (s_tail < 0.5 * math.log(torch.finfo(q.dtype).tiny)).squeeze(-1)
        if bool(exact.any()):
            rows = exact.nonzero().squeeze(-1)
            zr = z[rows].scatter_(-1, idx[rows], _NEG_INF)  # [n_exact, V]
            lse_tail = torch.logsumexp(zr, dim=-1, keepdim=True)
            empty = torch.isneginf(lse_tail)
            w = (zr - torch.where(empty, 0.0, lse_tail)).exp_()  # q_j / q_tail, 0 in K (and for an empty tail)
            q.index_copy_(0, rows, w)
            s_tail.index_copy_(0, rows, lse_tail - lse[rows])
            scale.index_fill_(0, rows, 1.0)
        del z
        ctx.temperature = temperature
        ctx.in_dtype = logits.dtype
        ctx.save_for_backward(q, idx, s_top, s_tail, scale, targets)
        return torch.cat([s_top, s_tail], dim=-1), second.squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, h: Tensor) -> tuple[Tensor | None, None, None, None]:
        q, idx, s_top, s_tail, scale, targets = ctx.saved_tensors
        inv_tau = 1.0 / ctx.temperature
        g, h = g.to(q.dtype), h.to(q.dtype)[:, None]
        big_g = g.sum(dim=-1, keepdim=True) - h  # [N, 1]
        # not in K: q_j (g_tail / q_tail - G) = buffer_j (g_tail - q_tail G) / scale; in K the buffer is 0.
        coef = (g[:, -1:] - s_tail.exp() * big_g) / scale
        coef = torch.where(torch.isneginf(s_tail), 0.0, coef) * inv_tau  # empty tail: no such j
        grad = q if not _graph_is_kept() else torch.empty_like(q)
        torch.mul(q, coef, out=grad)
        # in K: g_j - q_j G (set, then add, so that a repeated index gets every g_j but q_j G once)
        grad.scatter_(-1, idx, s_top.exp() * big_g * -inv_tau)
        grad.scatter_add_(-1, idx, g[:, :-1] * inv_tau)
        if targets is not None:
            grad.scatter_add_(-1, targets[:, None], h * -inv_tau)
        return grad.to(ctx.in_dtype), None, None, None


def _student_buckets(
    student_logits: Tensor, idx: Tensor, temperature: float, targets: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(s_logp [..., k + 1], lse - z[targets] or lse [...]) of ``_SparseStudentLogProbs``, any leading dims."""
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    s_logp, second = _SparseStudentLogProbs.apply(
        student_logits.reshape(-1, vocab), idx.reshape(-1, idx.shape[-1]), temperature,
        None if targets is None else targets.long().reshape(-1),
    )
    return s_logp.reshape(*lead, s_logp.shape[-1]), second.reshape(lead)


def _sparse_student_logprobs_reference(student_logits: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """The plain autograd form of the student buckets [..., k + 1] (three [N, V] passes plus a masked copy in
    forward, several in backward): the test oracle for ``_SparseStudentLogProbs``."""
    z = _upcast(student_logits)
    z = z if temperature == 1.0 else z / temperature  # [..., V]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [..., 1]
    s_top = z.gather(-1, idx) - lse  # [..., k]
    if idx.shape[-1] == z.shape[-1]:
        s_tail = torch.full_like(lse, _NEG_INF)
    else:
        s_tail = torch.logsumexp(z.scatter(-1, idx, _NEG_INF), dim=-1, keepdim=True) - lse  # [..., 1]
    return torch.cat([s_top, s_tail], dim=-1)


# ---------------------------------------------------------------------------------------------------- distributions


def dense_logprobs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(t_logp, s_logp), each [..., V]: log_softmax(logits / tau) in (at least) fp32."""
    def tempered(z: Tensor) -> Tensor:
        z = _upcast(z)
        return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)

    return tempered(teacher_logits), tempered(student_logits)


def sparse_logprobs(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    temperature: float,
    tail_logprob: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(t_logp, s_logp), each [..., k + 1]: the k cached tokens then one tail bucket (see the module docstring).

    `tail_logprob` [...] is the teacher's log tail mass computed at cache time in fp32 (exact, never rounded to
    an empty tail); without it the tail is recovered from the k log-probs as 1 − Σ exp.
    """
    t_logp, s_logp, _ = _sparse_buckets(student_logits, topk_logprobs, topk_indices, temperature, tail_logprob)
    return t_logp, s_logp


def _sparse_buckets(
    student_logits: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    temperature: float,
    tail_logprob: Tensor | None = None,
    targets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``sparse_logprobs`` plus the student's logsumexp(z) - z[targets] [...] (logsumexp(z) without ``targets``),
    its per-position CE at temperature 1."""
    vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher top-k has k={k} entries but the vocabulary has only {vocab}")
    idx = topk_indices.long()

    # Teacher: its k + 1 buckets at T=1 (the cached log-probs and the tail's log-mass).
    lp = _upcast(topk_logprobs)  # [..., k]
    if k == vocab:
        t_tail = torch.full_like(lp[..., :1], _NEG_INF)
    elif tail_logprob is not None:
        t_tail = _upcast(tail_logprob).reshape(lp.shape[:-1] + (1,))
    else:
        t_tail = _log1mexp(torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=0.0))  # [..., 1]
    t_buckets = torch.cat([lp, t_tail], dim=-1)  # [..., k+1]

    # Student: its exact k + 1 buckets at T=1 (log-probs at the indices, log-mass of everything else) and its CE.
    s_buckets, second = _student_buckets(student_logits, idx, 1.0, targets)  # [..., k+1], [...]

    # Both tempered alike, as (k + 1)-way distributions (log_softmax also renormalises a clamped teacher tail).
    return _temper_buckets(t_buckets, temperature), _temper_buckets(s_buckets, temperature), second


def _temper_buckets(buckets: Tensor, temperature: float) -> Tensor:
    """log_softmax(buckets / tau) over the last dim: the tempered form of a (k + 1)-way distribution [..., k+1]."""
    return F.log_softmax(buckets if temperature == 1.0 else buckets / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------------- the loss


@dataclass
class KDLossOutput:
    """``loss`` carries the gradient; ``kd`` (already times tau**2) and ``ce`` are detached, for logging."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    n_tokens: int


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """Rows of x at the True positions of mask: [b, s, ...] -> [N, ...]; a view when nothing is masked."""
    if bool(mask.all()):
        return x.reshape(-1, *x.shape[mask.dim():])
    return x[mask]


def _chunk_sums(
    divergence: Divergence,
    params: dict,
    temperature: float,
    kd_grad: bool,
    ce_grad: bool,
    student: Tensor,
    targets: Tensor,
    *teacher: Tensor,
) -> tuple[Tensor, Tensor]:
    """Sum over the chunk's positions of the divergence and of the CE; a term with weight 0 gets no graph.

    Sparse, the CE comes with the KD buckets (``_SparseStudentLogProbs`` runs at T=1, shares their logsumexp and
    folds the CE gradient into their single backward pass), so it costs only a gather, gradient or not.
    """
    sparse = len(teacher) > 1
    with torch.set_grad_enabled(kd_grad or (ce_grad and sparse)):
        if sparse:
            t_logp, s_logp, nll = _sparse_buckets(student, *teacher[:2], temperature, *teacher[2:], targets=targets)
        else:
            t_logp, s_logp = dense_logprobs(student, teacher[0], temperature)
    with torch.set_grad_enabled(kd_grad):
        kd = divergence(t_logp, s_logp if kd_grad else s_logp.detach(), **params).sum()
    if sparse:
        ce = (nll if ce_grad else nll.detach()).sum()
    else:
        with torch.set_grad_enabled(ce_grad):
            z = _upcast(student)  # CE at temperature 1: logsumexp - target logit (no [N, V] log-softmax kept)
            ce = (torch.logsumexp(z, dim=-1) - z.gather(-1, targets.long()[:, None]).squeeze(-1)).sum()
    return kd, ce


def kd_loss(
    student_logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, ...] | None = None,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    **params: float,
) -> KDLossOutput:
    """Distillation loss of ``student_logits`` [b, s, V] against a dense teacher ([b, s, V] ``teacher_logits``,
    online) or a cached one (``teacher_topk`` = ([b, s, k] log-probs at T=1, [b, s, k] indices[, [b, s] log tail
    mass])), per the module
    contract. ``params`` go to the divergence (``beta``, ``alpha``). ``chunk_size`` processes that many positions
    at a time, each chunk recomputed in backward (activation checkpointing), so the fp32 working set is
    [chunk_size, V] rather than [N, V]; the result is the same.
    """
    divergence = DIVERGENCES.get(loss)
    accepted = [p for p in inspect.signature(divergence).parameters][2:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {loss!r} got unknown parameter(s) {unknown}; it accepts {accepted or 'none'}")
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one of teacher_logits (dense) or teacher_topk (cached top-k)")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    _check_unit_interval("ce_weight", ce_weight)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    mask = mask.bool()
    if student_logits.shape[:-1] != mask.shape or targets.shape != mask.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)}, targets {tuple(targets.shape)} and mask "
            f"{tuple(mask.shape)} must agree on the leading dims [b, s]"
        )
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits {tuple(student_logits.shape)}"
            )
        teacher = (_select(teacher_logits, mask),)  # [N, V]
    else:
        topk_logprobs, topk_indices, *tail = teacher_topk
        if topk_logprobs.shape != topk_indices.shape or topk_logprobs.shape[:-1] != mask.shape:
            raise ValueError(
                f"teacher_topk log-probs {tuple(topk_logprobs.shape)} and indices {tuple(topk_indices.shape)} "
                f"must both be [b, s, k] with [b, s] = {tuple(mask.shape)}"
            )
        if tail and tail[0].shape != mask.shape:
            raise ValueError(f"teacher tail log-mass {tuple(tail[0].shape)} must be [b, s] = {tuple(mask.shape)}")
        teacher = tuple(_select(t, mask) for t in (topk_logprobs, topk_indices, *tail))  # [N, k], [N, k], [N]

    student = _select(student_logits, mask)  # [N, V]
    tgt = _select(targets, mask)  # [N]
    n = student.shape[0]
    grad = torch.is_grad_enabled()
    sums = partial(_chunk_sums, divergence, params, temperature, grad and ce_weight < 1.0, grad and ce_weight > 0.0)
    step = max(n, 1) if chunk_size is None else chunk_size
    recompute = chunk_size is not None and grad and any(x.requires_grad for x in (student, *teacher))
    # split (not slicing) so backward concatenates the chunks' gradients once instead of one [N, V] per chunk;
    # a single chunk is passed whole (split's backward would still copy its gradient); when n == 0 that chunk is
    # empty, which keeps the graph and still validates the params.
    whole = (student, tgt, *teacher)
    chunks = [whole] if step >= n else zip(*(x.split(step) for x in whole))
    kd_sum = ce_sum = None
    for chunk in chunks:
        kd, ce = checkpoint(sums, *chunk, use_reentrant=False) if recompute else sums(*chunk)
        kd_sum, ce_sum = (kd, ce) if kd_sum is None else (kd_sum + kd, ce_sum + ce)

    denom = max(n, 1)
    kd = kd_sum * (temperature**2 / denom)
    ce = ce_sum / denom
    total = kd if ce_weight == 0.0 else ce if ce_weight == 1.0 else (1.0 - ce_weight) * kd + ce_weight * ce
    return KDLossOutput(loss=total, kd=kd.detach(), ce=ce.detach(), n_tokens=n)
