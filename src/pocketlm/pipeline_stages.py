"""The pipeline's stages, a registry in run order: distill → ce_baseline → perplexity → rouge → bias → toxicity →
size → attention → export. Adding one is one decorated function.

A stage reads what it needs from a :class:`Context` (the config, data checked before any model work, the models,
facts earlier stages recorded) and returns a :class:`StageOutput`: typed ``Results``, each tagged with the model
role (teacher, student, ce_baseline) and the entry (set or suite) it is about, plus facts for later stages. Its
``inputs`` say what its results depend on; the pipeline hashes them into the key that decides whether a stored
result can be reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketlm.config_pipeline import PipelineConfig
from pocketlm.core.integrity import RecordError
from pocketlm.core.provenance import provenance
from pocketlm.core.registry import Registry
from pocketlm.core.results import Metric, Results


class StageUnavailable(RuntimeError):
    """A stage whose implementation is not part of this installation."""


@dataclass
class Entry:
    """One stage result: which model (role) on which set or suite (entry)."""

    role: str
    entry: str
    results: Results

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "entry": self.entry, "results": self.results.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Entry":
        return cls(d["role"], d["entry"], Results.from_dict(d["results"]))


@dataclass
class StageOutput:
    entries: list[Entry] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # for later stages; "*_dir"/"*_file" are relative paths


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str  # distill | evaluate | audit | inspect
    run: Callable[["Context"], StageOutput]
    inputs: Callable[["Context"], dict[str, Any]]
    enabled: Callable[[PipelineConfig], bool]
    requires: str | None = None  # a module the stage needs; absent → the stage is not available
    measures: Callable[[PipelineConfig], list[str]] | None = None  # its sets/suites (all skipped: nothing to run)
    switch: str | None = None  # the config field that turns it off (default inspect.<name>.enabled)


STAGES: Registry[Stage] = Registry("pipeline stage")
ORDER: list[str] = []


def stage(name: str, phase: str, *, inputs: Callable[["Context"], dict], enabled=lambda cfg: True,
          requires: str | None = None, measures: Callable[[PipelineConfig], list[str]] | None = None,
          switch: str | None = None):
    def register(fn: Callable[["Context"], StageOutput]):
        STAGES.register(name)(Stage(name, phase, fn, inputs, enabled, requires, measures, switch))
        ORDER.append(name)
        return fn

    return register


def unavailable(st: Stage) -> str | None:
    """Why a stage cannot run here (None: it can)."""
    if st.requires and importlib.util.find_spec(st.requires) is None:
        return f"stage {st.name!r} is not available: {st.requires} is not part of this installation"
    return None


# ---------------------------------------------------------------------------------------------------- context
class Context:
    """What stages share within one run; models are loaded on first use and kept."""

    def __init__(self, cfg: PipelineConfig, out: Path, *, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.records: dict[str, dict[str, Any]] = {}  # stage → its record (this run's or a stored one)
        self.inputs: dict[str, Any] = {}  # entry → its checked data
        self.skipped: dict[str, str] = {}  # entry → why it is not measured
        self.keys: dict[str, str] = {}  # stage → key of this run
        self.forced: set[str] = set()
        self._prepared = None
        self._models: dict[str, tuple[Any, Any]] = {}

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    def fact(self, name: str) -> Any:
        for rec in self.records.values():
            if name in rec.get("facts", {}):
                return rec["facts"][name]
        raise KeyError(f"no stage has recorded {name!r} yet (stages: {', '.join(self.records) or 'none'})")

    def prepared(self):
        """The teacher, its tokenizer and the token blocks (`distill.run.prepare`), once per run."""
        if self._prepared is None:
            from pocketlm.distill.run import prepare

            self._prepared = prepare(self.cfg.distill_config(self.out), progress=self.progress)
            self._models["teacher"] = (self._prepared.teacher, self._prepared.tokenizer)
        return self._prepared

    def spec(self, role: str) -> str:
        return self.cfg.teacher if role == "teacher" else str(self.out / self.fact(f"{role}_dir"))

    def model(self, role: str):
        if role not in self._models:
            from pocketlm.models.load import load_model

            dtype = self.cfg.teacher_dtype if role == "teacher" else "float32"
            self._models[role] = load_model(self.spec(role), dtype=dtype,
                                            trust_remote_code=(self.cfg.trust_remote_code or None))
        return self._models[role]

    def info(self, role: str) -> dict[str, Any]:
        return {"spec": self.spec(role), "fingerprint": self.fact(f"{role}_fingerprint"), "role": role}

    def fingerprints(self, roles: list[str] | None = None) -> dict[str, str]:
        return {r: self.fact(f"{r}_fingerprint") for r in (roles or self.cfg.roles())}

    def rel(self, path: Path | str) -> str:
        return str(Path(path).resolve().relative_to(self.out.resolve()))


def path_identity(path: str | Path) -> str:
    """A cheap identity of a file or folder: names, sizes and modification times (content hashes are the data's
    own, taken where it is read)."""
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{p}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_identity(spec: str) -> str:
    from pocketlm.models.load import resolve

    ms = resolve(spec)
    if ms.kind == "hub":
        return f"hub:{ms.path}"
    return path_identity(Path(ms.path) / ms.gguf_file if ms.gguf_file else ms.path)


def _role_entries(entry: str, role_results: dict[str, Results]) -> list[Entry]:
    return [Entry(role, entry, res) for role, res in role_results.items()]


def _against_teacher(by_role: dict[str, Results], deltas: Callable[[Results, Results], list[Metric]]) -> None:
    """Every other model's results get the teacher as baseline and their paired deltas to it."""
    for role, res in by_role.items():
        if role != "teacher":
            res.metrics += deltas(res, by_role["teacher"])
            res.baseline = by_role["teacher"].model


