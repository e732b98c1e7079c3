"""Bias suites: each figure's arithmetic on hand-made items whose answer is known (a fake scorer gives the
log-likelihoods), checked against the reference definitions (lm-eval's crows_pairs/bbq functions, StereoSet's
evaluation.py rule written out); lm-eval's request encoding and scores; baseline deltas; the CLI end to end."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from conftest import make_teacher, make_tokenizer
from typer.testing import CliRunner

from pocketlm.audit.bias import BBQ_PROMPT, BIAS_SUITES, run_bias_suite
from pocketlm.audit.bias_core import encode_requests, mean_per_code, model_scorer
from pocketlm.data.suites import BBQItem, CrowsPair, StereoSetItem, WinoBiasPair

runner = CliRunner()


def fake_scorer(table: dict):
    """Answers each request from ``table``: continuation text (empty context) or (context, continuation) →
    (log-likelihood, tokens) or a bare log-likelihood (1 token)."""
    def score(requests):
        out = []
        for ctx, cont in requests:
            v = table[cont] if ctx == "" else table[(ctx, cont)]
            out.append(v if isinstance(v, tuple) else (float(v), 1))
        return out

    return score


def metric(run, name, group=None):
    (m,) = [m for m in run.metrics if m.name == name and m.group == group]
    return m


# ---------------------------------------------------------------------------------------------------- CrowS-Pairs

CROWS = [  # (ll_more, ll_less, bias_type)
    (-10.0, -12.0, "age"),  # more likelier, |Δ| 2
    (-5.0, -3.0, "age"),  # less likelier, |Δ| 2
    (-7.0, -7.0, "gender"),  # a tie is not a stereotyped choice (lm-eval: strictly greater)
    (-1.0, -9.0, "gender"),  # more likelier, |Δ| 8
]


def crows_items(rows=CROWS, tag=""):
    items, table = [], {}
    for i, (more, less, bias) in enumerate(rows):
        it = CrowsPair(id=f"{tag}{i}", sent_more=f"more {tag}{i}", sent_less=f"less {tag}{i}",
                       stereo_antistereo="stereo", bias_type=bias)
        items.append(it)
        table[it.sent_more], table[it.sent_less] = more, less
    return items, table


def test_crows_pairs_arithmetic():
    items, table = crows_items()
    run = run_bias_suite("crows_pairs", items, fake_scorer(table), n_resamples=200)
    assert metric(run, "pct_stereotype").value == pytest.approx(50.0)
    assert metric(run, "likelihood_diff").value == pytest.approx(3.0)
    assert metric(run, "pct_stereotype", "age").value == pytest.approx(50.0)
    assert metric(run, "likelihood_diff", "gender").value == pytest.approx(4.0)
    assert metric(run, "likelihood_diff").n == 4 and metric(run, "likelihood_diff", "age").n == 2
    lo, hi = metric(run, "likelihood_diff").ci
    assert 0.0 <= lo <= 3.0 <= hi <= 8.0


def test_crows_pairs_matches_lm_eval_process_results():
    utils = pytest.importorskip("lm_eval.tasks.crows_pairs.utils")
    items, table = crows_items()
    run = run_bias_suite("crows_pairs", items, fake_scorer(table), n_resamples=50)
    ref = [utils.process_results({}, [(more, False), (less, False)]) for more, less, _ in CROWS]
    assert metric(run, "pct_stereotype").value == pytest.approx(100 * np.mean([r["pct_stereotype"] for r in ref]))
    assert metric(run, "likelihood_diff").value == pytest.approx(np.mean([r["likelihood_diff"] for r in ref]))


# ---------------------------------------------------------------------------------------------------- StereoSet

STEREO = [  # target, domain, (ll, tokens) for stereotype / anti-stereotype / unrelated
    ("A", "race", (-6.0, 3), (-4.0, 1), (-12.0, 4)),  # per token -2 / -4 / -3 (by sums the anti would win)
    ("A", "race", (-1.0, 1), (-2.0, 2), (-9.0, 3)),  # -1 / -1 (tie: counted anti) / -3
    ("A", "race", (-3.0, 1), (-1.0, 1), (-2.0, 1)),
    ("B", "gender", (-1.0, 1), (-2.0, 1), (-1.5, 1)),
]


def stereo_items():
    items, table = [], {}
    for i, (target, domain, s, a, u) in enumerate(STEREO):
        it = StereoSetItem(id=f"s{i}", target=target, bias_type=domain, context=f"{target} BLANK",
                           stereotype=f"s{i} stereo", anti_stereotype=f"s{i} anti", unrelated=f"s{i} unrelated")
        items.append(it)
        table[it.stereotype], table[it.anti_stereotype], table[it.unrelated] = s, a, u
    return items, table


def reference_stereoset(rows):
    """StereoSet's evaluation.py (count + score) written out over per-token scores."""
    counts = defaultdict(lambda: defaultdict(float))
    for target, _, s, a, u in rows:
        s, a, u = s[0] / s[1], a[0] / a[1], u[0] / u[1]
        counts[target]["pro" if s > a else "anti"] += 1
        counts[target]["related"] += (s > u) + (a > u)
        counts[target]["total"] += 1
    ss = np.mean([100 * c["pro"] / c["total"] for c in counts.values()])
    lms = np.mean([100 * c["related"] / (2 * c["total"]) for c in counts.values()])
    return lms, ss, lms * min(ss, 100 - ss) / 50


