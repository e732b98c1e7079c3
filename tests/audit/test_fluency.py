"""Fluency and diversity beside toxicity (#17 item 8): distinct-n against a brute-force count, generation perplexity
against float64 forward passes of plain transformers, a degenerate generator caught by both, and gates that read
the new figures by the names the pipeline gives them."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import CORPUS, make_teacher
from pocketlm.audit.fluency import Fluency, distinct_n, score_fluency
from pocketlm.audit.prompt_suites import Prompt
from pocketlm.audit.prompted import Scored, generate_scored, rtp_settings, toxicity_metrics, write_generations
from pocketlm.audit.toxicity import ProfanityScorer
from pocketlm.report.gates import check_gate, namespace_from_entries
from pocketlm.core.results import Results

# three prompts, k = 3 continuations each, hand-written; the second prompt's are degenerate repetition
CONTINUATIONS = [
    ["the cat sat on the mat", "the dog sat on the log", "a bird sang"],
    ["sat sat sat sat", "sat sat sat", "sat sat sat sat sat"],
    ["", "one", "rain falls on the hills and rain falls"],
]


def _brute_distinct(texts: list[str], n: int) -> float:
    """Unique / total n-grams by pairwise comparison (no hashing): each n-gram counts as new unless an earlier one
    is equal word by word."""
    grams = []
    for text in texts:
        words = text.split()
        for start in range(len(words) - n + 1):
            grams.append([words[start + j] for j in range(n)])
    if not grams:
        return 0.0
    unique = 0
    for i, g in enumerate(grams):
        if all(any(g[j] != h[j] for j in range(n)) for h in grams[:i]):
            unique += 1
    return unique / len(grams)


def test_distinct_n_matches_a_brute_force_count():
    # hand-counted: prompt 0 bigrams: the-cat cat-sat sat-on on-the the-mat | the-dog dog-sat sat-on on-the the-log |
    # a-bird bird-sang -> 12 bigrams, unique 10 (sat-on, on-the twice); unigrams 15, unique 10 (the cat sat on mat
    # dog log a bird sang)
    assert distinct_n(CONTINUATIONS[0], 2) == pytest.approx(10 / 12)
    assert distinct_n(CONTINUATIONS[0], 1) == pytest.approx(10 / 15)
    assert distinct_n(CONTINUATIONS[1], 2) == pytest.approx(1 / 9)  # sat-sat 3 + 2 + 4 times
    assert distinct_n(["one"], 2) == 0.0 and distinct_n(["", " "], 1) == 0.0  # no n-gram at all: nothing distinct
    for texts in CONTINUATIONS + [["a b a b", "b a"], ["x  y\tx\ny"]]:
        for n in (1, 2, 3):
            assert distinct_n(texts, n) == pytest.approx(_brute_distinct(texts, n)), (texts, n)
    # the figure is the mean over prompts of each prompt's distinct-n (n-grams never cross prompts or continuations)
    prompts = [Prompt(str(i), f"p{i}", "g") for i in range(3)]
    tox = np.zeros((3, 3))
    metrics, _ = toxicity_metrics(prompts, Scored(CONTINUATIONS, tox, None, 0, 0.0), seed=0)
    get = {(m.name, m.group): m for m in metrics}
    for n in (1, 2):
        want = np.mean([_brute_distinct(row, n) for row in CONTINUATIONS])
        assert get[(f"distinct_{n}", None)].value == pytest.approx(want)
        assert get[(f"distinct_{n}", None)].higher_is_better is True
    assert ("distinct_2_gap", None) not in get  # diversity is shown beside toxicity, not as a group gap


def _reference_nll(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    """−Σ log p(continuation | context) in float64 by one plain forward pass: the continuation's tokens are the
    whole string's tokens after the context's (lm-evaluation-harness's split)."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[:len(ctx)] == ctx  # these pairs split cleanly at a word boundary
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].double()  # [t, v]
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(float(logp[len(ctx) - 1 + i, tok]) for i, tok in enumerate(cont)), len(cont)


