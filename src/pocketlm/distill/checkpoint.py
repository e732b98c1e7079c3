"""Checkpoints in Hugging Face layout, written atomically, holding everything an exact resume needs.

    step-000100/
      config.json, model.safetensors, tokenizer files     the student, loadable by `from_pretrained`
      optimizer.safetensors                               AdamW moments, flattened "state.{param}.{key}"
      trainer_state.json                                  step, optimizer param groups, scheduler, RNG, metrics,
                                                          and the SHA-256 of every other file ("checksums")

Nothing is pickled: tensors go to safetensors, the rest to JSON. A checkpoint is built in a hidden temporary
folder and renamed into place, so a crash mid-write leaves the previous checkpoint as the latest. A write that
fails (a full disk) removes its temporary folder and raises `CheckpointWriteError` naming the intact checkpoint;
the temporary folders of a killed process are never read and are removed by the next save.

trainer_state.json is written last (its presence marks the folder complete) and records a checksum of each other
file. A resume (`read_checkpoint`) checks its fields and every checksum first: a damaged or edited checkpoint is a
`CheckpointError` naming the file, and the previous checkpoint that verifies is offered in its place.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pocketlm.core.integrity import is_sha256, plain_name, read_json, sha256_file
from pocketlm.core.io import as_write_error, fsync_path, replace_folder, save_tensors
from pocketlm.core.outdir import pid_alive

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_LEFTOVER = re.compile(r"^\.(?:tmp-step-\d{6,}|old-step-\d{6,})-(\d+)$")  # written by process <pid>
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the flat file names save_pretrained and we write


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoint is untouched."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (damaged, or edited by hand); the message names the file."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (a folder counts once its trainer_state.json is in place)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and not p.is_symlink() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


# ---------------------------------------------------------------------------------------------- optimizer state
def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in state_dict["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"state.{pid}.{key}"] = t.detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def optimizer_from_flat(tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model,
    tokenizer=None,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write step `step` atomically and keep only the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    remove_leftovers(root)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        opt_tensors, groups = optimizer_to_flat(optimizer.state_dict())
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_meta = capture_rng()
        save_tensors(rng_tensors, tmp / "rng.safetensors")
        checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        trainer_state = {
            "step": step,
            "optimizer_param_groups": groups,
            "scheduler": scheduler.state_dict(),
            "rng": rng_meta,
            **state,
            "checksums": checksums,
        }
        # written last: its presence marks the folder complete
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, default=_json_default))
        _fsync_dir(tmp)
        # the old one (if any) as .old-step-N-PID meanwhile (cleaned up by _LEFTOVER); the rename flushed
        replace_folder(tmp, final, aside=f".old-{final.name}-{os.getpid()}")
    except (OSError, SafetensorError) as e:  # a full disk, a quota, an I/O error: say what is intact
        e = as_write_error(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        intact = latest_checkpoint(root)
        raise CheckpointWriteError(
            f"could not write checkpoint step {step} under {root} ({e.strerror or e}); nothing of it was kept, "
            f"the latest intact checkpoint is {intact or 'none'}. Free space and resume with --resume"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the temporary folders of checkpoint writes whose process is gone (killed mid-write)."""
    removed = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _LEFTOVER.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        fsync_path(f)
    fsync_path(path)


# ---------------------------------------------------------------------------------------------- reading back
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_FIELDS = {  # field: (required, check, what it must be)
    "step": (True, _is_count, "a non-negative integer"),
    "optimizer_param_groups": (True, lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
                               "a list of parameter-group records"),
    "scheduler": (True, lambda v: isinstance(v, dict), "a scheduler record"),
    "rng": (True, lambda v: isinstance(v, dict) and isinstance(v.get("python"), list)
            and isinstance(v.get("numpy"), list), "a record with python and numpy RNG states"),
    "tokens_seen": (False, _is_count, "a non-negative integer"),
    "history": (False, lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of records"),
    "run": (False, lambda v: isinstance(v, dict), "a record"),
    "checksums": (False, lambda v: isinstance(v, dict) and all(is_sha256(x) for x in v.values()),
                  "a record of file name: SHA-256"),
}


def _verified_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of `ckpt` with its fields checked and every recorded checksum verified."""
    path = ckpt / "trainer_state.json"
    state = read_json(path, "trainer state", CheckpointError)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a valid trainer state: a JSON {type(state).__name__}, not an object")
    for name, (required, ok, what) in _FIELDS.items():
        if name not in state:
            if required:
                raise CheckpointError(f"{path} field {name} is missing")
        elif not ok(state[name]):
            raise CheckpointError(f"{path} field {name}: {state[name]!r:.80} is not {what}")
    m = _STEP_DIR.match(ckpt.name)
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{path} field step: {state['step']} in the folder of step {int(m.group(1))}")
    if "checksums" not in state:  # written before checksums were recorded
        warnings.warn(f"checkpoint {ckpt} records no checksums (an older pocketlm wrote it); resuming unverified",
                      stacklevel=3)
        return state
    for name, digest in state["checksums"].items():
        f = plain_name(ckpt, name, _FILE, f"{path} field checksums", CheckpointError)
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (trainer_state.json records it)")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f} is damaged (checksum mismatch)")
    return state


def read_checkpoint(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The verified trainer_state.json of checkpoint `ckpt`; a damaged one is a `CheckpointError` that names the
    damaged file and the newest earlier checkpoint that verifies (or says there is none)."""
    ckpt = Path(ckpt)
    try:
        return _verified_state(ckpt)
    except CheckpointError as e:
        earlier = [p for _, p in list_checkpoints(ckpt.parent) if p.name < ckpt.name]
        good = next((p for p in reversed(earlier) if _verifies(p)), None)
        if good is None:
            advice = f"there is no earlier good checkpoint under {ckpt.parent}; start again in a new output_dir"
        else:
            advice = (f"the previous good checkpoint is {good}: move the damaged folder {ckpt} away (or delete it) "
                      f"and resume again with --resume to continue from it")
        raise CheckpointError(f"cannot resume: {e}; {advice}") from None


def _verifies(ckpt: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _verified_state(ckpt)
        return True
    except CheckpointError:
        return False


def load_training_state(ckpt: str | os.PathLike, optimizer, scheduler,
                        state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint folder; returns trainer_state.json's content
    (`state`, when the caller has already read it with `read_checkpoint`)."""
    ckpt = Path(ckpt)
    state = read_checkpoint(ckpt) if state is None else state
    if set(state["scheduler"]) != set(scheduler.state_dict()):
        raise CheckpointError(f"{ckpt / 'trainer_state.json'} field scheduler: keys {sorted(state['scheduler'])}, "
                              f"this scheduler has {sorted(scheduler.state_dict())}")
    opt = optimizer_from_flat(load_file(str(ckpt / "optimizer.safetensors")), state["optimizer_param_groups"])
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(load_file(str(ckpt / "rng.safetensors")), state["rng"])
    return state
