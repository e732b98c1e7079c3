"""Sparse upcycling: experts start as copies of the dense MLP (or its segments), so a renormalising router's MoE
computes exactly what the dense student did (fp32, 1e-5); noise is what was asked for; the dense model is untouched;
an MoE student from teacher layers is the teacher-layer student, upcycled."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_teacher

from pocketlm.config import MoEConfig
from pocketlm.models.init import init_student_from_teacher
from pocketlm.models.moe import experts_reference, moe_layers
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM
from pocketlm.models.upcycle import upcycle

TOL = dict(rtol=1e-5, atol=1e-5)


def dense_student(seed=0) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    cfg = PocketLMConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return PocketLMForCausalLM(cfg).eval()


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, **kw})


@pytest.mark.parametrize(
    "spec",
    [
        dict(router="topk_softmax", top_k=2),
        dict(router="aux_free", top_k=3),
        dict(router="hash", top_k=1),
        dict(router="topk_softmax", top_k=2, layers=[0, 2]),
        dict(router="topk_softmax", top_k=1, num_shared_experts=1),
    ],
    ids=["topk", "aux_free", "hash", "some-layers", "shared"],
)
def test_upcycled_student_computes_what_the_dense_one_did(spec):
    dense = dense_student()
    before = copy.deepcopy(dense.state_dict())
    sparse = upcycle(dense, moe(**spec)).eval()
    ids = torch.randint(3, 100, (2, 9))
    torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, **TOL)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the dense model is untouched
    assert sorted(moe_layers(sparse)) == (spec.get("layers") or [0, 1, 2])


@pytest.mark.parametrize("router, k", [("switch", 1), ("expert_choice", 4)])
def test_probability_weighted_routers_are_rescaled_to_the_dense_output_under_a_uniform_router(router, k):
    dense = dense_student()
    sparse = upcycle(dense, moe(router=router, top_k=k)).eval()
    for layer in moe_layers(sparse).values():
        layer.router.proj.weight.data.zero_()  # uniform: switch weights 1/E, expert choice picks every token
    ids = torch.randint(3, 100, (2, 8))
    torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, **TOL)


def test_fine_grained_experts_are_segments_of_the_dense_mlp():
    dense = dense_student()
    sparse = upcycle(dense, moe(router="topk_softmax", top_k=2, expert_size=32))  # g = 64 / 32 = 2 segments
    layer, mlp = moe_layers(sparse)[1], dense.model.layers[1].mlp
    gu, down = layer.experts.gate_up_proj, layer.experts.down_proj
    for e in range(4):
        seg = slice((e % 2) * 32, (e % 2 + 1) * 32)
        assert torch.equal(gu[e], torch.cat([mlp.gate_proj.weight[seg], mlp.up_proj.weight[seg]]))
        torch.testing.assert_close(down[e], 2 * mlp.down_proj.weight[:, seg])
    x = torch.randn(5, 32)
    both_halves = torch.tensor([[0, 1]] * 5)  # a token sent to the two segments, half each: the dense MLP
    out = experts_reference(x, torch.full((5, 2), 0.5), both_halves, gu, down)
    torch.testing.assert_close(out, mlp(x), **TOL)


def test_noise_is_relative_seeded_and_makes_experts_differ():
    dense = dense_student()
    a = upcycle(dense, moe(router="topk_softmax", upcycle_noise=0.1), seed=3)
    b = upcycle(dense, moe(router="topk_softmax"), noise=0.1, seed=3)
    gu_a, gu_b = moe_layers(a)[0].experts.gate_up_proj, moe_layers(b)[0].experts.gate_up_proj
    assert torch.equal(gu_a, gu_b)
    mlp = dense.model.layers[0].mlp
    copy_ = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    rel = [((gu_a[e] - copy_).std() / copy_.std()).item() for e in range(4)]
    assert all(0.09 < r < 0.11 for r in rel), rel
    assert not torch.equal(gu_a[0], gu_a[1])


def test_bad_upcycling_is_refused_naming_the_problem():
    dense = dense_student()
    with pytest.raises(ValueError, match="moe.expert_size"):
        upcycle(dense, moe(expert_size=48))
    sparse = upcycle(dense, moe())
    with pytest.raises(ValueError, match="dense student"):
        upcycle(sparse, moe())


def test_moe_student_from_teacher_layers_is_the_teacher_layer_student_upcycled():
    teacher = make_teacher(100, layers=4)
    dense = init_student_from_teacher(teacher, layers=[0, 3])
    sparse = upcycle(dense, moe(router="topk_softmax", top_k=2), seed=0).eval()
    ids = torch.randint(3, 100, (2, 7))
    torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, **TOL)
    torch.testing.assert_close(
        moe_layers(sparse)[1].experts.down_proj[2], teacher.model.layers[3].mlp.down_proj.weight, rtol=0, atol=0
    )
