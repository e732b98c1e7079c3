"""#20 item 6: a distillation run's final student folder is in the most standard layout that holds it exactly.

A dense rotary student (depth- or width-pruned) is a `LlamaForCausalLM` folder and a top-k softmax MoE without
shared experts a `MixtralForCausalLM` one: a Python process that never imports pocketlm loads each with
`AutoModelForCausalLM` (and lm-eval's `hf` model) and gets the student's logits (fp32, rtol=atol=1e-5) and
log-likelihoods (against a float64 brute force, 2e-5). The oracle is the run's last checkpoint, which stays in
pocketlm's layout and holds the same weights. A student nothing standard holds (ALiBi, another router, shared
experts) is written in pocketlm's layout with the reason, in the run's result and as a warning; so is one whose
standard folder would not reload to its logits.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pocketlm.config import DistillConfig
from pocketlm.distill.run import run_distill
from pocketlm.models import hf_export
from pocketlm.models.student import PocketLMForCausalLM

TOL = dict(rtol=1e-5, atol=1e-5)

# a clean interpreter: transformers (and lm-eval) only; it fails if anything imported pocketlm
NO_POCKETLM = 'assert not [m for m in sys.modules if m.split(".")[0] == "pocketlm"], "pocketlm was imported"'
AUTO_LOADER = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, ids_path, out_path, expected = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == expected, type(model).__name__
    with torch.no_grad():
        logits = model(load_file(ids_path)["ids"]).logits
    """) + NO_POCKETLM + '\nsave_file({"logits": logits.contiguous()}, out_path)\n'
LM_EVAL_LOADER = textwrap.dedent("""
    import json
    import sys
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder, out_path, requests = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    lm = HFLM(pretrained=folder, device="cpu", batch_size=2, dtype="float32")
    seen = []
    inner = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, **kw: seen.extend(reqs) or inner(reqs, **kw)
    scores = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=tuple(r), idx=i)
                               for i, r in enumerate(requests)], disable_tqdm=True)
    tokens = {json.dumps(list(pair)): [list(ctx), list(cont)] for pair, ctx, cont in seen}
    out = {"class": type(lm.model).__name__, "loglikelihood": [float(s) for s, _ in scores],
           "tokens": [tokens[json.dumps(list(r))] for r in requests]}
    """) + NO_POCKETLM + '\njson.dump(out, open(out_path, "w"))\n'


