"""How Psi(t,s), Sigma_t and R_t are derived for one spec (MATH.md sections 1-2); how they are
evaluated (MPFR arrays, ODE solutions) is in ``_evaluators``.

Symbolic first (sympy, exact), numerical high-precision fallback where no closed form is found,
and each quantity labelled with how it was obtained. Routes are chosen by structure first, so
that the label does not depend on machine load (the sympy time budget is a safety net):

- Psi(t,s): closed form for the marginal form (mean_t / mean_s), F = 0, F = f(t) A (exp of
  A times int_s^t f: 2 x 2 in real form directly, larger A through sympy only when its
  characteristic polynomial splits into linear factors) and diagonal F; F = f(t) A otherwise:
  expm(A (I(t) - I(s))) evaluated numerically; any other F: dPhi/dt = F Phi, Phi(t) Phi(s)^-1.
- Sigma_t: marginal form std_t^2; otherwise Psi(t,0) [Sigma_0 + int_0^t Psi(0,r) G G^T
  Psi(0,r)^T dr] Psi(t,0)^T integrated by sympy, or, when G G^T = f(t) B, the algebraic
  Lyapunov identity (no integral; first when the eigenvalues of A are irrational); that identity
  evaluated numerically when Psi is numerical; else the Lyapunov ODE at high precision.
- R_t: k = 1: sqrt(Sigma_t). k > 1: the linear ODE dR/dt = (F + 1/2 G G^T Sigma^-1) R with
  R_0 from the spec, integrated at high precision; "semi-closed" when its coefficients are
  closed forms (the rotation R = L Q has no closed form in general).
"""

import contextlib
import gc
import signal
import threading

import gmpy2
import numpy as np
import sympy as sp
from sympy.polys.polyerrors import BasePolynomialError   # PolynomialError, CoercionFailed, HeuristicGCDFailed, ...

from . import _hp
from ._evaluators import Evaluators, _lyapunov_system, _lyapunov_terms, _pairs
from ._errors import SpecError
from ._spec import t

# Internal symbols are Dummies (never equal to a user Symbol of the same name) whose names start
# with "_", outside the user grammar [A-Za-z][A-Za-z0-9_]*, so that the evaluators' environments
# (keyed by name) cannot confuse them with a user name either. codegen prints them as s, r, B.
s = sp.Dummy("_s", real=True, nonnegative=True)      # start time of Psi(t, s)
r = sp.Dummy("_r", real=True, nonnegative=True)      # integration variable of Sigma
B = sp.Dummy("_B", real=True)                        # argument of expm(A B), B = int_s^t f
INTERNAL = {s: "s", r: "r", B: "B"}                  # readable names for the printed formulas
SYMPY_SECONDS = 20         # CPU-time budget for each sympy attempt before the numerical fallback
                           # (CPU time, generous: the closed/numerical choice must not depend on load)

CLOSED, SEMI, NUMERICAL = "closed form", "semi-closed", "numerical"


@contextlib.contextmanager
def _time_limit(seconds):
    """Raise TimeoutError in the block after ``seconds`` of this process's CPU time (main thread
    only; else no limit). CPU time, not wall time: on a busy machine the block waits for a core
    without spending its budget, so whether a closed form is found does not depend on the load."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        if _in_finaliser(frame):
            return      # Python prints and ignores exceptions there; the timer fires again in 0.5 s
        raise TimeoutError

    old = signal.signal(signal.SIGPROF, _raise)
    # re-fire every 0.5 s after the deadline: sympy swallows some exceptions internally (a single
    # TimeoutError raised inside such a try block was lost and integrate() ran on for > 10 min)
    signal.setitimer(signal.ITIMER_PROF, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def _in_finaliser(frame, depth=12):
    """True when ``frame`` runs inside a gc callback or a __del__ (within ``depth`` frames): an
    exception raised there is printed as a traceback and ignored (seen with hypothesis' gc
    callback in the generated-spec tests), so the time limit must not raise there."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None and depth > 0:
        if frame.f_code.co_name == "__del__" or frame.f_code in callbacks:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def _try_sympy(fn):
    """Run a sympy computation under the time budget; None when it fails or gives up."""
    try:
        with _time_limit(SYMPY_SECONDS):
            out = fn()
    except (TimeoutError, NotImplementedError, ValueError, TypeError, ZeroDivisionError,
            RecursionError, AttributeError, BasePolynomialError):
        return None
    if out is None or out.has(sp.Integral, sp.zoo, sp.nan, sp.oo, -sp.oo):
        return None
    if out.has(sp.Piecewise, sp.I, sp.exp_polar, sp.LambertW, sp.Heaviside, sp.DiracDelta):
        return None
    return out


