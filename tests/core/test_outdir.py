"""Output folders (issue #16, items 2, 3, 7): a user's files are never deleted, overwritten or replaced; one run per
folder; a folder that cannot be written, or a disk without room, is refused by name before any work.

Every case goes through the real CLI (exit 2, the path named, no traceback) and checks the user's files byte for
byte afterwards. Tiny models only (conftest's teacher, a 2-layer student saved in-test).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.core.outdir import LOCK, MARKER, FolderLockedError, folder_lock

runner = CliRunner()


def cli(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"uncaught {type(res.exception).__name__}: {res.exception}\n{res.output}")
    return res


def refused(res, *patterns: str) -> None:
    import re

    assert res.exit_code == 2, res.output
    for p in patterns:
        assert re.search(p, res.output), f"{p!r} not in {res.output!r}"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (the lock's record of who holds it aside)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if p.name != LOCK}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A tiny pocketlm student folder with its tokenizer, as `pocketlm distill` leaves one."""
    from conftest import make_tokenizer
    from models.test_export import tiny_student

    tok = make_tokenizer()
    path = tmp_path_factory.mktemp("student") / "student"
    model = tiny_student(tied=True)
    model.config.vocab_size = len(tok)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def user_folder(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "config.json").write_text('{"mine": true}')  # a name pocketlm also writes
    return d


def distill_config(tmp_path: Path, teacher_dir, corpus_file, out: Path, steps: int = 2) -> Path:
    import yaml

    tree = {"teacher": str(teacher_dir), "data": {"source": str(corpus_file), "block_size": 16},
            "student": {"init": "teacher_layers", "num_layers": 1},
            "distill": {"mode": "cache", "top_k": 8},
            "train": {"steps": steps, "batch_size": 2, "save_every": 1, "eval_every": 1000},
            "output_dir": str(out)}
    path = tmp_path / f"c-{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# ---------------------------------------------------------------------------------------------- item 2: data loss
