"""Derivation of Psi(t,s), Sigma_t and R_t for one spec (MATH.md sections 1-2).

Symbolic first (sympy, exact), numerical high-precision fallback where no closed form is found,
and each quantity labelled with how it was obtained:

- Psi(t,s): closed form for the marginal form (mean_t / mean_s), F = 0, F = f(t) A (expm of
  A times int_s^t f) and diagonal F; otherwise numerical (dPhi/dt = F Phi, Psi = Phi(t) Phi(s)^-1).
- Sigma_t: marginal form std_t^2; otherwise Psi(t,0) [Sigma_0 + int_0^t Psi(0,r) G G^T
  Psi(0,r)^T dr] Psi(t,0)^T integrated by sympy; numerical Lyapunov ODE if that fails.
- R_t: k = 1: sqrt(Sigma_t). k > 1: the linear ODE dR/dt = (F + 1/2 G G^T Sigma^-1) R with
  R_0 from the spec, integrated at high precision; "semi-closed" when its coefficients are
  closed forms (the rotation R = L Q has no closed form in general).

The numerical side evaluates everything on MPFR object arrays, vectorised over time points
and over the distinct values of the per-coordinate parameter (BDM frequencies).
"""

import contextlib
import dataclasses
import signal
import threading

import gmpy2
import numpy as np
import sympy as sp

from . import _hp, _ode
from ._spec import t

# Internal symbols are Dummies (never equal to a user Symbol of the same name) whose names start
# with "_", outside the user grammar [A-Za-z][A-Za-z0-9_]*, so that the evaluators' environments
# (keyed by name) cannot confuse them with a user name either. codegen prints them as s, r, B.
s = sp.Dummy("_s", real=True, nonnegative=True)      # start time of Psi(t, s)
r = sp.Dummy("_r", real=True, nonnegative=True)      # integration variable of Sigma
B = sp.Dummy("_B", real=True)                        # argument of expm(A B), B = int_s^t f
INTERNAL = {s: "s", r: "r", B: "B"}                  # readable names for the printed formulas
SYMPY_SECONDS = 20         # budget for each sympy attempt before the numerical fallback (generous,
                           # so that the closed/numerical choice does not depend on machine load)

CLOSED, SEMI, NUMERICAL = "closed form", "semi-closed", "numerical"


