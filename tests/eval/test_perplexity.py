"""Perplexity against brute-force references written from the definitions, and against lm-eval's windows.

Tolerances: log-likelihood sums agree to math.isclose(rel_tol=1e-6) (references use fp64 log-softmax on fp32
logits, one unpadded forward per token or window); token/word/byte counts are exact; bf16 vs fp32 is loose and
stated in its test.
"""
from __future__ import annotations

import math
import random
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pocketlm.eval.perplexity import (
    PerplexityResult,
    block_perplexity,
    count_words,
    default_max_length,
    perplexity,
    prefix_token_id,
    rolling_windows,
    strided_windows,
)

REL_TOL = 1e-6
WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "away", "big", "red", "small", "blue"]
WORDS += [f"w{i}" for i in range(80)] + [".", ","]  # 96 words + 3 specials: vocab 99


def make_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "mat." -> "mat", "." : more tokens than words
    kwargs = {"bos_token": "<s>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]", **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def make_doc(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS[:-2]) + (rng.choice([".", ","]) if rng.random() < 0.2 else "") for _ in range(n_words)]
    return " ".join(words)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(0)
    return [make_doc(rng, n) for n in (3, 11, 19, 8, 1)]


def ids(tokenizer, doc: str) -> list[int]:
    return tokenizer(doc, add_special_tokens=False)["input_ids"]


def logprob(model, context: list[int], target: int) -> float:
    with torch.no_grad():
        return model(torch.tensor([context])).logits[0, -1].double().log_softmax(-1)[target].item()


# ---------------------------------------------------------------- references written from the definitions


def lm_eval_context(tokens: list[int], i: int, max_length: int, prefix: int) -> list[int]:
    """The context lm-eval's disjoint rolling windows give token i, stated directly.

    Window 0 predicts tokens [0, L) and sees the prefix token plus every earlier token. Window w >= 1 predicts
    tokens [wL, min(n, (w+1)L)); its model input is the L tokens that end right before the window's *last*
    predicted token, so token i sees tokens[last - L : i].
    """
    if i < max_length:
        return [prefix] + tokens[:i]
    last = min(len(tokens), (i // max_length + 1) * max_length) - 1
    return tokens[last - max_length : i]


def brute_force_rolling(model, tokens: list[int], max_length: int, prefix: int) -> float:
    """One forward per token, on exactly the context lm-eval's definition gives it."""
    return math.fsum(logprob(model, lm_eval_context(tokens, i, max_length, prefix), t) for i, t in enumerate(tokens))


def transformers_guide_loop(model, tokens: list[int], max_length: int, stride: int, prefix: int) -> tuple[float, int]:
    """The loop of the transformers "Perplexity of fixed-length models" guide, over [prefix] + tokens.

    The guide's window is `max_length` tokens including the last one, whose logit is unused; ours gives the model
    at most `max_length` *inputs* (as lm-eval does), so the guide's window here is max_length + 1 tokens. Scored
    tokens are counted as the labels that survive the model's internal shift (the guide's `num_valid - batch`
    undercounts by one on every window after the first).
    """
    seq = torch.tensor([[prefix, *tokens]])
    seq_len, window = seq.size(1), max_length + 1
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end  # tokens not scored by an earlier window
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss.double().item()
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_scored += scored
        prev_end = end
        if end == seq_len:
            break
    return -nll_sum, n_scored


# ---------------------------------------------------------------- windows


def test_windows_match_lm_eval_golden_case():
    # lm-eval's tests/test_utils.py::test_get_rolling_token_windows_v1 (range(34), prefix -100, L=10,
    # context_len=1), after make_disjoint_window.
    expected = [
        ([-100], list(range(0, 10))),
        ([9], list(range(10, 20))),
        ([19], list(range(20, 30))),
        (list(range(23, 30)), list(range(30, 34))),
    ]
    assert rolling_windows(list(range(34)), -100, 10) == expected


@pytest.mark.parametrize("n, max_length", [(0, 4), (1, 4), (4, 4), (5, 4), (9, 4), (13, 5), (7, 1)])
def test_rolling_windows_predict_each_token_once(n, max_length):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, -1, max_length)
    assert [t for _, cont in windows for t in cont] == tokens
    for ctx, cont in windows:
        assert ctx and len(ctx) + len(cont) <= max_length + 1  # the model never sees more than L tokens


def test_windows_match_lm_eval_when_installed():
    utils = pytest.importorskip(
        "lm_eval.utils", reason="peer library lm-evaluation-harness not installed; install with .[bench]"
    )
    rng = random.Random(3)
    for n in (0, 1, 2, 7, 10, 11, 33, 64):
        tokens = [rng.randrange(1000) for _ in range(n)]
        for max_length in (1, 2, 5, 10, 32):
            theirs = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(tokens, prefix_token=-7, max_seq_len=max_length, context_len=1)
            ]
            assert rolling_windows(tokens, -7, max_length) == [(list(a), list(b)) for a, b in theirs]


