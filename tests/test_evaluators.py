"""The two evaluators (derive/_hp.py on MPFR arrays, validation/_evaluate.py on mpmath and numpy)
accept the same sympy functions, compute each one right, and everything sympy makes out of the
whitelisted grammar is in that set (or refused with one line before anything runs)."""

import math

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings

import spec_strategies as ss
from conftest import run_derive
from derive import _hp
from derive._errors import SpecError
from derive._expr import parse
from derive._spec import load_spec, t as T_SYM
from validation import _evaluate as ev

x, y, n = sp.symbols("x y n", real=True)
z = sp.Symbol("z")                      # no assumptions: sympy keeps re(z), im(z)
REF_DPS = 80


def _mp(v):
    return mpmath.mpf(v)


def _ref_sign(a):
    return mpmath.mpf(mpmath.sign(a))


# sympy head -> (expression in x [, y], reference on mpmath numbers at REF_DPS, points)
# Points are doubles, so every evaluator sees exactly the same arguments.
P = [-2.5, -0.75, 0.0, 0.5, 1.25, 3.0]
POS = [0.25, 0.5, 1.0, 2.5, 7.0]
UNIT = [-0.9, -0.3, 0.0, 0.4, 0.85]
BIG = [-4.0, -1.5, 1.0, 2.0, 5.5]
PAIRS = [(-1.5, 0.5), (0.0, 0.0), (0.5, -2.0), (2.0, 2.0), (1.0, 3.5)]
REFERENCE = {
    sp.exp: (sp.exp(x), mpmath.exp, P), sp.log: (sp.log(x), mpmath.log, POS),
    sp.sin: (sp.sin(x), mpmath.sin, P), sp.cos: (sp.cos(x), mpmath.cos, P), sp.tan: (sp.tan(x), mpmath.tan, P),
    sp.cot: (sp.cot(x), lambda a: 1 / mpmath.tan(a), BIG), sp.sec: (sp.sec(x), lambda a: 1 / mpmath.cos(a), P),
    sp.csc: (sp.csc(x), lambda a: 1 / mpmath.sin(a), BIG),
    sp.sinh: (sp.sinh(x), mpmath.sinh, P), sp.cosh: (sp.cosh(x), mpmath.cosh, P), sp.tanh: (sp.tanh(x), mpmath.tanh, P),
    sp.coth: (sp.coth(x), lambda a: mpmath.cosh(a) / mpmath.sinh(a), BIG),
    sp.sech: (sp.sech(x), lambda a: 1 / mpmath.cosh(a), P), sp.csch: (sp.csch(x), lambda a: 1 / mpmath.sinh(a), BIG),
    sp.asin: (sp.asin(x), mpmath.asin, UNIT), sp.acos: (sp.acos(x), mpmath.acos, UNIT), sp.atan: (sp.atan(x), mpmath.atan, P),
    sp.acot: (sp.acot(x), lambda a: mpmath.pi / 2 if a == 0 else mpmath.atan(1 / a), P),
    sp.asec: (sp.asec(x), lambda a: mpmath.acos(1 / a), BIG), sp.acsc: (sp.acsc(x), lambda a: mpmath.asin(1 / a), BIG),
    sp.asinh: (sp.asinh(x), lambda a: mpmath.log(a + mpmath.sqrt(a * a + 1)), P),
    sp.acosh: (sp.acosh(x), lambda a: mpmath.log(a + mpmath.sqrt(a * a - 1)), [1.0, 1.5, 3.0, 10.0]),
    sp.atanh: (sp.atanh(x), lambda a: mpmath.log((1 + a) / (1 - a)) / 2, UNIT),
    sp.acoth: (sp.acoth(x), lambda a: mpmath.log((a + 1) / (a - 1)) / 2, [-4.0, -1.5, 1.25, 6.0]),
    sp.asech: (sp.asech(x), lambda a: mpmath.acosh(1 / a), [0.1, 0.5, 0.9, 1.0]),
    sp.acsch: (sp.acsch(x), lambda a: mpmath.asinh(1 / a), BIG),
    sp.atan2: (sp.atan2(y, x), lambda a, b: mpmath.atan2(b, a), [p for p in PAIRS if p != (0.0, 0.0)]),
    sp.sinc: (sp.sinc(x), lambda a: mpmath.mpf(1) if a == 0 else mpmath.sin(a) / a, P),
    sp.Abs: (sp.Abs(x), lambda a: -a if a < 0 else a, P), sp.sign: (sp.sign(x), _ref_sign, P),
    sp.floor: (sp.floor(x), mpmath.floor, P), sp.ceiling: (sp.ceiling(x), mpmath.ceil, P),
    sp.Heaviside: (sp.Heaviside(x), lambda a: _mp(1) if a > 0 else _mp(0) if a < 0 else _mp("0.5"), P),
    sp.Min: (sp.Min(x, y, 1), lambda a, b: min(a, b, 1), PAIRS), sp.Max: (sp.Max(x, y, 0), lambda a, b: max(a, b, 0), PAIRS),
    sp.Piecewise: (sp.Piecewise((x ** 2, x > 1), (sp.sin(x), sp.Ne(x, 0)), (7, True)),
                   lambda a: a ** 2 if a > 1 else mpmath.sin(a) if a != 0 else _mp(7), P),
    sp.ITE: (sp.Piecewise((x, sp.ITE(x > 0, x > 1, x < -1)), (-x, True)),
             lambda a: a if ((a > 1) if a > 0 else (a < -1)) else -a, P),
    sp.re: (sp.re(z), lambda a: a, P), sp.im: (sp.im(z) + 1, lambda a: _mp(1), P),
    sp.StrictGreaterThan: (sp.Gt(x, y), lambda a, b: a > b, PAIRS), sp.GreaterThan: (sp.Ge(x, y), lambda a, b: a >= b, PAIRS),
    sp.StrictLessThan: (sp.Lt(x, y), lambda a, b: a < b, PAIRS), sp.LessThan: (sp.Le(x, y), lambda a, b: a <= b, PAIRS),
    sp.Equality: (sp.Eq(x, y), lambda a, b: a == b, PAIRS), sp.Unequality: (sp.Ne(x, y), lambda a, b: a != b, PAIRS),
    sp.And: (sp.And(x > 0, y < 1), lambda a, b: a > 0 and b < 1, PAIRS),
    sp.Or: (sp.Or(x > 0, y > 1), lambda a, b: a > 0 or b > 1, PAIRS),
    sp.Xor: (sp.Xor(x > 0, y > 0), lambda a, b: (a > 0) != (b > 0), PAIRS),
    sp.Not: (sp.Not(x > y), lambda a, b: not a > b, PAIRS),
    sp.erf: (sp.erf(x), mpmath.erf, P), sp.erfc: (sp.erfc(x), mpmath.erfc, P), sp.erfi: (sp.erfi(x), mpmath.erfi, P),
    sp.Ei: (sp.Ei(x), mpmath.ei, [-3.0, -0.5, 0.25, 1.0, 4.0]),
    sp.li: (sp.li(x), lambda a: mpmath.ei(mpmath.log(a)), [0.25, 0.5, 2.0, 10.0]),
    sp.Si: (sp.Si(x), lambda a: mpmath.quad(lambda u: mpmath.sinc(u), [0, a]), P),
    sp.Ci: (sp.Ci(x), lambda a: mpmath.euler + mpmath.log(a) + mpmath.quad(lambda u: (mpmath.cos(u) - 1) / u, [0, a]), POS),
    sp.Shi: (sp.Shi(x), lambda a: mpmath.quad(lambda u: mpmath.sinh(u) / u if u else 1, [0, a]), P),
    sp.Chi: (sp.Chi(x), lambda a: mpmath.euler + mpmath.log(a) + mpmath.quad(lambda u: (mpmath.cosh(u) - 1) / u, [0, a]), POS),
    sp.fresnels: (sp.fresnels(x), lambda a: mpmath.quad(lambda u: mpmath.sin(mpmath.pi * u * u / 2), [0, a]), P),
    sp.fresnelc: (sp.fresnelc(x), lambda a: mpmath.quad(lambda u: mpmath.cos(mpmath.pi * u * u / 2), [0, a]), P),
    sp.gamma: (sp.gamma(x), mpmath.gamma, [-2.5, -0.5, 0.25, 1.5, 6.0]),
    sp.loggamma: (sp.loggamma(x), lambda a: mpmath.log(mpmath.gamma(a)), [0.25, 1.5, 6.0, 30.0]),
    sp.uppergamma: (sp.uppergamma(y, x), lambda a, b: mpmath.quad(lambda u: u ** (b - 1) * mpmath.exp(-u), [a, mpmath.inf]),
                    [(0.5, 1.5), (2.0, 0.5), (1.0, 3.0)]),
    sp.lowergamma: (sp.lowergamma(y, x), lambda a, b: mpmath.quad(lambda v: 2 * v ** (2 * b - 1) * mpmath.exp(-v * v), [0, mpmath.sqrt(a)]),
                    [(0.5, 1.5), (2.0, 0.5), (1.0, 3.0)]),
    sp.expint: (sp.expint(n, x), lambda a, b: mpmath.quad(lambda u: mpmath.exp(-a * u) / u ** b, [1, mpmath.inf]),
                [(0.5, 1.0), (2.0, 2.0), (1.0, 3.0)]),
    sp.LambertW: (sp.LambertW(x), lambda a: mpmath.findroot(lambda w: w * mpmath.exp(w) - a, 0.5), [-0.25, 0.0, 0.5, 3.0]),
}
TWO_ARG_NAMES = {sp.expint: ("x", "n")}


