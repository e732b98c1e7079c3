"""Plain-text books as training documents, and n-gram decontamination of training text against evaluation text.

`read_books` reads a folder of ``*.txt`` books (Project Gutenberg etexts such as NLTK's ``gutenberg`` corpus), one
document per book, and says what it cleaned in each: a file that is not valid UTF-8 is read as Latin-1 (lossless:
every byte is a character), CRLF line endings become LF, trailing 0x1A bytes (DOS end-of-file) are dropped, and
Project Gutenberg header and end matter are cut by rule (the marker lines PG itself writes), never by a line number
for one file. A bracketed title line such as ``[Emma by Jane Austen 1816]`` is the book's own and is kept.

`decontaminate` removes from training documents every unit of text that shares an n-word shingle (lowercased a-z
words, n = 10 by default) with an evaluation text, so that a benchmark's held-out text is not trained on.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pocketlm.data.text import DataError, heldout_indices

# ---------------------------------------------------------------------------------------------- reading books
# "*** START OF THIS PROJECT GUTENBERG EBOOK …"
_PG_START = re.compile(r"^[^\w\n]*start of (the |this )?project gutenberg", re.IGNORECASE | re.MULTILINE)
# "End of Project Gutenberg's …", "End of the Project Gutenberg EBook of …", "*** END OF THIS PROJECT GUTENBERG …"
_PG_END = re.compile(r"^[^\w\n]*end of (the |this )?project gutenberg", re.IGNORECASE | re.MULTILINE)
_TRAILING = re.compile(r"[\x1a \t\r\n]*\Z")  # the end of a file: 0x1A (DOS EOF) mixed with whitespace


@dataclass(frozen=True)
class Book:
    """One book's text and what reading it changed. Line numbers are the file's (1-based, inclusive)."""

    name: str  # the file name, e.g. "bible-kjv.txt"
    text: str
    encoding: str = "utf-8"  # "latin-1" where the file is not valid UTF-8
    crlf: int = 0  # CRLF line endings made LF
    dos_eof: int = 0  # trailing 0x1A bytes dropped
    header: tuple[int, int] | None = None  # lines dropped as Project Gutenberg header (through "*** START OF …")
    end_matter: tuple[int, int] | None = None  # lines dropped as Project Gutenberg end matter (from "End of …")
    dropped_chars: int = 0  # characters of header and end matter dropped

    @property
    def cleaned(self) -> list[str]:
        """What was cleaned, in words (empty for a UTF-8 book read unchanged)."""
        notes = []
        if self.encoding != "utf-8":
            notes.append(f"decoded as {self.encoding} (not valid UTF-8)")
        if self.crlf:
            notes.append(f"{self.crlf:,} CRLF line endings made LF")
        if self.dos_eof:
            notes.append(f"{self.dos_eof} trailing 0x1A (DOS end-of-file) byte(s) dropped")
        for what, lines in (("header", self.header), ("end matter", self.end_matter)):
            if lines is not None:
                notes.append(f"Project Gutenberg {what} dropped: lines {lines[0]}-{lines[1]}")
        if self.dropped_chars:
            notes.append(f"{self.dropped_chars:,} characters of Project Gutenberg text dropped in all")
        return notes


def decode(raw: bytes) -> tuple[str, str]:
    """`raw` as text and the encoding used: UTF-8, else Latin-1 (which maps every byte to one character)."""
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _cut_gutenberg(text: str) -> tuple[str, tuple[int, int] | None, tuple[int, int] | None, int]:
    """Drop PG end matter (from the first "End of … Project Gutenberg" line to the end, with the blank lines before
    it) and PG header (through the last "*** START OF … PROJECT GUTENBERG" line before that, with the blank lines
    after it). Returns the text, the header's and end matter's line ranges, and the characters dropped."""
    end_match = _PG_END.search(text)
    end = end_match.start() if end_match else None
    end_lines = None
    body_end = len(text)
    if end is not None:
        end_lines = (_line_of(text, end), text.count("\n") + (not text.endswith("\n")))
        body_end = end
    start = max((m.start() for m in _PG_START.finditer(text, 0, body_end)), default=None)
    header_lines, body_start = None, 0
    if start is not None:
        eol = text.find("\n", start)
        body_start = body_end if eol < 0 or eol >= body_end else eol + 1
        header_lines = (1, _line_of(text, start))
    body = text[body_start:body_end]
    if end is not None:  # the blank lines between the book and its end matter, down to one line ending
        body = re.sub(r"(\n[ \t]*)+\Z", "\n", body)
    if start is not None:
        body = re.sub(r"\A([ \t]*\n)+", "", body)
    return body, header_lines, end_lines, len(text) - len(body)


def book_paths(folder: str | os.PathLike) -> list[Path]:
    """The books of a folder: its ``*.txt`` files, sorted by name (other files, e.g. a PROVENANCE.md, are not)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"data not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; a folder of .txt books is read one document per book")
    paths = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not paths:
        raise DataError(f"{folder} holds no .txt books")
    return paths


