"""The scoring arithmetic in stage keys: bf16 bias runs carry that they pack shared prefixes (their bf16 answers
changed when the packing probe moved to fp32, so stored ones are redone); fp32 runs and perplexity keep their keys."""
from __future__ import annotations

from types import SimpleNamespace

from pocketlm.tasks import base, bias


def bias_key(monkeypatch, *precisions: str) -> dict:
    monkeypatch.setattr(bias, "audit_inputs", lambda ctx, task: {})
    sets = [SimpleNamespace(suite="crows_pairs", name="crows_pairs", entry="crows_pairs", precision=p) for p in precisions]
    ctx = SimpleNamespace(cfg=SimpleNamespace(audit=SimpleNamespace(bias=sets)), skipped={})
    return bias.TASK.inputs(ctx)["scoring"]


def test_only_bf16_bias_runs_carry_packing(monkeypatch):
    plain = {"bf16_exact_positions", "bf16_error_per_sqrt_token"}
    assert set(bias_key(monkeypatch, "fp32")) == plain  # the keys fp32 runs had before: not redone
    assert bias_key(monkeypatch, "fp32", "auto")["bf16_packed"] is True
    assert bias_key(monkeypatch, "bf16")["bf16_packed"] is True
    assert set(base.scoring_version()) == plain  # what perplexity's key carries (no shared prefixes to pack)