@contextlib.contextmanager
def _time_limit(seconds):
    """Raise TimeoutError in the block after ``seconds`` (main thread only; else no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, _raise)
    # re-fire every 0.5 s after the deadline: sympy swallows some exceptions internally (a single
    # TimeoutError raised inside such a try block was lost and integrate() ran on for > 10 min)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _try_sympy(fn):
    """Run a sympy computation under the time budget; None when it fails or gives up."""
    try:
        with _time_limit(SYMPY_SECONDS):
            out = fn()
    except (TimeoutError, NotImplementedError, ValueError, TypeError, ZeroDivisionError,
            RecursionError, AttributeError, sp.PolynomialError, sp.CoercionFailed):
        return None
    if out is None or out.has(sp.Integral, sp.zoo, sp.nan, sp.oo, -sp.oo):
        return None
    if out.has(sp.Piecewise, sp.I, sp.exp_polar, sp.LambertW, sp.Heaviside, sp.DiracDelta):
        return None
    return out


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


@dataclasses.dataclass
class Kinds:
    psi: str
    sigma: str
    R: str
    notes: list


class Derivation:
    """Closed forms (where found) plus high-precision evaluators of Psi, Sigma, R on arrays.

    Evaluators take object arrays of times [M] (exact MPFR) and return [M, Pu, k, k] where
    Pu is the number of distinct per-coordinate parameter values (``coord_index`` maps the
    P coordinates to them).
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
        self.Pu = len(reps)
        self.notes = []
        self._F = _hp.compile_matrix(spec.F)
        self._G = _hp.compile_matrix(spec.G)
        self._derive_psi()
        self._derive_sigma()
        self._derive_R()
        self._dense = {}
        self.noise_free = self._noise_free()

    def _noise_free(self):
        """Boolean [Pu]: coordinates where G G^T is identically zero (exactly, by sympy).

        There W(r) = Psi(t,r) R_r is constant in r (dW/dr = 1/2 Psi G G^T R^-T = 0), so every
        multistep weight, PsiHat - Psi and P_st are exactly zero; the tables store exact zeros
        instead of the rounding residue of R_t - Psi R_s (the DC frequency of inverse heat
        dissipation: zero drift and zero noise). Candidates are the coordinates where G G^T
        evaluates to exact zeros on a probe grid; sympy confirms each.
        """
        out = np.zeros(self.Pu, dtype=bool)
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
        for p in range(self.Pu):
            if any(v != 0 for v in np.ravel(GG[:, p])):
                continue
            M = GGs if lam is None else GGs.subs(lam, reps[p])
            zero = _try_sympy(lambda: sp.Integer(int(all(sp.simplify(e) == 0 for e in M))))
            out[p] = zero == 1
        return out

    # ----- closed forms must evaluate at every coordinate -----------------------------------
    def _finite(self, fn):
        """True when ``fn(times)`` is finite on a probe grid over [0, T] at every coordinate value.

        A closed form valid for a generic frequency can be 0 * inf at one value (1/lam at lam = 0)
        or take a real power of a negative number (a log branch sympy chose); then the quantity
        falls back to its numerical route instead of failing later with nan.
        """
        T = _hp.mpf(self.spec.T)
        tt = np.array([T * j / 8 for j in range(9)], dtype=object)
        try:
            vals = fn(tt)
        except (ArithmeticError, ValueError, TypeError):
            return False
        return all(gmpy2.is_finite(v) for v in np.ravel(vals))

    # ----- environment ---------------------------------------------------------------------
    def _env(self, tt, coords=None, extra=None):
        env = {"t": np.asarray(tt, dtype=object)[:, None]}
        if self.spec.basis.symbol is not None:
            values = self.coord_values if coords is None else self.coord_values[coords]
            env[self.spec.basis.symbol.name] = values[None, :]
        if extra:
            env.update(extra)
        return env

    def _shape(self, tt, coords=None):
        return (len(tt), self.Pu if coords is None else len(coords))

    def F(self, tt, coords=None):
        return self._F(self._env(tt, coords), self._shape(tt, coords))

    def G(self, tt, coords=None):
        return self._G(self._env(tt, coords), self._shape(tt, coords))

    # ----- Psi -----------------------------------------------------------------------------
    def _derive_psi(self):
        spec, k = self.spec, self.k
        self.psi_expr = None
        if spec.form == "marginal":
            self.psi_expr = sp.Matrix([[spec.mean / spec.mean.subs(t, s)]])
            self._mean = _hp.compile_expr(spec.mean)
            self.psi_kind = CLOSED
            self._psi_mode = "marginal"
            return
        F = spec.F
        if F.is_zero_matrix:
            self.psi_expr, self.psi_kind, self._psi_mode = sp.eye(k), CLOSED, "identity"
            return
        # F = f(t) A with A constant in t; f free of the basis symbol (else A = F / f divides by
        # it and Psi is 0 * inf where the frequency vanishes)
        f = next(e for e in F if not e.is_zero)
        if spec.basis.symbol is not None and f.has(spec.basis.symbol):
            f = f.as_independent(t, as_Add=False)[1]
        A = F.applyfunc(lambda e: sp.cancel(e / f))
        if not A.has(t):
            I = _antiderivative(f)
            E = _try_sympy(lambda: _real_expm(A)) if k > 1 else sp.Matrix([[sp.exp(A[0, 0] * B)]])
            compiled = None
            if I is not None and E is not None and not any(e.has(sp.I) for e in E):
                try:
                    compiled = _hp.compile_expr(I), _hp.compile_matrix(E)
                except _hp.Unsupported:            # a function MPFR cannot evaluate: go numerical
                    compiled = None
            if compiled is not None:
                self._I, self._E = compiled
                self.psi_expr = E.subs(B, I - I.subs(t, s))
                self.psi_kind, self._psi_mode = CLOSED, "expm"
                self.psi_structure = (f, A, I, E)
                if self._finite(lambda tt: self.psi(tt, tt * 0)):
                    return
                self.psi_expr = None
        if F.is_diagonal():
            Is = [_antiderivative(F[i, i]) for i in range(k)]
            try:
                diag = _hp.compile_matrix(sp.diag(*Is)) if all(I is not None for I in Is) else None
            except _hp.Unsupported:
                diag = None
            if diag is not None:
                E = sp.diag(*[sp.exp(I - I.subs(t, s)) for I in Is])
                self._Ediag = diag
                self.psi_expr = E
                self.psi_kind, self._psi_mode = CLOSED, "diagonal"
                if self._finite(lambda tt: self.psi(tt, tt * 0)):
                    return
                self.psi_expr = None
        self.psi_kind, self._psi_mode = NUMERICAL, "ode"
        self.notes.append("Psi: no closed form found; dPhi/dt = F Phi integrated at high precision, "
                          "Psi(t,s) = Phi(t) Phi(s)^-1.")

    def psi(self, tt, ss, coords=None):
        """Psi(t, s) [M, Pu, k, k] for paired arrays tt, ss (coords: subset of the Pu axis)."""
        tt, ss = np.asarray(tt, dtype=object), np.asarray(ss, dtype=object)
        shape = self._shape(tt if len(tt) >= len(ss) else ss, coords)    # a single t broadcasts
        mode = self._psi_mode
        if mode == "marginal":
            m_t = np.broadcast_to(self._mean(self._env(tt, coords)), shape)
            m_s = np.broadcast_to(self._mean(self._env(ss, coords)), shape)
            return (m_t / m_s)[..., None, None]
        if mode == "identity":
            return _hp.eye(self.k, shape)
        if mode == "expm":
            Bv = self._I(self._env(tt, coords)) - self._I(self._env(ss, coords))
            Bv = np.broadcast_to(Bv, shape)
            return self._E(self._env(tt, coords, extra={B.name: Bv}), shape)
        if mode == "diagonal":
            D = self._Ediag(self._env(tt, coords), shape) - self._Ediag(self._env(ss, coords), shape)
            out = _hp.zeros(shape + (self.k, self.k))
            for i in range(self.k):
                out[..., i, i] = _hp._apply(_hp.FUNCS[sp.exp], D[..., i, i])
            return out
        Phi = self._dense_solution("phi")
        return _select(Phi(tt) @ _hp.inv(Phi(ss)), coords)   # broadcasts a single t

    def data_to_state(self, tt):
        """D_t with E[u_t | data x] = D_t x: mean_t (marginal form) or Psi(t, 0)."""
        tt = np.asarray(tt, dtype=object)
        if self._psi_mode == "marginal":
            return np.broadcast_to(self._mean(self._env(tt)), self._shape(tt))[..., None, None].copy()
        return self.psi(tt, _hp.zeros(tt.shape))

    # ----- Sigma ---------------------------------------------------------------------------
    def _derive_sigma(self):
        spec, k = self.spec, self.k
        self.sigma_expr = None
        if spec.form == "marginal":
            self.sigma_expr = sp.Matrix([[spec.std ** 2]])
        elif self.psi_kind == CLOSED and self._psi_mode in ("expm", "identity", "diagonal"):
            self.sigma_expr = _try_sympy(self._sigma_closed_form)
        if self.sigma_expr is not None:
            try:
                self._sigma = _hp.compile_matrix(self.sigma_expr)
            except _hp.Unsupported:                # e.g. a special function sympy chose
                self.sigma_expr = None
        if self.sigma_expr is not None:
            self.sigma_kind = CLOSED
            if not self._finite(self.sigma):
                self.sigma_expr = None
        if self.sigma_expr is not None:
            self.sigma_kind = CLOSED
        else:
            self.sigma_kind = NUMERICAL
            self.notes.append("Sigma: no closed form found; Lyapunov ODE dSigma/dt = F Sigma + Sigma F^T "
                              "+ G G^T integrated at high precision.")

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

    def sigma(self, tt, coords=None):
        tt = np.asarray(tt, dtype=object)
        if self.sigma_kind == CLOSED:
            return self._sigma(self._env(tt, coords), self._shape(tt, coords))
        return _select(self._dense_solution("sigma")(tt), coords)

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
                if self.R_expr is not None and not self._finite(self.R):
                    self.R_expr = None
            return
        self.R_kind = SEMI if self.sigma_kind == CLOSED and self.psi_kind == CLOSED else NUMERICAL
        self.notes.append("R: dR/dt = (F + 1/2 G G^T Sigma^-1) R from R_0 integrated at high precision "
                          f"(Chebyshev-Picard panels, tolerance {float(_hp.TOL):.0e}); "
                          + ("its coefficients are closed forms." if self.R_kind == SEMI else
                             "its coefficients are themselves numerical."))

    def R0(self):
        """R_0 [Pu, k, k]."""
        spec, k = self.spec, self.k
        S0 = self._sigma0()                     # exact Sigma_0 of the spec, not a formula at t = 0
        if isinstance(spec.R0, sp.MatrixBase):
            return _hp.compile_matrix(spec.R0)(self._env(_hp.zeros((1,))), (1, self.Pu))[0]
        if spec.R0 == "cholesky":
            return _hp.cholesky(S0)
        out = _hp.zeros(S0.shape)
        for p in range(self.Pu):
            S = S0[p]
            if all(S[i, j] == 0 for i in range(k) for j in range(k) if i != j):
                for i in range(k):
                    out[p, i, i] = _hp.SQRT(S[i, i])
            else:
                out[p] = _hp.sqrtm_spd(S)
        return out

    def R(self, tt, coords=None):
        tt = np.asarray(tt, dtype=object)
        if self.R_expr is not None:
            return self._R(self._env(tt, coords), self._shape(tt, coords))
        if self.k == 1:
            return _hp._apply(_hp.SQRT, self.sigma(tt, coords))
        return _select(self._dense_solution("R")(tt), coords)

    def warm(self):
        """Solve the dense ODEs now (before worker processes fork, so that they share them)."""
        T = np.array([_hp.mpf(self.spec.T)], dtype=object)
        self.psi(T, T * 0)
        self.sigma(T)
        self.R(T)

    def cholesky(self, tt):
        return _hp.cholesky(self.sigma(tt), semidefinite=True)

    # ----- dense high-precision ODE solutions ----------------------------------------------
    def _dense_solution(self, which):
        if which in self._dense:
            return self._dense[which]
        T, zero, k = _hp.mpf(self.spec.T), _hp.mpf(0), self.k
        h0 = T / 64
        if which == "phi":                     # Phi' = F Phi, Phi(0) = I
            sol = _from_zero(lambda A, end: _ode.solve_linear(A, _hp.eye(k, (self.Pu,)), zero, end, end / 64),
                             lambda tn: self.F(tn), T)
        elif which == "sigma":                 # Sigma = Phi [Sigma_0 + int_0^t Phi^-1 G G^T Phi^-T] Phi^T
            def integrand(tn):
                Pinv = _hp.inv(self.psi(tn, _hp.zeros(tn.shape)))
                Gn = self.G(tn)
                return Pinv @ Gn @ _hp.T(Pinv @ Gn)
            J = _from_zero(lambda fn, end: _ode.cumulative(fn, zero, end, end / 64), integrand, T)
            S0 = self._sigma0()

            def sol(tt):
                Phi = self.psi(tt, _hp.zeros(tt.shape))
                return Phi @ (S0 + J(tt)) @ _hp.T(Phi)
        elif which == "R":                     # R' = (F + 1/2 G G^T Sigma^-1) R, R(0) = R_0
            def make_A(tn):
                Gn = self.G(tn)
                return self.F(tn) + (Gn @ _hp.T(Gn)) @ _hp.inv(self.sigma(tn)) / 2
            sol = _from_zero(lambda A, end: _ode.solve_linear(A, self.R0(), zero, end, end / 64), make_A, T)
        else:
            raise KeyError(which)
        self._dense[which] = sol
        return sol

    def _sigma0(self):
        return _hp.compile_matrix(self.spec.Sigma0)(self._env(_hp.zeros((1,))), (1, self.Pu))[0]


