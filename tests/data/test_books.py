"""Books as training documents (issue #18 item 3): the reader's cleaning, decontamination, whole-book held-out
splits, the training-token budget and the blocks' cache key; then the real NLTK Gutenberg corpus when present."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import CORPUS, SHARED_DATA, make_teacher
from pocketlm.config import ConfigError, DistillConfig, load_config
from pocketlm.data.books import decontaminate, decontaminate_training, read_book, read_books
from pocketlm.data.text import DataError, build_blocks, hash_documents, pack, split_documents

BOOKS = SHARED_DATA / "gutenberg_nltk"
WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"
real_corpus = pytest.mark.skipif(
    not (BOOKS.is_dir() and WIKI_TEST.is_file()),
    reason=f"shared data absent: {BOOKS} and {WIKI_TEST} (../shared/data beside the repository) are needed",
)

PG_BOOK = (b"The Project Gutenberg EBook of X, by Y\n"
           b"\n"
           b"*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
           b"\n"
           b"\n"
           b"Body one.\n"
           b"\n"
           b"End of the project, said he; not the end of the book.\n"
           b"\n"
           b"\n"
           b"\n"
           b"End of Project Gutenberg's X, by Y\n"
           b"\n"
           b"*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n"
           b"license text\n")


def write_books(folder, books: dict[str, bytes]):
    folder.mkdir(exist_ok=True)
    for name, raw in books.items():
        (folder / name).write_bytes(raw)
    return folder


# ---------------------------------------------------------------------------------------------- reading
def test_each_cleaning_rule_byte_for_byte(tmp_path):
    folder = write_books(tmp_path / "books", {
        "latin.txt": b"[Caf\xe9 by A]\n\nC\xe6sar said hello.\n",
        "crlf.txt": b"[T]\r\n\r\nline one\r\nline two\r\n",
        "eof.txt": b"[M]\n\n[The End]\x1a\x1a\n",
        "pg.txt": PG_BOOK,
        "plain.txt": "[U]\n\nna\u00efve caf\u00e9\n".encode("utf-8"),
        "PROVENANCE.md": b"not a book",
    })
    books = {b.name: b for b in read_books(folder)}
    assert list(books) == ["crlf.txt", "eof.txt", "latin.txt", "pg.txt", "plain.txt"]
    assert books["latin.txt"].text == "[Caf\u00e9 by A]\n\nC\u00e6sar said hello.\n"
    assert books["latin.txt"].encoding == "latin-1" and books["plain.txt"].encoding == "utf-8"
    assert books["crlf.txt"].text == "[T]\n\nline one\nline two\n" and books["crlf.txt"].crlf == 4
    assert books["eof.txt"].text == "[M]\n\n[The End]\n" and books["eof.txt"].dos_eof == 2
    pg = books["pg.txt"]
    assert pg.text == "Body one.\n\nEnd of the project, said he; not the end of the book.\n"
    assert (pg.header, pg.end_matter) == ((1, 3), (12, 15))
    assert pg.dropped_chars == len(PG_BOOK) - len(pg.text)
    assert books["plain.txt"].text == "[U]\n\nna\u00efve caf\u00e9\n" and books["plain.txt"].cleaned == []
    assert books["pg.txt"].cleaned == ["Project Gutenberg header dropped: lines 1-3",
                                       "Project Gutenberg end matter dropped: lines 12-15",
                                       f"{pg.dropped_chars:,} characters of Project Gutenberg text dropped in all"]


def test_end_matter_is_cut_at_whichever_pg_end_line_comes_first(tmp_path):
    p = tmp_path / "b.txt"
    p.write_bytes(b"Text.\n\n*** END OF THE PROJECT GUTENBERG EBOOK B ***\nsmall print\n")
    assert read_book(p).text == "Text.\n" and read_book(p).end_matter == (3, 4)


@pytest.mark.parametrize("books, message", [
    (None, "data not found"),
    ({}, "holds no .txt books"),
    ({"only.txt": b"End of Project Gutenberg's Nothing\nlicense\n"}, "no text after its Project Gutenberg"),
    ({"blank.txt": b"\r\n \x1a"}, "blank.txt holds no text"),
])
def test_bad_book_folders_are_named(tmp_path, books, message):
    folder = tmp_path / "books"
    if books is not None:
        write_books(folder, books)
    with pytest.raises(DataError, match=message):
        read_books(folder)


# ---------------------------------------------------------------------------------------------- decontamination
EVAL = "Quoted: alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima."


def test_drops_the_paragraph_sharing_ten_words_not_the_one_sharing_nine():
    doc = ("Para one has nothing.\nStill nothing.\n\n"
           "Here Alpha bravo, charlie delta\necho foxtrot golf hotel india juliet end.\n\n"
           "Nine: alpha bravo charlie delta echo foxtrot golf hotel india stop.\n\nLast para.\n")
    (clean,), report = decontaminate([doc], [EVAL], names=["d.txt"])
    assert clean == ("Para one has nothing.\nStill nothing.\n\n"
                     "Nine: alpha bravo charlie delta echo foxtrot golf hotel india stop.\n\nLast para.\n")
    (gone,) = report.dropped
    assert (gone.document, gone.lines, gone.shared) == ("d.txt", (4, 5), "alpha bravo charlie delta echo foxtrot "
                                                                         "golf hotel india juliet")
    assert gone.chars == len("Here Alpha bravo, charlie delta\necho foxtrot golf hotel india juliet end.")
    assert report.units == 4 and report.chars == len(doc) and report.dropped_chars == gone.chars
    (clean9,), report9 = decontaminate([doc], [EVAL], n=9)
    assert len(report9.dropped) == 2 and "Nine" not in clean9  # the 9-word paragraph shares 9-word shingles


def test_a_long_paragraph_loses_only_the_lines_around_the_quotation():
    lines = [f"line {i} of the verse" for i in range(100)]
    lines[50] = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    (clean,), report = decontaminate(["\n".join(lines)], [EVAL], max_unit_lines=40)
    assert clean.split("\n") == lines[:40] + lines[80:] and report.dropped[0].lines == (41, 80)


def test_dropping_repeats_while_the_joined_text_shares_a_shingle():
    # the middle paragraph quotes one evaluation text; once it is gone, the first and last join into another
    second = "one two three four five six seven eight nine ten"
    doc = ("x alpha bravo charlie delta echo\n\n" + second + "\n\nfoxtrot golf hotel india juliet y\n\nkept.\n")
    (clean,), report = decontaminate([doc], [EVAL, second])
    assert clean == "kept.\n" and [d.lines for d in report.dropped] == [(3, 3), (1, 1), (5, 5)]


def test_decontaminate_training_keeps_held_out_books_whole_and_drops_emptied_documents():
    quote = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    docs = ["Held out: " + quote + ".\n", "Train quotes it: " + quote + ".\n\nOwn text.\n", quote + "\n"]
    out, names, summary = decontaminate_training(docs, ["h.txt", "t.txt", "gone.txt"], heldout=["h.txt"])
    assert out == [docs[0], "Own text.\n"] and names == ["h.txt", "t.txt"]
    assert summary["against"] == ["h.txt (held out)"] and summary["units_dropped"] == 2


# ---------------------------------------------------------------------------------------------- held out, budget, key
def three_books() -> tuple[list[str], list[str]]:
    names = ["a.txt", "b.txt", "c.txt"]
    docs = [" ".join(CORPUS[:4]) * 3, "Zebras quietly juggle violet umbrellas near quartz fjords. " * 4,
            " ".join(CORPUS[4:]) * 3]
    return docs, names


def test_a_held_out_book_is_the_validation_set_and_never_in_training(tokenizer):
    docs, names = three_books()
    blocks = build_blocks(docs, tokenizer, block_size=16, names=names, heldout=["b.txt"])
    assert blocks.val_docs == [docs[1]]
    assert torch.equal(blocks.val, pack([docs[1]], tokenizer, 16))
    assert torch.equal(blocks.train, pack([docs[0], docs[2]], tokenizer, 16))
    b_ids = tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    stream = blocks.train.flatten().tolist()
    for start in range(0, len(b_ids) - 6, 3):  # no 6-token run of the held-out book anywhere in training
        probe = b_ids[start:start + 6]
        assert not any(stream[i:i + 6] == probe for i in range(len(stream) - 5))


def test_an_unknown_held_out_name_is_refused_naming_the_field_and_the_books(tmp_path):
    from pocketlm.distill.run import source_documents

    folder = write_books(tmp_path / "books", {"a.txt": b"A.\n", "b.txt": b"B.\n"})
    cfg = DistillConfig.model_validate({"data": {"source": str(folder), "format": "books", "heldout": ["c.txt"]}})
    with pytest.raises(DataError, match=r"data.heldout: no document named 'c.txt'; the documents are: a.txt, b.txt"):
        source_documents(cfg)
    with pytest.raises(DataError, match="holds out every document"):
        split_documents(["A", "B"], 0.1, 0, names=["a.txt", "b.txt"], heldout=["a.txt", "b.txt"])


@pytest.mark.parametrize("data, field", [
    ({"heldout": ["a.txt"], "source": "x"}, "heldout: names documents by their file; it needs format: books"),
    ({"heldout": ["a.txt"], "source": "x", "format": "books", "val_fraction": 0.2}, "heldout and val_fraction"),
    ({"heldout": ["a.txt", "a.txt"], "source": "x", "format": "books"}, "distinct"),
    ({"format": "books"}, "set source"),
    ({"decontaminate": []}, "decontaminate: must list"),
    ({"max_train_tokens": 0}, "data.max_train_tokens"),
])
def test_bad_data_options_are_named(tmp_path, data, field):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"data": data}))
    with pytest.raises(ConfigError, match=field):
        load_config(DistillConfig, path)


def test_the_token_budget_keeps_ceil_blocks_of_a_seeded_shuffle(tokenizer):
    docs, _ = three_books()
    full = build_blocks(docs, tokenizer, block_size=16, val_fraction=0.0).train
    a = build_blocks(docs, tokenizer, block_size=16, val_fraction=0.0, max_train_tokens=5 * 16 - 3, seed=1).train
    assert a.shape == (5, 16) and len(full) > 5
    rows = [tuple(r) for r in full.tolist()]
    assert all(tuple(r) in rows for r in a.tolist())  # whole blocks of the full set
    again = build_blocks(docs, tokenizer, block_size=16, val_fraction=0.0, max_train_tokens=77, seed=1).train
    other = build_blocks(docs, tokenizer, block_size=16, val_fraction=0.0, max_train_tokens=77, seed=2).train
    assert torch.equal(a, again) and not torch.equal(a, other)
    everything = build_blocks(docs, tokenizer, block_size=16, val_fraction=0.0, max_train_tokens=10**9).train
    assert sorted(map(tuple, everything.tolist())) == sorted(rows)


def test_the_blocks_cache_key_changes_with_each_option_and_old_keys_stay(tmp_path, tokenizer):
    from pocketlm.core.fingerprint import fingerprint_tokenizer

    docs, names = three_books()
    common = dict(block_size=16, cache_dir=tmp_path, names=names)
    plain = build_blocks(docs, tokenizer, **common)
    old = json.dumps([fingerprint_tokenizer(tokenizer), hash_documents(docs), 16, 0.1, 0])
    assert plain.data_hash == hashlib.sha256(old.encode()).hexdigest()[:16]  # runs before #18 keep their blocks
    summary = decontaminate_training(docs, names, against=[("e.txt", EVAL)])[2]
    keys = [plain.data_hash] + [build_blocks(docs, tokenizer, **common, **option).data_hash for option in (
        {"heldout": ["b.txt"]}, {"heldout": ["c.txt"]}, {"max_train_tokens": 32}, {"max_train_tokens": 48},
        {"decontamination": summary}, {"decontamination": {**summary, "against_sha256": ["0" * 64]}},
    )]
    assert len(set(keys)) == len(keys) and len(list(tmp_path.glob("blocks-*.safetensors"))) == len(keys)


def test_prepare_reads_books_holds_one_out_budgets_and_decontaminates(tmp_path, tokenizer):
    from pocketlm.distill.run import prepare

    docs, names = three_books()
    books = {n: d.encode("latin-1") for n, d in zip(names, docs)}
    books["a.txt"] += b"\n\nA quotation: alpha bravo charlie delta echo foxtrot golf hotel india juliet.\n"
    folder = write_books(tmp_path / "books", books)
    (tmp_path / "eval.txt").write_text(EVAL)
    cfg = DistillConfig.model_validate({
        "teacher": str(tmp_path / "no-teacher"), "output_dir": str(tmp_path / "run"), "data": {
            "source": str(folder), "format": "books", "heldout": ["b.txt"], "block_size": 16,
            "max_train_tokens": 40, "decontaminate": [str(tmp_path / "eval.txt")]}})
    prep = prepare(cfg, progress=False, teacher=make_teacher(len(tokenizer)), tokenizer=tokenizer)
    assert prep.blocks.val_docs == [docs[1]] and prep.blocks.train.shape == (3, 16)
    summary = prep.blocks.decontamination
    assert summary["against"] == ["eval.txt", "b.txt (held out)"]
    assert [d["document"] for d in summary["dropped"]] == ["a.txt"] and summary["units_dropped"] == 1
    missing = cfg.model_copy(update={"data": cfg.data.model_copy(update={"decontaminate": ["/no/such.raw"]})})
    with pytest.raises(DataError, match="data.decontaminate.0: evaluation text not found: /no/such.raw"):
        prepare(missing, progress=False)  # before the (missing) teacher is loaded


# ---------------------------------------------------------------------------------------------- the real corpus
@real_corpus
def test_the_real_corpus_reads_fifteen_cleaned_books():
    books = {b.name: b for b in read_books(BOOKS)}
    assert len(books) == 15
    ball = books["chesterton-ball.txt"]
    assert ball.end_matter == (9228, 9548) and ball.header is None and "Gutenberg" not in ball.text
    assert ball.text.endswith("pattern of a cross.\n")
    assert {n for n, b in books.items() if b.encoding == "latin-1"} == {"chesterton-ball.txt",
                                                                        "shakespeare-caesar.txt"}
    assert books["melville-moby_dick.txt"].crlf == 22924 and books["milton-paradise.txt"].dos_eof == 2
    assert books["milton-paradise.txt"].text.endswith("[The End]\n")
    assert [n for n, b in books.items() if b.cleaned] == ["chesterton-ball.txt", "melville-moby_dick.txt",
                                                          "milton-paradise.txt", "shakespeare-caesar.txt"]
    assert all(b.text.startswith("[") for b in books.values())  # NLTK's title lines are kept


@real_corpus
def test_decontamination_against_wikitext2_test_removes_ezekiel_25_14():
    books = read_books(BOOKS)
    wiki = WIKI_TEST.read_text(encoding="utf-8")
    clean, report = decontaminate([b.text for b in books], [wiki], names=[b.name for b in books])
    (verse,) = report.dropped  # PROVENANCE.md: the only shared 10-word span in the corpus
    assert verse.document == "bible-kjv.txt" and verse.lines == (69120, 69123)
    assert verse.shared == "i will lay my vengeance upon edom by the hand"
    bible = books[[b.name for b in books].index("bible-kjv.txt")].text
    cleaned_bible = clean[[b.name for b in books].index("bible-kjv.txt")]
    assert "25:14 And I will lay my vengeance upon Edom" in bible
    assert "vengeance upon Edom" not in cleaned_bible and "25:15 Thus saith" in cleaned_bible
    assert len(bible) - len(cleaned_bible) == verse.chars + 2 == report.dropped_chars + 2  # + the blank line
    assert report.chars == sum(len(b.text) for b in books) and report.units > 40_000
    print(f"decontamination dropped {len(report.dropped)} unit, {report.dropped_chars} of {report.chars:,} characters")
