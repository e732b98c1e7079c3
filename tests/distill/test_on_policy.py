"""On-policy distillation (GKD): parity with TRL's GKDTrainer on the same sampled sequences, the lmbda switch,
sampling from the student, the prompt mask, a run through `run_distill`, and the config's refusals."""
import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from pocketlm.config import ConfigError, DistillConfig, LossConfig, TrainConfig, load_config
from pocketlm.distill.moe_telemetry import StepTelemetry
from pocketlm.distill.on_policy import gkd_batch, is_on_policy, sample_continuations
from pocketlm.distill.run import run_distill
from pocketlm.distill.trainer import Trainer
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM
from conftest import make_teacher

V, L, P, N = 64, 16, 6, 8  # vocabulary, block, prompt and new tokens (P + N < L: the block's tail is unused)
TAU = 2.0
ROWS = torch.tensor([3, 0, 5, 1])  # block ids of the micro-batch
# our registry divergence (with its params) -> TRL's beta: the same convention, JSD's beta not reversed (at
# beta 0.5 the JSD is symmetric in teacher and student, so only beta 0.3 would show a reversed convention)
TRL_BETA = [("forward_kl", {}, 0.0), ("reverse_kl", {}, 1.0), ("jsd", {"beta": 0.5}, 0.5), ("jsd", {"beta": 0.3}, 0.3)]


def tiny_student(seed: int = 0) -> PocketLMForCausalLM:
    torch.manual_seed(seed)
    conf = PocketLMConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
    return PocketLMForCausalLM(conf)


def blocks() -> torch.Tensor:
    return torch.randint(3, V, (8, L), generator=torch.Generator().manual_seed(1))  # [n, L]


def trainer(tmp_path, **loss) -> Trainer:
    lc = LossConfig.model_validate({"mode": "on_policy", "loss": "forward_kl", "temperature": TAU, "lmbda": 1.0,
                                    "prompt_tokens": P, "max_new_tokens": N, **loss})
    tc = TrainConfig(steps=1, batch_size=len(ROWS), warmup_steps=0, seed=7)
    return Trainer(tiny_student(), train_blocks=blocks(), val_blocks=None, train_cfg=tc, loss_cfg=lc,
                   out_dir=tmp_path, teacher=make_teacher(V, layers=2), progress=False)


def one_step(t: Trainer, micro_step: int = 0):
    """The trainer's micro-batch loss and the sequences it scored (sampling is seeded: drawn again alike)."""
    student = t.accelerator.unwrap_model(t.student)
    batch = gkd_batch(student, t.train_blocks[ROWS], ROWS, t.loss_cfg, seed=t.cfg.seed, micro_step=micro_step)
    loss, _ = t._micro_loss(t.train_blocks[ROWS], ROWS, StepTelemetry(), micro_step)
    return loss, batch


def gkd_trainer():
    pytest.importorskip("trl", reason="peer library TRL not installed; install with .[dev]")
    with warnings.catch_warnings():  # trl.experimental warns on import
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer


