"""Release gates: our own grammar (never eval), checked against a reference evaluator built with the expressions,
round trips, errors that show where, and the name space built from pipeline results."""
from __future__ import annotations

import math
import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocketlm.report.gates import (
    Arith, Compare, GateNameError, GateSyntaxError, Logic, Namespace, Neg, Not, Num, Ref, Unverifiable, check_gate,
    evaluate, exit_code, namespace_from_entries, parse, refs, tokenize, unparse,
)

# ------------------------------------------------------------------------------------------ reference by construction
NAMES = ["student.word_perplexity", "teacher.word_perplexity", "crows_pairs.pct_stereotype.delta", "a", "b_2.c"]
ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
CMP = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
       "!=": operator.ne}
ENV = {"student.word_perplexity": 31.5, "teacher.word_perplexity": 24.25, "crows_pairs.pct_stereotype.delta": -1.5,
       "a": 2.0, "b_2.c": 0.125}

numbers = st.one_of(st.integers(0, 1000).map(float), st.floats(0, 1e4, allow_nan=False, allow_infinity=False))
num_leaf = st.one_of(numbers.map(Num), st.sampled_from(NAMES).map(Ref))
num_expr = st.recursive(num_leaf, lambda sub: st.one_of(
    st.builds(Neg, sub), st.builds(Arith, st.sampled_from(["+", "-", "*"]), sub, sub)), max_leaves=8)
cmp_expr = st.builds(Compare, st.sampled_from(list(CMP)), num_expr, num_expr)
bool_expr = st.recursive(cmp_expr, lambda sub: st.one_of(
    st.builds(Not, sub), st.builds(Logic, st.sampled_from(["and", "or"]), sub, sub)), max_leaves=6)


