"""Text → documents → token blocks: the training data path.

Documents come from a `.txt` file (blank-line separated), a folder of `.txt` files (one document each), a `.jsonl`
or `.parquet` file (a named field), or any Hugging Face dataset (hub name or local path, through `datasets`).
A folder of plain-text books (Latin-1, CRLF, Project Gutenberg matter) is read by `pocketlm.data.books`.
They are split into train/validation *by document* (no block straddles the split): a seeded random fraction, or
documents named as held out whole. They are tokenized with the teacher's tokenizer, joined with EOS between
documents and cut into fixed-length blocks; a token budget keeps a seeded sample of the training blocks. The
blocks are cached on disk, keyed by tokenizer, data, block size, split, budget and decontamination, so the second
run skips tokenization.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from pocketlm.core.fingerprint import fingerprint_tokenizer
from pocketlm.core.integrity import sha256_tensors
from pocketlm.core.io import save_tensors_atomic


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------- reading documents
def _not_utf8(path: Path, line: int, byte: int, reason: str) -> DataError:
    return DataError(f"{path} is not UTF-8 text: line {line}, byte {byte} ({reason}); convert it to UTF-8 first")


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's contents; a file that is not UTF-8 is a `DataError` naming the line and byte."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, e.start, e.reason) from None


MAX_LINE_BYTES = 8 * 2**20  # one JSONL/CSV row or one document: a 50 MB one-line JSONL took 11 GB to parse


def _too_long(path: Path, where: str, size: int) -> DataError:
    return DataError(f"{path} {where} is {size:,} bytes long; pocketlm reads documents and rows of at most "
                     f"{MAX_LINE_BYTES:,} bytes: split it into smaller documents")


def count_utf8_lines(path: str | os.PathLike) -> int:
    """Non-blank lines of a text file, read line by line (any size); not UTF-8 is a `DataError` naming the line,
    and so is a line longer than `MAX_LINE_BYTES`."""
    path, n, offset = Path(path), 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):  # a newline byte is never part of a multi-byte UTF-8 character
            if len(raw) > MAX_LINE_BYTES:
                raise _too_long(path, f"line {lineno}", len(raw))
            try:
                n += bool(raw.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lineno, offset + e.start, e.reason) from None
            offset += len(raw)
    return n


def first_line(e: BaseException) -> str:
    """An error's first message line (its type's name when it has no message)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _innermost(e: BaseException) -> str:
    """The first line of the innermost error's message (`datasets` wraps the parser's own, which says where)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return first_line(e)


def read_table(path: str | os.PathLike, builder: str):
    """A local .jsonl/.json/.csv (builder json/csv) or .parquet file as a `datasets.Dataset`, refusing by name what
    `datasets` reports badly or not at all: an empty file, a CSV with a header and no rows, text that is not UTF-8
    (`datasets` stores the bytes and fails later, far from the file), or a file its parser cannot read."""
    import datasets

    path = Path(path)
    if builder in ("json", "csv"):
        lines = count_utf8_lines(path)
        if lines <= (builder == "csv"):
            raise DataError(f"{path} holds no rows" + (" (only a header)" if lines else " (the file is empty)"))
    elif path.stat().st_size == 0:
        raise DataError(f"{path} holds no rows (the file is empty)")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad file
        raise DataError(f"could not read {path} as {builder}: {_innermost(e)}") from None


def _split_blank_lines(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


_WIKITEXT_TITLE = re.compile(r"^ ?= [^=](.*[^=])? = ?$")  # " = Robert Boulter = " (level 1), not " = = Career = = "


def _split_wikitext_headings(text: str) -> list[str]:
    """WikiText articles: a document starts at each top-level ``" = Title = "`` line and runs to the next one.

    Line endings are normalised to ``\\n``; lines are kept as they are (WikiText's leading spaces included).
    """
    docs: list[list[str]] = []
    for line in text.splitlines():
        if _WIKITEXT_TITLE.match(line):
            docs.append([])
        if not docs:  # text before the first title: a document of its own
            docs.append([])
        docs[-1].append(line)
    return ["\n".join(lines) + "\n" for lines in docs]


TXT_SPLITS = {"blank_lines": _split_blank_lines, "wikitext_headings": _split_wikitext_headings,
              "lines": lambda text: text.splitlines()}


_KINDS = {int: "a number", float: "a number", bool: "a boolean", list: "a list", dict: "an object"}


def _row_where(path: Path | None, builder: str | None, i: int) -> str:
    """Where the i-th row (0-based) of a table is: a file's line for JSONL (blank lines skipped) and CSV."""
    if path is None or builder not in ("json", "csv"):
        return f"row {i + 1}"
    if builder == "csv":
        return f"line {i + 2}"
    with open(path, "rb") as f:
        lines = (n for n, raw in enumerate(f, 1) if raw.strip())
        return f"line {next(n for k, n in enumerate(lines) if k == i)}"


def _from_dataset(ds, field: str, where: str, path: Path | None = None, builder: str | None = None) -> list[str]:
    """The field's texts; a row whose field is not text (a number, null, a list) is refused naming its line."""
    if field not in ds.column_names:
        raise DataError(f"{where} has no field {field!r}; its fields are: {', '.join(ds.column_names)}")
    texts = ds[field]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "null" if t is None else f"{_KINDS.get(type(t), 'a ' + type(t).__name__)} ({str(t)[:40]})"
            raise DataError(f"{where} {_row_where(path, builder, i)}: field {field!r} is {what}, not text")
    return list(texts)


def read_documents(
    source: str | os.PathLike,
    *,
    field: str = "text",
    split: str = "train",
    max_documents: int | None = None,
    txt_split: str = "blank_lines",
) -> list[str]:
    """Read non-empty documents from a path or a Hugging Face dataset name.

    A single text file is cut into documents by ``txt_split``: ``blank_lines`` (paragraph-separated documents),
    ``wikitext_headings`` (WikiText articles, at each top-level ``" = Title = "`` line) or ``lines``.
    """
    import datasets

    if txt_split not in TXT_SPLITS:
        raise DataError(f"unknown txt_split {txt_split!r}; valid: {', '.join(TXT_SPLITS)}")
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() and any(path.glob("*.txt")):
        other = sorted(p.name for p in path.iterdir() if not p.is_file())
        if other:  # a document folder holds its documents, one file each; a sub-folder's would be skipped
            raise DataError(f"{path} holds .txt documents and the sub-folder {other[0]!r}; a folder of documents "
                            "holds only files (one .txt document each): move the sub-folder out or name it instead")
        docs = [read_utf8(p) for p in sorted(path.glob("*.txt"))]
    elif path.is_file() and path.suffix in (".txt", ".raw", ".md"):
        docs = TXT_SPLITS[txt_split](read_utf8(path))
    elif path.is_file() and path.suffix in (".jsonl", ".json", ".parquet", ".csv"):
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix]
        docs = _from_dataset(read_table(path, builder), field, str(path), path, builder)
    elif path.exists() and path.is_file():
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl, .parquet or .csv")
    elif not path.exists() and text.startswith((".", "/", "~")):
        raise DataError(f"data not found: {path}")
    else:  # a hub dataset name, or a local dataset folder (parquet/json/arrow files) that `datasets` reads
        try:
            ds = datasets.load_dataset(text, split=split)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"could not load the dataset {text!r} (split {split!r}): {first_line(e)}. "
                f"Offline? Pass a local file or folder instead."
            ) from None
        docs = _from_dataset(ds, field, f"dataset {text!r}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{text} holds no non-empty documents")
    longest = max(range(len(docs)), key=lambda i: len(docs[i]))
    if len(docs[longest]) > MAX_LINE_BYTES:  # characters: at least as many bytes
        raise _too_long(Path(text), f"document {longest + 1}", len(docs[longest].encode("utf-8")))
    return docs[:max_documents] if max_documents else docs


