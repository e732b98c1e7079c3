"""Teacher cache: one pass of the teacher over the training blocks, kept on disk as top-k log-probs.

Layout of a cache folder::

    manifest.json            what the cache is of (teacher, tokenizer, data, k) and its shards with checksums
    shard-00000.safetensors  "logprobs" [n, L, k] float16 (log p at T=1, descending), "indices" [n, L, k] int32,
                             "tail" [n, L] float32 (log of the mass outside the top-k: one extra bucket)

Position t of a block holds the teacher's distribution over the token at t+1, as the student's logits do.
Shards are written to a temporary file and renamed, so an interrupted build resumes from the shards that exist;
a cache whose manifest does not match the run, or whose shard checksum fails, is refused with the reason. The
manifest is read back as a record of ours, not trusted (`pocketlm.core.integrity`): shard i must be named exactly
``shard-{i:05d}.safetensors`` (a name, never a path) and be a file in the folder, not a symlink; anything else
refuses the cache naming the manifest and the field, before any shard is read or removed.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from pocketlm.core import distributed as dist
from pocketlm.core.integrity import is_sha256, plain_name, read_json, sha256_file
from pocketlm.core.io import save_tensors_atomic, write_json_atomic
from pocketlm.memory import Footprint, largest_batch

CACHE_VERSION = 3  # 3: the teacher fingerprint hashes every weight byte; the key holds its dtype


class CacheMismatchError(ValueError):
    """A teacher cache that was built for something else, or is damaged."""


@dataclass
class CacheManifest:
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    data_hash: str
    k: int
    block_size: int
    n_blocks: int
    shard_blocks: int
    teacher_dtype: str
    version: int = CACHE_VERSION
    shards: list[dict] = field(default_factory=list)  # {"file", "start", "end", "sha256"}

    def key(self) -> dict:
        """The fields two caches must share to be interchangeable."""
        return {
            "version": self.version,
            "teacher_fingerprint": self.teacher_fingerprint,
            "teacher_dtype": self.teacher_dtype,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "data_hash": self.data_hash,
            "k": self.k,
            "block_size": self.block_size,
            "n_blocks": self.n_blocks,
        }


_SHARD = re.compile(r"shard-\d{5,}\.safetensors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def read_manifest(root: Path) -> CacheManifest:
    """The manifest of the cache at `root`, checked as a record read back (see the module docstring)."""
    mpath = root / "manifest.json"
    tree = read_json(mpath, "cache manifest", CacheMismatchError)
    try:
        manifest = CacheManifest(**tree)
    except TypeError as e:  # a list, or missing / unknown fields
        raise CacheMismatchError(f"{mpath} is not a valid cache manifest: {e}") from None
    ints = ("k", "block_size", "n_blocks", "shard_blocks", "version")
    for name in ints:
        value = getattr(manifest, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CacheMismatchError(f"{mpath} field {name}: {value!r} is not a non-negative integer")
    if not isinstance(manifest.shards, list):
        raise CacheMismatchError(f"{mpath} field shards: {manifest.shards!r} is not a list of shard records")
    for i, shard in enumerate(manifest.shards):
        where = f"{mpath} field shards[{i}]"
        if not isinstance(shard, dict):
            raise CacheMismatchError(f"{where}: {shard!r} is not a shard record")
        name = shard.get("file")
        plain_name(root, name, _SHARD, f"{where}.file", CacheMismatchError)
        if name != shard_name(i):
            raise CacheMismatchError(f"{where}.file: {name!r}, but shard {i} is named {shard_name(i)!r}")
        if not is_sha256(shard.get("sha256")):
            raise CacheMismatchError(f"{where}.sha256: {shard.get('sha256')!r} is not a SHA-256")
    return manifest


@torch.inference_mode()
def teacher_topk(teacher, input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probs and indices ([b, L, k], fp32 log-softmax) and log tail mass ([b, L]).

    The tail is log Σ of the probabilities outside the top-k, computed in log space: exact even when it is tiny,
    where 1 − Σ exp(top-k) of rounded log-probs would give an empty (or negative) tail.
    """
    logits = teacher(input_ids=input_ids, use_cache=False).logits  # [b, L, V]
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(k, dim=-1)  # sorted, descending
    if k == logp.shape[-1]:
        tail = torch.full(values.shape[:-1], float("-inf"), device=values.device)
    else:
        tail = torch.logsumexp(logp.scatter(-1, indices, float("-inf")), dim=-1)  # [b, L]
    return values, indices, tail


