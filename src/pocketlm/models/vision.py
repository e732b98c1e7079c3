"""A vision-language model: image encoder → projector → causal language model (LLaVA, Liu et al. 2023).

The prompt says where the image goes with one ``<image>`` marker. The marker is a special token of the LM's
tokenizer (added, and the LM's embeddings resized, when absent); the processor expands it into as many marker
tokens as the projector makes image tokens, and the LM's input embeddings at those positions are replaced by the
projector's output, in order. The LM then runs on ``inputs_embeds``, so any HF causal LM works (the pocketlm
student included). Training examples are (prompt, answer): the loss counts the answer's tokens and the EOS after
it, never the prompt's or the image's.

One folder holds it all, nothing pickled::

    vlm_config.json        format, encoder kind, projector kind and params, image processor, marker
    encoder/               our ViT (config.json + model.safetensors) or an HF vision model (save_pretrained)
    projector.safetensors
    lm/                    the LM (save_pretrained: config.json + model.safetensors) and its tokenizer

Shape legend: b rows, s tokens, q image tokens per image, n patches, e encoder width, d LM width, v vocabulary.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.core.integrity import RecordError, read_json
from pocketlm.core.io import atomic_folder
from pocketlm.models.projectors import ProjectorParams, build_projector
from pocketlm.models.student import IGNORE_INDEX, causal_lm_loss
from pocketlm.models.vit import VIT_KIND, HFVisionEncoder, ViT
from pocketlm.models.images import ImageProcessor
from pocketlm.models.load import load_model

IMAGE_TOKEN = "<image>"
FORMAT = "pocketlm-vlm/1"


class PromptError(ValueError):
    """A prompt that does not fit its image (a missing or repeated ``<image>`` marker)."""


def add_image_token(tokenizer, lm: nn.Module) -> int:
    """The id of ``<image>`` in ``tokenizer``: added as a special token when absent, with the LM's embeddings
    (and tied head) resized to the new vocabulary; existing rows are kept as they were."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    n = len(tokenizer)
    if lm.get_input_embeddings().weight.shape[0] < n:
        lm.resize_token_embeddings(n, mean_resizing=False)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the LM's tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, average: str = "token") -> torch.Tensor:
    """Next-token cross-entropy (fp32) on the labelled tokens. ``average="token"``: Σ nll / Σ tokens over the batch
    (`causal_lm_loss`, LLaVA's); ``"example"``: each row's mean over its own tokens, then the mean over rows, so a
    one-word answer weighs as much as a long caption. Rows with no labelled token count as 0 and are left out."""
    if average == "token":
        return causal_lm_loss(logits, labels)
    if average != "example":
        raise ValueError(f"unknown loss average {average!r}; valid: token, example")
    targets = labels[:, 1:].to(logits.device)  # [b, s-1]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                          reduction="none")  # [b, s-1]
    counts = (targets != IGNORE_INDEX).sum(1)  # [b]
    rows = counts > 0
    if not rows.any():
        return nll.sum() * 0.0
    return (nll.sum(1)[rows] / counts[rows]).mean()


