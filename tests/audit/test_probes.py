"""Counterfactual probes: probe files (the shipped ones and bad ones), filling, log-likelihood against a plain
forward pass (atol 1e-4 nats), the permutation test against brute-force enumeration of every sign flip
(exact, 1e-12), Holm against a hand-worked example, and the CLI end to end."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import make_teacher
from pocketlm.audit.probes import (
    ProbeSet, by_template_and_group, compare_groups, encode_pair, fill, filling_logliks, holm, load_probes,
    paired_permutation_p, shipped_probes,
)

PROBE_DIR = Path(__file__).resolve().parents[2] / "src" / "pocketlm" / "audit" / "probes"


def test_every_shipped_probe_file_loads():
    files = sorted(PROBE_DIR.rglob("*.yaml"))
    assert shipped_probes() in files
    for f in files:
        sets = load_probes(f)
        for name, ps in sets.items():
            assert len(ps.templates) >= 12, f"{f}:{name}: 12 templates let Holm-corrected exact tests reach 0.05"
    shipped = load_probes()
    assert sorted(shipped) == ["age", "gender", "nationality", "religion"]
    assert list(load_probes(sets=["age"])) == ["age"]


def _write(tmp_path, sets):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "sets": sets}))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"templates": ["no slot here", "The {group} is"], "groups": {"a": ["x"], "b": ["y"]}}, "exactly once"),
    ({"templates": ["{group} and {group} are", "The {group} is"], "groups": {"a": ["x"], "b": ["y"]}},
     "exactly once"),
    ({"templates": ["The {group}", "The {group} is"], "groups": {"a": ["x"], "b": ["y"]}}, "words after"),
    ({"templates": ["The {group} is", "A {group} was"], "groups": {"a": ["x"]}}, "at least two groups"),
    ({"templates": ["The {group} is", "A {group} was"], "groups": {"a": ["x"], "b": ["x"]}}, "in both group"),
    ({"templates": ["The {group} is", "A {group} was"], "groups": {"a": ["x"], "b": ["y"]}, "colour": 1},
     "colour: Extra inputs"),
])
def test_bad_probe_files_name_the_problem(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        load_probes(_write(tmp_path, {"s": bad}))


def test_unknown_set_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"no probe set \['color'\]; its sets are: \['age', 'gender'"):
        load_probes(sets=["color"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_probes(tmp_path / "none.yaml")


def test_fill_every_way():
    ps = ProbeSet(templates=["The {group} worked as a", "My {group} is"], groups={"f": ["woman", "girl"],
                                                                                   "m": ["man"]})
    fs = fill(ps)
    assert len(fs) == 2 * 3
    assert [f.text for f in fs[:3]] == ["The woman worked as a", "The girl worked as a", "The man worked as a"]
    assert (fs[3].context, fs[3].rest, fs[3].group, fs[3].template) == ("My woman", " is", "f", 1)
    got = by_template_and_group(np.array([1.0, 3.0, 5.0, 2.0, 4.0, 7.0]), fs, ["f", "m"])
    np.testing.assert_allclose(got, [[2.0, 5.0], [3.0, 7.0]])  # mean over each group's terms


def test_encode_pair_is_lm_eval_split(tokenizer):
    ctx, cont = encode_pair(tokenizer, "The cat ", "sat on the mat")  # trailing space moves to the continuation
    assert ctx == tokenizer("The cat", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tokenizer("The cat sat on the mat", add_special_tokens=False)["input_ids"]


def test_filling_logliks_match_a_plain_forward(tokenizer):
    lm = make_teacher(len(tokenizer), seed=2)
    fs = fill(ProbeSet(templates=["The {group} sat on the mat", "A {group} writes and reads"],
                       groups={"a": ["cat", "small model"], "b": ["dog"]}))
    got = filling_logliks(lm, tokenizer, fs, batch_size=4)
    for f, value in zip(fs, got):
        ctx, cont = encode_pair(tokenizer, f.context, f.rest)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = lm(ids).logits[0].log_softmax(-1)
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)


def test_permutation_test_equals_brute_force_enumeration():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=7), rng.normal(size=7) + 0.8
    d = x - y
    observed = abs(d.mean())
    flips = np.array(list(itertools.product([1, -1], repeat=len(d))))  # all 2^7 relabellings within pairs
    null = np.abs((flips * d).mean(axis=1))
    brute = np.mean(null >= observed - 1e-12)
    assert paired_permutation_p(x, y) == pytest.approx(brute, abs=1e-12)


def test_holm_hand_worked():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])


def test_compare_groups_finds_the_shifted_group():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 1))
    v = np.hstack([base, base + 0.01 * rng.normal(size=(12, 1)), base + 2.0])  # group c is shifted by 2
    metrics, details = compare_groups("s", ["a", "b", "c"], {"loglik": v}, {"loglik": v - 0.5}, seed=0)
    pairs = {f"{r['a']}-{r['b']}": r for r in details["figures"]["loglik"]["pairs"]}
    assert set(details["figures"]["loglik"]["significant"]) == {"a-c", "b-c"}
    assert not pairs["a-b"]["significant"]
    np.testing.assert_allclose([r["p_holm"] for r in pairs.values()], holm([r["p"] for r in pairs.values()]))
    assert pairs["a-c"]["p"] == pytest.approx(2 / 2 ** 12)  # exact test: only the all-same-sign flips are as extreme
    get = {(m.name, m.group): m for m in metrics}
    assert get[("loglik", "s/c")].value == pytest.approx(v[:, 2].mean())
    assert get[("loglik_diff", "s/a-c")].value == pytest.approx(-2.0)
    assert get[("delta_loglik", "s/a")].value == pytest.approx(0.5)  # model - baseline
    assert get[("delta_loglik_diff", "s/a-c")].value == pytest.approx(0.0, abs=1e-12)
    assert details["templates"] == 12


def test_cli_probes_end_to_end(teacher_dir, tmp_path):
    from pocketlm.cli import app

    probes = _write(tmp_path, {"pets": {"templates": ["The {group} sat on the mat", "A {group} runs on rails",
                                                      "The {group} goes around the sun"],
                                        "groups": {"cats": ["cat", "kitten"], "dogs": ["dog"]}}})
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["audit", "probes", "--model", str(teacher_dir), "--baseline", str(teacher_dir),
                                   "--probes", str(probes), "--samples", "2", "--max-new-tokens", "3", "--quiet",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "pairs significant after Holm" in res.output and "kitten" not in res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["kind"] == "probes" and doc["data"]["sets"] == {"pets": 9}
    names = {(m["name"], m["group"]) for m in doc["metrics"]}
    assert {("loglik", "pets/cats"), ("toxicity", "pets/dogs"), ("sentiment_diff", "pets/cats-dogs"),
            ("delta_loglik", "pets/cats")} <= names
    assert all(m["value"] == 0 for m in doc["metrics"] if m["name"].startswith("delta_"))
    pair = doc["details"]["sets"]["pets"]["figures"]["loglik"]["pairs"][0]
    assert 0.25 <= pair["p"] <= 1 and not pair["significant"]  # 3 templates: 2^3 flips, so p >= 2/8
    assert len((out / "generations.jsonl").read_text().splitlines()) == 9

    res = CliRunner().invoke(app, ["audit", "probes", "--model", str(teacher_dir), "--probes", str(probes),
                                   "--set", "colour", "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "no probe set ['colour']" in res.output


def test_run_probes_passes_n_resamples_to_the_intervals(teacher_dir, tmp_path, monkeypatch):
    """``n_resamples`` reaches `compare_groups` (the bootstrap intervals); left out, the default 1000 as before."""
    import pocketlm.audit.probes as probes_mod

    seen, real = [], probes_mod.compare_groups
    monkeypatch.setattr(probes_mod, "compare_groups", lambda *a, **kw: seen.append(kw.get("n_resamples")) or real(*a, **kw))
    probes = _write(tmp_path, {"pets": {"templates": ["The {group} sat on the mat", "A {group} runs on rails"],
                                        "groups": {"cats": ["cat"], "dogs": ["dog"]}}})
    probes_mod.run_probes(str(teacher_dir), probes=probes, samples=0, n_resamples=300)
    probes_mod.run_probes(str(teacher_dir), probes=probes, samples=0)
    assert seen == [300, 1000]
