#!/usr/bin/env python
"""What each GGUF quantization costs in perplexity, for the teacher and the demo student (#20 item 3).

For each model and each quantization: ``pocketlm export MODEL --format gguf --quant Q`` writes one file, then
``pocketlm eval perplexity --model FILE`` scores it on WikiText-2 test (``../shared/data/wikitext2/wiki.test.raw``,
split at its `` = Title = `` headings, lm-eval's wikitext detokeniser and word counts, rolling windows of
``--max-length`` tokens, fp32 arithmetic so that only the weights differ). transformers reads the file back by
de-quantising it, so the figure measures the error of the stored weights; llama.cpp also rounds activations
(tests/models/test_gguf_export.py bounds the gap between the two readers).

The table gives, per file: its size on disk, word perplexity, and the change against the same model's f32 file
with a 95 % paired bootstrap interval over articles (both files scored the same articles, each resample recomputes
both ratios of sums: ``pocketlm.tasks.perplexity.perplexity_deltas``).

Every (model, quant) is its own results file under ``--out``/rows: a re-run skips finished ones, so the table can
be built over several sittings; ``--table`` prints it from the files alone.

    python benchmarks/quant_quality.py                                    # teacher + outputs/demo student
    python benchmarks/quant_quality.py --documents 8                      # the first 8 articles only
    python benchmarks/quant_quality.py --models tiny=path/to/folder --quants f32,q8_0 --documents 1 --max-length 64
    python benchmarks/quant_quality.py --table
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
DEFAULT_MODELS = "teacher=smollm2-135m-instruct,student=outputs/demo/distill/student"
DEFAULT_QUANTS = "f32,f16,q8_0,q4_0"


def pocketlm(*args: str) -> None:
    """The CLI a user runs, in its own process (as the user would run it); its error is ours."""
    cmd = [sys.executable, "-m", "pocketlm.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def fail(message: str) -> None:
    """A named error before any work: exit 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_models(text: str) -> dict[str, str]:
    """`name=spec,...`: names become file names inside --out, so they are plain words."""
    models = {}
    for item in text.split(","):
        name, sep, spec = item.strip().partition("=")
        if not sep or not spec or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            fail(f"--models: expected name=spec with a name of letters, digits and _, got {item!r}")
        models[name] = spec
    return models


def parse_quants(text: str) -> list[str]:
    from pocketlm.models.gguf_export import quant_type

    quants = [q.strip().lower() for q in text.split(",") if q.strip()]
    for q in quants:
        try:
            quant_type(q)
        except ValueError as e:
            fail(f"--quants: {e}")
    return quants if "f32" in quants else ["f32", *quants]  # f32: the baseline every delta is paired against


def row_path(out: Path, model: str, quant: str) -> Path:
    return out / "rows" / f"{model}-{quant}.json"


def measure(args, name: str, spec: str, quant: str) -> None:
    path = row_path(args.out, name, quant)
    from pocketlm.tasks.base import model_identity

    identity = model_identity(spec)  # the model's files, not its name: a retrained student is measured again
    key = {"model": spec, "identity": identity, "quant": quant, "documents": args.documents,
           "max_length": args.max_length, "data": str(args.data)}
    if path.is_file() and json.loads(path.read_text()).get("benchmark_key") == key:
        print(f"{name} {quant}: done", flush=True)
        return
    tag = hashlib.sha256(identity.encode()).hexdigest()[:10]
    folder = args.out / "gguf" / f"{name}-{quant}-{tag}"
    gguf = folder / f"model-{quant}.gguf"
    t0 = time.perf_counter()
    if not gguf.is_file():
        pocketlm("export", spec, "--format", "gguf", "--quant", quant, "--out", str(folder))
    t1 = time.perf_counter()
    tmp = path.with_suffix(".partial.json")
    ev = ["eval", "perplexity", "--model", str(gguf), "--data", str(args.data), "--txt-split", "wikitext_headings",
          "--detokenize", "wikitext", "--max-length", str(args.max_length), "--precision", "fp32",
          "--batch-size", "4", "--quiet", "--overwrite", "--out", str(tmp)]
    if args.documents:
        ev += ["--max-documents", str(args.documents)]
    pocketlm(*ev)
    doc = json.loads(tmp.read_text())
    doc["benchmark_key"] = key
    doc["file"] = gguf.relative_to(args.out).as_posix()  # a name inside --out
    doc["file_bytes"] = gguf.stat().st_size
    doc["export_s"], doc["eval_s"] = round(t1 - t0, 1), round(time.perf_counter() - t1, 1)
    path.write_text(json.dumps(doc, indent=1))
    tmp.unlink()
    word = next(m["value"] for m in doc["metrics"] if m["name"] == "word_perplexity" and m.get("group") is None)
    print(f"{name} {quant}: word ppl {word:.3f}, {doc['file_bytes'] / 2**20:.1f} MiB, "
          f"export {doc['export_s']} s, eval {doc['eval_s']} s", flush=True)


