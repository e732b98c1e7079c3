"""The atomic writers: the whole file or the old one, nothing left behind on failure, symlinks not followed."""
import errno
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from pocketlm.core.io import (
    atomic_folder, atomic_path, save_tensors_atomic, write_bytes_atomic, write_json_atomic, write_text_atomic,
)


def test_text_json_and_bytes_replace_the_file_whole(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert write_text_atomic(p, "héllo") == p and p.read_text(encoding="utf-8") == "héllo"  # parent made
    write_bytes_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    write_json_atomic(tmp_path / "d.json", {"a": [1, 2]}, indent=2)
    assert (tmp_path / "d.json").read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"
    assert sorted(x.name for x in tmp_path.rglob("*")) == ["a.txt", "d.json", "sub"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(ValueError):
        write_json_atomic(p, {"x": float("nan")}, allow_nan=False)  # cannot be encoded: nothing written
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_a_symlink_in_place_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and target.read_text() == "keep"


def test_safetensors_full_disk_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    tensors = {"w": torch.arange(4.0)}
    save_tensors_atomic(tensors, tmp_path / "ok.safetensors", metadata={"k": "v"})
    assert torch.equal(safetensors.torch.load_file(tmp_path / "ok.safetensors")["w"], tensors["w"])

    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        save_tensors_atomic(tensors, tmp_path / "x.safetensors")
    assert e.value.errno == errno.ENOSPC and "x.safetensors" in str(e.value)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ok.safetensors"]


def test_atomic_folder_swaps_in_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(dest) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("failed while filling")
    assert [x.name for x in dest.iterdir()] == ["a"] and [x.name for x in tmp_path.iterdir()] == ["model"]
    with atomic_folder(dest) as tmp:
        (tmp / "c").write_text("3")
    assert [x.name for x in dest.iterdir()] == ["c"] and [x.name for x in tmp_path.iterdir()] == ["model"]
