"""Training a vision-language student in two stages, as LLaVA does (Liu et al. 2023, "Visual Instruction Tuning").

    encoder (only for a new ViT)  our ViT labels the scenes' patches (colour, kind, size): `vlm/pretrain_vit.py`
    stage 0 (only for a new LM)  the LM alone on the training text, image markers removed: it learns the language
                                 and the answers' prior (`stage0_texts`); this LM is the blind baseline
    stage 1                      projector only (encoder and LM frozen), on captions: aligns image tokens to words
    stage 2                      projector + LM, on captions and questions

Which parts train and on which tasks is the config's (`stage.train`, `stage.tasks`); the defaults are LLaVA's.
A frozen encoder is run once over every image and its features reused at every step. The loss is the answer
tokens' cross-entropy (`VisionLanguageModel.forward`). Losses go to ``metrics.jsonl``; the folders written are
``text_lm/`` (after stage 0: the blind baseline), ``stage1/`` and ``model/`` (the final VLM), and
``results.json``.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from pocketlm.core.io import atomic_folder
from pocketlm.core.outdir import output_folder, read_marker
from pocketlm.core.paths import check_outputs
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.data.scenes import SceneSpec, VLData, VLItem, load_caption_folder, scenes_data
from pocketlm.data.text import hash_documents
from pocketlm.models.load import load_model, model_info
from pocketlm.models.projectors import ProjectorParams
from pocketlm.models.student import IGNORE_INDEX, PocketLMConfig, PocketLMForCausalLM, causal_lm_loss
from pocketlm.models.vision import IMAGE_TOKEN, VisionLanguageModel
from pocketlm.models.vit import HFVisionEncoder, ViT, ViTConfig
from pocketlm.training import (
    autocast, balanced_batches, cosine_schedule, optimizer_step, shuffled_batches, warmup_steps,
)
from pocketlm.vlm.config import DataConfig, StageConfig, VLMConfig
from pocketlm.models.images import ImageProcessor
from pocketlm.vlm.pretrain_vit import pretrain_encoder
from pocketlm.vlm.tokenizer import word_tokenizer

LR_FLOOR = 0.1  # every stage's LR decays to this share of its peak


# ---------------------------------------------------------------------------------------------- data
def load_splits(cfg: DataConfig, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, VLData]:
    """The data of each split asked for (a folder split the config leaves out is skipped); shapes data also has
    the split "compositional" (scenes with a held-out colour × kind pair, `pocketlm.data.scenes`)."""
    out: dict[str, VLData] = {}
    for split in splits:
        if cfg.kind == "shapes":
            s = cfg.shapes
            spec = SceneSpec(image_size=s.image_size, min_shapes=s.min_shapes, max_shapes=s.max_shapes,
                             held_out=s.held_out_pairs())
            out[split] = scenes_data(split, getattr(s, f"n_{split}"), seed=s.seed, spec=spec)
        elif getattr(cfg, split, None) is not None:  # a folder config has no compositional split
            src = getattr(cfg, split)
            out[split] = load_caption_folder(src.images, src.captions)
    return out


def text_only(prompt: str) -> str:
    """A prompt with its image marker removed (what the LM alone sees)."""
    return " ".join(prompt.replace(IMAGE_TOKEN, " ").split())


def stage0_texts(data: VLData, with_captions: bool = False) -> list[str]:
    """The text-only corpus of stage 0: every item as text (prompt without its image, then the answer). With
    ``with_captions``, every question also comes again after its image's caption, so the LM learns to answer a
    question about a scene described in words. Off by default: on the shape scenes that text lookup competed with
    the image lookup stage 2 has to learn (seed 0: colour accuracy 0.66 with it, 0.95 without)."""
    texts = [text_only(it.prompt) + " " + it.target for it in data.items]
    if not with_captions:
        return texts
    captions: dict[int, str] = {}
    for it in data.items:
        if it.task == "caption":
            captions.setdefault(it.image, text_only(it.prompt) + " " + it.target)
    texts += [captions[it.image] + " " + text_only(it.prompt) + " " + it.target
              for it in data.items if it.task == "vqa" and it.image in captions]
    return texts


# ---------------------------------------------------------------------------------------------- building
def build_vlm(cfg: VLMConfig, train_texts: Sequence[str], *,
              trust_remote_code: bool | None = None) -> VisionLanguageModel:
    """A new VLM as the config says: encoder (new ViT or HF folder), projector, LM (folder or new student)."""
    torch.manual_seed(cfg.seed)
    e = cfg.encoder
    processor = None
    if e.kind == "vit":
        encoder = ViT(ViTConfig(e.image_size, e.patch_size, e.hidden_size, e.num_layers, e.num_heads, e.mlp_ratio))
    else:
        encoder = HFVisionEncoder.from_folder(e.path, e.feature_layer)
        processor = _hf_processor(Path(e.path), encoder.image_size)
    if cfg.lm.path:
        lm, tokenizer = load_model(cfg.lm.path, trust_remote_code=trust_remote_code)
    else:
        tokenizer = word_tokenizer(train_texts)
        m = cfg.lm
        lm = PocketLMForCausalLM(PocketLMConfig(
            vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    p = cfg.projector
    params = ProjectorParams(num_tokens=p.num_tokens, depth=p.depth, num_heads=p.num_heads, hidden_mult=p.hidden_mult,
                             pos_embed=p.pos_embed)
    return VisionLanguageModel.build(encoder, lm, tokenizer, p.kind, params,
                                     processor or ImageProcessor(encoder.image_size))


def _hf_processor(folder: Path, image_size: int):
    """Our processor with the mean/std of the folder's preprocessor_config.json (CLIP's when it has none)."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
    path = folder / "preprocessor_config.json"
    if path.is_file():
        pc = json.loads(path.read_text())
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    return ImageProcessor(image_size, mean, std)


