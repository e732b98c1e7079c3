"""Log-likelihood of a continuation given a context: the one scoring primitive every metric shares.

The contract is lm-evaluation-harness's `HFLM._loglikelihood_tokens` for causal LMs:

* the model sees ``(context + continuation)[-(max_length + 1):][:-1]`` — context is cut from the left when the
  pair is too long, and the final token is only ever a target, never an input;
* the answer per request is ``(Σ log p(continuation | context), is_greedy)``, where ``is_greedy`` says whether
  every continuation token is the argmax of its position's distribution;
* requests run longest-first (so an out-of-memory error shows on the first batch, not the last) and come back in
  the caller's order.

Batches are right-padded without an attention mask (as lm-eval feeds causal LMs): every real token keeps positions
``0..len-1`` and, attention being causal, never attends to the padding after it. Log-softmax (as ``logit - logsumexp``, a bounded number of rows at a time) runs in fp32
whatever dtype the model computes in; sums accumulate in fp64.

Shape legend: b = requests in a batch, t = padded input length, v = vocabulary, n = continuation tokens in a batch.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from pocketlm import distributed as dist

Request = tuple[list[int], list[int]]
_ROWS_PER_CHUNK = 4096  # continuation tokens upcast to fp32 at once: 4096 x 49k vocab x 4 bytes = 0.8 GB


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int | None) -> list[int]:
    """The tokens the model is fed for one request: lm-eval's left truncation, final token dropped."""
    whole = list(context) + list(continuation)
    if max_length is not None:
        whole = whole[-(max_length + 1):]
    return whole[:-1]


def _check(request: Request, index: int, max_length: int | None) -> None:
    context, continuation = request
    if len(context) == 0:
        raise ValueError(
            f"request {index}: empty context; a causal LM needs at least one token before the continuation "
            "(prefix a BOS/EOS token, as lm-evaluation-harness does for an empty context)"
        )
    if len(continuation) == 0:
        raise ValueError(f"request {index}: empty continuation; there is nothing to score")
    if max_length is not None and len(continuation) > max_length:
        raise ValueError(
            f"request {index}: continuation of {len(continuation)} tokens is longer than max_length={max_length}"
        )