# heads whose value or derivative jumps where an argument crosses 0
_SWITCHES = (sp.Abs, sp.sign, sp.Heaviside)
MAX_BREAKS = 64


def breakpoints(spec, coord_values=()):
    """Sorted exact times in (0, T) where F or G (or a marginal family's mean / std) is not
    smooth: the zeros in t of the arguments of Abs, sign, Heaviside, of a - b in Min(a, b) /
    Max(a, b), of lhs - rhs in a Piecewise condition, and the integer crossings of floor /
    ceiling (each for a polynomial argument in t of degree <= 4 with numeric coefficients: exact
    roots for degree 1 or rational coefficients, 90-digit numerical ones otherwise; with a basis symbol, one root per distinct coordinate value, up to
    MAX_BREAKS). The ODE panels and quadrature panels then end exactly there, so each panel is
    smooth: without this they refine geometrically towards a kink |t - c| down to 1e-40 of the
    interval (hundreds of panels per solve; 60-106 s derivations in the generated-spec survey).
    Returns MPFR values (PREC_BITS); an argument that is not handled adds nothing (the adaptive
    panels still resolve it, slowly)."""
    exprs = list(spec.F) + list(spec.G)
    if spec.form == "marginal":
        exprs += [spec.mean, spec.std]
    T = sp.nsimplify(spec.T)
    sym = spec.basis.symbol
    found = set()
    for e in exprs:
        for arg, integer in _switch_arguments(sp.sympify(e)):
            for a in ([arg] if sym is None or not arg.has(sym) else
                      [arg.subs(sym, v) for v in coord_values[:MAX_BREAKS]]):
                for root in _roots_in(a, T, integer):
                    found.add(root)
                if len(found) > MAX_BREAKS:
                    break
    vals = sorted({gmpy2.mpfr(str(sp.N(r, 90))) for r in found})    # correctly rounded to PREC_BITS
    return tuple(v for v in vals if 0 < v < _hp.mpf(spec.T))[:MAX_BREAKS]


def _switch_arguments(expr):
    """(argument, integer) pairs: where argument = 0 (integer=False) or crosses an integer."""
    out = []
    for node in sp.preorder_traversal(expr):
        if not node.has(t):
            continue
        if isinstance(node, _SWITCHES):
            out.append((node.args[0], False))
        elif isinstance(node, (sp.Min, sp.Max)):
            out += [(a - b, False) for i, a in enumerate(node.args) for b in node.args[i + 1:]]
        elif isinstance(node, sp.Piecewise):
            for _, cond in node.args:
                for rel in cond.atoms(sp.core.relational.Relational):
                    out.append((rel.lhs - rel.rhs, False))
        elif isinstance(node, (sp.floor, sp.ceiling, sp.frac)):
            out.append((node.args[0], True))
    return [(a, i) for a, i in out if a.has(t)]


def _roots_in(arg, T, integer):
    """Exact real roots in (0, T) of arg(t) = 0 (integer: arg(t) = n for every integer n in its
    range), for a polynomial of degree <= 4 in t; () when sympy cannot say within its budget."""
    def solve():
        poly = sp.Poly(sp.expand(arg), t)
        if poly.degree() < 1 or poly.degree() > 4 or not all(c.is_number for c in poly.coeffs()):
            return None
        targets = [0]
        if integer:
            ends = [poly.eval(v) for v in (0, T)] + [poly.eval(r) for r in _real_roots(poly.diff(t))
                                                    if 0 < sp.N(r, 90) < T] if poly.degree() > 1 else \
                [poly.eval(v) for v in (0, T)]
            lo, hi = sp.floor(min(ends)), sp.ceiling(max(ends))
            if hi - lo > MAX_BREAKS:
                return None
            targets = list(range(int(lo), int(hi) + 1))
        roots = set()
        for n in targets:
            roots.update(r for r in _real_roots(poly - n) if 0 < sp.N(r, 90) < T)
        return sp.Tuple(*roots)
    if not arg.free_symbols <= {t}:
        return ()
    try:
        out = _try_sympy(solve)
    except BasePolynomialError:
        return ()
    return tuple(out) if out is not None else ()


