"""Output paths stay inside the run's output folder.

A run writes only under its output folder (``output_dir`` or ``--out``, which may be anywhere: it is the user's
choice). Every other output path is built from a config value (a result name), a file the run reads back (a
stage record's ``*_dir`` / ``*_file`` facts) or a fixed name; none of them may lead out of the folder — not by
being absolute, not by ``..``, not through a symlink inside the folder that points elsewhere. Such a path is a
`ConfigError` naming the field, raised before anything is written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from pocketlm.core.config import ConfigError


def confined(root: str | os.PathLike, value: str | os.PathLike, field: str) -> Path:
    """``root / value``, or a `ConfigError` naming `field` when that would lie outside `root`.

    Refused: an absolute path (or ``~``), one whose ``..`` climbs above `root`, and one that passes through a
    symlink (existing at the time of the check) that leads out of `root`. ``a/../b`` is fine: it stays inside."""
    root = Path(root)
    text = os.fspath(value)
    where = f"{field}: {text!r}"
    if not text:
        raise ConfigError(f"{where} is empty; name a path inside the output folder {root}")
    if text.startswith("~") or Path(text).is_absolute():
        raise ConfigError(f"{where} is an absolute path; it must be a relative path inside the output folder {root}")
    if os.path.normpath(text).split(os.sep)[0] == "..":
        raise ConfigError(f"{where} climbs out of the output folder {root} with '..'")
    base = root.resolve()
    try:
        target = (base / text).resolve()  # follows every symlink that exists along the way
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ConfigError(f"{where} cannot be resolved inside the output folder {root} ({e})") from None
    if target != base and base not in target.parents:
        raise ConfigError(f"{where} leads out of the output folder {root} through a symlink (to {target}); "
                          f"remove the link or choose another output folder")
    return root / text


def check_outputs(root: str | os.PathLike, names: Iterable[str], field: str = "output_dir") -> None:
    """Refuse to start when one of the fixed names a run writes under `root` is a symlink leading out of it."""
    for name in names:
        confined(root, name, f"{field} ({name})")