class VisionLanguageModel(nn.Module):
    def __init__(self, encoder: nn.Module, projector: nn.Module, lm: nn.Module, tokenizer, processor: ImageProcessor,
                 projector_kind: str, projector_params: ProjectorParams) -> None:
        super().__init__()
        self.encoder, self.projector, self.lm = encoder, projector, lm
        self.tokenizer = tokenizer
        self.processor = processor
        self.projector_kind, self.projector_params = projector_kind, projector_params
        self.image_token_id = add_image_token(tokenizer, lm)
        g = encoder.grid
        self.num_patches = g[0] * g[1]
        self.num_image_tokens = projector.num_tokens(self.num_patches)

    @classmethod
    def build(cls, encoder: nn.Module, lm: nn.Module, tokenizer, projector_kind: str = "mlp",
              projector_params: ProjectorParams = ProjectorParams(),
              processor: ImageProcessor | None = None) -> VisionLanguageModel:
        """Join an encoder and an LM with a new projector of ``projector_kind``."""
        d = lm.get_input_embeddings().weight.shape[1]
        projector = build_projector(projector_kind, encoder.hidden_size, d, projector_params, tuple(encoder.grid))
        return cls(encoder, projector, lm, tokenizer, processor or ImageProcessor(encoder.image_size),
                   projector_kind, projector_params)

    # ------------------------------------------------------------------------------------------ tokens
    def prompt_ids(self, prompt: str, has_image: bool) -> list[int]:
        """Token ids of ``prompt`` with its ``<image>`` marker expanded to ``num_image_tokens`` markers."""
        n_markers = prompt.count(IMAGE_TOKEN)
        if has_image and n_markers != 1:
            raise PromptError(
                f"the prompt {prompt[:80]!r} has {'no' if n_markers == 0 else n_markers} {IMAGE_TOKEN} marker"
                f"{'s' if n_markers > 1 else ''}; with an image it needs exactly one, where the image goes "
                f"(e.g. '{IMAGE_TOKEN} describe the image .')")
        if not has_image and n_markers:
            raise PromptError(f"the prompt {prompt[:80]!r} has an {IMAGE_TOKEN} marker but no image was given")
        text = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.num_image_tokens)
        ids = self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        got = sum(i == self.image_token_id for i in ids)
        if got != (self.num_image_tokens if has_image else 0):
            raise PromptError(f"the tokenizer split {IMAGE_TOKEN} into pieces ({got} marker tokens, expected "
                              f"{self.num_image_tokens}); it must be one special token")
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens (after a space, as it follows the prompt) and EOS: what the loss counts."""
        ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False, verbose=False)["input_ids"]
        return ids + ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def encode(self, prompt: str, answer: str | None = None, *, has_image: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one example: labels are -100 except on the answer's tokens and its EOS."""
        ids = self.prompt_ids(prompt, has_image)
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            a = self.answer_ids(answer)
            ids, labels = ids + a, labels + a
        return ids, labels

    def pad(self, rows: Sequence[tuple[list[int], list[int]]], *, left_pad: bool = False,
            with_labels: bool = True) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (and labels) [b, s] of encoded rows, right-padded for training or left-padded
        for generation."""
        width = max(len(ids) for ids, _ in rows)
        out = {"input_ids": torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
        if with_labels:
            out["labels"] = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            sl = slice(width - len(ids), width) if left_pad else slice(0, len(ids))
            out["input_ids"][i, sl] = torch.tensor(ids)
            out["attention_mask"][i, sl] = 1
            if with_labels:
                out["labels"][i, sl] = torch.tensor(lab)
        return out

    def collate(self, prompts: Sequence[str], answers: Sequence[str] | None = None, *, has_image: bool = True,
                left_pad: bool = False) -> dict[str, torch.Tensor]:
        """`encode` then `pad` a batch; labels only when answers are given."""
        rows = [self.encode(p, None if answers is None else answers[i], has_image=has_image)
                for i, p in enumerate(prompts)]
        return self.pad(rows, left_pad=left_pad, with_labels=answers is not None)

    # ------------------------------------------------------------------------------------------ forward
    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """Normalised pixels [b, c, H, W] of PIL images or arrays (converted to RGB where needed)."""
        return self.processor(images).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values.to(self.device))  # [b, n, e]

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """LM input embeddings [b, s, d] with row i's marker positions holding image_embeds[i] ([b, q, d])."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # [b, s, d]
        markers = input_ids == self.image_token_id  # [b, s]
        if image_embeds is None:
            if markers.any():
                raise PromptError(f"the input has {IMAGE_TOKEN} markers but no image")
            return embeds
        per_row = markers.sum(1)
        if image_embeds.shape[0] != input_ids.shape[0] or (per_row != image_embeds.shape[1]).any():
            raise PromptError(f"{image_embeds.shape[0]} images of {image_embeds.shape[1]} tokens for rows holding "
                              f"{per_row.tolist()} {IMAGE_TOKEN} markers")
        return embeds.masked_scatter(markers.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_average: str = "token", **lm_kwargs: Any):
        """The LM's output on the joined sequence; ``loss`` is the answer-token cross-entropy when labels are given
        (`answer_loss`). ``image_features`` ([b, n, e], e.g. cached from a frozen encoder) stand in for
        ``pixel_values``."""
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values)
        image_embeds = None if image_features is None else self.projector(image_features.to(self.device))
        embeds = self.embed(input_ids.to(self.device), image_embeds)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **lm_kwargs)
        if labels is not None:
            out.loss = answer_loss(out.logits, labels.to(self.device), loss_average)
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[Any] | None = None, *, max_new_tokens: int = 32,
                 batch_size: int = 32) -> list[list[int]]:
        """Greedy continuations (token ids, up to EOS) of each prompt, with its image where ``images`` is given."""
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        was = self.training
        self.eval()
        out: list[list[int]] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                imgs = None if images is None else images[start:start + batch_size]
                pixel_values = None if imgs is None else (
                    imgs if isinstance(imgs, torch.Tensor) else self.pixels(imgs))
                out.extend(self.generate_ids(chunk, pixel_values, max_new_tokens))
        finally:
            self.train(was)
        return out

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], pixel_values: torch.Tensor | None,
                     max_new_tokens: int) -> list[list[int]]:
        batch = self.collate(prompts, has_image=pixel_values is not None, left_pad=True)
        image_embeds = None if pixel_values is None else self.projector(self.image_features(pixel_values))
        embeds = self.embed(batch["input_ids"].to(self.device), image_embeds)
        tok = self.tokenizer
        ids = self.lm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(self.device),
                               max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               temperature=None, top_p=None, top_k=None)
        rows = []
        for row in ids.tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            rows.append(row)
        return rows

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------------------ save / load
    def config_dict(self) -> dict:
        enc = {"kind": getattr(self.encoder, "kind", "hf"), "feature_layer": getattr(self.encoder, "feature_layer",
                                                                                      None)}
        return {"format": FORMAT, "encoder": enc,
                "projector": {"kind": self.projector_kind, **asdict(self.projector_params)},
                "processor": self.processor.to_dict(), "image_token": IMAGE_TOKEN,
                "num_image_tokens": self.num_image_tokens}

    def save(self, folder: str | os.PathLike, *, replace: bool = True) -> Path:
        """Write the whole model into ``folder`` (a temporary folder renamed into place: never half written); with
        ``replace=False`` an existing folder (not ours to replace) is written into, deleting nothing."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_folder(folder, replace=replace) as tmp:
            (tmp / "vlm_config.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")
            self.encoder.save(tmp / "encoder")
            save_file({k: v.detach().contiguous() for k, v in self.projector.state_dict().items()},
                      str(tmp / "projector.safetensors"))
            self.lm.save_pretrained(tmp / "lm")
            self.tokenizer.save_pretrained(tmp / "lm")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, dtype: str = "float32",
             trust_remote_code: bool | None = None) -> VisionLanguageModel:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / "vlm_config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} is not a pocketlm VLM folder (no vlm_config.json)")
        cfg = read_json(cfg_path, "pocketlm VLM config")
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            found = cfg.get("format") if isinstance(cfg, dict) else f"a JSON {type(cfg).__name__}"
            raise RecordError(f"{cfg_path}: format {found!r}, expected {FORMAT!r}")
        for part in ("encoder", "lm", "projector.safetensors"):
            if not (folder / part).exists():
                raise FileNotFoundError(f"{folder} is missing {part}")
        enc = cfg["encoder"]
        if enc["kind"] == VIT_KIND:
            encoder = ViT.load(folder / "encoder")
        else:
            layer = enc.get("feature_layer")  # 0 (the embeddings) is a layer, not "unset"
            encoder = HFVisionEncoder.from_folder(folder / "encoder", -1 if layer is None else layer)
        lm, tokenizer = load_model(folder / "lm", dtype=dtype, trust_remote_code=trust_remote_code)
        pcfg = dict(cfg["projector"])
        kind = pcfg.pop("kind")
        params = ProjectorParams(**pcfg)
        d = lm.get_input_embeddings().weight.shape[1]
        projector = build_projector(kind, encoder.hidden_size, d, params, tuple(encoder.grid))
        projector.load_state_dict(load_file(str(folder / "projector.safetensors")))
        model = cls(encoder, projector, lm, tokenizer, ImageProcessor.from_dict(cfg["processor"]), kind, params)
        if model.num_image_tokens != cfg["num_image_tokens"]:
            raise ValueError(f"{cfg_path}: num_image_tokens {cfg['num_image_tokens']} but the parts make "
                             f"{model.num_image_tokens}")
        return model.eval()