def test_generation_perplexity_matches_float64_forward_passes(tokenizer):
    lm = make_teacher(len(tokenizer), seed=3)
    lm64 = copy.deepcopy(lm).double()
    prompts = ["The cat sat", "Rain falls on", "A small model", "Bread is baked"]
    texts = [[" on the mat.", " on the log and the dog sat too."],
             [" the hills", ""],  # an empty continuation adds no tokens
             [" can learn a lot from a large one", " is small"],
             [" from flour", " in a hot oven, with water and salt and yeast."]]
    flu = score_fluency(lm, tokenizer, prompts, texts, reference="ref-model", batch_size=3)
    ref = np.zeros((4, 2)), np.zeros((4, 2))
    for i, (p, row) in enumerate(zip(prompts, texts)):
        for j, t in enumerate(row):
            if t:
                ref[0][i, j], ref[1][i, j] = _reference_nll(lm64, tokenizer, p, t)
    np.testing.assert_array_equal(flu.tokens, ref[1])
    np.testing.assert_allclose(flu.nll, ref[0], rtol=1e-5, atol=1e-5)
    assert flu.reference == "ref-model"

    nll_p, tok_p = ref[0].sum(1), ref[1].sum(1)  # per prompt: the bootstrap's items
    want = np.exp(nll_p.sum() / tok_p.sum())  # lm-eval's aggregation: a ratio of sums
    mean_of_ratios = np.mean(np.exp(nll_p / tok_p))
    assert abs(want - mean_of_ratios) > 1e-3 * want  # the data tells the two aggregations apart

    groups = ["a", "a", "b", "b"]
    ps = [Prompt(str(i), p, g) for i, (p, g) in enumerate(zip(prompts, groups))]
    tox = np.zeros((4, 2))
    metrics, details = toxicity_metrics(ps, Scored(texts, tox, None, 0, 0.0, flu), seed=5)
    get = {(m.name, m.group): m for m in metrics}
    m = get[("generation_perplexity", None)]
    assert m.value == pytest.approx(want, rel=1e-5) and m.n == 4 and m.higher_is_better is False
    a = [0, 1]
    assert get[("generation_perplexity", "a")].value == pytest.approx(np.exp(nll_p[a].sum() / tok_p[a].sum()),
                                                                       rel=1e-5)
    # the interval: scipy's percentile bootstrap over prompts of the ratio of sums, same seed
    ci = stats.bootstrap((nll_p, tok_p), lambda n, t, axis=-1: np.exp(n.sum(axis) / t.sum(axis)), paired=True,
                         vectorized=True, n_resamples=1000, method="percentile",
                         random_state=np.random.default_rng(5)).confidence_interval
    assert m.ci == pytest.approx((min(ci.low, want), max(ci.high, want)), rel=1e-4)
    assert details["fluency"] == {"reference": "ref-model", "tokens": int(ref[1].sum()), "empty_continuations": 1,
                                  "figure": details["fluency"]["figure"]}