def _real_roots(poly):
    """Real roots of a univariate polynomial with numeric coefficients: exact for degree 1 or
    rational coefficients, else sympy's 90-digit numerical roots (constants such as E or pi)."""
    if poly.degree() == 1:
        c1, c0 = poly.all_coeffs()
        return [-c0 / c1]
    if all(c.is_Rational for c in poly.coeffs()):
        return sp.real_roots(poly)
    return [sp.re(r) for r in poly.nroots(n=90) if abs(sp.im(r)) < sp.Float(10) ** -80]


def _antiderivative(f):
    if not f.has(t):
        return f * t
    return _try_sympy(lambda: sp.integrate(f, t))


def _real_expm(A):
    """exp(A B) for real A and B; complex eigenvalues (an under-damped oscillator) give exp, cos
    and sin of real arguments instead of complex exponentials. None when no real form is found."""
    E = sp.simplify((A * B).exp())
    if E.has(sp.I):
        E = E.applyfunc(lambda e: sp.simplify(sp.expand_complex(e)))
    return None if E.has(sp.I) else E


class Derivation(Evaluators):
    """How Psi, Sigma and R are derived: closed forms (sympy, exact) where found, else the
    numerical route each quantity takes, with its label and a note. The evaluation itself (MPFR
    arrays, ODE solutions) is inherited from ``_evaluators.Evaluators``.
    """

    def __init__(self, spec):
        self.spec = spec
        self.k = spec.k
        lam = spec.basis.symbol
        values = spec.basis.values()
        uniq = {}
        index = []
        for v in values:
            index.append(uniq.setdefault(v, len(uniq)))
        self.coord_index = np.array(index, dtype=np.int64)
        reps = list(uniq)
        self.coord_values = (None if lam is None else
                             np.array([_hp.compile_expr(v)({}) for v in reps], dtype=object))
        self.n_distinct = len(reps)
        self.notes = []
        self._dense, self._backward = {}, {}     # dense ODE solutions (see _evaluators)
        self.breaks = breakpoints(spec, reps)    # kinks/jumps of F, G in (0, T): panel edges there
        self._F = _hp.compile_matrix(spec.F)
        self._G = _hp.compile_matrix(spec.G)
        self._derive_psi()
        self._derive_sigma()
        self._check_noise_at_t_min()
        self._derive_R()
        self._dense, self._backward = {}, {}     # none computed by the probes above is kept
        self.noise_free = self._noise_free()

    def _check_noise_at_t_min(self):
        self.check_noise_at(self.spec.t_min, "time.t_min")

    def check_noise_at(self, time, key, where=None):
        """Sigma_time must be positive definite and resolved: the tables need R_t^-1 at every grid time
        (once positive, Sigma stays so: Psi Sigma_s Psi^T > 0). It is not when Sigma_0 is singular and
        no noise has entered by then (G = 0 on [0, time], or everywhere at some coordinate), when the
        noise is beyond float64 (exp(-1/t) noise: Sigma ~ 1e-869 at 1e-3), or below the evaluation's
        rounding: a closed form is evaluated again at twice the precision and must agree to 2^-20
        relative (1 - exp(-t^2) cancels to 0 at t = 1e-40); an ODE route's Sigma must stand 1e10 above
        its tolerance _hp.TOL relative to its size."""
        tt = np.array([_hp.mpf(time)], dtype=object)
        S = self.sigma(tt)[0]
        if self._sigma_mode == "closed":
            base = self._sigma.precision
            self._sigma.precision = 2 * base
            try:
                finer = self.sigma(tt)[0]
            finally:
                self._sigma.precision = base
            resolved = [_hp.abs_max(finer[p] - S[p]) <= _hp.abs_max(finer[p]) * gmpy2.mpfr(2) ** -20
                        for p in range(self.n_distinct)]
            floor = [0] * self.n_distinct
        else:
            top = self.sigma(np.array([_hp.mpf(self.spec.T)], dtype=object))[0]
            resolved = [True] * self.n_distinct
            floor = [_hp.TOL * 10 ** 10 * max(_hp.abs_max(S[p]), _hp.abs_max(top[p])) for p in range(self.n_distinct)]
        for p in range(self.n_distinct):
            if (resolved[p] and all(gmpy2.is_finite(v) for v in np.ravel(S[p]))
                    and _float64_factorable(S[p] - floor[p] * _hp.eye(self.k))):
                continue
            at = "" if self.spec.basis.symbol is None else f" ({self.spec.basis.symbol.name} = {float(self.coord_values[p]):.6g})"
            raise SpecError(where or self.spec.path, key,
                            f"Sigma_t at t = {float(time):.6g}{at} is singular or below the rounding of its evaluation "
                            "(Sigma_0 singular and no noise entered by then, noise beyond float64, or a closed form "
                            "cancelling at tiny t), but R_t^-1 is needed at every grid time: raise t_min (time.t_min "
                            "or the grid's last time) or give a positive initial_covariance")

    def _noise_free(self):
        """Boolean [n_distinct]: coordinates where G G^T is identically zero (exactly, by sympy).

        There W(r) = Psi(t,r) R_r is constant in r (dW/dr = 1/2 Psi G G^T R^-T = 0), so every
        multistep weight, PsiHat - Psi and P_st are exactly zero; the tables store exact zeros
        instead of the rounding residue of R_t - Psi R_s (the DC frequency of inverse heat
        dissipation: zero drift and zero noise). Candidates are the coordinates where G G^T
        evaluates to exact zeros on a probe grid; sympy confirms each.
        """
        out = np.zeros(self.n_distinct, dtype=bool)
        T = _hp.mpf(self.spec.T)
        tt = np.array([T * j / 8 for j in range(9)], dtype=object)
        try:
            G = self.G(tt)
        except (ArithmeticError, ValueError, TypeError):
            return out
        GG = G @ _hp.T(G)
        lam = self.spec.basis.symbol
        reps = list(dict.fromkeys(self.spec.basis.values()))
        GGs = self.spec.G * self.spec.G.T
        for p in range(self.n_distinct):
            if any(v != 0 for v in np.ravel(GG[:, p])):
                continue
            M = GGs if lam is None else GGs.subs(lam, reps[p])
            zero = _try_sympy(lambda: sp.Integer(int(all(sp.simplify(e) == 0 for e in M))))
            out[p] = zero == 1
        return out

    # ----- Psi -----------------------------------------------------------------------------
    def _derive_psi(self):
        spec, k = self.spec, self.k
        self.psi_expr = None
        if spec.form == "marginal":
            self.psi_expr = sp.Matrix([[spec.mean / spec.mean.subs(t, s)]])
            self._mean = _hp.compile_matrix(sp.Matrix([[spec.mean]]))
            self.psi_kind = CLOSED
            self._psi_mode = "marginal"
            # the mean is a closed form like any other: where its terms cancel (1 - exp(-c t)
            # with a tiny c), the probe raises its evaluation precision
            if not self._finite(lambda tt: self._mean(self._env(tt), self._shape(tt)), self._mean):
                raise SpecError(spec.path, "marginal.mean", "not finite (or not accurate at four times the working "
                                f"precision) on [0, T] = [0, {spec.T}]: overflow or cancellation in the expression")
            return
        F = spec.F
        if F.is_zero_matrix:
            self.psi_expr, self.psi_kind, self._psi_mode = sp.eye(k), CLOSED, "identity"
            return
        self._linear = _drift_factor(spec)             # (f, A, I) when F = f(t) A, else None
        if self._linear is not None and self._psi_expm_closed():
            return
        if F.is_diagonal() and self._psi_diagonal():
            return
        if self._linear is not None and self._psi_expm_numeric():
            return
        self.psi_kind, self._psi_mode = NUMERICAL, "ode"
        self.notes.append("Psi: no closed form found; dPhi/dt = F Phi integrated at high precision, "
                          "Psi(t,s) = Phi(t) Phi(s)^-1.")

    def _psi_expm_closed(self):
        """Psi = exp(A (I(t) - I(s))) with sympy's matrix exponential (when it has a real form)."""
        f, A, I, _ = self._linear
        if self.k > 1 and not _eigenvalues_closed(A):
            return False      # roots of a cubic or worse: no usable closed form, skip sympy's exp
        if self.k == 1:
            E = sp.Matrix([[sp.exp(A[0, 0] * B)]])
        else:
            E = _expm_2x2(A) if self.k == 2 else None
            E = E if E is not None else _try_sympy(lambda: _real_expm(A))
        if E is None or any(e.has(sp.I) for e in E):
            return False
        try:
            self._E = _hp.compile_matrix(E)
        except _hp.Unsupported:                    # a function MPFR cannot evaluate: go numerical
            return False
        self._E_argument = B.name
        return self._accept_closed_psi(E.subs(B, I - I.subs(t, s)), "expm", self._E)

    def _psi_diagonal(self):
        spec, k = self.spec, self.k
        Is = [_antiderivative(spec.F[i, i]) for i in range(k)]
        try:
            diag = _hp.compile_matrix(sp.diag(*Is)) if all(I is not None for I in Is) else None
        except _hp.Unsupported:
            diag = None
        if diag is None:
            return False
        self._Ediag = diag
        return self._accept_closed_psi(sp.diag(*[sp.exp(I - I.subs(t, s)) for I in Is]), "diagonal", diag)

    def _accept_closed_psi(self, expr, mode, compiled):
        """Take the closed form ``expr`` of Psi (evaluated by ``compiled`` in ``mode``) when it is
        finite and accurate on the probe grid (precision raised there if it cancels); else undo."""
        self.psi_expr = expr
        self.psi_kind, self._psi_mode = CLOSED, mode
        if self._finite(lambda tt: self.psi(tt, tt * 0), compiled):
            return True
        self.psi_expr = None
        return False

    def _psi_expm_numeric(self):
        """Psi = expm(A (I(t) - I(s))) evaluated numerically at high precision (no ODE)."""
        self._A = _hp.compile_matrix(self._linear[1])(self._env(_hp.zeros((1,))), (1, self.n_distinct))[0]
        self.psi_kind, self._psi_mode = NUMERICAL, "expm numeric"
        if not self._finite(lambda tt: self.psi(tt, tt * 0)):
            return False
        self.notes.append("Psi: F = f(t) A with A constant and no closed-form exponential; "
                          "Psi(t,s) = expm(A (I(t) - I(s))), I = int f, evaluated at high precision "
                          "(scaling and squaring).")
        return True


    # ----- Sigma ---------------------------------------------------------------------------
    def _derive_sigma(self):
        spec = self.spec
        self.sigma_expr, self._sigma_mode = None, "closed"
        if spec.form == "marginal":
            self.sigma_expr = sp.Matrix([[spec.std ** 2]])
        elif self.psi_kind == CLOSED and self._psi_mode in ("expm", "identity", "diagonal"):
            # sympy integrates polynomials times exponentials with rational rates quickly; with
            # square roots in the rates it may take minutes, so the algebraic identity goes first
            routes = [self._sigma_closed_form, self._sigma_lyapunov_closed]
            if self._psi_mode == "expm" and not _eigenvalues_closed(self._linear[1], rational=True):
                routes.reverse()
            for route in routes:
                self.sigma_expr = _try_sympy(route)
                if self.sigma_expr is not None:
                    break
        if self.sigma_expr is not None:
            try:
                self._sigma = _hp.compile_matrix(self.sigma_expr)
            except _hp.Unsupported:                # e.g. a special function sympy chose
                self.sigma_expr = None
        if self.sigma_expr is not None and self._finite(self.sigma, self._sigma):
            self.sigma_kind = CLOSED
            return
        if spec.form == "marginal":                # Sigma = std^2 is the spec itself: no other route
            raise SpecError(spec.path, "marginal.std", "std^2 is not finite (or not accurate at four times the "
                            f"working precision) on [0, T] = [0, {spec.T}]: overflow or cancellation in the expression")
        self.sigma_expr, self.sigma_kind = None, NUMERICAL
        if self._sigma_lyapunov_numeric():
            self.notes.append("Sigma: G G^T = f(t) B with F = f(t) A; Sigma = Psi(t,0) Sigma_0 Psi(t,0)^T "
                              "+ X with A X + X A^T = Psi(t,0) B Psi(t,0)^T - B, solved at high precision.")
            return
        self._sigma_mode = "ode"
        self.notes.append("Sigma: no closed form found; Lyapunov ODE dSigma/dt = F Sigma + Sigma F^T "
                          "+ G G^T integrated at high precision.")

    def _noise_factor(self):
        """B with G G^T = f(t) B, B constant in t, when F = f(t) A; else None.

        Then in u = int f, dSigma/du = A Sigma + Sigma A^T + B has constant coefficients and
        Sigma = E Sigma_0 E^T + X, E = exp(A u), where A X + X A^T = E B E^T - B (differentiate
        both sides: an exact identity, no integral), whenever the Lyapunov operator is invertible
        (no two eigenvalues of A sum to zero)."""
        if self._linear is None:
            return None
        GG = self.spec.G * self.spec.G.T
        Bm = GG.applyfunc(lambda e: sp.cancel(e / self._linear[0]))
        return None if Bm.has(t) else Bm

    def _sigma_lyapunov_closed(self):
        Bm = self._noise_factor() if self._psi_mode == "expm" else None
        if Bm is None:
            return None
        L = _lyapunov_matrix(self._linear[1])
        if sp.simplify(L.det()) == 0:
            return None
        E = self.psi_expr.subs(s, 0)
        X = _unvech_sympy(L.LUsolve(_vech_sympy(E * Bm * E.T - Bm)), self.k)
        return (E * self.spec.Sigma0 * E.T + X).applyfunc(sp.expand)

    def _sigma_lyapunov_numeric(self):
        """Sigma from the algebraic Lyapunov identity (see _noise_factor) with Psi evaluated
        numerically or in closed form; False when it does not apply or is not finite."""
        Bm = self._noise_factor()
        if Bm is None or self._psi_mode not in ("expm", "expm numeric"):
            return False
        one = self._env(_hp.zeros((1,)))
        A = _hp.compile_matrix(self._linear[1])(one, (1, self.n_distinct))[0]
        L = _lyapunov_system(A, _hp.zeros(A.shape), gmpy2.mpfr(1))[..., :-1, :-1]
        try:
            self._lyap = (_hp.compile_matrix(Bm)(one, (1, self.n_distinct))[0], _hp.inv(L))
        except _hp.EvaluationError:                # singular Lyapunov operator
            return False
        self._sigma_mode = "lyapunov"
        if self._finite(self.sigma):
            return True
        self._sigma_mode = "ode"
        return False

    def _sigma_closed_form(self):
        spec, k = self.spec, self.k
        P_t0 = self.psi_expr.subs(s, 0)
        P_0r = self.psi_expr.subs({t: 0, s: r}, simultaneous=True)
        GG = (spec.G * spec.G.T).subs(t, r)
        integrand = P_0r * GG * P_0r.T
        inner = sp.zeros(k, k)
        for i in range(k):
            for j in range(i, k):
                e = sp.expand(integrand[i, j])
                if e.is_zero:
                    continue
                val = sp.integrate(e, (r, 0, t))
                if val.has(sp.Integral):
                    return None
                inner[i, j] = inner[j, i] = val
        Sigma = P_t0 * (spec.Sigma0 + inner) * P_t0.T
        return Sigma.applyfunc(sp.expand)


    # ----- R -------------------------------------------------------------------------------
    def _derive_R(self):
        k = self.k
        self.R_expr = None
        if k == 1:
            self.R_kind = self.sigma_kind
            if self.sigma_expr is not None:
                self.R_expr = self.sigma_expr.applyfunc(sp.sqrt)
                try:
                    self._R = _hp.compile_matrix(self.R_expr)
                except _hp.Unsupported:            # R = sqrt(Sigma) numerically instead
                    self.R_expr = None
                if self.R_expr is not None and not self._finite(self.R, self._R):
                    self.R_expr = None
            return
        self.R_kind = SEMI if self.sigma_kind == CLOSED and self.psi_kind == CLOSED else NUMERICAL
        self.notes.append("R: dR/dt = (F + 1/2 G G^T Sigma^-1) R from R_0 integrated at high precision "
                          "(implicit Chebyshev collocation panels with iterative refinement, "
                          f"tolerance {float(_hp.TOL):.0e}); "
                          + ("its coefficients are closed forms." if self.R_kind == SEMI else
                             "its coefficients are themselves numerical."))


