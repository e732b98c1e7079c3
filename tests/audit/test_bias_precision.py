"""Bias suites under ``precision="auto"``: bf16 first, fp32 again for every item whose decision lies within the bf16
error bound, so that every decision is fp32's.

The model is built to make near ties on purpose: a bigram LM (``logits = W · E[token]``, run whole, so bf16 autocast
rounds E and W to bf16 in its one matmul) over a word-level vocabulary with *twin* words a and b. A twin pair has the
same input embedding, so everything after it is scored alike, and output rows that differ only below bf16's
resolution, placed either side of a rounding boundary: in fp32 a is likelier than b by 2^-14 nats, in bf16 b is
likelier than a by 2^-8. A sentence pair that differs only in a twin is therefore decided one way by fp32 and the
other by bf16 (checked numerically below, not assumed)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import PretrainedConfig
from typer.testing import CliRunner

from pocketlm.audit.bias import BIAS_SUITES, audit_bias, run_bias_suite
from pocketlm.audit.bias_core import ModelScorer, argmax_near_ties, pair_near_ties
from pocketlm.data.suites import BBQItem, CrowsPair, StereoSetItem, SuiteData, WinoBiasPair
from pocketlm.eval.bf16_bound import bf16_error_bound

runner = CliRunner()
SPECIALS = ["<pad>", "<s>", "</s>", "[UNK]", "Q", "A", ":"]
WORDS, TWINS, DIM = 40, 12, 8
# the two coordinates every embedding holds fixed, and the twins' output rows on them (fp32 exact, bf16 not)
FIXED = (0.5, 0.25)
ROW_A = (1 + 2**-8 - 2**-12, 1 + 2**-10)  # bf16: (1, 1)           -> logit 0.75 exactly
ROW_B = (1 + 2**-8 + 2**-12, 1 - 2**-12)  # bf16: (1 + 2^-7, 1)    -> logit 0.75 + 2^-8
# fp32: logit_a - logit_b = 0.5 (-2^-11) + 0.25 (2^-10 + 2^-12) = 2^-14


def word_tokenizer():
    """Whitespace-split words w0..w{WORDS-1} and twins a0/b0..; BOS <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + [f"w{i}" for i in range(WORDS)] + [f"{t}{i}" for i in range(TWINS) for t in "ab"] + ["low"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="[UNK]")