# ---------------------------------------------------------------- disjoint (lm-eval) perplexity


def test_short_document_is_one_forward_of_prefix_and_tokens(model, tokenizer, docs):
    doc = docs[1]
    tokens = ids(tokenizer, doc)
    seq = [tokenizer.bos_token_id] + tokens
    with torch.no_grad():
        logprobs = model(torch.tensor([seq[:-1]])).logits[0].double().log_softmax(-1)
    expected = logprobs.gather(-1, torch.tensor(tokens)[:, None]).sum().item()
    got = perplexity(model, tokenizer, [doc], max_length=32, progress=False)
    assert math.isclose(got.loglikelihood, expected, rel_tol=REL_TOL)
    assert got.tokens == len(tokens) and got.documents == 1


def test_long_documents_match_brute_force_windows(model, tokenizer, docs):
    max_length = 5  # every doc but the shortest spans several windows; windows of all docs share batches
    got = perplexity(model, tokenizer, docs, max_length=max_length, batch_size=3, progress=False)
    prefix = tokenizer.bos_token_id
    expected = math.fsum(brute_force_rolling(model, ids(tokenizer, d), max_length, prefix) for d in docs)
    assert math.isclose(got.loglikelihood, expected, rel_tol=REL_TOL)
    assert got.tokens == sum(len(ids(tokenizer, d)) for d in docs)  # every token counted once
    assert got.tokens > sum(count_words(d) for d in docs)  # punctuation tokens: tokens and words differ


def test_prefix_is_bos_else_eos(model, docs):
    with_bos, without_bos = make_tokenizer(), make_tokenizer(with_bos=False)
    assert prefix_token_id(with_bos) == with_bos.bos_token_id
    assert prefix_token_id(without_bos) == without_bos.eos_token_id
    got = perplexity(model, without_bos, [docs[2]], max_length=6, progress=False)
    expected = brute_force_rolling(model, ids(without_bos, docs[2]), 6, without_bos.eos_token_id)
    assert math.isclose(got.loglikelihood, expected, rel_tol=REL_TOL)


# ---------------------------------------------------------------- strided (transformers guide) perplexity


@pytest.mark.parametrize("stride", [1, 2, 3, 5])
def test_stride_matches_transformers_guide_loop(model, tokenizer, docs, stride):
    max_length = 5
    got = perplexity(model, tokenizer, docs, max_length=max_length, stride=stride, batch_size=4, progress=False)
    ll, n = 0.0, 0
    for doc in docs:
        doc_ll, doc_n = transformers_guide_loop(model, ids(tokenizer, doc), max_length, stride, tokenizer.bos_token_id)
        ll, n = ll + doc_ll, n + doc_n
    assert math.isclose(got.loglikelihood, ll, rel_tol=REL_TOL)
    assert got.tokens == n


