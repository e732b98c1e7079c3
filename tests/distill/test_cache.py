"""Teacher cache: equals the teacher's own top-k, resumes from written shards, refuses what does not match."""
import json

import pytest
import torch

from pocketlm.distill.cache import CacheMismatchError, TeacherCache, build_teacher_cache
from pocketlm.models.load import fingerprint_model, fingerprint_tokenizer

from conftest import make_teacher


@pytest.fixture()
def setup(tokenizer):
    teacher = make_teacher(len(tokenizer))
    blocks = torch.randint(0, len(tokenizer), (10, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(k=5, teacher_fingerprint="t1", tokenizer_fingerprint="k1", data_hash="d1", batch_size=3,
              shard_blocks=4, progress=False)
    return teacher, blocks, kw


def test_cache_holds_the_teachers_topk(tmp_path, setup):
    teacher, blocks, kw = setup
    cache = build_teacher_cache(teacher, blocks, tmp_path, **kw)
    assert len(cache) == 10 and len(cache.manifest.shards) == 3
    ids = torch.tensor([7, 0, 3])
    lp, idx, tail = cache.get(ids)
    with torch.no_grad():
        ref = torch.log_softmax(teacher(input_ids=blocks[ids]).logits.float(), -1)  # [3, 12, V]
    ref_v, ref_i = ref.topk(5, dim=-1)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(lp.float(), ref_v, atol=2e-3, rtol=1e-3)  # stored as fp16
    # the tail bucket: log of the mass outside the top-k, by brute force over the rest of the vocabulary
    rest = ref.exp().sum(-1) - ref_v.exp().sum(-1)
    torch.testing.assert_close(tail, rest.log(), rtol=1e-4, atol=1e-5)
    assert (lp[..., :-1] >= lp[..., 1:]).all()


def test_rebuild_reuses_and_mismatch_is_refused(tmp_path, setup):
    teacher, blocks, kw = setup
    build_teacher_cache(teacher, blocks, tmp_path, **kw)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    build_teacher_cache(teacher, blocks, tmp_path, **kw)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    with pytest.raises(CacheMismatchError, match="k: cache has 5, run needs 6"):
        build_teacher_cache(teacher, blocks, tmp_path, **{**kw, "k": 6})
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        TeacherCache.open(tmp_path, expect={**TeacherCache.open(tmp_path).manifest.key(), "teacher_fingerprint": "x"})


def test_a_cache_built_by_another_real_teacher_is_refused(tmp_path, tokenizer):
    """Two real tiny Llama teachers of the same shape and different weights, each keyed by the project's own
    fingerprint: a cache built by one is reused by that one and refused, naming the teacher, for the other."""
    first, second = make_teacher(len(tokenizer), seed=0), make_teacher(len(tokenizer), seed=1)
    assert first.config.to_dict() == second.config.to_dict()  # they differ in weights only
    blocks = torch.randint(0, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(k=5, tokenizer_fingerprint=fingerprint_tokenizer(tokenizer), data_hash="d1", batch_size=2,
              shard_blocks=2, progress=False)
    built = build_teacher_cache(first, blocks, tmp_path, teacher_fingerprint=fingerprint_model(first), **kw)
    again = build_teacher_cache(first, blocks, tmp_path, teacher_fingerprint=fingerprint_model(first), **kw)
    assert torch.equal(again.indices, built.indices)  # the right teacher is accepted
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        build_teacher_cache(second, blocks, tmp_path, teacher_fingerprint=fingerprint_model(second), **kw)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        TeacherCache.open(tmp_path, expect={**built.manifest.key(), "teacher_fingerprint": fingerprint_model(second)})


def test_interrupted_build_resumes_from_written_shards(tmp_path, setup):
    teacher, blocks, kw = setup
    full = build_teacher_cache(teacher, blocks, tmp_path / "a", **kw)
    part = tmp_path / "b"
    build_teacher_cache(teacher, blocks, part, **kw)
    # as if killed after two shards: the manifest written first (no shards listed), shard 2 not yet there
    manifest = json.loads((part / "manifest.json").read_text())
    (part / "manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    (part / "shard-00002.safetensors").unlink()
    kept = (part / "shard-00000.safetensors").stat().st_mtime_ns
    again = build_teacher_cache(teacher, blocks, part, **kw)
    assert torch.equal(again.indices, full.indices) and torch.equal(again.logprobs, full.logprobs)
    assert (part / "shard-00000.safetensors").stat().st_mtime_ns == kept  # reused, not rebuilt


def test_damaged_shard_is_rebuilt_and_orphans_are_dropped(tmp_path, setup):
    teacher, blocks, kw = setup
    full = build_teacher_cache(teacher, blocks, tmp_path / "a", **kw)
    root = tmp_path / "b"
    build_teacher_cache(teacher, blocks, root, **kw)
    shard = root / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the tensor bytes
    shard.write_bytes(bytes(data))
    again = build_teacher_cache(teacher, blocks, root, **kw)
    assert all(torch.equal(getattr(again, f), getattr(full, f)) for f in ("logprobs", "indices", "tail"))
    # shards with no manifest beside them have no provenance: a build for other data must not reuse them
    orphan = tmp_path / "c"
    build_teacher_cache(teacher, blocks, orphan, **kw)
    (orphan / "manifest.json").unlink()
    other = build_teacher_cache(teacher, blocks.flip(0), orphan, **{**kw, "data_hash": "d2"})
    assert torch.equal(other.indices, build_teacher_cache(teacher, blocks.flip(0), tmp_path / "d",
                                                          **{**kw, "data_hash": "d2"}).indices)


def test_damaged_or_truncated_shard_is_named(tmp_path, setup):
    teacher, blocks, kw = setup
    build_teacher_cache(teacher, blocks, tmp_path, **kw)
    shard = tmp_path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheMismatchError, match="shard-00001.*damaged"):
        TeacherCache.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheMismatchError, match="not a valid cache manifest"):
        TeacherCache.open(tmp_path)


def test_bad_k(tmp_path, setup):
    teacher, blocks, kw = setup
    with pytest.raises(ValueError, match="between 1 and the vocabulary size"):
        build_teacher_cache(teacher, blocks, tmp_path, **{**kw, "k": 10_000})
