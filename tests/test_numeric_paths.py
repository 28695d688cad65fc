"""derive's numerical routes, tested from their classes (issue 10, items 1-5 of the helper brief).

- Langevin processes with any damping (under-, critically, over-damped: F = f A with real,
  repeated or complex eigenvalues, G G^T = f B): closed Psi and Sigma, fast, and the fast check
  passes. Over-damped CLD ran for over 10 minutes before: Sigma was evaluated as
  Psi(t,0) [Sigma_0 + int Psi(0,r) G G^T Psi(0,r)^T dr] Psi(t,0)^T, whose terms grow like
  exp(|lambda_max| t) and cancel to O(1); the digits lost made R's ODE unresolvable.
- Constant drift without closed eigenvalues (k = 3..6): Psi = expm(A (I(t) - I(s))) at high
  precision, Sigma from the algebraic Lyapunov identity, chosen by structure (no sympy exp tried).
- Coefficients infinite but integrable at t = 0 (1/sqrt(t)): derive and the float64 reference.

Independent references: mpmath's expm at 80 digits, scipy's float64 solve_ivp (validation), the
Lyapunov ODE route of derive itself (a different algorithm from the algebraic identity).
"""

import signal
import time
from fractions import Fraction

import gmpy2
import mpmath
import numpy as np
import sympy as sp
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from derive import _derivation, _hp, derive
from validation._check import check_table
from validation._reference import ScipyReference

CPU_LIMIT_S = 10          # the target for a derive (process CPU time: stable under load)
WALL_LIMIT_S = 180        # a hang is a failure, not a stuck test run

CLD = """\
name: cld_family
state: [x, v]
parameters: {{beta: {beta}, M: {M}, Gamma: {Gamma}, gamma: 0.04, eps: 1e-6}}
definitions: {{b: beta / M}}
drift: [[0, b], [-beta, -Gamma * b]]
diffusion: [[0], [sqrt(2 * Gamma * beta)]]
initial_covariance: [[eps, 0], [0, gamma * M + eps]]
time: {{t_min: 1e-3, T: 1}}
"""


class _WallLimit:
    def __init__(self, seconds):
        self.seconds = seconds

    def _raise(self, signum, frame):
        raise TimeoutError(f"ran past {self.seconds} s")

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, self._raise)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def _derive_and_check(text, nfe=5, order=2):
    """Derive (with R solved to T), build one table, fast check: (derivation, CPU seconds)."""
    with _WallLimit(WALL_LIMIT_S):
        start = time.process_time()
        d = derive(text)
        tab = d.table(nfe=nfe, order=order, grid="uniform", verify="none")
        seconds = time.process_time() - start
        report = check_table(d.spec, tab.tensors, tab.meta, level="fast")
    assert report.passed, report.text()
    return d.derivation, seconds


def _frac(x):
    return str(Fraction(x).limit_denominator(64))


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(Gamma=st.fractions(Fraction(1, 8), 12), M=st.fractions(Fraction(1, 16), 2),
       beta=st.fractions(Fraction(1, 2), 8))