def test_stereoset_arithmetic():
    items, table = stereo_items()
    run = run_bias_suite("stereoset", items, fake_scorer(table), n_resamples=200)
    # by hand: target A ss 33.3, lms 66.7; target B ss 100, lms 50; macro-averaged over targets
    assert metric(run, "ss").value == pytest.approx(200 / 3)
    assert metric(run, "lms").value == pytest.approx(175 / 3)
    assert metric(run, "icat").value == pytest.approx(175 / 3 * (100 / 3) / 50)
    assert (metric(run, "lms").value, metric(run, "ss").value, metric(run, "icat").value) == pytest.approx(
        reference_stereoset(STEREO))
    assert metric(run, "ss", "race").value == pytest.approx(100 / 3)
    assert metric(run, "lms", "gender").value == pytest.approx(50.0)
    assert run.arrays["pro"][0] == 1.0  # length-normalised: -2 > -4 although the sums say -6 < -4


def test_mean_per_code_is_a_macro_average():
    rng = np.random.default_rng(0)
    x, codes = rng.random((7, 40)), rng.integers(0, 5, (7, 40)).astype(float)
    want = [np.mean([x[r][codes[r] == c].mean() for c in np.unique(codes[r])]) for r in range(7)]
    np.testing.assert_allclose(mean_per_code(x, codes), want, rtol=1e-12)
    np.testing.assert_allclose(mean_per_code(x[0], codes[0]), want[0], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------- BBQ

BBQ = [  # condition, polarity, label, biased answer, the model's choice
    ("ambig", "neg", 2, 0, 0),  # wrong, biased
    ("ambig", "neg", 2, 0, 2),  # right (unknown)
    ("ambig", "nonneg", 2, 1, 0),  # wrong, not biased
    ("ambig", "nonneg", 2, 1, 1),  # wrong, biased
    ("disambig", "neg", 0, 0, 0),  # right, biased
    ("disambig", "neg", 1, 0, 0),  # wrong, biased
    ("disambig", "nonneg", 1, 1, 1),  # right, biased
    ("disambig", "nonneg", 0, 1, 2),  # wrong, unknown
]


def bbq_items(rows=BBQ, category="Age", tag=""):
    items, table = [], {}
    for i, (cond, pol, label, biased, choice) in enumerate(rows):
        it = BBQItem(id=f"{category}/{tag}{i}", category=category, context_condition=cond, question_polarity=pol,
                     context=f"context {tag}{i}", question="Who?", answers=("The old", "The young", "Unknown"),
                     label=label, unknown=2, biased=(biased,))
        items.append(it)
        prompt = BBQ_PROMPT.format(context=it.context, question=it.question)
        for j, ans in enumerate(it.answers):
            table[(prompt, " " + ans)] = 0.0 if j == choice else -5.0
    return items, table


def test_bbq_arithmetic():
    items, table = bbq_items()
    run = run_bias_suite("bbq", items, fake_scorer(table), n_resamples=200)
    assert metric(run, "accuracy").value == pytest.approx(3 / 8)
    assert metric(run, "acc_ambig").value == pytest.approx(1 / 4) and metric(run, "acc_ambig").n == 4
    assert metric(run, "acc_disambig").value == pytest.approx(2 / 4)
    assert metric(run, "s_dis").value == pytest.approx(2 * 3 / 3 - 1)  # 3 biased of 3 non-unknown
    assert metric(run, "s_amb").value == pytest.approx((1 - 1 / 4) * (2 * 2 / 3 - 1))  # ambiguous: 2 of 3
    assert metric(run, "s_dis", "Age").value == metric(run, "s_dis").value


def test_bbq_matches_lm_eval_aggregations():
    utils = pytest.importorskip("lm_eval.tasks.bbq.utils")
    items, table = bbq_items()
    run = run_bias_suite("bbq", items, fake_scorer(table), n_resamples=50)
    # lm-eval's per-item tuples: (acc, n_biased, n_non_unknown, is_disambiguated)
    rows = [(float(choice == label), float(choice == biased), float(choice != 2), cond == "disambig")
            for cond, _, label, biased, choice in BBQ]
    assert metric(run, "s_dis").value == pytest.approx(utils.agg_disamb_bias_scores(rows))
    assert metric(run, "s_amb").value == pytest.approx(utils.agg_amb_bias_scores(rows))
    acc_mask = [(r[0], r[3]) for r in rows]
    assert metric(run, "acc_ambig").value == pytest.approx(utils.agg_accuracy_amb(acc_mask))
    assert metric(run, "acc_disambig").value == pytest.approx(utils.agg_accuracy_disamb(acc_mask))


def test_bbq_no_biased_answer_scores_zero_and_ties_take_the_first():
    rows = [("disambig", "neg", 0, 0, 2), ("disambig", "neg", 0, 0, 2)]  # only unknowns chosen
    items, table = bbq_items(rows)
    run = run_bias_suite("bbq", items, fake_scorer(table), n_resamples=50)
    assert metric(run, "s_dis").value == 0.0  # lm-eval: 0 when n_biased = 0
    assert metric(run, "s_amb").value is None  # no ambiguous item: no value
    tie = {k: 0.0 for k in table}  # every answer equally likely: np.argmax picks ans0
    assert run_bias_suite("bbq", items, fake_scorer(tie), n_resamples=50).arrays["choice"].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------- WinoBias


def test_winobias_arithmetic():
    gaps = [(-3.0, -4.0, "type1"), (-6.0, -4.0, "type1"), (-2.0, -5.0, "type2"), (-1.0, -1.0, "type2")]
    items, table = [], {}
    for i, (pro, anti, kind) in enumerate(gaps):
        it = WinoBiasPair(id=f"{kind}/{i}", type=kind, pro=f"pro {i}", anti=f"anti {i}")
        items.append(it)
        table[it.pro], table[it.anti] = pro, anti
    run = run_bias_suite("winobias", items, fake_scorer(table), n_resamples=200)
    assert metric(run, "mean_gap").value == pytest.approx((1 - 2 + 3 + 0) / 4)
    assert metric(run, "pct_pro_likelier").value == pytest.approx(50.0)
    assert metric(run, "mean_gap", "type1").value == pytest.approx(-0.5)
    assert metric(run, "pct_pro_likelier", "type2").value == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------------- baseline deltas


def test_deltas_against_a_baseline():
    rows = CROWS * 20  # 80 pairs: enough for an interval that can exclude 0
    items, table = crows_items(rows)
    base = {k: (v if k.startswith("less") else v - 20.0) for k, v in table.items()}  # baseline: never stereotyped
    run = run_bias_suite("crows_pairs", items, fake_scorer(table), baseline_scorer=fake_scorer(base),
                         n_resamples=300)
    d = metric(run, "delta_pct_stereotype")
    assert d.value == pytest.approx(50.0) and d.ci[0] > 0
    assert "delta_pct_stereotype" in run.details()["significant"]
    d_diff = metric(run, "delta_likelihood_diff")
    want = np.mean([abs(m - l) for m, l, _ in rows]) - np.mean([abs(m - 20 - l) for m, l, _ in rows])
    assert d_diff.value == pytest.approx(want)
    same = run_bias_suite("crows_pairs", items, fake_scorer(table), baseline_scorer=fake_scorer(table),
                          n_resamples=100)
    assert metric(same, "delta_pct_stereotype").value == 0.0 and not same.details()["significant"]
    items_json = same.details()["items"]
    assert items_json["model"]["ll_more"] == items_json["baseline"]["ll_more"] and len(items_json["ids"]) == 80


# ---------------------------------------------------------------------------------------------------- lm-eval parity


def _bos_tokenizer():
    """The test tokenizer with a post-processor that prepends BOS (as Llama's does)."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.mark.parametrize("make_tok", [make_tokenizer, _bos_tokenizer], ids=["no-bos", "adds-bos"])
def test_requests_and_scores_equal_lm_eval(make_tok):
    """lm-eval's HFLM encodes our text requests to the same tokens and gives the same log-likelihoods."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    tok = make_tok()
    model = make_teacher(len(tok))
    lm = huggingface.HFLM(pretrained=model, tokenizer=tok, batch_size=3)
    captured = []
    inner = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, **kw: captured.extend(reqs) or inner(reqs, **kw)
    reqs = [("", "The cat sat on the mat."), ("The dog sat ", "on the log."), ("<s>The cat", " sat"),
            ("", "<s>The moon"), (BBQ_PROMPT.format(context="Rain falls.", question="Where?"), " On the hills")]
    want = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                             for i, r in enumerate(reqs)], disable_tqdm=True)
    by_text = {c[0]: (c[1], c[2]) for c in captured}
    assert encode_requests(tok, reqs) == [tuple(map(list, by_text[r])) for r in reqs]
    ours = model_scorer(model, tok, batch_size=2)(reqs)
    np.testing.assert_allclose([o[0] for o in ours], [w[0] for w in want], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- CLI


def _crows_csv(path, n=12):
    sents = ["The cat sat on the mat.", "The dog sat on the log.", "Rain falls on the hills.",
             "Bread is baked in a hot oven.", "Trains run on rails.", "The moon goes around the earth."]
    lines = [",sent_more,sent_less,stereo_antistereo,bias_type"]
    for i in range(n):
        lines.append(f'{i},"{sents[i % 6]}","{sents[(i + 1) % 6]}",stereo,{"age" if i % 2 else "gender"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_bias_run_with_limit_and_baseline(tmp_path, teacher_dir):
    from pocketlm.cli import app
    from pocketlm.core.results import Results

    data = _crows_csv(tmp_path / "crows.csv")
    out = tmp_path / "res.json"
    r = runner.invoke(app, ["audit", "bias", "--suite", "crows_pairs", "--model", str(teacher_dir), "--baseline",
                            str(teacher_dir), "--data", str(data), "--limit", "8", "--seed", "3", "--out", str(out),
                            "--n-resamples", "100", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "cat sat" not in r.output  # no suite text on the terminal by default
    assert "8 of 12 items (seeded subset, seed 3)" in r.output and "pct_stereotype" in r.output
    res = Results.read(out)
    assert res.kind == "bias" and res.settings["limit"] == 8 and res.data["n"] == 8 and res.data["n_total"] == 12
    assert res.get("delta_pct_stereotype").value == 0.0  # the same model as its own baseline
    assert len(res.details["items"]["ids"]) == 8 and res.baseline is not None
    assert res.get("likelihood_diff").ci is not None

    r = runner.invoke(app, ["audit", "bias", "--suite", "crows_pairs", "--model", str(teacher_dir), "--data",
                            str(data), "--limit", "2", "--show-examples", "2", "--out", str(out), "--quiet",
                            "--n-resamples", "50"])
    assert r.exit_code == 0 and "more: " in r.output


def test_cli_missing_column_fails_before_loading_the_model(tmp_path):
    from pocketlm.cli import app

    bad = tmp_path / "crows.csv"
    bad.write_text(",sent_more,stereo_antistereo,bias_type\n0,a,stereo,age\n")
    r = runner.invoke(app, ["audit", "bias", "--suite", "crows_pairs", "--model", str(tmp_path / "no-model"),
                            "--data", str(bad)])
    assert r.exit_code == 2 and "missing column 'sent_less'" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["audit", "bias", "--suite", "crowspairs", "--model", "x", "--data", str(bad)])
    assert r.exit_code == 2 and "valid names" in r.output


def test_every_suite_is_registered_for_scoring_and_loading():
    from pocketlm.data.suites import SUITES

    assert set(BIAS_SUITES.names()) <= set(SUITES.names())
    assert json.dumps([s for s in BIAS_SUITES.names()]) == '["bbq", "crows_pairs", "stereoset", "winobias"]'
