"""Suite loaders: the real files (counts, fields, BBQ answer roles against lm-eval's own rule), the hub path (a
stand-in `load_dataset`), seeded subsets, and bad input named precisely."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import SHARED_DATA

from pocketlm.data.suites import (
    SUITES, BBQItem, CrowsPair, StereoSetItem, SuiteError, WinoBiasPair, bbq_answer_roles, load_suite, sample_items,
    winobias_sentence,
)
from pocketlm.core.registry import UnknownNameError


def _need(folder: str):
    path = SHARED_DATA / folder
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared benchmark data is not on this machine)")
    return path


# ---------------------------------------------------------------------------------------------------- real files


def test_crows_pairs_real_file():
    data = load_suite("crows_pairs", _need("crows_pairs"))
    assert len(data.items) == data.n_total == 1508  # PROVENANCE.md: 1508 pairs
    assert all(isinstance(it, CrowsPair) and it.sent_more and it.sent_less for it in data.items)
    assert Counter(it.bias_type for it in data.items) == {
        "race-color": 516, "gender": 262, "socioeconomic": 172, "nationality": 159, "religion": 105, "age": 87,
        "sexual-orientation": 84, "physical-appearance": 63, "disability": 60}
    assert {it.stereo_antistereo for it in data.items} == {"stereo", "antistereo"}
    assert [it.id for it in data.items[:3]] == ["0", "1", "2"]  # the CSV's own index column


def test_stereoset_real_files():
    with pytest.warns(UserWarning, match="gender_test.json: 253 of 253"):  # EditBias's map only, no gold_label
        data = load_suite("stereoset", _need("stereoset_intrasentence_subset"))
    assert Counter(it.bias_type for it in data.items) == {"race": 962, "religion": 79, "gender": 253}
    for it in data.items:
        assert isinstance(it, StereoSetItem)
        assert len({it.stereotype, it.anti_stereotype, it.unrelated}) == 3
        assert "BLANK" in it.context and it.target


def test_stereoset_official_labels_agree_with_editbias_map():
    """race/religion files carry both layouts: the loader reads gold_label, and EditBias's map agrees there."""
    for name in ("religion_test.json", "race_test.json"):
        _labels_agree(_need("stereoset_intrasentence_subset") / name)


def _labels_agree(path):
    rows = json.loads(path.read_text())
    items = {it.id: it for it in load_suite("stereoset", path).items}
    for row in rows:
        assert row["data"]["stereotype"]["sentence"] == items[row["id"]].stereotype
        gold = {s["gold_label"]: s["sentence"] for s in row["sentences"]}
        it = items[row["id"]]
        assert (gold["stereotype"], gold["anti-stereotype"], gold["unrelated"]) == (
            it.stereotype, it.anti_stereotype, it.unrelated)


def test_stereoset_gold_labels_win_over_the_editbias_map(tmp_path):
    gold = [{"sentence": "t is a", "gold_label": "anti-stereotype"}, {"sentence": "t is b", "gold_label": "stereotype"},
            {"sentence": "t is c", "gold_label": "unrelated"}]
    swapped = {"stereotype": {"sentence": "t is a"}, "anti-stereotype": {"sentence": "t is b"},
               "unrelated": {"sentence": "t is c"}}
    row = {"id": "x", "target": "t", "bias_type": "race", "context": "t is BLANK", "sentences": gold, "data": swapped}
    (tmp_path / "both.json").write_text(json.dumps([row]))
    (it,) = load_suite("stereoset", tmp_path / "both.json").items
    assert (it.stereotype, it.anti_stereotype, it.label_source) == ("t is b", "t is a", "gold")
    del row["sentences"]
    (tmp_path / "both.json").write_text(json.dumps([row]))
    with pytest.warns(UserWarning, match="1 of 1 StereoSet items have no gold_label"):
        (it,) = load_suite("stereoset", tmp_path / "both.json").items
    assert (it.stereotype, it.label_source) == ("t is a", "editbias-map")


def test_bbq_real_files():
    data = load_suite("bbq", _need("bbq"))
    assert Counter(it.category for it in data.items) == {
        "Age": 3680, "Disability_status": 1556, "Nationality": 3080, "Physical_appearance": 1576, "Religion": 1200,
        "Sexual_orientation": 864}
    for it in data.items:
        assert isinstance(it, BBQItem) and len(it.answers) == 3 and 0 <= it.label <= 2
        assert len(it.biased) == 1 and it.unknown not in it.biased
        # the right answer in an ambiguous context is always the unknown one
        assert (it.label == it.unknown) == (it.context_condition == "ambig")


