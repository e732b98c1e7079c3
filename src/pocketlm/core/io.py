"""Atomic writes: the one place where pocketlm writes a file (text, JSON, bytes, safetensors) or a folder whole.

A file is written under a hidden temporary name beside its target (``.NAME.tmpPID``: the same folder, so the
rename stays on one file system) and renamed over it: a crash or a full disk never leaves half a file, a reader
sees the old file or the new one, and a symlink in the target's place is replaced, never followed. A failed write
removes its temporary file; safetensors' own error for a full disk is raised as an OSError naming the target. A
folder is filled beside its target and swapped in (`atomic_folder`, `replace_folder`).

Which folders pocketlm may write into at all, and when it may replace one, is `pocketlm.core.outdir`'s.
"""
from __future__ import annotations

import base64
import errno
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import safetensors.torch
from safetensors import SafetensorError


def as_write_error(e: BaseException, path: str | os.PathLike) -> OSError:
    """An error from writing `path` as an OSError naming it (safetensors reports a full disk as its own error)."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    code = errno.ENOSPC if ("StorageFull" in text or "No space" in text) else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({text})", str(path))


# ---------------------------------------------------------------------------------------------- files
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed onto `path` when the block ends, removed
    when it fails. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, SafetensorError):
            raise as_write_error(e, path) from e
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) through a temporary file and a rename, so a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """`obj` as JSON (``json.dumps(obj, **dumps)``, then a newline), atomically; nothing is written when it cannot
    be encoded (a NaN under ``allow_nan=False``)."""
    return write_text_atomic(path, json.dumps(obj, **dumps) + "\n")


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with a failed write (a full disk) removed and raised as an OSError naming `path`.
    `path` is a file this call creates: a temporary name, or a file in a folder that is renamed into place whole
    (a checkpoint); `save_tensors_atomic` writes one in place."""
    try:
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    except BaseException as e:
        Path(path).unlink(missing_ok=True)
        if isinstance(e, SafetensorError):
            raise as_write_error(e, path) from e
        raise


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """`save_tensors` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        save_tensors(tensors, tmp, metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------------------------------------- folders
def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (a folder's: the renames in it survive a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike, *, aside: str | None = None) -> None:
    """Move the finished folder `tmp` to `final` (beside it); an existing `final` is moved aside first (to a new
    name, or to `aside` — a name the caller owns, e.g. the checkpoints' ``.old-step-N-PID``) and removed after, so
    `final` is never half-written. The caller answers for `final` being its own to replace. The rename is flushed
    to disk."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        # os.replace onto the empty folder mkdtemp makes: nothing of anyone else's is at that name
        old = final.with_name(aside) if aside else Path(tempfile.mkdtemp(prefix=f".old-{final.name}-",
                                                                          dir=final.parent))
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


@contextmanager
def atomic_folder(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """A new temporary folder beside `path` for the block to fill; swapped into place (`replace_folder`) when the
    block ends, removed when it fails. With ``replace=False`` an existing `path` (one that is not ours to replace:
    a user's folder written into with ``--overwrite``) is written in place instead — same-named files replaced,
    nothing deleted."""
    path = Path(path)
    if path.exists() and not replace:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))  # a new name: nothing is removed
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the folder it becomes gets the usual mode
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SafetensorError):
            raise as_write_error(e, path) from e
        raise


# ---------------------------------------------------------------------------------------------- figures
def figure_data_uri(fig, dpi: int = 90) -> str:
    """A matplotlib figure as an inline PNG (``data:image/png;base64,...``), for self-contained HTML pages."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
