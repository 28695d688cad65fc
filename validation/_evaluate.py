"""Numeric evaluation of the spec's sympy expressions, independent of derive's evaluator.

A small tree walk with one function table (``FUNCTIONS``): each sympy head maps to its mpmath
scalar form (reference, >= 40 digits) and its numpy float64 form (the scipy cross-check). No
lambdify/exec: the expressions come from user specs. The table has exactly the keys of
derive's MPFR table (derive/_hp.py FUNCS; tests/test_evaluators.py holds the two together);
anything else raises ``Unsupported`` with the function's name, never a KeyError.
"""

import functools

import mpmath
import numpy as np
import scipy.special as sc
import sympy as sp


class Unsupported(ValueError):
    """The expression holds a function neither evaluator knows (the spec loader refuses it first)."""


def _real(v):
    """mpmath result -> real mpf (nan where the value is genuinely complex)."""
    if isinstance(v, mpmath.mpc):
        return v.real if v.imag == 0 else mpmath.nan
    return v


def _mp_safe(fn):
    def call(*xs):
        try:
            return _real(fn(*xs))
        except (ValueError, ZeroDivisionError, ArithmeticError):
            return mpmath.nan
    return call


def _mp_sign(x):
    return mpmath.nan if mpmath.isnan(x) else mpmath.mpf(mpmath.sign(x))


def _np_recip(fn):
    def call(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            return fn(1.0 / np.asarray(x, dtype=float))
    return call


def _np_lowergamma(a, x):
    return sc.gammainc(a, x) * sc.gamma(a)


def _np_uppergamma(a, x):
    return sc.gammaincc(a, x) * sc.gamma(a)


def _np_expint(n, x):
    n = np.asarray(n, dtype=float)
    return np.where(n == np.round(n), sc.expn(np.round(n).astype(int), x), np.nan)


def _np_lambertw(x):
    w = sc.lambertw(x)
    return np.where(np.asarray(x) >= -np.exp(-1.0), w.real, np.nan)


def _np_li(x):
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, sc.expi(np.log(np.where(x > 0, x, 1.0))), np.where(x == 0, 0.0, np.nan))


def _np_loggamma(x):
    x = np.asarray(x, dtype=float)
    return np.where(sc.gammasgn(x) > 0, sc.gammaln(x), np.nan)


def _np_heaviside(x, h0=0.5):
    return np.heaviside(x, h0)


def _mp_heaviside(x, h0=mpmath.mpf("0.5")):
    return mpmath.mpf(1) if x > 0 else mpmath.mpf(0) if x < 0 else h0


# Markers for the structural heads (their arguments are not all numbers)
PIECEWISE, ITE, LOGIC_NOT = "piecewise", "ite", "not"


def _and(*a):
    return functools.reduce(np.logical_and, a)


def _or(*a):
    return functools.reduce(np.logical_or, a)


def _xor(*a):
    return functools.reduce(np.logical_xor, a)


