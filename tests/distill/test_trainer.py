"""The trainer: modes, accumulation, exact resume after SIGKILL, NaN stop, through the same paths users take."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pocketlm.config import DistillConfig
from pocketlm.distill.checkpoint import latest_checkpoint, list_checkpoints
from pocketlm.distill.run import run_distill
from pocketlm.distill.trainer import NonFiniteLossError
from pocketlm.training import batch_indices, cosine_with_warmup


def tiny_cfg(teacher_dir, corpus_file, out, **train):
    return DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "distill": {"mode": "cache", "loss": "forward_kl", "top_k": 8, "temperature": 2.0, "ce_weight": 0.1},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3, "save_every": 2,
                  **train},
        "output_dir": str(out),
    })


def test_schedule_and_data_order():
    f = cosine_with_warmup(4, 20, 0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.55)
    seen = torch.cat([batch_indices(10, 3, 0, m) for m in range(3)])
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 9  # one epoch, no repeats
    assert torch.equal(batch_indices(10, 3, 0, 5), batch_indices(10, 3, 0, 5))


@pytest.mark.parametrize("mode, loss", [("cache", "forward_kl"), ("online", "jsd"), ("ce", "forward_kl")])
def test_each_mode_learns_and_writes_a_loadable_student(tmp_path, teacher_dir, corpus_file, mode, loss):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(teacher_dir, corpus_file, tmp_path / mode, steps=8, lr=3e-3)
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"mode": mode, "loss": loss})})
    res = run_distill(cfg, progress=False)
    losses = [r["loss"] for r in res.train.history]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[-1]["val_perplexity"] > 1
    student = AutoModelForCausalLM.from_pretrained(res.student_dir)
    assert student.config.model_type == "llama" and student.config.num_hidden_layers == 2  # #20 item 6
    assert len(list_checkpoints(tmp_path / mode / "checkpoints")) == 2  # keep_checkpoints


def test_grad_accumulation_equals_the_big_batch(tmp_path, teacher_dir, corpus_file):
    big = run_distill(tiny_cfg(teacher_dir, corpus_file, tmp_path / "big", steps=3, batch_size=4), progress=False)
    acc = run_distill(tiny_cfg(teacher_dir, corpus_file, tmp_path / "acc", steps=3, batch_size=2, grad_accum=2),
                      progress=False)
    a, b = load_file(f"{big.student_dir}/model.safetensors"), load_file(f"{acc.student_dir}/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # same tokens, same mean: fp32 rounding only


def test_rerun_without_resume_refuses_to_clobber(tmp_path, teacher_dir, corpus_file):
    cfg = tiny_cfg(teacher_dir, corpus_file, tmp_path / "r", steps=2)
    run_distill(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_distill(cfg, progress=False)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, teacher_dir, corpus_file, monkeypatch):
    from pocketlm.distill import cache as cache_mod

    cfg = tiny_cfg(teacher_dir, corpus_file, tmp_path / "nan", steps=6, save_every=2)
    real_get = cache_mod.TeacherCache.get
    calls = {"n": 0}

    def poisoned(self, ids):
        calls["n"] += 1
        lp, idx, tail = real_get(self, ids)
        return (lp.clone().fill_(float("nan")), idx, tail) if calls["n"] == 5 else (lp, idx, tail)  # step 5

    monkeypatch.setattr(cache_mod.TeacherCache, "get", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 5") as e:
        run_distill(cfg, progress=False)
    ckpt = latest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert ckpt.name == "step-000004" and str(ckpt) in str(e.value)
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())
    assert not (tmp_path / "nan" / "student").exists()


def _cli(cfg_path, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return [sys.executable, "-m", "pocketlm.cli", "distill", str(cfg_path), "--quiet", *extra], env


def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path, teacher_dir, corpus_file):
    """End to end through the CLI: kill -9 twice at different steps, resume each time, compare to one clean run."""
    def write_cfg(out):
        cfg = tiny_cfg(teacher_dir, corpus_file, out, steps=30, save_every=3, eval_every=10).model_dump()
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    clean = write_cfg(tmp_path / "clean")
    cmd, env = _cli(clean)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)

    killed = write_cfg(tmp_path / "killed")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    for kill_after, resume in ((7, False), (17, True)):
        cmd, env = _cli(killed, *(["--resume"] if resume else []))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        assert not (tmp_path / "killed" / "student").exists()
    cmd, env = _cli(killed, "--resume")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)

    a = load_file(str(tmp_path / "clean" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))


def test_trainers_of_different_precision_in_one_process(tmp_path, teacher_dir, corpus_file):
    """bf16 autocast is per Trainer, not process-global: an fp32 run then a bf16 run in one Python process."""
    a = run_distill(tiny_cfg(teacher_dir, corpus_file, tmp_path / "fp32", steps=2), progress=False)
    b = run_distill(tiny_cfg(teacher_dir, corpus_file, tmp_path / "bf16", steps=2, precision="bf16"), progress=False)
    la, lb = a.train.history[0]["loss"], b.train.history[0]["loss"]
    assert la != lb and abs(la - lb) / la < 0.02  # same weights and batch: bf16 autocast moves the loss only a little


def test_resume_refuses_a_changed_run_but_allows_bookkeeping_changes(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "r"
    run_distill(tiny_cfg(teacher_dir, corpus_file, out, steps=2), progress=False)
    with pytest.raises(ValueError, match=r"train\.lr: 0\.001 then, 0\.002 now"):
        run_distill(tiny_cfg(teacher_dir, corpus_file, out, steps=4, lr=2e-3), resume=True, progress=False)
    res = run_distill(tiny_cfg(teacher_dir, corpus_file, out, steps=2, eval_every=1), resume=True, progress=False)
    assert res.train.steps == 2
