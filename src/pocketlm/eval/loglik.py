"""Log-likelihood of a continuation given a context: the one scoring primitive every metric shares.

The contract is lm-evaluation-harness's `HFLM._loglikelihood_tokens` for causal LMs:

* the model sees ``(context + continuation)[-(max_length + 1):][:-1]`` — context is cut from the left when the
  pair is too long, and the final token is only ever a target, never an input;
* the answer per request is ``(Σ log p(continuation | context), is_greedy)``, where ``is_greedy`` says whether
  every continuation token is the argmax of its position's distribution;
* requests run longest-first (so an out-of-memory error shows on the first batch, not the last) and come back in
  the caller's order.

Batches are right-padded without an attention mask (as lm-eval feeds causal LMs): every real token keeps positions
``0..len-1`` and, attention being causal, never attends to the padding after it. Requests that begin with the same
tokens (the answers of one multiple-choice item, the two sentences of a CrowS pair) are packed into one row, their
shared prefix run once (`packing`), where a probe shows that this model then gives the same answers; an output
position read by several requests is computed once. Log-softmax (as ``logit - logsumexp``, a bounded number of rows at a time) runs in fp32
whatever dtype the model computes in; sums accumulate in fp64. Under bf16, the predictions made at a sequence's first
`EXACT_POSITIONS` positions are computed in fp32 (`_exact_early`).

Shape legend: b = requests in a batch, t = padded input length, v = vocabulary, n = continuation tokens in a batch.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from pocketlm.core import distributed as dist
from pocketlm.eval import packing

Request = tuple[list[int], list[int]]
_UNPROBED = object()
_ROWS_PER_CHUNK = 4096  # continuation tokens upcast to fp32 at once: 4096 x 49k vocab x 4 bytes = 0.8 GB
# Under bf16, the predictions read at the first positions of a sequence are computed in fp32, from a forward of just
# the tokens up to them (all that a causal model's output there depends on). Measured (benchmarks/bf16_error.py,
# SmolLM2-135M-Instruct, CrowS-Pairs): positions 0 and 1 carry the attention sinks' massive activations (max |h| at
# layer 15: 24,891 and 1,675, against ~100 elsewhere), and bf16 rounds them so coarsely that the prediction made at
# position 1 was off by up to 9.6 nats (q99 1.3) while every later position stayed under 0.7; a whole-sentence
# suite reads position 1 in every request. Cost: a forward of at most 2 tokens per distinct sequence start.
EXACT_POSITIONS = 2


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


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model computes on (its `.device`, else its first parameter's)."""
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
        self._mask_kind: object = _UNPROBED
        self._probe_prefix = 0  # the shared prefix of the probe that set `_mask_kind`
        # a 4-D mask replaces the model's own in every layer, so the tree mask carries each layer type's sliding
        # window itself (`packing.layer_windows`); layer types it cannot express are never packed
        config = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config  # a VLM's LM
        try:
            self.window = packing.layer_windows(config)
        except ValueError:
            self.window, self._mask_kind = None, None
        # the probe reaches past the config's window whichever layers the mask gives it to, so a wrong layout shows
        self.probe_window = packing.smallest_window(getattr(config, "sliding_window", None))
        self.rows_per_chunk = _ROWS_PER_CHUNK  # lowered by a memory budget (`_memory_fit`)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def session(self):
        """Enter once around many batches: autocast keeps its bf16 copies of the weights for the whole region
        instead of casting every weight again for each batch (it drops them when the outermost region exits)."""
        return self._autocast()

    def _fp32(self):
        return torch.autocast(self.device.type, enabled=False)

    @contextlib.contextmanager
    def exact(self) -> Iterator[None]:
        """The same forward wholly in fp32 for the duration (also inside a bf16 session)."""
        bf16, self.bf16 = self.bf16, False
        try:
            yield
        finally:
            self.bf16 = bf16

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

    def mask_kind(self, span: int = 0) -> str | None:
        """How this model takes a prefix-tree mask ("bool" for SDPA-style attention, "additive" for eager), or None
        where packed rows do not give the same log-probabilities as separate rows (checked numerically, once).

        ``span``: the longest request to be packed. Where it is longer than a sliding window, the probe's requests
        are too, so a mask that puts the window on the wrong layers (or on none) is caught; windows no request
        reaches cannot change an answer, and are not probed (a probe past Gemma-2's 4,096 would cost more than a
        short suite). A probe that fails is final."""
        window = self.probe_window
        reach = window + 1 if window is not None and span > window else 0  # the probe's shared prefix past it
        if self._mask_kind is _UNPROBED or (self._mask_kind is not None and reach > self._probe_prefix):
            self._mask_kind, self._probe_prefix = None, max(reach, 6)
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            kind = "additive" if impl == "eager" else "bool"
            try:
                if self._packing_matches(kind, self._probe_prefix):
                    self._mask_kind = kind
            except Exception:  # noqa: BLE001 - a model that cannot take position ids or a 4-D mask runs unpacked
                pass
        return self._mask_kind

    def _packing_matches(self, kind: str, shared: int) -> bool:
        vocab = self.head.out_features if self.head is not None else int(self.model.config.vocab_size)
        base = torch.arange(3, 3 + shared).remainder(vocab).tolist()
        # share `shared` tokens, then part: the second's own tokens sit after the first's in the row, at shifted
        # positions; every position of each request's own part is read
        inputs = [base + [(start + j) % vocab for j in range(k)] for start, k in ((20, 3), (30, 5))]
        targets = [[(7 + k + j) % vocab for j in range(k)] for k in (3, 5)]
        rows = [packing.plain_row(i, x, len(t), t) for i, (x, t) in enumerate(zip(inputs, targets))]
        packed = packing.pack_requests(inputs, targets, max_row_tokens=shared + 8)
        if len(packed) != 1:
            return False
        # in fp32 whatever the precision: whether packing is the same model is a property of its masking, and
        # bf16's rounding (~1e-2) would hide it behind noise and refuse packing to every bf16 run
        with self.exact():
            alone = [self.scored(*packing.batch_tensors([r], self.device, None))[0] for r in rows]
            together = self.scored(*packing.batch_tensors(packed, self.device, kind, window=self.window))[0]
        return torch.allclose(torch.cat(alone), together, rtol=1e-4, atol=1e-4)

    def scored(self, input_ids, position_ids, mask, reads) -> tuple[torch.Tensor, torch.Tensor]:
        """log p and misses [n] of a batch from `packing.batch_tensors` (reads: request, row, position, target)."""
        _, rows, positions, targets = reads
        extra = {} if mask is None else {"position_ids": position_ids, "attention_mask": mask}
        return self.log_probs(input_ids, rows, positions, targets, **extra)

    def log_probs(
        self, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
        **extra: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(target), argmax != target) at each (row, position), fp64 / bool, [n] each. ``extra``: position
        ids and a 4-D attention mask for packed rows."""
        # A position read by several requests (packed rows' shared prefix) gets its output row computed once.
        key = rows * input_ids.shape[1] + positions  # [n] flat index of each read
        uniq, inverse = torch.unique(key, return_inverse=True)  # [u], [n]
        if self.decoder is not None:
            with self._autocast():
                hidden = self.decoder(input_ids=input_ids, **self.kwargs, **extra).last_hidden_state  # [b, t, d]
            flat = hidden.reshape(-1, hidden.shape[-1])  # [b·t, d]
            weight = self.head.weight if self.head.weight.dtype == torch.float32 else self.head.weight.float()
            bias = None if self.head.bias is None else self.head.bias.float()
            with self._fp32():  # the target's logit alone: one dot product per read, [n]
                target_logit = (flat[key].float() * weight[targets]).sum(-1)
                if bias is not None:
                    target_logit += bias[targets]
            source = lambda sl: torch.nn.functional.linear(flat[uniq[sl]].float(), weight, bias)  # noqa: E731
        else:
            with self._autocast():
                logits = self.model(input_ids=input_ids, **self.kwargs, **extra).logits  # [b, t, v]
            flat = logits.reshape(-1, logits.shape[-1])  # [b·t, v]
            target_logit = flat[key, targets].float()
            source = lambda sl: flat[uniq[sl]].float()  # noqa: E731 - a fresh copy: safe to modify in place
        lse = torch.empty(len(uniq), dtype=torch.float32, device=self.device)  # [u]
        best = torch.empty(len(uniq), dtype=torch.long, device=self.device)  # [u]
        with self._fp32():  # the output layer and log-softmax in fp32, also inside a caller's bf16 session
            for lo in range(0, len(uniq), self.rows_per_chunk):  # bounds the fp32 copy to [chunk, v]
                sl = slice(lo, lo + self.rows_per_chunk)
                scores = source(sl)  # [c, v] fp32
                # one pass for max and argmax, then logsumexp = max + log Σ exp(x - max), in place
                top, best[sl] = scores.max(dim=-1)
                lse[sl] = top + scores.sub_(top[:, None]).exp_().sum(dim=-1).log()
        # log_softmax(x)[y] = x[y] - logsumexp(x), without materialising the full log-softmax
        token_lp = target_logit.double() - lse[inverse].double()  # [n]
        misses = best[inverse] != targets  # [n]
        return token_lp, misses


def _exact_early(forward: _Forward, inputs: list[list[int]], targets: list[list[int]], which: Sequence[int],
                 rows_per_forward: int = 256) -> dict[tuple[int, int], tuple[float, bool]]:
    """fp32 (log p, miss) of each continuation token of the requests ``which`` that is predicted at a position
    below `EXACT_POSITIONS`, by (request, position): one fp32 forward of each distinct start ``input[:EXACT_POSITIONS]``
    (plain rows: the output at position q depends on tokens 0..q alone)."""
    starts: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}  # start -> [(request, position, target)]
    for i in which:
        n, width = len(targets[i]), len(inputs[i])
        for q in range(width - n, min(width, EXACT_POSITIONS)):
            starts.setdefault(tuple(inputs[i][:EXACT_POSITIONS]), []).append((i, q, targets[i][q - (width - n)]))
    if not starts:
        return {}
    keys = list(starts)
    out: dict[tuple[int, int], tuple[float, bool]] = {}
    with forward.exact():  # the same forward, autocast off (also inside a bf16 session)
        for lo in range(0, len(keys), rows_per_forward):
            rows, meta = [], []
            for key in keys[lo:lo + rows_per_forward]:
                rows.append(packing.Row(list(key), list(range(len(key))), None,
                                        [(len(meta) + k, [q], [t]) for k, (_, q, t) in enumerate(starts[key])]))
                meta += [(i, q) for i, q, _ in starts[key]]
            ids, _, _, reads = packing.batch_tensors(rows, forward.device, None)
            token_lp, misses = forward.log_probs(ids, *reads[1:])  # in the order of `meta`
            for (i, q), lp, miss in zip(meta, token_lp.tolist(), misses.tolist()):
                out[(i, q)] = (lp, miss)
    return out


def _score_batch(forward: _Forward, rows: list[packing.Row],
                 exact: dict[tuple[int, int], tuple[float, bool]] | None = None) -> dict[int, tuple[float, bool]]:
    """(Σ log p, is_greedy) of every request in a batch of rows, by request index.

    A plain row is the request's input right-padded without an attention mask, as lm-eval feeds causal LMs: a
    real token attends only to earlier positions, so it never sees the padding after it and keeps positions
    0..len-1; padded positions are never read. The logit at input position p predicts token p + 1, so a
    continuation of c tokens is read from the last c positions of its input. Packed rows carry position ids and
    the prefix-tree mask (`packing`). ``exact``: fp32 answers by (request, position id) that replace those read
    at the same place (`_exact_early`).
    """
    kind = forward.mask_kind() if any(r.segments is not None for r in rows) else None  # packed: probed already
    tensors = packing.batch_tensors(rows, forward.device, kind, window=forward.window)
    token_lp, misses = forward.scored(*tensors)
    req = tensors[3][0]  # [n] request index of each scored token
    if exact:
        row_ix, where = tensors[3][1], tensors[3][2]
        pos = where if tensors[1] is None else tensors[1].to(forward.device)[row_ix, where]  # [n] position ids
        early = torch.nonzero(pos < EXACT_POSITIONS).flatten().tolist()
        for k, i, q in zip(early, req[early].tolist(), pos[early].tolist()):
            token_lp[k], misses[k] = exact[(i, q)]
    ids, local = torch.unique(req, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=torch.float64, device=forward.device).index_add_(0, local, token_lp)
    n_miss = torch.zeros(len(ids), dtype=torch.float64, device=forward.device).index_add_(0, local, misses.double())
    return {int(i): (float(v), bool(m == 0)) for i, v, m in zip(ids.tolist(), sums.tolist(), n_miss.tolist())}


def _batches(
    order: list[int], rows: list[packing.Row], batch_size: int, max_batch_tokens: int | None,
    memory_fits: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Cut the longest-first order into batches of at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens
    (and, given ``memory_fits(rows, width)``, within a memory budget).

    The first row of a batch is its longest, so the padded size is ``rows × len(first row)``.
    """
    batches: list[list[int]] = []
    width = 0  # length of the current batch's first (longest) row
    for i in order:
        if batches:
            n = len(batches[-1])
            fits = n < batch_size and (max_batch_tokens is None or (n + 1) * width <= max_batch_tokens)
            if fits and (memory_fits is None or memory_fits(n + 1, width)):
                batches[-1].append(i)
                continue
        batches.append([i])
        width = len(rows[i])
        if memory_fits is not None:
            memory_fits(1, width)  # refuses (MemoryBudgetError) a row that does not fit alone
    return batches


