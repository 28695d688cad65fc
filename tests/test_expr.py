"""The whitelist expression grammar: exact numbers, forbidden syntax, never eval."""

import builtins

import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

from derive._expr import ExprError, check_name, parse

t = sp.Symbol("t")
NAMES = {"t": t, "a": sp.Rational(1, 4)}


@pytest.mark.parametrize("text, expected", [
    ("0.04", sp.Rational(1, 25)),
    ("1e-6", sp.Rational(1, 10 ** 6)),
    ("2.5e3", sp.Integer(2500)),
    ("-a**2", -sp.Rational(1, 16)),
    ("sqrt(2*a)", sp.sqrt(2) / 2),
    ("expm1(t)", sp.exp(t) - 1),
    ("log1p(t)", sp.log(1 + t)),
    ("pi * E", sp.pi * sp.E),
    ("(t + 1) / 3", (t + 1) / 3),
])
def test_parse_is_exact(text, expected):
    assert sp.simplify(parse(text, NAMES) - expected) == 0


@pytest.mark.parametrize("text, fragment", [
    ("__import__('os')", "not allowed"),
    ("t.real", "forbidden syntax (Attribute)"),
    ("(lambda: 1)()", "not allowed"),
    ("lambda x: x", "forbidden syntax (Lambda)"),
    ("a[0]", "forbidden syntax (Subscript)"),
    ("'abc'", "only numbers"),
    ("open('x')", "not allowed"),
    ("exp(t, t)", "exactly one"),
    ("exp(x=t)", "exactly one"),
    ("[t for t in 1]", "forbidden syntax"),
    ("b + 1", "unknown name 'b'"),
    ("1 / 0", "division by zero"),
    ("t / (a - a)", "division by zero"),
    ("10**10**10", "exponent"),
    ("exp(exp(exp(100)))", "exp() of 2.68812E+43 is out of range"),   # sympy's evalf hung on it (or overflowed)
    ("sinh(exp(50))", "sinh() of 5.18471E+21 is out of range"),
    ("cosh(-1e6) * t", "cosh() of -1.00000E+6 is out of range"),
    ("expm1(2e5)", "expm1() of 200000 is out of range"),
    ("0." + "0" * 3000 + "1 + t", "number longer than 100 characters"),   # the file writer's int -> str refused it
    ("\uff53\uff51\uff52\uff54(\uff54)", "non-ASCII character"),     # fullwidth 'sqrt(t)': Python folds it to sqrt(t)
    ("sqrt(\U0001d41a * t)", "non-ASCII character '\U0001d41a'"),       # mathematical bold a -> a
    ("t if t else t", "forbidden syntax (IfExp)"),
    ("t == 1", "forbidden syntax (Compare)"),
    ("t // 2", "forbidden syntax"),
    ("log(0)", "undefined"),
    ("sqrt(-1)", "undefined"),
    ("", "empty"),
    ("1 +", "syntax error"),
    ("True", "only numbers"),
    ("exp", "without an argument"),
])
def test_forbidden(text, fragment):
    with pytest.raises(ExprError, match=None) as info:
        parse(text, NAMES)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["t", "pi", "exp", "lambda", "print", "_x", "1a", "a-b", "__class__"])
def test_bad_names(name):
    with pytest.raises(ExprError):
        check_name(name)


@pytest.fixture
def no_eval(monkeypatch):
    """Make eval/exec/sympify/parse_expr explode: the parser must not need them."""
    def boom(*a, **k):
        raise AssertionError("evaluated user text")
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    import sympy.parsing.sympy_parser as spp
    monkeypatch.setattr(spp, "parse_expr", boom)


def test_parser_never_evaluates(no_eval):
    assert parse("exp(-a * t) + 0.5", NAMES) == sp.exp(-t / 4) + sp.Rational(1, 2)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ta0123456789.e+-*/() _[]'\"=:,lambdxpqrs")), max_size=40))
def test_random_text_never_crashes(text):
    try:
        out = parse(text, NAMES)
    except ExprError:
        return
    assert isinstance(out, sp.Basic)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_unicode_never_crashes(text):
    try:
        parse(text, NAMES)
    except ExprError:
        pass
