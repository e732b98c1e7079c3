"""The Task contract: one measurement of the pipeline, in one module.

A task owns
* its config section (``enabled`` reads it; ``measures`` names the sets or suites it is configured for; ``switch``
  is the field that turns it off),
* its input check (``check``: load and check its data before any model is loaded; a missing file is an error or,
  with ``missing_data: skip``, an entry left out with the reason),
* its cache key (``inputs``: what its results depend on; the pipeline hashes them into the stage key),
* ``run`` → a :class:`StageOutput`: typed ``Results`` per model role and entry (its paired deltas against the
  teacher included), plus facts for later tasks,
* how the report and the card show its results: one :class:`View` per Results ``kind`` it writes — a
  teacher-vs-student section drawn from the view, or parts the view draws itself (:class:`ReportPart`,
  :class:`CardPart`: a template and the function that prepares its variables from the pipeline document).

Tasks share a :class:`Context` within a run (the config, the checked data, the models loaded once, the facts earlier
tasks recorded). ``register`` puts a task in :data:`TASKS` (its stable name) and its views in :data:`VIEWS`
(keyed by Results kind); `pocketlm.pipeline` runs them in an explicit order.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pocketlm.core.pipeline_doc import Entry
from pocketlm.core.registry import Registry
from pocketlm.core.results import Metric, Results

__all__ = ["AUDIT_ROLES", "NAME_PATTERN", "CardPart", "Context", "Document", "Entry", "ReportPart", "StageOutput",
           "StageUnavailable", "TASKS", "Task", "VIEWS", "View", "against_teacher", "audit_inputs", "card_parts",
           "model_identity", "path_identity", "register", "report_parts", "role_entries", "say", "scoring_version",
           "stamp_matches", "unavailable", "view"]


NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # names of sets and suites: result names are gate identifiers


class StageUnavailable(RuntimeError):
    """A task whose implementation is not part of this installation."""


@dataclass
class StageOutput:
    entries: list[Entry] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # for later tasks; "*_dir"/"*_file" are relative paths


# ---------------------------------------------------------------------------------------------------- views
Document = dict[str, Any]  # the pipeline document in results.json's form (what the report and the card read)


@dataclass(frozen=True)
class ReportPart:
    """A part of the report that a view draws itself (the training curves, the size table, the deployment figures):
    a Jinja template, autoescaped like the page, and the function that prepares its variables from the document.

    Every registered part is drawn, each after a blank line, in the order of ``place`` (ties: by Results kind);
    those placed below 0 come before the teacher-vs-student sections, the others after them. A part whose
    ``context`` returns None, or whose template renders to nothing, leaves only its blank line. Today's: training
    −10; size 10, deployment 20, expert load 30, attention 40 (an explicit place, not the task order: the expert
    load, drawn from the distill results, sits between deployment and attention); a new part's default comes last."""

    context: Callable[[Document], dict[str, Any] | None]
    template: str | None = None  # a file in pocketlm/report/templates/ (by convention ``part_<name>.html.j2``)
    source: str | None = None  # or the template's source itself
    place: int = 100

    def __post_init__(self) -> None:
        if (self.template is None) == (self.source is None):
            raise ValueError("a report part has a template file or a template source, one of the two")


@dataclass(frozen=True)
class CardPart:
    """A section of the model card that a view writes itself, after the release gates: Markdown lines from the
    document (``[]``: nothing), in the order of ``place``. Text from the document goes through `present.md`."""

    lines: Callable[[Document], list[str]]
    place: int = 100