def test_stride_equal_to_max_length_is_back_to_back_windows(model, tokenizer):
    # stride == L gives the same windows as lm-eval's disjoint form except the last, short one, which lm-eval
    # back-fills with context and the guide does not; so the two agree exactly when n <= L or L divides n.
    tokens = list(range(3, 3 + 13))
    assert strided_windows(tokens, 1, 5, 5)[:-1] == rolling_windows(tokens, 1, 5)[:-1]
    assert strided_windows(tokens, 1, 5, 5)[-1] == (tokens[9:10], tokens[10:])  # one token of context
    assert rolling_windows(tokens, 1, 5)[-1] == (tokens[7:10], tokens[10:])  # L + 1 tokens in all
    for n in (4, 5, 10, 15):
        tokens = list(range(3, 3 + n))
        assert strided_windows(tokens, 1, 5, 5) == rolling_windows(tokens, 1, 5)

    rng = random.Random(7)
    doc = make_doc(rng, 40)
    doc_ids = ids(tokenizer, doc)
    max_length = len(doc_ids) // 3  # L divides n (trimmed below) so the two definitions coincide
    doc = tokenizer.decode(doc_ids[: 3 * max_length])
    assert len(ids(tokenizer, doc)) == 3 * max_length
    disjoint = perplexity(model, tokenizer, [doc], max_length=max_length, progress=False)
    strided = perplexity(model, tokenizer, [doc], max_length=max_length, stride=max_length, progress=False)
    assert math.isclose(strided.loglikelihood, disjoint.loglikelihood, rel_tol=REL_TOL)


def test_stride_out_of_range_is_an_error(model, tokenizer, docs):
    for stride in (0, 6):
        with pytest.raises(ValueError, match="stride"):
            perplexity(model, tokenizer, docs, max_length=5, stride=stride, progress=False)


# ---------------------------------------------------------------- results and aggregation


def test_results_combine_by_sums(model, tokenizer, docs):
    a, b = docs[:2], docs[2:]
    whole = perplexity(model, tokenizer, docs, max_length=5, progress=False)
    parts = perplexity(model, tokenizer, a, max_length=5, progress=False) + perplexity(
        model, tokenizer, b, max_length=5, progress=False
    )
    per_doc = sum(perplexity(model, tokenizer, [d], max_length=5, progress=False) for d in docs)
    for combined in (parts, per_doc):
        assert math.isclose(combined.loglikelihood, whole.loglikelihood, rel_tol=REL_TOL)
        assert (combined.tokens, combined.words, combined.bytes, combined.documents) == (
            whole.tokens, whole.words, whole.bytes, whole.documents,
        )
    # corpus figures come from the sums, not from averaging per-document perplexities
    assert math.isclose(whole.word_perplexity, math.exp(-whole.loglikelihood / whole.words), rel_tol=1e-12)
    assert math.isclose(whole.byte_perplexity, math.exp(-whole.loglikelihood / whole.bytes), rel_tol=1e-12)
    assert math.isclose(whole.bits_per_byte, -whole.loglikelihood / (whole.bytes * math.log(2)), rel_tol=1e-12)
    mean_of_ratios = sum(perplexity(model, tokenizer, [d], max_length=5, progress=False).token_perplexity for d in docs)
    assert not math.isclose(whole.token_perplexity, mean_of_ratios / len(docs), rel_tol=1e-3)


def test_words_and_bytes_counted_as_lm_eval_wikitext(model, tokenizer):
    doc = " the cat sat.\n\nthe café dog "  # leading/trailing whitespace and a non-ASCII byte pair
    assert count_words(doc) == len(re.split(r"\s+", doc)) == 8  # 6 words + the empty ends re.split keeps
    got = perplexity(model, tokenizer, [doc], max_length=8, progress=False)
    assert (got.words, got.bytes) == (8, len(doc.encode("utf-8"))) and got.bytes == len(doc) + 1


def test_to_dict_has_sums_and_derived_figures():
    r = PerplexityResult(loglikelihood=-20.0, tokens=10, words=4, bytes=25, documents=2)
    d = r.to_dict()
    assert d["loglikelihood"] == -20.0 and d["tokens"] == 10 and d["documents"] == 2
    assert math.isclose(d["token_perplexity"], math.exp(2.0)) and math.isclose(d["word_perplexity"], math.exp(5.0))
    assert math.isclose(d["bits_per_byte"], 20.0 / (25 * math.log(2)))
    blocks_only = PerplexityResult(loglikelihood=-20.0, tokens=10, words=0, bytes=0, documents=1)
    assert math.isnan(blocks_only.word_perplexity) and math.isnan(blocks_only.bits_per_byte)
    assert blocks_only.to_dict()["word_perplexity"] is None  # NaN is not valid JSON


