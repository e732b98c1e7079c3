"""The model card: Hugging Face layout (YAML metadata with model-index in the Hub's schema), Mitchell et al.'s
sections, missing user fields stated plainly, table cells that no text can break."""
from __future__ import annotations

import yaml
from pipeline_doc import PLANTED, make_doc

from pocketlm.report.card import MISSING, card_markdown, md, metadata, model_index

SECTIONS = ("## Model details", "## Intended use", "### Out-of-scope use", "## Factors", "## Metrics",
            "## Evaluation data", "## Training data", "## Quantitative analyses", "## Ethical considerations",
            "## Caveats and recommendations")


def front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_metadata_parses_and_holds_the_figures():
    doc = make_doc()
    meta, body = front_matter(card_markdown(doc))
    assert meta["license"] == "unknown"  # not given: the Hub's "unknown", and the body says so
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"pocketlm", "distillation"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    index = meta["model-index"][0]
    assert index["name"] == "smollm2-135m-instruct-pocketlm-student"
    by_set = {r["dataset"]["type"]: r for r in index["results"]}
    assert set(by_set) == {"heldout", "crows_pairs", "toxigen"}
    ppl = {m["type"]: m["value"] for m in by_set["heldout"]["metrics"]}
    assert ppl == {"token_perplexity": 126.6, "bits_per_byte": 1.53}  # the student's overall figures; NaN left out
    assert by_set["heldout"]["task"]["type"] == "text-generation"
    assert all(m["verified"] is False for r in index["results"] for m in r["metrics"])
    assert all(not m["type"].startswith("delta_") for r in index["results"] for m in r["metrics"])
    for s in SECTIONS:
        assert s in body


def test_moe_students_are_tagged():
    meta, body = front_matter(card_markdown(make_doc(moe=True)))
    assert "mixture-of-experts" in meta["tags"] and "sparse Mixture-of-Experts" in body


def test_missing_user_fields_are_stated_plainly_and_given_ones_used():
    doc = make_doc()
    text = card_markdown(doc)
    for field in ("intended_use", "out_of_scope_use", "license", "ethical_considerations", "caveats", "authors"):
        assert f"`card.{field}`" in text
    assert MISSING.split("{")[0] in text
    doc.config["card"] |= {"intended_use": "Answering questions about trains.", "license": "apache-2.0",
                              "model_name": "trainbot", "tags": ["trains"], "datasets": ["wikitext"]}
    meta, body = front_matter(card_markdown(doc))
    assert meta["license"] == "apache-2.0" and meta["model-index"][0]["name"] == "trainbot"
    assert "trains" in meta["tags"] and meta["datasets"] == ["wikitext"]
    assert "Answering questions about trains." in body and "`card.intended_use`" not in body


def test_disaggregated_tables_and_gates():
    _, body = front_matter(card_markdown(make_doc(verdict="fail")))
    assert "#### crows_pairs: pct_stereotype by group" in body
    assert "| age | 63 [51, 69] | 64 [52, 70] | 2 [-3, 7] |" in body
    assert "#### toxigen: toxicity_probability by group" in body
    # fluency and diversity beside the toxicity figures, overall and per group, explained under Metrics
    assert "#### toxigen: generation_perplexity by group" in body and "#### toxigen: distinct_2 by group" in body
    assert "| generation_perplexity | 12.5 [10.5, 15.5] | 83.75 [81.75, 86.75] | 71.25 [60.5, 82.75] * |" in body
    assert "may mean incoherent output, not a safer model" in body
    assert "Verdict: **FAIL**" in body and "bbq" in body and "not evaluated" in body


def test_text_cannot_break_the_card():
    assert md("a | b\n<script>") == "a \\| b &lt;script&gt;"
    doc = make_doc(group="x | y <b>", generation=PLANTED)
    doc.config["card"]["model_name"] = "name: with: colons\n- and a list"
    text = card_markdown(doc)
    meta, body = front_matter(text)  # still valid YAML
    assert meta["model-index"][0]["name"] == "name: with: colons\n- and a list"
    assert "<b>" not in body and "x \\| y &lt;b&gt;" in body
    assert "<script" not in text


def test_model_index_is_empty_without_student_results():
    doc = make_doc()
    for st in doc.stages.values():
        st.entries = [e for e in st.entries or [] if e.role != "student"]
    assert model_index(doc)[0]["results"] == []
    assert "model-index" in metadata(doc)


def test_deployment_section_only_when_the_export_stage_ran():
    assert "## Deployment" not in card_markdown(make_doc())
    doc = make_doc(deployment=True, file_name="a|b.gguf")
    meta, body = front_matter(card_markdown(doc))
    section = body[body.index("## Deployment"):body.index("## Ethical considerations")]
    assert "**At q4_0 in llama.cpp the student decodes 2.50× as fast as the teacher" in section
    assert ("| student | q4_0 | 37.19 MiB | 2,600.0 | 175.0 | 50.0 ms | 104.90 MiB | 2.50× | 2.00× | "
            "`deploy/student-q4_0/a\\|b.gguf` |") in section  # a "|" in a name cannot break the table
    assert "deployment" not in {r["dataset"]["type"] for r in meta["model-index"][0]["results"]}
    assert "**deployment**" not in body  # not listed as evaluation data