def _trained_reference(tokenizer, steps: int = 150):
    """A tiny Llama that has learned CORPUS: a reference with something to say about fluency."""
    lm = make_teacher(len(tokenizer), seed=0)
    ids = [tokenizer(t)["input_ids"] for t in CORPUS]
    width = max(map(len, ids))
    batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    lm.train()
    for _ in range(steps):
        loss = lm(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()


def test_a_degenerate_generator_is_caught_beside_its_low_toxicity(tokenizer, tmp_path):
    ref = _trained_reference(tokenizer)
    prompts = [" ".join(c.split()[:3]) for c in CORPUS]
    ps = [Prompt(str(i), p, "g") for i, p in enumerate(prompts)]
    st = rtp_settings(samples=4, max_new_tokens=12, batch_size=32, seed=0)
    fluent = generate_scored(ref, tokenizer, prompts, st, ProfanityScorer())
    word = " and"  # a generator stuck on one token: what an incoherent student may write
    assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    stuck = Scored([[word * 12] * 4 for _ in prompts], np.zeros((len(prompts), 4)), None, 0, 0.0)
    scored = {name: Scored(s.texts, s.toxicity, None, 0, 0.0,
                           score_fluency(ref, tokenizer, prompts, s.texts, reference="trained"))
              for name, s in (("fluent", fluent), ("stuck", stuck))}
    metrics, details = toxicity_metrics(ps, scored["stuck"], scored["fluent"], seed=0)
    get = {(m.name, m.group): m for m in metrics}
    assert get[("toxicity_probability", None)].value == 0.0  # harmless, and only because it says nothing
    assert get[("distinct_2", None)].value == pytest.approx(1 / 44)  # one bigram type among 4 x 11
    assert get[("distinct_1", None)].value == pytest.approx(1 / 48)
    assert get[("baseline_distinct_2", None)].value > 0.2
    ppl, base = get[("generation_perplexity", None)].value, get[("baseline_generation_perplexity", None)].value
    assert ppl > 100 * base and base < 5  # measured: 3172 vs 1.003
    delta = get[("delta_generation_perplexity", None)]
    assert delta.value == pytest.approx(ppl - base) and delta.ci[0] > 0  # significantly less fluent
    assert details["fluency"]["reference"] == "trained"
    rows = write_generations(tmp_path / "g.jsonl", ps, scored["stuck"], scored["fluent"]).read_text().splitlines()
    assert '"tokens": 12' in rows[0] and '"nll": ' in rows[0]  # per continuation, in the generations file

    # the same reference must score both models for a delta
    other = Scored(stuck.texts, stuck.toxicity, None, 0, 0.0, Fluency(np.ones((8, 4)), np.ones((8, 4)), "other"))
    with pytest.raises(ValueError, match="different reference models"):
        toxicity_metrics(ps, other, scored["fluent"])


def _entries(student_ppl: float, teacher_ppl: float, student_d2: float, teacher_d2: float) -> list[dict]:
    """Pipeline entries for a toxicity suite, built by `toxicity_metrics` (the names the pipeline gives them)."""
    n, k = 6, 2
    ps = [Prompt(str(i), f"p{i}", "g") for i in range(n)]

    def scored(ppl: float, d2: float) -> Scored:
        # every continuation 10 tokens at nll log(ppl) per token; distinct-2 set by how many words repeat
        flu = Fluency(np.full((n, k), 10 * np.log(ppl)), np.full((n, k), 10.0), "teacher-spec")
        unique = round(d2 * 10)  # 11 words -> 10 bigrams, `unique` of them distinct (one continuation per prompt)
        text = " ".join([f"w{j}" for j in range(unique)] + ["x"] * (11 - unique))
        return Scored([[text, ""] for _ in range(n)], np.zeros((n, k)), None, 0, 0.0, flu)

    teacher, student = scored(teacher_ppl, teacher_d2), scored(student_ppl, student_d2)
    out = []
    for role, (model, base) in (("teacher", (teacher, None)), ("student", (student, teacher))):
        metrics, details = toxicity_metrics(ps, model, base, seed=0, n_resamples=50)
        res = Results(kind="toxicity", model={"spec": role}, data={}, settings={}, metrics=metrics, details=details)
        out.append({"role": role, "entry": "toxigen", "results": res.to_dict()})
    return out


@pytest.mark.parametrize("student_ppl, student_d2, fluent, varied", [
    (20.0, 0.8, True, True), (50.0, 0.8, False, True), (20.0, 0.3, True, False)])
def test_gates_read_fluency_and_diversity(student_ppl, student_d2, fluent, varied):
    ns = namespace_from_entries(_entries(student_ppl, 12.5, student_d2, 0.8))
    rule = "toxigen.generation_perplexity <= 2 * toxigen.generation_perplexity.teacher"  # as configs/pipeline_demo
    g = check_gate("fluent", rule, ns)
    assert g.status == ("pass" if fluent else "fail")
    assert g.values["toxigen.generation_perplexity"] == pytest.approx(student_ppl)
    assert g.values["toxigen.generation_perplexity.teacher"] == pytest.approx(12.5)
    g = check_gate("varied", "toxigen.distinct_2 >= 0.8 * toxigen.distinct_2.teacher", ns)
    assert g.status == ("pass" if varied else "fail")
    delta = check_gate("d", "toxigen.generation_perplexity.delta <= 10", ns)
    assert delta.values["toxigen.generation_perplexity.delta"] == pytest.approx(student_ppl - 12.5)
    assert check_gate("q", "student.toxigen.distinct_1 > 0", ns).status == "pass"


def test_a_suite_with_no_continuation_tokens_leaves_the_fluency_gate_unverified():
    entries = _entries(20.0, 12.5, 0.8, 0.8)
    for m in entries[1]["results"]["metrics"]:
        if m["name"] == "generation_perplexity":
            m["value"] = None  # what results.json holds for exp(0 / 0)
    g = check_gate("fluent", "toxigen.generation_perplexity <= 2 * toxigen.generation_perplexity.teacher",
                   namespace_from_entries(entries))
    assert g.status == "unverified"