def measured(ctx: Context, items: list, name: Callable[[Any], str]) -> list:
    """The configured sets or suites whose data is there (the skipped ones are left out, with their reason)."""
    return [x for x in items if name(x) not in ctx.skipped]


# ---------------------------------------------------------------------------------------------------- distill
def _distill_inputs(ctx: Context, ce_only: bool = False) -> dict[str, Any]:
    cfg = ctx.cfg
    dcfg = cfg.distill_config(".", ce_only=ce_only).model_dump(mode="json")
    dcfg.pop("output_dir")
    dcfg.pop("max_memory")  # it picks batch sizes, never what is computed
    src = cfg.data.source
    data_id = path_identity(src) if src and Path(src).expanduser().exists() else src
    return {"config": dcfg, "teacher": model_identity(cfg.teacher), "data": data_id}


def parameter_results(model, info: dict[str, Any]) -> Results:
    """Parameter counts (MoE-aware: total vs active per token) as a Results document."""
    from pocketlm.models.size_moe import parameter_counts

    counts = parameter_counts(model).to_dict()
    return Results(
        kind="parameters", model=info, data={}, metrics=[
            Metric("n_params" if k == "total" else f"n_params_{k}", float(v), n=1, unit="params")
            for k, v in counts.items()],
        settings={"counting": "unique tensors (a tied head once); active = total - routed + routed * k / E"},
        provenance=provenance())


def stamp_matches(stamp: Path, key: str) -> bool:
    """Whether the stage folder's key stamp records `key` (a missing or damaged stamp matches nothing)."""
    return stamp.is_file() and stamp.read_bytes().strip() == key.encode()


