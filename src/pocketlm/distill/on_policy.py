"""On-policy distillation: GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"), computed as TRL's `GKDTrainer` (trl.experimental.gkd, TRL 1.16) computes it.

Why: a student trained only on fixed sequences is used at inference on prefixes it wrote itself, which drift from
what it was trained on. GKD mixes in sequences the student samples: with probability ``lmbda`` a batch's
continuations are sampled by the student from the batch's prompts and the teacher scores those tokens online;
otherwise the batch's own continuation is used. Either way the loss is a divergence between the teacher's and the
student's next-token distributions on the continuation's positions only, the prompt masked.

Our training data are packed token blocks [n, L] with no prompt/response split, so a block's first P
(``prompt_tokens``, default L // 2) tokens are its prompt and the next N (``max_new_tokens``, default L - P) its
continuation: the data's own, or N tokens the student samples. A sequence is [b, P + N]; after the causal shift
position t predicts token t + 1, so the loss covers t = P - 1 ... P + N - 2, the N continuation tokens
(``continuation_mask``), exactly the positions TRL's labels leave unmasked (-100 on the prompt, shifted by one).

TRL mapping (GKDConfig -> our LossConfig):
- beta 0 -> ``loss: forward_kl`` (TRL: kl_div(student, teacher) = KL(p_T || q_S)); beta 1 -> ``loss: reverse_kl``
  (KL(q_S || p_T)); 0 < beta < 1 -> ``loss: jsd`` with the same ``beta``. The convention is TRL's, not reversed:
  M = beta p_T + (1 - beta) q_S and JSD = beta KL(p_T || M) + (1 - beta) KL(q_S || M) on both sides (checked
  against ``generalized_jsd_loss`` in tests/distill/test_on_policy.py). The registry's other divergences (tv,
  skew_kl, skew_reverse_kl) have no TRL counterpart and are used as they are.
- TRL's ``temperature`` is the *sampling* temperature: ``gen_temperature`` here (TRL samples with top_k 0 and
  top_p 1: ``gen_top_p: 1.0``). TRL's ``compute_loss`` calls ``generalized_jsd_loss`` untempered (temperature 1).
  Our ``temperature`` tempers both distributions and multiplies by tau^2 (the losses.py contract), so
  our loss = tau^2 * generalized_jsd_loss(..., temperature=tau), and ``temperature: 1.0`` is GKDTrainer's loss.
- Reduction: TRL's "batchmean" with labels sums the divergence over the unmasked positions (and the vocabulary)
  and divides by their number: our mean over unmasked positions. With gradient accumulation TRL divides by the
  whole step's count (num_items_in_batch) and we average micro-batch means: the same here, where every micro-batch
  holds b * N continuation tokens.
- ``lmbda``: TRL draws ``random.random() <= lmbda`` once per ``training_step`` (per micro-batch) from Python's
  global RNG. We draw per micro-batch too, from a hash of (train.seed, micro-step) (``is_on_policy``): every process
  decides alike and a resumed run decides as the uninterrupted one (u < lmbda: 0 never, 1 always).
- EOS: TRL masks a completion after its first EOS. Our blocks are documents joined by EOS, so a continuation goes
  on past EOS as the data do and every sampled token is in the loss (TRL does so when eos_token_id is None).
- Not implemented: ``seq_kd`` (teacher-sampled continuations on the off-policy batches; TRL's default is off) and
  a CE term (TRL has none; ``ce_weight`` must be 0 in mode on_policy).

Shape legend: b rows, P prompt tokens, N new tokens, V vocabulary.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from pocketlm.distill.config import LossConfig
from pocketlm.eval.generate import GenerationSettings, _RowSampler


def _unit_hash(*parts: object) -> int:
    """A 63-bit integer from `parts` (sha256): the same on every process, platform and Python run."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def is_on_policy(lmbda: float, seed: int, micro_step: int) -> bool:
    """Whether micro-batch `micro_step` samples its continuations from the student: u < lmbda, with u uniform in
    [0, 1) drawn from (seed, micro_step) alone."""
    return _unit_hash("gkd-lmbda", seed, micro_step) / 2**63 < lmbda


