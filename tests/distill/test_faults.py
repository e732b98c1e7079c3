"""Faults, injected on purpose: SIGKILL mid-run, a checkpoint write cut off half-way (a full disk, a kill), a
damaged teacher-cache shard, a NaN in a batch. Each test's docstring counts the faults it injects.

What must hold after every one: nothing is lost or corrupted — the latest checkpoint is a complete one that loads,
no half-written folder is ever taken for a checkpoint, and the resumed run ends with weights bit-identical
(torch.equal) to the uninterrupted run's. The quick single-process SIGKILL test (two kills, through the CLI) is
tests/distill/test_trainer.py::test_sigkill_mid_run_then_resume_gives_identical_weights.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pocketlm.config import DistillConfig
from pocketlm.distill import cache as cache_mod
from pocketlm.distill import run as run_mod
from pocketlm.distill.cache import CacheMismatchError, TeacherCache
from pocketlm.distill.checkpoint import CheckpointWriteError, latest_checkpoint, list_checkpoints
from pocketlm.distill.run import run_distill
from pocketlm.distill.trainer import NonFiniteLossError
from pocketlm.models.load import load_model

DRIVER = Path(__file__).with_name("fault_driver.py")
_spec = importlib.util.spec_from_file_location("fault_driver", DRIVER)
fault_driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fault_driver)


def config(teacher_dir, corpus_file, out: Path, *, mode: str = "cache", **train) -> DistillConfig:
    """A tiny run: a 2-layer student of the 4-layer test teacher, 16-token blocks, checkpoints every 2 steps."""
    tree = {
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "distill": {"mode": mode, "loss": "forward_kl", "top_k": 8, "temperature": 2.0, "ce_weight": 0.1},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3, "save_every": 2,
                  **train},
        "output_dir": str(out),
    }
    return DistillConfig.model_validate(tree)


def assert_same_student(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs from the uninterrupted run"


def assert_intact(run_dir: Path, step: int) -> None:
    """The latest checkpoint is `step`, it loads as a model with finite weights, and no half-written folder is
    listed (temporary folders are hidden, and gone once a save has run)."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{step:06d}", ckpt
    assert all(p.name.startswith("step-") for _, p in list_checkpoints(run_dir / "checkpoints"))
    model, _ = load_model(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_dir, corpus_file) -> Path:
    """The uninterrupted 6-step run every faulty run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_distill(config(teacher_dir, corpus_file, out), progress=False)
    return out


def _child(cfg: DistillConfig, *args: str) -> list[str]:
    path = Path(cfg.output_dir).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return [sys.executable, str(DRIVER), str(path), *args]


_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------- killed runs
@pytest.mark.slow
def test_three_random_sigkills_then_resume_gives_identical_weights(tmp_path, teacher_dir, corpus_file):
    """3 faults: SIGKILL at three seeded-random moments of a 30-step run (after a random step, a random fraction
    of a step later, so a kill can land inside a checkpoint write), each resume continuing from the latest
    checkpoint; the final weights equal an uninterrupted run's bit for bit, and the log holds steps 1..30 once."""
    rng = random.Random(10)
    clean = config(teacher_dir, corpus_file, tmp_path / "clean", steps=30, save_every=3, eval_every=10)
    run_distill(clean, progress=False)
    cfg = config(teacher_dir, corpus_file, tmp_path / "killed", steps=30, save_every=3, eval_every=10)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    kill_after = sorted(rng.sample(range(2, 28), 3))
    kills = []
    for i, after in enumerate(kill_after):
        proc = subprocess.Popen(_child(cfg, *(["--resume"] if i else [])), env=_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= after:
                time.sleep(rng.uniform(0, 0.08))  # a step takes ~0.05-0.2 s here: anywhere in the next one
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        kills.append(len(metrics.read_text().splitlines()))
        assert not (tmp_path / "killed" / "student").exists()
        ckpt = latest_checkpoint(tmp_path / "killed" / "checkpoints")
        assert ckpt is None or (ckpt / "model.safetensors").is_file()
    print(f"killed after steps {kill_after}; the log then held {kills} rows")
    assert len(kills) == 3 and kills == sorted(kills)
    run_distill(cfg, resume=True, progress=False)
    assert_same_student(tmp_path / "clean", tmp_path / "killed")
    assert metrics_steps(tmp_path / "killed") == list(range(1, 31))
    assert leftovers(tmp_path / "killed") == []


# ---------------------------------------------------------------------------------------------- checkpoint writes
@pytest.mark.parametrize("target", fault_driver.TARGETS)
def test_full_disk_mid_checkpoint_keeps_the_previous_one(tmp_path, teacher_dir, corpus_file, reference,
                                                         monkeypatch, target):
    """4 faults (one per parameter): ENOSPC while writing checkpoint 4's weights, optimizer moments, RNG state or
    trainer_state.json, after half the file is on disk. The run stops with a message naming the step and the
    intact checkpoint (2), leaves no temporary folder, and a resume ends bit-identical to the reference."""
    cfg = config(teacher_dir, corpus_file, tmp_path / "run")
    with monkeypatch.context() as m:
        for obj, name, fn in fault_driver.write_faults(4, target, fault_driver.enospc):
            m.setattr(obj, name, fn)
        with pytest.raises(CheckpointWriteError, match="checkpoint step 4") as e:
            run_distill(cfg, progress=False)
    assert "No space left on device" in str(e.value) and "step-000002" in str(e.value)
    assert_intact(tmp_path / "run", 2)
    assert leftovers(tmp_path / "run") == []
    assert not (tmp_path / "run" / "student").exists()
    run_distill(cfg, resume=True, progress=False)
    assert_same_student(reference, tmp_path / "run")
    assert metrics_steps(tmp_path / "run") == list(range(1, 7))


def test_sigkill_mid_checkpoint_write_then_resume(tmp_path, teacher_dir, corpus_file, reference):
    """2 faults: a child process SIGKILLs itself half-way through writing checkpoint 2's model.safetensors (no
    checkpoint yet: the resume starts over), then a resumed child dies half-way through checkpoint 4's
    trainer_state.json. Each time the half-written folder stays hidden and is never listed; the in-process resume
    removes it and ends bit-identical to the reference."""
    cfg = config(teacher_dir, corpus_file, tmp_path / "run")
    run_dir = tmp_path / "run"
    for die_in, resume, latest in (("2:model.safetensors", [], None), ("4:trainer_state.json", ["--resume"], 2)):
        proc = subprocess.run(_child(cfg, *resume, "--die-in", die_in), env=_ENV, capture_output=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        step = int(die_in.split(":")[0])
        left = leftovers(run_dir)
        assert len(left) == 1 and left[0].startswith(f".tmp-step-{step:06d}-"), left
        half = run_dir / "checkpoints" / left[0] / die_in.split(":")[1]
        assert half.is_file()  # the half file is there, and ignored
        if latest is None:
            assert latest_checkpoint(run_dir / "checkpoints") is None
        else:
            assert_intact(run_dir, latest)
    run_distill(cfg, resume=True, progress=False)
    assert_same_student(reference, run_dir)
    assert leftovers(run_dir) == []
    assert metrics_steps(run_dir) == list(range(1, 7))


# ---------------------------------------------------------------------------------------------- teacher cache
def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the tensor bytes
    p.write_bytes(bytes(data))


DAMAGE = {
    "flip one bit in the middle": _flip_middle,
    "truncate to half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "replace by another shard": lambda p: p.write_bytes(p.with_name("shard-00000.safetensors").read_bytes()),
    "delete": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_shard_is_refused_by_name(tmp_path, tokenizer, damage):
    """4 faults (one per parameter) to shard 1 of a 3-shard cache: the cache refuses to open and names the file."""
    from conftest import make_teacher

    teacher = make_teacher(len(tokenizer))
    blocks = torch.randint(0, len(tokenizer), (10, 12), generator=torch.Generator().manual_seed(0))
    cache_mod.build_teacher_cache(teacher, blocks, tmp_path, k=5, teacher_fingerprint="t", tokenizer_fingerprint="k",
                                  data_hash="d", batch_size=3, shard_blocks=4, progress=False)
    DAMAGE[damage](tmp_path / "shard-00001.safetensors")
    with pytest.raises(CacheMismatchError, match=r"shard-00001\.safetensors (is damaged|is missing)"):
        TeacherCache.open(tmp_path)


def test_damaged_shard_in_a_run_is_named_and_rebuilt(tmp_path, teacher_dir, corpus_file, reference):
    """2 faults: a NaN in step 3's teacher log-probs stops the run (so there is a run to resume), then a bit is
    flipped in the middle of its first cache shard. The resume names the shard, rebuilds it from the teacher
    (never trains on it) and ends bit-identical to the reference."""
    cfg = config(teacher_dir, corpus_file, tmp_path / "run", steps=6)
    with pytest.raises(NonFiniteLossError):  # stop at step 3 (a transient fault) so there is something to resume
        with pytest.MonkeyPatch.context() as m:
            _poison_cache_rows(m, at_call=3)
            run_distill(cfg, progress=False)
    shard = tmp_path / "run" / "teacher_cache" / "shard-00000.safetensors"
    before = shard.read_bytes()
    _flip_middle(shard)
    with pytest.warns(UserWarning, match=r"shard-00000\.safetensors is damaged"):
        run_distill(cfg, resume=True, progress=False)
    assert shard.read_bytes() == before
    assert_same_student(reference, tmp_path / "run")


# ---------------------------------------------------------------------------------------------- NaN in a batch
def _poison_cache_rows(m: pytest.MonkeyPatch, at_call: int) -> None:
    """One NaN in one position of one block of the teacher log-probs the `at_call`-th training batch reads."""
    real_get, calls = cache_mod.TeacherCache.get, {"n": 0}

    def get(self, ids):
        calls["n"] += 1
        lp, idx, tail = real_get(self, ids)
        if calls["n"] == at_call:
            lp = lp.clone()
            lp[1, 5, 0] = float("nan")
        return lp, idx, tail

    m.setattr(cache_mod.TeacherCache, "get", get)


def _on_nth(n: int, fault, training_only: bool = True):
    """A hook that applies `fault` on its n-th call (in training mode, for a student module's forward hook) and
    passes everything else through."""
    calls = {"n": 0}

    def hook(*args):
        if training_only and isinstance(args[0], torch.nn.Module) and not args[0].training:
            return None  # validation forwards do not count
        calls["n"] += 1
        return fault(args[-1]) if calls["n"] == n else None

    return hook


def _nan_at_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inject(m: pytest.MonkeyPatch, where: str) -> None:
    if where == "teacher cache rows":
        _poison_cache_rows(m, at_call=3)
    elif where == "online teacher logits":
        real_prepare = run_mod.prepare

        def prepare(*a, **k):
            prep = real_prepare(*a, **k)
            nan_logits = lambda out: out.__class__(logits=_nan_at_first(out.logits))  # noqa: E731
            prep.teacher.register_forward_hook(_on_nth(3, nan_logits, training_only=False))
            return prep

        m.setattr(run_mod, "prepare", prepare)
    else:
        real_build = run_mod.build_student

        def build_student(*a, **k):
            student = real_build(*a, **k)
            emb = student.get_input_embeddings()
            if where == "student activations":
                emb.register_forward_hook(_on_nth(3, _nan_at_first))
            else:  # gradients: the loss stays finite, the gradient norm does not
                emb.weight.register_hook(_on_nth(3, _nan_at_first))
            return student

        m.setattr(run_mod, "build_student", build_student)


@pytest.mark.parametrize("where, message", [
    ("teacher cache rows", "loss is nan at step 3"),
    ("online teacher logits", "loss is nan at step 3"),
    ("student activations", "loss is nan at step 3"),
    ("gradients", "gradient norm is nan at step 3"),
])
def test_nan_in_a_batch_stops_at_its_step_and_keeps_the_last_good_checkpoint(
        tmp_path, teacher_dir, corpus_file, reference, where, message):
    """4 faults (one per parameter): a single NaN at step 3 — in one teacher log-prob of the batch, in the online
    teacher's logits, in the student's embedding output, or in one gradient entry. The run stops at step 3 naming
    it and the last good checkpoint (2), which loads; with the fault gone, a resume ends bit-identical to the
    reference (cache mode; the online run only has to stop cleanly)."""
    mode = "online" if where.startswith("online") else "cache"
    cfg = config(teacher_dir, corpus_file, tmp_path / "run", mode=mode)
    with pytest.MonkeyPatch.context() as m:
        _inject(m, where)
        with pytest.raises(NonFiniteLossError, match=message) as e:
            run_distill(cfg, progress=False)
    assert "Last good checkpoint:" in str(e.value) and "step-000002" in str(e.value)
    assert_intact(tmp_path / "run", 2)
    assert not (tmp_path / "run" / "student").exists()
    assert metrics_steps(tmp_path / "run") == [1, 2]
    if mode == "cache":
        run_distill(cfg, resume=True, progress=False)
        assert_same_student(reference, tmp_path / "run")
