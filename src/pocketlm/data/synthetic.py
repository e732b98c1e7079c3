"""The data-free default: the teacher writes its own corpus (sequence-level distillation, Kim & Rush 2016).

A built-in list of varied prompts (task styles × topics) is answered by the teacher with seeded, batched sampling
through `generate()` (KV cache, left padding). Each document is the whole exchange rendered with the teacher's
chat template when it has one, so the student learns the format the teacher is used in.
"""
from __future__ import annotations

import itertools
import random
from typing import Sequence

import torch
from tqdm.auto import tqdm

TASKS = [
    "Explain {t} to a curious ten-year-old.",
    "Write a short story that involves {t}.",
    "Give three practical tips about {t}.",
    "What are the main advantages and disadvantages of {t}?",
    "Describe the history of {t} in a few sentences.",
    "Write a short poem about {t}.",
    "Summarize what an expert would want a beginner to know about {t}.",
    "Answer as a helpful assistant: what is a common misconception about {t}?",
    "Write a friendly email inviting a colleague to a talk about {t}.",
    "List the steps someone should follow to get started with {t}.",
]
TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "black holes", "the human heart", "vaccines",
    "climate change", "honeybees", "the Roman Empire", "the printing press", "electric cars", "solar panels",
    "machine learning", "computer passwords", "the internet", "prime numbers", "fractions", "probability",
    "saving money", "learning a new language", "healthy sleep", "running a marathon", "growing tomatoes",
    "baking bread", "making coffee", "chess", "the piano", "jazz music", "museums", "public libraries",
    "recycling", "rain forests", "the moon landing", "earthquakes", "bridges", "trains", "sailing",
    "friendship", "job interviews", "time management", "writing a resume", "first aid", "dogs as pets",
    "cats", "birds migrating", "the ocean", "coral reefs", "deserts", "mountains", "city parks",
]


def builtin_prompts(seed: int = 0) -> list[str]:
    """Every task × topic prompt, in a seeded order (the first n make a varied sample)."""
    prompts = [task.format(t=topic) for task, topic in itertools.product(TASKS, TOPICS)]
    random.Random(seed).shuffle(prompts)
    return prompts


def _render(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


@torch.inference_mode()
def teacher_corpus(
    model,
    tokenizer,
    *,
    num_documents: int = 256,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 160,
    temperature: float = 0.8,
    top_p: float = 0.95,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Let the teacher write `num_documents` documents (prompt + sampled answer), seeded and batched."""
    pool = list(prompts) if prompts is not None else builtin_prompts(seed)
    if not pool:
        raise ValueError("no prompts to generate from")
    chosen = [pool[i % len(pool)] for i in range(num_documents)]
    rendered = [_render(tokenizer, p) for p in chosen]
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    eos = tokenizer.eos_token_id
    docs: list[str] = []
    bar = tqdm(total=num_documents, desc="teacher writes corpus", unit="doc", disable=not progress)
    try:
        for start in range(0, len(rendered), batch_size):
            batch = rendered[start : start + batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            torch.manual_seed(seed + start)  # each batch seeded on its own: resumable and order-independent
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                eos_token_id=eos,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            for text_in, ids in zip(batch, new):
                ids = ids.tolist()
                if eos in ids:
                    ids = ids[: ids.index(eos) + 1]  # keep the end-of-turn token: the student learns to stop
                docs.append(text_in + tokenizer.decode(ids, skip_special_tokens=False))
            bar.update(len(batch))
    finally:
        tokenizer.padding_side = pad_side
        bar.close()
    return docs
