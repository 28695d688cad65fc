"""Whitelist expression grammar: text -> sympy, without eval/exec/sympify/parse_expr.

Grammar: numbers (ints, decimals, exponents; parsed exactly as rationals), names, + - * / **,
unary +/-, parentheses, calls of the functions in FUNCTIONS with one positional argument,
constants pi and E. Python's ``ast`` module only tokenises; every node type outside the
whitelist is rejected, and sympy objects are built directly from the tree.
"""

import ast
import keyword
import builtins
import re
import decimal
from fractions import Fraction

import sympy as sp

FUNCTIONS = {
    "sqrt": sp.sqrt, "exp": sp.exp, "log": sp.log,
    "sin": sp.sin, "cos": sp.cos, "tan": sp.tan,
    "sinh": sp.sinh, "cosh": sp.cosh, "tanh": sp.tanh,
    "atan": sp.atan, "asin": sp.asin, "acos": sp.acos,
    "expm1": lambda x: sp.exp(x) - 1, "log1p": lambda x: sp.log(1 + x),
}
CONSTANTS = {"pi": sp.pi, "E": sp.E}
RESERVED = set(FUNCTIONS) | set(CONSTANTS) | {"t"}

MAX_LENGTH = 4000        # characters in one expression
MAX_NODES = 2000         # syntax-tree nodes in one expression
MAX_DECIMAL_EXPONENT = 400   # |power of ten| of a number literal (float64 spans 1e-324..1e308)
MAX_EXPONENT = 256       # |integer exponent| of a numeric power, guards 10**10**10
MAX_EXP_ARG = 10 ** 5    # |numeric argument| of exp, sinh, cosh: guards exp(exp(exp(100))), which hangs evalf
MAX_LITERAL = 100        # characters of one number (a 3000-digit decimal broke the file writer's int -> str)
GROWING = ("exp", "sinh", "cosh", "expm1")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class ExprError(ValueError):
    """Problem in one expression; the caller adds file and key."""


def check_name(name):
    """Raise ExprError unless ``name`` is a safe identifier for a user symbol."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ExprError(f"invalid name {name!r}: use letters, digits and _, starting with a letter")
    if keyword.iskeyword(name) or hasattr(builtins, name) or name in RESERVED:
        raise ExprError(f"name {name!r} is reserved")


def exact_number(text):
    """Exact rational from a decimal literal such as '0.04', '1e-6', '3' (no eval)."""
    if len(text) > MAX_LITERAL:
        raise ExprError(f"number longer than {MAX_LITERAL} characters: {text[:20]}...")
    try:
        size = decimal.Decimal(text.replace("_", "")).adjusted()   # the leading digit's power of ten, not expanded
        frac = Fraction(text.replace("_", "")) if abs(size) <= MAX_DECIMAL_EXPONENT else None
    except (ValueError, ZeroDivisionError, ArithmeticError) as exc:
        raise ExprError(f"not a number: {text!r}") from exc
    if frac is None:    # 1.0e+5000 expanded to 5001 digits, past Python's int -> str limit in the file writer
        raise ExprError(f"number {text!r} out of range (|decimal exponent| <= {MAX_DECIMAL_EXPONENT})")
    return sp.Rational(frac.numerator, frac.denominator)


def parse(text, names):
    """Parse ``text`` into a sympy expression; ``names`` maps allowed names to sympy objects."""
    if isinstance(text, bool):
        raise ExprError("expected an expression, got a boolean")
    if isinstance(text, int):
        return sp.Integer(text)
    if not isinstance(text, str):
        raise ExprError(f"expected an expression, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ExprError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    if not text.isascii():                  # Python folds look-alikes (NFKC): fullwidth 'ｔ' would be read as t
        bad = next(c for c in text if not c.isascii())
        raise ExprError(f"non-ASCII character {bad!r} (U+{ord(bad):04X}) in {text!r}: names are [A-Za-z][A-Za-z0-9_]*")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        msg = getattr(exc, "msg", None) or type(exc).__name__
        raise ExprError(f"syntax error in {text!r}: {msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ExprError(f"expression has more than {MAX_NODES} terms")
    try:
        return _build(tree.body, text, names)
    except RecursionError:
        raise ExprError("expression nested too deeply") from None


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _build(node, text, names):
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ExprError(f"only numbers are allowed as literals, found {node.value!r}")
        return exact_number(ast.get_source_segment(text, node))
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id in FUNCTIONS:
            raise ExprError(f"function {node.id!r} used without an argument")
        raise ExprError(f"unknown name {node.id!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _build(node.operand, text, names)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _build(node.left, text, names), _build(node.right, text, names)
        if isinstance(node.op, ast.Div) and right.is_zero:
            raise ExprError("division by zero")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, expo = _build(node.left, text, names), _build(node.right, text, names)
        if expo.is_number and (not expo.is_real or abs(expo) > MAX_EXPONENT):
            raise ExprError(f"exponent {expo} out of range (|exponent| <= {MAX_EXPONENT})")
        if base.is_zero and expo.is_number and expo.is_negative:
            raise ExprError("division by zero (0 to a negative power)")
        return base ** expo
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            what = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
            raise ExprError(f"call of {what!r} is not allowed; functions: {', '.join(sorted(FUNCTIONS))}")
        if len(node.args) != 1 or node.keywords:
            raise ExprError(f"{node.func.id}() takes exactly one positional argument")
        arg = _build(node.args[0], text, names)
        if node.func.id in GROWING and arg.is_number and arg.is_real and abs(sp.N(arg, 15)) > MAX_EXP_ARG:
            raise ExprError(f"{node.func.id}() of {sp.N(arg, 6)} is out of range (|argument| <= {MAX_EXP_ARG})")
        value = FUNCTIONS[node.func.id](arg)
        if value.has(sp.zoo, sp.nan) or (value.is_number and value.is_real is False):
            raise ExprError(f"{node.func.id}({arg}) is undefined")
        return value
    raise ExprError(f"forbidden syntax ({type(node).__name__}) in {text!r}")