def _vech_sympy(S):
    return sp.Matrix([S[i, j] for i, j in _pairs(S.shape[0])])


def _unvech_sympy(y, k):
    out = sp.zeros(k, k)
    for q, (i, j) in enumerate(_pairs(k)):
        out[i, j] = out[j, i] = y[q]
    return out


def _lyapunov_matrix(A):
    k = A.shape[0]
    N = k * (k + 1) // 2
    L = sp.zeros(N, N)
    for q, col, a, b in _lyapunov_terms(k):
        L[q, col] += A[a, b]
    return L


def _drift_factor(spec):
    """(f, A, I, compiled I) when F = f(t) A with A constant in t and I = int f dt closed; else None.

    f is the first nonzero entry of F with any factor of the basis symbol removed (else A = F / f
    divides by it and Psi is 0 * inf where the frequency vanishes).
    """
    F = spec.F
    f = next(e for e in F if not e.is_zero)
    if spec.basis.symbol is not None and f.has(spec.basis.symbol):
        f = f.as_independent(t, as_Add=False)[1]
    A = F.applyfunc(lambda e: sp.cancel(e / f))
    if A.has(t):
        return None
    I = _antiderivative(f)
    if I is None:
        return None
    try:
        return f, A, I, _hp.compile_expr(I)
    except _hp.Unsupported:
        return None