# ---------------------------------------------------------------------------------------------- the loop
def set_trainable(vlm: VisionLanguageModel, parts: Sequence[str]) -> list[torch.nn.Parameter]:
    """Freeze every part not in ``parts`` (and put it in eval mode); return the trainable parameters."""
    params = []
    for name, module in (("encoder", vlm.encoder), ("projector", vlm.projector), ("lm", vlm.lm)):
        on = name in parts
        module.train(on)
        for p in module.parameters():
            p.requires_grad_(on)
            if on:
                params.append(p)
    return params


@torch.no_grad()
def encode_images(vlm: VisionLanguageModel, pixels_u8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encoder features [N, n, e] of every image (uint8 pixels), for a frozen encoder."""
    was = vlm.encoder.training
    vlm.encoder.eval()
    out = [vlm.image_features(vlm.processor.normalize(pixels_u8[i:i + batch_size]))
           for i in range(0, len(pixels_u8), batch_size)]
    vlm.encoder.train(was)
    return torch.cat(out)


@dataclass
class Prepared:
    """A split made ready for a stage: encoded rows, image index per row, and pixels or cached features."""

    rows: list[tuple[list[int], list[int]]]
    images: torch.Tensor  # [rows] image index
    pixels: torch.Tensor  # [N, c, H, W] uint8
    features: torch.Tensor | None  # [N, n, e] when the encoder is frozen


def prepare(vlm: VisionLanguageModel, data: VLData, items: Sequence[VLItem], pixels: torch.Tensor,
            frozen_encoder: bool) -> Prepared:
    rows = [vlm.encode(it.prompt, it.target) for it in items]
    feats = encode_images(vlm, pixels) if frozen_encoder else None
    return Prepared(rows, torch.tensor([it.image for it in items]), pixels, feats)


def batch_loss(vlm: VisionLanguageModel, prep: Prepared, idx: torch.Tensor, average: str = "token") -> torch.Tensor:
    batch = vlm.pad([prep.rows[i] for i in idx.tolist()])
    img = prep.images[idx]
    if prep.features is not None:
        return vlm(**batch, image_features=prep.features[img], loss_average=average).loss
    return vlm(**batch, pixel_values=vlm.processor.normalize(prep.pixels[img]), loss_average=average).loss


@torch.no_grad()
def eval_loss(vlm: VisionLanguageModel, prep: Prepared, batch_size: int = 64) -> float:
    """Answer-token loss over the rows (token-weighted: Σ nll / Σ tokens)."""
    was = [m.training for m in (vlm.encoder, vlm.projector, vlm.lm)]
    vlm.eval()
    total, count = 0.0, 0
    for start in range(0, len(prep.rows), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(prep.rows)))
        n = sum(sum(t != IGNORE_INDEX for t in prep.rows[i][1][1:]) for i in idx.tolist())
        total += float(batch_loss(vlm, prep, idx)) * n
        count += n
    for m, w in zip((vlm.encoder, vlm.projector, vlm.lm), was):
        m.train(w)
    return total / max(count, 1)


def item_group(item: VLItem) -> str:
    """What balanced sampling balances: the question type of a VQA item (its task when it has none), else the
    task (``caption``)."""
    return (item.qtype or item.task) if item.task == "vqa" else item.task


def optimise(params: list[torch.nn.Parameter], stage: StageConfig, loss_fn: Callable[[torch.Tensor], torch.Tensor],
             n_rows: int, *, seed: int, name: str, log: Callable[[dict], None], progress: bool,
             log_every: int, precision: str = "fp32", groups: Sequence[str] | None = None) -> dict:
    """AdamW over ``params`` for ``stage.steps`` steps of ``loss_fn(batch indices)``; gradients clipped at 1; the
    LR warms up over ``stage.warmup``·steps, then decays by a cosine to a tenth (`pocketlm.training`).
    ``precision="bf16"`` runs the forward under bf16 autocast (weights, gradients and optimizer stay fp32).
    With ``groups`` (one name per row) batches are balanced over them (`balanced_batches`), else seeded
    shuffles of all rows."""
    device = params[0].device.type
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.98))
    sched = cosine_schedule(opt, warmup_steps(stage.warmup, stage.steps), stage.steps, LR_FLOOR)
    start, losses = time.perf_counter(), []
    bar = tqdm(total=stage.steps, desc=name, disable=not progress)
    batches = (balanced_batches(groups, stage.batch_size, stage.steps, seed) if groups is not None
               else shuffled_batches(n_rows, min(stage.batch_size, n_rows), stage.steps, seed))
    for step, idx in enumerate(batches):
        with autocast(device, precision):
            loss = loss_fn(idx)
        losses.append(optimizer_step(loss, opt, sched, params))
        if (step + 1) % log_every == 0 or step + 1 == stage.steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log({"stage": name, "step": step + 1, "loss": recent, "lr": sched.get_last_lr()[0],
                 "elapsed_s": time.perf_counter() - start})
            bar.set_postfix(loss=f"{recent:.3f}")
        bar.update(1)
    bar.close()
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return {"steps": stage.steps, "final_loss": sum(tail) / len(tail), "wall_s": time.perf_counter() - start,
            "trainable_parameters": sum(p.numel() for p in params)}


def pretrain_lm(vlm: VisionLanguageModel, texts: Sequence[str], cfg: VLMConfig, *, log, progress: bool) -> dict:
    """Stage 0: the LM alone on whole texts (every token counted), so a new LM knows the language."""
    tok, m = vlm.tokenizer, cfg.lm
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=True, verbose=False)["input_ids"] + [tok.eos_token_id]
        rows.append((ids, ids))
    params = set_trainable(vlm, ["lm"])

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        batch = vlm.pad([rows[i] for i in idx.tolist()])
        logits = vlm.lm(input_ids=batch["input_ids"].to(vlm.device),
                        attention_mask=batch["attention_mask"].to(vlm.device), use_cache=False).logits
        return causal_lm_loss(logits, batch["labels"])

    stage = StageConfig(steps=m.pretrain_steps, lr=m.pretrain_lr, batch_size=m.pretrain_batch_size,
                        tasks=["caption"], train=["lm"])
    return optimise(params, stage, loss_fn, len(rows), seed=cfg.seed, name="stage0", log=log, progress=progress,
                    log_every=cfg.log_every, precision=cfg.precision)


def run_stage(vlm: VisionLanguageModel, name: str, stage: StageConfig, train: VLData, val: VLData | None,
              pixels: dict[str, torch.Tensor], cfg: VLMConfig, *, log, progress: bool) -> dict:
    """One LLaVA stage: train the parts ``stage.train`` names on the tasks ``stage.tasks`` names."""
    items = [it for it in train.items if it.task in stage.tasks]
    if not items:
        raise ValueError(f"{name}: the training data has no items of tasks {stage.tasks}")
    frozen = "encoder" not in stage.train
    params = set_trainable(vlm, stage.train)
    prep = prepare(vlm, train, items, pixels["train"], frozen)
    groups = [item_group(it) for it in items]
    result = optimise(params, stage, lambda idx: batch_loss(vlm, prep, idx, stage.loss_average), len(prep.rows),
                      seed=cfg.seed + {"stage1": 1, "stage2": 2}.get(name, 3), name=name, log=log,
                      progress=progress, log_every=cfg.log_every, precision=cfg.precision,
                      groups=groups if stage.sampling == "balanced" else None)
    counts = {g: groups.count(g) for g in sorted(set(groups))}
    result.update(tasks=list(stage.tasks), trained=list(stage.train), n_items=len(items), items_per_group=counts,
                  sampling=stage.sampling)
    if val is not None:
        vitems = [it for it in val.items if it.task in stage.tasks][:512]
        if vitems:
            result["val_loss"] = eval_loss(vlm, prepare(vlm, val, vitems, pixels["val"], True))
    set_trainable(vlm, [])
    return result


def run_train(cfg: VLMConfig, *, progress: bool = False, overwrite: bool = False,
              trust_remote_code: bool | None = None) -> Results:
    """Build, train (stage 0 when asked, stages 1 and 2) and save; returns the training results."""
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    out = Path(cfg.output_dir)
    check_outputs(out, ("text_lm", "stage1", "model", "metrics.jsonl", "results.json"))
    data = load_splits(cfg.data, ("train", "val"))
    train, val = data["train"], data.get("val")
    # held for the run (new or a VLM folder of ours, locked); bad input leaves no empty folder behind
    with output_folder(out, kind="vlm", what="output_dir", overwrite=overwrite):
        # our own folder: its subfolders are swapped in whole; a user's folder (--overwrite) is written into,
        # same-named files replaced and nothing deleted
        ours = read_marker(out) is not None
        vlm = build_vlm(cfg, train.texts(), trust_remote_code=trust_remote_code).to(cfg.device)
        pixels = {k: vlm.processor.to_uint8(v.images) for k, v in data.items()}
        log_path = out / "metrics.jsonl"
        log_path.write_text("")

        def log(row: dict) -> None:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

        stages: dict[str, dict] = {}
        if cfg.encoder.pretrain_steps:
            e = cfg.encoder
            stages["encoder"] = pretrain_encoder(
                vlm.encoder, vlm.processor, train.scenes, steps=e.pretrain_steps, lr=e.pretrain_lr,
                batch_size=e.pretrain_batch_size, seed=cfg.seed, log=log, log_every=cfg.log_every, progress=progress,
                held_out=(val.scenes or [])[:200] if val is not None else ())
        if cfg.lm.pretrain_steps:
            texts = stage0_texts(train, cfg.lm.pretrain_with_captions)
            stages["stage0"] = pretrain_lm(vlm, texts, cfg, log=log, progress=progress)
            with atomic_folder(out / "text_lm", replace=ours) as tmp:  # the blind baseline, whole or not at all
                vlm.lm.save_pretrained(tmp)
                vlm.tokenizer.save_pretrained(tmp)
        if cfg.stage1.steps:
            stages["stage1"] = run_stage(vlm, "stage1", cfg.stage1, train, val, pixels, cfg, log=log, progress=progress)
            vlm.save(out / "stage1", replace=ours)
        if cfg.stage2.steps:
            stages["stage2"] = run_stage(vlm, "stage2", cfg.stage2, train, val, pixels, cfg, log=log, progress=progress)
        final = vlm.save(out / "model", replace=ours)
        metrics = []
        for name, r in stages.items():
            metrics.append(Metric("train_loss", r["final_loss"], r["steps"], higher_is_better=False, group=name))
            if "val_loss" in r:
                metrics.append(Metric("val_loss", r["val_loss"], r.get("n_items", 0), higher_is_better=False, group=name))
            metrics.append(Metric("wall_time", r["wall_s"], r["steps"], higher_is_better=False, group=name, unit="s"))
        res = Results(
            kind="vlm_train", model=model_info(str(final), vlm.lm, vlm.tokenizer),
            data={**train.source, "hash": hash_documents(train.texts()), "n": len(train.items)},
            settings=cfg.model_dump(), metrics=metrics,
            details={"stages": stages, "num_image_tokens": vlm.num_image_tokens, "output": str(final)},
            provenance=provenance(), wall_time_s=time.perf_counter() - start)
        res.write(out / "results.json")
    return res
