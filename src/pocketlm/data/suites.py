"""Benchmark suites: loaders with stable names that turn a suite's files, or its Hugging Face hub copy, into typed
items.

A suite is registered once under a stable name (``SUITES``) and loads from

* a local path — a file, or a folder laid out as the suite's upstream repository ships it (the layouts under
  ``../shared/data``: ``crows_pairs/crows_pairs_anonymized.csv``, ``stereoset_intrasentence_subset/*.json``,
  ``bbq/*.jsonl``, ``winobias/{pro,anti}_stereotyped_type{1,2}.txt.test``), or
* a hub dataset name (online only) through ``datasets.load_dataset``; ``source=None`` means the suite's default
  hub copy (the one lm-evaluation-harness reads, where it has the suite).

Every row is checked before any model work: a missing column or field is an error naming the file, the line and
the column. Items carry ids, never positions, so a subset (``sample_items``) and a baseline run refer to the same
items. Offensive text lives only in the items; nothing here prints it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from pocketlm.core.registry import Registry


class SuiteError(ValueError):
    """A suite file or dataset that cannot be read as the suite (names the file, line and column)."""


# ---------------------------------------------------------------------------------------------------- typed items


@dataclass(frozen=True)
class CrowsPair:
    """One CrowS-Pairs pair (Nangia et al. 2020): a minimal edit between a more and a less stereotyping sentence."""

    id: str  # the CSV's row index
    sent_more: str
    sent_less: str
    stereo_antistereo: str  # "stereo" | "antistereo"
    bias_type: str

    @property
    def group(self) -> str:
        return self.bias_type


@dataclass(frozen=True)
class StereoSetItem:
    """One StereoSet intrasentence item (Nadeem et al. 2021): a context with a BLANK and its three fillings."""

    id: str
    target: str  # the term the stereotype is about ("Ethiopian", "schoolgirl")
    bias_type: str  # the domain: gender | profession | race | religion
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str
    label_source: str = "gold"  # "gold": StereoSet's gold_label; "editbias-map": only EditBias's label map

    @property
    def group(self) -> str:
        return self.bias_type


@dataclass(frozen=True)
class BBQItem:
    """One BBQ question (Parrish et al. 2022) with the answer roles read from its metadata.

    ``unknown`` is the index of the "can't be determined" answer; ``biased`` holds the indices of the answers
    that reflect the attested bias (see `bbq_answer_roles`).
    """

    id: str  # "<category>/<example_id>"
    category: str
    context_condition: str  # "ambig" | "disambig"
    question_polarity: str  # "neg" | "nonneg"
    context: str
    question: str
    answers: tuple[str, str, str]
    label: int
    unknown: int
    biased: tuple[int, ...]

    @property
    def group(self) -> str:
        return self.category


@dataclass(frozen=True)
class WinoBiasPair:
    """One WinoBias sentence (Zhao et al. 2018) in its pro- and anti-stereotypical versions (brackets removed)."""

    id: str  # "<type>/<sentence number>"
    type: str  # "type1" (needs world knowledge) | "type2" (syntax suffices)
    pro: str
    anti: str

    @property
    def group(self) -> str:
        return self.type


Item = TypeVar("Item", CrowsPair, StereoSetItem, BBQItem, WinoBiasPair)


# ---------------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Suite:
    """How to load one suite: from a local path, and from the hub (``hub`` = (path, config, split))."""

    name: str
    description: str
    local: Callable[[Path], list]
    hub_rows: Callable[[Any, str], list]  # (datasets.Dataset or dict of them, where) -> items
    hub: tuple[str, str | None, str]
    hub_configs: tuple[str, ...] = ()  # several configs loaded and passed as {config: dataset}


SUITES: Registry[Suite] = Registry("suite")


@dataclass(frozen=True)
class SuiteData:
    """Loaded items and where they came from (``hash`` covers every item's fields, so any edit changes it)."""

    suite: str
    items: list
    source: str
    hash: str
    n_total: int  # items in the source, before any subset

    def data_info(self) -> dict[str, Any]:
        return {"source": self.source, "hash": self.hash, "n": len(self.items), "n_total": self.n_total}


def hash_items(items: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(hashlib.sha256(json.dumps(asdict(item), sort_keys=True).encode("utf-8")).digest())
    return h.hexdigest()[:16]


def load_suite(name: str, source: str | os.PathLike | None = None) -> SuiteData:
    """Load suite ``name`` from a local path, a hub dataset name, or (None) the suite's default hub copy."""
    suite = SUITES.get(name)
    if source is None:
        items = _load_hub(suite, suite.hub[0])
        where = suite.hub[0]
    else:
        text = str(source)
        path = Path(text).expanduser()
        if path.exists():
            items = suite.local(path)
            where = str(path)
        elif text.startswith((".", "/", "~")):
            raise SuiteError(f"{name}: data not found: {path}")
        else:
            items = _load_hub(suite, text)
            where = text
    if not items:
        raise SuiteError(f"{name}: {where} holds no items")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SuiteError(f"{name}: {where} has the item id {dup!r} more than once")
    return SuiteData(suite=name, items=items, source=where, hash=hash_items(items), n_total=len(items))


def sample_items(data: SuiteData, limit: int | None, seed: int) -> SuiteData:
    """A seeded random subset of ``limit`` items (in source order); None or a limit >= the size keeps all."""
    if limit is None or limit >= len(data.items):
        return data
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    keep = np.sort(np.random.default_rng(seed).choice(len(data.items), size=limit, replace=False))
    items = [data.items[i] for i in keep]
    return SuiteData(suite=data.suite, items=items, source=data.source, hash=hash_items(items), n_total=data.n_total)


def _load_hub(suite: Suite, path: str) -> list:
    import datasets

    _, config, split = suite.hub
    configs = suite.hub_configs or (config,)
    loaded = {}
    for cfg in configs:
        try:
            loaded[cfg] = datasets.load_dataset(path, cfg, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, no such dataset, bad config)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SuiteError(
                f"{suite.name}: could not load the hub dataset {path!r} (config {cfg!r}, split {split!r}): {first}. "
                f"Offline? Point --data at a local copy instead ({suite.description})."
            ) from None
    where = f"hub dataset {path!r}"
    return suite.hub_rows(loaded if suite.hub_configs else loaded[config], where)


# ---------------------------------------------------------------------------------------------------- row checks


def _require(row: dict[str, Any], fields: Sequence[str], where: str) -> None:
    for f in fields:
        if row.get(f) is None:
            raise SuiteError(f"{where}: missing column {f!r}")


def _require_columns(columns: Sequence[str], fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in columns]
    if missing:
        raise SuiteError(f"{where}: missing column {missing[0]!r} (its columns are: {', '.join(columns)})")


def _read_table(path: Path, builder: str):
    from pocketlm.data.text import DataError, read_table

    try:
        return read_table(path, builder)  # an empty file, no rows, not UTF-8 or unparseable: named
    except DataError as e:
        raise SuiteError(str(e)) from None


def _read_text(path: Path) -> str:
    from pocketlm.data.text import DataError, read_utf8

    try:
        return read_utf8(path)
    except DataError as e:  # not UTF-8: the line and byte
        raise SuiteError(str(e)) from None


def _one_file(path: Path, pattern: str, what: str) -> list[Path]:
    files = sorted(path.glob(pattern)) if path.is_dir() else [path]
    if not files:
        raise SuiteError(f"{path} holds no {pattern} files ({what})")
    return files


# ---------------------------------------------------------------------------------------------------- CrowS-Pairs

_CROWS_FIELDS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


def _crows_rows(ds, where: str, first_line: int = 2) -> list[CrowsPair]:
    _require_columns(ds.column_names, _CROWS_FIELDS, where)
    index_col = next((c for c in ("", "Unnamed: 0", "id") if c in ds.column_names), None)
    items = []
    for i, row in enumerate(ds):
        _require(row, _CROWS_FIELDS, f"{where} line {i + first_line}")
        if row["stereo_antistereo"] not in ("stereo", "antistereo"):
            raise SuiteError(f"{where} line {i + first_line}: stereo_antistereo is {row['stereo_antistereo']!r}; "
                             "it must be 'stereo' or 'antistereo'")
        rid = row[index_col] if index_col is not None and row[index_col] is not None else i
        items.append(CrowsPair(id=str(rid), sent_more=row["sent_more"], sent_less=row["sent_less"],
                               stereo_antistereo=row["stereo_antistereo"], bias_type=row["bias_type"]))
    return items


def _crows_local(path: Path) -> list[CrowsPair]:
    files = _one_file(path, "*.csv", "CrowS-Pairs: crows_pairs_anonymized.csv")
    items: list[CrowsPair] = []
    for f in files:
        items.extend(_crows_rows(_read_table(f, "csv"), str(f)))  # line 1 is the header
    return items


SUITES.register("crows_pairs")(Suite(
    name="crows_pairs", description="a folder with crows_pairs_anonymized.csv (nyu-mll/crows-pairs)",
    local=_crows_local, hub_rows=lambda ds, where: _crows_rows(ds, where, first_line=1),
    hub=("jannalu/crows_pairs_multilingual", "english", "test"),
))


# ---------------------------------------------------------------------------------------------------- StereoSet

_STEREOSET_FIELDS = ("id", "target", "bias_type", "context")
_STEREOSET_LABELS = ("stereotype", "anti-stereotype", "unrelated")
_HUB_GOLD = ("anti-stereotype", "stereotype", "unrelated")  # McGill-NLP/stereoset's gold_label class names


def _stereoset_item(row: dict[str, Any], where: str) -> StereoSetItem:
    """One item from the official layout (``sentences`` with ``gold_label``), the hub's, or — only where neither
    is present — EditBias's ``data`` map (``label_source="editbias-map"``: labels StereoSet's gold cannot confirm)."""
    _require(row, _STEREOSET_FIELDS, where)
    source = "gold"
    if isinstance(row.get("sentences"), list):  # official dev.json (and EditBias's race/religion files)
        by_label = {s.get("gold_label"): s.get("sentence") for s in row["sentences"] if isinstance(s, dict)}
    elif isinstance(row.get("sentences"), dict):  # hub: columns of lists, gold_label as class indices
        s = row["sentences"]
        by_label = {_HUB_GOLD[g] if isinstance(g, int) else g: t for g, t in zip(s["gold_label"], s["sentence"])}
    elif isinstance(row.get("data"), dict):  # EditBias: {label: {sentence, id}}
        by_label = {k: v["sentence"] for k, v in row["data"].items() if isinstance(v, dict) and "sentence" in v}
        source = "editbias-map"
    else:
        raise SuiteError(f"{where}: missing column 'sentences' (or EditBias's 'data')")
    for label in _STEREOSET_LABELS:
        if not isinstance(by_label.get(label), str):
            raise SuiteError(f"{where}: item {row['id']!r} has no {label!r} sentence")
    return StereoSetItem(id=str(row["id"]), target=str(row["target"]), bias_type=str(row["bias_type"]),
                         context=str(row["context"]), stereotype=by_label["stereotype"],
                         anti_stereotype=by_label["anti-stereotype"], unrelated=by_label["unrelated"],
                         label_source=source)


def _stereoset_local(path: Path) -> list[StereoSetItem]:
    items: list[StereoSetItem] = []
    for f in _one_file(path, "*.json", "StereoSet: dev.json or EditBias's {gender,race,religion}_test.json"):
        # One nested JSON document (the official file keeps items under data.intrasentence): not a table, so it
        # is read with json rather than `datasets`.
        try:
            doc = json.loads(_read_text(f))
        except json.JSONDecodeError as e:
            raise SuiteError(f"{f} line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(doc, dict) and isinstance(doc.get("data"), dict):
            doc = doc["data"].get("intrasentence")
        if not isinstance(doc, list):
            raise SuiteError(f"{f}: expected a list of intrasentence items (or the official data.intrasentence)")
        loaded = [_stereoset_item(row, f"{f} item {i}") for i, row in enumerate(doc)]
        unconfirmed = sum(it.label_source != "gold" for it in loaded)
        if unconfirmed:
            warnings.warn(f"{f}: {unconfirmed} of {len(loaded)} StereoSet items have no gold_label, only EditBias's "
                          "stereotype/anti-stereotype map; their ss rests on that map (check it before trusting "
                          "their domain's figures)", stacklevel=2)
        items.extend(loaded)
    return items


SUITES.register("stereoset")(Suite(
    name="stereoset", description="a folder of StereoSet intrasentence .json files (dev.json or EditBias's subset)",
    local=_stereoset_local,
    hub_rows=lambda ds, where: [_stereoset_item(row, f"{where} row {i}") for i, row in enumerate(ds)],
    hub=("McGill-NLP/stereoset", "intrasentence", "validation"),
))


# ---------------------------------------------------------------------------------------------------- BBQ

_BBQ_FIELDS = ("example_id", "category", "context_condition", "question_polarity", "context", "question",
               "ans0", "ans1", "ans2", "label", "answer_info", "additional_metadata")
_INTERSECTIONAL = re.compile(r"^(M|F|lowSES|highSES)-(.+)$")


def _group_tags(info: Sequence[str], answer: str) -> set[str]:
    """The group tags of one answer: both ``answer_info`` strings, lowercased, with intersectional tags split
    ("F-Black" → f, black) and gendered words mapped to their tag (woman/girl → f, man/boy → m), as
    lm-evaluation-harness's bbq ``process_docs`` does."""
    tags: set[str] = set()
    for s in info:
        m = _INTERSECTIONAL.match(s)
        parts = [m.group(1), m.group(2)] if m else [s]
        tags.update(p.lower() for p in parts if p)
    words = set(re.findall(r"[a-z]+", " ".join(info).lower()))
    if words & {"woman", "girl"}:
        tags.add("f")
    elif words & {"man", "boy"}:
        tags.add("m")
    if not any(info) and "Latina" in answer:  # upstream rows with empty answer_info (lm-eval's fix)
        tags.add("latino")
    return tags


def bbq_answer_roles(row: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
    """(index of the unknown answer, indices of the biased answers) for one BBQ row.

    The unknown answer is the one whose ``answer_info`` tag is ``"unknown"``. An answer is *biased* (BBQ §5;
    lm-evaluation-harness bbq ``process_docs``) when, for a negative question, its group tags meet
    ``additional_metadata.stereotyped_groups`` (the model blamed the stereotyped group), and for a non-negative
    question, it is a non-unknown answer whose tags do not (the model credited the other group). In the six
    categories of ../shared/data every item has exactly one biased answer; an item with none counts towards
    accuracy and the non-unknown count only, as in lm-eval.
    """
    info = row["answer_info"]
    stereotyped = {g.lower() for g in row["additional_metadata"]["stereotyped_groups"]}
    answers = [row[f"ans{i}"] for i in range(3)]
    unknown = [i for i in range(3) if "unknown" in [t.lower() for t in info[f"ans{i}"]]]
    if len(unknown) != 1:
        raise ValueError(f"expected exactly one answer tagged 'unknown' in answer_info, found {len(unknown)}")
    biased = []
    for i in range(3):
        if i == unknown[0]:
            continue
        meets = bool(_group_tags(info[f"ans{i}"], answers[i]) & stereotyped)
        if (row["question_polarity"] == "neg" and meets) or (row["question_polarity"] == "nonneg" and not meets):
            biased.append(i)
    return unknown[0], tuple(biased)


def _bbq_rows(ds, where: str, first_line: int) -> list[BBQItem]:
    _require_columns(ds.column_names, _BBQ_FIELDS, where)
    items = []
    for i, row in enumerate(ds):
        at = f"{where} line {i + first_line}"
        _require(row, _BBQ_FIELDS, at)
        if "stereotyped_groups" not in (row["additional_metadata"] or {}):
            raise SuiteError(f"{at}: missing column 'additional_metadata.stereotyped_groups'")
        if row["context_condition"] not in ("ambig", "disambig") or row["question_polarity"] not in ("neg", "nonneg"):
            raise SuiteError(f"{at}: context_condition must be ambig|disambig and question_polarity neg|nonneg, got "
                             f"{row['context_condition']!r} / {row['question_polarity']!r}")
        try:
            unknown, biased = bbq_answer_roles(row)
        except (KeyError, TypeError, ValueError) as e:
            raise SuiteError(f"{at}: bad answer_info ({e})") from None
        items.append(BBQItem(
            id=f"{row['category']}/{row['example_id']}", category=row["category"],
            context_condition=row["context_condition"], question_polarity=row["question_polarity"],
            context=row["context"], question=row["question"], answers=(row["ans0"], row["ans1"], row["ans2"]),
            label=int(row["label"]), unknown=unknown, biased=biased,
        ))
    return items


def _bbq_local(path: Path) -> list[BBQItem]:
    items: list[BBQItem] = []
    for f in _one_file(path, "*.jsonl", "BBQ: one <Category>.jsonl per category"):
        items.extend(_bbq_rows(_read_table(f, "json"), str(f), first_line=1))
    return items


SUITES.register("bbq")(Suite(
    name="bbq", description="a folder of BBQ <Category>.jsonl files (nyu-mll/BBQ data/)",
    local=_bbq_local, hub_rows=lambda ds, where: _bbq_rows(ds, where, first_line=0),
    hub=("oskarvanderwal/bbq", "All", "test"),
))


# ---------------------------------------------------------------------------------------------------- WinoBias

_WINO_LINE = re.compile(r"^(\d+)\s+(.*\S)\s*$")


def winobias_sentence(marked: str) -> str:
    """The plain sentence: WinoBias brackets its two coreferent mentions ("[The developer] ... [he]")."""
    return re.sub(r"\s+", " ", marked.replace("[", "").replace("]", "")).strip()


def _wino_file(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise SuiteError(f"WinoBias file not found: {path}")
    out: dict[int, str] = {}
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        m = _WINO_LINE.match(line)
        if not m:
            raise SuiteError(f"{path} line {n}: expected '<number> <sentence>'")
        out[int(m.group(1))] = winobias_sentence(m.group(2))
    return out


def _wino_local(path: Path, split: str = "test") -> list[WinoBiasPair]:
    if not path.is_dir():
        raise SuiteError(f"{path}: WinoBias loads from a folder with {{pro,anti}}_stereotyped_type{{1,2}}.txt.{split}")
    items: list[WinoBiasPair] = []
    for kind in ("type1", "type2"):
        pro_path, anti_path = (path / f"{side}_stereotyped_{kind}.txt.{split}" for side in ("pro", "anti"))
        pro, anti = _wino_file(pro_path), _wino_file(anti_path)
        if pro.keys() != anti.keys():
            missing = sorted(pro.keys() ^ anti.keys())[0]
            raise SuiteError(f"{pro_path} and {anti_path} do not pair up: sentence {missing} is in only one")
        items.extend(WinoBiasPair(id=f"{kind}/{k}", type=kind, pro=pro[k], anti=anti[k]) for k in sorted(pro))
    return items


def _wino_hub(loaded: dict[str, Any], where: str) -> list[WinoBiasPair]:
    items: list[WinoBiasPair] = []
    for kind in ("type1", "type2"):
        pro, anti = loaded[f"{kind}_pro"], loaded[f"{kind}_anti"]
        _require_columns(pro.column_names, ("tokens",), f"{where} ({kind}_pro)")
        _require_columns(anti.column_names, ("tokens",), f"{where} ({kind}_anti)")
        if len(pro) != len(anti):
            raise SuiteError(f"{where}: {kind}_pro has {len(pro)} rows and {kind}_anti {len(anti)}; they must pair")
        items.extend(WinoBiasPair(id=f"{kind}/{i + 1}", type=kind, pro=winobias_sentence(" ".join(p["tokens"])),
                                  anti=winobias_sentence(" ".join(a["tokens"])))
                     for i, (p, a) in enumerate(zip(pro, anti)))
    return items


SUITES.register("winobias")(Suite(
    name="winobias", description="a folder with {pro,anti}_stereotyped_type{1,2}.txt.test (uclanlp/corefBias)",
    local=_wino_local, hub_rows=_wino_hub, hub=("uclanlp/wino_bias", None, "test"),
    hub_configs=("type1_pro", "type1_anti", "type2_pro", "type2_anti"),
))
