"""Release gates: rules over results, in a small grammar of our own (never Python's ``eval``).

A gate is one boolean expression, e.g. ``student.token_perplexity <= 1.3 * teacher.token_perplexity`` or
``crows_pairs.pct_stereotype.delta <= 2 and toxigen.toxicity_probability.delta <= 0.02``::

    gate   := or
    or     := and ("or" and)*
    and    := not ("and" not)*
    not    := "not" not | cmp
    cmp    := sum [("<=" | "<" | ">=" | ">" | "==" | "!=") sum]     (one comparison: a < b < c is refused)
    sum    := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := "-" unary | atom
    atom   := NUMBER | NAME ["[" GROUP "]"] | "(" gate ")"

A NAME is a dotted path (``student.word_perplexity``); ``[group]`` selects a slice (``crows_pairs.pct_stereotype
[race-color]``). Types are checked when the rule is parsed: arithmetic takes numbers, ``and``/``or``/``not`` take
truth values, and the whole rule must be a truth value. Names are looked up in a :class:`Namespace` built from
results: a name that no result has is a config error (it would otherwise pass or fail silently); a name whose
figure is undefined, or whose suite was skipped, leaves the gate *unverified*, which is not a pass.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Union

from pocketlm.config import ConfigError


class GateSyntaxError(ConfigError):
    """A rule that does not parse or type-check; the message shows where."""


class GateNameError(ConfigError):
    """A rule naming a result that does not exist (or names it ambiguously)."""


class Unverifiable(Exception):
    """A rule whose figures are undefined or were not measured; the gate is neither passed nor failed."""


# ---------------------------------------------------------------------------------------------------- tokens
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*(?:\[[^\]\[\n]+\])?)
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/|\(|\))
""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not"}
COMPARISONS = ("<=", "<", ">=", ">", "==", "!=")


@dataclass(frozen=True)
class Token:
    kind: str  # num | name | op | kw | end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    if not isinstance(text, str):
        raise GateSyntaxError(f"a gate rule must be text, got {type(text).__name__}")
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise GateSyntaxError(_where(text, pos, f"unexpected character {text[pos]!r}"))
        kind = m.lastgroup
        if kind != "ws":
            word = m.group()
            tokens.append(Token("kw" if kind == "name" and word in _KEYWORDS else kind, word, pos))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _where(text: str, pos: int, msg: str) -> str:
    return f"{msg} at column {pos + 1}:\n  {text}\n  {' ' * pos}^"


# ---------------------------------------------------------------------------------------------------- syntax tree
@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Ref:
    name: str
    group: str | None = None

    def __str__(self) -> str:
        return self.name + (f"[{self.group}]" if self.group is not None else "")


@dataclass(frozen=True)
class Neg:
    operand: "Node"


@dataclass(frozen=True)
class Arith:
    op: str  # + - * /
    left: "Node"
    right: "Node"


@dataclass(frozen=True)
class Compare:
    op: str  # one of COMPARISONS
    left: "Node"
    right: "Node"


@dataclass(frozen=True)
class Logic:
    op: str  # and | or
    left: "Node"
    right: "Node"


@dataclass(frozen=True)
class Not:
    operand: "Node"


Node = Union[Num, Ref, Neg, Arith, Compare, Logic, Not]
_BOOL = (Compare, Logic, Not)


def is_bool(node: Node) -> bool:
    return isinstance(node, _BOOL)


MAX_TOKENS = 256  # a real rule has a few dozen; bounds the depth of the trees that refs/unparse/evaluate recurse into
MAX_NESTING = 32  # '(', '-' and 'not' inside one another; bounds the parser's own recursion


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.tokens, self.i, self.depth = text, tokenize(text), 0, 0
        if len(self.tokens) > MAX_TOKENS + 1:  # + the end token
            raise self.error(f"the rule is longer than {MAX_TOKENS} tokens; split it into several gates",
                             self.tokens[MAX_TOKENS])

    def nested(self, tok: Token, operand: Callable[[], Node]) -> Node:
        """``operand()`` one level deeper, refused past MAX_NESTING (a RecursionError is not a syntax error)."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"the rule nests '(', '-' and 'not' more than {MAX_NESTING} levels deep", tok)
        try:
            return operand()
        finally:
            self.depth -= 1

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, msg: str, tok: Token | None = None) -> GateSyntaxError:
        tok = tok or self.peek()
        return GateSyntaxError(_where(self.text, tok.pos, msg))

    def expect_kind(self, node: Node, want_bool: bool, tok: Token, what: str) -> Node:
        if is_bool(node) != want_bool:
            kind = "a comparison (true/false)" if want_bool else "a number"
            raise self.error(f"{what} needs {kind}", tok)
        return node

    def gate(self) -> Node:
        node = self.or_()
        if self.peek().kind != "end":
            raise self.error(f"unexpected {self.peek().text!r}")
        return node

    def or_(self) -> Node:
        return self._logic("or", self.and_)

    def and_(self) -> Node:
        return self._logic("and", self.not_)

    def _logic(self, op: str, operand: Callable[[], Node]) -> Node:
        tok = self.peek()
        node = operand()
        while self.peek().kind == "kw" and self.peek().text == op:
            self.take()
            self.expect_kind(node, True, tok, f"'{op}'")
            tok = self.peek()
            node = Logic(op, node, self.expect_kind(operand(), True, tok, f"'{op}'"))
        return node

    def not_(self) -> Node:
        if self.peek().kind == "kw" and self.peek().text == "not":
            self.take()
            tok = self.peek()
            return Not(self.expect_kind(self.nested(tok, self.not_), True, tok, "'not'"))
        return self.cmp()

    def cmp(self) -> Node:
        tok = self.peek()
        left = self.sum()
        if self.peek().kind == "op" and self.peek().text in COMPARISONS:
            op = self.take().text
            self.expect_kind(left, False, tok, f"'{op}'")
            tok = self.peek()
            right = self.expect_kind(self.sum(), False, tok, f"'{op}'")
            if self.peek().kind == "op" and self.peek().text in COMPARISONS:
                raise self.error("chained comparisons are ambiguous; write 'a < b and b < c'")
            return Compare(op, left, right)
        return left

    def sum(self) -> Node:
        return self._arith(("+", "-"), self.term)

    def term(self) -> Node:
        return self._arith(("*", "/"), self.unary)

    def _arith(self, ops: tuple[str, ...], operand: Callable[[], Node]) -> Node:
        tok = self.peek()
        node = operand()
        while self.peek().kind == "op" and self.peek().text in ops:
            op = self.take().text
            self.expect_kind(node, False, tok, f"'{op}'")
            tok = self.peek()
            node = Arith(op, node, self.expect_kind(operand(), False, tok, f"'{op}'"))
        return node

    def unary(self) -> Node:
        if self.peek().kind == "op" and self.peek().text == "-":
            self.take()
            tok = self.peek()
            return Neg(self.expect_kind(self.nested(tok, self.unary), False, tok, "'-'"))
        return self.atom()

    def atom(self) -> Node:
        tok = self.take()
        if tok.kind == "num":
            return Num(float(tok.text))
        if tok.kind == "name":
            name, _, group = tok.text.partition("[")
            return Ref(name, group[:-1].strip() if group else None)
        if tok.kind == "op" and tok.text == "(":
            node = self.nested(tok, self.or_)
            if self.peek().text != ")" or self.peek().kind != "op":
                raise self.error("missing ')'")
            self.take()
            return node
        if tok.kind == "end":
            raise self.error("the rule ends too early: a number, a result name or '(' is missing", tok)
        raise self.error(f"unexpected {tok.text!r}: a number, a result name or '(' belongs here", tok)


