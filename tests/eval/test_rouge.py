"""ROUGE: per-item scores are rouge-score's own (exact equality with direct `RougeScorer` calls), rougeLsum sees one
sentence a line from our splitter, the corpus mean and its bootstrap interval are checked against numpy and
rouge-score's `BootstrapAggregator`, and the CLI runs end to end on a tiny model (summarisation and fidelity)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from typer.testing import CliRunner

from conftest import CORPUS, SHARED_DATA
from pocketlm.cli import app
from pocketlm.eval.generate import GenerationSettings, generate
from pocketlm.eval.rouge import (
    DEFAULT_SUMMARY_TEMPLATE, ROUGE_TYPES, bootstrap_aggregator_mid, check_template, fit_prompts, prompt_budget,
    prompt_renderer, read_summarization_data, rouge_metrics, score_items, split_sentences, subset,
)
from pocketlm.core.results import Results

PREDICTIONS = [
    "The cat sat on the mat. Then the dog came.",
    "Rivers carry rain to the sea! Hills stay dry.",
    "Bread is baked in ovens.",
    "",
    "Trains stop at every station. The moon goes around. Counting starts at one.",
]
REFERENCES = [
    "A cat sat on a mat. The dog sat on the log.",
    "Rain falls on the hills and the rivers carry it to the sea.",
    "Bread is baked from flour, water, salt and yeast in a hot oven. It is good.",
    "Nothing was written.",
    "Trains run on rails between cities. They stop at every small station.",
]


# ---------------------------------------------------------------------------------------------- splitter
@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith went to Washington. He met Dr. Jones there.",
     ["Mr. Smith went to Washington.", "He met Dr. Jones there."]),
    ("We tried e.g. Adam and i.e. SGD. It worked. See Fig. 3 for details.",
     ["We tried e.g. Adam and i.e. SGD.", "It worked.", "See Fig. 3 for details."]),
    ("The U.S. Senate voted. \"Great news,\" he said. \"Really?\" she asked. 2020 was hard.",
     ["The U.S. Senate voted.", "\"Great news,\" he said.", "\"Really?\" she asked.", "2020 was hard."]),
    ("J. K. Rowling wrote it... Everyone read it? Yes! no doubt about it.",
     ["J. K. Rowling wrote it...", "Everyone read it?", "Yes! no doubt about it."]),
    ("Line one\nLine two. Line three.\n\n  Line four  ", ["Line one", "Line two.", "Line three.", "Line four"]),
    ("He said \"go.\" Then he left.", ["He said \"go.\"", "Then he left."]),
    ("Smith et al. (2019) showed it. The end", ["Smith et al. (2019) showed it.", "The end"]),
    ("It costs 3.5 dollars, not 4. ok. Fine.", ["It costs 3.5 dollars, not 4. ok.", "Fine."]),
    ("#Person1# asks about rent. #Person2# agrees.", ["#Person1# asks about rent.", "#Person2# agrees."]),
    ("Élan vital. Über alles.", ["Élan vital.", "Über alles."]),
    ("", []),
    ("   \n  ", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


# ---------------------------------------------------------------------------------------------- per-item scores
# rouge-score's own input format for rougeLsum: one sentence a line, split here by hand (not by our splitter).
PREDICTIONS_BY_LINE = [
    "The cat sat on the mat.\nThen the dog came.",
    "Rivers carry rain to the sea!\nHills stay dry.",
    "Bread is baked in ovens.",
    "",
    "Trains stop at every station.\nThe moon goes around.\nCounting starts at one.",
]
REFERENCES_BY_LINE = [
    "A cat sat on a mat.\nThe dog sat on the log.",
    "Rain falls on the hills and the rivers carry it to the sea.",
    "Bread is baked from flour, water, salt and yeast in a hot oven.\nIt is good.",
    "Nothing was written.",
    "Trains run on rails between cities.\nThey stop at every small station.",
]


@pytest.mark.parametrize("stem", [False, True])
def test_scores_equal_direct_rouge_scorer_calls(stem):
    """rouge1/2/L: rouge-score on the same text. rougeLsum: rouge-score fed its own input format, the texts split
    into lines by hand, so a splitter bug (a missed or a spurious sentence end) shows."""
    ours = score_items(PREDICTIONS, REFERENCES, stem=stem)
    direct = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem, split_summaries=False)
    items = zip(PREDICTIONS, REFERENCES, PREDICTIONS_BY_LINE, REFERENCES_BY_LINE, ours)
    for pred, ref, pred_lines, ref_lines, got in items:
        assert pred_lines.replace("\n", " ") == pred and ref_lines.replace("\n", " ") == ref  # the same texts
        plain = direct.score(ref, pred)
        for t in ("rouge1", "rouge2", "rougeL"):
            assert got[t] == plain[t], t  # exact: the same library on the same text
        assert got["rougeLsum"] == direct.score(ref_lines, pred_lines)["rougeLsum"]


def test_rouge_lsum_equals_rouge_score_on_hand_split_sentences():
    pred = "Rivers carry rain to the sea! Hills stay dry. Mr. Brown agrees."
    ref = "Rain falls on the hills. The rivers carry it to the sea. Mr. Brown said so."
    by_hand = rouge_scorer.RougeScorer(["rougeLsum"]).score(
        "Rain falls on the hills.\nThe rivers carry it to the sea.\nMr. Brown said so.",
        "Rivers carry rain to the sea!\nHills stay dry.\nMr. Brown agrees.",
    )["rougeLsum"]
    got = score_items([pred], [ref])[0]
    assert got["rougeLsum"] == by_hand
    # the split matters: summary-level LCS over three sentences differs from one LCS over the whole text
    assert got["rougeLsum"] != got["rougeL"]
    unsplit = rouge_scorer.RougeScorer(["rougeLsum"]).score(ref, pred)["rougeLsum"]
    assert got["rougeLsum"] != unsplit


def test_several_references_take_the_best_as_score_multi_does():
    refs = ["Bread is baked from flour.", "An oven bakes bread from flour, water and yeast.", "Unrelated words here."]
    got = score_items(["Bread is baked from flour and water in an oven."], [refs])[0]
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score_multi(
        refs, "Bread is baked from flour and water in an oven.")
    for t in ("rouge1", "rouge2", "rougeL"):
        assert got[t] == direct[t]
    assert got["rouge1"].fmeasure == max(rouge_scorer.RougeScorer(["rouge1"]).score(r, "Bread is baked from flour "
                                         "and water in an oven.")["rouge1"].fmeasure for r in refs)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_items(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------------------- aggregation
def test_corpus_mean_ci_and_bootstrap_aggregator_mid():
    items = score_items(PREDICTIONS * 8, REFERENCES * 8)
    metrics = {m.name: m for m in rouge_metrics(items, seed=3)}
    assert set(metrics) == {f"{t}{s}" for t in ROUGE_TYPES for s in ("", "_precision", "_recall")}
    n_samples = 4000
    mid = bootstrap_aggregator_mid(items, seed=5, n_samples=n_samples)
    for t in ROUGE_TYPES:
        f1 = np.array([s[t].fmeasure for s in items])
        m = metrics[t]
        assert m.n == len(items) and m.higher_is_better
        assert m.value == pytest.approx(float(np.mean(f1)), abs=1e-12)
        assert metrics[f"{t}_recall"].value == pytest.approx(np.mean([s[t].recall for s in items]), abs=1e-12)
        assert m.ci[0] < m.value < m.ci[1]
        # rouge-score's mid is the median of bootstrap means, not the mean itself: equal up to the bootstrap's own
        # noise, sd ≈ 1.25 · sd(f1) / sqrt(n · n_samples) (median of n_samples means); allow 5 of those
        tol = 5 * 1.25 * f1.std() / math.sqrt(len(f1) * n_samples)
        assert abs(mid[t]["fmeasure"] - m.value) < tol, (t, mid[t]["fmeasure"], m.value, tol)
    assert metrics["rougeL"].value != metrics["rougeLsum"].value


def test_bootstrap_aggregator_mid_is_seeded_and_leaves_global_rng_alone():
    items = score_items(PREDICTIONS, REFERENCES)
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = bootstrap_aggregator_mid(items, seed=1)
    assert np.random.rand() == expected_next
    assert bootstrap_aggregator_mid(items, seed=1) == a
    # equal items: every bootstrap mean is the same, so the mid is the mean exactly
    same = score_items(["the cat sat"] * 4, ["the cat sat on the mat"] * 4)
    assert bootstrap_aggregator_mid(same)["rouge1"]["fmeasure"] == pytest.approx(
        next(m.value for m in rouge_metrics(same) if m.name == "rouge1"), abs=1e-12)


# ---------------------------------------------------------------------------------------------- prompts and data
def test_template_checks():
    check_template(DEFAULT_SUMMARY_TEMPLATE, "document")
    with pytest.raises(ValueError, match=r"no \{document\} placeholder"):
        check_template("Summarize this:", "document")
    with pytest.raises(ValueError, match="unknown placeholders"):
        check_template("{title}: {document}", "document")


def test_prompts_are_cut_to_the_budget_keeping_the_start(tokenizer):
    render = prompt_renderer("Text: {document}\nTL;DR:", "document", tokenizer, chat=False)
    long_doc = " ".join(CORPUS)
    prompts, cut = fit_prompts([long_doc, "The cat sat."], render, tokenizer, 40)
    assert cut == [True, False]
    assert prompts[1] == "Text: The cat sat.\nTL;DR:"
    n = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    assert 30 <= n <= 40
    assert prompts[0].startswith("Text: The cat sat on the mat.") and prompts[0].endswith("\nTL;DR:")
    with pytest.raises(ValueError, match="template alone takes"):
        fit_prompts(["x"], render, tokenizer, 3)


def test_chat_template(tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        prompt_renderer("{document}", "document", tokenizer, chat=True)
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    render = prompt_renderer("Sum up: {document}", "document", tok, chat=True)
    assert render("Rain.") == "<s>user: Sum up: Rain.</s><s>assistant:"


def test_prompt_budget_respects_the_context(tokenizer):
    from conftest import make_teacher

    model = make_teacher(len(tokenizer), layers=1)  # context 256
    assert prompt_budget(model, None, 64) == 192
    assert prompt_budget(model, 100, 64) == 100
    with pytest.raises(ValueError, match="exceed the model's context of 256"):
        prompt_budget(model, 200, 64)


def test_examples_are_escaped_and_trimmed():
    from pocketlm.eval.rouge import format_examples

    res = Results(kind="rouge", model={}, data={}, settings={}, metrics=[], details={"items": [
        {"index": 3, "rougeL": 0.5, "prediction": "a\x1b[31mred\nline \u202e" + "x" * 300, "reference": ["r1", "r2"]},
    ]})
    text = format_examples(res, 5, width=40)
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b[31mred\\nline \\u202e" in text
    assert "reference:  r1 | r2" in text and text.count("\n") == 2
    assert len(text.splitlines()[1]) == len("  prediction: ") + 40


def test_subset_is_seeded_and_sorted():
    a = subset(100, 10, seed=4)
    assert a == subset(100, 10, seed=4) and a == sorted(a) and len(set(a)) == 10
    assert a != subset(100, 10, seed=5)
    assert subset(5, 10, seed=0) == list(range(5))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_summarization_data_errors(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"article": "A text.", "summary": "S."}])
    with pytest.raises(ValueError, match="no document field 'document'; its fields are: article, summary"):
        read_summarization_data(str(f))
    with pytest.raises(ValueError, match="no reference field 'highlights'"):
        read_summarization_data(str(f), document_field="article", reference_field="highlights")
    g = _write_jsonl(tmp_path / "e.jsonl", [{"document": "A text.", "summary": "S."},
                                            {"document": "", "summary": "T."}])
    with pytest.raises(ValueError, match="row 2: field 'document' is empty"):
        read_summarization_data(str(g))


# ---------------------------------------------------------------------------------------------- CLI end to end
def _run(*args):
    return CliRunner().invoke(app, ["eval", "rouge", *map(str, args)])


@pytest.fixture()
def summaries_file(tmp_path):
    rows = [{"document": " ".join(CORPUS[i: i + 3]), "summary": CORPUS[i].split(".")[0] + ".", "id": i}
            for i in range(6)]
    return _write_jsonl(tmp_path / "sums.jsonl", rows)


def test_cli_summarisation_end_to_end(teacher_dir, summaries_file, tmp_path, tokenizer):
    out = tmp_path / "r" / "results.json"
    r = _run("--model", teacher_dir, "--data", summaries_file, "--out", out, "--max-new-tokens", 6, "--batch-size",
             4, "--limit", 4, "--seed", 2, "--max-prompt-tokens", 80, "--quiet", "--show-examples", 2)
    assert r.exit_code == 0, r.output
    assert "prediction:" in r.output and "rougeLsum" in r.output
    res = Results.read(out)
    assert res.kind == "rouge" and res.settings["task"] == "summarization"
    assert res.settings["prompt_template"] == DEFAULT_SUMMARY_TEMPLATE
    assert res.settings["generation"]["max_new_tokens"] == 6 and res.settings["generation"]["stop"] == ["\n\n"]
    assert res.settings["seed"] == 2 and res.settings["limit"] == 4
    assert res.data["n"] == 4 and res.data["n_source"] == 6 and res.model["fingerprint"]
    assert res.details["truncated_prompts"] == 4  # the template takes 48 tokens: every document is cut to 32
    items = res.details["items"]
    assert [it["index"] for it in items] == subset(6, 4, seed=2)
    # the generations are generate()'s on the same cut prompts, and the scores are rouge-score's on them
    from pocketlm.models.load import load_model

    model, tok = load_model(teacher_dir)
    docs, refs = read_summarization_data(str(summaries_file))
    render = prompt_renderer(DEFAULT_SUMMARY_TEMPLATE, "document", tok, chat=False)
    prompts, _ = fit_prompts([docs[it["index"]] for it in items], render, tok, 80)
    gen = generate(model, tok, prompts, GenerationSettings(max_new_tokens=6, batch_size=4, seed=2, stop=("\n\n",)))
    assert [it["prediction"] for it in items] == [t[0].strip() for t in gen.texts]
    rescored = score_items([it["prediction"] for it in items], [refs[it["index"]] for it in items])
    for t in ROUGE_TYPES:
        assert res.get(t).value == pytest.approx(np.mean([s[t].fmeasure for s in rescored]), abs=1e-12)


FIDELITY_PROMPTS = ["The cat sat on", "Rain falls on the", "The teacher writes and", "Trains run on"]


def test_cli_fidelity_of_a_model_to_itself_is_one(teacher_dir, tmp_path):
    from rouge_score.tokenizers import DefaultTokenizer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(FIDELITY_PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "fid.json"
    r = _run("--model", teacher_dir, "--reference-model", teacher_dir, "--data", prompts, "--out", out,
             "--max-new-tokens", 8, "--no-stop", "--quiet")
    assert r.exit_code == 0, r.output
    res = Results.read(out)
    assert res.settings["task"] == "fidelity" and res.baseline["fingerprint"] == res.model["fingerprint"]
    assert res.settings["generation"]["stop"] == [] and res.settings["prompt_template"] == "{prompt}"
    preds = [it["prediction"] for it in res.details["items"]]
    # rouge-score gives texts with fewer than n words rougeN = 0 even when equal: check the precondition
    assert all(len(DefaultTokenizer().tokenize(p)) >= 2 for p in preds), preds
    for t in ROUGE_TYPES:
        assert res.get(t).value == 1.0 and res.get(f"{t}_precision").value == 1.0


def _other_student(vocab_size: int):
    """A tiny Llama that continues some FIDELITY_PROMPTS as the teacher does and others not at all."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.05,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )).eval()