# THE table: sympy head -> (mpmath scalar function, numpy float64 function) or a structural marker.
FUNCTIONS = {
    # elementary
    sp.exp: (mpmath.exp, np.exp), sp.log: (mpmath.log, np.log),
    sp.sin: (mpmath.sin, np.sin), sp.cos: (mpmath.cos, np.cos), sp.tan: (mpmath.tan, np.tan),
    sp.cot: (mpmath.cot, lambda x: 1 / np.tan(x)), sp.sec: (mpmath.sec, lambda x: 1 / np.cos(x)),
    sp.csc: (mpmath.csc, lambda x: 1 / np.sin(x)),
    sp.sinh: (mpmath.sinh, np.sinh), sp.cosh: (mpmath.cosh, np.cosh), sp.tanh: (mpmath.tanh, np.tanh),
    sp.coth: (mpmath.coth, lambda x: 1 / np.tanh(x)), sp.sech: (mpmath.sech, lambda x: 1 / np.cosh(x)),
    sp.csch: (mpmath.csch, lambda x: 1 / np.sinh(x)),
    sp.asin: (_mp_safe(mpmath.asin), np.arcsin), sp.acos: (_mp_safe(mpmath.acos), np.arccos),
    sp.atan: (mpmath.atan, np.arctan), sp.acot: (mpmath.acot, _np_recip(np.arctan)),
    sp.asec: (_mp_safe(mpmath.asec), _np_recip(np.arccos)), sp.acsc: (_mp_safe(mpmath.acsc), _np_recip(np.arcsin)),
    sp.asinh: (mpmath.asinh, np.arcsinh), sp.acosh: (_mp_safe(mpmath.acosh), np.arccosh),
    sp.atanh: (_mp_safe(mpmath.atanh), np.arctanh), sp.acoth: (_mp_safe(mpmath.acoth), _np_recip(np.arctanh)),
    sp.asech: (_mp_safe(mpmath.asech), _np_recip(np.arccosh)), sp.acsch: (mpmath.acsch, _np_recip(np.arcsinh)),
    sp.atan2: (mpmath.atan2, np.arctan2), sp.sinc: (mpmath.sinc, lambda x: np.sinc(np.asarray(x) / np.pi)),
    # piecewise-defined
    sp.Abs: (abs, np.abs), sp.sign: (_mp_sign, np.sign),
    sp.floor: (mpmath.floor, np.floor), sp.ceiling: (mpmath.ceil, np.ceil),
    sp.Heaviside: (_mp_heaviside, _np_heaviside),
    sp.Min: (lambda *a: min(a), lambda *a: functools.reduce(np.minimum, a)),
    sp.Max: (lambda *a: max(a), lambda *a: functools.reduce(np.maximum, a)),
    sp.Piecewise: PIECEWISE, sp.ITE: ITE,
    sp.re: (mpmath.re, np.real), sp.im: (mpmath.im, np.imag),
    # relations and logic
    sp.StrictGreaterThan: (lambda a, b: a > b, np.greater), sp.GreaterThan: (lambda a, b: a >= b, np.greater_equal),
    sp.StrictLessThan: (lambda a, b: a < b, np.less), sp.LessThan: (lambda a, b: a <= b, np.less_equal),
    sp.Equality: (lambda a, b: a == b, np.equal), sp.Unequality: (lambda a, b: a != b, np.not_equal),
    sp.And: (lambda *a: all(a), _and), sp.Or: (lambda *a: any(a), _or),
    sp.Xor: (lambda *a: sum(map(bool, a)) % 2 == 1, _xor), sp.Not: LOGIC_NOT,
    # special functions
    sp.erf: (mpmath.erf, sc.erf), sp.erfc: (mpmath.erfc, sc.erfc), sp.erfi: (mpmath.erfi, sc.erfi),
    sp.Ei: (mpmath.ei, sc.expi), sp.li: (_mp_safe(mpmath.li), _np_li),
    sp.Si: (mpmath.si, lambda x: sc.sici(x)[0]), sp.Ci: (_mp_safe(mpmath.ci), lambda x: sc.sici(x)[1]),
    sp.Shi: (mpmath.shi, lambda x: sc.shichi(x)[0]), sp.Chi: (_mp_safe(mpmath.chi), lambda x: sc.shichi(x)[1]),
    sp.fresnels: (mpmath.fresnels, lambda x: sc.fresnel(x)[0]),
    sp.fresnelc: (mpmath.fresnelc, lambda x: sc.fresnel(x)[1]),
    sp.gamma: (mpmath.gamma, sc.gamma), sp.loggamma: (_mp_safe(mpmath.loggamma), _np_loggamma),
    sp.uppergamma: (_mp_safe(mpmath.gammainc), _np_uppergamma),
    sp.lowergamma: (_mp_safe(lambda a, x: mpmath.gammainc(a, 0, x)), _np_lowergamma),
    sp.expint: (_mp_safe(mpmath.expint), _np_expint), sp.LambertW: (_mp_safe(mpmath.lambertw), _np_lambertw),
}


def _is_true(c):
    return bool(c) if not isinstance(c, np.ndarray) else None