def _memory_fit(forward: _Forward, model: torch.nn.Module, budget: int, packed: bool) -> Callable[[int, int], bool]:
    """``fits(rows, width)`` under a budget for weights + one batch (`pocketlm.memory`); sets the fp32 chunk so
    that it takes at most a quarter of the room the weights leave. One row that does not fit is refused. A packed
    batch also holds its [b, 1, t, t] mask (4 bytes an entry at most)."""
    from pocketlm.memory import Footprint, largest_batch

    fp = Footprint.of(model)
    cast = fp.weights // 2 if forward.bf16 else 0  # autocast's bf16 copies of the weights, kept for the session
    room = budget - fp.weights - cast
    forward.rows_per_chunk = min(_ROWS_PER_CHUNK, max(1, room // 4 // (8 * fp.vocab)))
    split = forward.decoder is not None
    masked = 4 * (len(forward.window) if isinstance(forward.window, dict) else 1) if packed else 0  # per mask

    def need(rows: int, width: int) -> int:
        return cast + fp.scoring(rows, width, chunk_rows=forward.rows_per_chunk, split=split) + masked * rows * width**2

    def fits(rows: int, width: int) -> bool:
        if rows == 1:
            largest_batch(lambda b: need(b, width), 1, fp, budget, f"scoring a {width}-token request")
            return True
        return need(rows, width) <= budget - fp.weights

    return fits


def _rows(reqs: list[Request], max_length: int | None, forward: _Forward, pack: bool) -> list[packing.Row]:
    """One plain row per request, or prefix-packed rows where the model provably allows it and it saves ≥ 10 %
    of the tokens."""
    inputs = [model_input(ctx, cont, max_length) for ctx, cont in reqs]
    targets = [cont for _, cont in reqs]
    longest = max((len(x) for x in inputs), default=0)
    if pack and len(reqs) > 1 and forward.mask_kind(longest) is not None:
        rows = packing.pack_requests(inputs, targets, max_row_tokens=max(longest, 1024))
        if sum(len(r) for r in rows) <= 0.9 * sum(len(x) for x in inputs):
            return rows
    return [packing.plain_row(i, x, len(t), t) for i, (x, t) in enumerate(zip(inputs, targets))]


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
    pack: bool = True,
) -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): (summed log-probability of the continuation, is_greedy).

    Works for any Hugging Face causal LM (anything whose ``model(input_ids=..., attention_mask=...)`` returns
    ``.logits``). ``max_length`` caps the model's input length as lm-evaluation-harness does (context truncated
    from the left); None feeds whole requests. ``max_batch_tokens`` bounds a batch's padded size (rows × width)
    as well, so long windows go a few at a time and short ones many at a time within the same memory; a single
    request longer than the budget still runs, alone. ``precision="bf16"`` runs the model body in bf16 autocast and
    keeps the output layer and log-softmax in fp32 (see :class:`_Forward`), and the predictions made at each
    sequence's first `EXACT_POSITIONS` positions in fp32. The model is put in eval mode for the
    call and restored after. ``max_memory`` (bytes) bounds the weights plus one batch's estimated peak
    (`pocketlm.memory`): batches and fp32 chunks shrink to fit, and a request that does not fit alone is refused
    before any is scored. Under a multi-process launch (and ``distributed``) each rank scores an interleaved
    share of the longest-first order and every rank gets all answers back (:mod:`pocketlm.core.distributed`); every
    rank must then make the same call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
    reqs: list[Request] = [(list(ctx), list(cont)) for ctx, cont in requests]
    for i, req in enumerate(reqs):
        _check(req, i, max_length)

    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: autocast keeps its weight casts only outside inference mode
        with torch.no_grad():
            forward = _Forward(model, precision, model_device(model))
            rows = _rows(reqs, max_length, forward, pack)
            packed = any(r.segments is not None for r in rows)
            fits = _memory_fit(forward, model, max_memory, packed) if max_memory is not None else None
            # lm-eval's order: longest first, ties broken by the tokens themselves (deterministic batches)
            order = sorted(range(len(rows)), key=lambda j: (-len(rows[j]), rows[j].tokens))
            mine = dist.share(order) if distributed else order
            per_row: dict[int, dict[int, tuple[float, bool]]] = {}
            bar = tqdm(total=sum(len(rows[j].reads) for j in mine), desc=desc,
                       disable=not progress or not dist.is_main())
            with bar, forward.session():
                exact = None if not forward.bf16 else _exact_early(  # the first positions in fp32
                    forward, [model_input(c, t, max_length) for c, t in reqs], [t for _, t in reqs],
                    [r[0] for j in mine for r in rows[j].reads])
                for idx in _batches(mine, rows, batch_size, max_batch_tokens, fits):
                    answers = _score_batch(forward, [rows[j] for j in idx], exact)
                    for j in idx:
                        per_row[j] = {r[0]: answers[r[0]] for r in rows[j].reads}
                    bar.update(sum(len(rows[j].reads) for j in idx))
    finally:
        model.train(was_training)
    local = [per_row[j] for j in mine]
    gathered = dist.gather_shares(local, len(order)) if distributed else local  # aligned with `mine`/`order`
    results: dict[int, tuple[float, bool]] = {}
    for part in gathered:
        results.update(part)
    return [results[i] for i in range(len(reqs))]
