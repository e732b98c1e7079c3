"""Adding a measurement is one file, one registration line and its tests: a tiny task registered here runs in the
pipeline in the place it is given, is reused on a re-run with the same inputs, can be named by a gate, and the
report shows its results by their kind: a section drawn from its view, and a part its view draws itself (with no
edit to the report's code or template)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.pipeline_doc import PipelineDocument
from pocketlm.core.results import Metric, Results
from pocketlm.pipeline import PIPELINE, run_pipeline
from pocketlm.tasks import TASKS, VIEWS, Context, Entry, StageOutput, Task, View, register
from pocketlm.tasks.base import ReportPart
from pocketlm.tasks.present import of_kind, results_by_entry


def _wrote(role: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": role, "label": "echoed", "prompt": "say something", "text": res["details"]["said"]}]


def _echo_part(doc: dict[str, Any]) -> dict[str, Any] | None:
    """Its own part of the report: what the teacher said, in a section of its own."""
    by_role = of_kind(results_by_entry(doc), "echo")[1]
    return {"said": by_role["teacher"]["details"]["said"]} if by_role else None


ECHO_PART = '<section id="echo-said">\n<h2>Echo</h2>\n<p>The teacher said: {{ said }}</p>\n</section>\n'


class EchoTask(Task):
    """The dummy measurement: one figure of the teacher, no model work."""

    name, phase = "echo", "inspect"
    views = (View("echo", samples=_wrote, report_parts=(ReportPart(_echo_part, source=ECHO_PART),)),)
    fixed_entries = ("echo",)

    def __init__(self) -> None:
        self.runs = 0

    def inputs(self, ctx: Context) -> dict[str, Any]:
        return {"teacher": ctx.cfg.teacher, "seed": ctx.seed}

    def run(self, ctx: Context) -> StageOutput:
        self.runs += 1
        res = Results("echo", {"spec": ctx.cfg.teacher, "fingerprint": None, "role": "teacher"},
                      {"source": "nothing", "n": 3}, {"seed": ctx.seed},
                      [Metric("echo_score", 0.5, n=3, ci=(0.25, 0.75), higher_is_better=True)],
                      details={"said": "hello from the echo task"})
        return StageOutput([Entry("teacher", "echo", res)], {"echo_said": "hello"})


@pytest.fixture
def echo(monkeypatch) -> EchoTask:
    monkeypatch.setattr(TASKS, "_items", dict(TASKS._items))  # registered for this test only
    monkeypatch.setattr(VIEWS, "_items", dict(VIEWS._items))
    return register(EchoTask())


def test_a_registered_task_is_ordered_reused_gated_and_reported(echo, teacher_dir, tmp_path):
    # the pipeline's order without the distillation (nothing here needs a student), the echo task after size
    tasks = [t for t in PIPELINE if t.name != "distill"]
    tasks.insert([t.name for t in tasks].index("size") + 1, echo)
    cfg = PipelineConfig(teacher=str(teacher_dir), output_dir=str(tmp_path / "out"), eval={"perplexity": []},
                         gates=["echo.echo_score.teacher >= 0.25"])  # "echo" is a result name: the task's entry

    first = run_pipeline(cfg, progress=False, tasks=tasks)
    assert first.ran == ["echo"] and first.reused == [] and echo.runs == 1
    doc = first.document
    assert isinstance(doc, PipelineDocument) and list(doc.stages) == [t.name for t in tasks]
    assert {n: s.status for n, s in doc.stages.items() if s.status != "off"} == {"echo": "ran"}
    assert doc.facts == {"echo_said": "hello"} and doc.verdict == "pass" and first.exit_code == 0
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert stored == doc.to_dict() and PipelineDocument.from_dict(stored).to_dict() == stored  # typed both ways

    page = first.report_path.read_text()  # a section of its own, drawn from its kind's view
    section = page[page.index('id="entry-echo"'):]
    assert "(echo, n = 3, nothing)" in section and "echo_score" in section
    assert "hello from the echo task" in section  # the samples hook of the "echo" view
    part = page[page.index('<section id="echo-said">'):page.index('<section id="provenance">')]
    assert "<p>The teacher said: hello from the echo task</p>" in part  # the part the "echo" view draws

    again = run_pipeline(cfg, progress=False, tasks=tasks, overwrite=True)
    assert again.ran == [] and again.reused == ["echo"] and echo.runs == 1  # same inputs: the stored record
    assert again.document.stages["echo"].status == "reused"
    assert again.document.entries() == doc.entries()

    forced = run_pipeline(cfg, progress=False, tasks=tasks, force=["echo"], overwrite=True)
    assert forced.ran == ["echo"] and echo.runs == 2


def test_an_unregistered_entry_is_not_a_result_name(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="names 'echo', which this pipeline does not measure"):
        PipelineConfig(teacher=str(teacher_dir), output_dir=str(tmp_path / "out"),
                       gates=["echo.echo_score.teacher >= 0.25"])
