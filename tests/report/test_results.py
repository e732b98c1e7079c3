"""results.json: round trip, atomic write, non-finite values as null, lookups that name what exists."""
from __future__ import annotations

import json
import math

import pytest

from pocketlm.core.results import SCHEMA, Metric, Results


def sample() -> Results:
    return Results(
        kind="rouge", model={"spec": "m", "fingerprint": "abc"}, data={"source": "d", "hash": "h", "n": 3},
        settings={"stem": True}, metrics=[
            Metric("rouge1", 0.5, 3, ci=(0.4, 0.6), higher_is_better=True),
            Metric("rouge1", 0.7, 2, group="news", higher_is_better=True),
            Metric("word_perplexity", math.nan, 0, higher_is_better=False),
        ],
    )


def test_round_trip_and_lookup(tmp_path):
    r = sample()
    path = r.write(tmp_path / "out" / "results.json")
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["metrics"][2]["value"] is None  # NaN is written as null, valid JSON
    back = Results.read(path)
    assert back.get("rouge1").ci == (0.4, 0.6)
    assert back.get("rouge1", group="news").value == 0.7
    with pytest.raises(KeyError, match="have:.*rouge1"):
        back.get("rougeL")
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind
    assert "rouge1" in back.table() and "[0.4000, 0.6000]" in back.table()


def test_foreign_json_is_refused(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a pocketlm results document"):
        Results.read(p)
    p.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Results.read(p)
