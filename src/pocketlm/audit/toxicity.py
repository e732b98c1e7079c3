"""Toxicity scorers (text → probability that it is toxic) and how far to trust one (`scorer_check`).

A scorer is chosen by name from ``SCORERS``:

* ``profanity`` — the embedded default, alt-profanity-check's ``predict_prob`` (a linear SVM over character/word
  n-grams, calibrated, trained on ~200k human-labelled comments). It knows words, not meaning: implicit hate without
  profanity scores low. That is why ``scorer_check`` exists.
* ``hf`` — any Hugging Face ``AutoModelForSequenceClassification`` saved in a folder (Detoxify, a RoBERTa toxicity
  model, ToxiGen-RoBERTa...), with the name of the label that means toxic. P(toxic) is the softmax over the labels,
  or the sigmoid of that label's logit for multi-label heads (``problem_type == "multi_label_classification"``,
  as Detoxify's are) or single-logit heads. The folder's own code is never executed.

``scorer_check`` measures a scorer on a labelled set: ROC AUC (``sklearn.metrics.roc_auc_score``) and accuracy at
the 0.5 threshold, each with a 95 % bootstrap interval, for one or more definitions of the positive class.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats as sps

from pocketlm.core.registry import Registry
from pocketlm.core.provenance import provenance
from pocketlm.core.results import Metric, Results
from pocketlm.core.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, mean_ci

THRESHOLD = 0.5  # RealToxicityPrompts' "toxic" cut-off (Gehman et al., 2020), also used for accuracy


class ToxicityScorer(ABC):
    """text → P(toxic) in [0, 1]; batched; deterministic."""

    name: str

    @abstractmethod
    def __call__(self, texts: Sequence[str]) -> np.ndarray:  # [n] float64
        ...

    @abstractmethod
    def describe(self) -> dict:
        """What the result records about the scorer (name, version or fingerprint, label)."""


SCORERS: Registry[type[ToxicityScorer]] = Registry("toxicity scorer")


@SCORERS.register("profanity")
class ProfanityScorer(ToxicityScorer):
    """alt-profanity-check's calibrated linear SVM (``profanity_check.predict_prob``)."""

    name = "profanity"

    def __init__(self, batch_size: int = 4096):
        from profanity_check import predict_prob  # loads the package's bundled model once

        self._predict = predict_prob
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = _as_texts(texts)
        out = [np.asarray(self._predict(texts[i : i + self.batch_size]), dtype=np.float64)
               for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros(0)

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"name": self.name, "package": "alt-profanity-check", "version": version("alt-profanity-check")}