def test_tables_have_the_same_keys():
    """One table per evaluator; neither may know a function the other lacks."""
    hp, val = set(_hp.FUNCS), set(ev.FUNCTIONS)
    assert hp - val == set(), f"only derive evaluates {sorted(f.__name__ for f in hp - val)}"
    assert val - hp == set(), f"only validation evaluates {sorted(f.__name__ for f in val - hp)}"
    assert not set(_hp.REFUSED) & hp
    assert set(REFERENCE) == hp, "every function in the table needs a reference case here"


def _names(head, expr):
    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    if head in TWO_ARG_NAMES:
        return list(TWO_ARG_NAMES[head])
    names = [s.name for s in syms]
    return ["x", "y"] if set(names) == {"x", "y"} else names


def _close(value, ref, rtol):
    if isinstance(ref, bool):
        return bool(value) == ref
    ref = mpmath.mpf(ref)
    v = mpmath.mpf(str(value)) if not isinstance(value, (float, np.floating, mpmath.mpf)) else mpmath.mpf(value)
    if mpmath.isinf(ref) or mpmath.isnan(ref):
        return v == ref or (mpmath.isnan(v) and mpmath.isnan(ref))
    return abs(v - ref) <= rtol * max(abs(ref), 1)


@pytest.mark.parametrize("head", sorted(REFERENCE, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_each_function_in_every_evaluator(head):
    """MPFR arrays (~60 digits), mpmath at 50 digits and numpy float64 against mpmath at 80 digits."""
    expr, ref_fn, points = REFERENCE[head]
    names = _names(head, expr)
    pts = [p if isinstance(p, tuple) else (p,) for p in points]
    if len(names) == 1 and len(pts[0]) == 2:
        pts = [p[:1] for p in pts]
    with mpmath.workdps(REF_DPS):
        refs = [ref_fn(*(mpmath.mpf(v) for v in p)) for p in pts]
    # derive: one vectorised call over all points
    env = {name: _hp.array([p[i] for p in pts]) for i, name in enumerate(names)}
    hp_vals = np.broadcast_to(np.asarray(_hp.compile_expr(expr)(env), dtype=object), (len(pts),))
    for p, v, r in zip(pts, hp_vals, refs):
        assert _close(v, r, 1e-50), f"_hp {expr} at {p}: {v} vs {r}"
    # validation: mpmath scalars and numpy float64
    with mpmath.workdps(50):
        for p, r in zip(pts, refs):
            kw = {name: mpmath.mpf(p[i]) for i, name in enumerate(names)}
            v = ev.mp_value(expr, **kw)
            assert _close(v, r, 1e-45), f"_evaluate mp {expr} at {p}: {v} vs {r}"
    for p, r in zip(pts, refs):
        kw = {name: float(p[i]) for i, name in enumerate(names)}
        v = ev.np_value(expr, **kw)
        assert _close(v, r, 1e-12), f"_evaluate np {expr} at {p}: {v} vs {r}"
    # numpy on arrays (the vectorised path of Piecewise and friends)
    kw = {name: np.array([float(p[i]) for p in pts]) for i, name in enumerate(names)}
    arr = np.broadcast_to(ev.np_value(expr, **kw), (len(pts),))
    for p, v, r in zip(pts, arr, refs):
        assert _close(v, r, 1e-12), f"_evaluate np array {expr} at {p}: {v} vs {r}"


def test_refused_functions_say_so():
    for expr in (sp.DiracDelta(x), sp.polylog(3, x), sp.Integral(sp.exp(x ** 3), x)):
        with pytest.raises(_hp.Unsupported):
            _hp.compile_expr(expr)
        with pytest.raises(ev.Unsupported, match=expr.func.__name__):
            ev.mp_value(expr, x=mpmath.mpf(1))


def test_evaluator_names_never_clash_with_user_names():
    """A basis frequency may be named M or expr (the evaluators' own argument names)."""
    M = sp.Symbol("M", real=True)
    expr_sym = sp.Symbol("expr", real=True)
    e = sp.exp(-M * expr_sym)
    assert ev.np_value(e, M=2.0, expr=0.5) == pytest.approx(math.exp(-1.0), rel=1e-15)
    assert ev.mp_matrix(sp.Matrix([[e]]), M=mpmath.mpf(2), expr=mpmath.mpf("0.5"))[0, 0] == mpmath.exp(-1)


# ----- what sympy makes out of the grammar is in the table --------------------------------

def _heads(expr):
    out = set()
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Function, sp.Piecewise)) or (isinstance(node, sp.Basic) and node.is_Relational):
            out.add(node.func)
        if isinstance(node, sp.logic.boolalg.BooleanFunction):
            out.add(node.func)
    return out


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(ss.expressions(1, depth=3))
def test_spec_level_rewrites_stay_in_the_table(ex):
    """Parse, d/dt, sqrt(e**2), and the marginal form's F = (log mean)' and G^2: every head known."""
    t = T_SYM
    e = parse(ex.text, {"t": t})
    derived = [e, sp.diff(e, t), sp.sqrt(e ** 2), sp.diff(sp.sqrt(e ** 2), t)]
    m = sp.exp(e)
    f = sp.diff(m, t) / m
    derived += [f, sp.sqrt(sp.diff((m * sp.sqrt(1 + t)) ** 2, t) - 2 * f * (m * sp.sqrt(1 + t)) ** 2)]
    for d in derived:
        unknown = {h for h in _heads(d) if h not in _hp.FUNCS}
        assert not unknown, f"{ex.text}: sympy produced {unknown} in {d}"
        _hp.compile_expr(d)             # and the evaluators compile it
        ev._compiled(d, "np")


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(ss.expressions(1, depth=2))
def test_integration_results_are_evaluated_or_refused(ex):
    """sympy's antiderivatives of grammar expressions: each function in the table or in REFUSED."""
    import signal

    def stop(*a):
        raise TimeoutError
    t = T_SYM
    e = parse(ex.text, {"t": t})
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(5)
    try:
        i = sp.integrate(e, t)
    except (TimeoutError, NotImplementedError, ValueError, TypeError, ZeroDivisionError, RecursionError):
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    for h in _heads(i):
        assert h in _hp.FUNCS or h in _hp.REFUSED or issubclass(h, sp.Integral) or h.__name__ == "ExprCondPair", \
            f"{ex.text}: integral holds {h.__name__}: {i}"