@dataclass(frozen=True)
class View:
    """How the report, the model card and the run summary show Results of one ``kind``."""

    kind: str
    section: bool = True  # a teacher-vs-student section of its own in the report (False: a dedicated part shows it)
    group_headlines: tuple[str, ...] | None = None  # figures drawn per group; () = the first plain figure
    group_label: str = "category"  # what its groups are called in the report
    samples: Callable[[str, dict[str, Any]], list[dict[str, Any]]] | None = None  # (role, results) → what it wrote
    samples_note: str = ""  # said after the number of samples
    report_note: str | None = None  # template source (Jinja, autoescaped) of a note under its table; ``s``: the section
    card_task: tuple[str, str] | None = None  # the Hub model-index task (type, name); None: not in the model-index
    evaluation_data: bool = True  # listed under the card's "Evaluation data"
    analysis: bool = True  # a table under the card's "Quantitative analyses"
    summary_rows: int = 1  # headline figures in `pocketlm run`'s summary (0: none)
    report_parts: tuple[ReportPart, ...] = ()  # parts of the report it draws itself
    card_parts: tuple[CardPart, ...] = ()  # sections of the card it writes itself


VIEWS: Registry[View] = Registry("results kind")


def view(kind: str) -> View:
    """The registered view of a Results kind (a plain teacher-vs-student section for an unknown one)."""
    return VIEWS.get(kind) if kind in VIEWS else View(kind)


def report_parts() -> list[ReportPart]:
    """Every registered view's report parts, in the order they are drawn (by place; ties by kind, then as listed)."""
    return sorted((p for kind in VIEWS for p in VIEWS.get(kind).report_parts), key=lambda p: p.place)


def card_parts() -> list[CardPart]:
    """Every registered view's card sections, in the order they are written (as :func:`report_parts`)."""
    return sorted((p for kind in VIEWS for p in VIEWS.get(kind).card_parts), key=lambda p: p.place)


# ---------------------------------------------------------------------------------------------------- the contract
class Task:
    """A pipeline measurement. Subclasses set ``name`` and ``phase`` and implement ``inputs`` and ``run``."""

    name: str = ""
    phase: str = ""  # distill | evaluate | audit | inspect | deploy
    requires: str | None = None  # a module it needs; absent → the task is not available here
    views: tuple[View, ...] = ()
    fixed_entries: tuple[str, ...] = ()  # entry names its results carry beyond its sets and suites (reserved)

    @property
    def switch(self) -> str:
        """The config field that turns it off (named when it cannot run here)."""
        return f"inspect.{self.name}.enabled"

    @property
    def turn_off(self) -> str:
        """What to write in the config to turn it off."""
        return f"{self.switch}: false"

    def enabled(self, cfg: Any) -> bool:
        return True

    def measures(self, cfg: Any) -> list[str] | None:
        """Its configured sets or suites (all skipped: nothing to run); None: it measures no data of its own."""
        return None

    def scopes(self, cfg: Any) -> list[str]:
        """The fixed entry names gates may name in this config (default: all of ``fixed_entries``)."""
        return list(self.fixed_entries)

    def check(self, ctx: Context) -> None:
        """Load and check its data before any model work (into ``ctx.inputs``; ``ctx.missing`` for absent data)."""

    def inputs(self, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, ctx: Context) -> StageOutput:
        raise NotImplementedError


class SetsTask(Task):
    """A task over a list of configured sets or suites (``eval.perplexity``, ``audit.bias``, ...), each with a
    ``data`` path and an entry name (the field ``entry_field``); on when the list is not empty."""

    section: str = ""  # the config list, dotted: "eval.perplexity"
    entry_field: str = "name"

    @property
    def switch(self) -> str:
        return self.section

    @property
    def turn_off(self) -> str:
        return f"{self.section}: []"

    def sets(self, cfg: Any) -> list:
        node = cfg
        for part in self.section.split("."):
            node = getattr(node, part)
        return list(node)

    def entry(self, item: Any) -> str:
        return getattr(item, self.entry_field)

    def enabled(self, cfg: Any) -> bool:
        return bool(self.sets(cfg))

    def measures(self, cfg: Any) -> list[str]:
        return [self.entry(x) for x in self.sets(cfg)]

    def present(self, ctx: Context) -> Iterator[tuple[Any, Path]]:
        """(set, its data path) for each set whose data is there; an absent one goes to ``ctx.missing``, named by
        its field; a set without data of its own (``data: null`` where the task allows it) is passed over."""
        for i, item in enumerate(self.sets(ctx.cfg)):
            path = ctx.cfg.data_path(item.data)
            if path is None:
                continue
            if not path.exists():
                ctx.missing(self.entry(item), f"{self.section}.{i}.data", path)
                continue
            yield item, path

    def measured(self, ctx: Context) -> list:
        """The sets whose data is there (the skipped ones are left out, with their reason)."""
        return [x for x in self.sets(ctx.cfg) if self.entry(x) not in ctx.skipped]


