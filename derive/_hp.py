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


def _ufunc(fn, nin=1):
    return np.frompyfunc(fn, nin, 1)


_NAN = gmpy2.mpfr("nan")
_ONE, _ZERO, _HALF = gmpy2.mpfr(1), gmpy2.mpfr(0), gmpy2.mpfr("0.5")


def to_mpmath(x):
    """Exact mpmath copy of an MPFR number (mantissa and exponent, no decimal round trip): the one
    MPFR -> mpmath conversion (``from_mpmath`` the way back)."""
    import mpmath
    if not gmpy2.is_finite(x):
        return mpmath.mpf(str(x))
    man, exp = x.as_mantissa_exp()
    return mpmath.ldexp(mpmath.mpf(int(man)), int(exp))


def from_mpmath(v):
    import mpmath
    if isinstance(v, mpmath.mpc):
        if v.imag != 0:
            return _NAN
        v = v.real
    sign, man, exp, _ = v._mpf_
    if man == 0:
        return _ZERO if exp == 0 else gmpy2.mpfr(str(v))     # zero, or inf/nan
    return gmpy2.mul_2exp(gmpy2.mpfr(-man if sign else man), exp)


def _mpmath(name, nin=1):
    """Elementwise mpmath function at PREC_BITS for what MPFR lacks (Si, Ci, erfi, ...).

    A domain error or a non-real result gives nan (EvaluationError where it is used)."""
    def fn(*xs):
        import mpmath
        with mpmath.workprec(gmpy2.get_context().precision):
            try:
                return from_mpmath(getattr(mpmath, name)(*(to_mpmath(x) for x in xs)))
            except (ValueError, ZeroDivisionError, ArithmeticError):
                return _NAN
    return _ufunc(fn, nin)


def _lowergamma(a, x):
    import mpmath
    with mpmath.workprec(gmpy2.get_context().precision):
        try:
            return from_mpmath(mpmath.gammainc(to_mpmath(a), 0, to_mpmath(x)))
        except (ValueError, ZeroDivisionError, ArithmeticError):
            return _NAN


def _recip(fn):
    return lambda x: fn(_ONE / x)


def _sinc(x):
    return _ONE if x == 0 else gmpy2.sin(x) / x


def _li(x):
    return gmpy2.eint(gmpy2.log(x)) if x >= 0 else _NAN


# ----- structural entries (arguments compiled here, evaluated lazily where it matters) --------

def _elementwise(ufunc):
    def build(expr):
        args = [compile_expr(a) for a in expr.args]
        if ufunc.nin != len(args):
            raise Unsupported(f"{expr.func.__name__} with {len(args)} arguments")
        if len(args) == 1:
            a, = args
            return lambda env: _apply(ufunc, a(env))
        return lambda env: _wrap(ufunc(*(f(env) for f in args)))
    build.ufunc = ufunc
    return build


def _reduce(fn):
    def build(expr):
        args = [compile_expr(a) for a in expr.args]
        return lambda env: _wrap(functools.reduce(fn, (f(env) for f in args)))
    return build


def _relation(op):
    def build(expr):
        a, b = (compile_expr(x) for x in expr.args)
        return lambda env: _bool(op(a(env), b(env)))
    return build


def _bool(v):
    return np.asarray(v, dtype=bool) if isinstance(v, np.ndarray) else bool(v)


def _where(cond, a, b):
    if isinstance(cond, (bool, np.bool_)):
        return a if cond else b
    return np.where(cond, np.asarray(a, dtype=object), np.asarray(b, dtype=object))


def _piecewise(expr):
    """Piecewise((e1, c1), (e2, c2), ...): the first true condition wins; nan where none holds."""
    pairs = [(compile_expr(e), compile_expr(c)) for e, c in expr.args]

    def evaluate(env):
        out = _NAN
        for value, cond in reversed(pairs):
            c = cond(env)
            out = _where(c, value(env), out) if not isinstance(c, (bool, np.bool_)) else (value(env) if c else out)
        return _wrap(out)
    return evaluate


def _ite(expr):
    c, a, b = (compile_expr(x) for x in expr.args)
    return lambda env: _where(c(env), a(env), b(env))