def test_cli_fidelity_of_another_model_scores_its_generations(teacher_dir, tokenizer, tmp_path):
    from conftest import make_teacher

    student = _other_student(len(tokenizer))
    student_dir = tmp_path / "student"
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    data = _write_jsonl(tmp_path / "p.jsonl", [{"text": p} for p in FIDELITY_PROMPTS])
    out = tmp_path / "fid.json"
    r = _run("--model", student_dir, "--reference-model", teacher_dir, "--data", data, "--prompt-field", "text",
             "--out", out, "--max-new-tokens", 8, "--quiet")
    assert r.exit_code == 0, r.output
    res = Results.read(out)
    settings = GenerationSettings(max_new_tokens=8, batch_size=8, stop=("\n\n",))
    teacher = make_teacher(len(tokenizer))
    ours = [t[0].strip() for t in generate(student, tokenizer, FIDELITY_PROMPTS, settings).texts]
    theirs = [t[0].strip() for t in generate(teacher, tokenizer, FIDELITY_PROMPTS, settings).texts]
    assert [(it["prediction"], it["reference"]) for it in res.details["items"]] == list(zip(ours, theirs))
    assert ours != theirs
    expected = score_items(ours, theirs)
    assert res.get("rougeL").value == pytest.approx(np.mean([s["rougeL"].fmeasure for s in expected]), abs=1e-12)
    assert 0.0 < res.get("rougeL").value < 1.0


@pytest.mark.parametrize("extra, rows, message", [
    (["--reference-field", "highlights"], None, "no reference field 'highlights'; its fields are: document, id"),
    (["--template", "Summarize it:"], None, r"no {document} placeholder"),
    ([], [], "holds no rows"),
])
def test_cli_bad_input_fails_before_loading_the_model(tmp_path, extra, rows, message):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"document": "A text.", "summary": "S.", "id": 1}] if rows is None
                        else rows)
    if "highlights" in extra:
        data = _write_jsonl(tmp_path / "d.jsonl", [{"document": "A text.", "id": 1}])
    r = _run("--model", tmp_path / "no-such-model", "--data", data, "--out", tmp_path / "x.json", *extra)
    assert r.exit_code == 2
    assert message in r.output, r.output
    assert not (tmp_path / "x.json").exists()


@pytest.mark.skipif(not (SHARED_DATA / "xsum_sample" / "sample.json").is_file(),
                    reason="../shared/data/xsum_sample is absent")
def test_xsum_sample_fields_read():
    docs, refs = read_summarization_data(str(SHARED_DATA / "xsum_sample" / "sample.json"))
    assert len(docs) == len(refs) == 10 and all(isinstance(r, str) for r in refs)