TASKS: Registry[Task] = Registry("pipeline stage")


def register(task: Task) -> Task:
    """Give a task its stable name and its Results kinds their views."""
    TASKS.register(task.name)(task)
    for v in task.views:
        VIEWS.register(v.kind)(v)
    return task


def unavailable(task: Task) -> str | None:
    """Why a task cannot run here (None: it can)."""
    if task.requires and importlib.util.find_spec(task.requires) is None:
        return f"stage {task.name!r} is not available: {task.requires} is not part of this installation"
    return None


def say(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- context
class Context:
    """What tasks share within one run; models are loaded on first use and kept."""

    def __init__(self, cfg: Any, out: Path, *, progress: bool = True) -> None:
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

    def missing(self, entry: str, where: str, path: Path) -> None:
        """Data that is not there: an error, or with ``missing_data: skip`` the entry left out with the reason."""
        if self.cfg.missing_data == "skip":
            self.skipped[entry] = f"its data {path} is not there ({where}); left out because missing_data is skip"
            say(f"{entry}: skipped — {self.skipped[entry]}")
            return
        raise FileNotFoundError(f"{where}: data not found: {path} (fix the path, or set missing_data: skip to leave "
                                f"{entry} out with the reason stated)")

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


# ---------------------------------------------------------------------------------------------------- shared helpers
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


def stamp_matches(stamp: Path, key: str) -> bool:
    """Whether a stage folder's key stamp records `key` (a missing or damaged stamp matches nothing)."""
    return stamp.is_file() and stamp.read_bytes().strip() == key.encode()


def role_entries(entry: str, role_results: dict[str, Results]) -> list[Entry]:
    return [Entry(role, entry, res) for role, res in role_results.items()]


def against_teacher(by_role: dict[str, Results], deltas: Callable[[Results, Results], list[Metric]]) -> None:
    """Every other model's results get the teacher as baseline and their paired deltas to it."""
    for role, res in by_role.items():
        if role != "teacher":
            res.metrics += deltas(res, by_role["teacher"])
            res.baseline = by_role["teacher"].model



def scoring_version(*, packs_bf16: bool = False) -> dict[str, Any]:
    """What log-likelihood arithmetic a stored figure was made with (part of the keys of the tasks that score):
    the positions bf16 computes in fp32 and the bf16 error bound near ties are re-scored within; and, for a task
    whose bf16 runs pack shared prefixes (``packs_bf16``: bias suites in bf16 or auto), that they do (they did
    not before the packing probe ran in fp32; their bf16 answers differ in the last digits). fp32 runs and
    perplexity, which has no shared prefixes, keep their keys."""
    from pocketlm.eval.bf16_bound import BF16_ERROR_PER_SQRT_TOKEN
    from pocketlm.eval.loglik import EXACT_POSITIONS

    version = {"bf16_exact_positions": EXACT_POSITIONS, "bf16_error_per_sqrt_token": BF16_ERROR_PER_SQRT_TOKEN}
    return {**version, "bf16_packed": True} if packs_bf16 else version


AUDIT_ROLES = ("teacher", "student")  # the audits compare these two on the same items


def audit_inputs(ctx: Context, task: SetsTask) -> dict[str, Any]:
    """The key inputs of an audit task (its suites in the ``audit`` config section)."""
    return {"suites": [{**s.model_dump(mode="json"), "data": ctx.inputs[s.entry]["hash"]}
                       for s in task.measured(ctx)],
            "models": ctx.fingerprints(list(AUDIT_ROLES)), "seed": ctx.seed, "n_resamples": ctx.cfg.audit.n_resamples}
