"""The CLI (`--help` on every command: test_help.py): --version, clear errors without tracebacks, export through the command users run."""
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pocketlm import __version__
from pocketlm.cli import app

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_bad_config_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: -1\n  lernrate: 3\n")
    r = runner.invoke(app, ["distill", str(cfg)])
    assert r.exit_code == 2
    assert "train.steps" in r.output and "train.lernrate" in r.output and "Traceback" not in r.output


def test_missing_teacher_is_a_clear_error(tmp_path, corpus_file):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"teacher: {tmp_path}/nowhere\ndata:\n  source: {corpus_file}\noutput_dir: {tmp_path}/run\n")
    r = runner.invoke(app, ["distill", str(cfg)])
    assert r.exit_code == 2 and "model path not found" in r.output and "Traceback" not in r.output


def test_export_llama_through_the_cli(tmp_path, tokenizer):
    from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM

    torch.manual_seed(0)
    student = PocketLMForCausalLM(PocketLMConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    r = runner.invoke(app, ["export", str(tmp_path / "student"), "--format", "llama", "--out", str(tmp_path / "llama")])
    assert r.exit_code == 0, r.output
    ids = torch.tensor([[5, 9, 23, 7, 11]])
    with torch.no_grad():
        ours = student(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    # a fresh interpreter that never imports pocketlm loads the export with plain transformers
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as A; "
        f"m = A.from_pretrained(r'{tmp_path / 'llama'}'); assert 'pocketlm' not in sys.modules; "
        f"ids = torch.load(r'{tmp_path / 'ids.pt'}', weights_only=True); "
        f"torch.save(m(input_ids=ids).logits.detach(), r'{tmp_path / 'theirs.pt'}'); print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LlamaForCausalLM" in out.stdout
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    bad = runner.invoke(app, ["export", str(tmp_path / "student"), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "valid: llama" in bad.output


def test_eval_perplexity_cli_equals_the_api(teacher_dir, corpus_file, tmp_path):
    from pocketlm.data.text import read_documents
    from pocketlm.eval.perplexity import perplexity
    from pocketlm.models.load import load_model
    from pocketlm.core.results import Results

    out = tmp_path / "ppl.json"
    r = runner.invoke(app, ["eval", "perplexity", "--model", str(teacher_dir), "--data", str(corpus_file),
                            "--max-length", "16", "--out", str(out), "--quiet", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert "word_perplexity" in r.output and "95% CI" in r.output
    got = Results.read(out)
    m, tok = load_model(teacher_dir)
    want = perplexity(m, tok, read_documents(corpus_file), max_length=16, progress=False)
    assert got.details["sums"]["tokens"] == want.tokens and got.details["sums"]["words"] == want.words
    assert got.get("word_perplexity").value == pytest.approx(want.word_perplexity, rel=1e-9)
    assert got.model["fingerprint"] and got.data["hash"] and got.settings["max_length"] == 16
    assert got.provenance["packages"]["torch"] and got.settings["precision"] == "fp32"
    auto = runner.invoke(app, ["eval", "perplexity", "--model", str(teacher_dir), "--data", str(corpus_file),
                               "--max-length", "16", "--out", str(tmp_path / "auto.json"), "--quiet"])
    assert auto.exit_code == 0, auto.output
    from pocketlm.eval.loglik import fast_bf16

    auto_res = Results.read(tmp_path / "auto.json")
    assert auto_res.settings["precision"] == ("bf16" if fast_bf16(torch.device("cpu")) else "fp32")
    # bf16 body, fp32 output layer: within 1 % on this random tiny model (0.02 % measured on SmolLM2 + WikiText)
    assert auto_res.get("word_perplexity").value == pytest.approx(want.word_perplexity, rel=1e-2)
    for args, message in [
        (["--data", "/no/such.txt"], "data not found"),
        (["--data", str(corpus_file), "--max-length", "100000"], "longer than the model's context"),
        (["--data", str(corpus_file), "--detokenize", "nope"], "unknown --detokenize 'nope'"),
    ]:
        bad = runner.invoke(app, ["eval", "perplexity", "--model", str(teacher_dir), *args, "--out",
                                  str(tmp_path / "bad.json")])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (tmp_path / "bad.json").exists()
