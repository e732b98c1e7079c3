"""`pocketlm run PIPELINE.yaml`: distill → evaluate → audit → inspect → export → results.json, report, model card,
gates.

Every input is checked before any model work: the teacher spec, every data path (a missing one is an error, or
with ``missing_data: skip`` a suite left out with the reason stated), every suite's rows, the gate rules (each
task checks its own data). Then the tasks run in the order of :data:`PIPELINE` (one module of `pocketlm.tasks` each;
a stage is a task's run). Each stage's record — its typed results, the facts later stages need, and the key hashed
from its inputs (config section, data hashes, model fingerprints) — is kept in
``<output_dir>/stages/<stage>.json``; a stage whose key matches a stored record is not run again, so a re-run after
a failure continues where it stopped, and ``force`` names stages to redo anyway. A changed input changes the keys
of every stage that depends on it (a retrained student has a new fingerprint), so nothing stale is reused.

Finally ``results.json`` (the typed `core.pipeline_doc.PipelineDocument`) gathers every record with provenance, the
gates are checked, and the report (``report.html``) and the model card (``README.md`` in the student folder) are
written from that document alone.
Exit code: 0 every gate passed, 1 a gate failed or could not be verified, 2 a config error (a gate naming a
result that does not exist among them).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.io import write_json_atomic
from pocketlm.core.outdir import output_folder
from pocketlm.core.paths import check_outputs, confined
from pocketlm.core.pipeline_doc import SCHEMA, Entry, PipelineDocument, StageStatus
from pocketlm.core.provenance import provenance
from pocketlm.report.card import write_card
from pocketlm.report.gates import GateNameError, check_gate, namespace_from_entries
from pocketlm.report.html import write_report
from pocketlm.tasks import (
    attention, bias, distill, export, perplexity, probes, prune_heads, rouge, scorer_check, size, toxicity,
)
from pocketlm.tasks.base import Context, StageUnavailable, Task, say, unavailable

# the run order: a task reads the facts of those before it (the students' folders, the held-out documents)
PIPELINE: tuple[Task, ...] = (
    distill.DISTILL,
    distill.CE_BASELINE,
    perplexity.TASK,
    rouge.TASK,
    bias.TASK,
    toxicity.TASK,
    probes.TASK,
    scorer_check.TASK,
    size.TASK,
    attention.TASK,
    prune_heads.TASK,
    export.TASK,
)
ORDER = [t.name for t in PIPELINE]

__all__ = ["ORDER", "PIPELINE", "PipelineOutcome", "SCHEMA", "STAGE_SCHEMA", "assemble", "check_gates",
           "check_inputs", "run_pipeline", "stage_key"]

STAGE_SCHEMA = "pocketlm.stage/1"
OUTPUTS = ("stages", "distill", "ce_baseline", "audit", "inspect", "deploy", "results.json", "report.html")  # written in out


@dataclass
class PipelineOutcome:
    doc: dict[str, Any]  # results.json as written
    results_path: Path
    report_path: Path
    card_path: Path | None
    gates: list[dict[str, Any]]
    exit_code: int
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    document: PipelineDocument | None = None  # the same, typed


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    return write_json_atomic(path, doc, indent=2, allow_nan=False, default=str)


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"stage": name, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------- checks
def check_inputs(ctx: Context, tasks: Sequence[Task] = PIPELINE) -> None:
    """Load and check everything the tasks will read, before any model is loaded: the teacher, then each enabled
    task's own data (in run order), then that every enabled task can run here."""
    from pocketlm.models.load import folder_shape, resolve

    cfg = ctx.cfg
    resolve(cfg.teacher)  # a missing folder/file or an uninstalled embedded teacher fails here
    shape = folder_shape(cfg.teacher)  # a teacher folder's config: the fields it bounds are checked now
    if shape is not None:
        cfg.check_teacher(*shape)
    for task in tasks:
        if task.enabled(cfg):
            task.check(ctx)
    for task in tasks:
        why = unavailable(task) if task.enabled(cfg) else None
        if why:
            raise StageUnavailable(f"{why}; turn it off in the config ({task.turn_off})")


