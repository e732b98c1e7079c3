"""Reading back what pocketlm wrote: checksums, JSON records and the names they hold.

A run reads its own outputs again (a teacher-cache manifest, a checkpoint's trainer_state.json, packed data
blocks). Between the write and the read they may have been damaged on disk or edited by hand, so nothing read back
is trusted unchecked: a JSON record that is not UTF-8 or not JSON is an error naming the file; a file name taken
from a record must be a plain name of the exact form pocketlm writes, inside the folder and not a symlink (a
record is never a way to make pocketlm read, train on or delete a file elsewhere); a file's bytes are compared
with the SHA-256 recorded when it was written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch


class RecordError(ValueError):
    """A file pocketlm wrote earlier is damaged or is not what pocketlm writes; the message names it."""


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """The SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str, error: type[Exception] = RecordError) -> Any:
    """A JSON file's content; text that is not UTF-8 or not JSON is `error` naming the file and `what` it is."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path} is not a valid {what}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not a valid {what}: {e}") from None


def plain_name(folder: Path, name: Any, pattern: re.Pattern, where: str, error: type[Exception] = RecordError) -> Path:
    """``folder / name`` for a `name` read from one of our records, which must match `pattern` exactly (a plain
    file name: no separator, no ``..``) and must not be a symlink; anything else is `error` naming `where`."""
    if not isinstance(name, str) or not pattern.fullmatch(name) or "/" in name or "\\" in name or name in (".", ".."):
        raise error(f"{where}: {name!r} is not a file name pocketlm writes there ({pattern.pattern}); "
                    f"the record was edited or damaged")
    path = folder / name
    if path.is_symlink():
        raise error(f"{where}: {path} is a symlink, which pocketlm never writes; the folder was edited")
    return path


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None