@example(Gamma=Fraction(3), M=Fraction(1, 4), beta=Fraction(4))        # over-damped: hung before
@example(Gamma=Fraction(1, 2), M=Fraction(1, 4), beta=Fraction(4))     # under-damped
@example(Gamma=Fraction(1), M=Fraction(1, 4), beta=Fraction(4))        # critically damped (built-in)
def test_langevin_any_damping(Gamma, M, beta):
    text = CLD.format(Gamma=_frac(Gamma), M=_frac(M), beta=_frac(beta))
    deriv, seconds = _derive_and_check(text)
    assert (deriv.psi_kind, deriv.sigma_kind) == (_derivation.CLOSED, _derivation.CLOSED)
    assert seconds <= CPU_LIMIT_S, f"{seconds:.1f} s CPU"
    # Sigma against scipy's float64 Lyapunov solve (independent), at T
    ref = ScipyReference(deriv.spec, [1e-3, 1.0])
    T = _hp.array([1])
    np.testing.assert_allclose(_hp.to_float64(deriv.sigma(T)[0, 0]), ref.sigma(1.0), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(Gamma=st.fractions(Fraction(1, 16), 40), M=st.fractions(Fraction(1, 32), 4),
       beta=st.fractions(Fraction(1, 4), 16))
def test_langevin_any_damping_many(Gamma, M, beta):
    test_langevin_any_damping.hypothesis.inner_test(Gamma, M, beta)


# ----- matrix exponential at high precision ---------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 6), scale=st.sampled_from([1e-3, 1, 40, 500]), seed=st.integers(0, 10 ** 6))
def test_expm_matches_mpmath(k, scale, seed):
    rng = np.random.default_rng(seed)
    A = np.vectorize(lambda v: _hp.mpf(Fraction(int(v), 16)), otypes=[object])(rng.integers(-32, 33, (k, k)))
    A = A * _hp.mpf(scale) / max(k, 1)
    E = _hp.expm(A[None])[0]
    with mpmath.workprec(300):
        ref = mpmath.expm(mpmath.matrix([[_hp.to_mpmath(v) for v in row] for row in A.tolist()]), method="taylor")
        size = max(abs(ref[i, j]) for i in range(k) for j in range(k))
        err = max(abs(_hp.to_mpmath(E[i, j]) - ref[i, j]) for i in range(k) for j in range(k))
    assert err <= size * mpmath.mpf(10) ** -50, float(err / size)


# ----- constant drift without closed eigenvalues (k = 3..6) ------------------------------------

def _constant_spec(k, seed):
    """F = -I + skew-ish rational noise (stable, irreducible characteristic polynomial in general),
    noise on the last component only, Sigma_0 = I / 100."""
    rng = np.random.default_rng(seed)
    F = [[str(Fraction(int(v), 4) - (1 if i == j else 0)) for j, v in enumerate(row)]
         for i, row in enumerate(rng.integers(-4, 5, (k, k)))]
    G = [["0"] * k for _ in range(k)]
    G[-1][-1] = "1"
    names = [f"x{i}" for i in range(k)]
    S0 = [["1/100" if i == j else "0" for j in range(k)] for i in range(k)]
    return yaml.safe_dump({"name": f"const{k}", "state": names, "drift": F, "diffusion": G,
                           "initial_covariance": S0, "time": {"t_min": 0.001, "T": 1}})


@settings(max_examples=1, deadline=None, suppress_health_check=list(HealthCheck))
@given(k=st.integers(3, 6), seed=st.integers(0, 10 ** 6))
@example(k=4, seed=7)
def test_constant_drift_numerical_expm(k, seed):
    text = _constant_spec(k, seed)
    A = _derivation._drift_factor(derive(text).spec)[1]
    deriv, seconds = _derive_and_check(text, nfe=4, order=2)
    if not _derivation._eigenvalues_closed(A):
        assert deriv._psi_mode == "expm numeric" and deriv._sigma_mode == "lyapunov"
    assert seconds <= CPU_LIMIT_S, f"{seconds:.1f} s CPU"
    # the algebraic Lyapunov identity against derive's Lyapunov ODE (another algorithm)
    tt = _hp.array([0.001, 0.3, 1])
    a = deriv.sigma(tt)
    deriv._sigma_mode = "ode"
    b = deriv.sigma(tt)
    assert _hp.abs_max(a - b) <= _hp.abs_max(b) * _hp.mpf(1e-40)


def test_no_sympy_exponential_without_closed_eigenvalues(monkeypatch):
    """The closed/numerical choice for Psi is structural (the characteristic polynomial), not a
    time budget: sympy's exp is never called for a quartic without rational roots."""
    def refuse(A):
        raise AssertionError("sympy exp called")
    monkeypatch.setattr(_derivation, "_real_expm", refuse)
    deriv = derive(_constant_spec(4, 7)).derivation
    assert deriv._psi_mode == "expm numeric"


# ----- coefficients infinite but integrable at t = 0 -------------------------------------------

SINGULAR = {
    "k1": """\
name: rsq1
drift: [[-1 / (4 * sqrt(t))]]
diffusion: [[1 / sqrt(2 * sqrt(t))]]
initial_covariance: [[1/10]]
time: {t_min: 1e-3, T: 1}
""",
    "k2": """\
name: rsq2
state: [x, v]
drift: [[-1 / sqrt(t), 1], [-1, -1 / (2 * sqrt(t))]]
diffusion: [[0], [1 / sqrt(sqrt(t))]]
initial_covariance: [[1/10, 0], [0, 1/10]]
time: {t_min: 1e-3, T: 1}
"""}


@pytest.mark.parametrize("name", sorted(SINGULAR))
def test_coefficient_infinite_at_zero(name):
    deriv, _ = _derive_and_check(SINGULAR[name], nfe=5, order=2)
    ref = ScipyReference(deriv.spec, [1e-3, 1.0])
    for tv in (1e-3, 0.5, 1.0):
        T = _hp.array([tv])
        np.testing.assert_allclose(_hp.to_float64(deriv.sigma(T)[0, 0]), ref.sigma(tv), rtol=1e-9)
        np.testing.assert_allclose(_hp.to_float64(deriv.R(T)[0, 0]), ref.R(tv), rtol=1e-9)


@pytest.mark.slow
def test_coefficient_infinite_at_zero_full_check():
    """The 45-digit reference starts in u = t^(1/6) too (it raised ZeroDivisionError at t = 0)."""
    with _WallLimit(WALL_LIMIT_S):
        d = derive(SINGULAR["k2"])
        tab = d.table(nfe=5, order=2, grid="uniform", verify="none")
        report = check_table(d.spec, tab.tensors, tab.meta, level="full")
    assert report.passed, report.text()


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 6), m=st.integers(1, 3), seed=st.integers(0, 10 ** 6))
def test_pivoting_solver_matches_mpmath(k, m, seed):
    """_hp.solve (the one pivoting solver: inverses and the collocation fallback) against mpmath's
    LU solve, on matrices with a zero leading entry (pivoting needed)."""
    rng = np.random.default_rng(seed)
    conv = np.vectorize(lambda v: _hp.mpf(Fraction(int(v), 8)), otypes=[object])
    A = conv(rng.integers(-16, 17, (k, k)))
    A[0, 0] = _hp.mpf(0)
    A = A + np.diag(conv(np.full(k, 40)))[::-1]           # nonsingular, large anti-diagonal
    Rhs = conv(rng.integers(-16, 17, (k, m)))
    X = _hp.solve(A[None], Rhs[None])[0]
    with mpmath.workprec(300):
        Am = mpmath.matrix([[_hp.to_mpmath(v) for v in row] for row in A.tolist()])
        for j in range(m):
            ref = mpmath.lu_solve(Am, mpmath.matrix([_hp.to_mpmath(v) for v in Rhs[:, j]]))
            err = max(abs(_hp.to_mpmath(X[i, j]) - ref[i]) for i in range(k))
            assert err <= mpmath.mpf(10) ** -55 * max(1, max(abs(v) for v in ref))
    np.testing.assert_array_equal(_hp.inv(A[None])[0], _hp.solve(A[None], _hp.eye(k)[None])[0])