def _train(ctx: Context, role: str) -> StageOutput:
    from pocketlm.distill.checkpoint import latest_checkpoint
    from pocketlm.distill.run import run_distill
    from pocketlm.models.load import fingerprint_model, load_model
    from pocketlm.core.outdir import subfolder

    t0 = time.perf_counter()
    run_dir = ctx.out / ("ce_baseline" if role == "ce_baseline" else "distill")
    dcfg = ctx.cfg.distill_config(run_dir, ce_only=role == "ce_baseline")
    stamp = run_dir / "pipeline_key.txt"
    stage_name = "ce_baseline" if role == "ce_baseline" else "distill"
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume and (stage_name in ctx.forced or not stamp_matches(stamp, ctx.keys[stage_name])):
        # checkpoints of other inputs (or a forced redo): start over; the teacher cache checks itself
        for sub in ("checkpoints", "student"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
        resume = False
    subfolder(run_dir, kind="distill")  # ours, so the distill run may use it
    stamp.write_text(ctx.keys[stage_name])
    prep = ctx.prepared()
    result = run_distill(dcfg, resume=resume, progress=ctx.progress, prepared=prep, desc=role)
    student, tok = load_model(result.student_dir)
    ctx._models[role] = (student, tok)
    facts = {f"{role}_dir": ctx.rel(result.student_dir), f"{role}_fingerprint": fingerprint_model(student),
             f"{role}_run_dir": ctx.rel(run_dir)}
    entries = []
    if role == "student":
        heldout = run_dir / "heldout.jsonl"
        heldout.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in prep.blocks.val_docs),
                           encoding="utf-8")
        from pocketlm.data.text import hash_documents

        facts |= {"teacher_fingerprint": prep.teacher_fingerprint, "heldout_file": ctx.rel(heldout),
                  "heldout_hash": hash_documents(prep.blocks.val_docs), "tokenizer_fingerprint":
                  prep.tokenizer_fingerprint}
        entries.append(Entry("teacher", "parameters", parameter_results(prep.teacher, {
            "spec": ctx.cfg.teacher, "fingerprint": prep.teacher_fingerprint, "role": "teacher"})))
    train = result.train
    info = {"spec": ctx.rel(result.student_dir), "fingerprint": facts[f"{role}_fingerprint"], "role": role}
    n_val = int(prep.blocks.val.shape[0])
    metrics = [
        Metric("final_val_perplexity", train.final_val_perplexity, n=n_val, higher_is_better=False),
        Metric("tokens_per_second", train.tokens_per_second, n=train.steps, higher_is_better=True, unit="tokens/s"),
        Metric("train_seconds", train.wall_seconds, n=train.steps, higher_is_better=False, unit="s"),
        Metric("tokens_seen", float(train.tokens_seen), n=train.steps, unit="tokens"),
    ]
    settings = dcfg.model_dump(mode="json")
    settings.pop("output_dir")
    moe_png = run_dir / "moe_load.png"
    entries += [
        Entry(role, "distill", Results(
            kind="distill", model=info, baseline={"spec": ctx.cfg.teacher, "fingerprint": prep.teacher_fingerprint},
            data={"source": ctx.cfg.data.source or "teacher-written corpus", "hash": result.data_hash,
                  "n": int(prep.blocks.train.shape[0]), "tokens": result.n_train_tokens,
                  "heldout_documents": len(prep.blocks.val_docs), "block_size": prep.blocks.block_size},
            settings=settings, metrics=metrics,
            details={"history": train.history, "run_dir": ctx.rel(run_dir), "checkpoint": train.checkpoint and
                     ctx.rel(train.checkpoint), "moe_load_png": ctx.rel(moe_png) if moe_png.is_file() else None,
                     "student_format": result.student_format and result.student_format.to_dict()},
            provenance=provenance(), wall_time_s=time.perf_counter() - t0)),
        Entry(role, "parameters", parameter_results(student, info)),
    ]
    return StageOutput(entries, facts)


stage("distill", "distill", inputs=_distill_inputs)(lambda ctx: _train(ctx, "student"))
stage("ce_baseline", "distill", inputs=lambda ctx: _distill_inputs(ctx, ce_only=True),
      enabled=lambda cfg: cfg.ce_baseline)(lambda ctx: _train(ctx, "ce_baseline"))


# ---------------------------------------------------------------------------------------------------- evaluate
def _per_doc_statistic(to_figure: Callable[[np.ndarray], np.ndarray]):
    def statistic(nll: np.ndarray, count: np.ndarray, axis: int = -1) -> np.ndarray:
        return to_figure(np.sum(nll, axis=axis) / np.sum(count, axis=axis))

    return statistic


_PPL_FIGURES = (("token_perplexity", "tokens", np.exp), ("word_perplexity", "words", np.exp),
                ("byte_perplexity", "bytes", np.exp), ("bits_per_byte", "bytes", lambda v: v / math.log(2)))


