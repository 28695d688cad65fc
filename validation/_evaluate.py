"""Numeric evaluation of the spec's sympy expressions, independent of derive's evaluator.

A small tree walk with a function table: mpmath scalars (reference, >= 40 digits) or numpy
float64 arrays (the scipy cross-check). No lambdify/exec: the expressions come from user specs.
"""

import math

import mpmath
import numpy as np
import sympy as sp

_MP = {sp.exp: mpmath.exp, sp.log: mpmath.log, sp.sin: mpmath.sin, sp.cos: mpmath.cos,
       sp.tan: mpmath.tan, sp.sinh: mpmath.sinh, sp.cosh: mpmath.cosh, sp.tanh: mpmath.tanh,
       sp.atan: mpmath.atan, sp.asin: mpmath.asin, sp.acos: mpmath.acos, sp.Abs: abs}
_NP = {sp.exp: np.exp, sp.log: np.log, sp.sin: np.sin, sp.cos: np.cos, sp.tan: np.tan,
       sp.sinh: np.sinh, sp.cosh: np.cosh, sp.tanh: np.tanh, sp.atan: np.arctan,
       sp.asin: np.arcsin, sp.acos: np.arccos, sp.Abs: np.abs}


def _compile(expr, funcs, number):
    """Closure env -> value for ``expr`` (compiled once, evaluated many times)."""
    if expr.is_Symbol:
        name = expr.name
        return lambda env: env[name]
    if expr.is_number:
        value = number(expr)
        return lambda env: value
    args = [_compile(a, funcs, number) for a in expr.args]
    if expr.is_Add:
        def add(env):
            out = args[0](env)
            for a in args[1:]:
                out = out + a(env)
            return out
        return add
    if expr.is_Mul:
        def mul(env):
            out = args[0](env)
            for a in args[1:]:
                out = out * a(env)
            return out
        return mul
    if expr.is_Pow:
        base, expo = args
        return lambda env: base(env) ** expo(env)
    fn, arg = funcs[expr.func], args[0]
    return lambda env: fn(arg(env))


def _mp_number(e):
    return mpmath.mpf(e.p) / e.q if e.is_Rational else mpmath.mpf(sp.N(e, mpmath.mp.dps + 10))


_cache = {}


def _compiled(M, kind):
    M = M if isinstance(M, sp.MatrixBase) else sp.Matrix([[M]])
    # constants are rounded at compile time, so the mpmath precision is part of the key
    key = (kind, mpmath.mp.prec if kind == "mp" else 53, M.shape, tuple(M))
    if key not in _cache:
        funcs, number = (_MP, _mp_number) if kind == "mp" else (_NP, float)
        _cache[key] = [[_compile(M[i, j], funcs, number) for j in range(M.shape[1])] for i in range(M.shape[0])]
    return _cache[key]


def mp_value(expr, **env):
    """Evaluate at the current mpmath precision."""
    return _compiled(expr, "mp")[0][0](env)


def mp_matrix(M, **env):
    rows = _compiled(M, "mp")
    return mpmath.matrix([[f(env) for f in row] for row in rows])


def np_value(expr, **env):
    return _compiled(expr, "np")[0][0](env)


def np_matrix(M, **env):
    return np.array([[f(env) for f in row] for row in _compiled(M, "np")], dtype=float)