STIFF_TIME_VARYING = """\
name: stiffode
state: [x, v]
drift: [[-60 - sin(t), 1 + t], [2, -1 + t]]
diffusion: [[1], [t]]
initial_covariance: [[1/10, 0], [0, 1/10]]
time: {t_min: 1e-3, T: 1}
"""


def test_numerical_psi_keeps_its_digits_on_a_stiff_drift():
    """F(t) not of the form f(t) A with eigenvalues ~ -60 and ~ 1: Psi(t,s) by its own ODE from t
    (Phi(t) Phi(s)^-1 kept only 28 of 45 digits here), against mpmath at 45 digits."""
    from validation._reference import MpReference
    d = derive(STIFF_TIME_VARYING)
    deriv = d.derivation
    assert deriv._psi_mode == "ode"
    got = deriv.psi(_hp.array([0.7, 0.2]), _hp.array([1.0, 0.7]))
    with mpmath.workdps(45):
        ref = MpReference(d.spec)
        for i, (tv, sv) in enumerate([(0.7, 1.0), (0.2, 0.7)]):
            R = ref.psi(mpmath.mpf(tv), mpmath.mpf(sv))
            scale = max(abs(R[a, b]) for a in range(2) for b in range(2))
            err = max(abs(_hp.to_mpmath(got[i, 0, a, b]) - R[a, b]) for a in range(2) for b in range(2))
            assert err <= scale * mpmath.mpf(10) ** -40, float(err / scale)