def run_clean(script: str, *args, cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def distill_cfg(teacher_dir, corpus_file, out, student: dict) -> DistillConfig:
    return DistillConfig.model_validate({
        "teacher": str(teacher_dir),
        "data": {"source": str(corpus_file), "block_size": 16, "val_fraction": 0.15},
        "student": student,
        "distill": {"mode": "cache", "loss": "forward_kl", "top_k": 8},
        "train": {"steps": 2, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "save_every": 2},
        "output_dir": str(out),
    })


def distilled(teacher_dir, corpus_file, out, student: dict):
    """(result, the final student as pocketlm holds it: its last checkpoint, pocketlm's layout) of a 2-step run."""
    res = run_distill(distill_cfg(teacher_dir, corpus_file, out, student), progress=False)
    ours = PocketLMForCausalLM.from_pretrained(res.train.checkpoint).eval()
    assert ours.config.model_type == "pocketlm"  # resume checkpoints keep pocketlm's layout
    return res, ours


def model_type(folder) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def clean_logits(tmp_path, folder, expected: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logits) of `folder` loaded by `AutoModelForCausalLM` in a process that never imports pocketlm."""
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(7))
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    run_clean(AUTO_LOADER, folder, tmp_path / "ids.safetensors", tmp_path / "logits.safetensors", expected,
              cwd=tmp_path)
    return ids, load_file(tmp_path / "logits.safetensors")["logits"]


DEMO_SHAPED = {"init": "pruned", "num_layers": 2, "pruning": {"calibration_blocks": 8, "removal_blocks": 0}}
WIDTH_PRUNED = {"init": "pruned", "target_params": "50%", "pruning": {"calibration_blocks": 8, "removal_blocks": 0}}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, teacher_dir, corpus_file):
    """The demo's student shape (the teacher depth-pruned by Block Influence), distilled for 2 steps."""
    return distilled(teacher_dir, corpus_file, tmp_path_factory.mktemp("demo") / "run", DEMO_SHAPED)


def test_demo_shaped_student_is_a_llama_folder_without_pocketlm(tmp_path, demo_run):
    res, ours = demo_run
    folder = Path(res.student_dir)
    assert model_type(folder) == "llama" and res.student_format == hf_export.FolderFormat("llama")
    assert res.to_dict()["student_format"] == {"model_type": "llama", "reason": None}
    ids, theirs = clean_logits(tmp_path, folder, "LlamaForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(theirs, ours(ids).logits, **TOL)


def test_lm_eval_hf_model_reads_the_student_folder_without_pocketlm(tmp_path, demo_run):
    res, ours = demo_run
    requests = [["The cat sat", " on the mat."], ["Rain falls on the", " hills and the rivers"],
                ["Bread is baked from flour,", " water, salt and yeast"]]
    out = tmp_path / "lm_eval.json"
    run_clean(LM_EVAL_LOADER, Path(res.student_dir), out, json.dumps(requests), cwd=tmp_path)
    got = json.loads(out.read_text())
    assert got["class"] == "LlamaForCausalLM"
    brute = copy.deepcopy(ours).double()  # float64; the fixture's model stays fp32
    for (context, continuation), score in zip(got["tokens"], got["loglikelihood"]):
        assert context and continuation
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(brute(ids).logits[0, :-1], dim=-1)  # position i predicts token i + 1
        want = sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(continuation))
        assert score == pytest.approx(want, abs=2e-5)  # fp32 against float64, a few tokens


def test_width_pruned_student_is_a_llama_folder(tmp_path, teacher_dir, corpus_file):
    res, ours = distilled(teacher_dir, corpus_file, tmp_path / "run", WIDTH_PRUNED)
    folder = Path(res.student_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] < 32  # the teacher's is 32
    ids, theirs = clean_logits(tmp_path, folder, "LlamaForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(theirs, ours(ids).logits, **TOL)


def test_topk_moe_student_is_a_mixtral_folder_without_pocketlm(tmp_path, teacher_dir, corpus_file):
    student = {"init": "teacher_layers", "num_layers": 2,  # experts made unlike, so routing matters
               "moe": {"router": "topk_softmax", "num_experts": 4, "top_k": 2, "upcycle_noise": 0.5}}
    res, ours = distilled(teacher_dir, corpus_file, tmp_path / "run", student)
    folder = Path(res.student_dir)
    assert model_type(folder) == "mixtral" and res.student_format == hf_export.FolderFormat("mixtral")
    ids, theirs = clean_logits(tmp_path, folder, "MixtralForCausalLM")
    with torch.no_grad():
        torch.testing.assert_close(theirs, ours(ids).logits, **TOL)


@pytest.mark.parametrize("student, why", [
    ({"init": "random", "num_layers": 2, "position_scheme": "alibi"}, "position_scheme is 'alibi'"),
    ({"init": "teacher_layers", "num_layers": 2, "moe": {"router": "switch", "num_experts": 4, "top_k": 1}},
     "moe.router is 'switch'"),
    ({"init": "teacher_layers", "num_layers": 2,
      "moe": {"router": "topk_softmax", "num_experts": 4, "top_k": 2, "num_shared_experts": 1}},
     "moe.num_shared_experts is 1; Mixtral has no shared experts"),
], ids=["alibi", "switch-router", "shared-experts"])
def test_a_student_nothing_standard_holds_is_pocketlm_with_the_reason(tmp_path, teacher_dir, corpus_file, student,
                                                                      why):
    from pocketlm.models.load import load_model

    with pytest.warns(UserWarning, match="written in pocketlm's layout") as caught:
        res, ours = distilled(teacher_dir, corpus_file, tmp_path / "run", student)
    assert any(why in str(w.message) for w in caught)
    assert res.student_format.model_type == "pocketlm" and why in res.student_format.reason
    assert why in res.to_dict()["student_format"]["reason"]  # what `pocketlm distill` prints
    folder = Path(res.student_dir)
    assert model_type(folder) == "pocketlm" and not [p for p in folder.iterdir() if p.name.startswith(".") and
                                                     p.name != ".pocketlm.json"]
    loaded, _ = load_model(folder)  # pocketlm's loader reads it back
    ids = torch.randint(3, 200, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, **TOL)


def tiny_student(tokenizer) -> PocketLMForCausalLM:
    from pocketlm.models.student import PocketLMConfig

    torch.manual_seed(0)
    return PocketLMForCausalLM(PocketLMConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)).eval()


def broken_llama_writer(monkeypatch, damage) -> None:
    """`_llama_writer` whose folder is then damaged by `damage(folder)`."""
    real = hf_export._llama_writer

    def writer(model, dtype):
        write = real(model, dtype)

        def write_model(folder):
            write(folder)
            damage(folder)
        return write_model

    monkeypatch.setattr(hf_export, "_llama_writer", writer)


def assert_fell_back(folder, layout, student, says: str) -> None:
    """Saved in pocketlm's layout with the reason, nothing of the candidate left, and the student's logits."""
    assert layout.model_type == "pocketlm" and says in layout.reason
    assert model_type(folder) == "pocketlm" and not (folder / ".llama").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PocketLMForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, **TOL)


def test_a_standard_folder_that_does_not_reload_exactly_falls_back(tmp_path, tokenizer, monkeypatch):
    """The safety net behind the structural checks: the written folder is reloaded and compared."""
    student = tiny_student(tokenizer)
    exact, layout = hf_export.save_student_folder(student, tokenizer, tmp_path / "exact")
    assert layout == hf_export.FolderFormat("llama") and model_type(exact) == "llama"

    def drift(folder):  # a Llama config that drifts from the student's (a field the checks miss)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 10.0,
                                                        "rope_parameters": {"rope_type": "default",
                                                                            "rope_theta": 10.0}}))

    broken_llama_writer(monkeypatch, drift)
    folder, layout = hf_export.save_student_folder(student, tokenizer, tmp_path / "drifted")
    assert_fell_back(folder, layout, student, "the llama folder reloads to logits up to")


def test_a_standard_folder_that_does_not_load_at_all_falls_back(tmp_path, tokenizer, monkeypatch):
    """A reader that raises on the written folder costs the standard layout, never the trained student."""
    student = tiny_student(tokenizer)
    broken_llama_writer(monkeypatch, lambda folder: (folder / "model.safetensors").write_bytes(b"not safetensors"))
    folder, layout = hf_export.save_student_folder(student, tokenizer, tmp_path / "broken")
    assert_fell_back(folder, layout, student, "does not reload in transformers")