# ---------------------------------------------------------------- edge cases, dtypes, blocks


def test_empty_inputs(model, tokenizer, docs):
    with pytest.raises(ValueError, match="at least one document"):
        perplexity(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="empty after tokenization"):
        perplexity(model, tokenizer, ["", "   "], progress=False)
    with_empty = perplexity(model, tokenizer, ["", docs[1], ""], max_length=5, progress=False)
    alone = perplexity(model, tokenizer, [docs[1]], max_length=5, progress=False)
    assert with_empty == alone  # empty documents are skipped and counted nowhere


def test_default_max_length_resolves_as_lm_eval_does(model, tokenizer):
    assert default_max_length(model) == 64
    big = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=1, max_position_embeddings=4096))
    assert default_max_length(big) == 4096  # lm-eval uses the config's value, uncapped
    try:
        from lm_eval.models.utils import resolve_max_length
    except ImportError:
        return
    assert default_max_length(big, tokenizer) == resolve_max_length(big.config, tokenizer, default=2048)


def test_max_length_beyond_the_model_context_is_refused_before_scoring(model, tokenizer, docs, monkeypatch):
    import pocketlm.eval.perplexity as ppl

    monkeypatch.setattr(ppl, "score_continuations", lambda *a, **k: pytest.fail("model work before the check"))
    with pytest.raises(ValueError, match="longer than the model's context of 64 tokens"):
        perplexity(model, tokenizer, docs, max_length=65, progress=False)


def test_token_budget_batches_give_the_same_sums(model, tokenizer, docs):
    from pocketlm.eval.loglik import _batches

    plain = perplexity(model, tokenizer, docs, max_length=6, batch_size=64, max_batch_tokens=None, progress=False)
    budget = perplexity(model, tokenizer, docs, max_length=6, batch_size=64, max_batch_tokens=7, progress=False)
    assert math.isclose(plain.loglikelihood, budget.loglikelihood, rel_tol=REL_TOL)
    from pocketlm.eval.packing import plain_row

    rows = [plain_row(i, [1] + [5] * (n - 1), 1, [5]) for i, n in enumerate((6, 6, 3, 2, 2, 1))]  # longest first
    assert _batches(list(range(6)), rows, 8, 12) == [[0, 1], [2, 3, 4, 5]]  # 2 x 6 then 4 x 3 padded
    assert _batches(list(range(6)), rows, 3, None) == [[0, 1, 2], [3, 4, 5]]
    assert _batches(list(range(6)), rows, 8, 4) == [[0], [1], [2], [3, 4], [5]]  # a row over budget runs alone


def test_wikitext_detokenizer_equals_lm_eval_and_counts_original_words(model, tokenizer):
    from pocketlm.eval.perplexity import document_perplexities, wikitext_detokenize

    doc = " = Title = \n The cat 's mat , 1 @,@ 000 @-@ odd ( a dog ) . \n = = Part = = \n"
    try:
        from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
    except ImportError:
        wikitext_detokenizer = None
    if wikitext_detokenizer is not None:
        assert wikitext_detokenize(doc) == wikitext_detokenizer({"page": doc})
    assert wikitext_detokenize(doc) == " = Title =\nThe cat's mat, 1,000-odd (a dog).\n== Part ==\n"
    (res,) = document_perplexities(model, tokenizer, [doc], max_length=8, detokenize="wikitext", progress=False)
    assert res.words == count_words(doc) and res.bytes == len(doc.encode())  # counted before detokenising
    detok_ids = ids(tokenizer, wikitext_detokenize(doc))
    assert res.tokens == len(detok_ids)
    assert math.isclose(res.loglikelihood, brute_force_rolling(model, detok_ids, 8, tokenizer.bos_token_id),
                        rel_tol=REL_TOL)
    with pytest.raises(ValueError, match="unknown detokenizer 'nope'; valid: wikitext"):
        document_perplexities(model, tokenizer, [doc], detokenize="nope")