def hash_documents(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- blocks
def heldout_indices(names: Sequence[str], heldout: Sequence[str], what: str = "heldout") -> list[int]:
    """Indices of the documents named in `heldout`, in document order; an unknown name is a `DataError` naming
    `what` (the config field) and the documents there are."""
    unknown = [h for h in heldout if h not in names]
    if unknown:
        raise DataError(f"{what}: no document named {unknown[0]!r}; the documents are: {', '.join(names)}")
    held = [i for i, name in enumerate(names) if name in heldout]
    if len(held) == len(names):
        raise DataError(f"{what} holds out every document ({len(names)}); leave at least one to train on")
    return held


def split_documents(
    docs: Sequence[str],
    val_fraction: float,
    seed: int,
    *,
    names: Sequence[str] | None = None,
    heldout: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Shuffle documents by seed and hold out `val_fraction` of them (at least one) for validation; or, given
    `heldout` names (of `names`, one per document), hold out exactly those documents whole (`val_fraction` and
    `seed` unused). Both lists keep the documents' order."""
    if heldout:
        if names is None or len(names) != len(docs):
            raise ValueError("heldout needs one name per document (names)")
        held = set(heldout_indices(names, heldout))
        return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 else max(1, round(len(docs) * val_fraction))
    if n_val >= len(docs):
        raise DataError(f"only {len(docs)} document(s): too few to hold out a validation split")
    val = [docs[i] for i in sorted(order[:n_val])]
    train = [docs[i] for i in sorted(order[n_val:])]
    return train, val


def pack(docs: Sequence[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenize documents, join them with EOS between, and cut into `[n, block_size]` blocks (remainder dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for ids_doc in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(ids_doc)
        ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"{len(ids)} tokens are fewer than one block of {block_size}; add data or lower block_size")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)  # [n, L]


def within_budget(blocks: torch.Tensor, max_tokens: int, seed: int) -> torch.Tensor:
    """The first ceil(max_tokens / L) blocks of a seeded shuffle (all of them, shuffled, when there are fewer).

    The trainer (`pocketlm.training.batch_indices`) draws each epoch as a fresh seeded permutation of whatever blocks
    it is given and drops the last partial batch, so a run of S steps reads S · grad_accum · batch_size blocks:
    a budget below that repeats blocks (more epochs), one above it leaves blocks (and their teacher cache) unread.
    """
    n, L = blocks.shape  # [n, L]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[order[: -(-max_tokens // L)]]  # [min(n, ceil(max_tokens / L)), L]


@dataclass
class TokenBlocks:
    """Packed train/validation blocks and where they came from."""

    train: torch.Tensor  # [n_train, L] int64
    val: torch.Tensor  # [n_val, L] int64
    data_hash: str  # hash of the source documents, the split and the block size
    block_size: int
    val_docs: list[str]  # the held-out documents behind `val` (scored whole, e.g. by rolling-window perplexity)
    decontamination: dict | None = None  # what was dropped from the documents (`books.Decontamination.summary`)

    @property
    def n_tokens(self) -> int:
        return self.train.numel()


def build_blocks(
    docs: Sequence[str],
    tokenizer,
    *,
    block_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    tokenizer_fingerprint: str | None = None,
    names: Sequence[str] | None = None,
    heldout: Sequence[str] | None = None,
    max_train_tokens: int | None = None,
    decontamination: dict | None = None,
) -> TokenBlocks:
    """Split (`split_documents`), tokenize and pack documents, keep at most `max_train_tokens` of training blocks
    (`within_budget`), reusing an on-disk cache keyed by tokenizer, data, block size, split, budget and the
    `decontamination` summary the documents were cleaned with (kept with the blocks, for reports)."""
    tok_fp = tokenizer_fingerprint or fingerprint_tokenizer(tokenizer)
    parts: list = [tok_fp, hash_documents(docs), block_size, val_fraction, seed]
    if heldout or max_train_tokens is not None or decontamination is not None:  # older keys stay as they were
        parts.append({"heldout": sorted(heldout or []), "names": list(names or []) if heldout else None,
                      "max_train_tokens": max_train_tokens, "decontamination": decontamination})
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"blocks-{key}.safetensors" if cache_dir else None
    train_docs, val_docs = split_documents(docs, val_fraction, seed, names=names, heldout=heldout)
    cached = _read_blocks(path, block_size) if path is not None and path.is_file() else None
    if cached is not None:
        return TokenBlocks(cached["train"], cached["val"], key, block_size, val_docs, decontamination)
    train = pack(train_docs, tokenizer, block_size)
    if max_train_tokens is not None:
        train = within_budget(train, max_train_tokens, seed)
    val = pack(val_docs, tokenizer, block_size) if val_docs else torch.empty(0, block_size, dtype=torch.long)
    if path is not None:
        tensors = {"train": train.contiguous(), "val": val.contiguous()}
        # through a temporary file and a rename: a symlink in its place is replaced, never followed
        save_tensors_atomic(tensors, path, metadata={"sha256": sha256_tensors(tensors)})
    return TokenBlocks(train, val, key, block_size, val_docs, decontamination)


def _read_blocks(path: Path, block_size: int) -> dict[str, torch.Tensor] | None:
    """The cached blocks at `path` if they verify against the SHA-256 recorded in the file when it was written;
    else None (with a warning naming the file): they are our own derived data, rebuilt from the documents."""
    why = None
    if path.is_symlink():
        why = "is a symlink, which pocketlm never writes"
    else:
        try:
            with safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get("sha256")
                t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
        except Exception as e:  # noqa: BLE001 - a damaged header: safetensors raises its own error types
            why = f"cannot be read ({first_line(e)})"
        else:
            if recorded is None:
                why = "records no checksum (an older pocketlm wrote it)"
            elif set(t) != {"train", "val"} or sha256_tensors(t) != recorded:
                why = "is damaged (checksum mismatch)"
            elif any(x.dtype != torch.long or x.ndim != 2 or x.shape[1] != block_size for x in t.values()):
                why = f"does not hold [n, {block_size}] int64 blocks"
    if why is None:
        return t
    warnings.warn(f"packed data blocks {path} {why}; rebuilding them from the documents", stacklevel=3)
    return None