def test_export_never_wipes_a_users_folder(tmp_path, student_dir):
    """Before: `export --out DIR` replaced DIR, user's files and all. Now refused by name; --overwrite writes
    the export beside the user's files (their same-named file replaced only then), deleting nothing."""
    mine = user_folder(tmp_path)
    before = snapshot(mine)
    refused(cli("export", student_dir, "--out", mine), r"--out: .*mine holds files pocketlm did not write",
            r"--overwrite")
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left
    res = cli("export", student_dir, "--out", mine, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert json.loads((mine / "config.json").read_text())["model_type"] == "llama"
    assert (mine / "model.safetensors").is_file() and not (mine / MARKER).exists()  # still the user's folder


def test_export_into_a_run_folder_is_refused_and_the_run_survives(tmp_path, student_dir, teacher_dir, corpus_file):
    """Before: `--out` equal to the run folder deleted the whole run (checkpoints, cache, metrics)."""
    run = tmp_path / "run"
    assert cli("distill", distill_config(tmp_path, teacher_dir, corpus_file, run), "--quiet").exit_code == 0
    before = snapshot(run)
    refused(cli("export", student_dir, "--out", run), r"is a pocketlm distill folder, not a export folder")
    refused(cli("prune-heads", "--model", student_dir, "--data", corpus_file, "--heads", "3", "--out",
                run / "checkpoints", "--quiet"), r"holds files pocketlm did not write|pocketlm .* folder")
    assert snapshot(run) == before


def test_export_onto_a_file_is_refused_even_with_overwrite(tmp_path, student_dir):
    """Before: `--out FILE` replaced the file by a folder."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        refused(cli("export", student_dir, "--out", f, *extra), r"notes\.txt is a file, not a folder")
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_second_export_replaces_its_own_export_but_not_one_a_user_added_to(tmp_path, student_dir):
    out = tmp_path / "export"
    assert cli("export", student_dir, "--out", out).exit_code == 0
    mark = json.loads((out / MARKER).read_text())
    assert mark["kind"] == "export" and "model.safetensors" in mark["files"]
    assert cli("export", student_dir, "--out", out, "--dtype", "bfloat16").exit_code == 0  # ours: replaced
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    (out / "my-notes.md").write_text("added by the user")
    refused(cli("export", student_dir, "--out", out), r"holds files pocketlm did not write \(my-notes\.md\)")
    assert (out / "my-notes.md").read_text() == "added by the user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_prune_heads_and_attention_refuse_a_users_folder(tmp_path, student_dir, corpus_file):
    mine = user_folder(tmp_path)
    before = snapshot(mine)
    refused(cli("prune-heads", "--model", student_dir, "--data", corpus_file, "--heads", "3", "--out", mine,
                "--quiet"), r"--out: .*mine holds files pocketlm did not write")
    refused(cli("attention", "--model", student_dir, "--text", "the cat sat", "--out", mine),
            r"--out: .*mine holds files pocketlm did not write")
    assert snapshot(mine) == before


def test_results_files_replace_only_pocketlm_results(tmp_path, teacher_dir, corpus_file):
    """`--out r.json` over a user's file or onto a folder: refused before any work; over our own results: fine."""
    mine = tmp_path / "budget.json"
    mine.write_text('{"q3": 12}')
    args = ("eval", "perplexity", "--model", teacher_dir, "--data", corpus_file, "--quiet", "--max-documents", "2")
    refused(cli(*args, "--out", mine), r"budget\.json exists and is not a pocketlm results file")
    assert mine.read_text() == '{"q3": 12}'
    refused(cli(*args, "--out", tmp_path), r"is a folder; name a file")
    ours = tmp_path / "r.json"
    assert cli(*args, "--out", ours).exit_code == 0
    assert cli(*args, "--out", ours).exit_code == 0  # a pocketlm results document may be replaced
    assert cli(*args, "--out", mine, "--overwrite").exit_code == 0
    assert json.loads(mine.read_text())["kind"] == "perplexity"


# ---------------------------------------------------------------------------------------------- item 3: one run per folder
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pocketlm.core.outdir import folder_lock
    with folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_a_second_run_on_a_held_folder_is_refused_by_name(tmp_path, teacher_dir, corpus_file):
    """Before: two distill runs on one output_dir both exited 0, one result lost, metrics.jsonl interleaved."""
    out = tmp_path / "run"
    cfg = distill_config(tmp_path, teacher_dir, corpus_file, out)
    assert cli("distill", cfg, "--quiet").exit_code == 0
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        res = cli("distill", cfg, "--quiet", "--resume")
        refused(res, rf"is in use by another pocketlm run \(pid {proc.pid} on {socket.gethostname()}")
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed: flock died with it, and the run goes on
    assert cli("distill", cfg, "--quiet", "--resume").exit_code == 0


def test_two_distill_processes_at_once_one_is_refused(tmp_path, teacher_dir, corpus_file):
    """The issue's case as it happened: two `pocketlm distill` processes on one output_dir at the same time."""
    out = tmp_path / "run"
    cfg = distill_config(tmp_path, teacher_dir, corpus_file, out, steps=300)
    cmd = [sys.executable, "-m", "pocketlm.cli", "distill", str(cfg), "--quiet"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / LOCK).is_file() and (out / LOCK).read_text()) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by another pocketlm run (pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "step" in json.loads(line) and "train_loss" in line]
    assert steps == sorted(set(steps))  # one run's log, not two interleaved
    assert (out / LOCK).read_text() == ""  # released on exit


def test_a_stale_lock_is_taken_over_and_another_hosts_is_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    with pytest.warns(UserWarning, match="no longer running"), folder_lock(d):
        assert json.loads((d / LOCK).read_text())["pid"] == os.getpid()
    assert (d / LOCK).read_text() == ""
    (d / LOCK).write_text(json.dumps({"pid": 1234, "host": "gpu-node-7", "since": "then"}))
    with pytest.raises(FolderLockedError, match=r"locked by pid 1234 on host gpu-node-7 .* delete .*pocketlm\.lock"):
        with folder_lock(d):
            pass