# ----- closed forms that cancel: evaluated at a raised precision -------------------------------

@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(digits=st.integers(3, 6), power=st.sampled_from([1, 3]), g2=st.sampled_from(["5/4", "2", "1/3"]))
def test_cancelling_closed_form_is_evaluated_accurately(digits, power, g2):
    """A drift c = (4 pi - r)^power with r a d-digit rational approximation of 4 pi (|c| 1e-30 ..
    1e-3): sympy's Sigma is a sum of terms ~1/c that cancel to O(1), which lost more digits than
    the 36 the quadratures need at 200 bits ("quadrature did not converge" from a valid spec,
    found by the generated-spec survey). Sigma and R against mpmath at 100 digits from the
    scalar OU formula Sigma = S0 e^(2ct) + g^2 (e^(2ct) - 1) / (2c)."""
    import mpmath
    from derive._api import _spec_from_text
    r = sp.Rational(round(4 * float(sp.pi) * 10 ** digits), 10 ** digits)
    text = (f"name: cancel\nstate: [x]\ndrift: [[(4 * pi - {r})**{power}]]\ndiffusion: [[sqrt({g2})]]\n"
            "initial_covariance: [[1/25]]\ntime: {t_min: 0.01, T: 1/2}\n")
    deriv = _derivation.Derivation(_spec_from_text(text, "cancel.yaml"))
    assert deriv.sigma_kind == _derivation.CLOSED
    tt = np.array([_hp.mpf(sp.Rational(j, 16)) for j in (1, 4, 8)], dtype=object)
    got_sigma, got_R = deriv.sigma(tt)[:, 0, 0, 0], deriv.R(tt)[:, 0, 0, 0]
    with mpmath.workdps(100):
        c = (4 * mpmath.pi - mpmath.mpf(r.p) / r.q) ** power
        g = mpmath.mpf(sp.Rational(g2).p) / sp.Rational(g2).q
        for tv, s_got, r_got in zip(tt, got_sigma, got_R):
            tm = _hp.to_mpmath(tv)
            want = mpmath.mpf(1) / 25 * mpmath.exp(2 * c * tm) + g * mpmath.expm1(2 * c * tm) / (2 * c)
            assert abs(_hp.to_mpmath(s_got) - want) <= mpmath.mpf("1e-40") * want
            assert abs(_hp.to_mpmath(r_got) - mpmath.sqrt(want)) <= mpmath.mpf("1e-40") * mpmath.sqrt(want)


@settings(max_examples=3, deadline=None, derandomize=True, database=None)
@given(digits=st.integers(22, 30), half=st.sampled_from(["1/2", "2/5"]))
def test_cancelling_marginal_mean_is_evaluated_accurately(digits, half):
    """The marginal family's Psi = mean_t / mean_s comes from the compiled mean, a closed form like
    any other: mean = 1 - h (1 - exp(-c t)) / c with c = 4 pi - r (r a d-digit rational near 4 pi,
    |c| ~ 1e-d) cancels twice (4 pi - r, and 1 - exp(-c t) ~ c t), leaving ~60 - d digits at 200
    bits, fewer than the 36 + margin the quadratures need. Psi(t, s) against mpmath at 100 digits
    to 1e-40 (fails without the precision probe on the mean)."""
    import mpmath
    from derive._api import _spec_from_text
    r = sp.Rational(round(4 * float(sp.pi) * 10 ** 15), 10 ** 15)          # 15 exact digits ...
    r += sp.Rational(round((4 * sp.pi - r).evalf(digits + 5) * 10 ** digits), 10 ** digits)   # ... then d
    text = (f"name: cancelmean\nmarginal:\n  mean: 1 - {half} * (1 - exp(-(4 * pi - {r}) * t)) / (4 * pi - {r})\n"
            "  std: t + 1/10\ntime: {t_min: 0.01, T: 1}\n")
    deriv = _derivation.Derivation(_spec_from_text(text, "cancelmean.yaml"))
    assert deriv._psi_mode == "marginal"
    pairs = [(sp.Rational(1, 50), sp.Rational(1, 4)), (sp.Rational(1, 3), sp.Rational(7, 8)), (sp.Rational(1, 2), 1)]
    got = deriv.psi(_hp.array([float(a) for a, _ in pairs]), _hp.array([float(b) for _, b in pairs]))[:, 0, 0, 0]
    D = deriv.data_to_state(_hp.array([float(b) for _, b in pairs]))[:, 0, 0, 0]
    with mpmath.workdps(100):
        c = 4 * mpmath.pi - mpmath.mpf(r.p) / r.q
        h = mpmath.mpf(sp.Rational(half).p) / sp.Rational(half).q
        mean = lambda x: 1 + h * mpmath.expm1(-c * x) / c
        for (a, b), g, d in zip(pairs, got, D):
            ta, tb = (_hp.to_mpmath(_hp.mpf(float(v))) for v in (a, b))
            want = mean(ta) / mean(tb)
            assert abs(_hp.to_mpmath(g) - want) <= mpmath.mpf("1e-40") * abs(want), float(abs(_hp.to_mpmath(g) / want - 1))
            assert abs(_hp.to_mpmath(d) - mean(tb)) <= mpmath.mpf("1e-40") * abs(mean(tb))


