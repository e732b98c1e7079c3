"""The teacher cache's key (issue #17 item 3): every weight byte of the teacher, and its dtype.

Before: the fingerprint hashed 64 sampled values per tensor, so a teacher differing only in rows the sample never
read (an edited special-token embedding) reused the old cache, and a bf16 teacher reused an fp32 teacher's cache.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_teacher
from pocketlm.distill.cache import CacheMismatchError, build_teacher_cache
from pocketlm.models.load import fingerprint_model


def _unsampled_row(teacher) -> int:
    """A row of the embedding that a 64-values-per-tensor sample (the old fingerprint) never reads."""
    w = teacher.get_input_embeddings().weight
    step = max(1, w.numel() // 64)
    sampled = {i // w.shape[1] for i in range(0, w.numel(), step)[:64]}
    return next(r for r in range(w.shape[0] - 1, -1, -1) if r not in sampled)


def edited_twin(tokenizer):
    """Two real tiny teachers, equal but for one embedding row (as an edited special-token embedding)."""
    a, b = make_teacher(len(tokenizer)), make_teacher(len(tokenizer))
    row = _unsampled_row(a)
    with torch.no_grad():
        b.get_input_embeddings().weight[row] += 3.0
    return a, b, row


def test_teachers_differing_in_one_unsampled_row_have_different_fingerprints(tokenizer):
    a, b, row = edited_twin(tokenizer)
    ids = torch.tensor([[1, row, 5, 7]])
    assert not torch.equal(a(ids).logits, b(ids).logits)  # they are different teachers
    assert fingerprint_model(a) != fingerprint_model(b)
    assert fingerprint_model(a) == fingerprint_model(make_teacher(len(tokenizer)))  # and it is deterministic


def test_a_cache_of_the_edited_teacher_is_not_reused(tmp_path, tokenizer):
    a, b, _ = edited_twin(tokenizer)
    blocks = torch.randint(3, len(tokenizer), (4, 12))
    common = dict(k=8, tokenizer_fingerprint="tok", data_hash="data", progress=False)
    build_teacher_cache(a, blocks, tmp_path / "c", teacher_fingerprint=fingerprint_model(a), **common)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint"):
        build_teacher_cache(b, blocks, tmp_path / "c", teacher_fingerprint=fingerprint_model(b), **common)


def test_the_teachers_dtype_is_part_of_the_key(tmp_path, tokenizer):
    fp32 = make_teacher(len(tokenizer))
    bf16 = make_teacher(len(tokenizer)).to(torch.bfloat16)
    assert fingerprint_model(fp32) != fingerprint_model(bf16)
    blocks = torch.randint(3, len(tokenizer), (4, 12))
    common = dict(k=8, tokenizer_fingerprint="tok", data_hash="data", progress=False)
    build_teacher_cache(bf16, blocks, tmp_path / "c", teacher_fingerprint="same", **common)
    # even where a caller's fingerprint were to agree, the dtype alone refuses the cache
    with pytest.raises(CacheMismatchError, match=r"teacher_dtype: cache has 'bfloat16', run needs 'float32'"):
        build_teacher_cache(fp32, blocks, tmp_path / "c", teacher_fingerprint="same", **common)

