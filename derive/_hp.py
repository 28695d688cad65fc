"""High-precision arrays: numpy object arrays of MPFR numbers (gmpy2), vectorised.

Precision policy (stated once, enforced here): every number the tables need is computed with
``PREC_BITS`` binary digits (about 60 significant decimal digits; the quadrature and ODE
tolerances ask for 40) and rounded to float64 exactly once, by ``to_float64``.

Why MPFR arrays rather than scalar mpmath: the per-coordinate families (BDM has 32 x 32
frequencies) need millions of evaluations; numpy's object-array loops call MPFR directly
(about 0.1 us per operation) where a Python loop over mpmath scalars costs 10-50 times more.
mpmath itself runs on the same GMP/MPFR integers when gmpy2 is installed; it stays the
independent reference in ``validation``.

Sympy expressions are compiled into closures over these arrays by walking the expression
tree (no lambdify, no exec): expressions come from user specs.
"""

import functools

import gmpy2
import numpy as np
import sympy as sp

PREC_BITS = 200
TOL = gmpy2.mpfr("1e-40", 200)

gmpy2.get_context().precision = PREC_BITS


class EvaluationError(ValueError):
    """A derived quantity is not finite (division by zero, log of a negative number, ...)."""


def mpf(x):
    """Exact MPFR copy of a Python float/int, or the correctly rounded value of a rational."""
    if isinstance(x, (sp.Rational, sp.Integer)):
        return gmpy2.mpfr(gmpy2.mpq(int(x.p), int(x.q)))
    if isinstance(x, float):
        return gmpy2.mpfr(x, 53)       # a double is exactly representable
    return gmpy2.mpfr(x)


def array(values):
    return np.array([mpf(v) for v in values], dtype=object)


def const(x, shape=()):
    out = np.empty(shape, dtype=object)
    out.fill(mpf(x) if not isinstance(x, gmpy2.mpfr) else x)
    return out


def zeros(shape):
    return const(gmpy2.mpfr(0), shape)


def eye(k, batch=()):
    out = zeros(batch + (k, k))
    for i in range(k):
        out[..., i, i] = gmpy2.mpfr(1)
    return out


def _ufunc(fn):
    return np.frompyfunc(fn, 1, 1)


FUNCS = {
    sp.exp: _ufunc(gmpy2.exp), sp.log: _ufunc(gmpy2.log),
    sp.sin: _ufunc(gmpy2.sin), sp.cos: _ufunc(gmpy2.cos), sp.tan: _ufunc(gmpy2.tan),
    sp.sinh: _ufunc(gmpy2.sinh), sp.cosh: _ufunc(gmpy2.cosh), sp.tanh: _ufunc(gmpy2.tanh),
    sp.atan: _ufunc(gmpy2.atan), sp.asin: _ufunc(gmpy2.asin), sp.acos: _ufunc(gmpy2.acos),
    sp.Abs: _ufunc(abs), sp.erf: _ufunc(gmpy2.erf), sp.erfc: _ufunc(gmpy2.erfc),
    sp.Ei: _ufunc(gmpy2.eint),
    sp.sign: _ufunc(lambda x: gmpy2.mpfr((x > 0) - (x < 0))),
}
SQRT = _ufunc(gmpy2.sqrt)
POW = np.frompyfunc(lambda a, b: a ** b, 2, 1)


class Unsupported(ValueError):
    """The expression contains a function this evaluator does not know (caller falls back)."""


def compile_expr(expr):
    """Closure env -> object array evaluating the sympy ``expr``; env maps symbol names to arrays."""
    if expr.is_Symbol:
        name = expr.name
        return lambda env: env[name]
    if expr.is_number:
        if expr.has(sp.I, sp.zoo, sp.nan, sp.oo):
            raise Unsupported(f"non-real constant {expr}")
        value = mpf(expr) if expr.is_Rational else gmpy2.mpfr(str(sp.N(expr, 70)))
        return lambda env: value
    args = [compile_expr(a) for a in expr.args]
    if expr.is_Add:
        return lambda env: functools.reduce(lambda acc, f: acc + f(env), args[1:], args[0](env))
    if expr.is_Mul:
        return lambda env: functools.reduce(lambda acc, f: acc * f(env), args[1:], args[0](env))
    if expr.is_Pow:
        base, expo = args
        e = expr.exp
        if e.is_Integer:
            n = int(e)
            if n >= 0:
                return lambda env: base(env) ** n
            return lambda env: 1 / (base(env) ** (-n))
        if e == sp.Rational(1, 2):
            return lambda env: _apply(SQRT, base(env))
        if e == -sp.Rational(1, 2):
            return lambda env: 1 / _apply(SQRT, base(env))
        return lambda env: _apply2(POW, base(env), expo(env))
    fn = FUNCS.get(expr.func)
    if fn is None or len(args) != 1:
        raise Unsupported(f"no high-precision evaluator for {expr.func}")
    arg = args[0]
    return lambda env: _apply(fn, arg(env))