def row_seeds(seed: int, micro_step: int, block_ids: Sequence[int]) -> list[int]:
    """One sampling seed per row, from (seed, micro_step, block id): a row's continuation is the same whatever the
    batch size, the number of processes or the rank it lands on."""
    return [_unit_hash("gkd-row", seed, micro_step, int(i)) for i in block_ids]


@torch.no_grad()
def sample_continuations(
    model: torch.nn.Module, prompts: Tensor, *, max_new_tokens: int, temperature: float, top_p: float,
    seeds: Sequence[int],
) -> Tensor:
    """``prompts`` [b, P] followed by ``max_new_tokens`` tokens the model samples: [b, P + N].

    KV-cached decoding, one token at a time, in eval mode (the train/eval mode is restored after), without a
    gradient (no_grad, not inference_mode: the ids feed a later forward with a gradient). Always N tokens, EOS
    included (``model.generate`` would stop a row at EOS, and it falls back to the model's EOS when asked for
    none). Each row samples from softmax(logits / temperature), nucleus-filtered at ``top_p``, by the Gumbel-max
    trick with its own generator (eval/generate.py's sampler, one seed per row).
    """
    if len(seeds) != prompts.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {prompts.shape[0]} rows")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                  top_p=top_p)
    sampler = _RowSampler(seeds, settings, prompts.device)
    cache = DynamicCache()
    was_training = model.training
    model.eval()
    try:
        seq, step_ids = prompts, prompts  # [b, P], then [b, 1] per decoding step
        for _ in range(max_new_tokens):
            logits = model(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # [b, V]
            step_ids = sampler(seq, logits).argmax(dim=-1, keepdim=True)  # [b, 1]
            seq = torch.cat([seq, step_ids], dim=1)
    finally:
        model.train(was_training)
    return seq


def continuation_mask(rows: int, seq_len: int, prompt_tokens: int, device: torch.device | str = "cpu") -> Tensor:
    """[rows, seq_len - 1] bool: True where a shifted position predicts a continuation token (t >= P - 1); the
    ``mask`` of ``kd_loss`` for sequences of ``seq_len`` tokens whose first ``prompt_tokens`` are the prompt."""
    return (torch.arange(seq_len - 1, device=device) >= prompt_tokens - 1).expand(rows, -1)


@dataclass
class GKDBatch:
    """One micro-batch of mode on_policy: what the student and the teacher score, and where the loss looks."""

    ids: Tensor  # [b, P + N]: each row's prompt and its continuation
    mask: Tensor  # [b, P + N - 1]: the continuation's positions after the causal shift
    sampled: bool  # whether the student wrote the continuations (else they are the data's)


def gkd_batch(student: torch.nn.Module, blocks: Tensor, block_ids: Sequence[int], loss_cfg: LossConfig, *,
              seed: int, micro_step: int) -> GKDBatch:
    """The prompts of ``blocks`` [b, L] with the continuations of micro-batch ``micro_step``: sampled by
    ``student`` when ``is_on_policy`` says so, else the blocks' own next N tokens."""
    p, n = loss_cfg.on_policy_lengths(blocks.shape[1])
    sampled = is_on_policy(loss_cfg.lmbda, seed, micro_step)
    if sampled:
        ids = sample_continuations(student, blocks[:, :p], max_new_tokens=n, temperature=loss_cfg.gen_temperature,
                                   top_p=loss_cfg.gen_top_p, seeds=row_seeds(seed, micro_step, block_ids))
    else:
        ids = blocks[:, : p + n]
    return GKDBatch(ids, continuation_mask(ids.shape[0], p + n, p, ids.device), sampled)