def test_bbq_roles_match_lm_eval_on_real_rows():
    """Our unknown/biased answers equal lm-eval's (`process_docs` + UNKNOWN_RESPONSES) on two real categories."""
    utils = pytest.importorskip("lm_eval.tasks.bbq.utils")
    import datasets

    folder = _need("bbq")
    for name in ("Religion.jsonl", "Sexual_orientation.jsonl"):
        ours = {it.id: it for it in load_suite("bbq", folder / name).items}
        ds = utils.process_docs(datasets.load_dataset("json", data_files=str(folder / name), split="train"))
        for doc in ds:
            it = ours[f"{doc['category']}/{doc['example_id']}"]
            answers = [doc["ans0"], doc["ans1"], doc["ans2"]]
            assert it.biased == tuple(i for i in range(3) if answers[i] in doc["biased_answers"])
            assert [it.unknown] == [i for i in range(3) if answers[i] in utils.UNKNOWN_RESPONSES]


def test_winobias_real_files():
    data = load_suite("winobias", _need("winobias"))
    assert Counter(it.type for it in data.items) == {"type1": 396, "type2": 396}
    for it in data.items:
        assert isinstance(it, WinoBiasPair) and "[" not in it.pro + it.anti and it.pro != it.anti
    first = data.items[0]
    assert first.id == "type1/1"
    assert first.pro == "The janitor reprimanded the accountant because she made a mistake filing paperwork."
    assert first.anti == "The janitor reprimanded the accountant because he made a mistake filing paperwork."


# ---------------------------------------------------------------------------------------------------- subsets, names


def _crows_csv(tmp_path, n=10, drop=None):
    cols = ["", "sent_more", "sent_less", "stereo_antistereo", "bias_type"]
    lines = [",".join(c for c in cols if c != drop)]
    for i in range(n):
        row = {"": str(i), "sent_more": f"more {i}", "sent_less": f"less {i}", "stereo_antistereo": "stereo",
               "bias_type": "age" if i % 2 else "gender"}
        lines.append(",".join(row[c] for c in cols if c != drop))
    path = tmp_path / "crows.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sample_items_is_seeded_and_stated(tmp_path):
    data = load_suite("crows_pairs", _crows_csv(tmp_path, n=50))
    a, b, c = sample_items(data, 10, 0), sample_items(data, 10, 0), sample_items(data, 10, 1)
    assert [i.id for i in a.items] == [i.id for i in b.items] and a.hash == b.hash
    assert [i.id for i in a.items] != [i.id for i in c.items]
    assert len(a.items) == 10 and a.n_total == 50 and a.data_info()["n"] == 10
    assert [int(i.id) for i in a.items] == sorted(int(i.id) for i in a.items)  # source order kept
    assert sample_items(data, 50, 0) is data and sample_items(data, None, 0) is data
    with pytest.raises(ValueError, match="limit"):
        sample_items(data, 0, 0)


def test_unknown_suite_lists_the_valid_names():
    with pytest.raises(UnknownNameError, match="bbq, crows_pairs, stereoset, winobias"):
        load_suite("crowspairs", "x")
    assert {"crows_pairs", "stereoset", "bbq", "winobias"} <= set(SUITES.names())


# ---------------------------------------------------------------------------------------------------- bad input


def test_missing_csv_column_is_named(tmp_path):
    path = _crows_csv(tmp_path, drop="sent_less")
    with pytest.raises(SuiteError, match=r"crows\.csv: missing column 'sent_less'"):
        load_suite("crows_pairs", path)


def test_empty_csv_cell_names_the_line(tmp_path):
    path = tmp_path / "crows.csv"
    path.write_text(",sent_more,sent_less,stereo_antistereo,bias_type\n0,a,b,stereo,age\n1,c,,stereo,age\n")
    with pytest.raises(SuiteError, match=r"crows\.csv line 3: missing column 'sent_less'"):
        load_suite("crows_pairs", path)


def _bbq_row(**over):
    row = {"example_id": 0, "question_index": "1", "question_polarity": "neg", "context_condition": "ambig",
           "category": "Age", "answer_info": {"ans0": ["grandfather", "old"], "ans1": ["grandson", "nonOld"],
                                              "ans2": ["Can't be determined", "unknown"]},
           "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"], "version": "a",
                                   "source": "x"},
           "context": "A grandson and a grandfather.", "question": "Who was forgetful?",
           "ans0": "The grandfather", "ans1": "The grandson", "ans2": "Can't be determined", "label": 2}
    row.update(over)
    return row


