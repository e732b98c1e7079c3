"""Bad input, table-driven (issue #10): everything a user can hand pocketlm that it cannot use, through the real CLI.

A case is ``(id, make, args, pattern)``: ``make(env)`` writes the bad input under a fresh folder, ``args`` is the
command line (``{tmp}``, ``{teacher}``, ``{corpus}``, ``{out}`` filled in), ``pattern`` a regex the error must
match — it names the field, file, line or column at fault. Every case must end with exit code 2 (the CLI's
expected-error code, `cli/_common._fail`), that message, no traceback, and the folder exactly as ``make`` left it
(no output folder, results file or cache written: nothing partial behind). Config cases are generated from the
pydantic models themselves (every field: a wrong type, every bound: a value past it, every level: an unknown key),
so a field added later is covered without touching this file. ``CASES`` is the table; ``COUNTS`` its size per
category. Tiny models only (conftest's teacher); nothing loads SmolLM2.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple

import numpy as np
import pytest
import yaml
from data.test_suites import _bbq_row  # a valid BBQ row
from config_fields import Leaf, Level, bounds, kind, pattern, required, walk
from pydantic import BaseModel
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.config import DistillConfig
from pocketlm.config_pipeline import PipelineConfig
from pocketlm.vlm.config import VLMConfig

LATIN1 = "Caf\u00e9 cr\u00e8me; na\u00efve r\u00e9sum\u00e9.\n".encode("latin-1")  # not UTF-8 (byte 0xe9 at 3)


@dataclass
class Env:
    tmp: Path
    teacher: Path
    corpus: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def fill(self, text: str) -> str:
        for key, value in (("tmp", self.tmp), ("teacher", self.teacher), ("corpus", self.corpus), ("out", self.out)):
            text = text.replace("{" + key + "}", str(value))
        return text


class Case(NamedTuple):
    id: str
    make: Callable[[Env], None] | None
    args: tuple[str, ...]
    pattern: str
    category: str


# ---------------------------------------------------------------------------------------------------- makers
def files(spec: dict[str, str | bytes]) -> Callable[[Env], None]:
    """Write each relative path: bytes as they are, text with the {placeholders} filled in."""
    def make(env: Env) -> None:
        for rel, content in spec.items():
            p = env.tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(env.fill(content), encoding="utf-8")
    return make


def config(tree: dict) -> Callable[[Env], None]:
    return files({"c.yaml": yaml.safe_dump(tree, sort_keys=False)})


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def both(*makers: Callable[[Env], None]) -> Callable[[Env], None]:
    def make(env: Env) -> None:
        for m in makers:
            m(env)
    return make


def tiny_gguf(path: Path, arch: str) -> None:
    """A small real GGUF (metadata + two tensors) written by the gguf package's own writer."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_file(arch: str, keep: float = 1.0) -> Callable[[Env], None]:
    def make(env: Env) -> None:
        tiny_gguf(env.tmp / "m.gguf", arch)
        data = (env.tmp / "m.gguf").read_bytes()
        (env.tmp / "m.gguf").write_bytes(data[: int(len(data) * keep)])
    return make


def tiff(channels: int, photometric: int) -> bytes:
    """A 4×4 little-endian TIFF of ``channels`` 8-bit samples a pixel and no ExtraSamples tag (so no alpha)."""
    w = h = 4
    pixels = bytes((i * 7) % 256 for i in range(w * h * channels))
    bps_at, n = 8, 9
    ifd_at = bps_at + 2 * channels
    data_at = ifd_at + 2 + 12 * n + 4
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, channels, bps_at), (259, 3, 1, 1), (262, 3, 1, photometric),
            (273, 4, 1, data_at), (277, 3, 1, channels), (278, 3, 1, h), (279, 4, 1, len(pixels))]
    return (b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack(f"<{channels}H", *[8] * channels)
            + struct.pack("<H", n) + b"".join(struct.pack("<HHII", *t) for t in tags) + b"\0\0\0\0" + pixels)


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def mismatched_teacher(env: Env) -> None:
    """The teacher's weights (300 token rows) with a tokenizer that has 64 ids more: they do not belong together."""
    from conftest import make_tokenizer

    d = env.tmp / "mismatch"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (env.teacher / f).exists():
            shutil.copy(env.teacher / f, d / f)
    tok = make_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(64)])
    tok.save_pretrained(d)