def trl_labels(GKDTrainer, seq: torch.Tensor):
    """TRL's own on-policy inputs for `seq` (its prompt P tokens), built by `generate_on_policy_outputs` from a
    model whose `generate` returns `seq`; no EOS (every sampled token is in the loss, as ours)."""
    from transformers import GenerationConfig

    stub = SimpleNamespace(generate=lambda **_: SimpleNamespace(sequences=seq))
    prompts = {"prompts": seq[:, :P], "prompt_attention_mask": torch.ones_like(seq[:, :P])}
    ids, attention, labels = GKDTrainer.generate_on_policy_outputs(stub, prompts, GenerationConfig())
    assert torch.equal(ids, seq) and (labels[:, :P] == -100).all() and torch.equal(labels[:, P:], seq[:, P:])
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("loss, params, beta", TRL_BETA)
def test_one_step_equals_trl_generalized_jsd_loss_on_the_sampled_sequences(tmp_path, loss, params, beta):
    GKDTrainer = gkd_trainer()
    t = trainer(tmp_path, loss=loss, **params)
    ours, batch = one_step(t)
    assert batch.sampled and not torch.equal(batch.ids[:, P:], t.train_blocks[ROWS, P:P + N])
    inputs = trl_labels(GKDTrainer, batch.ids)
    with torch.no_grad():
        s = t.accelerator.unwrap_model(t.student)(input_ids=inputs["input_ids"]).logits[:, :-1]
        te = t.teacher(input_ids=inputs["input_ids"]).logits[:, :-1]
    # TRL's loss is untempered and not scaled by tau^2; ours is tau^2 x TRL's at the same temperature
    want = TAU**2 * GKDTrainer.generalized_jsd_loss(s, te, labels=inputs["labels"][:, 1:], beta=beta,
                                                     temperature=TAU)
    torch.testing.assert_close(ours.detach(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss, params, beta", TRL_BETA)
def test_one_step_at_temperature_one_equals_gkdtrainer_compute_loss(tmp_path, loss, params, beta):
    """The whole of TRL's compute_loss (its forwards, shift and mask) on the same sampled sequences."""
    GKDTrainer = gkd_trainer()
    t = trainer(tmp_path, loss=loss, temperature=1.0, **params)
    ours, batch = one_step(t)
    trl_self = SimpleNamespace(teacher_model=t.teacher, beta=beta, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    with torch.no_grad():
        want = GKDTrainer.compute_loss(trl_self, t.accelerator.unwrap_model(t.student), trl_labels(GKDTrainer, batch.ids))
    torch.testing.assert_close(ours.detach(), want, rtol=1e-5, atol=1e-7)


def test_lmbda_zero_is_the_supervised_loss_on_the_data_continuation(tmp_path):
    t = trainer(tmp_path, lmbda=0.0)
    ours, batch = one_step(t)
    data = t.train_blocks[ROWS, : P + N]
    assert not batch.sampled and torch.equal(batch.ids, data)
    with torch.no_grad():  # float64, from the definition: forward KL of the tempered distributions, times tau^2
        s = t.accelerator.unwrap_model(t.student)(input_ids=data[:, :-1]).logits.double() / TAU
        te = t.teacher(input_ids=data[:, :-1]).logits.double() / TAU
    pt, ls, lt = te.softmax(-1), s.log_softmax(-1), te.log_softmax(-1)
    per_position = (pt * (lt - ls)).sum(-1)  # [b, P+N-1]
    want = TAU**2 * per_position[:, P - 1:].mean()  # the N positions that predict a continuation token
    torch.testing.assert_close(ours.detach().double(), want, rtol=1e-5, atol=1e-7)


def test_lmbda_one_samples_from_the_student_reproducibly(tmp_path):
    t = trainer(tmp_path)
    student = t.accelerator.unwrap_model(t.student)
    _, a = one_step(t)
    _, again = one_step(t)
    _, other = one_step(t, micro_step=1)
    data = t.train_blocks[ROWS]
    assert a.sampled and a.ids.shape == (len(ROWS), P + N)
    assert torch.equal(a.ids[:, :P], data[:, :P])  # the prompt is the block's
    assert (a.ids[:, P:] != data[:, P:P + N]).float().mean() > 0.5  # the continuation is not
    assert torch.equal(a.ids, again.ids) and not torch.equal(a.ids[:, P:], other.ids[:, P:])
    # a row's continuation depends on its block id and step only, not on the batch it is in (nor the process)
    half = gkd_batch(student, data[2:], ROWS[2:], t.loss_cfg, seed=t.cfg.seed, micro_step=0)
    assert torch.equal(half.ids, a.ids[2:])
    # from the student: nucleus top_p ~ 0 keeps the top token only, so sampling is the student's greedy decoding,
    # which a full forward without the KV cache recomputes
    greedy = sample_continuations(student, data[:, :P], max_new_tokens=N, temperature=0.7, top_p=1e-6,
                                  seeds=[0, 1, 2, 3])
    seq = data[:, :P]
    with torch.no_grad():
        for _ in range(N):
            seq = torch.cat([seq, student(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, seq)


def test_prompt_positions_carry_no_loss(tmp_path):
    t = trainer(tmp_path)
    base, _ = one_step(t)
    teacher = t.teacher

    def shifted(until: int):
        def forward(input_ids, **kw):
            out = teacher(input_ids=input_ids, **kw)
            out.logits[:, :until] += torch.randn_like(out.logits[:, :until]) * 3
            return out
        return forward

    t.teacher = shifted(P - 1)  # every position that predicts a prompt token
    torch.testing.assert_close(one_step(t)[0], base, rtol=0, atol=0)
    t.teacher = shifted(P)  # and the first that predicts a continuation token: the loss moves
    assert abs(one_step(t)[0].item() - base.item()) > 1e-3


def test_lmbda_is_the_share_of_sampled_micro_batches():
    for lmbda in (0.0, 0.3, 1.0):
        share = sum(is_on_policy(lmbda, 0, m) for m in range(2000)) / 2000
        assert abs(share - lmbda) < 0.04, (lmbda, share)


def test_run_distill_on_policy_end_to_end(tmp_path, teacher_dir, corpus_file):
    from transformers import AutoModelForCausalLM

    cfg = DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "distill": {"mode": "on_policy", "loss": "jsd", "temperature": 2.0, "lmbda": 0.5, "max_new_tokens": 6},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": 3, "save_every": 3},
        "output_dir": str(tmp_path / "run"),
    })
    res = run_distill(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    sampled = [is_on_policy(0.5, 0, m) for m in range(3)]
    assert any(sampled) and not all(sampled)  # seed 0 draws both kinds of batch in three steps
    assert [r["on_policy"] for r in rows] == [float(s) for s in sampled]
    assert [r["sampled_tokens"] for r in rows] == [4 * 6 * s for s in sampled]
    assert res.train.tokens_seen == 3 * 4 * 6  # the positions in the loss: each block's 6 continuation tokens
    student = AutoModelForCausalLM.from_pretrained(res.student_dir)
    assert student.config.num_hidden_layers == 2


@pytest.mark.parametrize("overrides, names", [
    (["distill.prompt_tokens=10", "distill.max_new_tokens=8"], "distill.prompt_tokens (10) + distill.max_new_tokens (8)"),
    (["distill.prompt_tokens=16"], "distill.prompt_tokens (16) + distill.max_new_tokens (0)"),
    (["distill.lmbda=1.5"], "distill.lmbda: Input should be less than or equal to 1"),
    (["distill.gen_temperature=0"], "distill.gen_temperature: Input should be greater than 0"),
    (["distill.ce_weight=0.1"], "ce_weight: on_policy has no CE term"),
    (["student.init=random", "student.moe.router=expert_choice", "student.moe.allow_noncausal_generation=true"],
     "student.moe.router 'expert_choice' routes over the whole sequence"),
])
def test_bad_on_policy_configs_are_refused_by_name(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, ["distill.mode=on_policy", "data.block_size=16", *overrides])
    assert names in str(e.value)
    load_config(DistillConfig, None, ["distill.mode=on_policy", "data.block_size=16", "distill.prompt_tokens=10",
                                      "distill.max_new_tokens=6"])  # exactly a block: fine


def test_trainer_refuses_blocks_too_short_before_any_work(tmp_path):
    lc = LossConfig(mode="on_policy", prompt_tokens=P, max_new_tokens=N)
    with pytest.raises(ValueError, match=r"data.block_size = 12"):
        Trainer(tiny_student(), train_blocks=blocks()[:, :12], val_blocks=None, train_cfg=TrainConfig(batch_size=4),
                loss_cfg=lc, out_dir=tmp_path, teacher=make_teacher(V, layers=2), progress=False)
