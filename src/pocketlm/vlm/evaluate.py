"""Evaluating a vision-language student: caption ROUGE and VQA exact match, against the LM without the image.

Captions are scored by `pocketlm.eval.rouge` (Google's ``rouge-score``; several references → the best per type).
VQA is exact match after light normalisation (lower case, punctuation and articles dropped, spaces collapsed, as
the VQA v2 evaluation normalises answers), per question type and over all questions.

The **blind baseline** answers the same prompts with the image marker removed, through the LM alone
(`pocketlm.eval.generate`): by default the VLM's own LM, or a separate text LM (e.g. the LM before the VLM stages,
``text_lm/`` of a training run). The gain from seeing the image is ``delta_*`` = model − blind, with a paired
bootstrap interval over the same items.
"""
from __future__ import annotations

import re
import string
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pocketlm.data.scenes import CAPTION_PROMPT, SceneSpec, VLData, VLItem, load_caption_folder, scenes_data
from pocketlm.eval.generate import GenerationSettings, generate
from pocketlm.eval.rouge import ROUGE_TYPES, rouge_metrics, score_items
from pocketlm.models.images import load_image
from pocketlm.models.vision import VisionLanguageModel
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.models.load import model_info
from pocketlm.core.stats import mean_ci, paired_delta_ci
from pocketlm.vlm.config import EvalConfig
from pocketlm.vlm.inspect import attention_over_patches, draw_patch_attention
from pocketlm.vlm.train import text_only

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalise_answer(text: str) -> str:
    """Lower case, punctuation → space, articles dropped, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answer: str | Sequence[str]) -> bool:
    answers = [answer] if isinstance(answer, str) else list(answer)
    return any(normalise_answer(prediction) == normalise_answer(a) for a in answers)


def subset_items(items: Sequence[VLItem], limit: int | None, seed: int) -> list[VLItem]:
    """A seeded subset of ``limit`` items (all of them, in order, without a limit)."""
    from pocketlm.eval.rouge import subset

    return [items[i] for i in subset(len(items), limit, seed)]


def answer_with_images(vlm: VisionLanguageModel, data: VLData, items: Sequence[VLItem], settings: EvalConfig,
                       progress: bool = False) -> list[str]:
    """Greedy answers of the VLM, each prompt with its image."""
    from tqdm.auto import tqdm

    pixels = vlm.processor.to_uint8([data.images[it.image] for it in items])
    out: list[str] = []
    for start in tqdm(range(0, len(items), settings.batch_size), desc="vlm", disable=not progress):
        chunk = items[start:start + settings.batch_size]
        px = vlm.processor.normalize(pixels[start:start + len(chunk)]).to(vlm.device)
        ids = vlm.generate_ids([it.prompt for it in chunk], px, settings.max_new_tokens)
        out.extend(vlm.decode(r) for r in ids)
    return out


def answer_blind(lm, tokenizer, items: Sequence[VLItem], settings: EvalConfig, progress: bool = False) -> list[str]:
    """Greedy answers of the LM alone to the prompts without their image marker."""
    gen = GenerationSettings(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                             add_special_tokens=True)
    texts = generate(lm, tokenizer, [text_only(it.prompt) for it in items], gen, progress=progress, desc="blind")
    return [t[0].strip() for t in texts.texts]


def _paired(name: str, model: list[float], blind: list[float] | None, group: str | None, seed: int) -> list[Metric]:
    out = [Metric(name, float(np.mean(model)), len(model), mean_ci(model, seed=seed), True, group)]
    if blind is not None:
        out.append(Metric(f"baseline_{name}", float(np.mean(blind)), len(blind), mean_ci(blind, seed=seed), True,
                          group))
        out.append(Metric(f"delta_{name}", float(np.mean(model) - np.mean(blind)), len(model),
                          paired_delta_ci(model, blind, seed=seed), True, group))
    return out


def evaluate_vlm(vlm: VisionLanguageModel, data: VLData, *, spec: str = "vlm", settings: EvalConfig = EvalConfig(),
                 blind_lm=None, blind_spec: str | None = None, seed: int = 0, progress: bool = False) -> Results:
    """Caption ROUGE and VQA accuracy of ``vlm`` on ``data``, with the blind baseline when ``settings.blind``.
    ``blind_lm`` is a (model, tokenizer) pair; None means the VLM's own LM."""
    start = time.perf_counter()
    captions = subset_items(data.select("caption"), settings.limit, seed)
    questions = subset_items(data.select("vqa"), settings.limit, seed)
    if not captions and not questions:
        raise ValueError("the evaluation data holds no caption or question items")
    lm, tok = blind_lm if blind_lm is not None else (vlm.lm, vlm.tokenizer)
    metrics: list[Metric] = []
    details: dict = {"items": []}
    for task, items in (("caption", captions), ("vqa", questions)):
        if not items:
            continue
        preds = answer_with_images(vlm, data, items, settings, progress)
        blind = answer_blind(lm, tok, items, settings, progress) if settings.blind else None
        refs = [it.answer if isinstance(it.answer, str) else list(it.answer) for it in items]
        if task == "caption":
            scored = score_items(preds, refs)
            b_scored = score_items(blind, refs) if blind is not None else None
            for m in rouge_metrics(scored, seed=seed):
                if m.name in ROUGE_TYPES:
                    model_f = [s[m.name].fmeasure for s in scored]
                    blind_f = None if b_scored is None else [s[m.name].fmeasure for s in b_scored]
                    metrics += _paired(m.name, model_f, blind_f, "caption", seed)
            per_item = [{"rougeL": s["rougeL"].fmeasure} for s in scored]
        else:
            correct = [float(exact_match(p, r)) for p, r in zip(preds, refs)]
            b_correct = None if blind is None else [float(exact_match(p, r)) for p, r in zip(blind, refs)]
            metrics += _paired("vqa_accuracy", correct, b_correct, None, seed)
            for qtype in sorted({it.qtype for it in items}):
                idx = [i for i, it in enumerate(items) if it.qtype == qtype]
                metrics += _paired("vqa_accuracy", [correct[i] for i in idx],
                                   None if b_correct is None else [b_correct[i] for i in idx], qtype, seed)
            per_item = [{"correct": bool(c)} for c in correct]
        for i, it in enumerate(items):
            details["items"].append({"task": task, "qtype": it.qtype, "image": it.image, "prompt": it.prompt,
                                     "reference": refs[i], "prediction": preds[i],
                                     "blind": None if blind is None else blind[i], **per_item[i]})
    texts = [it.prompt + "\x1f" + it.target for it in (*captions, *questions)]
    from pocketlm.data.text import hash_documents

    return Results(
        kind="vlm_eval", model=model_info(spec, vlm.lm, vlm.tokenizer),
        baseline=None if not settings.blind else {**model_info(blind_spec or f"{spec} (its LM, no image)", lm, tok),
                                                  "role": "blind: the LM alone, prompts without the image"},
        data={**data.source, "hash": hash_documents(texts), "n": len(captions) + len(questions),
              "n_captions": len(captions), "n_questions": len(questions)},
        settings={**settings.model_dump(), "seed": seed, "greedy": True,
                  "answer_normalisation": "lower case, punctuation, articles, whitespace"},
        metrics=metrics, details=details, wall_time_s=time.perf_counter() - start)