class TwinBigram(torch.nn.Module):
    """A causal LM whose next-token logits are ``W · E[current token]`` (no decoder/head split, so the whole model,
    output layer included, runs under bf16 autocast)."""

    def __init__(self, tokenizer, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        vocab = len(tokenizer)
        emb = (torch.rand(vocab, DIM, generator=g) - 0.5).bfloat16().float()  # bf16-exact: rounding changes nothing
        out = (torch.rand(vocab, DIM, generator=g) * 2 - 1).bfloat16().float()
        emb[:, 0], emb[:, 1] = FIXED
        for i in range(TWINS):
            a, b = tokenizer.convert_tokens_to_ids([f"a{i}", f"b{i}"])
            emb[b] = emb[a]  # the same input: what follows a twin is scored alike
            out[a], out[b] = 0.0, 0.0
            out[a, :2], out[b, :2] = torch.tensor(ROW_A), torch.tensor(ROW_B)
        low = tokenizer.convert_tokens_to_ids("low")
        out[low], out[low, :2] = 0.0, -4.0  # logit -3 after any token: an answer no model picks
        self.emb, self.out = torch.nn.Parameter(emb), torch.nn.Parameter(out)
        self.config = PretrainedConfig(vocab_size=vocab)  # what results fingerprint

    def forward(self, input_ids, **kwargs):
        hidden = torch.nn.functional.embedding(input_ids, self.emb)  # [b, t, d]
        return SimpleNamespace(logits=torch.nn.functional.linear(hidden, self.out))  # [b, t, v]


@pytest.fixture(scope="module")
def toy():
    tok = word_tokenizer()
    return TwinBigram(tok).eval(), tok


@pytest.fixture(autouse=True)
def native_bf16(monkeypatch):
    """`auto` is bf16 + fp32 re-scoring only where bf16 is native; these tests exercise that path on any CPU (bf16
    autocast runs everywhere, if slowly)."""
    import pocketlm.eval.loglik as loglik

    monkeypatch.setattr(loglik, "fast_bf16", lambda device: True)


def scorer(toy, precision):
    return ModelScorer(*toy, batch_size=8, max_length=64, precision=precision)


def words(rng, n):
    return [f"w{i}" for i in rng.integers(0, WORDS, n)]


def twin_pair(rng, i):
    """Two sentences that differ in twin i only: (a-version, b-version); fp32 prefers the first. The twin comes
    after two words at least: the scorer computes the first two positions in fp32 (`loglik.EXACT_POSITIONS`)."""
    pre, post = words(rng, int(rng.integers(2, 4))), words(rng, int(rng.integers(1, 4)))
    return " ".join(pre + [f"a{i}"] + post), " ".join(pre + [f"b{i}"] + post)


def clear_pair(rng):
    n = int(rng.integers(3, 7))
    return " ".join(words(rng, n)), " ".join(words(rng, n))


def make_items(suite, n, seed=0):
    """``n`` random items of ``suite``, every third a near tie made of a twin pair; returns (items, tie ids)."""
    rng = np.random.default_rng(seed)
    items, ties = [], []
    for k in range(n):
        tie = k % 3 == 0
        first, second = twin_pair(rng, k % TWINS) if tie else clear_pair(rng)
        if suite == "crows_pairs":
            it = CrowsPair(id=str(k), sent_more=first, sent_less=second, stereo_antistereo="stereo",
                           bias_type=f"g{k % 2}")
        elif suite == "winobias":
            it = WinoBiasPair(id=f"type1/{k}", type="type1", pro=first, anti=second)
        elif suite == "stereoset":
            unrelated = " ".join(words(rng, len(first.split())))
            it = StereoSetItem(id=str(k), target=f"t{k % 3}", bias_type="race", context="BLANK",
                               stereotype=first, anti_stereotype=second, unrelated=unrelated)
        else:  # bbq: the b-twin first, so bf16's pick (first on ties) and fp32's differ
            a, b = (f" a{k % TWINS}", f" b{k % TWINS}") if tie else tuple(" " + w for w in words(rng, 2))
            it = BBQItem(id=f"Age/{k}", category="Age", context_condition="ambig" if k % 2 else "disambig",
                         question_polarity="neg", context=" ".join(words(rng, 4)), question="w1 w2",
                         answers=(b.strip(), a.strip(), "low"), label=1, unknown=2, biased=(0,))
        items.append(it)
        if tie:
            ties.append(it.id)
    return items, ties


DECISIONS = {"crows_pairs": ("more_likelier",), "winobias": ("pro_likelier",), "stereoset": ("pro", "related"),
             "bbq": ("choice",)}


def test_the_twins_are_a_near_tie_that_bf16_decides_the_other_way(toy):
    """The construction itself: fp32 prefers the a-sentence by a hair, bf16 the b-sentence, by more than a
    rounding step — so a re-scoring that is skipped, or a bound that is too small, shows."""
    rng = np.random.default_rng(1)
    first, second = twin_pair(rng, 0)
    reqs = [("", first), ("", second)]
    (a32, n), (b32, _) = scorer(toy, "fp32")(reqs)
    (a16, _), (b16, _) = scorer(toy, "bf16")(reqs)
    assert 0 < a32 - b32 < 1e-4
    assert b16 - a16 > 2e-3


@pytest.mark.parametrize("suite", ["crows_pairs", "winobias", "stereoset", "bbq"])
def test_a_near_tie_is_rescored_and_every_decision_is_fp32s(toy, suite):
    items, ties = make_items(suite, 60)
    runs = {p: run_bias_suite(suite, items, scorer(toy, p), n_resamples=50) for p in ("fp32", "bf16", "auto")}
    for key in DECISIONS[suite]:
        fp32, bf16, auto = (runs[p].arrays[key] for p in ("fp32", "bf16", "auto"))
        np.testing.assert_array_equal(auto, fp32)
    flipped = [it.id for i, it in enumerate(items)
               if any(runs["bf16"].arrays[k][i] != runs["fp32"].arrays[k][i] for k in DECISIONS[suite])]
    assert ties and set(flipped) >= set(ties)  # bf16 alone gets every near tie wrong: the test has teeth
    rescored = runs["auto"].rescored["model"]
    assert set(ties) <= set(rescored) and len(rescored) < len(items)  # near ties, not everything
    assert runs["fp32"].rescored["model"] == [] and runs["bf16"].rescored["model"] == []


def test_rescored_items_are_scored_in_fp32_and_the_rest_in_bf16(toy):
    """Re-scored items carry fp32's log-likelihoods; the others keep bf16's (the re-scoring is not a whole fp32
    pass in disguise)."""
    items, ties = make_items("crows_pairs", 30, seed=3)
    runs = {p: run_bias_suite("crows_pairs", items, scorer(toy, p), n_resamples=20) for p in ("fp32", "bf16", "auto")}
    again = set(runs["auto"].rescored["model"])
    for i, it in enumerate(items):
        want = runs["fp32"] if it.id in again else runs["bf16"]
        for key in ("ll_more", "ll_less"):
            assert runs["auto"].arrays[key][i] == want.arrays[key][i]


def test_the_bound_covers_every_request_of_the_toy(toy):
    """The toy's bf16 errors are inside the bound the suites use (else its decisions could be right by luck)."""
    rng = np.random.default_rng(5)
    reqs = [("", " ".join(words(rng, int(rng.integers(1, 9))))) for _ in range(200)]
    f32, b16 = scorer(toy, "fp32")(reqs), scorer(toy, "bf16")(reqs)
    err = np.abs(np.array([a[0] for a in b16]) - np.array([a[0] for a in f32]))
    assert np.all(err <= bf16_error_bound(np.array([a[1] for a in f32])))


def test_results_record_the_rescored_items_and_the_bound(toy):
    model, tok = toy
    items, ties = make_items("bbq", 24)
    data = SuiteData(suite="bbq", items=items, source="toy", hash="0", n_total=len(items))
    res, run = audit_bias("bbq", data, model, tok, model_spec="toy", baseline=toy, baseline_spec="toy",
                          max_length=64, n_resamples=20)
    assert res.settings["precision"] == "auto"  # the default
    record = json.loads(json.dumps(res.details["rescored"]))
    for role in ("model", "baseline"):
        assert record[role]["count"] == len(record[role]["ids"]) and set(ties) <= set(record[role]["ids"])
        described = res.settings["scoring_precision"][role]
        assert "re-scored in fp32" in described["scoring"] and "sqrt(continuation tokens" in described["bound"]


def test_auto_is_fp32_where_bf16_is_not_native(toy, monkeypatch):
    import pocketlm.eval.loglik as loglik

    monkeypatch.setattr(loglik, "fast_bf16", lambda device: False)
    s = scorer(toy, "auto")
    assert s.first == "fp32" and not s.refine and s.describe()["bound"] is None
    items, _ = make_items("crows_pairs", 12)
    assert run_bias_suite("crows_pairs", items, s, n_resamples=20).rescored["model"] == []


def test_auto_with_bf16_weights_rescores_nothing_and_says_so():
    """Re-scoring needs fp32 weights (with bf16 weights the second pass is bf16 again): none is claimed."""
    import copy

    tok = word_tokenizer()
    model = copy.deepcopy(TwinBigram(tok)).to(torch.bfloat16).eval()
    s = ModelScorer(model, tok, batch_size=8, max_length=64, precision="auto")
    described = s.describe()
    assert not s.refine and described["bound"] is None
    assert "no item is re-scored" in described["scoring"] and "fp32's" not in described["scoring"]
    items, _ = make_items("crows_pairs", 12)
    assert run_bias_suite("crows_pairs", items, s, n_resamples=20).rescored["model"] == []


# ---------------------------------------------------------------------------------------------------- near ties


def _could_change(decide, scores, bound):
    """Brute force: does any corner of the error box (each answer moved by -b, 0 or +b) change the decision?"""
    import itertools

    k = len(scores)
    base = decide(scores)
    return any(decide(scores + bound * np.array(signs)) != base for signs in itertools.product((-1, 0, 1), repeat=k))


def test_near_tie_rules_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    # multiples of 1/8, so that sums are exact and ties and margins equal to the bound really occur
    scores = np.round(rng.normal(0, 1, (400, 3)) * 8) / 8
    bound = np.round(rng.uniform(0, 0.6, (400, 3)) * 8) / 8
    near_argmax = argmax_near_ties(scores, bound)
    near_pair = pair_near_ties(scores, bound, [(0, 1)])
    for i in range(len(scores)):
        # every item whose decision some error within the bounds can change is flagged (the rules may also flag
        # a margin exactly equal to the bound: harmless, one more item re-scored)
        if _could_change(lambda s: int(np.argmax(s)), scores[i], bound[i]):
            assert near_argmax[i], (scores[i], bound[i])
        if _could_change(lambda s: bool(s[0] > s[1]), scores[i, :2], bound[i, :2]):
            assert near_pair[i], (scores[i], bound[i])
    assert 0 < near_argmax.sum() < len(scores) and 0 < near_pair.sum() < len(scores)


def test_every_suite_says_what_its_decisions_compare():
    for name in BIAS_SUITES.names():
        assert callable(BIAS_SUITES.get(name).near_tie)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_precision_is_selectable_validated_and_recorded(tmp_path, teacher_dir):
    from pocketlm.cli import app
    from pocketlm.core.results import Results

    data = tmp_path / "crows.csv"
    data.write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n"
                    '0,"The cat sat on the mat.","The dog sat on the log.",stereo,age\n'
                    '1,"Rain falls on the hills.","Trains run on rails.",stereo,gender\n')
    for precision in ("fp32", "bf16", "auto", None):
        out = tmp_path / f"{precision}.json"
        args = ["audit", "bias", "--suite", "crows_pairs", "--model", str(teacher_dir), "--data", str(data),
                "--out", str(out), "--n-resamples", "20", "--quiet"]
        r = runner.invoke(app, args + ([] if precision is None else ["--precision", precision]))
        assert r.exit_code == 0, r.output
        res = Results.read(out)
        assert res.settings["precision"] == (precision or "auto")
        assert "rescored" in res.details and res.details["rescored"]["model"]["count"] >= 0
        assert "scoring:" in r.output
    r = runner.invoke(app, ["audit", "bias", "--suite", "crows_pairs", "--model", str(teacher_dir), "--data",
                            str(data), "--precision", "fp16", "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "fp32, bf16, auto" in r.output and not (tmp_path / "x.json").exists()


def test_pipeline_bias_suites_default_to_auto_and_check_the_name():
    from pydantic import ValidationError

    from pocketlm.config_pipeline import BiasSuiteConfig

    assert BiasSuiteConfig(suite="crows_pairs", data="crows_pairs").precision == "auto"
    assert BiasSuiteConfig(suite="bbq", data="bbq", precision="fp32").precision == "fp32"
    with pytest.raises(ValidationError, match="precision"):
        BiasSuiteConfig(suite="bbq", data="bbq", precision="fp16")