def parse(text: str) -> Node:
    """Parse and type-check one rule; the result is a truth-valued expression."""
    if not isinstance(text, str) or not text.strip():
        raise GateSyntaxError("a gate rule must be a non-empty expression, e.g. 'student.x <= 1.2 * teacher.x'")
    node = _Parser(text).gate()
    if not is_bool(node):
        raise GateSyntaxError(_where(text, 0, "a gate must compare (<=, <, >=, >, ==, !=), not just compute a "
                                              "number"))
    return node


def refs(node: Node) -> list[Ref]:
    """Every result name a rule uses, in order, each once."""
    out: list[Ref] = []

    def walk(n: Node) -> None:
        if isinstance(n, Ref):
            if n not in out:
                out.append(n)
        elif isinstance(n, (Neg, Not)):
            walk(n.operand)
        elif isinstance(n, (Arith, Compare, Logic)):
            walk(n.left)
            walk(n.right)

    walk(node)
    return out


_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 5, "-": 5, "*": 6, "/": 6, "neg": 7, "atom": 8}


def unparse(node: Node) -> str:
    """The rule as text, parenthesised only where precedence needs it; ``parse(unparse(n)) == n``."""
    def prec(n: Node) -> int:
        if isinstance(n, (Logic, Arith)):
            return _PREC[n.op]
        return {Compare: _PREC["cmp"], Not: _PREC["not"], Neg: _PREC["neg"]}.get(type(n), _PREC["atom"])

    def wrap(n: Node, min_prec: int) -> str:
        s = unparse(n)
        return f"({s})" if prec(n) < min_prec else s

    if isinstance(node, Num):
        return repr(node.value)
    if isinstance(node, Ref):
        return str(node)
    if isinstance(node, Neg):
        return "-" + wrap(node.operand, _PREC["neg"])
    if isinstance(node, Not):
        return "not " + wrap(node.operand, _PREC["not"])
    p = prec(node)
    # left-associative: the right operand needs brackets at equal precedence; a comparison's operands are sums
    left_min, right_min = (p + 1, p + 1) if isinstance(node, Compare) else (p, p + 1)
    return f"{wrap(node.left, left_min)} {node.op} {wrap(node.right, right_min)}"