# ----- the cosine sqrt(alpha_bar) spec of the issue ---------------------------------------

COS_SQRT = """\
name: cos_sqrt
description: sqrt of a cosine alpha_bar (sympy writes Abs(cos(..)); its drift holds sign(..))
parameters:
  s0: 0.008
definitions:
  alpha_bar: cos(pi / 2 * (t + s0) / (1 + s0))**2 / cos(pi / 2 * s0 / (1 + s0))**2
marginal:
  mean: sqrt(alpha_bar)
  std: sqrt(1 - alpha_bar)
time: {t_min: 1e-3, T: 0.9946}
tables: {nfe: [6], order: 3, grid: quadratic}
"""


def test_cosine_sqrt_spec_holds_abs_and_sign(tmp_path):
    path = tmp_path / "cos_sqrt.yaml"
    path.write_text(COS_SQRT)
    spec = load_spec(path)
    assert spec.mean.has(sp.Abs) and spec.F[0, 0].has(sp.sign)


def test_cosine_sqrt_spec_derives_end_to_end(tmp_path):
    """python -m derive exits 0; the table matches the exact marginal and passes the fast check again."""
    from gddim_runtime._format import read_table
    from validation import check_table
    path = tmp_path / "cos_sqrt.yaml"
    path.write_text(COS_SQRT)
    proc = run_derive(path, "--out", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    tensors, meta = read_table(tmp_path / "out" / "cos_sqrt" / "cos_sqrt_nfe6_quadratic_q3.safetensors")
    spec = load_spec(path)
    report = check_table(spec, tensors, meta, level="fast")
    assert report.passed, report.text()
    with mpmath.workdps(40):
        s0 = mpmath.mpf(1) / 125

        def ab(u):
            c = lambda v: mpmath.cos(mpmath.pi / 2 * (v + s0) / (1 + s0))
            return c(mpmath.mpf(float(u))) ** 2 / c(0) ** 2
        tt = tensors["t"]
        for i in range(len(tt)):
            assert abs(tensors["sigma"][i, 0, 0, 0] - float(1 - ab(tt[i]))) <= 1e-15
        for i in range(len(tt) - 1):
            exact = mpmath.sqrt(ab(tt[i + 1]) / ab(tt[i]))
            assert abs(tensors["psi"][i, 0, 0, 0] / float(exact) - 1) <= 1e-14


def test_function_outside_the_table_is_refused_with_one_line(tmp_path, monkeypatch):
    """Were sign not evaluable, the spec loader names the key and the function before anything runs."""
    monkeypatch.delitem(_hp.FUNCS, sp.sign)
    path = tmp_path / "cos_sqrt.yaml"
    path.write_text(COS_SQRT)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert "\n" not in msg and "marginal.mean" in msg and "sign" in msg


def test_products_of_exponentials_do_not_overflow():
    """exp(c1 t) exp(c2 t) with |c1|, |c2| huge and c1 + c2 = 1 (what expand makes of Sigma's
    closed forms): both evaluators give exp(t), not inf * 0 = nan."""
    K = sp.Integer(10) ** 12
    t = sp.Symbol("t", real=True)
    e = sp.Mul(3, sp.exp(K * t), sp.exp((1 - K) * t), evaluate=False)
    assert len([a for a in e.args if a.func is sp.exp]) == 2
    hp = _hp.compile_expr(e)({"t": _hp.array([0.5, 2.0])})
    with mpmath.workdps(50):
        for v, u in zip(hp, (0.5, 2.0)):
            exact = 3 * mpmath.exp(mpmath.mpf(u))
            assert abs(mpmath.mpf(str(v)) / exact - 1) < 1e-50
            assert abs(ev.mp_value(e, t=mpmath.mpf(u)) / exact - 1) < 1e-45
            assert ev.np_value(e, t=u) == pytest.approx(float(exact), rel=1e-14)


@pytest.mark.slow
def test_cosine_sqrt_spec_full_check(tmp_path):
    """The 45-digit check (mpmath side of validation/_evaluate: Abs and sign) passes too."""
    path = tmp_path / "cos_sqrt.yaml"
    path.write_text(COS_SQRT.replace("nfe: [6]", "nfe: [3]"))
    proc = run_derive(path, "--out", tmp_path / "out", "--verify", "full", "--quiet")
    assert proc.returncode == 0, proc.stderr
