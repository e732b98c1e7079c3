"""Distilling into MoE students through the same trainer: every router trains from upcycled teacher layers, the
auxiliary losses are added with their coefficients, telemetry per layer reaches metrics.jsonl, the aux-free bias
moves (and is saved), the expert-load plot is written, and the student loads back as an MoE student
(a Mixtral for top-k softmax routing, a pocketlm student for the other routers)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pocketlm.config import DistillConfig
from pocketlm.distill.moe_telemetry import StepTelemetry, plot_expert_load
from pocketlm.distill.run import run_distill
from pocketlm.models.moe import moe_layers

K_OF = {"topk_softmax": 2, "switch": 1, "expert_choice": 2, "hash": 1, "aux_free": 2}


def moe_cfg(teacher_dir, corpus_file, out, router, mode="cache", **moe):
    return DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "teacher_layers", "num_layers": 2,
                    "moe": {"router": router, "num_experts": 4, "top_k": K_OF[router], **moe}},
        "distill": {"mode": mode, "loss": "forward_kl", "top_k": 8, "temperature": 2.0, "ce_weight": 0.1},
        "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3, "save_every": 3},
        "output_dir": str(out),
    })


@pytest.mark.parametrize("router", sorted(K_OF))
def test_every_router_distills_and_logs_telemetry(tmp_path, teacher_dir, corpus_file, router):
    cfg = moe_cfg(teacher_dir, corpus_file, tmp_path / router, router, z_loss_coef=1e-3, capacity_factor=1.0,
                  bias_update_rate=0.01)
    res = run_distill(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / router / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    tokens = 4 * 15  # batch × (block − 1)
    for row in rows:
        assert sorted(row["moe"]) == ["0", "1"]
        for layer in row["moe"].values():
            load = layer["tokens_per_expert"]
            assert len(load) == 4
            dropped = round(layer["dropped_share"] * tokens)
            if router == "switch":  # capacity ceil(1.0 · 60 / 4) = 15 per expert; the rest dropped and counted
                assert max(load) <= 15 and sum(load) == tokens - dropped
            elif router != "expert_choice":
                assert sum(load) == tokens * K_OF[router] and dropped == 0
            else:
                assert load == [4 * 8] * 4  # every expert exactly full: ceil(2 · 15 / 4) = 8 per sequence
            assert layer["load_cv"] >= 0 and (router == "hash") == ("router_entropy" not in layer)
        assert (row["aux"] > 0) == (router != "hash")  # z-loss on every learned router; hash has no loss
    assert (tmp_path / router / "moe_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    student = AutoModelForCausalLM.from_pretrained(res.student_dir)
    if router == "topk_softmax":  # Mixtral holds it exactly, so its folder is Mixtral's (#20 item 6)
        assert student.config.model_type == "mixtral" and student.config.num_experts_per_tok == 2
        return
    assert student.config.moe["router"] == router and sorted(moe_layers(student)) == [0, 1]
    if router == "aux_free":  # the trainer nudged the bias after each of the 3 steps, and it was saved
        for layer in moe_layers(student).values():
            nudges = layer.router.bias / cfg.student.moe.bias_update_rate  # ±1 (or 0 at exactly mean load) a step
            assert nudges.abs().sum() > 0 and nudges.abs().max() <= 3 + 1e-4
            torch.testing.assert_close(nudges, nudges.round(), rtol=0, atol=1e-4)


def test_aux_losses_are_added_with_their_coefficients(tmp_path, teacher_dir, corpus_file):
    cfg = moe_cfg(teacher_dir, corpus_file, tmp_path / "ce", "topk_softmax", mode="ce", balance_coef=0.5,
                  z_loss_coef=0.01)
    rows = run_distill(cfg, progress=False).train.history
    for row in rows:
        layers = row["moe"].values()
        expected = sum(layer["balance_loss"] + layer["z_loss"] for layer in layers)
        assert row["aux"] == pytest.approx(expected, rel=1e-5)
        assert row["loss"] == pytest.approx(row["ce"] + row["aux"], rel=1e-6)
        assert all(layer["balance_loss"] >= 0.5 * 2 * 0.999 for layer in layers)  # ≥ α·k (uniform is the minimum)


def test_step_telemetry_sums_micro_batches():
    def aux(load, dropped, n):
        return {"aux_loss": torch.tensor(0.5), "balance_loss": torch.tensor(0.5),
                "tokens_per_expert": torch.tensor(load, dtype=torch.float), "load_cv": torch.tensor(9.0),
                "dropped_share": torch.tensor(dropped), "tokens": torch.tensor(float(n))}

    t = StepTelemetry()
    assert t.add(None) is None
    total = t.add([None, aux([3, 1], 0.0, 4)])
    t.add([None, aux([0, 4], 0.5, 8)])
    assert total.item() == 0.5
    row = t.row()["1"]
    assert row["tokens_per_expert"] == [3, 5]
    assert row["load_cv"] == pytest.approx(1 / 4)  # std 1 / mean 4 of the summed load, not a mean of CVs
    assert row["dropped_share"] == pytest.approx(4 / 12) and row["balance_loss"] == pytest.approx(0.5)
    assert plot_expert_load([{"step": 1}], "unused.png") is None
