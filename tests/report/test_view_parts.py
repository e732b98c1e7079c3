"""A view draws its own part of the report and writes its own section of the card: a view registered here, in the
test only, is shown by the report and the card with no edit to `report/html.py`, `report/card.py` or the page's
template — chosen by the kind of its Results, not by the name of its stage or entry."""
from __future__ import annotations

import re

import pytest
from pipeline_doc import PLANTED, make_doc

from pocketlm.core.pipeline_doc import Entry, StageStatus
from pocketlm.core.results import Metric, Results
from pocketlm.report.card import card_markdown
from pocketlm.report.html import render_report
from pocketlm.tasks import VIEWS, View
from pocketlm.tasks.base import CardPart, ReportPart, report_parts
from pocketlm.tasks.present import md, of_kind, results_by_entry

ECHO_PART = """<section id="echo-part">
<h2>Echo</h2>
{% for x in said %}<p class="said">{{ x.role }}: {{ x.text }} ({{ x.score|num }})</p>{% endfor %}
</section>
"""


def _said(doc) -> list[dict]:
    _, by_role = of_kind(results_by_entry(doc), "echo")
    return [{"role": role, "text": res["details"]["said"], "score": res["metrics"][0]["value"]}
            for role, res in by_role.items()]


def _echo_part(doc) -> dict | None:
    said = _said(doc)
    return {"said": said} if said else None


def _echo_card(doc) -> list[str]:
    said = _said(doc)
    return ["", "## Echo", "", *[f"- {md(x['role'])}: {md(x['text'])}" for x in said]] if said else []


def _register(monkeypatch, place: int = 100) -> View:
    monkeypatch.setattr(VIEWS, "_items", dict(VIEWS._items))  # registered for this test only
    return VIEWS.register("echo")(View("echo", section=False, summary_rows=0,
                                       report_parts=(ReportPart(_echo_part, source=ECHO_PART, place=place),),
                                       card_parts=(CardPart(_echo_card),)))


def _with_echo(said: str = "hello from the echo task"):
    """The report tests' document (every built-in part drawn) with an echo stage; its stage and entry names are
    not its kind's."""
    doc = make_doc(deployment=True, moe=True)
    res = Results("echo", {"spec": "teacher-spec", "fingerprint": "f" * 16}, {"source": "nothing", "n": 3}, {},
                  [Metric("echo_score", 0.5, n=3, ci=(0.25, 0.75), higher_is_better=True)], {"said": said})
    doc.stages["a_probe"] = StageStatus("ran", key="k", wall_time_s=0.1, entries=[Entry("teacher", "words", res)])
    return doc


def _order(page: str, ids: list[str]) -> list[int]:
    return [page.index(f'<section id="{i}">') for i in ids]


def test_a_registered_views_part_is_drawn_by_the_kind_of_its_results(monkeypatch):
    _register(monkeypatch)
    page = render_report(_with_echo())
    assert '<p class="said">teacher: hello from the echo task (0.5)</p>' in page
    # after the built-in parts (place 100 is the default), before provenance
    order = _order(page, ["training", "metrics", "size", "deployment", "moe", "attention", "echo-part", "provenance"])
    assert order == sorted(order)
    assert 'id="entry-words"' not in page  # section=False: its own part shows it, not a generic section
    assert '<section id="echo-part">' not in render_report(make_doc())  # no echo results: not drawn


def test_a_part_placed_below_zero_comes_before_the_sections(monkeypatch):
    _register(monkeypatch, place=-5)
    page = render_report(_with_echo())
    assert _order(page, ["run", "training", "echo-part", "metrics"]) == sorted(_order(page, ["run", "training",
                                                                                          "echo-part", "metrics"]))


def test_a_parts_text_is_escaped(monkeypatch):
    _register(monkeypatch)
    page = render_report(_with_echo(said=PLANTED))
    part = page[page.index('<section id="echo-part">'):page.index('<section id="provenance">')]
    assert "<script" not in part and "<img" not in part and "&lt;script&gt;console.error" in part


def test_a_registered_views_card_section_follows_the_gates(monkeypatch):
    _register(monkeypatch)
    body = card_markdown(_with_echo(said="a | b <i>"))
    order = [body.index(h) for h in ("### Release gates", "## Deployment", "## Echo", "## Ethical considerations")]
    assert order == sorted(order)  # ties of place: by kind ("deployment" before "echo")
    assert "- teacher: a \\| b &lt;i&gt;" in body
    assert "## Echo" not in card_markdown(make_doc())


def test_the_built_in_parts_and_their_order():
    """The parts today's tasks draw: training curves before the sections; size, deployment, expert load and
    attention after them, each drawn even where its stage was off (saying so), deployment only where it ran."""
    assert [(p.template, p.place) for p in report_parts()] == [
        ("part_training.html.j2", -10), ("part_size.html.j2", 10), ("part_deployment.html.j2", 20),
        ("part_moe.html.j2", 30), ("part_attention.html.j2", 40)]
    page = render_report(make_doc())
    assert re.search(r"The size stage .* was off in this run", page)
    assert "(the attention stage was off)" in page and '<section id="deployment">' not in page


def test_a_part_has_one_template():
    with pytest.raises(ValueError, match="one of the two"):
        ReportPart(_echo_part)
    with pytest.raises(ValueError, match="one of the two"):
        ReportPart(_echo_part, template="part_size.html.j2", source="{{ x }}")
