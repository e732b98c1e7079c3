"""`pocketlm run PIPELINE.yaml`: distill → evaluate → audit → inspect → export → results.json, report, model card,
gates.

Every input is checked before any model work: the teacher spec, every data path (a missing one is an error, or
with ``missing_data: skip`` a suite left out with the reason stated), every suite's rows, the gate rules. Then the
stages run in order (`pipeline_stages.ORDER`). Each stage's record — its typed results, the facts later stages
need, and the key hashed from its inputs (config section, data hashes, model fingerprints) — is kept in
``<output_dir>/stages/<stage>.json``; a stage whose key matches a stored record is not run again, so a re-run after
a failure continues where it stopped, and ``force`` names stages to redo anyway. A changed input changes the keys
of every stage that depends on it (a retrained student has a new fingerprint), so nothing stale is reused.

Finally ``results.json`` gathers every record with provenance, the gates are checked, and the report
(``report.html``) and the model card (``README.md`` in the student folder) are written from that document alone.
Exit code: 0 every gate passed, 1 a gate failed or could not be verified, 2 a config error (a gate naming a
result that does not exist among them).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.outdir import output_folder
from pocketlm.core.paths import check_outputs, confined
from pocketlm.pipeline_stages import ORDER, STAGES, Context, StageUnavailable, unavailable
from pocketlm.core.provenance import provenance

SCHEMA = "pocketlm.pipeline/1"
STAGE_SCHEMA = "pocketlm.stage/1"
OUTPUTS = ("stages", "distill", "ce_baseline", "audit", "deploy", "results.json", "report.html")  # written in out


@dataclass
class PipelineOutcome:
    doc: dict[str, Any]
    results_path: Path
    report_path: Path
    card_path: Path | None
    gates: list[dict[str, Any]]
    exit_code: int
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    from pocketlm.report.html import write_text_atomic

    return write_text_atomic(path, json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n")


def stage_key(name: str, inputs: dict[str, Any]) -> str:
    blob = json.dumps({"stage": name, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------------- checks
def _missing(ctx: Context, entry: str, where: str, path: Path) -> None:
    if ctx.cfg.missing_data == "skip":
        ctx.skipped[entry] = f"its data {path} is not there ({where}); left out because missing_data is skip"
        _say(f"{entry}: skipped — {ctx.skipped[entry]}")
        return
    raise FileNotFoundError(f"{where}: data not found: {path} (fix the path, or set missing_data: skip to leave "
                            f"{entry} out with the reason stated)")


def check_inputs(ctx: Context) -> None:
    """Load and check everything the stages will read, before any model is loaded."""
    from pocketlm.audit.prompt_suites import load_suite as load_prompts
    from pocketlm.audit.prompt_suites import select
    from pocketlm.audit.toxicity import build_scorer
    from pocketlm.data.suites import load_suite, sample_items
    from pocketlm.data.text import DataError, hash_documents, read_documents
    from pocketlm.models.load import folder_shape, resolve

    cfg = ctx.cfg
    resolve(cfg.teacher)  # a missing folder/file or an uninstalled embedded teacher fails here
    shape = folder_shape(cfg.teacher)  # a teacher folder's config: the fields it bounds are checked now
    if shape is not None:
        cfg.check_teacher(*shape)
    src = cfg.data.source
    if src and src.startswith((".", "/", "~")) and not Path(src).expanduser().exists():
        raise DataError(f"data.source: data not found: {src}")
    for i, p in enumerate(cfg.eval.perplexity):
        path = cfg.data_path(p.data)
        if path is None:
            continue
        if not path.exists():
            _missing(ctx, p.name, f"eval.perplexity.{i}.data", path)
            continue
        docs = read_documents(path, field=p.field, split=p.split, max_documents=p.max_documents,
                              txt_split=p.txt_split)
        ctx.inputs[p.name] = {"docs": docs, "source": str(path), "hash": hash_documents(docs)}
    for i, r in enumerate(cfg.eval.rouge):
        path = cfg.data_path(r.data)
        if not path.exists():
            _missing(ctx, r.name, f"eval.rouge.{i}.data", path)
            continue
        from pocketlm.eval.rouge import read_prompts, read_summarization_data

        if r.task == "fidelity":
            texts = read_prompts(str(path), prompt_field=r.prompt_field, document_field=r.document_field,
                                 split=r.split)
        else:
            texts, refs = read_summarization_data(str(path), document_field=r.document_field,
                                                  reference_field=r.reference_field, split=r.split)
            texts = texts + [json.dumps(x) for x in refs]
        ctx.inputs[r.name] = {"source": str(path), "hash": hash_documents(texts)}
    for i, b in enumerate(cfg.audit.bias):
        path = cfg.data_path(b.data)
        if not path.exists():
            _missing(ctx, b.entry, f"audit.bias.{i}.data", path)
            continue
        data = sample_items(load_suite(b.suite, path), b.limit, cfg.train.seed)
        ctx.inputs[b.entry] = {"data": data, "hash": data.hash}
    for i, t in enumerate(cfg.audit.toxicity):
        path = cfg.data_path(t.data)
        if not path.exists():
            _missing(ctx, t.entry, f"audit.toxicity.{i}.data", path)
            continue
        suite = load_prompts(t.suite, path)
        prompts = select(suite.prompts, t.limit, cfg.train.seed)
        scorer = build_scorer(t.scorer, label=t.toxic_label)
        ctx.inputs[t.entry] = {"suite": suite, "prompts": prompts, "scorer": scorer,
                               "hash": hash_documents([p.id for p in prompts] + [suite.sha256])}
    for name in ORDER:
        st = STAGES.get(name)
        why = unavailable(st) if st.enabled(cfg) else None
        if why:
            raise StageUnavailable(f"{why}; turn it off in the config ({st.switch or f'inspect.{name}.enabled'}: "
                                   "false)")


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
        if name.endswith(("_dir", "_file")) and value:
            # a record is a file in the output folder, not to be trusted with paths that lead out of it
            if not confined(out, value, f"{path} facts.{name}").exists():
                return None
    return rec


def run_pipeline(cfg: PipelineConfig, *, force: Iterable[str] = (), progress: bool = True,
                 overwrite: bool = False) -> PipelineOutcome:
    from pocketlm.report.gates import GateNameError

    t0 = time.perf_counter()
    force = set(force)
    unknown = force - set(ORDER)
    if unknown:
        raise ValueError(f"--force {', '.join(sorted(unknown))}: no such stage; stages: {', '.join(ORDER)}")
    out = Path(cfg.output_dir)
    check_outputs(out, OUTPUTS)
    ctx = Context(cfg, out, progress=progress)
    ctx.forced = force
    check_inputs(ctx)
    # held for the run: new or a pipeline folder of ours, locked; bad input leaves no empty output folder behind
    with output_folder(out, kind="pipeline", what="output_dir", overwrite=overwrite):
        status: dict[str, dict[str, Any]] = {}
        ran, reused = [], []
        for name in ORDER:
            st = STAGES.get(name)
            if not st.enabled(cfg):
                status[name] = {"status": "off"}
                continue
            wanted = st.measures(cfg) if st.measures else None
            if wanted and all(w in ctx.skipped for w in wanted):
                status[name] = {"status": "skipped", "reason": "; ".join(f"{w}: {ctx.skipped[w]}" for w in wanted)}
                continue
            inputs = st.inputs(ctx)
            key = ctx.keys[name] = stage_key(name, inputs)
            rec_path = out / "stages" / f"{name}.json"
            rec = None if name in force else _stored(rec_path, key, out)
            if rec is not None:
                _say(f"{name}: reusing the stored results (same inputs, key {key})")
                reused.append(name)
            else:
                _say(f"{name}: running" + (" (forced)" if name in force else ""))
                t = time.perf_counter()
                output = st.run(ctx)
                rec = {"schema": STAGE_SCHEMA, "stage": name, "phase": st.phase, "key": key, "inputs": inputs,
                       "entries": [e.to_dict() for e in output.entries], "facts": output.facts,
                       "wall_time_s": time.perf_counter() - t, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                _write_json(rec_path, rec)
                ran.append(name)
                _say(f"{name}: done in {rec['wall_time_s']:.0f} s")
            ctx.records[name] = rec
            status[name] = {"status": "reused" if name in reused else "ran", "key": key,
                            "wall_time_s": rec["wall_time_s"]}
        doc = assemble(ctx, status, time.perf_counter() - t0)
        try:
            gates = check_gates(doc)
            code = 0 if all(g["passed"] for g in gates) else 1
        except GateNameError as e:
            gates, code = [{"name": "config error", "rule": "", "status": "error", "passed": False, "values": {},
                            "comparisons": [], "message": str(e)}], 2
        doc["gates"] = gates
        doc["verdict"] = {0: "pass" if gates else "no gates", 1: "fail", 2: "error"}[code]
        results_path = _write_json(out / "results.json", doc)
        from pocketlm.report.card import write_card
        from pocketlm.report.html import write_report

        report = write_report(doc, out / "report.html")
        card = None
        if "student_dir" in doc["facts"]:
            card = write_card(doc, confined(out, doc["facts"]["student_dir"], "facts.student_dir") / "README.md")
    return PipelineOutcome(doc, results_path, report, card, gates, code, ran, reused)


def assemble(ctx: Context, status: dict[str, dict[str, Any]], wall: float) -> dict[str, Any]:
    """The results.json document: every stage's entries with provenance, the config, what was left out and why."""
    cfg = ctx.cfg
    facts: dict[str, Any] = {}
    for rec in ctx.records.values():
        facts |= rec.get("facts", {})
    config = cfg.model_dump(mode="json")
    models = {r: {"spec": cfg.teacher if r == "teacher" else facts.get(f"{r}_dir"),
                  "fingerprint": facts.get(f"{r}_fingerprint")} for r in cfg.roles()}
    return {
        "schema": SCHEMA,
        "config": config,
        "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        "output_dir": str(ctx.out),
        "models": models,
        "stages": {name: {**status[name], **({"entries": ctx.records[name]["entries"]}
                                             if name in ctx.records else {})} for name in status},
        "skipped": dict(ctx.skipped),
        "facts": facts,
        "provenance": provenance(),
        "wall_time_s": wall,
    }


def entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (role, entry, results) of a pipeline document, in stage order."""
    return [e for st in doc["stages"].values() for e in st.get("entries", [])]


def check_gates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each configured gate checked against the document; GateNameError for a name no result has."""
    from pocketlm.report.gates import check_gate, namespace_from_entries

    ns = namespace_from_entries(entries(doc), doc.get("skipped", {}))
    return [check_gate(g.get("name") or g["rule"], g["rule"], ns).to_dict() for g in doc["config"]["gates"]]