def test_the_same_process_cannot_hold_a_folder_twice(tmp_path):
    with folder_lock(tmp_path), pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"), folder_lock(tmp_path):
        pass


# ---------------------------------------------------------------------------------------------- item 7: before any work
def commands(tmp: Path, teacher_dir, corpus_file, student_dir, out: Path) -> dict[str, list]:
    crows = tmp / "crows.csv"
    crows.write_text("sent_more,sent_less,stereo_antistereo,bias_type\nA is b.,C is b.,stereo,race-color\n")
    summ = tmp / "summ.jsonl"
    summ.write_text(json.dumps({"document": "the cat sat", "summary": "cat"}) + "\n")
    tox = tmp / "tox.jsonl"
    tox.write_text(json.dumps({"prompt": {"text": "Hello"}}) + "\n")
    return {
        "perplexity": ["eval", "perplexity", "--model", teacher_dir, "--data", corpus_file, "--out", out, "--quiet"],
        "rouge": ["eval", "rouge", "--model", teacher_dir, "--data", summ, "--out", out, "--quiet"],
        "bias": ["audit", "bias", "--suite", "crows_pairs", "--model", teacher_dir, "--data", crows, "--out", out,
                 "--quiet"],
        "toxicity": ["audit", "toxicity", "--model", teacher_dir, "--suite", "rtp", "--data", tox, "--out", out,
                     "--quiet"],
        "size": ["size", teacher_dir, "--out", out],
        "attention": ["attention", "--model", teacher_dir, "--text", "the cat", "--out", out],
        "prune-heads": ["prune-heads", "--model", student_dir, "--data", corpus_file, "--heads", "3", "--out", out,
                        "--quiet"],
        "prune": ["prune", "--model", teacher_dir, "--data", corpus_file, "--num-layers", "2", "--block-size", "16",
                  "--out", out, "--quiet"],
        "export": ["export", student_dir, "--out", out],
        "distill": ["distill", distill_config(tmp, teacher_dir, corpus_file, out), "--quiet"],
    }


@pytest.mark.parametrize("where", ["under-a-file", "not-writable"])
def test_an_output_that_cannot_be_written_is_refused_before_work(tmp_path, teacher_dir, corpus_file, student_dir,
                                                                  where):
    """Before: 24 tracebacks across these 9 commands. A path under a regular file, and one in a folder nobody may
    write (/sys refuses even root), are named errors with nothing written."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out" if where == "under-a-file" else Path("/sys/pocketlm-test/out")
    if where == "not-writable":
        try:
            os.mkdir("/sys/pocketlm-test")
        except OSError:
            pass  # as expected: not even root may write there
        else:
            os.rmdir("/sys/pocketlm-test")
            pytest.skip(reason="/sys is writable on this machine, so it cannot stand for an unwritable folder")
    for name, args in commands(tmp_path, teacher_dir, corpus_file, student_dir, out).items():
        before = snapshot(tmp_path)
        res = cli(*args)
        expect = r"a-file is a file, so .* cannot be created" if where == "under-a-file" else r"cannot write in /sys"
        refused(res, expect)
        assert snapshot(tmp_path) == before, name


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, teacher_dir, corpus_file, student_dir):
    f = tmp_path / "out"
    f.write_text("mine")
    for name, args in commands(tmp_path, teacher_dir, corpus_file, student_dir, f).items():
        res = cli(*args)
        if name in ("perplexity", "rouge", "bias", "size"):  # a results file: a user's file is not replaced
            refused(res, r"exists and is not a pocketlm results file")
        else:
            refused(res, r"out is a file, not a folder")
        assert f.read_text() == "mine", name


def test_too_little_free_space_is_refused_before_work(tmp_path, teacher_dir, corpus_file, student_dir, monkeypatch):
    """The free-space check (in-process: disk_usage reports 1 MiB free)."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    for name, args in commands(tmp_path, teacher_dir, corpus_file, student_dir, tmp_path / "out").items():
        before = snapshot(tmp_path)
        refused(cli(*args), r"only 1\.0 MiB free on the disk holding")
        assert snapshot(tmp_path) == before, name


