"""The pipeline document (``results.json`` of `pocketlm run`), typed: every stage's status and its results, each
tagged with the model role and the entry (set or suite) it is about, the config, what was left out and why, the
gates and the verdict.

```
{"schema": "pocketlm.pipeline/1", "config": {...}, "config_hash", "output_dir", "models": {role: {"spec",
 "fingerprint"}}, "stages": {stage: {"status": "ran" | "reused" | "off" | "skipped", "key", "wall_time_s",
 "reason", "entries": [{"role", "entry", "results": <pocketlm.results/1>}]}}, "skipped": {entry: why},
 "facts": {...}, "provenance": {...}, "wall_time_s", "gates": [...], "verdict": "pass" | "fail" | "error" | ...}
```

``to_dict`` writes exactly that JSON shape (absent optional fields are left out, as the report and older readers
expect); ``from_dict`` reads it back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pocketlm.core.results import Results

SCHEMA = "pocketlm.pipeline/1"


@dataclass
class Entry:
    """One stage result: which model (role) on which set or suite (entry)."""

    role: str
    entry: str
    results: Results

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "entry": self.entry, "results": self.results.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        return cls(d["role"], d["entry"], Results.from_dict(d["results"]))


@dataclass
class StageStatus:
    """What became of one stage in a run: ran, reused (a stored record with the same key), off, or skipped (every
    set or suite it measures left out; ``reason`` says why)."""

    status: str
    key: str | None = None
    wall_time_s: float | None = None
    reason: str | None = None
    entries: list[Entry] | None = None  # None: the stage produced no record (off or skipped)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status}
        if self.reason is not None:
            d["reason"] = self.reason
        if self.key is not None:
            d |= {"key": self.key, "wall_time_s": self.wall_time_s}
        if self.entries is not None:
            d["entries"] = [e.to_dict() for e in self.entries]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageStatus:
        entries = d.get("entries")
        return cls(d["status"], d.get("key"), d.get("wall_time_s"), d.get("reason"),
                   None if entries is None else [Entry.from_dict(e) for e in entries])


@dataclass
class PipelineDocument:
    config: dict[str, Any]
    config_hash: str
    output_dir: str
    models: dict[str, dict[str, Any]]
    stages: dict[str, StageStatus]  # in run order
    skipped: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float | None = None
    gates: list[dict[str, Any]] | None = None  # None until the gates are checked
    verdict: str | None = None

    def entries(self) -> list[Entry]:
        """Every (role, entry, results), in stage order."""
        return [e for st in self.stages.values() for e in (st.entries or [])]

    def to_dict(self) -> dict[str, Any]:
        d = {"schema": SCHEMA, "config": self.config, "config_hash": self.config_hash, "output_dir": self.output_dir,
             "models": self.models, "stages": {name: st.to_dict() for name, st in self.stages.items()},
             "skipped": self.skipped, "facts": self.facts, "provenance": self.provenance,
             "wall_time_s": self.wall_time_s}
        if self.gates is not None:
            d["gates"] = self.gates
        if self.verdict is not None:
            d["verdict"] = self.verdict
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineDocument:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a pocketlm pipeline document (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        return cls(config=d["config"], config_hash=d["config_hash"], output_dir=d["output_dir"], models=d["models"],
                   stages={name: StageStatus.from_dict(st) for name, st in d["stages"].items()},
                   skipped=d.get("skipped", {}), facts=d.get("facts", {}), provenance=d.get("provenance", {}),
                   wall_time_s=d.get("wall_time_s"), gates=d.get("gates"), verdict=d.get("verdict"))
