"""benchmarks/quant_quality.py on a tiny model: the real CLI exports each quantization and scores each file; the
f32 file scores what the folder scores (the GGUF round trip is exact in f32), the table's deltas are the paired
differences of the rows, sizes are the files' sizes, and a re-run measures nothing again."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import CORPUS, load_benchmark, make_teacher



@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quant_quality")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The tiny Llama, its vocabulary holding `<|endoftext|>`: transformers' GGUF reader adds that token to a
    byte-level vocabulary that lacks it (GPT2Tokenizer's default unk), past the rows the model embeds."""
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    path = tmp_path_factory.mktemp("tiny")
    make_teacher(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_quant_quality_rows_and_table(bench, teacher_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pocketlm.data.text import read_documents
    from pocketlm.eval.perplexity import perplexity

    data = tmp_path / "wiki.txt"  # three articles in WikiText's layout
    data.write_text("".join(f" = Article {i} = \n\n {CORPUS[i]} {CORPUS[i + 3]} \n\n" for i in range(3)))
    out = tmp_path / "bench"
    argv = ["--models", f"tiny={teacher_dir}", "--quants", "f32,q8_0,q4_0", "--data", str(data),
            "--max-length", "32", "--resamples", "200", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = {q: json.loads((out / "rows" / f"tiny-{q}.json").read_text()) for q in ("f32", "q8_0", "q4_0")}

    def word(doc):
        return next(m["value"] for m in doc["metrics"] if m["name"] == "word_perplexity" and m.get("group") is None)

    # the f32 file scores what the folder scores, by the in-process API on the folder's model
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    docs = read_documents(str(data), txt_split="wikitext_headings")
    assert len(docs) == 3 and rows["f32"]["data"]["n"] == 3
    ref = perplexity(model, tok, docs, max_length=32, detokenize="wikitext", precision="fp32", progress=False)
    assert word(rows["f32"]) == pytest.approx(ref.word_perplexity, rel=1e-5)
    for q, doc in rows.items():
        assert doc["file_bytes"] == (out / doc["file"]).stat().st_size and doc["file"].endswith(f"model-{q}.gguf")
    assert rows["q4_0"]["file_bytes"] < rows["q8_0"]["file_bytes"] < rows["f32"]["file_bytes"]
    table = capsys.readouterr().out
    for q in ("q8_0", "q4_0"):
        line = next(x for x in table.splitlines() if x.startswith(f"| tiny | {q} |"))
        delta = float(re.search(r"\| ([+-]\d+\.\d+) \[", line).group(1))
        assert delta == pytest.approx(word(rows[q]) - word(rows["f32"]), abs=1e-3)
        low, high = map(float, re.search(r"\[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]", line).groups())
        assert low <= delta + 1e-3 and delta - 1e-3 <= high
        assert f"| {rows[q]['file_bytes'] / rows['f32']['file_bytes']:.2f} |" in line
    # a re-run measures nothing again
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": done") == 3
    # bad input is a named error before any work
    for bad, field in [(["--models", "../x=" + str(teacher_dir)], "--models"), (["--quants", "f32,q4_k"], "--quants"),
                       (["--models", f"tiny={tmp_path / 'absent'}"], "does not exist")]:
        with pytest.raises(SystemExit) as e:
            bench.main([*argv, *bad])
        assert e.value.code == 2 and field in capsys.readouterr().err