PRECISIONS = ("fp32", "bf16", "auto")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA device that supports bf16, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 where the hardware runs it natively (measured: figures within 0.02 % of fp32), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def _device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _forward_kwargs(module: torch.nn.Module) -> dict[str, bool]:
    """Ask for no KV cache where the module's forward takes `use_cache` (scoring never decodes)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


class _Forward:
    """How a batch becomes log-probabilities: split at the output layer where that is provably the same model.

    Most causal LMs compute ``logits = lm_head(decoder(ids).last_hidden_state)``. Where that holds (checked once,
    numerically, on a short input: a model with logit soft-capping or scaling fails the check and runs whole),
    the decoder runs on the batch and the output layer only on the positions that are scored, a bounded number
    of rows at a time, in fp32 — so the ``[b, t, v]`` logits never exist, and under ``precision="bf16"`` the
    decoder runs in bf16 autocast while the output layer and log-softmax stay fp32 (bf16 logits would round a
    logit of 20 to a step of 0.125, which is most of what bf16 costs in perplexity).
    """

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device):
        self.model, self.device = model, device
        self.bf16 = resolve_precision(precision, device) == "bf16"
        self.decoder, self.head = self._split(model)
        self.kwargs = _forward_kwargs(self.decoder if self.decoder is not None else model)
        self.rows_per_chunk = _ROWS_PER_CHUNK  # lowered by a memory budget (`_memory_fit`)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def session(self):
        """Enter once around many batches: autocast keeps its bf16 copies of the weights for the whole region
        instead of casting every weight again for each batch (it drops them when the outermost region exits)."""
        return self._autocast()

    def _fp32(self):
        return torch.autocast(self.device.type, enabled=False)

    def _split(self, model: torch.nn.Module):
        get_decoder = getattr(model, "get_decoder", None)
        get_head = getattr(model, "get_output_embeddings", None)
        if get_decoder is None or get_head is None:
            return None, None
        try:
            decoder, head = get_decoder(), get_head()
        except (AttributeError, NotImplementedError, TypeError):
            return None, None
        if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Linear) or decoder is model:
            return None, None
        probe = torch.arange(1, 9, device=self.device).remainder(head.out_features)[None]  # [1, 8]
        try:
            whole = model(input_ids=probe, **_forward_kwargs(model)).logits.float()
            hidden = decoder(input_ids=probe, **_forward_kwargs(decoder)).last_hidden_state
            split = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                               None if head.bias is None else head.bias.float())
        except Exception:  # noqa: BLE001 - any model that cannot run split simply runs whole
            return None, None
        tol = 1e-4 if whole.abs().max() < 1e4 else 1e-3
        if whole.shape != split.shape or not torch.allclose(whole, split, rtol=tol, atol=tol):
            return None, None
        return decoder, head

    def log_probs(
        self, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(target), argmax != target) at each (row, position), fp64 / bool, [n] each."""
        token_lp = torch.empty(len(targets), dtype=torch.float64, device=self.device)  # [n]
        misses = torch.empty(len(targets), dtype=torch.bool, device=self.device)  # [n]
        if self.decoder is not None:
            with self._autocast():
                hidden = self.decoder(input_ids=input_ids, **self.kwargs).last_hidden_state  # [b, t, d]
            picked = hidden[rows, positions]  # [n, d]: only the positions that are scored
            weight = self.head.weight if self.head.weight.dtype == torch.float32 else self.head.weight.float()
            bias = None if self.head.bias is None else self.head.bias.float()
            source = lambda sl: torch.nn.functional.linear(picked[sl].float(), weight, bias)  # noqa: E731
        else:
            with self._autocast():
                logits = self.model(input_ids=input_ids, **self.kwargs).logits  # [b, t, v]
            source = lambda sl: logits[rows[sl], positions[sl]].float()  # noqa: E731
        with self._fp32():  # the output layer and log-softmax in fp32, also inside a caller's bf16 session
            for lo in range(0, len(targets), self.rows_per_chunk):  # bounds the fp32 copy to [chunk, v]
                sl = slice(lo, lo + self.rows_per_chunk)
                scores = source(sl)  # [c, v] fp32
                # log_softmax(x)[y] = x[y] - logsumexp(x), without materialising the full log-softmax
                token_lp[sl] = (scores.gather(-1, targets[sl, None]).squeeze(-1) - scores.logsumexp(dim=-1)).double()
                misses[sl] = scores.argmax(dim=-1) != targets[sl]
        return token_lp, misses


def _score_batch(forward: _Forward, batch: list[Request], max_length: int | None) -> list[tuple[float, bool]]:
    device = forward.device
    inputs = [model_input(ctx, cont, max_length) for ctx, cont in batch]
    in_lens = [len(x) for x in inputs]
    cont_lens = [len(cont) for _, cont in batch]
    width = max(in_lens)

    # Right padding and no attention mask, as lm-eval feeds causal LMs: a real token attends only to earlier
    # positions, so it never sees the padding after it and keeps positions 0..len-1; padded positions are never read.
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # [b, t]
    for i, ids in enumerate(inputs):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)

    # The logit at input position p predicts token p + 1, so a continuation of c tokens is read from the last c
    # real positions of its row: [in_len - c, in_len).
    rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(cont_lens)).to(device)  # [n]
    positions = torch.cat([torch.arange(n_in - c, n_in) for n_in, c in zip(in_lens, cont_lens)]).to(device)  # [n]
    targets = torch.tensor([tok for _, cont in batch for tok in cont], dtype=torch.long, device=device)  # [n]
    token_lp, misses = forward.log_probs(input_ids.to(device), rows, positions, targets)

    sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, token_lp)
    n_miss = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, misses.double())
    return [(float(s), bool(m == 0)) for s, m in zip(sums.tolist(), n_miss.tolist())]