def table(args, models: dict[str, str], quants: list[str]) -> str:
    from pocketlm.tasks.perplexity import perplexity_deltas
    from pocketlm.core.results import Results

    lines = ["| model | quant | file MiB | × f32 size | WikiText-2 word ppl | Δ vs f32 [95 % CI] | Δ % |",
             "|---|---|---|---|---|---|---|"]
    n_docs = None
    for name in models:
        base_path = row_path(args.out, name, "f32")
        base = Results.read(base_path) if base_path.is_file() else None
        base_bytes = json.loads(base_path.read_text())["file_bytes"] if base else None
        for q in quants:
            p = row_path(args.out, name, q)
            if not p.is_file():
                lines.append(f"| {name} | {q} | — | — | not measured | | |")
                continue
            res, raw = Results.read(p), json.loads(p.read_text())
            n_docs = res.data["n"]
            word = res.get("word_perplexity").value
            delta = "—"
            pct = "—"
            if base is not None and q != "f32":
                d = {m.name: m for m in perplexity_deltas(res, base, seed=0, n_resamples=args.resamples)}
                m = d.get("delta_word_perplexity")
                if m is not None:
                    ci = f" [{m.ci[0]:+.3f}, {m.ci[1]:+.3f}]" if m.ci else ""
                    delta = f"{m.value:+.3f}{ci}"
                    pct = f"{100 * m.value / base.get('word_perplexity').value:+.2f} %"
            ratio = f"{raw['file_bytes'] / base_bytes:.2f}" if base_bytes else "—"
            lines.append(f"| {name} | {q} | {raw['file_bytes'] / 2**20:.1f} | {ratio} | {word:.3f} | {delta} | {pct} |")
    lines.append("")
    lines.append(f"WikiText-2 test, {n_docs} articles, max_length {args.max_length}, fp32 arithmetic on the "
                 "de-quantised weights (`pocketlm eval perplexity`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="name=spec,... (folder, .gguf or embedded name)")
    ap.add_argument("--quants", default=DEFAULT_QUANTS)
    ap.add_argument("--data", type=Path, default=WIKITEXT)
    ap.add_argument("--documents", type=int, default=None, help="score only the first N articles (default: all)")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the paired interval")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-quant-quality")
    ap.add_argument("--table", action="store_true", help="print the table from the finished rows only")
    args = ap.parse_args(argv)
    models, quants = parse_models(args.models), parse_quants(args.quants)
    if not args.table:
        from pocketlm.core.outdir import output_folder, subfolder

        if not args.data.is_file():
            fail(f"{args.data}: WikiText-2 test is absent (see ../shared/data/wikitext2)")
        for name, spec in models.items():
            if (spec.endswith(".gguf") or os.sep in spec) and not Path(spec).exists():
                fail(f"--models {name}: {spec} does not exist (for the demo student run `make demo` first)")
        with output_folder(args.out, kind="bench-quant-quality"):
            subfolder(args.out / "rows", kind="bench-rows")
            subfolder(args.out / "gguf", kind="bench-exports")
            for name, spec in models.items():
                for q in quants:
                    measure(args, name, spec, q)
    print(table(args, models, quants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