def _heaviside(expr):
    x = compile_expr(expr.args[0])
    h0 = compile_expr(expr.args[1]) if len(expr.args) > 1 else (lambda env: _HALF)
    return lambda env: _wrap(_where(x(env) > 0, _ONE, _where(x(env) < 0, _ZERO, h0(env))))


def _logic(fn):
    def build(expr):
        args = [compile_expr(a) for a in expr.args]
        return lambda env: _bool(functools.reduce(fn, (_bool(f(env)) for f in args)))
    return build


def _not(expr):
    a = compile_expr(expr.args[0])
    return lambda env: _bool(np.logical_not(a(env)))


def _real_part(expr):                 # MPFR values are real: re(x) = x, im(x) = 0
    a = compile_expr(expr.args[0])
    return a


def _imag_part(expr):
    a = compile_expr(expr.args[0])
    return lambda env: a(env) * 0


# THE table of functions this evaluator accepts: sympy head -> builder(expr) -> closure.
# validation/_evaluate.py has its own table with exactly the same keys (tests/test_evaluators.py).
# Anything else raises Unsupported (derive then falls back to numerical integration, and the spec
# loader refuses user expressions that sympy turned into such a function).
FUNCS = {
    # elementary (MPFR)
    sp.exp: _ufunc(gmpy2.exp), sp.log: _ufunc(gmpy2.log),
    sp.sin: _ufunc(gmpy2.sin), sp.cos: _ufunc(gmpy2.cos), sp.tan: _ufunc(gmpy2.tan),
    sp.cot: _ufunc(gmpy2.cot), sp.sec: _ufunc(gmpy2.sec), sp.csc: _ufunc(gmpy2.csc),
    sp.sinh: _ufunc(gmpy2.sinh), sp.cosh: _ufunc(gmpy2.cosh), sp.tanh: _ufunc(gmpy2.tanh),
    sp.coth: _ufunc(gmpy2.coth), sp.sech: _ufunc(gmpy2.sech), sp.csch: _ufunc(gmpy2.csch),
    sp.asin: _ufunc(gmpy2.asin), sp.acos: _ufunc(gmpy2.acos), sp.atan: _ufunc(gmpy2.atan),
    sp.acot: _ufunc(_recip(gmpy2.atan)), sp.asec: _ufunc(_recip(gmpy2.acos)), sp.acsc: _ufunc(_recip(gmpy2.asin)),
    sp.asinh: _ufunc(gmpy2.asinh), sp.acosh: _ufunc(gmpy2.acosh), sp.atanh: _ufunc(gmpy2.atanh),
    sp.acoth: _ufunc(_recip(gmpy2.atanh)), sp.asech: _ufunc(_recip(gmpy2.acosh)),
    sp.acsch: _ufunc(_recip(gmpy2.asinh)),
    sp.atan2: _ufunc(gmpy2.atan2, 2), sp.sinc: _ufunc(_sinc),
    # piecewise-defined (sqrt(x**2) -> Abs, d|x|/dx -> sign, integrals -> Piecewise/Heaviside/floor)
    sp.Abs: _ufunc(abs), sp.sign: _ufunc(lambda x: gmpy2.mpfr((x > 0) - (x < 0)) if x == x else _NAN),
    sp.floor: _ufunc(gmpy2.floor), sp.ceiling: _ufunc(gmpy2.ceil),
    sp.Heaviside: _heaviside, sp.Min: _reduce(np.minimum), sp.Max: _reduce(np.maximum),
    sp.Piecewise: _piecewise, sp.ITE: _ite,
    sp.re: _real_part, sp.im: _imag_part,
    # relations and logic (conditions of Piecewise)
    sp.StrictGreaterThan: _relation(lambda a, b: a > b), sp.GreaterThan: _relation(lambda a, b: a >= b),
    sp.StrictLessThan: _relation(lambda a, b: a < b), sp.LessThan: _relation(lambda a, b: a <= b),
    sp.Equality: _relation(lambda a, b: a == b), sp.Unequality: _relation(lambda a, b: a != b),
    sp.And: _logic(np.logical_and), sp.Or: _logic(np.logical_or), sp.Xor: _logic(np.logical_xor),
    sp.Not: _not,
    # special functions that integration produces (MPFR where it has them, else mpmath at PREC_BITS)
    sp.erf: _ufunc(gmpy2.erf), sp.erfc: _ufunc(gmpy2.erfc), sp.erfi: _mpmath("erfi"),
    sp.Ei: _ufunc(gmpy2.eint), sp.li: _ufunc(_li),
    sp.Si: _mpmath("si"), sp.Ci: _mpmath("ci"), sp.Shi: _mpmath("shi"), sp.Chi: _mpmath("chi"),
    sp.fresnels: _mpmath("fresnels"), sp.fresnelc: _mpmath("fresnelc"),
    sp.gamma: _ufunc(gmpy2.gamma), sp.loggamma: _ufunc(gmpy2.lngamma),
    sp.uppergamma: _mpmath("gammainc", 2), sp.lowergamma: _ufunc(_lowergamma, 2),
    sp.expint: _mpmath("expint", 2), sp.LambertW: _mpmath("lambertw"),
}
# Functions sympy can produce that are refused on purpose (not a function value, or complex).
REFUSED = {
    sp.DiracDelta: "DiracDelta is a distribution, not a function value",
    sp.exp_polar: "exp_polar (a point on the Riemann surface of log) has no real value here",
    sp.Integral: "an unevaluated integral",
    sp.Derivative: "an unevaluated derivative",
    sp.polylog: "polylog is not supported", sp.hyper: "hypergeometric functions are not supported",
    sp.meijerg: "Meijer G functions are not supported",
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
    if expr is sp.true or expr is sp.false:
        value = bool(expr)
        return lambda env: value
    if getattr(expr, "is_number", False) and not isinstance(expr, sp.logic.boolalg.Boolean):
        if expr.has(sp.I, sp.zoo, sp.nan, sp.oo, sp.exp_polar):
            raise Unsupported(f"non-real constant {expr}")
        if expr.has(*REFUSED):
            raise Unsupported(f"{expr}: " + next(v for k, v in REFUSED.items() if expr.has(k)))
        # constants to the working precision of the compile (higher in a precise evaluator)
        digits = max(70, int(gmpy2.get_context().precision * 0.30103) + 12)
        value = mpf(expr) if expr.is_Rational else gmpy2.mpfr(str(sp.N(expr, digits)))
        return lambda env: value
    if expr.is_Add:
        args = [compile_expr(a) for a in expr.args]
        return lambda env: functools.reduce(lambda acc, f: acc + f(env), args[1:], args[0](env))
    if expr.is_Mul:
        args = [compile_expr(a) for a in merge_exp_factors(expr)]
        if len(args) == 1:
            return args[0]
        return lambda env: functools.reduce(lambda acc, f: acc * f(env), args[1:], args[0](env))
    if expr.is_Pow:
        base, expo = (compile_expr(a) for a in expr.args)
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
    entry = FUNCS.get(expr.func)
    if entry is None:
        why = REFUSED.get(expr.func, f"no high-precision evaluator for {expr.func.__name__}")
        raise Unsupported(f"{expr.func.__name__}: {why}" if expr.func in REFUSED else why)
    if isinstance(entry, np.ufunc):
        return _elementwise(entry)(expr)
    return entry(expr)


def merge_exp_factors(mul):
    """Factors of a product with exp(a) exp(b) ... evaluated as one exp(a + b + ...).

    sympy's expand splits exp(c t) into exp(c1 t) exp(c2 t) with |c1|, |c2| huge and c1 + c2
    moderate (closed forms of Sigma); the separate factors overflow to inf * 0 = nan, the sum
    of the exponents does not. Exact identity for real exponents.
    """
    exps = [a for a in mul.args if a.func is sp.exp]
    if len(exps) < 2:
        return list(mul.args)
    rest = [a for a in mul.args if a.func is not sp.exp]
    return rest + [sp.exp(sp.Add(*(a.args[0] for a in exps)), evaluate=False)]


def _wrap(out):
    return out if isinstance(out, np.ndarray) else np.asarray(out, dtype=object)[()]


def _apply(ufunc, x):
    out = ufunc(x)
    return out if isinstance(out, np.ndarray) else np.asarray(out, dtype=object)[()]


def _apply2(ufunc, x, y):
    out = ufunc(x, y)
    return out if isinstance(out, np.ndarray) else np.asarray(out, dtype=object)[()]


def compile_matrix(M):
    """Evaluator env, shape -> object array shape + (rows, cols) for a sympy Matrix (a ``Compiled``)."""
    return Compiled(M)


class Compiled:
    """A sympy Matrix compiled for MPFR evaluation at ``precision`` bits (PREC_BITS by default).

    A closed form can cancel: sums of terms 1e12 times larger than their result lose 12 of the
    ~60 digits, and the quadratures downstream need 36. ``precision`` is raised by the derivation
    when a probe shows the loss (``Evaluators._finite``); the terms are then evaluated at that
    precision, constants included, and each result is rounded once to PREC_BITS.
    """

    def __init__(self, M):
        self.M, self.precision, self._entries = M, PREC_BITS, {}
        self._compiled(PREC_BITS)                   # raises Unsupported now, not at first use

    def _compiled(self, precision):
        if precision not in self._entries:
            with gmpy2.context(gmpy2.get_context(), precision=precision):
                self._entries[precision] = [[compile_expr(self.M[i, j]) for j in range(self.M.shape[1])]
                                            for i in range(self.M.shape[0])]
        return self._entries[precision]

    def __call__(self, env, shape):
        entries = self._compiled(self.precision)
        if self.precision == PREC_BITS:
            return self._evaluate(entries, env, shape)
        with gmpy2.context(gmpy2.get_context(), precision=self.precision):
            out = self._evaluate(entries, env, shape)
        return _ROUND(out)

    def _evaluate(self, entries, env, shape):
        out = np.empty(shape + self.M.shape, dtype=object)
        for i, row in enumerate(entries):
            for j, f in enumerate(row):
                out[..., i, j] = np.broadcast_to(np.asarray(f(env), dtype=object), shape)
        return out


_ROUND = np.frompyfunc(lambda v: gmpy2.mpfr(v, PREC_BITS), 1, 1)


# ----- small dense linear algebra on batches [..., k, k] -----------------------------------

def T(A):
    return np.swapaxes(A, -1, -2)


def solve(A, Rhs):
    """X with A X = Rhs for batches A [..., k, k], Rhs [..., k, m]: Gauss-Jordan elimination with
    partial pivoting per matrix, in MPFR (the one pivoting solver of derive)."""
    shape = Rhs.shape
    k, m = A.shape[-1], shape[-1]
    n = int(np.prod(A.shape[:-2], dtype=int))
    M = np.concatenate([A.reshape(n, k, k), Rhs.reshape(n, k, m)], axis=-1)
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


def inv(A):
    """Inverse of a batch [..., k, k] (``solve`` with the identity)."""
    k = A.shape[-1]
    return solve(A, eye(k, A.shape[:-2]))


EXPM_TAYLOR = 22           # terms after scaling to norm <= 2^-8: truncation 2^-184/23! ~ 1e-78


def expm(X):
    """exp(X) for a batch [..., k, k] at PREC_BITS: scaling and squaring with a Taylor polynomial.

    Every matrix is scaled by the same 2^-q so that the largest norm is <= 2^-8, the polynomial
    of degree EXPM_TAYLOR is evaluated by Horner's rule, and the result squared q times (the
    truncation error is below 2^-PREC_BITS relative to the norm of the result).
    """
    X = np.asarray(X, dtype=object)
    k = X.shape[-1]
    norm = max((float(v) for v in np.ravel(np.sum(np.abs(X), axis=-1))), default=0.0)
    q = max(0, int(np.ceil(np.log2(norm))) + 8) if norm > 0 else 0
    Xs = X / gmpy2.mpfr(2) ** q
    I = eye(k, X.shape[:-2])
    E = I.copy()
    for j in range(EXPM_TAYLOR, 0, -1):
        E = I + (Xs @ E) / j
    for _ in range(q):
        E = E @ E
    return E


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
        A = mpmath.matrix([[to_mpmath(v) for v in row] for row in S.tolist()])
        E, Q = mpmath.eigsy(A)
        D = mpmath.diag([mpmath.sqrt(e) for e in E])
        out = Q * D * Q.T
        return np.array([[from_mpmath(out[i, j]) for j in range(out.cols)] for i in range(out.rows)], dtype=object)


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
