"""Fault injection for the hardening tests: break a checkpoint write part-way, in this process or in a child.

`write_faults(step, target, action)` lists the patches that make `save_checkpoint` leave half of `target`'s file
in checkpoint `step`'s temporary folder and then call `action` (raise ENOSPC as a full disk does, or SIGKILL the
process). The tests apply them with pytest's monkeypatch; as a script this file runs one distillation through the
same `run_distill` the CLI calls, in a child process the test can kill:

    python fault_driver.py CONFIG.yaml [--resume] [--die-in STEP:TARGET]
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import Callable

TARGETS = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json")


def enospc(path: Path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def sigkill(path: Path) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def write_faults(step: int, target: str, action: Callable[[Path], None]) -> list[tuple[object, str, Callable]]:
    """(object, attribute, replacement) triples: every writer `save_checkpoint` uses, wrapped so that `target` in
    checkpoint `step`'s temporary folder is cut to half its bytes, then `action(path)` runs."""
    import safetensors.torch
    import transformers.modeling_utils as hf_modeling

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}")

    def strike(path) -> None:
        p = Path(path)
        if p.name == target and p.parent.name.startswith(f".tmp-step-{step:06d}-"):
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 2])  # the half a full disk (or a kill) leaves behind
            action(p)

    def tensors_writer(real):
        def write(tensors, filename, *args, **kwargs):
            out = real(tensors, filename, *args, **kwargs)
            strike(filename)
            return out
        return write

    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        out = real_write_text(self, data, *args, **kwargs)
        strike(self)
        return out

    return [(safetensors.torch, "save_file", tensors_writer(safetensors.torch.save_file)),  # via outdir.save_tensors
            (hf_modeling, "safe_save_file", tensors_writer(hf_modeling.safe_save_file)),
            (Path, "write_text", write_text)]


def main(argv: list[str]) -> None:
    import torch

    from pocketlm.config import DistillConfig, load_config
    from pocketlm.distill.run import run_distill

    torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py: the same float sums
    cfg = load_config(DistillConfig, argv[0])
    if "--die-in" in argv:
        step, target = argv[argv.index("--die-in") + 1].split(":")
        for obj, name, fn in write_faults(int(step), target, sigkill):
            setattr(obj, name, fn)
    run_distill(cfg, resume="--resume" in argv, progress=False)


if __name__ == "__main__":
    main(sys.argv[1:])