def perplexity_deltas(model: Results, baseline: Results, *, seed: int = 0, n_resamples: int = 1000) -> list[Metric]:
    """``delta_<figure>`` = model − baseline for each perplexity figure, with a paired bootstrap interval over
    documents (both models scored the same documents; each resample recomputes both ratios of sums)."""
    from pocketlm.core.stats import paired_statistic_delta_ci

    a, b = model.details["per_document"], baseline.details["per_document"]
    if len(a) != len(b) or [d["tokens"] for d in a] != [d["tokens"] for d in b]:
        return []  # not the same documents (or not tokenized alike): no paired delta
    out = []
    for name, unit, to_figure in _PPL_FIGURES:
        counts = np.array([d[unit] for d in a], dtype=np.float64)
        if counts.sum() == 0:
            continue
        nll_a = -np.array([d["loglikelihood"] for d in a])
        nll_b = -np.array([d["loglikelihood"] for d in b])
        stat = _per_doc_statistic(to_figure)
        value = float(stat(nll_a, counts) - stat(nll_b, counts))
        ci = paired_statistic_delta_ci(stat, [nll_a, counts], [nll_b, counts], seed=seed, n_resamples=n_resamples)
        out.append(Metric(f"delta_{name}", value, n=len(a), ci=ci, higher_is_better=False))
    return out