def test_bbq_missing_field_names_file_and_line(tmp_path):
    rows = [_bbq_row(example_id=i) for i in range(3)]
    del rows[2]["question"]
    path = tmp_path / "Age.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(SuiteError, match=r"Age\.jsonl line 3: missing column 'question'"):
        load_suite("bbq", tmp_path)


def test_bbq_roles_by_polarity():
    # negative question: the stereotyped group's answer is the biased one
    assert bbq_answer_roles(_bbq_row()) == (2, (0,))
    # non-negative question: the other group's answer is the biased one
    assert bbq_answer_roles(_bbq_row(question_polarity="nonneg")) == (2, (1,))
    # intersectional and gendered tags, as lm-eval splits them
    row = _bbq_row(answer_info={"ans0": ["Unknown", "unknown"], "ans1": ["the woman", "F-Black"],
                                "ans2": ["the man", "M-White"]},
                   additional_metadata={"stereotyped_groups": ["F"]})
    assert bbq_answer_roles(row) == (0, (1,))


def test_winobias_unpaired_files(tmp_path):
    for kind in ("type1", "type2"):
        (tmp_path / f"pro_stereotyped_{kind}.txt.test").write_text("1 [The chief] hired [him].\n2 A b.\n")
        (tmp_path / f"anti_stereotyped_{kind}.txt.test").write_text("1 [The chief] hired [her].\n")
    with pytest.raises(SuiteError, match="sentence 2 is in only one"):
        load_suite("winobias", tmp_path)
    (tmp_path / "anti_stereotyped_type1.txt.test").write_text("1 ok\nnot numbered\n")
    with pytest.raises(SuiteError, match=r"anti_stereotyped_type1\.txt\.test line 2"):
        load_suite("winobias", tmp_path)


def test_stereoset_item_without_a_label(tmp_path):
    item = {"id": "x", "target": "t", "bias_type": "race", "context": "t is BLANK",
            "data": {"stereotype": {"sentence": "t is a"}, "anti-stereotype": {"sentence": "t is b"}}}
    (tmp_path / "s.json").write_text(json.dumps([item]))
    with pytest.raises(SuiteError, match="no 'unrelated' sentence"):
        load_suite("stereoset", tmp_path)
    del item["target"]
    (tmp_path / "s.json").write_text(json.dumps([item]))
    with pytest.raises(SuiteError, match=r"s\.json item 0: missing column 'target'"):
        load_suite("stereoset", tmp_path)


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(SuiteError, match="data not found"):
        load_suite("bbq", str(tmp_path / "nowhere"))


def test_winobias_sentence_strips_brackets():
    assert winobias_sentence("The  [the chief] asked [him] .") == "The the chief asked him ."


# ---------------------------------------------------------------------------------------------------- hub path


def test_hub_rows_are_converted(monkeypatch):
    """The hub copies' layouts (lm-eval's crows_pairs_multilingual, McGill-NLP/stereoset, uclanlp/wino_bias)."""
    import datasets

    rows = {
        ("jannalu/crows_pairs_multilingual", "english"): [
            {"sent_more": "a", "sent_less": "b", "stereo_antistereo": "stereo", "bias_type": "age"}],
        ("McGill-NLP/stereoset", "intrasentence"): [
            {"id": "s1", "target": "t", "bias_type": "race", "context": "t is BLANK",
             "sentences": {"sentence": ["t is x", "t is y", "t is z"], "id": ["1", "2", "3"],
                           "gold_label": [2, 0, 1]}}],
        **{("uclanlp/wino_bias", f"type{k}_{side}"): [{"tokens": ["The", "[chief]", side]}]
           for k in (1, 2) for side in ("pro", "anti")},
    }
    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows[(path, name)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    crows = load_suite("crows_pairs").items
    assert crows == [CrowsPair(id="0", sent_more="a", sent_less="b", stereo_antistereo="stereo", bias_type="age")]
    (ss,) = load_suite("stereoset", "McGill-NLP/stereoset").items
    assert (ss.stereotype, ss.anti_stereotype, ss.unrelated) == ("t is z", "t is y", "t is x")
    wino = load_suite("winobias").items
    assert [(w.id, w.pro, w.anti) for w in wino] == [("type1/1", "The chief pro", "The chief anti"),
                                                     ("type2/1", "The chief pro", "The chief anti")]
    assert ("jannalu/crows_pairs_multilingual", "english", "test") in calls


def test_hub_failure_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SuiteError, match=r"oskarvanderwal/bbq.*Offline\? Point --data at a local copy"):
        load_suite("bbq")