# ---------------------------------------------------------------------------------------------------- evaluation
Lookup = Callable[[Ref], float]


def evaluate(node: Node, lookup: Lookup) -> float | bool:
    """The rule's value; ``lookup`` raises GateNameError (no such result) or Unverifiable (undefined figure)."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Ref):
        return lookup(node)
    if isinstance(node, Neg):
        return -evaluate(node.operand, lookup)
    if isinstance(node, Not):
        return not evaluate(node.operand, lookup)
    if isinstance(node, Logic):  # both sides evaluated: every name is checked, whatever the first side says
        left, right = evaluate(node.left, lookup), evaluate(node.right, lookup)
        return (left and right) if node.op == "and" else (left or right)
    left, right = evaluate(node.left, lookup), evaluate(node.right, lookup)
    if isinstance(node, Compare):
        return {"<=": left <= right, "<": left < right, ">=": left >= right, ">": left > right,
                "==": left == right, "!=": left != right}[node.op]
    if node.op == "/" and right == 0:
        raise Unverifiable(f"division by zero in '{unparse(node)}'")
    value = {"+": left + right, "-": left - right, "*": left * right}[node.op] if node.op != "/" else left / right
    if not math.isfinite(value):
        raise Unverifiable(f"'{unparse(node)}' is not a finite number")
    return value


def comparisons(node: Node) -> list[Compare]:
    if isinstance(node, Compare):
        return [node]
    if isinstance(node, Not):
        return comparisons(node.operand)
    if isinstance(node, Logic):
        return comparisons(node.left) + comparisons(node.right)
    return []


# ---------------------------------------------------------------------------------------------------- namespace
@dataclass
class Namespace:
    """Result names → figures. ``values[(name, group)]`` is a number or None (undefined); ``ambiguous`` maps a
    short name to the qualified ones it could mean; ``unmeasured`` maps a scope to why it has no results."""

    values: dict[tuple[str, str | None], float | None] = field(default_factory=dict)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    unmeasured: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # last name segment → canonical (perplexity → ...)

    def add(self, name: str, group: str | None, value: float | None) -> None:
        self.values[(name, group)] = value

    def names(self) -> list[str]:
        return sorted({n for n, g in self.values if g is None})

    def _known(self, name: str) -> bool:
        return name in self.ambiguous or any(n == name for n, _ in self.values)

    def _canonical(self, name: str) -> str:
        """``name`` with an alias segment replaced (student.perplexity → student.token_perplexity), if that exists."""
        if self._known(name):
            return name
        parts = name.split(".")
        for i, part in enumerate(parts):
            alt = ".".join(parts[:i] + [self.aliases.get(part, part)] + parts[i + 1:])
            if alt != name and self._known(alt):
                return alt
        return name

    def lookup(self, ref: Ref) -> float:
        name = self._canonical(ref.name)
        if (name, ref.group) in self.values:
            value = self.values[(name, ref.group)]
            if value is None or not math.isfinite(value):
                raise Unverifiable(f"{ref} is undefined (no value was measured)")
            return float(value)
        for scope in name.split(".")[:2]:  # <entry>.… or <role>.<entry>.…
            if scope in self.unmeasured:
                raise Unverifiable(f"{ref}: {scope} was not measured ({self.unmeasured[scope]})")
        if name in self.ambiguous:
            raise GateNameError(f"{ref} is ambiguous; name one of: {', '.join(self.ambiguous[name])}")
        if self._known(name):
            groups = sorted(g for n, g in self.values if n == name and g is not None)
            raise GateNameError(f"{name} has no group {ref.group!r}; its groups are: {', '.join(groups)}")
        close = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise GateNameError(f"no result is named {ref}{hint} (names look like student.token_perplexity, "
                            f"<suite>.<metric>.delta; the report lists every one)")


@dataclass
class GateResult:
    name: str
    rule: str
    status: str  # pass | fail | unverified
    values: dict[str, float | None]  # each name the rule uses → its figure
    sides: list[dict]  # each comparison: left/right text and value, operator, outcome
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict:
        return {"name": self.name, "rule": self.rule, "status": self.status, "passed": self.passed,
                "values": self.values, "comparisons": self.sides, "message": self.message}


def check_gate(name: str, rule: str, namespace: Namespace) -> GateResult:
    """Evaluate one rule. A missing name raises GateNameError; undefined figures give status 'unverified'."""
    node = parse(rule)
    values: dict[str, float | None] = {}
    problems = []
    for ref in refs(node):
        try:
            values[str(ref)] = namespace.lookup(ref)
        except Unverifiable as e:
            values[str(ref)] = None
            problems.append(str(e))
    if problems:
        return GateResult(name, rule, "unverified", values, [], "; ".join(problems))
    lookup = namespace.lookup
    sides = []
    for cmp in comparisons(node):
        try:
            lv, rv = evaluate(cmp.left, lookup), evaluate(cmp.right, lookup)
            outcome = evaluate(cmp, lookup)
        except Unverifiable as e:
            return GateResult(name, rule, "unverified", values, sides, str(e))
        sides.append({"left": unparse(cmp.left), "left_value": lv, "op": cmp.op, "right": unparse(cmp.right),
                      "right_value": rv, "holds": bool(outcome)})
    try:
        ok = bool(evaluate(node, lookup))
    except Unverifiable as e:
        return GateResult(name, rule, "unverified", values, sides, str(e))
    return GateResult(name, rule, "pass" if ok else "fail", values, sides)


def exit_code(results: list[GateResult]) -> int:
    """0 when every gate passed (or there are none), 1 when any failed or could not be verified."""
    return 0 if all(r.passed for r in results) else 1


ALIASES = {"perplexity": "token_perplexity"}  # the spelling of the headline figure


def namespace_from_entries(entries: list[dict], skipped: dict[str, str] | None = None) -> Namespace:
    """Result names from a pipeline's (role, entry, results) list:

    * ``<role>.<entry>.<metric>`` — every metric of every result, ``delta_``/``baseline_`` ones included;
    * ``<role>.<metric>`` — the same where only one entry of that role has the metric (else it is ambiguous);
    * ``<entry>.<metric>`` — the student's figure; ``<entry>.<metric>.<role>`` — that role's;
      ``<entry>.<metric>.delta`` — the student's paired delta to the teacher (``delta_<metric>``);
    * any of them with ``[group]`` for a slice.
    """
    ns = Namespace(aliases=dict(ALIASES), unmeasured=dict(skipped or {}))
    short: dict[tuple[str, str | None], list[tuple[str, float | None]]] = {}
    for e in entries:
        role, entry = e["role"], e["entry"]
        for m in e["results"]["metrics"]:
            name, group, value = m["name"], m.get("group"), m.get("value")
            qualified = f"{role}.{entry}.{name}"
            ns.add(qualified, group, value)
            if name.startswith("delta_"):
                if role == "student":
                    ns.add(f"{entry}.{name[len('delta_'):]}.delta", group, value)
                continue
            if name.startswith("baseline_"):
                continue
            ns.add(f"{entry}.{name}.{role}", group, value)
            if role == "student":
                ns.add(f"{entry}.{name}", group, value)
            short.setdefault((f"{role}.{name}", group), []).append((qualified, value))
    for (name, group), found in short.items():
        if len(found) == 1:
            ns.add(name, group, found[0][1])
        else:
            ns.ambiguous[name] = sorted(q for q, _ in found)
    return ns