def build_teacher_cache(
    teacher,
    blocks: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    k: int,
    teacher_fingerprint: str,
    tokenizer_fingerprint: str,
    data_hash: str,
    batch_size: int = 8,
    shard_blocks: int = 256,
    progress: bool = True,
    max_memory: int | None = None,
) -> "TeacherCache":
    """Run the teacher once over `blocks` [n, L] and write the cache; shards already written are kept (resume).

    `max_memory` (bytes): teacher weights plus one batch's working set must fit; the batch is the largest up to
    `batch_size` that does (`pocketlm.memory`), and a budget too small for one block is refused before any work."""
    out = Path(out_dir)
    n, L = blocks.shape
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"cache k must be between 1 and the vocabulary size {vocab}, got {k}")
    if max_memory is not None:
        fp = Footprint.of(teacher)
        batch_size = largest_batch(lambda b: fp.teacher_cache(b, L, k, min(shard_blocks, n)), batch_size, fp,
                                   max_memory, f"the teacher cache ({L}-token blocks, top-{k})")
    manifest = CacheManifest(
        teacher_fingerprint=teacher_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        data_hash=data_hash,
        k=k,
        block_size=L,
        n_blocks=n,
        shard_blocks=shard_blocks,
        teacher_dtype=str(next(teacher.parameters()).dtype).removeprefix("torch."),
    )
    mpath = out / "manifest.json"
    # rank 0 alone inspects and prepares the folder; every rank then learns the outcome (one process: no-op)
    status = _prepare_folder(out, mpath, manifest) if dist.is_main() else None
    status = dist.broadcast_object(status)
    if status.startswith("error:"):
        raise CacheMismatchError(status.removeprefix("error:"))
    if status == "complete":
        return TeacherCache.open(out, expect=manifest.key())
    teacher.eval()
    # shard s is built by rank s mod N: the same shard boundaries and batches as one process, so the same bytes
    starts = list(range(0, n, shard_blocks))
    mine = [s_idx for s_idx in range(len(starts)) if s_idx % dist.world_size() == dist.rank()]
    bar = tqdm(total=sum(min(starts[i] + shard_blocks, n) - starts[i] for i in mine), desc="teacher cache",
               unit="block", disable=not progress or not dist.is_main())
    for s_idx in mine:
        start = starts[s_idx]
        end = min(start + shard_blocks, n)
        name = shard_name(s_idx)
        path = out / name
        if not path.is_file():
            vals, idxs, tails = [], [], []
            for b in range(start, end, batch_size):
                v, i, t = teacher_topk(teacher, blocks[b : min(b + batch_size, end)].to(teacher.device), k)
                vals.append(v.to(torch.float16).cpu())
                idxs.append(i.to(torch.int32).cpu())
                tails.append(t.cpu())
                bar.update(min(b + batch_size, end) - b)
            tensors = {"logprobs": torch.cat(vals), "indices": torch.cat(idxs), "tail": torch.cat(tails)}
            save_tensors_atomic({key: t.contiguous() for key, t in tensors.items()}, path)
        else:
            bar.update(end - start)
    bar.close()
    dist.barrier()  # every shard is on disk
    if dist.is_main():  # one manifest, with every shard's checksum
        for s_idx, start in enumerate(starts):
            name = shard_name(s_idx)
            manifest.shards.append({"file": name, "start": start, "end": min(start + shard_blocks, n),
                                    "sha256": sha256_file(out / name)})
        write_json_atomic(mpath, asdict(manifest), indent=2)
    dist.barrier()
    return TeacherCache.open(out, expect=manifest.key())