def _eigenvalues_closed(A, rational=False):
    """True when the characteristic polynomial of A factors (over the rationals, with the basis
    symbol as a parameter) into linear pieces, or k = 2 (roots in square roots). Quadratic pieces of
    a larger matrix, cubics and quartics have radical roots too, but sympy's exponential of them
    takes minutes (nested radicals in the Jordan basis) and is unusable; a structural test instead
    of a time budget keeps the closed/numerical choice independent of machine load."""
    top = 1 if rational or A.shape[0] > 2 else 2
    if top == 2:
        return True
    try:
        cp = A.charpoly(sp.Dummy("x"))
        factors = sp.Poly(cp.as_expr(), cp.gen, extension=True).factor_list()[1]
    except (TypeError, ValueError, NotImplementedError, BasePolynomialError):   # HeuristicGCDFailed too
        return False
    return all(q.degree() <= top for q, _ in factors)


def _expm_2x2(A):
    """exp(A B) for a real 2 x 2 A whose eigenvalues are distinct numbers, in real form. Real
    eigenvalues l1, l2: exp(l1 B) P1 + exp(l2 B) P2 with the spectral projectors P1 = (A - l2 I) /
    (l1 - l2), P2 = I - P1 (a sum of exponentials: no cancellation, where cosh and sinh of a
    stiff over-damped oscillator cancel to exp(l2 B) and lose digits). Complex l = m +- i w:
    exp(m B) [cos(w B) I + sin(w B) / w (A - m I)]. None otherwise (sympy's route)."""
    m = A.trace() / 2
    d2 = sp.expand(m ** 2 - A.det())
    if not d2.is_number or d2 == 0:
        return None
    N = A - m * sp.eye(2)
    if d2 > 0:
        d = sp.sqrt(d2)
        P1 = (N + d * sp.eye(2)) / (2 * d)
        E = sp.exp((m + d) * B) * P1 + sp.exp((m - d) * B) * (sp.eye(2) - P1)
    else:
        w = sp.sqrt(-d2)
        E = sp.exp(m * B) * (sp.cos(w * B) * sp.eye(2) + sp.sin(w * B) / w * N)
    return E.applyfunc(sp.expand)


def _float64_factorable(S):
    """An MPFR matrix [k, k] has a Cholesky factor whose pivots are within float64's reach (> 2^-500,
    so that R_t^-1 and the tables' products stay finite: exp(-1/t) noise gives Sigma ~ 1e-869 at 1e-3)."""
    try:
        L = _hp.cholesky(S)
    except _hp.EvaluationError:
        return False
    return all(L[j, j] > gmpy2.mpfr(2) ** -500 for j in range(S.shape[0]))