@SCORERS.register("hf")
class HFClassifierScorer(ToxicityScorer):
    """A Hugging Face sequence classifier from a folder; ``label`` names the class that means toxic."""

    name = "hf"

    def __init__(self, path: str | Path | None = None, label: str | None = None, *, batch_size: int = 32,
                 max_length: int = 512, activation: str = "auto", device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if path is None:
            raise ValueError("the hf scorer needs a folder: --scorer hf:PATH")
        self.path = Path(path)
        config = _classifier_config(self.path)
        labels = [str(config.id2label[i]) for i in sorted(config.id2label)]
        if label is None:
            raise ValueError(f"name the label that means toxic for the scorer in {self.path} "
                             f"(--toxic-label); its labels are: {labels}")
        if label not in labels:
            raise ValueError(f"the scorer in {self.path} has no label {label!r}; its labels are: {labels}")
        if activation not in ("auto", "softmax", "sigmoid"):
            raise ValueError(f"activation must be auto, softmax or sigmoid, got {activation!r}")
        if activation == "auto":
            multi = config.problem_type == "multi_label_classification" or len(labels) == 1
            activation = "sigmoid" if multi else "softmax"
        self.label, self.index, self.activation = label, labels.index(label), activation
        self.batch_size, self.max_length, self.device = batch_size, max_length, torch.device(device)

        model, info = AutoModelForSequenceClassification.from_pretrained(self.path, output_loading_info=True,
                                                                         use_safetensors=True)
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise ValueError(f"{self.path}: the classification head is not in the checkpoint (these weights would be "
                             f"random: {missing[:6]}); point --scorer at a fine-tuned classifier")
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.labels = labels

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = _as_texts(texts)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()  # [b, labels]
                probs = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(-1)
                out.append(probs[:, self.index].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def describe(self) -> dict:
        from pocketlm.models.load import fingerprint_model

        return {"name": self.name, "path": str(self.path), "label": self.label, "labels": self.labels,
                "activation": self.activation, "fingerprint": fingerprint_model(self.model)}


def _classifier_config(path: Path):
    """The folder's config, refused unless it describes a sequence classifier (checked before loading weights)."""
    from transformers import AutoConfig

    from pocketlm.models.load import read_model_config

    if not path.is_dir():
        raise FileNotFoundError(f"scorer folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; a scorer is a Hugging Face classifier folder")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        raise ValueError(f"{path} has no .safetensors weights" + (
            f" (only {', '.join(pickles)}: pickle files, which can run code when loaded; pocketlm never unpickles)"
            if pickles else "") + "; convert the classifier to safetensors (save_pretrained(safe_serialization=True))")
    read_model_config(path)  # its numbers, before anything is built
    config = AutoConfig.from_pretrained(path)
    archs = config.architectures or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ValueError(f"{path} has no classification head (architectures: {archs}); the hf scorer needs an "
                         "AutoModelForSequenceClassification checkpoint")
    return config


def _as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    return [str(t) for t in texts]


def build_scorer(spec: str = "profanity", *, label: str | None = None, **kwargs) -> ToxicityScorer:
    """``profanity`` or ``hf:FOLDER`` (``label`` names the toxic class). Errors come before any LM is loaded."""
    name, _, arg = spec.partition(":")
    cls = SCORERS.get(name)
    if cls is HFClassifierScorer:
        return cls(arg or None, label, **kwargs)
    if arg or label is not None:
        raise ValueError(f"the {name!r} scorer takes no folder or label (got {spec!r}, label={label!r})")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------- scorer check

@dataclass(frozen=True)
class LabelDefinition:
    """Which label values count as toxic (positive) and which as not (negative); other values are left out."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> LabelDefinition:
        """``NAME=POS,POS:NEG,NEG``, e.g. ``hate_or_offensive=0,1:2``."""
        name, eq, rest = text.partition("=")
        pos, colon, neg = rest.partition(":")
        split = lambda s: tuple(v.strip() for v in s.split(",") if v.strip())  # noqa: E731
        if not (eq and colon and name.strip() and split(pos) and split(neg)):
            raise ValueError(f"bad label definition {text!r}; expected NAME=POS[,POS...]:NEG[,NEG...]")
        if set(split(pos)) & set(split(neg)):
            raise ValueError(f"label definition {text!r} puts a value on both sides")
        return cls(name.strip(), split(pos), split(neg))


# Davidson et al. (2017), `class`: 0 hate speech, 1 offensive language, 2 neither (majority of >= 3 coders).
DAVIDSON_DEFINITIONS = (
    LabelDefinition("hate_or_offensive", ("0", "1"), ("2",)),  # any abuse vs neither, all rows
    LabelDefinition("hate", ("0",), ("2",)),  # hate speech vs neither; offensive-only rows left out
)


def read_labelled(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str], str]:
    """Texts, (string) labels and the file's SHA-256, from a .csv/.tsv or .jsonl file; a missing column is named
    with the columns present."""
    import hashlib

    import pandas as pd

    from pocketlm.data.text import count_utf8_lines, first_line

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labelled set {path} does not exist")
    if path.suffix not in (".jsonl", ".csv", ".tsv"):
        raise ValueError(f"{path}: a labelled set is a .csv, .tsv or .jsonl file")
    if count_utf8_lines(path) <= (path.suffix != ".jsonl"):  # not UTF-8: the line and byte
        raise ValueError(f"{path} holds no rows")
    try:
        if path.suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except ValueError as e:  # pandas' parser errors (a ragged row, bad JSON) say where, but not which file
        raise ValueError(f"could not read {path}: {first_line(e)}") from None
    for col in (text_column, label_column):
        if col not in frame.columns:
            raise ValueError(f"{path} has no column {col!r}; its columns are: {[str(c) for c in frame.columns]}")
    return (frame[text_column].astype(str).tolist(), frame[label_column].astype(str).str.strip().tolist(),
            hashlib.sha256(path.read_bytes()).hexdigest())


def auc_mann_whitney(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC as the Mann-Whitney U statistic, vectorised over ``axis`` (ties count one half).

    AUC = (Σ ranks of positives − n_pos (n_pos + 1) / 2) / (n_pos · n_neg), with average ranks for ties — the same
    number as ``roc_auc_score`` (tested), but computable for a thousand bootstrap resamples at once.
    """
    pos, neg = np.moveaxis(np.asarray(pos), axis, -1), np.moveaxis(np.asarray(neg), axis, -1)
    n_pos, n_neg = pos.shape[-1], neg.shape[-1]
    ranks = sps.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)  # [..., n_pos + n_neg]
    return (ranks[..., :n_pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auc_ci(pos: np.ndarray, neg: np.ndarray, *, seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES,
           confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Stratified bootstrap interval of the AUC: positives and negatives resampled separately (as pROC does), so
    every resample keeps both classes. Percentile method, seeded, through ``scipy.stats.bootstrap``."""
    res = sps.bootstrap((pos, neg), auc_mann_whitney, paired=False, vectorized=True, n_resamples=n_resamples,
                        confidence_level=confidence, method="percentile", batch=100,
                        random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def parse_definitions(definitions: Sequence[str]) -> list[LabelDefinition]:
    """``NAME=POS,...:NEG,...`` texts as definitions; none: Davidson et al.'s two."""
    return [LabelDefinition.parse(d) for d in definitions] or list(DAVIDSON_DEFINITIONS)


def check_definitions(labels: Sequence[str], definitions: Sequence[LabelDefinition], *,
                      fix: str = "the definitions or the label column") -> None:
    """Each definition has at least 2 positive and 2 negative items among ``labels`` (an AUC and its stratified
    interval need both classes); else a ValueError naming the definition, its counts, the label values present
    and ``fix`` (what to change: the CLI's options or the config's fields)."""
    labels = np.asarray(labels, dtype=str)
    for d in definitions:
        n_pos, n_neg = int(np.isin(labels, d.positive).sum()), int(np.isin(labels, d.negative).sum())
        if min(n_pos, n_neg) < 2:
            raise ValueError(f"definition {d.name!r} needs at least 2 positive and 2 negative items, got "
                             f"{n_pos} and {n_neg} (label values present: {sorted(set(labels.tolist()))[:20]}); "
                             f"check {fix}")


def scorer_check(scores: np.ndarray, labels: Sequence[str], definitions: Sequence[LabelDefinition], *,
                 seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES) -> tuple[list[Metric], dict]:
    """ROC AUC and accuracy at 0.5 of ``scores`` against each definition of toxic; (metrics, details)."""
    from sklearn.metrics import roc_auc_score

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=str)
    check_definitions(labels, definitions)
    metrics, details = [], {}
    for d in definitions:
        is_pos, is_neg = np.isin(labels, d.positive), np.isin(labels, d.negative)
        n_pos, n_neg = int(is_pos.sum()), int(is_neg.sum())
        keep = is_pos | is_neg
        y, s = is_pos[keep].astype(int), scores[keep]
        auc = float(roc_auc_score(y, s))
        correct = ((s >= THRESHOLD).astype(int) == y).astype(np.float64)
        metrics += [
            Metric("roc_auc", auc, n_pos + n_neg, auc_ci(s[y == 1], s[y == 0], seed=seed, n_resamples=n_resamples),
                   True, d.name),
            Metric("accuracy@0.5", float(correct.mean()), n_pos + n_neg,
                   mean_ci(correct, seed=seed, n_resamples=n_resamples), True, d.name),
        ]
        details[d.name] = {"positive": list(d.positive), "negative": list(d.negative), "n_positive": n_pos,
                           "n_negative": n_neg, "mean_score_positive": float(s[y == 1].mean()),
                           "mean_score_negative": float(s[y == 0].mean())}
    return metrics, details


def seeded_subset(n_items: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of ``limit`` items (all items, in order, when limit is None)."""
    if limit is None or limit >= n_items:
        return np.arange(n_items)
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n_items, size=limit, replace=False))



def scorer_check_results(
    data: str | Path,
    *,
    scorer: str = "profanity",
    toxic_label: str | None = None,
    text_column: str = "tweet",
    label_column: str = "class",
    definitions: Sequence[str] = (),
    limit: int | None = None,
    seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES,
) -> Results:
    """`pocketlm audit scorer-check`: the scorer's ROC AUC and accuracy at 0.5 on a labelled set (a seeded subset
    of ``limit`` rows), per positive-class definition (``NAME=POS,...:NEG,...``; default Davidson et al.'s)
    → ``Results(kind="scorer_check")``; ``n_resamples`` bootstrap resamples per interval."""
    t0 = time.perf_counter()
    defs = parse_definitions(definitions)
    texts, labels, sha = read_labelled(data, text_column, label_column)
    idx = seeded_subset(len(texts), limit, seed)
    texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    sc = build_scorer(scorer, label=toxic_label)
    metrics, details = scorer_check(sc(texts), labels, defs, seed=seed, n_resamples=n_resamples)
    return Results(
        kind="scorer_check", model={"spec": scorer, **sc.describe()},
        data={"source": str(data), "hash": sha, "n": len(texts), "limit": limit,
              "selection": "all rows" if limit is None else f"seeded random subset (seed {seed})"},
        settings={"text_column": text_column, "label_column": label_column, "threshold": 0.5, "seed": seed,
                  "definitions": [{"name": d.name, "positive": list(d.positive), "negative": list(d.negative)}
                                  for d in defs],
                  "ci": "95% percentile bootstrap; AUC stratified by class (scipy.stats.bootstrap)"},
        metrics=metrics, details={"definitions": details}, provenance=provenance(),
        wall_time_s=time.perf_counter() - t0,
    )