# ----- dense solutions with panels narrower than a float64 step ---------------------------------

@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(c=st.floats(0.05, 0.95), width=st.sampled_from([1e-17, 1e-20, 1e-30]), n=st.sampled_from([8, 16]))
def test_dense_reads_the_panel_that_holds_the_time(c, width, n):
    """Near a kink of the coefficients (|t - c|: the survey's 6-state spec) the ODE panels shrink
    below a float64 step; Dense located the panel with float64 edges and read an interpolant
    outside its panel (Sigma -3.9e8 for a covariance of size 1; 'ODE coefficient is nan' later).
    Panels of exp (the tiny panels interpolate it to ~1e-60, a wide panel read outside its range
    to ~1e-20 at best), queried inside the tiny panels."""
    from derive import _ode
    xs, _, _, _ = _ode._chebyshev(n)
    cm = _hp.mpf(c)
    w = _hp.mpf(width)
    edges = [_hp.mpf(0), cm - 2 * w, cm - w, cm, cm + w, cm + 2 * w, _hp.mpf(1)]
    f = gmpy2.exp
    panels = [np.array([[f(a + (x + 1) * (b - a) / 2)] for x in xs], dtype=object)
              for a, b in zip(edges[:-1], edges[1:])]
    dense = _ode.Dense(edges, panels, n)
    queries = np.array([cm - w * gmpy2.mpfr("1.5"), cm - w / 3, cm + w / 7, cm + w * gmpy2.mpfr("1.25")],
                       dtype=object)
    got = dense(queries)[:, 0]
    for q, g in zip(queries, got):
        assert abs(g - f(q)) <= gmpy2.mpfr("1e-50") * abs(f(q)), (float(q), float(g), float(f(q)))


# ----- kinks of the coefficients: panel edges exactly there ---------------------------------------

