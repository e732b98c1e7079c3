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

Sparse form (a teacher cache of top-k log-probs at T=1 and their indices): the teacher's buckets are its k
log-probs plus one tail bucket log(1 - sum exp(topk)) holding the remaining mass (clamped at 0; an exactly empty
tail is log 0 = -inf; if k == V the tail is empty by construction). At temperature tau the buckets are
log_softmax(buckets / tau): exact at tau = 1 (and when k == V); for tau != 1 the tail is treated as one
pseudo-token, an approximation, since the tempered tail mass depends on how the mass is spread inside it. The
student's buckets are its tempered log-probs at the same indices plus its exact tail
logsumexp(z/tau over the non-top-k tokens) - logsumexp(z/tau).

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
from torch.utils.checkpoint import checkpoint

from pocketlm.registry import Registry

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
    vocab, k = student_logits.shape[-1], topk_indices.shape[-1]
    if k > vocab:
        raise ValueError(f"teacher top-k has k={k} entries but the vocabulary has only {vocab}")
    idx = topk_indices.long()

    # Teacher: buckets at T=1, then tempered as k+1 pseudo-tokens (log_softmax also renormalises a clamped tail).
    lp = _upcast(topk_logprobs)  # [..., k]
    if k == vocab:
        t_tail = torch.full_like(lp[..., :1], _NEG_INF)
    elif tail_logprob is not None:
        t_tail = _upcast(tail_logprob).reshape(lp.shape[:-1] + (1,))
    else:
        t_tail = _log1mexp(torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=0.0))  # [..., 1]
    t_buckets = torch.cat([lp, t_tail], dim=-1)  # [..., k+1]
    t_logp = F.log_softmax(t_buckets if temperature == 1.0 else t_buckets / temperature, dim=-1)

    # Student: exact tempered log-probs at the indices, and the exact log-mass of everything else.
    z = _upcast(student_logits)
    z = z if temperature == 1.0 else z / temperature  # [..., V]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [..., 1]
    s_top = z.gather(-1, idx) - lse  # [..., k]
    if k == vocab:
        s_tail = torch.full_like(lse, _NEG_INF)
    else:
        s_tail = torch.logsumexp(z.scatter(-1, idx, _NEG_INF), dim=-1, keepdim=True) - lse  # [..., 1]
    return t_logp, torch.cat([s_top, s_tail], dim=-1)


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
    """Sum over the chunk's positions of the divergence and of the CE; a term with weight 0 gets no graph."""
    with torch.set_grad_enabled(kd_grad):
        if len(teacher) == 1:
            t_logp, s_logp = dense_logprobs(student, teacher[0], temperature)
        else:
            t_logp, s_logp = sparse_logprobs(student, *teacher[:2], temperature, *teacher[2:])
        kd = divergence(t_logp, s_logp, **params).sum()
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
    # when n == 0 split yields one empty chunk, which keeps the graph and still validates the params.
    kd_sum = ce_sum = None
    for chunk in zip(*(x.split(step) for x in (student, tgt, *teacher))):
        kd, ce = checkpoint(sums, *chunk, use_reentrant=False) if recompute else sums(*chunk)
        kd_sum, ce_sum = (kd, ce) if kd_sum is None else (kd_sum + kd, ce_sum + ce)

    denom = max(n, 1)
    kd = kd_sum * (temperature**2 / denom)
    ce = ce_sum / denom
    total = kd if ce_weight == 0.0 else ce if ce_weight == 1.0 else (1.0 - ce_weight) * kd + ce_weight * ce
    return KDLossOutput(loss=total, kd=kd.detach(), ce=ce.detach(), n_tokens=n)
