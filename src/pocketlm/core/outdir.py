"""Output folders and files: pocketlm writes only into what it created, one run per folder, checked before work.

The rules (docs/RELIABILITY.md, "Output folders"):

- A folder pocketlm makes for its outputs carries a marker, ``.pocketlm.json``, naming the kind of output
  ("distill", "export", "attention", ...). An existing folder is used only when it is empty or carries our marker
  of the same kind; anything else (a user's folder, another kind of pocketlm folder such as a run folder named as
  an export's ``--out``) is refused naming the option, unless ``--overwrite`` is given: then pocketlm writes its
  files beside what is there and deletes nothing.
- A folder that is replaced as a whole (an export) is replaced only when every entry in it is one its marker
  lists as written by pocketlm; otherwise the same refusal, and ``--overwrite`` writes file by file.
- A results file (``--out r.json``) replaces only a pocketlm results document; a folder or a file of another
  kind in its place is refused (``--overwrite`` lets a user's file be replaced; a folder never is).
- Before any work: the folder (or the nearest existing parent) must be a writable folder (a probe file is
  created and removed) with room for what the command writes (`check_space`).
- One run per folder: `folder_lock` holds an exclusive lock (``.pocketlm.lock``, flock) for the run, records the
  holder's pid and host, and refuses a second run by name; a lock left by a process that is gone is taken over.
- What a failed call created (folders still holding nothing but the marker and the lock) is removed again.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from pocketlm.core.io import as_write_error, replace_folder, write_text_atomic
from pocketlm.core.io import save_tensors  # noqa: F401  (re-exported: the writers are core.io's)
from pocketlm.core.results import SCHEMA
from pocketlm.core.version import __version__

MARKER = ".pocketlm.json"
LOCK = ".pocketlm.lock"
OURS = (MARKER, LOCK)
MIN_FREE = 64 << 20  # below this much free space nothing useful can be written; checked before any work
OVERWRITE_HELP = ("Write into an existing folder or file that pocketlm did not create (its files are written "
                  "beside what is there; nothing is deleted).")


class OutputError(ValueError):
    """An output path that pocketlm must not write: not ours, the wrong kind, not writable, too little space."""


class FolderLockedError(OutputError):
    """Another run holds the output folder."""


# ---------------------------------------------------------------------------------------------- checks
def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in `folder`: the only test that holds for root, read-only mounts and quotas."""
    try:
        fd, name = tempfile.mkstemp(prefix=".pocketlm-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None


def check_space(path: str | os.PathLike, need: int, what: str) -> None:
    """Refuse when the file system holding `path` has less than `need` bytes free."""
    base = _nearest_existing(Path(path))
    free = shutil.disk_usage(base).free
    if free < need:
        raise OutputError(f"{what}: only {_mib(free)} free on the disk holding {base}; this needs about "
                          f"{_mib(need)}. Free space or choose another folder")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def check_writable_parent(path: Path, what: str, need: int) -> None:
    """The nearest existing ancestor of `path` is a folder we can write in, with `need` bytes free."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{what}: {base} is a file, so {path} cannot be created under it")
    _probe_writable(base, what)
    check_space(base, need, what)


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder pocketlm made, or None (no marker, or one that is not ours)."""
    try:
        mark = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and isinstance(mark.get("kind"), str) else None


def _write_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    mark = {"written_by": f"pocketlm {__version__}", "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if files is not None:
        mark["files"] = sorted(files)
    write_text_atomic(folder / MARKER, json.dumps(mark, indent=1) + "\n")


def _foreign(folder: Path, mark: dict | None) -> list[str]:
    """Entries of `folder` pocketlm did not write: all but its own files when the marker lists them."""
    names = sorted(p.name for p in folder.iterdir() if p.name not in OURS)
    if mark is not None and "files" in mark:
        listed = set(mark["files"]) if isinstance(mark["files"], list) else set()
        return [n for n in names if n not in listed]
    return names if mark is None else []


def _refusal(what: str, path: Path, why: str) -> OutputError:
    return OutputError(f"{what}: {path} {why}; pocketlm writes only into a new folder or one it made for the "
                       f"same kind of output. Choose another path, or pass --overwrite to write beside what is "
                       f"there (nothing is deleted)")


def check_folder(path: str | os.PathLike, *, kind: str, what: str = "--out", overwrite: bool = False,
                 need: int = MIN_FREE) -> str:
    """Check, before any work, that `path` may receive a `kind` output: "new" (it does not exist), "ours" (empty,
    or our marker of this kind) or "beside" (a foreign folder, with `overwrite`). Refused otherwise."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what}: {path} is a broken symbolic link")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what}: {path} is a file, not a folder; name a new folder")
    if not path.exists():
        check_writable_parent(path, what, need)
        return "new"
    mark = read_marker(path)
    foreign = _foreign(path, mark)
    if mark is not None and mark["kind"] != kind and not overwrite:
        raise _refusal(what, path, f"is a pocketlm {mark['kind']} folder, not a {kind} folder")
    if foreign and not overwrite:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise _refusal(what, path, f"holds files pocketlm did not write ({shown})")
    _probe_writable(path, what)
    check_space(path, need, what)
    return "beside" if foreign or (mark is not None and mark["kind"] != kind) else "ours"


def check_result_file(path: str | os.PathLike, *, what: str = "--out", overwrite: bool = False,
                      need: int = MIN_FREE) -> None:
    """Check, before any work, that a results file may be written at `path`: it does not exist, or it is a
    pocketlm results document (or `overwrite`); never a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what}: {path} is a folder; name a file, e.g. {path / 'results.json'}")
    if path.exists() and not overwrite and not is_results_document(path):
        raise OutputError(f"{what}: {path} exists and is not a pocketlm results file; choose another path, or "
                          f"pass --overwrite to replace it")
    check_writable_parent(path.parent, what, need)


def is_results_document(path: Path) -> bool:
    """Whether `path` is a results document pocketlm wrote: `Results.write` puts its schema key first, so the
    file's opening bytes tell, however large the rest is."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return re.match(r'\{\s*"schema"\s*:\s*' + re.escape(json.dumps(SCHEMA)), head) is not None


# ---------------------------------------------------------------------------------------------- claiming a folder
@contextmanager
def output_folder(path: str | os.PathLike, *, kind: str, what: str = "--out", overwrite: bool = False,
                  need: int = MIN_FREE, lock: bool = True) -> Iterator[Path]:
    """Hold `path` as a `kind` output folder for the block: checked (`check_folder`), created and marked when
    new, locked (`folder_lock`). When the block fails, folders this call created are removed again if they hold
    nothing but the marker and the lock (a run that got further keeps what it wrote, for `--resume`)."""
    path = Path(path)
    state = check_folder(path, kind=kind, what=what, overwrite=overwrite, need=need)
    created = _mkdirs(path) if state == "new" else []
    try:
        if state != "beside" and read_marker(path) is None:
            _write_marker(path, kind)
        with folder_lock(path, what) if lock else nullcontext():
            yield path
    except BaseException:
        _remove_untouched(created, path)
        raise


def subfolder(path: str | os.PathLike, *, kind: str) -> Path:
    """A folder inside one this run holds (the pipeline's distill runs): made and marked as `kind` if missing."""
    path = Path(path)
    if not path.exists():
        path.mkdir(parents=True)
        _write_marker(path, kind)
    return path


def _mkdirs(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it made, deepest first."""
    made = []
    p = path.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return made


def _remove_untouched(created: list[Path], path: Path) -> None:
    if not created:
        return
    if path.is_dir() and all(p.name in OURS for p in path.iterdir()):
        for name in OURS:
            (path / name).unlink(missing_ok=True)
    for d in created:  # deepest first; a folder that now holds anything stays
        try:
            d.rmdir()
        except OSError:
            break


# ---------------------------------------------------------------------------------------------- the lock
def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        h = json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
    return h if isinstance(h, dict) else None


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid runs on this host (this process counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[None]:
    """An exclusive lock on `folder` for one run (``.pocketlm.lock``: flock, plus the holder's pid and host).

    A second run — another process, or a second call in this one — is refused naming the holder. flock dies with
    its process, so a killed run leaves no lock; the recorded holder covers file systems where flock does not
    reach across hosts: a record of another host's run is refused (delete the file once that run is over), one of
    a process on this host that is gone is taken over with a warning."""
    path = Path(folder) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _read_holder(fd) or {}
            raise FolderLockedError(
                f"{what}: {folder} is in use by another pocketlm run (pid {h.get('pid', '?')} on "
                f"{h.get('host', '?')}, since {h.get('since', '?')}); wait for it to finish or choose another "
                f"folder") from None
        old = _read_holder(fd)
        if old is not None:
            if old.get("host") != socket.gethostname():
                raise FolderLockedError(
                    f"{what}: {folder} is locked by pid {old.get('pid')} on host {old.get('host')} (since "
                    f"{old.get('since')}); if that run is over, delete {path}")
            if pid_alive(old.get("pid")) and old.get("pid") != os.getpid():
                raise FolderLockedError(
                    f"{what}: {folder} is locked by pid {old.get('pid')}, which is still running; if it is not a "
                    f"pocketlm run, delete {path}")
            warnings.warn(f"{path}: taking over the lock of pid {old.get('pid')}, which is no longer running",
                          stacklevel=3)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: an empty lock file (never unlinked: another waiter may hold its inode)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- sealed folders
def write_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], *, kind: str, what: str = "--out",
                 overwrite: bool = False, need: int = MIN_FREE) -> Path:
    """Write a folder that is made whole (an export): `write(tmp)` fills a temporary folder beside `out_dir`,
    which is then renamed into place. An existing `out_dir` is replaced only when it is ours (our marker of this
    kind, every entry one it lists); with `overwrite`, a foreign folder receives the files one by one and keeps
    everything else. Nothing is left behind on failure."""
    out_dir = Path(out_dir)
    state = check_folder(out_dir, kind=kind, what=what, overwrite=overwrite, need=need)
    mark = read_marker(out_dir) if state == "ours" else None
    if mark is not None and "files" not in mark:  # a folder of ours written bit by bit: never replaced whole
        state = "beside"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
        try:
            write(tmp)
        except SafetensorError as e:
            raise as_write_error(e, out_dir) from e
        if state == "beside":
            for p in sorted(tmp.iterdir()):
                target = out_dir / p.name
                if target.is_dir() and not target.is_symlink():
                    raise _refusal(what, out_dir, f"holds a folder {p.name!r} where a file is to be written")
                os.replace(p, target)
            tmp.rmdir()
            return out_dir
        _write_marker(tmp, kind, files=[p.name for p in tmp.iterdir()])
        if out_dir.exists():  # ours: every entry is one we wrote — checked again now, just before the swap
            late = _foreign(out_dir, read_marker(out_dir))
            if late or read_marker(out_dir) is None and any(out_dir.iterdir()):
                raise _refusal(what, out_dir, f"received files pocketlm did not write while it worked ({late})")
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