# ---------------------------------------------------------------------------------------------------- running
def _stored(path: Path, key: str, out: Path) -> dict[str, Any] | None:
    """The stored record at ``path`` if it has this key and every folder/file it points at still exists."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged record is redone, not trusted
    if not isinstance(rec, dict) or rec.get("schema") != STAGE_SCHEMA or rec.get("key") != key:
        return None
    facts = rec.get("facts", {})
    if not isinstance(facts, dict):
        return None  # not the shape we write: redone, like a damaged record
    for name, value in facts.items():
        if name.endswith(("_dir", "_file")) and not isinstance(value, str):
            return None
        # a record is a file in the output folder, not to be trusted with paths that lead out of it
        if name.endswith(("_dir", "_file")) and value and not confined(out, value, f"{path} facts.{name}").exists():
            return None
    if not isinstance(rec.get("wall_time_s"), (int, float)):
        return None
    try:
        [Entry.from_dict(e) for e in rec.get("entries", [])]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # entries we cannot read back: redone, like a damaged record
    return rec


def _run_task(task: Task, ctx: Context, force: set[str], status: dict[str, StageStatus]) -> bool | None:
    """Run one task or reuse its stored record (into ``ctx.records`` and ``status``); True: it ran, False: reused,
    None: off or skipped."""
    cfg, out, name = ctx.cfg, ctx.out, task.name
    if not task.enabled(cfg):
        status[name] = StageStatus("off")
        return None
    wanted = task.measures(cfg)
    if wanted and all(w in ctx.skipped for w in wanted):
        status[name] = StageStatus("skipped", reason="; ".join(f"{w}: {ctx.skipped[w]}" for w in wanted))
        return None
    inputs = task.inputs(ctx)
    key = ctx.keys[name] = stage_key(name, inputs)
    rec_path = out / "stages" / f"{name}.json"
    rec = None if name in force else _stored(rec_path, key, out)
    ran = rec is None
    if not ran:
        say(f"{name}: reusing the stored results (same inputs, key {key})")
    else:
        say(f"{name}: running" + (" (forced)" if name in force else ""))
        t = time.perf_counter()
        output = task.run(ctx)
        rec = {"schema": STAGE_SCHEMA, "stage": name, "phase": task.phase, "key": key, "inputs": inputs,
               "entries": [e.to_dict() for e in output.entries], "facts": output.facts,
               "wall_time_s": time.perf_counter() - t, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(rec_path, rec)
        say(f"{name}: done in {rec['wall_time_s']:.0f} s")
    ctx.records[name] = rec
    status[name] = StageStatus("ran" if ran else "reused", key=key, wall_time_s=rec["wall_time_s"],
                               entries=[Entry.from_dict(e) for e in rec["entries"]])
    return ran


def run_pipeline(cfg: PipelineConfig, *, force: Iterable[str] = (), progress: bool = True,
                 overwrite: bool = False, tasks: Sequence[Task] = PIPELINE) -> PipelineOutcome:
    """Check every input, run (or reuse) each task in ``tasks``' order, then write results.json, the report and the
    model card, and check the gates."""
    t0 = time.perf_counter()
    force = set(force)
    names = [t.name for t in tasks]
    unknown = force - set(names)
    if unknown:
        raise ValueError(f"--force {', '.join(sorted(unknown))}: no such stage; stages: {', '.join(names)}")
    out = Path(cfg.output_dir)
    check_outputs(out, OUTPUTS)
    ctx = Context(cfg, out, progress=progress)
    ctx.forced = force
    check_inputs(ctx, tasks)
    # held for the run: new or a pipeline folder of ours, locked; bad input leaves no empty output folder behind
    with output_folder(out, kind="pipeline", what="output_dir", overwrite=overwrite):
        status: dict[str, StageStatus] = {}
        ran, reused = [], []
        for task in tasks:
            done = _run_task(task, ctx, force, status)
            if done is not None:
                (ran if done else reused).append(task.name)
        document = assemble(ctx, status, time.perf_counter() - t0)
        try:
            gates = check_gates(document)
            code = 0 if all(g["passed"] for g in gates) else 1
        except GateNameError as e:
            gates, code = [{"name": "config error", "rule": "", "status": "error", "passed": False, "values": {},
                            "comparisons": [], "message": str(e)}], 2
        document.gates = gates
        document.verdict = {0: "pass" if gates else "no gates", 1: "fail", 2: "error"}[code]
        doc = document.to_dict()
        results_path = _write_json(out / "results.json", doc)
        report = write_report(doc, out / "report.html")
        card = None
        if "student_dir" in document.facts:
            card = write_card(doc, confined(out, document.facts["student_dir"], "facts.student_dir") / "README.md")
    return PipelineOutcome(doc, results_path, report, card, gates, code, ran, reused, document)


def assemble(ctx: Context, status: dict[str, StageStatus], wall: float) -> PipelineDocument:
    """The pipeline document: every stage's entries with provenance, the config, what was left out and why."""
    cfg = ctx.cfg
    facts: dict[str, Any] = {}
    for rec in ctx.records.values():
        facts |= rec.get("facts", {})
    config = cfg.model_dump(mode="json")
    models = {r: {"spec": cfg.teacher if r == "teacher" else facts.get(f"{r}_dir"),
                  "fingerprint": facts.get(f"{r}_fingerprint")} for r in cfg.roles()}
    return PipelineDocument(
        config=config, config_hash=hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        output_dir=str(ctx.out), models=models, stages=status, skipped=dict(ctx.skipped), facts=facts,
        provenance=provenance(), wall_time_s=wall)


def check_gates(doc: PipelineDocument) -> list[dict[str, Any]]:
    """Each configured gate checked against the document; GateNameError for a name no result has."""
    ns = namespace_from_entries([e.to_dict() for e in doc.entries()], doc.skipped)
    return [check_gate(g.get("name") or g["rule"], g["rule"], ns).to_dict() for g in doc.config["gates"]]