def _apply(ufunc, x):
    out = ufunc(x)
    return out if isinstance(out, np.ndarray) else np.asarray(out, dtype=object)[()]


def _apply2(ufunc, x, y):
    out = ufunc(x, y)
    return out if isinstance(out, np.ndarray) else np.asarray(out, dtype=object)[()]


def compile_matrix(M):
    """Closure env, shape -> object array shape + (rows, cols) for a sympy Matrix."""
    entries = [[compile_expr(M[i, j]) for j in range(M.shape[1])] for i in range(M.shape[0])]

    def evaluate(env, shape):
        out = np.empty(shape + M.shape, dtype=object)
        for i, row in enumerate(entries):
            for j, f in enumerate(row):
                out[..., i, j] = np.broadcast_to(np.asarray(f(env), dtype=object), shape)
        return out
    return evaluate


# ----- small dense linear algebra on batches [..., k, k] -----------------------------------

def T(A):
    return np.swapaxes(A, -1, -2)


def inv(A):
    """Inverse of a batch [..., k, k] by Gauss-Jordan with partial pivoting per matrix."""
    shape = A.shape
    k = shape[-1]
    M = np.concatenate([A.reshape(-1, k, k), eye(k, (int(np.prod(shape[:-2], dtype=int)),))], axis=-1)
    n = M.shape[0]
    rows = np.arange(n)
    for c in range(k):
        piv = c + np.argmax(np.abs(M[:, c:, c]), axis=1).astype(int)
        pivot_rows = M[rows, piv].copy()
        M[rows, piv] = M[:, c]
        M[:, c] = pivot_rows
        p = M[:, c, c]
        if any(v == 0 for v in p):
            raise EvaluationError("singular matrix")
        M[:, c] = M[:, c] / p[:, None]
        for r in range(k):
            if r != c:
                M[:, r] = M[:, r] - M[:, r, c][:, None] * M[:, c]
    return M[:, :, k:].reshape(shape)


def cholesky(S, semidefinite=False):
    """Lower Cholesky factor of symmetric PSD batches [..., k, k]; zero columns where singular."""
    k = S.shape[-1]
    L = zeros(S.shape)
    zero = gmpy2.mpfr(0)
    scale = np.max(np.abs(S), axis=(-1, -2)) if S.size else None
    for j in range(k):
        d = S[..., j, j] - sum((L[..., j, m] ** 2 for m in range(j)), zero)
        if semidefinite:
            small = d <= scale * TOL
            d = np.where(small, zero, d)
        elif np.any(d <= 0):
            raise EvaluationError("matrix is not positive definite")
        ljj = _apply(SQRT, d)
        L[..., j, j] = ljj
        safe = np.where(ljj == 0, gmpy2.mpfr(1), ljj)
        for i in range(j + 1, k):
            v = S[..., i, j] - sum((L[..., i, m] * L[..., j, m] for m in range(j)), zero)
            L[..., i, j] = np.where(ljj == 0, zero, v / safe)
    return L


def sqrtm_spd(S):
    """Symmetric square root of one SPD matrix (numeric, via mpmath's eigensolver)."""
    import mpmath
    with mpmath.workprec(PREC_BITS):
        A = mpmath.matrix([[mpmath.mpf(str(v)) for v in row] for row in S.tolist()])
        E, Q = mpmath.eigsy(A)
        D = mpmath.diag([mpmath.sqrt(e) for e in E])
        out = Q * D * Q.T
        return np.array([[gmpy2.mpfr(str(out[i, j])) for j in range(out.cols)] for i in range(out.rows)], dtype=object)


def abs_max(A, axis=None):
    return np.max(np.abs(A), axis=axis)


def to_float64(A, what="value"):
    """The single rounding from high precision to float64 (round to nearest, ties to even)."""
    A = np.asarray(A, dtype=object)
    out = np.empty(A.shape, dtype=np.float64)
    flat = out.reshape(-1)
    for i, v in enumerate(A.reshape(-1)):
        if not gmpy2.is_finite(v):
            raise EvaluationError(f"{what} is {v}")
        flat[i] = float(v)
        if not np.isfinite(flat[i]):
            raise EvaluationError(f"{what} overflows float64 ({v})")
    return out
