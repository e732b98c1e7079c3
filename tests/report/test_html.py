"""The HTML report: one self-contained page, verdict first, every section drawn, model text escaped — and checked in
a real headless browser (Chromium): no console errors, the verdict shown, a planted <script> inert."""
from __future__ import annotations

import base64
import re

from pipeline_doc import PLANTED, load_in_browser, make_doc, needs_chromium

from pocketlm.report.html import comparison_rows, fmt_ci, fmt_number, fmt_unit, render_report, write_report


def test_sections_and_verdict_first():
    page = render_report(make_doc())
    order = [page.index(f'id="{s}"') for s in ("verdict", "run", "training", "metrics", "size", "moe",
                                               "attention", "provenance")]
    assert order == sorted(order)
    assert "Release gates: PASS" in page
    for heading in ("crows_pairs: pct_stereotype per category", "toxigen: expected_max_toxicity per group",
                    "toxigen: toxicity_probability per group"):
        assert heading in page
    assert "bbq" in page and "is not there" in page  # what was left out, and why
    assert "126.6" in page and "[110, 140]" in page  # value and interval
    fail = render_report(make_doc(verdict="fail"))
    assert "Release gates: FAIL — 1 of 1 gates not passed" in fail


def test_self_contained_no_script_and_images_inline():
    page = render_report(make_doc())
    assert "<script" not in page.lower()
    assert "default-src 'none'" in page  # CSP: no script, no fetch, images only from data: URIs
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # real PNGs
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(href|src)="(https?:)?//', page)


def test_model_and_suite_text_is_escaped():
    page = render_report(make_doc(generation=PLANTED, group='<b onmouseover="x()">age</b>',
                                  gate_name="<script>alert(1)</script>"))
    assert "<script>" not in page and "<img src=x" not in page and "<b onmouseover" not in page
    assert "&lt;script&gt;console.error(&#34;PLANTED-XSS&#34;)" in page
    assert "&lt;b onmouseover=" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_expert_load_shown_for_moe_students():
    assert "The student is dense" in render_report(make_doc())
    page = render_report(make_doc(moe=True))
    assert 'alt="expert load per layer" src="data:image/png;base64,' in page


def test_comparison_rows_pair_values_with_the_students_delta():
    doc = make_doc()
    entry = {e.role: e.results.to_dict() for e in doc.stages["bias"].entries}
    rows = comparison_rows(entry)
    assert [r["name"] for r in rows] == ["pct_stereotype"]
    assert rows[0]["cells"]["teacher"]["value"] == 60.0 and rows[0]["delta"]["value"] == 1.0
    assert rows[0]["significant"] is False  # [-2, 4] includes 0
    age = comparison_rows(entry, "age", ["pct_stereotype"])[0]
    assert age["cells"]["student"]["value"] == 64.0 and age["delta"]["ci"] == [-3.0, 7.0]


def test_number_formatting():
    assert fmt_number(None) == "n/a" and fmt_number(float("nan")) == "n/a"
    assert fmt_number(126.6123) == "126.6" and fmt_number(134_500_000.0) == "1.34e+08"
    assert fmt_ci([1.0, 2.5]) == "[1, 2.5]" and fmt_ci(None) == ""
    assert fmt_unit(3 * 2**20, "bytes") == "3.00 MiB" and fmt_unit(512, "bytes") == "512 B"
    assert fmt_unit(56.6e6, "params") == "56.60 M params"


@needs_chromium
def test_report_in_headless_chromium(tmp_path):
    path = write_report(make_doc(generation=PLANTED, group="<i>age</i>", verdict="fail"), tmp_path / "report.html")
    dom, console = load_in_browser(path)
    assert console == []  # no console errors (nor any message: the page runs no script)
    assert re.search(r'id="verdict"[^>]*>Release gates: FAIL', dom)
    assert "<title>pwned</title>" not in dom and "PLANTED" in dom  # the text is there, as text
    assert "<script" not in dom.lower() and not re.search(r"<img[^>]*onerror", dom)  # no element was made of it
    assert "&lt;script&gt;" in dom


@needs_chromium
def test_a_page_with_a_live_script_would_be_caught(tmp_path):
    """The check can fail: the same driver sees a console message from a page that does run script."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>")
    _, console = load_in_browser(bad)
    assert any("boom" in line for line in console)


def test_missing_provenance_is_said_not_hidden():
    doc = make_doc()
    doc.provenance = {}
    assert "No provenance was recorded" in render_report(doc)
    raw = make_doc().to_dict()  # a document written without the key at all (an older or a hand-made one)
    del raw["provenance"]
    assert "No provenance was recorded" in render_report(raw)


def test_fluency_and_diversity_shown_beside_toxicity():
    page = render_report(make_doc())
    for heading in ("toxigen: generation_perplexity per group", "toxigen: distinct_2 per group"):
        assert heading in page
    assert "83.75" in page and "[81.75, 86.75]" in page and "71.25" in page  # student, its interval, its delta
    section = page[page.index('id="entry-toxigen"'):page.index('id="size"')]
    rows = re.findall(r"<tr><td>(\w+)</td>", section)
    assert rows[:4] == ["expected_max_toxicity", "toxicity_probability", "distinct_2", "generation_perplexity"]
    assert "under\nteacher (<code>smollm2-135m-instruct</code>)" in section  # which model scored them
    doc = make_doc()
    for e in doc.stages["toxicity"].entries:  # results from before fluency was measured: no claim made
        e.results.settings = {}
    assert "Fluency and diversity of the same generations" not in render_report(doc)


def test_deployment_section_only_when_the_export_stage_ran():
    assert 'id="deployment"' not in render_report(make_doc())
    page = render_report(make_doc(deployment=True, file_name=PLANTED))
    section = page[page.index('<section id="deployment">'):page.index('<section id="moe">')]
    assert ("At q4_0 in llama.cpp the student decodes 2.50× as fast as the teacher (175.0 against 70.0 tokens/s), "
            "and its file is 2.00× smaller (37.19 MiB against 74.39 MiB).") in section
    assert "Perplexity before quantisation (heldout, token perplexity): teacher 35.4, student 126.6" in section
    assert "<td>student</td><td>f16</td><td class=\"n\">114.44 MiB</td><td class=\"n\">2,000.0</td>" in section
    assert "70.0 ms" in section and "2.38×" in section  # TTFT in ms; decode × teacher at f16 (95 / 40)
    assert "<script>" not in page and "&lt;script&gt;console.error" in section  # a file name is text


def test_the_typed_document_and_its_json_render_the_same_page():
    from pocketlm.core.pipeline_doc import PipelineDocument

    doc = make_doc(deployment=True)
    as_json = doc.to_dict()
    assert PipelineDocument.from_dict(as_json).to_dict() == as_json
    assert render_report(doc) == render_report(as_json)


def test_run_summary_shows_each_kinds_headline_figures():
    from pocketlm.report.html import run_summary

    text = run_summary(make_doc(deployment=True))
    sets = [line.split()[0] for line in text.splitlines()[1:]]
    # distill and parameters are not sets; toxicity shows two figures, every other kind one (deployment's are per
    # quant type: none overall)
    assert sets == ["heldout", "crows_pairs", "toxigen", "toxigen"]
    assert "91.2 [80, 100]" in text  # the student's paired delta with its interval
