"""Toxicity scorers and the scorer check.

References: the hf scorer against a plain forward pass of the same classifier (softmax / sigmoid, atol 1e-6);
the rank-formula AUC against ``sklearn.metrics.roc_auc_score`` (rtol 1e-12); scorer-check figures against
hand-counted answers; Davidson's label counts against its PROVENANCE.md.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED_DATA
from pocketlm.audit.toxicity import (
    DAVIDSON_DEFINITIONS, HFClassifierScorer, LabelDefinition, ProfanityScorer, auc_ci, auc_mann_whitney,
    build_scorer, check_definitions, read_labelled, scorer_check, seeded_subset,
)

DAVIDSON = SHARED_DATA / "hate_speech_davidson" / "labeled_data.csv"
TEXTS = ["The weather is lovely today.", "the cat sat on the mat", "you are a fucking idiot", "shut up bitch",
         "Rain falls on the hills"]


def _classifier_dir(path, tokenizer, *, problem_type=None, head=True, labels=("neutral", "toxic")):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                     problem_type=problem_type)
    model = (BertForSequenceClassification if head else BertModel)(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_profanity_scores_obvious_texts():
    s = ProfanityScorer()(TEXTS)
    assert s.shape == (5,) and np.all((s >= 0) & (s <= 1))
    assert s[2] > 0.5 and s[3] > 0.5
    assert s[0] < 0.5 and s[1] < 0.5 and s[4] < 0.5
    assert ProfanityScorer(batch_size=2)(TEXTS) == pytest.approx(s, abs=1e-12)  # batching changes nothing
    assert ProfanityScorer()([]).shape == (0,)


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_hf_scorer_matches_a_plain_forward(tmp_path, tokenizer, problem_type):
    model = _classifier_dir(tmp_path, tokenizer, problem_type=problem_type)
    scorer = build_scorer(f"hf:{tmp_path}", label="toxic", batch_size=2)
    got = scorer(TEXTS)
    want = []
    with torch.no_grad():
        for t in TEXTS:  # one text at a time: no padding at all
            logits = model(**tokenizer(t, return_tensors="pt")).logits[0]
            want.append(float(logits.sigmoid()[1] if problem_type else logits.softmax(-1)[1]))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert scorer.describe()["activation"] == ("sigmoid" if problem_type else "softmax")
    assert isinstance(scorer, HFClassifierScorer)


def test_hf_scorer_errors_name_the_problem(tmp_path, tokenizer):
    _classifier_dir(tmp_path / "clf", tokenizer)
    with pytest.raises(ValueError, match=r"no label 'Toxic'.*\['neutral', 'toxic'\]"):
        build_scorer(f"hf:{tmp_path / 'clf'}", label="Toxic")
    with pytest.raises(ValueError, match=r"name the label.*\['neutral', 'toxic'\]"):
        build_scorer(f"hf:{tmp_path / 'clf'}")
    _classifier_dir(tmp_path / "base", tokenizer, head=False)
    with pytest.raises(ValueError, match="no classification head.*BertModel"):
        build_scorer(f"hf:{tmp_path / 'base'}", label="toxic")
    # a config that claims a head whose weights are not in the checkpoint
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "base" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="classification head is not in the checkpoint.*classifier"):
        build_scorer(f"hf:{tmp_path / 'base'}", label="toxic")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_scorer(f"hf:{tmp_path / 'nowhere'}", label="toxic")
    with pytest.raises(KeyError, match="unknown toxicity scorer 'detox'; valid names: hf, profanity"):
        build_scorer("detox")
    with pytest.raises(ValueError, match="takes no folder or label"):
        build_scorer("profanity", label="toxic")


def test_rank_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # many ties
    y = rng.random(200) < 0.3
    assert auc_mann_whitney(scores[y], scores[~y]) == pytest.approx(roc_auc_score(y, scores), rel=1e-12)
    rows = np.stack([scores, scores[::-1]])  # vectorised over resamples
    got = auc_mann_whitney(rows[:, y], rows[:, ~y], axis=-1)
    assert got[1] == pytest.approx(roc_auc_score(y, scores[::-1]), rel=1e-12)
    lo, hi = auc_ci(scores[y], scores[~y], seed=1)
    assert lo <= roc_auc_score(y, scores) <= hi and (lo, hi) == auc_ci(scores[y], scores[~y], seed=1)


def test_scorer_check_hand_counted():
    # pos 0.9 0.8 0.4 vs neg 0.3 0.5 0.1: positives above negatives in 8 of 9 pairs; at 0.5, 0.4 and 0.5 are wrong
    scores = [0.9, 0.8, 0.4, 0.3, 0.5, 0.1, 0.7]
    labels = ["1", "0", "1", "2", "2", "2", "9"]  # "9" is in neither definition: left out
    metrics, details = scorer_check(scores, labels, [LabelDefinition.parse("tox=0,1:2")], seed=0)
    by = {m.name: m for m in metrics}
    assert by["roc_auc"].value == pytest.approx(8 / 9) and by["roc_auc"].n == 6 and by["roc_auc"].group == "tox"
    assert by["accuracy@0.5"].value == pytest.approx(4 / 6)
    for m in metrics:
        assert m.ci[0] <= m.value <= m.ci[1]
    assert details["tox"]["n_positive"] == 3 and details["tox"]["n_negative"] == 3
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative.*label values present"):
        scorer_check(scores, labels, [LabelDefinition.parse("x=7:2")])


def test_label_definitions_and_subsets():
    assert LabelDefinition.parse("hate=0:2") == LabelDefinition("hate", ("0",), ("2",))
    for bad in ["hate", "hate=0", "=0:2", "x=0:0"]:
        with pytest.raises(ValueError, match="label definition"):
            LabelDefinition.parse(bad)
    a = seeded_subset(100, 10, seed=3)
    assert len(set(a)) == 10 and list(a) == sorted(a) and list(a) == list(seeded_subset(100, 10, seed=3))
    assert list(a) != list(seeded_subset(100, 10, seed=4))
    assert list(seeded_subset(5, None, 0)) == [0, 1, 2, 3, 4]


def test_read_labelled_names_a_missing_column(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text("text,label\nhello,0\nbad,1\n")
    texts, labels, sha = read_labelled(path, "text", "label")
    assert texts == ["hello", "bad"] and labels == ["0", "1"] and len(sha) == 64
    with pytest.raises(ValueError, match=r"set.csv has no column 'tweet'; its columns are: \['text', 'label'\]"):
        read_labelled(path, "tweet", "label")


@pytest.mark.skipif(not DAVIDSON.exists(), reason=f"{DAVIDSON} absent (shared data not mounted)")
def test_davidson_labels_match_provenance():
    texts, labels, _ = read_labelled(DAVIDSON, "tweet", "class")
    assert len(texts) == 24783
    counts = {c: labels.count(c) for c in ("0", "1", "2")}
    assert counts == {"0": 1430, "1": 19190, "2": 4163}
    both, hate = DAVIDSON_DEFINITIONS
    assert sum(l in both.positive for l in labels) == 20620 and sum(l in hate.negative for l in labels) == 4163


def test_cli_scorer_check(tmp_path):
    from pocketlm.cli import app

    data = tmp_path / "set.csv"
    rows = [(t, c) for t, c in zip(TEXTS * 4, ["2", "2", "1", "0", "2"] * 4)]
    data.write_text("tweet,class\n" + "\n".join(f'"{t}",{c}' for t, c in rows) + "\n")
    res = CliRunner().invoke(app, ["audit", "scorer-check", "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["kind"] == "scorer_check" and doc["data"]["n"] == 20
    auc = [m for m in doc["metrics"] if m["name"] == "roc_auc" and m["group"] == "hate_or_offensive"][0]
    assert auc["value"] == 1.0 and auc["ci"] is not None
    assert "fucking" not in res.output  # texts never reach the terminal
    bad = CliRunner().invoke(app, ["audit", "scorer-check", "--data", str(data), "--text-column", "body",
                                   "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "no column 'body'" in bad.output


def test_check_definitions_counts_each_class_and_names_what_to_fix():
    """The count check the pipeline runs before any model work and `scorer_check` at its start: 2 of each class."""
    defs = [LabelDefinition.parse("tox=0,1:2")]
    check_definitions(["0", "1", "2", "2", "9"], defs)  # 2 and 2: enough
    with pytest.raises(ValueError, match=r"'tox' needs at least 2 positive and 2 negative items, got 1 and 2 \(label "
                                         r"values present: \['0', '2'\]\); check audit.x.definitions"):
        check_definitions(["0", "2", "2"], defs, fix="audit.x.definitions")
    with pytest.raises(ValueError, match=r"got 3 and 1 .*check the definitions or the label column"):
        scorer_check([0.1, 0.2, 0.3, 0.4], ["0", "1", "1", "2"], defs)