def test_breakpoints_of_every_switching_function():
    """Every head whose value or derivative jumps gives its switching times, exactly: Abs, sign,
    Heaviside (argument = 0), Min/Max (a = b), Piecewise (its condition's boundary), floor/ceiling
    (integer crossings); roots outside (0, T) and smooth expressions give none."""
    from types import SimpleNamespace
    from derive._spec import t
    T = sp.Integer(1)
    cases = [
        (sp.Abs(t - sp.Rational(3, 10)), [sp.Rational(3, 10)]),
        (sp.Heaviside(t - sp.Rational(1, 2)) * t, [sp.Rational(1, 2)]),
        (sp.sign(2 * t - sp.Rational(1, 3)), [sp.Rational(1, 6)]),
        (sp.Min(t, 1 - t), [sp.Rational(1, 2)]),
        (sp.Max(sp.Rational(1, 4), t ** 2), [sp.Rational(1, 2)]),
        (sp.Piecewise((t, t < sp.Rational(2, 5)), (sp.Rational(2, 5), True)), [sp.Rational(2, 5)]),
        (sp.floor(3 * t) + sp.ceiling(2 * t - sp.Rational(1, 10)),
         [sp.Rational(1, 3), sp.Rational(2, 3), sp.Rational(1, 20), sp.Rational(11, 20)]),
        (sp.Abs(t ** 2 - sp.Rational(1, 2)), [1 / sp.sqrt(2)]),
        (sp.Abs(t - 2) + sp.exp(t), []),                          # root outside (0, T)
        (sp.cos(t) * t, []),
    ]
    for expr, want in cases:
        spec = SimpleNamespace(F=sp.Matrix([[expr]]), G=sp.Matrix([[1]]), form="matrix", T=T,
                               basis=SimpleNamespace(symbol=None))
        got = _derivation.breakpoints(spec)
        want = sorted(want, key=float)
        assert len(got) == len(want), (expr, got)
        for g, w in zip(got, want):
            assert abs(g - gmpy2.mpfr(str(sp.N(w, 80)))) <= abs(g) * gmpy2.mpfr(2) ** -195, (expr, g, w)


KINK_SPEC = """name: kinks
state: [x, v]
drift:
- [-1 - 2 * sqrt((t - 3/10)**2), 1]
- [-1, -1/2 - sqrt(((12/5) * t - 13/20)**2)]
diffusion:
- [1, 0]
- [0, 1/2 + sqrt((t - 7/10)**2)]
initial_covariance:
- [1, 0]
- [0, 1/2]
time: {t_min: 1/100, T: 1}
"""


def test_kink_spec_is_exact_across_its_kinks():
    """A spec with kinks |t - c| in F and G (c = 3/10, 13/48, 7/10): the panels end on them, and
    Psi across a kink, Sigma and R after them agree with mpmath.odefun run piece by piece between
    the exact kinks (45 digits) to 1e-40."""
    import mpmath
    from derive._api import _spec_from_text
    from validation._reference import MpReference, _mat, _vec
    deriv = _derivation.Derivation(_spec_from_text(KINK_SPEC, "kinks.yaml"))
    cs = [sp.Rational(13, 48), sp.Rational(3, 10), sp.Rational(7, 10)]
    assert [float(b) for b in deriv.breaks] == [float(c) for c in cs]
    k = 2
    with mpmath.workdps(45):
        ref = MpReference(deriv.spec)
        with mpmath.extraprec(60):       # each piece starts just right of its kink (odefun differences forwards)
            exact = [mpmath.mpf(c.p) / c.q + mpmath.mpf(2) ** -190 for c in cs]

        def piecewise(rhs, a, y0, b):
            y = y0
            pts = [a] + [c for c in exact if a < c < b] + [b]
            for lo, hi in zip(pts[:-1], pts[1:]):
                y = mpmath.odefun(rhs, lo, y)(hi)
            return y
        lyap = lambda r, y: _vec(ref.F(r) * _mat(k, y) + _mat(k, y) * ref.F(r).T + ref.G(r) * ref.G(r).T)
        back = lambda r, y: _vec(-(_mat(k, y) * ref.F(r)))
        t_, s_ = mpmath.mpf("0.25"), mpmath.mpf("0.75")
        want_psi = _mat(k, piecewise(back, t_, _vec(mpmath.eye(k)), s_))
        want_sigma = _mat(k, piecewise(lyap, mpmath.mpf(0), _vec(ref.Sigma0), s_))
        got_psi = deriv.psi(_hp.array([0.25]), _hp.array([0.75]))[0, 0]
        got_sigma = deriv.sigma(_hp.array([0.75]))[0, 0]
        got_R = deriv.R(_hp.array([0.75]))[0, 0]
        for got, want in ((got_psi, want_psi), (got_sigma, want_sigma)):
            scale = mpmath.mnorm(want, 1)
            err = max(abs(_hp.to_mpmath(got[i, j]) - want[i, j]) for i in range(k) for j in range(k))
            assert err <= scale * mpmath.mpf(10) ** -40, float(err / scale)
        R = mpmath.matrix([[_hp.to_mpmath(got_R[i, j]) for j in range(k)] for i in range(k)])
        assert mpmath.mnorm(R * R.T - want_sigma, 1) <= mpmath.mnorm(want_sigma, 1) * mpmath.mpf(10) ** -40
        assert mpmath.mnorm(R - ref.R(s_), 1) <= mpmath.mnorm(R, 1) * mpmath.mpf(10) ** -40