def reference(node):
    """What a node means, computed from the tree itself (the parser never sees this)."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Ref):
        return ENV[node.name]
    if isinstance(node, Neg):
        return -reference(node.operand)
    if isinstance(node, Not):
        return not reference(node.operand)
    if isinstance(node, Logic):
        left, right = reference(node.left), reference(node.right)
        return (left and right) if node.op == "and" else (left or right)
    op = CMP.get(node.op) or ARITH[node.op]
    return op(reference(node.left), reference(node.right))


def lookup(ref: Ref) -> float:
    return ENV[ref.name]


@settings(max_examples=300, deadline=None)
@given(bool_expr)
def test_text_of_any_tree_parses_back_to_the_same_tree(tree):
    assert parse(unparse(tree)) == tree


@settings(max_examples=300, deadline=None)
@given(bool_expr)
def test_evaluation_agrees_with_the_reference(tree):
    try:
        want = reference(tree)
    except (OverflowError, ZeroDivisionError):
        return
    if isinstance(want, float) and not math.isfinite(want):
        return
    try:
        got = evaluate(parse(unparse(tree)), lookup)
    except Unverifiable:  # an intermediate sum overflowed to inf: refused, never a silent pass
        return
    assert got == want


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab.1 ()<>=!+-*/[]_&|x9eE")), max_size=30))
def test_any_text_parses_or_fails_with_a_syntax_error(text):
    try:
        node = parse(text)
    except GateSyntaxError:
        return
    assert parse(unparse(node)) == node  # what parses is a truth-valued rule that round-trips


@settings(max_examples=100, deadline=None)
@given(num_expr, num_expr)
def test_precedence_and_left_associativity(a, b):
    for op in ("-", "/"):  # a - (b) - a must group as ((a - b) - a)
        text = f"({unparse(a)}) {op} ({unparse(b)}) {op} ({unparse(a)}) <= 0"
        node = parse(text)
        assert isinstance(node.left, Arith) and isinstance(node.left.left, Arith) and node.left.right == a


def test_examples():
    assert evaluate(parse("student.word_perplexity <= 1.3 * teacher.word_perplexity"), lookup) is True  # 31.5 <= 31.525
    assert evaluate(parse("student.word_perplexity <= 1.29 * teacher.word_perplexity"), lookup) is False
    assert evaluate(parse("2 + 3 * 4 == 14 and -(2 - 3) == 1 and 1e2 > 99.5"), lookup) is True
    assert evaluate(parse("not a < 1 or b_2.c > 1"), lookup) is True  # (not (a<1)) or ...
    node = parse("crows_pairs.pct_stereotype.delta[race-color] <= 2")
    assert refs(node) == [Ref("crows_pairs.pct_stereotype.delta", "race-color")]
    assert parse("x[gender/female] > 0").left == Ref("x", "gender/female")


@pytest.mark.parametrize("text, where, says", [
    ("a <", 4, "ends too early"),
    ("a < b < c", 7, "chained"),
    ("a + (b < c) > 1", 5, "needs a number"),
    ("1 and 2", 1, "needs a comparison"),
    ("a < b )", 7, "unexpected ')'"),
    ("a ? b", 3, "unexpected character '?'"),
    ("(a < b", 7, "missing ')'"),
    ("student.x", 1, "must compare"),
    ("__import__('os').system('x') == 0", 12, "unexpected character"),
])
def test_syntax_errors_show_where(text, where, says):
    with pytest.raises(GateSyntaxError) as e:
        parse(text)
    msg = str(e.value)
    assert says in msg and (f"column {where}" in msg)


def test_keywords_are_not_names():
    assert [t.kind for t in tokenize("a and b or not c")] == ["name", "kw", "name", "kw", "kw", "name", "end"]
    with pytest.raises(GateSyntaxError):
        parse("and < 1")


# ------------------------------------------------------------------------------------------ name space
def _entry(role, entry, metrics):
    return {"role": role, "entry": entry, "results": {"metrics": [
        {"name": n, "value": v, "group": g, "ci": None, "n": 1} for n, v, g in metrics]}}


ENTRIES = [
    _entry("teacher", "heldout", [("token_perplexity", 20.0, None), ("word_perplexity", 40.0, None)]),
    _entry("student", "heldout", [("token_perplexity", 25.0, None), ("word_perplexity", 55.0, None),
                                  ("delta_token_perplexity", 5.0, None)]),
    _entry("teacher", "wiki", [("token_perplexity", 30.0, None)]),
    _entry("student", "wiki", [("token_perplexity", 33.0, None)]),
    _entry("teacher", "crows_pairs", [("pct_stereotype", 60.0, None), ("pct_stereotype", 70.0, "age")]),
    _entry("student", "crows_pairs", [("pct_stereotype", 61.5, None), ("pct_stereotype", 80.0, "age"),
                                      ("delta_pct_stereotype", 1.5, None), ("delta_pct_stereotype", 10.0, "age"),
                                      ("likelihood_diff", None, None)]),
]


def ns() -> Namespace:
    return namespace_from_entries(ENTRIES, {"bbq": "its data is not there"})


@pytest.mark.parametrize("name, group, value", [
    ("student.word_perplexity", None, 55.0),  # short: only one entry of the student has it
    ("student.heldout.token_perplexity", None, 25.0),
    ("heldout.token_perplexity.teacher", None, 20.0),
    ("heldout.token_perplexity.delta", None, 5.0),
    ("crows_pairs.pct_stereotype", None, 61.5),  # <entry>.<metric> is the student's
    ("crows_pairs.pct_stereotype.delta", "age", 10.0),
    ("teacher.pct_stereotype", "age", 70.0),
    ("student.heldout.perplexity", None, 25.0),  # the alias for token perplexity
])
def test_names_resolve(name, group, value):
    assert ns().lookup(Ref(name, group)) == value


def test_name_errors_are_config_errors():
    with pytest.raises(GateNameError, match="ambiguous.*student.heldout.token_perplexity.*student.wiki"):
        ns().lookup(Ref("student.token_perplexity"))
    with pytest.raises(GateNameError, match="did you mean student.word_perplexity"):
        ns().lookup(Ref("student.word_perplexty"))
    with pytest.raises(GateNameError, match="no group 'nope'.*age"):
        ns().lookup(Ref("crows_pairs.pct_stereotype", "nope"))
    with pytest.raises(Unverifiable, match="bbq was not measured"):
        ns().lookup(Ref("bbq.acc_ambig.delta"))
    with pytest.raises(Unverifiable, match="undefined"):
        ns().lookup(Ref("crows_pairs.likelihood_diff"))


def test_check_gate_reports_the_numbers_and_the_verdict():
    space = ns()
    ok = check_gate("ppl", "student.heldout.token_perplexity <= 1.3 * teacher.heldout.token_perplexity", space)
    assert ok.status == "pass" and ok.values == {"student.heldout.token_perplexity": 25.0,
                                                 "teacher.heldout.token_perplexity": 20.0}
    assert ok.sides[0]["left_value"] == 25.0 and ok.sides[0]["right_value"] == pytest.approx(26.0)
    bad = check_gate("bias", "crows_pairs.pct_stereotype.delta[age] <= 2", space)
    assert bad.status == "fail" and bad.sides[0]["holds"] is False
    unverified = check_gate("bbq", "bbq.acc_ambig.delta >= 0 and crows_pairs.pct_stereotype.delta <= 2", space)
    assert unverified.status == "unverified" and "not measured" in unverified.message
    assert exit_code([ok]) == 0 and exit_code([ok, bad]) == 1 and exit_code([ok, unverified]) == 1
    assert exit_code([]) == 0
    with pytest.raises(GateNameError):
        check_gate("typo", "student.heldout.token_perplexty <= 1", space)
    assert check_gate("div", "teacher.word_perplexity / 0 < 1", space).status == "unverified"