def _from_zero(solve, rate, T):
    """``solve(rate, end)`` for an ODE or integral from t = 0 to ``end`` = T, where the rate (A(t) of
    Y' = A Y, or the integrand) may be smooth only in a root of t (beta(t) ~ sqrt(t) or 1/sqrt(t)):
    when the panels cannot resolve it near t = 0, solve again in u with t = u^m (m = 2, then 6),
    where dY/du = m u^(m-1) A(u^m) Y is smooth, and read the solution at u = t^(1/m)."""
    try:
        return solve(rate, T)
    except _hp.EvaluationError as exc:
        if "near t = 0" not in str(exc):
            raise
        first = exc
    for m in (2, 6):
        def rate_u(un, m=m):
            jac = m * un ** (m - 1)
            return rate(un ** m) * jac.reshape((-1, 1, 1, 1))
        try:
            sol_u = solve(rate_u, _root(np.array([T], dtype=object), m)[0])
        except _hp.EvaluationError:
            continue
        return lambda tt, sol_u=sol_u, m=m: sol_u(_root(np.asarray(tt, dtype=object), m))
    raise _hp.EvaluationError(f"{first} (also with t = u^2 and t = u^6: a coefficient is not smooth in "
                              "any root of t at t = 0; write the process so that it starts where it "
                              "is smooth, e.g. shift t)")


def _root(tt, m):
    """t^(1/m) for m = 2 or 6, elementwise on an object array."""
    out = _hp._apply(_hp.SQRT, tt)
    if m == 6:
        out = np.array([gmpy2.cbrt(v) for v in np.ravel(out)], dtype=object).reshape(np.shape(tt))
    return out


def _select(values, coords):
    return values if coords is None else values[:, coords]