K4_KINK_SPEC = """name: k4kinks
state: [a, b, c, d]
drift:
- [-1 - sqrt(((12/5) * t - 13/20)**2), 1/2, 0, 1/4]
- [-1/2, -1, 1/3, 0]
- [0, -1/3, -3/4, sqrt((t - 7/10)**2)]
- [-1/4, 0, -1, -1]
diffusion:
- [1, 0, sqrt((t - 1/5)**2)]
- [0, 1/2 + sqrt((3 * t - 1)**2), 0]
- [t, 0, 1]
- [0, 1/3, 1/2]
initial_covariance:
- [1, 0, 0, 0]
- [0, 1, 0, 0]
- [0, 0, 1, 0]
- [0, 0, 0, 1]
time: {t_min: 1/100, T: 1}
"""


@pytest.mark.slow
def test_kink_spec_derives_fast():
    """Issue 10: a 4-state spec with four kinks |t - c| derived (every dense solution and an order-3
    table of 5 steps) in <= 15 s of CPU (108 s before the panels ended on the kinks: they refined
    towards each kink down to 1e-40 of the interval); the table passes the full 45-digit check."""
    import time
    from derive._api import _spec_from_text
    from derive._pipeline import TableOptions, build_table, tool_versions
    from validation import check_table
    start = time.process_time()
    spec = _spec_from_text(K4_KINK_SPEC, "k4kinks.yaml")
    deriv = _derivation.Derivation(spec)
    assert len(deriv.breaks) == 4
    request = TableOptions(nfe=(6,), order=3, grid="uniform").requests(spec)[0]
    tensors, meta = build_table(deriv, request, "k4kinks", tool_versions(), verify="none")
    cpu = time.process_time() - start
    assert cpu <= 15, f"derivation took {cpu:.0f} s of CPU"
    report = check_table(spec, tensors, meta, level="full")
    assert report.passed, report.text()


def test_closed_form_that_cancels_beyond_the_probe_is_refused():
    """A sympy Sigma that cancels beyond 4 x 200 bits (drift c = (4/5)(4 e - 685/63)^3 ~ 1.1e-12,
    G = -(7/5)|t| - 17/40: sums of exponentials with ~1e26 coefficients; census seed 9103) is not
    kept at 200 bits (it read Sigma(0.1) = -6.9e26): its numerical route gives Sigma of the scalar
    OU formula Sigma = e^(2ct) (S0 + int_0^t e^(-2cr) g(r)^2 dr), mpmath at 50 digits, to 1e-40."""
    import mpmath
    from derive._api import _spec_from_text
    text = ("name: cancel2\nstate: [x]\ndrift: [[((4 * E - 685/63)**3) * 4/5]]\n"
            "diffusion: [[-((7/5) * sqrt(t**2) + 17/40)]]\ninitial_covariance: [[1]]\ntime: {t_min: 0.01, T: 1}\n")
    deriv = _derivation.Derivation(_spec_from_text(text, "cancel2.yaml"))
    tt = [sp.Rational(1, 10), sp.Rational(1, 2), sp.Integer(1)]
    got = deriv.sigma(np.array([_hp.mpf(v) for v in tt], dtype=object))[:, 0, 0, 0]
    with mpmath.workdps(50):
        c = (4 * mpmath.e - mpmath.mpf(685) / 63) ** 3 * 4 / 5
        g2 = lambda r: (mpmath.mpf(7) / 5 * r + mpmath.mpf(17) / 40) ** 2
        for v, s_got in zip(tt, got):
            tm = mpmath.mpf(v.p) / v.q
            want = mpmath.exp(2 * c * tm) * (1 + mpmath.quad(lambda r: mpmath.exp(-2 * c * r) * g2(r), [0, tm]))
            assert abs(_hp.to_mpmath(s_got) - want) <= mpmath.mpf("1e-40") * want, (v, float(_hp.to_mpmath(s_got)))