def run_eval(model: str, data: VLData, *, settings: EvalConfig = EvalConfig(), blind_lm: str | None = None,
             seed: int = 0, threads: int | None = None, progress: bool = False,
             trust_remote_code: bool | None = None) -> Results:
    """Load a VLM folder (and a blind text LM folder where given) and evaluate it on ``data``."""
    from pocketlm.models.load import load_model

    if threads:
        torch.set_num_threads(threads)
    vlm = VisionLanguageModel.load(model, trust_remote_code=trust_remote_code)
    blind = load_model(blind_lm, trust_remote_code=trust_remote_code) if blind_lm else None
    res = evaluate_vlm(vlm, data, spec=model, settings=settings, blind_lm=blind, blind_spec=blind_lm, seed=seed,
                       progress=progress)
    res.provenance = provenance()
    return res


def eval_data(images: str | Path | None = None, captions: str | Path | None = None, *, n: int = 300, seed: int = 0,
              image_size: int = 48, max_shapes: int = 3) -> VLData:
    """`pocketlm vlm eval`'s items: your data (a folder of images and their captions, both or neither) or ``n``
    built-in shape scenes of the test split."""
    if (images is None) != (captions is None):
        raise ValueError("give both --images and --captions (your data), or neither (built-in shape scenes)")
    if images is not None:
        return load_caption_folder(images, captions)
    return scenes_data("test", n, seed=seed, spec=SceneSpec(image_size=image_size, max_shapes=max_shapes))


def caption_results(model: str | Path, image: str | Path, *, prompt: str | None = None,
                    attention: str | Path | None = None, max_new_tokens: int = 32,
                    trust_remote_code: bool | None = None) -> Results:
    """`pocketlm vlm caption`: caption one image (or answer ``prompt`` about it, one ``<image>`` marker), greedy;
    with ``attention``, also draw the attention over patches per generated token to that PNG. The image and the
    prompt are checked before the model loads. → ``Results(kind="vlm_caption")``, the caption in its details."""
    start = time.perf_counter()
    img = load_image(image)
    text = prompt or CAPTION_PROMPT
    if text.count("<image>") != 1:
        raise ValueError(f"the prompt {text!r} needs exactly one <image> marker, where the image goes")
    vlm = VisionLanguageModel.load(model, trust_remote_code=trust_remote_code)
    metrics, details = [], {"image": str(image), "prompt": text}
    if attention is not None:
        pa = attention_over_patches(vlm, img, text, max_new_tokens=max_new_tokens)
        caption = pa.text
        details.update(attention_png=str(draw_patch_attention(img, pa, attention)), tokens=pa.tokens,
                       image_share=[float(x) for x in pa.image_share])
        if len(pa.tokens):
            metrics.append(Metric("image_attention_share", float(pa.image_share.mean()), len(pa.tokens)))
    else:
        caption = vlm.decode(vlm.generate([text], [img], max_new_tokens=max_new_tokens)[0])
    details["caption"] = caption
    return Results(kind="vlm_caption", model=model_info(str(model), vlm.lm, vlm.tokenizer),
                   data={"source": str(image), "n": 1}, settings={"max_new_tokens": max_new_tokens, "greedy": True},
                   metrics=metrics, details=details, provenance=provenance(), wall_time_s=time.perf_counter() - start)
