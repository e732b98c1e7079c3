"""More bad input (issue #16: items 5, 6, 8, 9, 10): wrong success, config bombs and tracebacks, through the real CLI.

The table reuses test_bad_input.py's rule and helpers: each case exits 2 with a message naming the file, field,
line or option at fault, no traceback, and the folder exactly as ``make`` left it. Cases that a table row cannot
express (a model loaded through the API, the memory guard, a line cap lowered for the test) are tests of their own.
Tiny models only (conftest's teacher); nothing loads SmolLM2.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from config_fields import Leaf, kind, walk
from safetensors.torch import load_file, save_file
from test_bad_input import (
    CROWS_OK, DISTILL, DISTILL_BASE, LABELLED, RUN, VLM_BASE, VLM_TRAIN, Case, Env, bias, both, caption,
    check, config, files, gguf_file, headless_classifier, merge, ppl, refuse_clearly, tox,
)

from pocketlm.config import DistillConfig
from pocketlm.config_pipeline import PipelineConfig
from pocketlm.vlm.config import VLMConfig

NO_TEACHER = "teacher: {tmp}/no-teacher\n"  # a case that slipped through on old code must not load SmolLM2
OK_CFG = {"teacher": "{teacher}", "data": {"source": "{corpus}", "block_size": 16}, "output_dir": "{out}"}


# ---------------------------------------------------------------------------------------------------- makers
def model_copy(name: str, config_edit: dict[str, Any] | None = None,
               tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None):
    """A copy of the teacher folder at ``{tmp}/name`` with config.json fields replaced (the value ``...`` removes
    the field) and/or its tensors rewritten."""
    def make(env: Env) -> None:
        d = env.tmp / name
        shutil.copytree(env.teacher, d)
        if config_edit:
            cfg = json.loads((d / "config.json").read_text())
            for k, v in config_edit.items():
                if v is ...:
                    cfg.pop(k, None)
                else:
                    cfg[k] = v
            (d / "config.json").write_text(json.dumps(cfg))  # NaN is written as NaN, as Python's json reads it
        if tensors:
            save_file(tensors(load_file(d / "model.safetensors")), d / "model.safetensors", metadata={"format": "pt"})
    return make


def nan_weights(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) for k, v in t.items()}


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width × height (one tiny IDAT): PIL reads the size before any pixel."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def pickled_scorer(env: Env) -> None:
    """A classifier folder whose weights are a pickle (pytorch_model.bin) — never unpickled."""
    headless_classifier(env)
    for f in (env.tmp / "clf").glob("*.safetensors"):
        f.unlink()
    (env.tmp / "clf" / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
) + "train:\n  steps: *i\n"

SIZE = ("size", "{tmp}/m/config.json", "--out", "{out}/r.json")


def size_config(**fields: Any) -> Callable[[Env], None]:
    base = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    return files({"m/config.json": json.dumps({**base, **fields})})


# ---------------------------------------------------------------------------------------------------- hand cases
def hand_cases() -> list[Case]:
    rows = [
        # --- item 5: weights that do not fill the model
        ("weights-fewer-layers", model_copy("m", {"num_hidden_layers": 6}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_hidden_layers is 6 but the weights hold 4 layers", "weights"),
        ("weights-no-tensors", model_copy("m", tensors=lambda t: {}), ppl("{corpus}", "{tmp}/m"),
         r"m: its weight files hold no tensors", "weights"),
        ("weights-missing-tensor", model_copy("m", tensors=lambda t: {k: v for k, v in t.items()
                                                                     if "layers.1.mlp.up_proj" not in k}),
         ppl("{corpus}", "{tmp}/m"), r"weight files lack weights \(1: model\.layers\.1\.mlp\.up_proj\.weight\)",
         "weights"),
        ("weights-unexpected-tensor", model_copy("m", tensors=lambda t: {**t, "model.extra.weight": torch.ones(3)}),
         ppl("{corpus}", "{tmp}/m"), r"hold unexpected weights \(1: model\.extra\.weight\)", "weights"),
        ("weights-fewer-layers-teacher", both(model_copy("m", {"num_hidden_layers": 6}),
                                             config({**OK_CFG, "teacher": "{tmp}/m"})), DISTILL,
         r"num_hidden_layers is 6 but the weights hold 4 layers", "weights"),
        # --- item 6: silently dropped, silently kept, silently coerced
        ("jsonl-text-number", files({"d.jsonl": '{"text": "a doc"}\n{"text": 5}\n'}), ppl("{tmp}/d.jsonl"),
         r"d\.jsonl line 2: field 'text' is a number \(5\), not text", "wrong success"),
        ("jsonl-text-null", files({"d.jsonl": '{"text": "a doc"}\n\n{"text": null}\n'}), ppl("{tmp}/d.jsonl"),
         r"d\.jsonl line 3: field 'text' is null, not text", "wrong success"),
        ("jsonl-text-first-number", files({"d.jsonl": '{"text": 7}\n{"text": "a doc"}\n'}), ppl("{tmp}/d.jsonl"),
         r"d\.jsonl line 1: field 'text' is a number", "wrong success"),
        ("csv-text-number", files({"d.csv": "text\na doc\n"}), ppl("{tmp}/d.csv", "{teacher}", "--field", "nope"),
         r"d\.csv has no field 'nope'", "wrong success"),
        ("yaml-duplicate-key", files({"c.yaml": NO_TEACHER + "train:\n  steps: 2\n  steps: 300\n"}), DISTILL,
         r"c\.yaml is not valid YAML: duplicate key 'steps' at line 4 \(first given at line 3\)", "wrong success"),
        ("yaml-duplicate-top-key", files({"c.yaml": "teacher: a\nteacher: b\n"}), RUN,
         r"duplicate key 'teacher' at line 2", "wrong success"),
        ("set-bool-for-int", config(DISTILL_BASE), (*DISTILL, "--set", "train.steps=true"),
         r"train\.steps: .*not a boolean", "wrong success"),
        ("set-bool-for-float", config(DISTILL_BASE), (*DISTILL, "--set", "train.lr=false"),
         r"train\.lr: .*not a boolean", "wrong success"),
        ("set-bool-in-int-list", config(DISTILL_BASE), (*DISTILL, "--set", "student.layers=[0, true]"),
         r"student\.layers: .*not a boolean", "wrong success"),
        ("set-bool-for-memory", config(DISTILL_BASE), (*DISTILL, "--set", "max_memory=true"),
         r"max_memory: .*(not a boolean|memory size)", "wrong success"),
        ("ppl-max-documents-zero", None, ppl("{corpus}", "{teacher}", "--max-documents", "0"),
         r"--max-documents", "wrong success"),
        ("ppl-max-documents-negative", None, ppl("{corpus}", "{teacher}", "--max-documents", "-2"),
         r"--max-documents", "wrong success"),
        ("ppl-max-batch-tokens-zero", None, ppl("{corpus}", "{teacher}", "--max-batch-tokens", "0"),
         r"--max-batch-tokens", "wrong success"),
        ("ppl-batch-size-zero", None, ppl("{corpus}", "{teacher}", "--batch-size", "0"), r"--batch-size",
         "wrong success"),
        ("ppl-stride-zero", None, ppl("{corpus}", "{teacher}", "--stride", "0"), r"--stride", "wrong success"),
        ("bias-limit-zero", files({"crows/c.csv": CROWS_OK}), bias("crows_pairs", "{tmp}/crows", "--limit", "0"),
         r"--limit", "wrong success"),
        ("bias-seed-negative", files({"crows/c.csv": CROWS_OK}), bias("crows_pairs", "{tmp}/crows", "--seed", "-1"),
         r"--seed", "wrong success"),
        ("tox-samples-negative", files({"p.txt": "Hello\n"}), tox("file", "{tmp}/p.txt", "--samples", "-1"),
         r"--samples", "wrong success"),
        ("tox-top-p-zero", files({"p.txt": "Hello\n"}), tox("file", "{tmp}/p.txt", "--top-p", "0"), r"--top-p",
         "wrong success"),
        ("crows-unknown-direction", files({"crows/c.csv": CROWS_OK + "B is c.,D is c.,sterio,age\n"}),
         bias("crows_pairs", "{tmp}/crows"), r"c\.csv line 3: stereo_antistereo is 'sterio'", "wrong success"),
        ("size-negative-hidden", size_config(hidden_size=-32), SIZE,
         r"config\.json: hidden_size must be between 1 and", "wrong success"),
        ("size-zero-layers", size_config(num_hidden_layers=0), SIZE,
         r"config\.json: num_hidden_layers must be between 1 and", "wrong success"),
        ("size-negative-context", size_config(), (*SIZE, "--context", "-5"), r"--context", "wrong success"),
        # --- item 8: config bombs
        ("ppl-heads-zero", model_copy("m", {"num_attention_heads": 0}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_attention_heads must be between 1", "config bombs"),
        ("ppl-heads-string", model_copy("m", {"num_attention_heads": "4"}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_attention_heads must be a whole number, got '4'", "config bombs"),
        ("ppl-heads-null", model_copy("m", {"num_attention_heads": None}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_attention_heads must be a whole number, got None", "config bombs"),
        ("ppl-heads-nan", model_copy("m", {"num_attention_heads": float("nan")}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_attention_heads must be a whole number, got nan", "config bombs"),
        ("ppl-heads-fraction", model_copy("m", {"num_attention_heads": 32.5}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_attention_heads must be a whole number, got 32\.5", "config bombs"),
        ("ppl-heads-indivisible", model_copy("m", {"num_attention_heads": 5, "num_key_value_heads": 5}),
         ppl("{corpus}", "{tmp}/m"), r"hidden_size 32 is not divisible by num_attention_heads 5", "config bombs"),
        ("ppl-kv-indivisible", model_copy("m", {"num_key_value_heads": 3}), ppl("{corpus}", "{tmp}/m"),
         r"num_attention_heads 4 is not divisible by num_key_value_heads 3", "config bombs"),
        ("ppl-layers-bomb", model_copy("m", {"num_hidden_layers": 100000}), ppl("{corpus}", "{tmp}/m"),
         r"m/config\.json: num_hidden_layers must be between 1 and 4,096, got 100,000", "config bombs"),
        ("ppl-layers-bomb-max-memory", model_copy("m", {"num_hidden_layers": 4000, "intermediate_size": 4096}),
         ppl("{corpus}", "{tmp}/m", "--max-memory", "64MiB"),
         r"--max-memory 64\.00 MiB is too small for .*m/config\.json: its weights alone take about", "config bombs"),
        ("ppl-weights-past-ram", model_copy("m", {"num_hidden_layers": 4000, "hidden_size": 65536,
                                                  "num_attention_heads": 512, "num_key_value_heads": 512}),
         ppl("{corpus}", "{tmp}/m"), r"m/config\.json: its weights would take about .*more than this machine's",
         "config bombs"),
        ("ppl-vocab-bomb", model_copy("m", {"vocab_size": 10**12}), ppl("{corpus}", "{tmp}/m"),
         r"vocab_size must be between 1 and", "config bombs"),
        ("size-layers-1e9-int", size_config(num_hidden_layers=10**9), SIZE,
         r"num_hidden_layers must be between 1 and 4,096, got 1,000,000,000", "config bombs"),
        ("size-layers-1e9-float", size_config(num_hidden_layers=1e9), SIZE,
         r"num_hidden_layers must be a whole number, got 1000000000\.0", "config bombs"),
        ("size-heads-nan", size_config(num_attention_heads=float("nan")), SIZE,
         r"num_attention_heads must be a whole number, got nan", "config bombs"),
        ("size-folder-heads-zero", model_copy("m", {"num_attention_heads": 0}),
         ("size", "{tmp}/m", "--out", "{out}/r.json"), r"num_attention_heads must be between 1", "config bombs"),
        ("scorer-heads-zero", both(headless_classifier, files({"l.csv": LABELLED}), lambda e: _edit_json(
            e.tmp / "clf" / "config.json", num_attention_heads=0)),
         check("{tmp}/l.csv", "--scorer", "hf:{tmp}/clf", "--toxic-label", "toxic"),
         r"clf/config\.json: num_attention_heads must be between 1", "config bombs"),
        # --- item 9: values found wrong only after the data and the cache were written
        ("distill-betas-out-of-range", config(merge(DISTILL_BASE, {"train": {"betas": [2, -1]}})), DISTILL,
         r"train\.betas: .*each of AdamW's betas must be in \[0, 1\)", "late values"),
        ("distill-seed-huge", files({"c.yaml": NO_TEACHER + "train:\n  seed: 1.0e+23\n"}), DISTILL, r"train\.seed: ",
         "late values"),
        ("distill-lr-huge", files({"c.yaml": NO_TEACHER + "train:\n  lr: 1.0e+300\n"}), DISTILL,
         r"train\.lr: Input should be less than or equal to 1", "late values"),
        ("distill-layer-past-teacher", config(merge(OK_CFG, {"student": {"layers": [0, 99]}})), DISTILL,
         r"student\.layers: the teacher has 4 layers \(0-3\); 99 is not one of them", "late values"),
        ("distill-num-layers-past-teacher", config(merge(OK_CFG, {"student": {"num_layers": 9}})), DISTILL,
         r"student\.num_layers: 9 teacher layers asked for, the teacher has 4", "late values"),
        ("distill-top-k-past-vocab", config(merge(OK_CFG, {"distill": {"top_k": 100000}})), DISTILL,
         r"distill\.top_k: 100000 is more than the teacher's vocabulary \(300\)", "late values"),
        ("run-layer-past-teacher", config(merge(OK_CFG, {"student": {"layers": [0, 7]}})), RUN,
         r"student\.layers: the teacher has 4 layers", "late values"),
        # --- item 10: tracebacks
        ("size-gguf-cut-in-metadata", gguf_file("llama", 0.3), ("size", "{tmp}/m.gguf", "--out", "{out}/r.json"),
         r"m\.gguf is truncated or damaged", "tracebacks"),
        ("export-teacher-folder", None, ("export", "{teacher}", "--out", "{out}"),
         r"export converts a pocketlm student .*LlamaForCausalLM", "tracebacks"),
        ("tox-temperature-nan", files({"p.txt": "Hello\n"}), tox("file", "{tmp}/p.txt", "--temperature", "nan"),
         r"--temperature", "tracebacks"),
        ("tox-temperature-inf", files({"p.txt": "Hello\n"}), tox("file", "{tmp}/p.txt", "--temperature", "inf"),
         r"--temperature", "tracebacks"),
        ("ppl-data-folder-with-subfolder", files({"d/a.txt": "A doc.\n", "d/sub/b.txt": "B doc.\n"}),
         ppl("{tmp}/d"), r"d holds \.txt documents and the sub-folder 'sub'", "tracebacks"),
        ("ppl-data-folder-txt-named-folder", files({"d/a.txt": "A doc.\n", "d/b.txt/c": "x\n"}),
         ppl("{tmp}/d"), r"d holds \.txt documents and the sub-folder 'b\.txt'", "tracebacks"),
        ("yaml-billion-laughs", files({"c.yaml": NO_TEACHER + BILLION_LAUGHS}), DISTILL,
         r"c\.yaml is not valid YAML: its aliases expand to more than 100,000 values", "tracebacks"),
        ("yaml-recursive-alias", files({"c.yaml": NO_TEACHER + "train:\n  betas: &a [*a]\n"}), DISTILL,
         r"c\.yaml is not valid YAML: an alias refers to the value that holds it", "tracebacks"),
        ("caption-png-bomb", files({"x.png": png_header(30000, 30000)}), caption("{tmp}/x.png"),
         r"x\.png is too large to read .*decompression bomb", "tracebacks"),
        ("caption-png-bomb-warning-range", files({"x.png": png_header(10000, 10000)}), caption("{tmp}/x.png"),
         r"x\.png is too large to read \(10000×10000 pixels", "tracebacks"),
        ("scorer-pickled-weights", both(pickled_scorer, files({"l.csv": LABELLED})),
         check("{tmp}/l.csv", "--scorer", "hf:{tmp}/clf", "--toxic-label", "toxic"),
         r"clf has no \.safetensors weights \(only pytorch_model\.bin: pickle files", "tracebacks"),
        ("ppl-nan-weights", model_copy("m", tensors=nan_weights), ppl("{corpus}", "{tmp}/m"),
         r"r\.json: not written, the perplexity results of .*m are not finite .*outputs are NaN", "tracebacks"),
    ]
    return [Case(cid, make, tuple(args), pat, cat) for cid, make, args, pat, cat in rows]


def _edit_json(path: Path, **fields: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def bool_cases(label: str, model, base: dict, args: tuple[str, ...], skip: frozenset[str] = frozenset()) -> list[Case]:
    """`true` in every int and float field (pydantic's lax mode read it as 1), each in a config of its own."""
    out = []
    for item in walk(model, skip):
        if isinstance(item, Leaf) and kind(item.field) in (int, float):
            out.append(Case(f"{label}:{item.path}:bool-for-number", config(merge(base, item.tree(True))), args,
                            rf"\b{re.escape(item.path)}: .*not a boolean", f"bool for number: {label}"))
    return out


CASES: list[Case] = (
    hand_cases()
    + bool_cases("distill", DistillConfig, DISTILL_BASE, DISTILL)
    + bool_cases("run", PipelineConfig, DISTILL_BASE, RUN, skip=frozenset(DistillConfig.model_fields))
    + bool_cases("vlm", VLMConfig, VLM_BASE, VLM_TRAIN)
)
COUNTS = Counter(c.category for c in CASES)


def test_the_table_is_what_it_says():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert {"distill:train.steps:bool-for-number", "vlm:stage2.lr:bool-for-number"} <= set(ids)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case: Case, tmp_path, teacher_dir, corpus_file, monkeypatch):
    refuse_clearly(case, tmp_path, teacher_dir, corpus_file, monkeypatch)


