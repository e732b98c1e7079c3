"""Two CPU processes on the gloo backend, launched by torchrun as a user would, against one process.

* distillation: the same global batch (train.batch_size split over the ranks) gives the same logged losses step by
  step (within 1e-5 relative) and the same weights (1e-5); a run checkpointed by 2 processes resumes in 1;
* the teacher cache built by 2 ranks is byte-identical to the single-process build (same shard checksums);
* sharded perplexity and sharded generation equal the single-process answers.

Each launch starts two Python processes that import torch and transformers, so these tests take ~1 minute.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from pocketlm.config import DistillConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def write_cfg(teacher_dir, corpus_file, out: Path, **train) -> Path:
    cfg = DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "distill": {"mode": "cache", "loss": "forward_kl", "top_k": 8, "temperature": 2.0, "ce_weight": 0.1},
        "train": {"steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1, "eval_every": 2,
                  "save_every": 2, **train},
        "output_dir": str(out),
    })
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # The gradients differ only by summation order (DDP's all-reduce). Adam's g / (sqrt(v) + eps) turns that
        # rounding into a visible step where a gradient element is ~0 by cancellation (measured: one element in
        # ~10^4 off by up to 2e-5), so the check is on each tensor as a whole: relative L2 difference <= 1e-4.
        # A real fault (a wrong share of the batch, gradients not averaged) moves every weight by ~lr = 1e-3.
        assert (a[k] - b[k]).norm() <= 1e-4 * a[k].norm(), k


def test_two_process_distillation_equals_one_process_and_resumes_on_one(tmp_path, teacher_dir, corpus_file):
    one = write_cfg(teacher_dir, corpus_file, tmp_path / "one")
    subprocess.run([sys.executable, "-m", "pocketlm.cli", "distill", str(one), "--quiet"], check=True,
                   capture_output=True, timeout=300)
    two = write_cfg(teacher_dir, corpus_file, tmp_path / "two")
    torchrun(["-m", "pocketlm.cli", "distill", str(two), "--quiet"])

    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in r2] == [1, 2, 3, 4] and [r["tokens_seen"] for r in r1] == [r["tokens_seen"] for r in r2]
    for a, b in zip(r1, r2):
        for key in ("loss", "kd", "ce", "grad_norm"):
            # abs: the cache-mode KD is ~7e-4 at step 2 (a sum of per-token KLs cancelling to near 0), where the
            # ranks' summation order moves it by ~3e-8 (measured); a real fault moves it by orders of magnitude more
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        if a.get("val_perplexity") is not None:
            assert b["val_perplexity"] == pytest.approx(a["val_perplexity"], rel=1e-5)
    assert_same_weights(tmp_path / "one" / "student", tmp_path / "two" / "student")
    # the two caches are the same bytes: shard checksums in the manifests agree
    m1 = json.loads((tmp_path / "one" / "teacher_cache" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "teacher_cache" / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"] and len(m1["shards"]) >= 1

    # written by 2 processes, resumed by 1: drop the last checkpoint and the student, continue from step 2
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "two" / "student")
    subprocess.run([sys.executable, "-m", "pocketlm.cli", "distill", str(two), "--quiet", "--resume"], check=True,
                   capture_output=True, timeout=300)
    assert_same_weights(tmp_path / "one" / "student", tmp_path / "two" / "student")


def test_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, teacher_dir, corpus_file):
    cfg = write_cfg(teacher_dir, corpus_file, tmp_path / "odd", batch_size=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "pocketlm.cli", "distill", str(cfg), "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "train.batch_size=3 is the global micro-batch and must split evenly over the 2 processes" in (
        out.stdout + out.stderr)


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from pocketlm.core import distributed as dist
    from pocketlm.eval.generate import GenerationSettings, generate
    from pocketlm.eval.perplexity import document_perplexities
    from pocketlm.models.load import load_model

    dist.init()
    model, tok = load_model(sys.argv[1])
    docs = [line for line in open(sys.argv[2], encoding="utf-8").read().split("\\n\\n") if line.strip()]
    per_doc = document_perplexities(model, tok, docs, max_length=12, batch_size=3, progress=False)
    gen = generate(model, tok, docs[:5], GenerationSettings(max_new_tokens=5, do_sample=True, num_samples=2, seed=3,
                                                          batch_size=3))
    out = {"per_doc": [[r.loglikelihood, r.tokens, r.words, r.bytes] for r in per_doc], "texts": gen.texts,
           "new_tokens": gen.new_tokens, "world": dist.world_size()}
    with open(f"{sys.argv[3]}.{dist.rank()}.json", "w") as f:
        json.dump(out, f)
""")


def test_sharded_perplexity_and_generation_equal_one_process(tmp_path, teacher_dir, corpus_file):
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), str(teacher_dir), str(corpus_file), str(tmp_path / "single")],
                   check=True, capture_output=True, timeout=300)
    torchrun([str(script), str(teacher_dir), str(corpus_file), str(tmp_path / "sharded")])
    single = json.loads((tmp_path / "single.0.json").read_text())
    assert single["world"] == 1
    for rank in (0, 1):
        got = json.loads((tmp_path / f"sharded.{rank}.json").read_text())
        assert got["world"] == 2
        assert got["texts"] == single["texts"] and got["new_tokens"] == single["new_tokens"]
        assert len(got["per_doc"]) == len(single["per_doc"])
        for (ll_a, *counts_a), (ll_b, *counts_b) in zip(single["per_doc"], got["per_doc"]):
            assert counts_a == counts_b
            assert ll_b == pytest.approx(ll_a, rel=1e-6)


def test_eval_perplexity_cli_under_torchrun_equals_one_process(tmp_path, teacher_dir, corpus_file):
    from pocketlm.core.results import Results

    args = ["eval", "perplexity", "--model", str(teacher_dir), "--data", str(corpus_file), "--max-length", "12",
            "--precision", "fp32", "--quiet"]
    subprocess.run([sys.executable, "-m", "pocketlm.cli", *args, "--out", str(tmp_path / "one.json")], check=True,
                   capture_output=True, timeout=300)
    torchrun(["-m", "pocketlm.cli", *args, "--out", str(tmp_path / "two.json")])
    one, two = Results.read(tmp_path / "one.json"), Results.read(tmp_path / "two.json")
    assert one.details["sums"]["tokens"] == two.details["sums"]["tokens"]
    for m in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert two.get(m).value == pytest.approx(one.get(m).value, rel=1e-6)
        assert two.get(m).ci == pytest.approx(one.get(m).ci, rel=1e-6)  # same per-document sums, same bootstrap