def _batches(
    order: list[int], reqs: list[Request], batch_size: int, max_length: int | None, max_batch_tokens: int | None,
    memory_fits: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Cut the longest-first order into batches of at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens
    (and, given ``memory_fits(rows, width)``, within a memory budget).

    The first request of a batch is its longest, so the padded size is ``rows × len(first input)``.
    """
    batches: list[list[int]] = []
    width = 0  # input length of the current batch's first (longest) request
    for i in order:
        if batches:
            rows = len(batches[-1])
            fits = rows < batch_size and (max_batch_tokens is None or (rows + 1) * width <= max_batch_tokens)
            if fits and (memory_fits is None or memory_fits(rows + 1, width)):
                batches[-1].append(i)
                continue
        batches.append([i])
        width = len(model_input(*reqs[i], max_length))
        if memory_fits is not None:
            memory_fits(1, width)  # refuses (MemoryBudgetError) a request that does not fit alone
    return batches


def _memory_fit(forward: _Forward, model: torch.nn.Module, budget: int) -> Callable[[int, int], bool]:
    """``fits(rows, width)`` under a budget for weights + one batch (`pocketlm.memory`); sets the fp32 chunk so
    that it takes at most a quarter of the room the weights leave. One row that does not fit is refused."""
    from pocketlm.memory import Footprint, largest_batch

    fp = Footprint.of(model)
    cast = fp.weights // 2 if forward.bf16 else 0  # autocast's bf16 copies of the weights, kept for the session
    room = budget - fp.weights - cast
    forward.rows_per_chunk = min(_ROWS_PER_CHUNK, max(1, room // 4 // (8 * fp.vocab)))
    split = forward.decoder is not None

    def need(rows: int, width: int) -> int:
        return cast + fp.scoring(rows, width, chunk_rows=forward.rows_per_chunk, split=split)

    def fits(rows: int, width: int) -> bool:
        if rows == 1:
            largest_batch(lambda b: need(b, width), 1, fp, budget, f"scoring a {width}-token request")
            return True
        return need(rows, width) <= budget - fp.weights

    return fits


def score_continuations(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "scoring",
    distributed: bool = True,
    max_memory: int | None = None,
) -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): (summed log-probability of the continuation, is_greedy).

    Works for any Hugging Face causal LM (anything whose ``model(input_ids=..., attention_mask=...)`` returns
    ``.logits``). ``max_length`` caps the model's input length as lm-evaluation-harness does (context truncated
    from the left); None feeds whole requests. ``max_batch_tokens`` bounds a batch's padded size (rows × width)
    as well, so long windows go a few at a time and short ones many at a time within the same memory; a single
    request longer than the budget still runs, alone. ``precision="bf16"`` runs the model body in bf16 autocast and
    keeps the output layer and log-softmax in fp32 (see :class:`_Forward`). The model is put in eval mode for the
    call and restored after. ``max_memory`` (bytes) bounds the weights plus one batch's estimated peak
    (`pocketlm.memory`): batches and fp32 chunks shrink to fit, and a request that does not fit alone is refused
    before any is scored. Under a multi-process launch (and ``distributed``) each rank scores an interleaved
    share of the longest-first order and every rank gets all answers back (:mod:`pocketlm.distributed`); every
    rank must then make the same call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
    reqs: list[Request] = [(list(ctx), list(cont)) for ctx, cont in requests]
    for i, req in enumerate(reqs):
        _check(req, i, max_length)

    # lm-eval's order: longest first, ties broken by the tokens themselves (deterministic batches).
    order = sorted(range(len(reqs)), key=lambda i: (-len(reqs[i][0]) - len(reqs[i][1]), reqs[i][0] + reqs[i][1]))
    mine = dist.share(order) if distributed else order
    answers: dict[int, tuple[float, bool]] = {}
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(mine), desc=desc, disable=not progress or not dist.is_main())
        # no_grad, not inference_mode: autocast keeps its weight casts only outside inference mode
        with torch.no_grad(), bar:
            forward = _Forward(model, precision, _device(model))
            fits = _memory_fit(forward, model, max_memory) if max_memory is not None else None
            with forward.session():
                for idx in _batches(mine, reqs, batch_size, max_length, max_batch_tokens, fits):
                    for i, answer in zip(idx, _score_batch(forward, [reqs[i] for i in idx], max_length)):
                        answers[i] = answer
                    bar.update(len(idx))
    finally:
        model.train(was_training)
    if not distributed:
        return [answers[i] for i in range(len(reqs))]
    gathered = dist.gather_shares([answers[i] for i in mine], len(order))  # aligned with `order`
    results: list[tuple[float, bool]] = [None] * len(reqs)  # type: ignore[list-item]
    for i, answer in zip(order, gathered):
        results[i] = answer
    return results