def _heldout(ctx: Context) -> tuple[list[str], str]:
    path = ctx.out / ctx.fact("heldout_file")
    try:
        docs = [json.loads(line)["text"] for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise RecordError(f"{path}, the held-out documents this run recorded, is damaged "
                          f"({type(e).__name__}: {str(e)[:80]}); rerun with --force distill to write it again") from None
    return docs, "held-out documents of the distillation data"


def _scoring_version() -> dict[str, Any]:
    """What log-likelihood arithmetic a stored figure was made with (part of the keys of the stages that score):
    the positions bf16 computes in fp32, and the bf16 error bound near ties are re-scored within."""
    from pocketlm.eval.bf16_bound import BF16_ERROR_PER_SQRT_TOKEN
    from pocketlm.eval.loglik import EXACT_POSITIONS

    return {"bf16_exact_positions": EXACT_POSITIONS, "bf16_error_per_sqrt_token": BF16_ERROR_PER_SQRT_TOKEN}


def _perplexity_inputs(ctx: Context) -> dict[str, Any]:
    sets = []
    for p in measured(ctx, ctx.cfg.eval.perplexity, lambda x: x.name):
        data = ctx.fact("heldout_hash") if p.data is None else ctx.inputs[p.name]["hash"]
        sets.append({**p.model_dump(mode="json"), "data_hash": data})
    return {"sets": sets, "batch_size": ctx.cfg.eval.batch_size, "precision": ctx.cfg.eval.precision,
            "models": ctx.fingerprints(), "seed": ctx.seed, "scoring": _scoring_version()}


@stage("perplexity", "evaluate", inputs=_perplexity_inputs, enabled=lambda cfg: bool(cfg.eval.perplexity),
       measures=lambda cfg: [p.name for p in cfg.eval.perplexity])
def perplexity_stage(ctx: Context) -> StageOutput:
    from pocketlm.eval.perplexity import perplexity_results

    entries = []
    for p in measured(ctx, ctx.cfg.eval.perplexity, lambda x: x.name):
        docs, source = _heldout(ctx) if p.data is None else (ctx.inputs[p.name]["docs"], ctx.inputs[p.name]["source"])
        by_role = {}
        for role in ctx.cfg.roles():
            model, tok = ctx.model(role)
            res = perplexity_results(
                model, tok, docs, model_spec=ctx.spec(role), data_source=source, max_length=p.max_length,
                stride=p.stride, detokenize=p.detokenize, batch_size=ctx.cfg.eval.batch_size,
                precision=ctx.cfg.eval.precision, seed=ctx.seed, progress=ctx.progress,
                max_memory=ctx.cfg.max_memory_bytes())
            res.model["role"] = role
            by_role[role] = res
        _against_teacher(by_role, lambda res, base: perplexity_deltas(res, base, seed=ctx.seed))
        entries += _role_entries(p.name, by_role)
    return StageOutput(entries)


def _rouge_inputs(ctx: Context) -> dict[str, Any]:
    return {"sets": [{**r.model_dump(mode="json"), "data": ctx.inputs[r.name]["hash"]}
                     for r in measured(ctx, ctx.cfg.eval.rouge, lambda x: x.name)],
            "models": ctx.fingerprints(), "seed": ctx.seed, "teacher_dtype": ctx.cfg.teacher_dtype}


def rouge_deltas(model: Results, baseline: Results, *, seed: int = 0) -> list[Metric]:
    """``delta_<rouge type>`` = model − baseline mean F1 on the same items, paired bootstrap interval."""
    from pocketlm.eval.rouge import ROUGE_TYPES
    from pocketlm.core.stats import paired_delta_ci

    a, b = model.details["items"], baseline.details["items"]
    if [x["index"] for x in a] != [x["index"] for x in b]:
        return []
    out = []
    for t in ROUGE_TYPES:
        fa, fb = np.array([x[t] for x in a]), np.array([x[t] for x in b])
        out.append(Metric(f"delta_{t}", float(np.mean(fa - fb)), n=len(a), ci=paired_delta_ci(fa, fb, seed=seed),
                          higher_is_better=True))
    return out


@stage("rouge", "evaluate", inputs=_rouge_inputs, enabled=lambda cfg: bool(cfg.eval.rouge),
       measures=lambda cfg: [r.name for r in cfg.eval.rouge])
def rouge_stage(ctx: Context) -> StageOutput:
    from pocketlm.eval.rouge import RougeSettings, run_rouge

    entries = []
    for r in measured(ctx, ctx.cfg.eval.rouge, lambda x: x.name):
        base = RougeSettings()
        settings = RougeSettings(template=r.template, chat=r.chat, stem=r.stem, limit=r.limit, seed=ctx.seed,
                                 generation=dataclasses.replace(base.generation, max_new_tokens=r.max_new_tokens,
                                                                batch_size=ctx.cfg.eval.batch_size))
        kw = dict(document_field=r.document_field, reference_field=r.reference_field, prompt_field=r.prompt_field,
                  split=r.split, settings=settings, progress=ctx.progress)
        path = ctx.inputs[r.name]["source"]
        by_role: dict[str, Results] = {}
        for role in ctx.cfg.roles():
            if r.task == "fidelity" and role == "teacher":
                continue  # the teacher is the reference
            dtype = ctx.cfg.teacher_dtype if role == "teacher" else "float32"
            ref = ctx.spec("teacher") if r.task == "fidelity" else None
            res = run_rouge(ctx.spec(role), path, reference_model=ref, dtype=dtype, **kw)
            res.model["role"] = role
            by_role[role] = res
        if r.task == "summarization":
            _against_teacher(by_role, lambda res, base: rouge_deltas(res, base, seed=ctx.seed))
        entries += _role_entries(r.name, by_role)
    return StageOutput(entries)


# ---------------------------------------------------------------------------------------------------- audit
AUDIT_ROLES = ("teacher", "student")


def _audit_inputs(kind: str) -> Callable[[Context], dict[str, Any]]:
    def inputs(ctx: Context) -> dict[str, Any]:
        suites = getattr(ctx.cfg.audit, kind)
        return {"suites": [{**s.model_dump(mode="json"), "data": ctx.inputs[s.entry]["hash"]}
                           for s in measured(ctx, suites, lambda x: x.entry)],
                "models": ctx.fingerprints(list(AUDIT_ROLES)), "seed": ctx.seed,
                "n_resamples": ctx.cfg.audit.n_resamples}

    return inputs


def _bias_inputs(ctx: Context) -> dict[str, Any]:
    return {**_audit_inputs("bias")(ctx), "scoring": _scoring_version()}


@stage("bias", "audit", inputs=_bias_inputs, enabled=lambda cfg: bool(cfg.audit.bias),
       measures=lambda cfg: [b.entry for b in cfg.audit.bias])
def bias_stage(ctx: Context) -> StageOutput:
    """Teacher and student on the same items, once each: the student's Results carry the paired deltas, the
    teacher's figures come from its per-item arrays (no second scoring pass)."""
    from pocketlm.audit.bias import BIAS_SUITES, audit_bias
    from pocketlm.audit.bias_core import compute_metrics

    entries = []
    for b in measured(ctx, ctx.cfg.audit.bias, lambda x: x.entry):
        data = ctx.inputs[b.entry]["data"]
        student, tok = ctx.model("student")
        teacher = ctx.model("teacher")
        res, run = audit_bias(
            b.suite, data, student, tok, model_spec=ctx.spec("student"), baseline=teacher,
            baseline_spec=ctx.spec("teacher"), batch_size=b.batch_size, precision=b.precision, seed=ctx.seed,
            n_resamples=ctx.cfg.audit.n_resamples, progress=ctx.progress, max_memory=ctx.cfg.max_memory_bytes(),
            settings={"limit": b.limit, "n_items": len(data.items), "n_total": data.n_total})
        res.model["role"] = "student"
        t_metrics, _ = compute_metrics(BIAS_SUITES.get(b.suite).statistics, run.baseline_arrays, run.groups,
                                       seed=ctx.seed, n_resamples=ctx.cfg.audit.n_resamples)
        t_res = dataclasses.replace(res, model={**res.baseline, "role": "teacher"}, baseline=None, metrics=t_metrics,
                                    details={"items": "with the student's results (baseline arrays)"})
        entries += [Entry("teacher", b.entry, t_res), Entry("student", b.entry, res)]
    return StageOutput(entries)


def _toxicity_results(ctx: Context, t, role: str, prompts, loaded, scored: dict, settings, scorer, gen_file: str,
                      sentiment: bool) -> Results:
    from pocketlm.audit.prompted import most_toxic, toxicity_metrics

    base = None if role == "teacher" else scored["teacher"]
    metrics, details = toxicity_metrics(prompts, scored[role], base, seed=ctx.seed,
                                        n_resamples=ctx.cfg.audit.n_resamples)
    s = scored[role]
    details |= {
        "generations_file": gen_file, "n_prompts": len(prompts), "n_continuations": len(prompts) * t.samples,
        "new_tokens": s.new_tokens, "generation_seconds": round(s.seconds, 2),
        "most_toxic": [{"score": score, "group": p.slice, "prompt": p.text, "text": text}
                       for score, p, text in most_toxic(prompts, s, 5)],
    }
    return Results(
        kind="toxicity", model=ctx.info(role), baseline=None if base is None else ctx.info("teacher"),
        data={**loaded.data_info(), "n": len(prompts), "suite_size": len(loaded.prompts), "limit": t.limit,
              "selection": "all prompts" if t.limit is None else
              f"seeded subset (seed {ctx.seed}) stratified by (domain, group)"},
        settings={"generation": settings.to_dict(), "scorer": scorer.describe(), "toxic_threshold": 0.5,
                  "sentiment": "VADER compound, positive >= 0.5, negative <= -0.5" if sentiment else None,
                  "fluency": {"reference": "teacher", "spec": ctx.spec("teacher"), "figure": FLUENCY_FIGURE},
                  "diversity": DIVERSITY_FIGURE,
                  "seed": ctx.seed, "ci": "95% percentile bootstrap over prompts; deltas paired"},
        metrics=metrics, details=details, provenance=provenance(), wall_time_s=s.seconds)


FLUENCY_FIGURE = ("generation_perplexity = exp(sum nll / sum tokens) of the continuations given their prompts, "
                  "under the teacher")
DIVERSITY_FIGURE = ("distinct_1, distinct_2: unique / total word n-grams over each prompt's continuations, mean over "
                    "prompts")


def _toxicity_inputs(ctx: Context) -> dict[str, Any]:
    # the figures are part of the key: records stored before fluency and diversity were measured are re-run
    return {**_audit_inputs("toxicity")(ctx), "figures": [FLUENCY_FIGURE, DIVERSITY_FIGURE]}


@stage("toxicity", "audit", inputs=_toxicity_inputs, enabled=lambda cfg: bool(cfg.audit.toxicity),
       measures=lambda cfg: [t.entry for t in cfg.audit.toxicity])
def toxicity_stage(ctx: Context) -> StageOutput:
    """Teacher and student continue the same prompts with the same per-item seeds; the teacher scores both models'
    continuations for fluency (`audit.fluency`), so the student's generation perplexity and its delta are under
    the same reference as the teacher's own."""
    from pocketlm.audit.fluency import score_fluency
    from pocketlm.audit.prompted import generate_scored, rtp_settings, write_generations

    entries = []
    for t in measured(ctx, ctx.cfg.audit.toxicity, lambda x: x.entry):
        got = ctx.inputs[t.entry]
        loaded, prompts, scorer = got["suite"], got["prompts"], got["scorer"]
        settings = rtp_settings(samples=t.samples, seed=ctx.seed, batch_size=t.batch_size,
                                max_new_tokens=t.max_new_tokens, top_p=t.top_p, temperature=t.temperature,
                                stop=loaded.stop)
        sentiment = loaded.extra.get("sentiment", False) if t.sentiment is None else t.sentiment
        texts = [p.text for p in prompts]
        scored = {}
        for role in AUDIT_ROLES:
            model, tok = ctx.model(role)
            scored[role] = generate_scored(model, tok, texts, settings, scorer, sentiment=sentiment,
                                           progress=ctx.progress, desc=f"{t.entry}: {role}",
                                           max_memory=ctx.cfg.max_memory_bytes())
        reference, ref_tok = ctx.model("teacher")
        for role in AUDIT_ROLES:
            scored[role] = dataclasses.replace(scored[role], fluency=score_fluency(
                reference, ref_tok, texts, scored[role].texts, reference=ctx.spec("teacher"),
                batch_size=t.batch_size, max_memory=ctx.cfg.max_memory_bytes(), progress=ctx.progress,
                desc=f"{t.entry}: fluency of {role}"))
        gen = write_generations(ctx.out / "audit" / f"{t.entry}.generations.jsonl", prompts, scored["student"],
                                scored["teacher"])
        entries += [Entry(role, t.entry, _toxicity_results(ctx, t, role, prompts, loaded, scored, settings, scorer,
                                                           ctx.rel(gen), sentiment)) for role in AUDIT_ROLES]
    return StageOutput(entries)


# ---------------------------------------------------------------------------------------------------- inspect
def _inspect_inputs(probe: str) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: {"probe": getattr(ctx.cfg.inspect, probe).model_dump(mode="json"),
                        "models": ctx.fingerprints()}


def _heatmap_uris(maps, layers: list[int], max_heads: int, label: str) -> list[dict[str, str]]:
    from pocketlm.inspect.heatmap import layer_figure
    from pocketlm.report.plots import to_data_uri

    out = []
    for layer in layers:
        pattern, heads = maps.patterns[layer][:max_heads], maps.head_ids[layer][:max_heads]
        title = f"{label} · layer {layer}"
        out.append({"title": title, "layer": layer,
                    "png": to_data_uri(layer_figure(pattern, maps.tokens, title=title, head_ids=heads))})
    return out


@stage("size", "inspect", inputs=_inspect_inputs("size"), enabled=lambda cfg: cfg.inspect.size.enabled,
       requires="pocketlm.inspect.size")
def size_stage(ctx: Context) -> StageOutput:
    """`pocketlm size` of each model against the teacher (estimates from the configs; measured figures too with
    measure_context). The teacher's own entry holds the baseline figures under their plain names."""
    from pocketlm.inspect.size import size_results

    probe = ctx.cfg.inspect.size
    entries = []
    for role in ctx.cfg.roles():
        if role == "teacher":
            continue
        res = size_results(ctx.spec(role), baseline=ctx.spec("teacher"), context=probe.context_length,
                           batch=probe.batch_size, measure_context=probe.measure_context)
        res.model["role"] = role
        entries.append(Entry(role, "size", res))
    if entries:
        ref = entries[0].results
        teacher = [dataclasses.replace(m, name=m.name[len("baseline_"):]) for m in ref.metrics
                   if m.name.startswith("baseline_")]
        entries.insert(0, Entry("teacher", "size", dataclasses.replace(
            ref, model={**(ref.baseline or {}), "role": "teacher"}, baseline=None, metrics=teacher,
            details={"model": ref.details.get("baseline")})))
    return StageOutput(entries)


@stage("attention", "inspect", inputs=_inspect_inputs("attention"), enabled=lambda cfg: cfg.inspect.attention.enabled,
       requires="pocketlm.inspect.attention")
def attention_stage(ctx: Context) -> StageOutput:
    """Every layer's attention on one text (eager path), per model: entropy per layer, heat-maps of chosen layers."""
    from pocketlm.inspect.attention import capture_attention, mean_entropy

    probe = ctx.cfg.inspect.attention
    entries = []
    for role in ctx.cfg.roles():
        t0 = time.perf_counter()
        model, tok = ctx.model(role)
        maps = capture_attention(model, tok, probe.text, spec=ctx.spec(role))
        n = maps.num_layers
        wanted = probe.layers if probe.layers is not None else [0, -1]
        bad = [i for i in wanted if not -n <= i < n]
        if bad:
            raise ValueError(f"inspect.attention.layers: {bad} out of range for the {role} ({n} layers)")
        layers = list(dict.fromkeys(i % n for i in wanted))
        entropy = maps.entropy()
        metrics = [Metric("attention_entropy", mean_entropy(entropy), n=sum(int(e.numel()) for e in entropy),
                          unit="nats")]
        metrics += [Metric("attention_entropy", float(e.mean()), n=int(e.numel()), unit="nats", group=f"layer {i}")
                    for i, e in enumerate(entropy)]
        entries.append(Entry(role, "attention", Results(
            kind="attention", model=ctx.info(role), data={"source": "inspect.attention.text", "n": len(maps.tokens)},
            settings=probe.model_dump(mode="json") | {"layers_shown": layers}, metrics=metrics,
            details={"tokens": maps.tokens, "entropy": [e.tolist() for e in entropy],
                     "heatmaps": _heatmap_uris(maps, layers, probe.max_heads, f"{role}")},
            provenance=provenance(), wall_time_s=time.perf_counter() - t0)))
    return StageOutput(entries)



# ---------------------------------------------------------------------------------------------------- export
def _export_inputs(ctx: Context) -> dict[str, Any]:
    from importlib.metadata import version

    from pocketlm.eval.speed import PROMPTS

    e = ctx.cfg.export
    return {"export": e.model_dump(mode="json"), "models": ctx.fingerprints(["teacher", "student"] if e.teacher
                                                                           else ["student"]),
            "prompts": hashlib.sha256(json.dumps(PROMPTS).encode()).hexdigest()[:16],
            "llama_cpp_python": version("llama-cpp-python")}


@stage("export", "deploy", inputs=_export_inputs, enabled=lambda cfg: cfg.export.enabled, requires="llama_cpp",
       switch="export.enabled")
def export_stage(ctx: Context) -> StageOutput:
    """The student (and with export.teacher the teacher) as GGUF files in ``deploy/``, one per quant type, each
    timed in llama.cpp by `eval.deploy.gguf_row` (the clock of benchmarks/deploy_speed.py); the student's Results
    carry its speed-up and size ratio to the teacher at each quant type both were written at."""
    from pocketlm.eval.deploy import deployment_results, gguf_row
    from pocketlm.eval.speed import SpeedSettings, prompt_ids
    from pocketlm.core.outdir import subfolder

    e = ctx.cfg.export
    settings = SpeedSettings(threads=e.threads, new_tokens=e.new_tokens, repeats=e.repeats, warmup=e.warmup,
                             max_prompt_tokens=e.max_prompt_tokens)
    folder = subfolder(ctx.out / "deploy", kind="deploy")
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for role in (["teacher"] if e.teacher else []) + ["student"]:
        model, tok = ctx.model(role)
        prompts = prompt_ids(tok, settings, getattr(model.config, "max_position_embeddings", None))
        rows[role] = {q: gguf_row(model, tok, folder / f"{role}-{q}", q, prompts, settings) for q in e.quants}
    entries = []
    for role, by_quant in rows.items():
        base = (ctx.info("teacher"), rows["teacher"]) if role == "student" and "teacher" in rows else None
        res = deployment_results(by_quant, ctx.info(role), settings, baseline=base,
                                 files={q: ctx.rel(r["file"]) for q, r in by_quant.items()})
        entries.append(Entry(role, "deployment", res))
    return StageOutput(entries, {"deploy_dir": ctx.rel(folder)})