def headless_classifier(env: Env) -> None:
    """A folder that says LlamaForSequenceClassification but holds only the base model: no trained head."""
    from conftest import make_teacher, make_tokenizer

    tok = make_tokenizer()
    base = make_teacher(len(tok), layers=1, hidden=16).model
    base.config.id2label, base.config.label2id = {0: "ok", 1: "toxic"}, {"ok": 0, "toxic": 1}
    base.save_pretrained(env.tmp / "clf")
    tok.save_pretrained(env.tmp / "clf")
    cfg = json.loads((env.tmp / "clf" / "config.json").read_text())  # save_pretrained wrote LlamaModel
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (env.tmp / "clf" / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------------- commands
DISTILL = ("distill", "{tmp}/c.yaml", "--quiet")
RUN = ("run", "{tmp}/c.yaml", "--quiet")
VLM_TRAIN = ("vlm", "train", "{tmp}/c.yaml", "--quiet")


def ppl(data: str, model: str = "{teacher}", *more: str) -> tuple[str, ...]:
    return ("eval", "perplexity", "--model", model, "--data", data, "--out", "{out}/r.json", "--quiet", *more)


def bias(suite: str, data: str, *more: str) -> tuple[str, ...]:
    return ("audit", "bias", "--suite", suite, "--model", "{teacher}", "--data", data, "--out", "{out}/r.json",
            "--quiet", *more)


def tox(suite: str, data: str, *more: str) -> tuple[str, ...]:
    return ("audit", "toxicity", "--model", "{teacher}", "--suite", suite, "--data", data, "--out", "{out}",
            "--quiet", *more)


def check(data: str, *more: str) -> tuple[str, ...]:
    return ("audit", "scorer-check", "--data", data, "--out", "{out}", *more)


def caption(image: str) -> tuple[str, ...]:
    return ("vlm", "caption", image, "--model", "{tmp}/no-vlm", "--out", "{out}/r.json")


VLM_EVAL = ("vlm", "eval", "--model", "{tmp}/no-vlm", "--images", "{tmp}/img", "--captions", "{tmp}/cap.jsonl",
            "--out", "{out}/r.json", "--quiet")

# valid enough to reach the bad part; a teacher/LM that does not exist, so nothing could train if a case slipped
DISTILL_BASE = {"teacher": "{tmp}/no-teacher", "data": {"source": "{corpus}"}, "output_dir": "{out}"}
VLM_BASE = {"output_dir": "{out}", "lm": {"path": "{tmp}/no-lm"},
            "data": {"shapes": {"n_train": 2, "n_val": 1, "n_test": 1}}}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------------- config cases
def bad_values(leaf: Leaf) -> Iterator[tuple[str, Any, str]]:
    """(what, a value that must be refused, pydantic's words for it) for one leaf field."""
    yield {Literal: ("bad-choice", "bogus-choice", r"Input should be '"),
           bool: ("not-a-bool", "maybe", r"valid boolean"), int: ("str-for-int", "five", r"valid integer"),
           float: ("str-for-float", "fast", r"valid number"), str: ("list-for-str", ["a", "b"], r"valid string"),
           list: ("str-for-list", "abc", r"valid list"), tuple: ("str-for-tuple", "abc", r"valid tuple"),
           }.get(kind(leaf.field), ("list-for-union", [["a"]], r"Input should be a valid"))  # Union[int, str]
    b = bounds(leaf.field)
    if "ge" in b:
        yield "below-ge", b["ge"] - 1, r"greater than or equal to"
    if "gt" in b:
        yield "at-gt", b["gt"], r"greater than"
    if "le" in b:
        yield "above-le", b["le"] + 1, r"less than or equal to"
    if "lt" in b:
        yield "at-lt", b["lt"], r"less than"
    if pattern(leaf.field):
        yield "bad-pattern", "1 not a name", r"should match pattern"


def config_cases(label: str, model: type[BaseModel], base: dict, args: tuple[str, ...],
                 skip: frozenset[str] = frozenset()) -> list[Case]:
    """An unknown key at every level and every bad value of every leaf field, each in a config of its own."""
    out = []
    for item in walk(model, skip):
        if isinstance(item, Level):
            if skip and not item.path:
                continue  # the top level's unknown key is the distill table's
            where = f"{item.path}." if item.path else ""
            tree = item.wrap({**required(item.model), "bogus_key": 1})
            out.append(Case(f"{label}:{where}bogus_key:unknown-key", config(merge(base, tree)), args,
                            rf"{re.escape(where)}bogus_key: unknown key", f"config fields: {label}"))
            continue
        for what, value, words in bad_values(item):
            out.append(Case(f"{label}:{item.path}:{what}", config(merge(base, item.tree(value))), args,
                            rf"\b{re.escape(item.path)}(\.[\w-]+)?: .*{words}", f"config fields: {label}"))
    return out


# ---------------------------------------------------------------------------------------------------- hand cases
CROWS_OK = "sent_more,sent_less,stereo_antistereo,bias_type\nA is b.,C is b.,stereo,race-color\n"
STEREO_ROW = {"id": "s1", "target": "t", "bias_type": "race", "context": "t is BLANK",
              "sentences": [{"sentence": "t is a", "gold_label": "stereotype"},
                            {"sentence": "t is b", "gold_label": "anti-stereotype"},
                            {"sentence": "t is c", "gold_label": "unrelated"}]}
BBQ_ROW = _bbq_row()
LABELLED = "tweet,class\n" + "".join(f"text number {i},{i % 3}\n" for i in range(12))
WINO = {"wino/pro_stereotyped_type1.txt.test": "1 [The developer] argued with [he].\n",
        "wino/anti_stereotyped_type1.txt.test": "1 [The developer] argued with [she].\n",
        "wino/pro_stereotyped_type2.txt.test": "1 [The nurse] met [her].\n",
        "wino/anti_stereotyped_type2.txt.test": "1 [The nurse] met [him].\n"}


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


def hand_cases() -> list[Case]:
    C = Case
    ok_cfg = {"teacher": "{teacher}", "data": {"source": "{corpus}", "block_size": 16}, "output_dir": "{out}"}
    rows = [
        # --- config values the field types cannot catch (registries, cross-field rules), --set, YAML itself
        ("distill-unknown-loss", config(merge(DISTILL_BASE, {"distill": {"loss": "kl_forward"}})), DISTILL,
         r"distill\.loss: .*unknown distillation loss 'kl_forward'; valid: forward_kl", "config values"),
        ("distill-unknown-router", config(merge(DISTILL_BASE, {"student": {"moe": {"router": "magic"}}})), DISTILL,
         r"student\.moe\.router: .*unknown router 'magic'", "config values"),
        ("distill-topk-over-experts", config(merge(DISTILL_BASE, {"student": {"moe": {"num_experts": 2,
         "top_k": 3}}})), DISTILL, r"student\.moe: .*top_k \(3\) must not exceed num_experts \(2\)", "config values"),
        ("distill-width-needs-random", config(merge(DISTILL_BASE, {"student": {"hidden_size": 64}})), DISTILL,
         r"student: .*hidden_size: width overrides need init: random", "config values"),
        ("distill-position-scheme", config(merge(DISTILL_BASE, {"student": {"init": "random",
         "position_scheme": "sinusoid"}})), DISTILL, r"position_scheme: unknown 'sinusoid'", "config values"),
        ("distill-set-bad-type", config(DISTILL_BASE), (*DISTILL, "--set", "train.steps=many"),
         r"train\.steps: .*valid integer", "config values"),
        ("distill-set-no-equals", config(DISTILL_BASE), (*DISTILL, "--set", "train.steps"),
         r"--set 'train\.steps': expected key=value", "config values"),
        ("distill-set-unknown-key", config(DISTILL_BASE), (*DISTILL, "--set", "train.stepz=3"),
         r"train\.stepz: unknown key", "config values"),
        ("distill-yaml-syntax", files({"c.yaml": "train:\n  steps: [1, 2\n"}), DISTILL,
         r"c\.yaml is not valid YAML: .*line \d+, column \d+", "config values"),
        ("distill-yaml-too-deep", files({"c.yaml": "train: " + "[" * 3000}), DISTILL,
         r"c\.yaml is not valid YAML: it nests too deeply", "config values"),
        ("distill-yaml-bad-date", files({"c.yaml": "train:\n  steps: 2024-13-45\n"}), DISTILL,
         r"c\.yaml is not valid YAML: month must be in 1\.\.12", "config values"),
        ("distill-lr-infinite", files({"c.yaml": "train:\n  lr: .inf\n"}), DISTILL,
         r"train\.lr: Input should be a finite number", "config values"),
        ("pipeline-gate-too-deep", config(merge(DISTILL_BASE, {"gates": ["(" * 40 + "student.x < 1" + ")" * 40]})),
         RUN, r"gates\.0\.rule: .*more than 32 levels deep at column 33", "config values"),
        ("distill-yaml-not-mapping", files({"c.yaml": "- a\n- b\n"}), DISTILL,
         r"c\.yaml: the top level must be a mapping", "config values"),
        ("pipeline-duplicate-names", config(merge(DISTILL_BASE, {"eval": {"perplexity": [{"name": "a"},
         {"name": "a"}]}})), RUN, r"two sets or suites are named 'a'", "config values"),
        ("pipeline-reserved-name", config(merge(DISTILL_BASE, {"eval": {"perplexity": [{"name": "teacher"}]}})),
         RUN, r"the result name 'teacher' is reserved", "config values"),
        ("pipeline-ce-twice", config(merge(DISTILL_BASE, {"ce_baseline": True, "distill": {"mode": "ce"}})), RUN,
         r"ce_baseline: the student itself is trained with cross-entropy", "config values"),
        ("pipeline-gate-syntax", config(merge(DISTILL_BASE, {"gates": ["student.x <= "]})), RUN,
         r"gates\.0\.rule: .*column \d+", "config values"),
        ("pipeline-gate-eval", config(merge(DISTILL_BASE, {"gates": ["__import__('os').system('x') == 0"]})), RUN,
         r"gates\.0\.rule: .*unexpected character", "config values"),
        ("pipeline-gate-unknown-name", config(merge(DISTILL_BASE, {"gates": ["rouge_x.rouge1 >= 0.1"]})), RUN,
         r"gates\.0: rouge_x\.rouge1 names 'rouge_x', which this pipeline does not measure", "config values"),
        ("vlm-patch-divides", config(merge(VLM_BASE, {"encoder": {"image_size": 48, "patch_size": 7}})), VLM_TRAIN,
         r"encoder\.patch_size \(7\) must divide image_size \(48\)", "config values"),
        ("vlm-folder-needs-train", config(merge(VLM_BASE, {"data": {"kind": "folder", "shapes": {}}})), VLM_TRAIN,
         r"data\.train \(images \+ captions\) is required", "config values"),
        ("vlm-bad-device", config(merge(VLM_BASE, {"device": "gpu7"})), VLM_TRAIN, r"device: .*not a torch device",
         "config values"),
        ("vlm-unknown-projector", config(merge(VLM_BASE, {"projector": {"kind": "qformer"}})), VLM_TRAIN,
         r"projector\.kind: .*unknown projector 'qformer'", "config values"),
        # --- command-line values
        ("bias-unknown-suite", None, bias("crows", "{corpus}"),
         r"unknown bias suite 'crows'; valid names: bbq, crows_pairs", "CLI values"),
        ("bias-bad-precision", None, bias("crows_pairs", "{corpus}", "--precision", "fp8"),
         r"--precision must be one of fp32, bf16, auto; got 'fp8'", "CLI values"),
        ("ppl-bad-txt-split", None, ppl("{corpus}", "{teacher}", "--txt-split", "pages"),
         r"unknown txt_split 'pages'; valid: blank_lines", "CLI values"),
        ("ppl-bad-detokenize", None, ppl("{corpus}", "{teacher}", "--detokenize", "ptb"),
         r"unknown --detokenize 'ptb'; valid: wikitext", "CLI values"),
        ("ppl-bad-dtype", None, ppl("{corpus}", "{teacher}", "--dtype", "float8"), r"unknown dtype 'float8'",
         "CLI values"),
        ("tox-limit-zero", files({"p.txt": "Hello there\n"}), tox("file", "{tmp}/p.txt", "--limit", "0"),
         r"--limit.*(must be >= 1, got 0|greater than or equal to 1)", "CLI values"),
        ("size-context-zero", None, ("size", "{teacher}", "--context", "0", "--out", "{out}/r.json"),
         r"--context.*(must be positive|greater than or equal to 1)", "CLI values"),
        ("export-bad-format", None, ("export", "{teacher}", "--format", "onnx", "--out", "{out}"),
         r"unknown export format 'onnx'; valid: llama", "CLI values"),
        ("check-bad-definition", files({"l.csv": LABELLED}), check("{tmp}/l.csv", "--definition", "hate=0"),
         r"bad label definition 'hate=0'; expected NAME=POS", "CLI values"),
        # --- missing files
        ("distill-config-missing", None, DISTILL, r"config file not found: .*c\.yaml", "missing files"),
        ("run-config-missing", None, RUN, r"config file not found: .*c\.yaml", "missing files"),
        ("vlm-config-missing", None, VLM_TRAIN, r"config file not found: .*c\.yaml", "missing files"),
        ("distill-teacher-missing", config({**ok_cfg, "teacher": "{tmp}/nowhere"}), DISTILL,
         r"model path not found: .*nowhere", "missing files"),
        ("distill-data-missing", config(merge(ok_cfg, {"data": {"source": "{tmp}/none.txt"}})), DISTILL,
         r"data not found: .*none\.txt", "missing files"),
        ("pipeline-eval-data-missing", config(merge(ok_cfg, {"eval": {"perplexity": [{"data": "{tmp}/w.txt"}]}})),
         RUN, r"eval\.perplexity\.0\.data: data not found: .*w\.txt", "missing files"),
        ("pipeline-suite-missing", config(merge(ok_cfg, {"audit": {"bias": [{"suite": "bbq", "data": "nobbq"}]}})),
         RUN, r"audit\.bias\.0\.data: data not found: .*nobbq", "missing files"),
        ("ppl-model-missing", None, ppl("{corpus}", "{tmp}/nomodel"), r"model path not found: .*nomodel",
         "missing files"),
        ("ppl-model-no-config", files({"m/weights.bin": b"\0"}), ppl("{corpus}", "{tmp}/m"),
         r"m is a folder but has no config\.json", "missing files"),
        ("ppl-gguf-missing", None, ppl("{corpus}", "{tmp}/x.gguf"), r"GGUF file not found: .*x\.gguf",
         "missing files"),
        ("ppl-data-missing", None, ppl("{tmp}/nodata.txt"), r"data not found: .*nodata\.txt", "missing files"),
        ("bias-data-missing", None, bias("crows_pairs", "{tmp}/nocrows"), r"crows_pairs: data not found: .*nocrows",
         "missing files"),
        ("tox-model-missing", files({"p.txt": "Hello\n"}), ("audit", "toxicity", "--model", "{tmp}/nomodel",
         "--suite", "file", "--data", "{tmp}/p.txt", "--out", "{out}"), r"model path not found: .*nomodel",
         "missing files"),
        ("tox-suite-missing", None, tox("toxigen", "{tmp}/notox"), r"ToxiGen data .*notox does not exist",
         "missing files"),
        ("probes-file-missing", None, ("audit", "probes", "--model", "{teacher}", "--probes", "{tmp}/p.yaml",
         "--out", "{out}"), r"probe file .*p\.yaml does not exist", "missing files"),
        ("check-data-missing", None, check("{tmp}/nolabels.csv"), r"labelled set .*nolabels\.csv does not exist",
         "missing files"),
        ("rouge-data-missing", None, ("eval", "rouge", "--model", "{teacher}", "--data", "{tmp}/s.jsonl", "--out",
         "{out}/r.json", "--quiet"), r"data not found: .*s\.jsonl", "missing files"),
        ("size-model-missing", None, ("size", "{tmp}/nomodel", "--out", "{out}/r.json"),
         r"nomodel", "missing files"),
        ("caption-image-missing", None, caption("{tmp}/none.png"), r"image file not found: .*none\.png",
         "missing files"),
        ("vlm-train-images-missing", config(merge(VLM_BASE, {"data": {"kind": "folder", "shapes": {}, "train": {
         "images": "{tmp}/noimg", "captions": "{tmp}/cap.jsonl"}}})), VLM_TRAIN, r"image folder not found: .*noimg",
         "missing files"),
        ("vlm-train-lm-missing", config(VLM_BASE), VLM_TRAIN, r"model path not found: .*no-lm", "missing files"),
        ("vlm-eval-image-missing", both(files({"cap.jsonl": jsonl([{"image": "gone.png", "caption": "a"}])}),
                                        lambda e: (e.tmp / "img").mkdir()), VLM_EVAL, r"cap\.jsonl line 1: .*gone\.png",
         "missing files"),
        # --- empty files
        ("ppl-empty-txt", files({"e.txt": ""}), ppl("{tmp}/e.txt"), r"e\.txt holds no non-empty documents",
         "empty files"),
        ("ppl-blank-txt", files({"e.txt": "\n\n   \n"}), ppl("{tmp}/e.txt"), r"e\.txt holds no non-empty documents",
         "empty files"),
        ("ppl-empty-jsonl", files({"e.jsonl": ""}), ppl("{tmp}/e.jsonl"),
         r"e\.jsonl holds no rows \(the file is empty\)", "empty files"),
        ("distill-empty-corpus", both(files({"e.txt": ""}), config(merge(ok_cfg, {"data": {"source":
         "{tmp}/e.txt"}}))), DISTILL, r"e\.txt holds no non-empty documents", "empty files"),
        ("crows-empty-csv", files({"crows/c.csv": ""}), bias("crows_pairs", "{tmp}/crows"),
         r"c\.csv holds no rows \(the file is empty\)",
         "empty files"),
        ("crows-header-only", files({"crows/c.csv": CROWS_OK.splitlines()[0] + "\n"}),
         bias("crows_pairs", "{tmp}/crows"), r"c\.csv holds no rows \(only a header\)", "empty files"),
        ("stereoset-empty-list", files({"ss/dev.json": "[]"}), bias("stereoset", "{tmp}/ss"),
         r"stereoset: .*ss holds no items", "empty files"),
        ("stereoset-zero-bytes", files({"ss/dev.json": ""}), bias("stereoset", "{tmp}/ss"),
         r"dev\.json line 1: not valid JSON", "empty files"),
        ("bbq-empty-jsonl", files({"bbq/Age.jsonl": ""}), bias("bbq", "{tmp}/bbq"),
         r"Age\.jsonl holds no rows \(the file is empty\)",
         "empty files"),
        ("winobias-empty", files({k: "" for k in WINO}), bias("winobias", "{tmp}/wino"),
         r"winobias: .*wino holds no items", "empty files"),
        ("toxigen-empty-files", files({"tg/hate_women_1k.txt": "", "tg/neutral_women_1k.txt": "\n"}),
         tox("toxigen", "{tmp}/tg"), r"tg holds no prompts \(its toxigen files are empty\)", "empty files"),
        ("prompt-file-empty", files({"p.txt": ""}), tox("file", "{tmp}/p.txt"), r"p\.txt has no prompts",
         "empty files"),
        ("check-empty-csv", files({"l.csv": ""}), check("{tmp}/l.csv"), r"l\.csv holds no rows", "empty files"),
        ("probes-empty-yaml", files({"p.yaml": ""}), ("audit", "probes", "--model", "{teacher}", "--probes",
         "{tmp}/p.yaml", "--out", "{out}"), r"p\.yaml is empty; a probe file holds `sets:`", "empty files"),
        ("vlm-eval-empty-captions", both(files({"cap.jsonl": ""}), lambda e: (e.tmp / "img").mkdir()), VLM_EVAL,
         r"cap\.jsonl holds no captions or questions", "empty files"),
        # --- text that is not UTF-8
        ("ppl-latin1-txt", files({"l.txt": b"ok\n" + LATIN1}), ppl("{tmp}/l.txt"),
         r"l\.txt is not UTF-8 text: line 2", "non-UTF-8"),
        ("ppl-latin1-jsonl", files({"l.jsonl": b'{"text": "' + LATIN1.strip() + b'"}\n'}), ppl("{tmp}/l.jsonl"),
         r"l\.jsonl is not UTF-8 text: line 1, byte 13", "non-UTF-8"),
        ("distill-latin1-yaml", files({"c.yaml": b"teacher: " + LATIN1}), DISTILL,
         r"c\.yaml is not valid YAML.*(utf-8|UTF-8)", "non-UTF-8"),
        ("crows-latin1-csv", files({"crows/c.csv": CROWS_OK.encode() + LATIN1.strip() + b",x,stereo,age\n"}),
         bias("crows_pairs", "{tmp}/crows"), r"c\.csv is not UTF-8 text: line 3, byte \d+", "non-UTF-8"),
        ("stereoset-latin1", files({"ss/dev.json": json.dumps([STEREO_ROW]).encode().replace(b"BLANK", LATIN1[:5])}),
         bias("stereoset", "{tmp}/ss"), r"dev\.json is not UTF-8 text: line 1", "non-UTF-8"),
        ("winobias-latin1", files({**WINO, "wino/pro_stereotyped_type1.txt.test": b"1 [The " + LATIN1}),
         bias("winobias", "{tmp}/wino"), r"pro_stereotyped_type1\.txt\.test is not UTF-8 text: line 1", "non-UTF-8"),
        ("toxigen-latin1", files({"tg/hate_women_1k.txt": LATIN1}), tox("toxigen", "{tmp}/tg"),
         r"hate_women_1k\.txt is not UTF-8 text", "non-UTF-8"),
        ("prompt-jsonl-latin1", files({"p.jsonl": b'{"prompt": "' + LATIN1.strip() + b'"}\n'}),
         tox("file", "{tmp}/p.jsonl"), r"p\.jsonl is not UTF-8 text", "non-UTF-8"),
        ("check-latin1-csv", files({"l.csv": LABELLED.encode() + LATIN1.strip() + b",1\n"}), check("{tmp}/l.csv"),
         r"l\.csv is not UTF-8 text: line 14", "non-UTF-8"),
        ("probes-latin1-yaml", files({"p.yaml": b"sets: " + LATIN1}), ("audit", "probes", "--model", "{teacher}",
         "--probes", "{tmp}/p.yaml", "--out", "{out}"), r"p\.yaml is not UTF-8 text", "non-UTF-8"),
        ("vlm-captions-latin1", both(files({"cap.jsonl": b'{"image": "a.png", "caption": "' + LATIN1.strip()
                                            + b'"}\n', "img/a.png": png_bytes()})), VLM_EVAL,
         r"cap\.jsonl line 1 is not a JSON object .*utf-8", "non-UTF-8"),
        # --- GGUF files
        ("gguf-unsupported-arch", gguf_file("frobnicator"), ppl("{corpus}", "{tmp}/m.gguf"),
         r"m\.gguf: transformers cannot read this GGUF .*architecture frobnicator", "GGUF"),
        ("gguf-truncated-metadata", gguf_file("llama", 0.3), ppl("{corpus}", "{tmp}/m.gguf"),
         r"m\.gguf is truncated or damaged", "GGUF"),
        ("gguf-truncated-tensors", gguf_file("llama", 0.9), ppl("{corpus}", "{tmp}/m.gguf"),
         r"m\.gguf is truncated or damaged", "GGUF"),
        ("gguf-not-gguf", files({"m.gguf": "just text, not a model\n"}), ppl("{corpus}", "{tmp}/m.gguf"),
         r"m\.gguf is not a GGUF file \(its first bytes are b'just'", "GGUF"),
        ("gguf-as-distill-teacher", both(gguf_file("frobnicator"), config({**ok_cfg, "teacher": "{tmp}/m.gguf"})),
         DISTILL, r"m\.gguf: transformers cannot read this GGUF", "GGUF"),
        # --- tokenizer / teacher vocabulary mismatch
        ("vocab-mismatch-eval", mismatched_teacher, ppl("{corpus}", "{tmp}/mismatch"),
         r"mismatch: the tokenizer has ids up to 363 but the model embeds only 300 tokens .*vocabulary mismatch",
         "vocabulary mismatch"),
        ("vocab-mismatch-distill-teacher", both(mismatched_teacher, config({**ok_cfg, "teacher": "{tmp}/mismatch"})),
         DISTILL, r"mismatch: the tokenizer has ids up to 363 but the model embeds only 300 tokens",
         "vocabulary mismatch"),
        ("vocab-mismatch-bias-baseline", both(mismatched_teacher, files({"crows/c.csv": CROWS_OK})),
         bias("crows_pairs", "{tmp}/crows", "--baseline", "{tmp}/mismatch"),
         r"mismatch: the tokenizer has ids up to 363",
         "vocabulary mismatch"),
        # --- suite files with a missing column
        ("crows-no-sent_less", files({"crows/c.csv": "sent_more,stereo_antistereo,bias_type\nA.,stereo,age\n"}),
         bias("crows_pairs", "{tmp}/crows"), r"c\.csv: missing column 'sent_less'", "suite columns"),
        ("crows-empty-cell", files({"crows/c.csv": CROWS_OK + "B is c.,,stereo,age\n"}),
         bias("crows_pairs", "{tmp}/crows"), r"c\.csv line 3: missing column 'sent_less'", "suite columns"),
        ("stereoset-no-target", files({"ss/dev.json": json.dumps([without(STEREO_ROW, "target")])}),
         bias("stereoset", "{tmp}/ss"), r"dev\.json item 0: missing column 'target'", "suite columns"),
        ("stereoset-no-unrelated", files({"ss/dev.json": json.dumps([{**STEREO_ROW, "sentences":
                                                                     STEREO_ROW["sentences"][:2]}])}),
         bias("stereoset", "{tmp}/ss"), r"item 's1' has no 'unrelated' sentence", "suite columns"),
        ("bbq-no-label", files({"bbq/Age.jsonl": jsonl([without(BBQ_ROW, "label")])}), bias("bbq", "{tmp}/bbq"),
         r"Age\.jsonl: missing column 'label'", "suite columns"),
        ("bbq-no-stereotyped-groups", files({"bbq/Age.jsonl": jsonl([{**BBQ_ROW, "additional_metadata": {"a": "b"}}])}),
         bias("bbq", "{tmp}/bbq"), r"Age\.jsonl line 1: missing column 'additional_metadata\.stereotyped_groups'",
         "suite columns"),
        ("winobias-bad-line", files({**WINO, "wino/anti_stereotyped_type2.txt.test": "[The nurse] met [him].\n"}),
         bias("winobias", "{tmp}/wino"), r"anti_stereotyped_type2\.txt\.test line 1: expected '<number> <sentence>'",
         "suite columns"),
        ("winobias-file-missing", files({k: v for k, v in WINO.items() if "anti_stereotyped_type1" not in k}),
         bias("winobias", "{tmp}/wino"), r"WinoBias file not found: .*anti_stereotyped_type1\.txt\.test",
         "suite columns"),
        ("toxigen-no-prompt-files", files({"tg/readme.md": "x"}), tox("toxigen", "{tmp}/tg"),
         r"tg has no ToxiGen prompt files", "suite columns"),
        ("bold-wrong-shape", files({"bold/gender_prompt.json": json.dumps({"women": ["a list, not pages"]})}),
         tox("bold", "{tmp}/bold"), r"gender_prompt\.json: group 'women' should map page titles to prompt lists",
         "suite columns"),
        ("rtp-no-prompt-text", files({"rtp.jsonl": jsonl([{"prompt": {"txt": "x"}}])}), tox("rtp", "{tmp}/rtp.jsonl"),
         r"rtp\.jsonl line 1: no prompt\.text field", "suite columns"),
        ("prompt-jsonl-no-field", files({"p.jsonl": jsonl([{"prompt": "a"}, {"query": "b"}])}),
         tox("file", "{tmp}/p.jsonl"), r"p\.jsonl line 2: no 'prompt/text' string field", "suite columns"),
        ("check-no-class-column", files({"l.csv": "tweet,label\nhello,0\n"}), check("{tmp}/l.csv"),
         r"l\.csv has no column 'class'; its columns are: \['tweet', 'label'\]", "suite columns"),
        ("check-no-tweet-column", files({"l.jsonl": jsonl([{"text": "a", "class": 1}])}), check("{tmp}/l.jsonl"),
         r"l\.jsonl has no column 'tweet'", "suite columns"),
        ("rouge-no-summary-field", files({"s.jsonl": jsonl([{"document": "a b c", "abstract": "a"}])}),
         ("eval", "rouge", "--model", "{teacher}", "--data", "{tmp}/s.jsonl", "--out", "{out}/r.json", "--quiet"),
         r"s\.jsonl has no reference field 'summary'", "suite columns"),
        ("vlm-captions-no-caption", both(files({"cap.jsonl": jsonl([{"image": "a.png", "text": "x"}]),
                                               "img/a.png": png_bytes()})), VLM_EVAL,
         r"cap\.jsonl line 1: field 'caption' is missing or empty", "suite columns"),
        # --- images that are not images
        ("caption-text-as-png", files({"x.png": "I am text, not pixels\n"}), caption("{tmp}/x.png"),
         r"cannot read .*x\.png as an image", "images"),
        ("caption-truncated-png", lambda e: (e.tmp / "x.png").write_bytes(png_bytes()[:40]), caption("{tmp}/x.png"),
         r"cannot read .*x\.png as an image", "images"),
        ("caption-two-channel-tiff", files({"x.tif": tiff(2, 1)}), caption("{tmp}/x.tif"),
         r"cannot read .*x\.tif as an image", "images"),
        ("caption-five-channel-tiff", files({"x.tif": tiff(5, 2)}), caption("{tmp}/x.tif"),
         r"cannot read .*x\.tif as an image", "images"),
        ("caption-no-image-marker", files({"x.png": png_bytes()}), (*caption("{tmp}/x.png"), "--prompt", "hi"),
         r"needs exactly one <image> marker", "images"),
        ("vlm-eval-text-as-image", files({"cap.jsonl": jsonl([{"image": "a.png", "caption": "x"}]),
                                          "img/a.png": "not an image"}), VLM_EVAL,
         r"cannot read .*a\.png as an image", "images"),
        # --- toxicity scorers
        ("scorer-no-head-causal-lm", files({"l.csv": LABELLED}), check("{tmp}/l.csv", "--scorer", "hf:{teacher}",
         "--toxic-label", "toxic"), r"has no classification head \(architectures: \['LlamaForCausalLM'\]\)",
         "scorer folders"),
        ("scorer-head-weights-missing", both(headless_classifier, files({"l.csv": LABELLED})),
         check("{tmp}/l.csv", "--scorer", "hf:{tmp}/clf", "--toxic-label", "toxic"),
         r"clf: the classification head is not in the checkpoint .*score\.weight", "scorer folders"),
        ("scorer-needs-label", both(headless_classifier, files({"l.csv": LABELLED})),
         check("{tmp}/l.csv", "--scorer", "hf:{tmp}/clf"), r"name the label that means toxic .*\['ok', 'toxic'\]",
         "scorer folders"),
        ("scorer-unknown-label", both(headless_classifier, files({"l.csv": LABELLED})),
         check("{tmp}/l.csv", "--scorer", "hf:{tmp}/clf", "--toxic-label", "hate"), r"has no label 'hate'",
         "scorer folders"),
        ("scorer-folder-missing", files({"l.csv": LABELLED}), check("{tmp}/l.csv", "--scorer", "hf:{tmp}/noclf",
         "--toxic-label", "toxic"), r"scorer folder .*noclf does not exist", "scorer folders"),
        ("scorer-unknown-kind", files({"l.csv": LABELLED}), check("{tmp}/l.csv", "--scorer", "perspective"),
         r"unknown .*'perspective'", "scorer folders"),
        ("tox-scorer-no-head", files({"p.txt": "Hello\n"}), tox("file", "{tmp}/p.txt", "--scorer", "hf:{teacher}",
         "--toxic-label", "toxic"), r"has no classification head", "scorer folders"),
    ]
    return [C(cid, make, tuple(args), pattern, cat) for cid, make, args, pattern, cat in rows]


CASES: list[Case] = (
    hand_cases()
    + config_cases("distill", DistillConfig, DISTILL_BASE, DISTILL)
    + config_cases("run", PipelineConfig, DISTILL_BASE, RUN, skip=frozenset(DistillConfig.model_fields))
    + config_cases("vlm", VLMConfig, VLM_BASE, VLM_TRAIN)
)
COUNTS = Counter(c.category for c in CASES)


def test_the_table_is_what_it_says():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 60 and all(COUNTS[k] >= 3 for k in COUNTS)
    # every leaf field of the three configs has at least one wrong-type case
    leaves = {c.id.split(":")[1] for c in CASES if c.category.startswith("config fields")}
    assert {"train.steps", "student.moe.top_k", "eval.rouge.0.max_new_tokens", "gates.0.rule", "stage2.lr",
            "data.train.captions", "encoder.image_size"} <= leaves


def _snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def refuse_clearly(case: Case, tmp_path: Path, teacher_dir: Path, corpus_file: Path, monkeypatch) -> None:
    """Run `case` through the real CLI: exit 2, its pattern in the message, no traceback, nothing left behind."""
    env = Env(tmp_path / "w", teacher_dir, corpus_file)
    env.tmp.mkdir()
    if case.make is not None:
        case.make(env)
    monkeypatch.chdir(env.tmp)  # default output paths would land here too, and be seen
    before = _snapshot(env.tmp)
    r = CliRunner().invoke(app, [env.fill(a) for a in case.args])
    out = r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"unexpected {type(r.exception).__name__}: {r.exception}\n{out}")
    assert r.exit_code == 2, f"exit code {r.exit_code}:\n{out}"
    assert "Traceback" not in out
    flat = re.sub(r"\s*[│╭╰─╮╯]+\s*", " ", out)  # click's usage errors are boxed and wrapped
    assert re.search(case.pattern, out, re.S) or re.search(case.pattern, flat, re.S), (
        f"message does not match {case.pattern!r}:\n{out}")
    assert _snapshot(env.tmp) == before, "the failed command left files behind"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case: Case, tmp_path, teacher_dir, corpus_file, monkeypatch):
    refuse_clearly(case, tmp_path, teacher_dir, corpus_file, monkeypatch)