# ---------------------------------------------------------------------------------------------------- API tests
def test_load_model_refuses_a_config_deeper_than_its_weights(tmp_path, teacher_dir):
    from pocketlm.models.load import ModelLoadError, load_model

    d = tmp_path / "m"
    model_copy("m", {"num_hidden_layers": 6})(Env(tmp_path, teacher_dir, teacher_dir))
    with pytest.raises(ModelLoadError, match=r"num_hidden_layers is 6 but the weights hold 4 layers"):
        load_model(d)


def test_load_model_refuses_missing_weights_the_layer_count_does_not_show(tmp_path, teacher_dir):
    """The depth matches, a tensor inside a layer is gone: transformers' loading info names it."""
    from pocketlm.models.load import ModelLoadError, load_model

    model_copy("m", tensors=lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})(
        Env(tmp_path, teacher_dir, teacher_dir))
    with pytest.raises(ModelLoadError, match=r"lack weights \(1: model\.norm\.weight\)"):
        load_model(tmp_path / "m")


def test_tied_teacher_and_pocketlm_students_still_load(tmp_path, teacher_dir):
    """Tied output weights are legitimately absent from the file; the student's own model_type loads too."""
    from pocketlm.models.init import init_student_from_teacher, student_config_from_teacher
    from pocketlm.models.load import load_model
    from pocketlm.models.student import PocketLMForCausalLM

    teacher, tok = load_model(teacher_dir)
    assert teacher.config.tie_word_embeddings
    student = init_student_from_teacher(teacher, student_config_from_teacher(teacher.config, num_layers=2))
    untied = PocketLMForCausalLM(student_config_from_teacher(teacher.config, num_layers=1,
                                                             tie_word_embeddings=False))
    for name, m in (("s", student), ("u", untied)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        loaded, _ = load_model(tmp_path / name)
        torch.testing.assert_close(loaded.lm_head.weight, m.lm_head.weight)


def test_memory_guard_refuses_before_the_model_is_built(tmp_path, teacher_dir, monkeypatch):
    """--max-memory, and the machine's own memory without it, are checked from config.json: nothing is built."""
    import transformers

    from pocketlm.memory import MemoryBudgetError
    from pocketlm.models import config_check
    from pocketlm.models.load import load_model

    def built(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", built)
    with pytest.raises(MemoryBudgetError, match=r"--max-memory 1\.00 KiB is too small for .*its weights alone"):
        load_model(teacher_dir, max_memory=1024)
    monkeypatch.setattr(config_check, "machine_memory", lambda: 4096)
    with pytest.raises(MemoryBudgetError, match=r"more than this machine's 4\.00 KiB of memory"):
        load_model(teacher_dir)


def test_estimated_parameters_match_the_model(teacher_dir):
    """The guard's estimate is the model's parameter count but for norms (a few hundred of 46 thousand here)."""
    from transformers import AutoModelForCausalLM

    from pocketlm.models.config_check import estimated_parameters

    raw = json.loads((teacher_dir / "config.json").read_text())
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher_dir).parameters())
    assert 0.98 * n <= estimated_parameters(raw) <= n


def test_a_line_too_long_is_refused_by_name(tmp_path, monkeypatch):
    """A one-line JSONL larger than the cap (lowered here: the real one is 8 MiB) is refused before parsing."""
    from pocketlm.data import text
    from pocketlm.data.text import DataError, read_documents

    monkeypatch.setattr(text, "MAX_LINE_BYTES", 1000, raising=False)
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n' + json.dumps({"text": "word " * 400}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 2 is 2,0\d\d bytes long"):
        read_documents(tmp_path / "d.jsonl")
    (tmp_path / "d.txt").write_text("short\n\n" + "word " * 400)
    with pytest.raises(DataError, match=r"d\.txt document 2 is [\d,]+ bytes long"):
        read_documents(tmp_path / "d.txt")


def test_a_huge_yaml_value_is_shown_short():
    """A bad value is shown cut short in the error (formatting a huge one took all memory)."""
    from pocketlm.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, ["train.steps=[" + ", ".join(["1"] * 50_000) + "]"])
    assert "train.steps" in str(e.value) and len(str(e.value)) < 500


def test_yaml_anchors_within_the_limit_still_work():
    from pocketlm.config import load_yaml_text

    assert load_yaml_text("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