def test_a_full_disk_mid_write_is_a_named_error_with_nothing_left(tmp_path, student_dir, monkeypatch):
    """Before: safetensors' own error for a full disk escaped the OSError handler, leaving `.tmp` folders."""
    import pocketlm.models.hf_export as hf_export

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(hf_export, "save_file", full)
    refused(cli("export", student_dir, "--out", tmp_path / "x"), r"No space left on device.*x")
    assert list(tmp_path.iterdir()) == []


TINY_DISK = textwrap.dedent(
    """
    set -e
    mount -t tmpfs -o size=2m tmpfs "$1"
    shift
    "$@"
    """
)


def test_a_real_full_disk_is_refused_before_work(tmp_path, student_dir):
    """A real 2 MiB tmpfs (a private mount namespace): export is refused by the free-space check, nothing written."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(reason=f"mount namespaces are not available here (unshare -m: {probe.stderr.decode().strip()}); "
                    f"test_too_little_free_space_is_refused_before_work covers the check in-process")
    cmd = ["unshare", "-m", "sh", "-c", TINY_DISK, "sh", str(mnt), sys.executable, "-m", "pocketlm.cli", "export",
           str(student_dir), "--out", str(mnt / "export")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "free on the disk holding" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("victim", ["shard-00000.safetensors", "optimizer.safetensors", "blocks-"])
def test_a_full_disk_in_a_run_is_named_and_leaves_no_temporary_file(tmp_path, teacher_dir, corpus_file, monkeypatch,
                                                                     victim):
    """safetensors reports a full disk as its own error, which escaped the OSError handlers (a traceback, `.tmp`
    files left): while writing a teacher-cache shard, a checkpoint's optimizer moments, the packed data blocks."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *a, **k):
        if victim in Path(filename).name:
            Path(filename).write_bytes(b"half")  # as a real full disk leaves it
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    res = cli("distill", distill_config(tmp_path, teacher_dir, corpus_file, out), "--quiet")
    refused(res, r"No space left on device")
    left = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert left == [], left


def test_a_large_results_file_of_ours_is_still_recognised(tmp_path):
    """A results document of several MB (per-item details) is ours to replace; a user's JSON is not."""
    from pocketlm.core.outdir import check_result_file, is_results_document
    from pocketlm.core.results import Metric, Results

    big = Results(kind="x", model={}, data={}, settings={}, metrics=[Metric("m", 1.0, 1)],
                  details={"items": ["y" * 100] * 30000}).write(tmp_path / "r.json")
    assert big.stat().st_size > 2 << 20 and is_results_document(big)
    check_result_file(big)  # no refusal
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"notes": "x", "schema": "not pocketlm's"}))
    assert not is_results_document(mine)


def test_a_file_added_to_our_export_while_it_is_rewritten_is_kept(tmp_path, student_dir, monkeypatch):
    """The check before work passed (our own export); a user's file lands in it before the swap: refused, kept."""
    import pocketlm.core.outdir as outdir
    from pocketlm.models.load import load_model

    out = tmp_path / "export"
    assert cli("export", student_dir, "--out", out).exit_code == 0
    real_write_marker = outdir._write_marker

    def meanwhile(folder, kind, files=None):  # runs when the new export is complete, before the swap
        (out / "added-meanwhile.txt").write_text("the user's")
        return real_write_marker(folder, kind, files)

    monkeypatch.setattr(outdir, "_write_marker", meanwhile)
    from pocketlm.models.hf_export import export_llama

    m, tok = load_model(student_dir)
    with pytest.raises(outdir.OutputError, match=r"received files pocketlm did not write .*added-meanwhile"):
        export_llama(m, out, tokenizer=tok)
    assert (out / "added-meanwhile.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left
