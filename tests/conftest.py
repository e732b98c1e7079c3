"""Shared fixtures: a tiny real tokenizer and a tiny real Llama teacher, built in-test (no downloads)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "The cat sat on the mat. The dog sat on the log.",
    "A small model can learn a lot from a large one when it is taught well.",
    "Rain falls on the hills and the rivers carry it to the sea.",
    "Numbers like one, two and three are the first words of counting.",
    "The teacher writes and the student reads, then the student writes too.",
    "Bread is baked from flour, water, salt and yeast in a hot oven.",
    "Trains run on rails between cities and stop at every small station.",
    "The moon goes around the earth and the earth goes around the sun.",
]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS, with BOS/EOS/PAD, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_teacher(vocab_size: int, *, layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama teacher saved as a Hugging Face folder (config.json + model.safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("teacher")
    model = make_teacher(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A .txt corpus of blank-line separated documents, long enough for a few blocks."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    docs = [" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(3)) for i in range(24)]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
