"""Batched generation for every metric that reads what a model writes (ROUGE, toxicity, BOLD, VQA).

One contract for any Hugging Face causal LM: prompts are left-padded into batches (sorted by length, so little
padding), decoded with the KV cache through ``model.generate``, and returned in the caller's order, continuation
text only.

Sampling is reproducible *per item*: each (prompt, sample index) row draws its randomness from its own generator,
seeded from the run seed, the prompt text and the sample index, and samples by the Gumbel-max trick
(``argmax(logits / T + Gumbel noise)`` is a draw from ``softmax(logits / T)``). So sample j of a prompt is the same
whatever batch, batch size or process it lands in — a sharded audit (each rank writes an interleaved share of the
rows, all ranks get all texts back) equals a single-process one, and a teacher and its student see the same noise. Greedy decoding is the same with the noise left out.

Shape legend: b = rows in a batch, v = vocabulary.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from pocketlm.core import distributed as dist


@dataclass(frozen=True)
class GenerationSettings:
    """How continuations are produced; stored with every result that reads generations."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    num_samples: int = 1  # continuations per prompt
    seed: int = 0
    batch_size: int = 16  # rows (prompt × sample) per forward
    stop: tuple[str, ...] = ()  # cut each continuation at the first of these strings
    add_special_tokens: bool = False  # prepend the tokenizer's BOS etc. to prompts, as its own __call__ would

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {self.num_samples}, {self.batch_size}")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs do_sample=True: greedy decoding writes one continuation")

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass
class GenerationOutput:
    texts: list[list[str]]  # [prompt][sample] continuation text
    new_tokens: int  # tokens written in total (excluding padding after EOS)


def row_seed(seed: int, prompt: str, sample: int) -> int:
    """The seed of one (prompt, sample) row: independent of batching and of which process scores it."""
    digest = hashlib.sha256(f"{seed}\x00{sample}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _RowSampler(LogitsProcessor):
    """Temperature, top-k and top-p, then per-row Gumbel noise, so that greedy selection samples."""

    def __init__(self, seeds: Sequence[int], settings: GenerationSettings, device: torch.device):
        self.settings = settings
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(s)
            self.generators.append(g)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        st = self.settings
        scores = scores.float() / st.temperature  # [b, v]
        if st.top_k and st.top_k < scores.shape[-1]:
            kth = torch.topk(scores, st.top_k, dim=-1).values[:, -1:]  # [b, 1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if st.top_p < 1.0:  # nucleus: keep the smallest set whose probability reaches top_p (the top token always)
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop_sorted = (cum - sorted_scores.softmax(-1)) >= st.top_p  # mass before this token already enough
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        uniform = torch.stack([
            torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators
        ])  # [b, v]
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no pad, EOS or BOS token to pad a batch with")


def _cut(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _batches(widths: list[int], settings: GenerationSettings, model, max_memory: int | None) -> list[tuple[int, int]]:
    """[start, stop) of each batch over rows sorted longest first: ``batch_size`` rows, fewer where the memory
    budget says so (the first row of a batch is its widest)."""
    if max_memory is None:
        return [(i, min(i + settings.batch_size, len(widths))) for i in range(0, len(widths), settings.batch_size)]
    from pocketlm.memory import Footprint, largest_batch

    fp = Footprint.of(model)
    out, start = [], 0
    while start < len(widths):
        width = widths[start]
        fit = largest_batch(lambda b: fp.generation(b, width, settings.max_new_tokens), settings.batch_size, fp,  # noqa: B023 - called in this iteration
                            max_memory, f"generation ({width}-token prompt, {settings.max_new_tokens} new tokens)")
        out.append((start, min(start + fit, len(widths))))
        start = out[-1][1]
    return out


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    *,
    progress: bool = False,
    desc: str = "generating",
    max_memory: int | None = None,
) -> GenerationOutput:
    """Continuations of each prompt (``settings.num_samples`` of them), in the order of ``prompts``.

    ``max_memory`` (bytes): each batch holds at most ``settings.batch_size`` rows and as many as the model's
    weights plus the batch's estimated peak allow (`pocketlm.memory`); a budget too small for the longest prompt
    alone is refused before anything is generated. Batching never changes what is written."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from")
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    encoded = tokenizer(list(prompts), add_special_tokens=settings.add_special_tokens, verbose=False)["input_ids"]
    for i, ids in enumerate(encoded):
        if not ids:  # an empty prompt: condition on BOS/EOS as lm-eval does for an empty context
            encoded[i] = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad]

    rows = [(p, j) for p in range(len(prompts)) for j in range(settings.num_samples)]
    rows.sort(key=lambda r: (-len(encoded[r[0]]), r[0], r[1]))  # longest first: similar lengths share a batch
    all_rows, rows = rows, dist.share(rows)  # under a multi-process launch: this rank's interleaved share
    texts: list[list[str]] = [[""] * settings.num_samples for _ in prompts]
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
        eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, temperature=None, top_p=None, top_k=None,
    )
    new_tokens = 0
    batches = _batches([len(encoded[p]) for p, _ in rows], settings, model, max_memory)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(rows), desc=desc, disable=not progress or not dist.is_main()) as bar:
            for start, stop in batches:
                batch = rows[start:stop]
                width = max(len(encoded[p]) for p, _ in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [b, t] left-padded
                attention_mask = torch.zeros(len(batch), width, dtype=torch.long)  # [b, t]
                for i, (p, _) in enumerate(batch):
                    ids = encoded[p]
                    input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[i, width - len(ids):] = 1
                processors = LogitsProcessorList()
                if settings.do_sample:
                    seeds = [row_seed(settings.seed, prompts[p], j) for p, j in batch]
                    processors.append(_RowSampler(seeds, settings, device))
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    generation_config=config, logits_processor=processors,
                )
                written = out[:, width:].cpu()  # [b, new]
                for i, (p, j) in enumerate(batch):
                    toks = written[i].tolist()
                    if eos is not None and eos in toks:
                        toks = toks[: toks.index(eos)]
                    new_tokens += len(toks) + (1 if eos is not None and len(toks) < written.shape[1] else 0)
                    texts[p][j] = _cut(tokenizer.decode(toks, skip_special_tokens=True), settings.stop)
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if dist.world_size() > 1:  # every rank gets every continuation; token counts are summed
        mine = [texts[p][j] for p, j in rows]
        for (p, j), text in zip(all_rows, dist.gather_shares(mine, len(all_rows))):
            texts[p][j] = text
        new_tokens = int(dist.all_reduce_sum([new_tokens])[0])
    return GenerationOutput(texts=texts, new_tokens=new_tokens)