def _compile(expr, side, number):
    """Closure env -> value for ``expr`` (compiled once, evaluated many times); side 0 mp, 1 np."""
    if expr.is_Symbol:
        name = expr.name
        return lambda env: env[name]
    if expr is sp.true or expr is sp.false:
        value = bool(expr)
        return lambda env: value
    if getattr(expr, "is_number", False) and not isinstance(expr, sp.logic.boolalg.Boolean):
        if expr.has(sp.I, sp.zoo, sp.nan, sp.oo, sp.exp_polar):
            raise Unsupported(f"non-real constant {expr}")
        value = number(expr)
        return lambda env: value
    if expr.is_Add:
        args = [_compile(a, side, number) for a in expr.args]

        def add(env):
            out = args[0](env)
            for a in args[1:]:
                out = out + a(env)
            return out
        return add
    if expr.is_Mul:
        exps = [a for a in expr.args if a.func is sp.exp]
        factors = expr.args if len(exps) < 2 else (       # exp(a) exp(b) as exp(a + b): no inf * 0
            [a for a in expr.args if a.func is not sp.exp] + [sp.exp(sp.Add(*(a.args[0] for a in exps)), evaluate=False)])
        args = [_compile(a, side, number) for a in factors]

        def mul(env):
            out = args[0](env)
            for a in args[1:]:
                out = out * a(env)
            return out
        return mul
    if expr.is_Pow:
        base, expo = (_compile(a, side, number) for a in expr.args)
        return lambda env: base(env) ** expo(env)
    entry = FUNCTIONS.get(expr.func)
    if entry is None:
        raise Unsupported(f"no evaluator for {expr.func.__name__} (in {expr})")
    if entry == PIECEWISE:
        pairs = [(_compile(e, side, number), _compile(c, side, number)) for e, c in expr.args]
        return lambda env: _piecewise(pairs, env, side)
    if entry == ITE:
        c, a, b = (_compile(x, side, number) for x in expr.args)
        return lambda env: _ite(c(env), a, b, env)
    if entry == LOGIC_NOT:
        a = _compile(expr.args[0], side, number)
        return lambda env: np.logical_not(a(env)) if side else not a(env)
    fn = entry[side]
    args = [_compile(a, side, number) for a in expr.args]
    if len(args) == 1:
        a, = args
        return lambda env: fn(a(env))
    return lambda env: fn(*(f(env) for f in args))


def _piecewise(pairs, env, side):
    return _select(pairs, env, side)


def _ite(c, a, b, env):
    if not isinstance(c, np.ndarray):
        return a(env) if c else b(env)
    return np.where(c, a(env), b(env))


def _select(pairs, env, side):
    """First pair whose condition holds; lazily for scalars, np.select for arrays; nan if none."""
    conds = []
    for value, cond in pairs:
        c = cond(env)
        if not isinstance(c, np.ndarray):
            if conds:                 # earlier array conditions: finish vectorised
                conds.append((value, np.full(np.shape(conds[0][1]), bool(c))))
                if c:
                    break
                continue
            if c:
                return value(env)
            continue
        conds.append((value, c))
    if not conds:
        return mpmath.nan if side == 0 else np.nan
    with np.errstate(all="ignore"):
        return np.select([np.asarray(c, dtype=bool) for _, c in conds], [np.asarray(v(env), dtype=float) for v, _ in conds], np.nan)


def _mp_number(e):
    return mpmath.mpf(e.p) / e.q if e.is_Rational else mpmath.mpf(sp.N(e, mpmath.mp.dps + 10))


_cache = {}


def _compiled(M, kind):
    rows = M.tolist() if isinstance(M, sp.MatrixBase) else [[M]]
    # constants are rounded at compile time, so the mpmath precision is part of the key
    key = (kind, mpmath.mp.prec if kind == "mp" else 53, tuple(map(tuple, rows)))
    if key not in _cache:
        side, number = (0, _mp_number) if kind == "mp" else (1, float)
        _cache[key] = [[_compile(e, side, number) for e in row] for row in rows]
    return _cache[key]


def mp_value(expr, /, **env):
    """Evaluate at the current mpmath precision (env: symbol name -> value)."""
    return _compiled(expr, "mp")[0][0](env)


def mp_matrix(M, /, **env):
    rows = _compiled(M, "mp")
    return mpmath.matrix([[f(env) for f in row] for row in rows])


def np_value(expr, /, **env):
    return _compiled(expr, "np")[0][0](env)


def np_matrix(M, /, **env):
    return np.array([[f(env) for f in row] for row in _compiled(M, "np")], dtype=float)