def read_book(path: str | os.PathLike) -> Book:
    """One book, cleaned as the module says; a book with no text left is a `DataError` naming the file."""
    path = Path(path)
    text, encoding = decode(path.read_bytes())
    crlf = text.count("\r\n")
    text = text.replace("\r\n", "\n")
    tail = _TRAILING.search(text)
    dos_eof = tail.group().count("\x1a")
    text = text[: tail.start()] + tail.group().replace("\x1a", "")
    text, header, end_matter, dropped = _cut_gutenberg(text)
    if not text.strip():
        raise DataError(f"{path} holds no text" + (" after its Project Gutenberg matter is cut" if dropped else ""))
    return Book(path.name, text, encoding, crlf, dos_eof, header, end_matter, dropped)


def read_books(folder: str | os.PathLike) -> list[Book]:
    """Every book of a folder (`book_paths`), one `Book` per file, in file-name order."""
    return [read_book(p) for p in book_paths(folder)]


def read_text(path: str | os.PathLike) -> str:
    """A text file as `decode` reads it (an evaluation text to decontaminate against)."""
    return decode(Path(path).expanduser().read_bytes())[0]


# ---------------------------------------------------------------------------------------------- decontamination
_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lowercased runs of a-z: the words shingles are made of (punctuation, digits and accents split them)."""
    return _WORD.findall(text.lower())


def _windows(ws: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(ws[k:] for k in range(n)))  # every n consecutive words, as a tuple


def shingle_hashes(texts: Iterable[str], n: int = 10) -> set[int]:
    """The hashed n-word shingles of each text (a shingle never spans two texts)."""
    return {hash(w) for t in texts for w in _windows(words(t), n)}


@dataclass(frozen=True)
class Dropped:
    """One unit of training text dropped, and the first shingle it shares (its lines: the document's, 1-based)."""

    document: str  # the document's name, or its index
    lines: tuple[int, int]
    chars: int  # of its lines, with the line endings between them
    shared: str  # the shingle's words, space-separated


@dataclass(frozen=True)
class Decontamination:
    """What `decontaminate` dropped, out of how much."""

    n: int
    against_sha256: list[str]  # of each evaluation text, in order
    units: int  # units checked
    chars: int  # characters of training text checked
    dropped: list[Dropped]

    @property
    def dropped_chars(self) -> int:
        return sum(d.chars for d in self.dropped)

    def summary(self) -> dict:
        """A JSON-ready account (also the blocks' cache-key part for decontamination: see `build_blocks`)."""
        return {"n": self.n, "against_sha256": self.against_sha256, "units_checked": self.units,
                "chars_checked": self.chars, "units_dropped": len(self.dropped), "chars_dropped": self.dropped_chars,
                "dropped": [{"document": d.document, "lines": list(d.lines), "chars": d.chars, "shared": d.shared}
                            for d in self.dropped]}


def _units(lines: Sequence[str], max_lines: int) -> list[tuple[int, int]]:
    """[start, end) line ranges of the units: runs of non-blank lines, each cut into pieces of `max_lines` lines."""
    units, start = [], None
    for i, line in enumerate([*lines, ""]):
        if line.strip() and start is None:
            start = i
        elif not line.strip() and start is not None:
            units += [(a, min(a + max_lines, i)) for a in range(start, i, max_lines)]
            start = None
    return units


def _clean_document(
    doc: str, name: str, evaluation: set[int], n: int, max_lines: int
) -> tuple[str, list[Dropped], int]:
    """`doc` without the units that share a shingle with `evaluation`; a shingle that spans units marks them all.
    Dropping joins the text around a unit into new shingles, so it repeats until no unit shares one."""
    lines = doc.split("\n")
    keep = list(range(len(lines)))  # the document's line numbers (0-based) still in it
    dropped: list[Dropped] = []
    checked = None
    while True:
        kept = [lines[i] for i in keep]
        units = _units(kept, max_lines)
        checked = len(units) if checked is None else checked
        ws, owner = [], []
        for u, (a, b) in enumerate(units):
            unit_words = words("\n".join(kept[a:b]))
            ws += unit_words
            owner += [u] * len(unit_words)
        hits: dict[int, str] = {}
        for j, w in enumerate(_windows(ws, n)):
            if hash(w) in evaluation:
                for u in range(owner[j], owner[j + n - 1] + 1):
                    hits.setdefault(u, " ".join(w))
        if not hits:
            return "\n".join(kept), dropped, checked
        gone = set()
        for u, shared in sorted(hits.items()):
            a, b = units[u]
            stop = units[u + 1][0] if u + 1 < len(units) else len(kept)  # the blank lines after it go with it
            gone.update(range(a, stop))
            dropped.append(Dropped(name, (keep[a] + 1, keep[b - 1] + 1), len("\n".join(kept[a:b])), shared))
        keep = [k for p, k in enumerate(keep) if p not in gone]


def decontaminate(
    train_docs: Sequence[str],
    eval_texts: Sequence[str],
    n: int = 10,
    *,
    names: Sequence[str] | None = None,
    max_unit_lines: int = 40,
) -> tuple[list[str], Decontamination]:
    """Training documents without every unit that shares an n-word shingle with an evaluation text.

    The unit is the paragraph: a run of non-blank lines (whitespace-only lines are blank). In the NLTK Gutenberg
    books that is a prose paragraph, a stanza, a speech, and in bible-kjv.txt one verse (verses are blank-line
    separated). Where a text has no paragraphs (Paradise Lost: a 51,000-character run per book), a run is taken
    `max_unit_lines` lines at a time, so one quotation never costs a whole book of verse. A dropped unit takes the
    blank lines after it; the rest of each document is kept byte for byte. Documents stay aligned with
    `train_docs` (a fully dropped one is ""). Shingles are Python hashes of word tuples, compared within one
    process: 64-bit, so 2·10^6 training shingles against 2·10^5 evaluation ones (the Gutenberg books against the
    WikiText-2 test set) meet a false match with odds near 10^-8.
    """
    if n < 1 or max_unit_lines < 1:
        raise ValueError(f"n and max_unit_lines must be at least 1, got {n} and {max_unit_lines}")
    evaluation = shingle_hashes(eval_texts, n)
    docs, dropped, units = [], [], 0
    for i, doc in enumerate(train_docs):
        text, gone, checked = _clean_document(doc, names[i] if names else str(i), evaluation, n, max_unit_lines)
        docs.append(text)
        dropped += gone
        units += checked
    against = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in eval_texts]
    return docs, Decontamination(n, against, units, sum(map(len, train_docs)), dropped)


def decontaminate_training(
    docs: Sequence[str],
    names: Sequence[str] | None,
    *,
    heldout: Sequence[str] | None = None,
    against: Sequence[tuple[str, str]] = (),
    n: int = 10,
) -> tuple[list[str], list[str] | None, dict]:
    """`decontaminate` the training documents (all but the `heldout` names) against the evaluation texts `against`
    ((label, text) pairs) and the held-out documents themselves, which stay whole. Returns the documents and names
    without any that was emptied, and a summary: the labels decontaminated against and `Decontamination.summary`."""
    held = sorted(heldout_indices(names or [], heldout)) if heldout else []
    train = [i for i in range(len(docs)) if i not in held]
    labels = [label for label, _ in against] + [f"{names[i]} (held out)" for i in held]
    texts = [text for _, text in against] + [docs[i] for i in held]
    train_names = [names[i] for i in train] if names else None
    cleaned, report = decontaminate([docs[i] for i in train], texts, n, names=train_names)
    out = dict(zip(train, cleaned)) | {i: docs[i] for i in held}
    kept = [i for i in range(len(docs)) if i in held or out[i].strip()]
    return [out[i] for i in kept], [names[i] for i in kept] if names else None, {"against": labels, **report.summary()}