def _prepare_folder(out: Path, mpath: Path, manifest: CacheManifest) -> str:
    """Check an existing cache folder against the run: "complete", "build" (after cleaning), or "error:<why>"."""
    if mpath.is_file():
        try:
            old = read_manifest(out)
        except CacheMismatchError as e:
            return f"error:{e}; delete the cache folder {out} to rebuild it"
        if old.key() != manifest.key():
            return (f"error:{out} holds a teacher cache for different inputs ({_diff(old.key(), manifest.key())}); "
                    f"use another cache folder or delete this one")
        try:
            TeacherCache.open(out, expect=manifest.key())
            return "complete"
        except CacheMismatchError:  # unfinished or damaged: drop the shards that fail their recorded checksum
            for shard in old.shards:  # names checked by read_manifest: shard-NNNNN.safetensors in this folder
                spath = out / shard["file"]
                if spath.is_file() and sha256_file(spath) != shard["sha256"]:
                    warnings.warn(f"teacher cache shard {spath} is damaged (checksum mismatch); rebuilding it",
                                  stacklevel=3)
                    spath.unlink()
    elif out.is_dir():
        # shards without a manifest have no provenance: they may come from other data or another teacher
        for stale in out.glob("shard-*.safetensors"):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # the manifest (with no shards yet) goes first: shards found beside it later were built for these inputs
    if not mpath.is_file():
        write_json_atomic(mpath, asdict(manifest), indent=2)
    return "build"


def _diff(old: dict, new: dict) -> str:
    parts = [f"{key}: cache has {old.get(key)!r}, run needs {val!r}" for key, val in new.items() if old.get(key) != val]
    return "; ".join(parts) or "unknown difference"


class TeacherCache:
    """A verified teacher cache held in memory; `get(block_ids)` returns ([b, L, k] log-probs, [b, L, k] indices)."""

    def __init__(self, manifest: CacheManifest, logprobs: torch.Tensor, indices: torch.Tensor,
                 tail: torch.Tensor) -> None:
        self.manifest = manifest
        self.logprobs = logprobs  # [n, L, k] float16
        self.indices = indices  # [n, L, k] int32
        self.tail = tail  # [n, L] float32

    @classmethod
    def open(cls, path: str | os.PathLike, *, expect: dict | None = None, verify: bool = True) -> "TeacherCache":
        root = Path(path)
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise CacheMismatchError(f"{root} is not a teacher cache (no manifest.json)")
        manifest = read_manifest(root)
        if expect is not None and manifest.key() != expect:
            raise CacheMismatchError(f"teacher cache {root} does not match this run: {_diff(manifest.key(), expect)}")
        vals, idxs, tails = [], [], []
        for shard in manifest.shards:
            spath = root / shard["file"]
            if not spath.is_file():
                raise CacheMismatchError(f"teacher cache shard {spath} is missing")
            if verify and sha256_file(spath) != shard["sha256"]:
                raise CacheMismatchError(f"teacher cache shard {spath} is damaged (checksum mismatch); rebuild the cache")
            try:
                t = load_file(str(spath))
                vals.append(t["logprobs"])
                idxs.append(t["indices"])
                tails.append(t["tail"])
            except Exception as e:  # noqa: BLE001 - unverified and unreadable, or a missing tensor
                raise CacheMismatchError(f"teacher cache shard {spath} cannot be read ({e})") from None
        if not vals:
            raise CacheMismatchError(f"teacher cache {root} has no shards")
        logprobs, indices, tail = torch.cat(vals), torch.cat(idxs), torch.cat(tails)
        expected = (manifest.n_blocks, manifest.block_size, manifest.k)
        if tuple(logprobs.shape) != expected or tuple(indices.shape) != expected or tail.shape != expected[:2]:
            raise CacheMismatchError(f"teacher cache {root} holds {tuple(logprobs.shape)}, manifest says {expected}")
        return cls(manifest, logprobs, indices, tail)

    def __len__(self) -> int:
        return self.manifest.n_blocks

    def get(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([b, L, k] log-probs, [b, L, k] indices, [b, L] log tail mass) of the given blocks."""
        return self.logprobs[block_ids], self.indices[block_ids].long(), self.tail[block_ids]