def test_metrics_carry_bootstrap_intervals_of_the_ratio_of_sums(model, tokenizer, docs):
    from pocketlm.eval.perplexity import document_perplexities, perplexity_metrics

    per_doc = document_perplexities(model, tokenizer, docs, max_length=6, progress=False)
    total = perplexity(model, tokenizer, docs, max_length=6, progress=False)
    assert sum(per_doc, PerplexityResult(0.0, 0, 0, 0, 0)) == total
    metrics = {m.name: m for m in perplexity_metrics(per_doc)}
    assert metrics["word_perplexity"].value == total.word_perplexity
    assert metrics["bits_per_byte"].value == total.bits_per_byte
    for m in metrics.values():
        assert m.n == len(docs) and m.higher_is_better is False
        lo, hi = m.ci
        assert lo <= m.value <= hi and lo < hi


def test_bf16_model_close_to_fp32(model, tokenizer, docs):
    fp32 = perplexity(model, tokenizer, docs, max_length=8, progress=False)
    bf16_model = LlamaForCausalLM(model.config).eval()
    bf16_model.load_state_dict(model.state_dict())
    bf16_model.to(torch.bfloat16)
    bf16 = perplexity(bf16_model, tokenizer, docs, max_length=8, progress=False)
    assert bf16.tokens == fp32.tokens
    # loose: bf16 keeps ~3 significant digits per logit; mean NLL per token within 1 % of fp32's (measured: 0.02 %)
    nll32, nll16 = -fp32.loglikelihood / fp32.tokens, -bf16.loglikelihood / bf16.tokens
    assert abs(nll16 - nll32) <= 0.01 * nll32


def test_block_perplexity_matches_hf_loss(model):
    torch.manual_seed(1)
    blocks = torch.randint(0, model.config.vocab_size, (5, 9))
    got = block_perplexity(model, blocks, batch_size=2)
    with torch.no_grad():
        mean_nll = model(blocks, labels=blocks).loss.double().item()  # HF shifts: predicts tokens 1..L-1
    assert got.tokens == 5 * 8 and got.documents == 5
    assert math.isclose(-got.loglikelihood / got.tokens, mean_nll, rel_tol=REL_TOL)
    assert math.isclose(got.token_perplexity, math.exp(mean_nll), rel_tol=REL_TOL)
    assert math.isnan(got.word_perplexity) and math.isnan(got.byte_perplexity)
    with pytest.raises(ValueError, match="blocks"):
        block_perplexity(model, blocks[:, :1])


DETOK_RULES = ["the dogs ' toys", "/' 1/", "1 @-@ 2", "1 @,@ 000", "3 @.@ 5", "a : b", "a ; b", "a . b", "a ! b",
               "a ? b", "a , b", "( a b )", "[ a ]", "{ a }", '" a "', "x ' a ' y", "= = = = H = = = =",
               "= = = H = = =", "= = H = =", "5 \u00b0 C", "a \nb", "a\n b", "x N y", "cat 's"]


@pytest.mark.parametrize("text", DETOK_RULES + [" ".join(DETOK_RULES), "\n".join(DETOK_RULES)])
def test_wikitext_detokenizer_equals_lm_eval_rule_by_rule(text):
    """Each of lm-eval's 24 rules on a string that triggers it (mutation testing found 31 of its mutants
    surviving the one-document test above), and all of them together."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from pocketlm.eval.perplexity import wikitext_detokenize

    assert wikitext_detokenize(text) == wikitext_detokenizer({"page": text})
    assert wikitext_detokenize(text) != text or text.startswith("/'")  # every rule but one changes its string


def test_wikitext_detokenizer_equals_lm_eval_on_the_whole_test_set():
    from conftest import SHARED_DATA
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from pocketlm.eval.perplexity import wikitext_detokenize

    path = SHARED_DATA / "wikitext2" / "wiki.test.raw"
    if not path.is_file():
        pytest.skip(f"needs ../shared/data: {path} is absent")
    raw = path.read_text(encoding="utf-8")
    assert wikitext_detokenize(raw) == wikitext_detokenizer({"page": raw})
