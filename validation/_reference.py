"""Independent references for every table quantity, from F(t), G(t), Sigma_0 and R_0 alone.

- ``MpReference``: mpmath at >= 40 digits. Phi, Sigma (Lyapunov) and R by mpmath.odefun
  (Taylor series), R from dR/dt = F R + 1/2 G G^T R^-T (the other form of the R-ODE than derive
  uses); weights by Gauss-Legendre quadrature of the integrand of MATH.md section 4 itself
  (derive integrates by parts); PsiHat and P_st by their own backward ODE (MATH.md section 5).
- ``ScipyReference``: float64 solve_ivp (Radau on the stiff start, DOP853 rtol 1e-13 after)
  and scipy.integrate.quad_vec: the second, cheaper opinion a user would compute by hand.
"""

import mpmath
import numpy as np
import sympy as sp

from ._evaluate import _compiled, mp_matrix, np_matrix

DPS = 45          # >= 40 significant digits in every reference value
ROOT_POWER = 6    # solves in u = t^(1/6) when a coefficient is infinite at t = 0
U0 = 1e-12        # ... starting at u = U0 u(t_min) (t = 1e-72 t_min for t_min = 1e-3)


def _mat(k, y):
    return mpmath.matrix([[y[i * k + j] for j in range(k)] for i in range(k)])


def _vec(M):
    return [M[i, j] for i in range(M.rows) for j in range(M.cols)]


def lagrange_weights_at(r, nodes):
    """Values l_j(r) of the Lagrange basis through ``nodes``."""
    out = []
    for j, xj in enumerate(nodes):
        v = 1
        for m, xm in enumerate(nodes):
            if m != j:
                v = v * (r - xm) / (xj - xm)
        out.append(v)
    return out


def R0_of(spec, Sigma0):
    if isinstance(spec.R0, sp.MatrixBase):
        return mp_matrix(spec.R0, **_basis_env(spec, None))
    if spec.R0 == "cholesky":
        return mpmath.cholesky(Sigma0)
    E, Q = mpmath.eigsy(Sigma0)
    return Q * mpmath.diag([mpmath.sqrt(max(e, 0)) for e in E]) * Q.T


class _Compiled:
    """A sympy matrix compiled once (the references evaluate F, G, mean, std millions of times):
    env -> mpmath matrix at the precision it was compiled at (recompiled at another precision),
    or -> float64 array."""

    def __init__(self, M, kind):
        self.M = M if isinstance(M, sp.MatrixBase) else sp.Matrix([[M]])
        self.kind = kind
        self.prec = mpmath.mp.prec
        self.rows = _compiled(self.M, kind)

    def __call__(self, env):
        if self.kind == "np":
            return np.array([[f(env) for f in row] for row in self.rows], dtype=float)
        if mpmath.mp.prec != self.prec:
            self.prec, self.rows = mpmath.mp.prec, _compiled(self.M, "mp")
        return mpmath.matrix([[f(env) for f in row] for row in self.rows])


def _basis_env(spec, lam):
    return {} if spec.basis.symbol is None else {spec.basis.symbol.name: lam}


class MpReference:
    """High-precision reference for one coordinate (``lam`` = its basis value, or None)."""

    def __init__(self, spec, lam=None, dps=DPS, tick=None):
        self.spec, self.k, self.dps = spec, spec.k, dps
        self.tick = tick or (lambda: None)      # called in every right-hand side and integrand
        self._back = {}                         # t -> Psi(t, r) for r >= t (odefun)
        # A marginal-form spec with a per-coordinate basis (BDM: 1024 frequencies) is checked
        # against its defining formulas (Psi = mean_t / mean_s, Sigma = std^2, R = std) instead of
        # ODE solves, which cost minutes per frequency there; weights still by direct quadrature.
        self.direct = spec.form == "marginal" and spec.basis.symbol is not None
        with mpmath.workdps(dps):
            self.lam = None if lam is None else mpmath.mpf(sp.N(lam, dps + 10))
            self.env = _basis_env(spec, self.lam)
            k = self.k
            self._Fc, self._Gc = _Compiled(spec.F, "mp"), _Compiled(spec.G, "mp")
            if spec.form == "marginal":
                self._mc = {"mean": _Compiled(spec.mean, "mp"), "std": _Compiled(spec.std, "mp")}
            if self.direct:
                self.Sigma0 = mp_matrix(spec.Sigma0, t=mpmath.mpf(0), **self.env)
                return
            self.Sigma0 = mp_matrix(spec.Sigma0, t=mpmath.mpf(0), **self.env)
            self._m = 1 if _finite_at_zero(self.F, self.G, mpmath.mpf(0)) else ROOT_POWER
            self._phi = self._from_zero(lambda t, y: self._ticked(_vec(self.F(t) * _mat(k, y))), _vec(mpmath.eye(k)))

            def lyap(t, y):
                self.tick()
                S, F, G = _mat(k, y), self.F(t), self.G(t)
                return _vec(F * S + S * F.T + G * G.T)
            self._sigma = self._from_zero(lyap, _vec(self.Sigma0))
            if k > 1:
                def rode(t, y):
                    self.tick()
                    R, F, G = _mat(k, y), self.F(t), self.G(t)
                    return _vec(F * R + G * G.T * mpmath.inverse(R).T / 2)
                self._R = self._from_zero(rode, _vec(R0_of(spec, self.Sigma0)))

    def _from_zero(self, rhs, y0):
        """t -> y(t) of y' = rhs(t, y), y(0) = y0 by mpmath.odefun (Taylor series). A coefficient
        infinite at t = 0 (integrable, like 1/sqrt(t)): in u = t^(1/m), dy/du = m u^(m-1) rhs(u^m, y),
        bounded, started at u0 = 1e-16 (t0 = 1e-96: the state moves by O(t0^(1/2)) there)."""
        if self._m == 1:
            return mpmath.odefun(rhs, 0, y0)
        m = self._m
        sol = mpmath.odefun(lambda u, y: [m * u ** (m - 1) * v for v in rhs(u ** m, y)], mpmath.mpf("1e-16"), y0)
        return lambda t: sol(mpmath.root(t, m))

    def _ticked(self, value):
        self.tick()
        return value

    def F(self, t):
        return self._Fc(dict(self.env, t=t))

    def G(self, t):
        return self._Gc(dict(self.env, t=t))

    def _marginal(self, which, t):
        return self._mc[which](dict(self.env, t=t))

    def phi(self, t):
        if self.direct:
            return self._marginal("mean", t) / self._marginal("mean", mpmath.mpf(0))[0, 0]
        return _mat(self.k, self._phi(t))

    def psi(self, t, s):
        """Psi(t, s); for s >= t (every sampling step) from its own ODE in r started at t,
        dPsi(t, r)/dr = -Psi(t, r) F(r): Phi(t) Phi(s)^-1 would lose the digits of cond(Phi(s)),
        exp(|lambda_max - lambda_min| s) for a stiff F (20 of 45 digits for over-damped CLD)."""
        if self.direct or s < t:
            return self.phi(t) * mpmath.inverse(self.phi(s))
        if t not in self._back:
            k = self.k
            self._back[t] = mpmath.odefun(lambda r, y: self._ticked(_vec(-(_mat(k, y) * self.F(r)))), t,
                                          _vec(mpmath.eye(k)))
        return _mat(self.k, self._back[t](s))

    def sigma(self, t):
        if self.direct:
            return self._marginal("std", t) ** 2
        return _mat(self.k, self._sigma(t))

    def R(self, t):
        if self.k == 1:
            return mpmath.matrix([[mpmath.sqrt(self.sigma(t)[0, 0])]])
        return _mat(self.k, self._R(t))

    def data_to_state(self, t):
        if self.spec.form == "marginal":
            return self._marginal("mean", t)
        return self.phi(t)

    def weights(self, s, t, node_times):
        """C_j = int_s^t 1/2 Psi(t,r) G G^T R_r^-T l_j(r) dr for the Lagrange nodes ``node_times``."""
        k = self.k
        Phi_t = self.phi(t)

        def integrand(r):
            self.tick()
            G = self.G(r)
            if k == 1:                          # scalars: the same formula without matrix overhead
                g2 = sum(G[0, j] ** 2 for j in range(G.cols))
                W = mpmath.matrix([[Phi_t[0, 0] / self.phi(r)[0, 0] * g2 / self.R(r)[0, 0] / 2]])
            else:
                W = self.psi(t, r) * G * G.T * mpmath.inverse(self.R(r)).T / 2
            return [W * l for l in lagrange_weights_at(r, node_times)]
        return _gl_vector(integrand, s, t, len(node_times), k)

    def stochastic(self, s, t, lam):
        """(PsiHat - Psi) R_s and P_st by the backward ODE in tau = s - r (MATH.md section 5)."""
        k = self.k
        lam2 = mpmath.mpf(sp.N(lam, self.dps + 10)) ** 2
        c = (1 + lam2) / 2

        n = k * k

        def rhs(tau, y):                   # y = [PsiHat(s - tau, s), P, Sigma(s - tau)], all backwards
            self.tick()
            r = s - tau
            F, G = self.F(r), self.G(r)
            GG = G * G.T
            S = _mat(k, y[2 * n:])
            Fh = F + c * GG * mpmath.inverse(S)
            Ph, P = _mat(k, y[:n]), _mat(k, y[n:2 * n])
            return _vec(-Fh * Ph) + _vec(-Fh * P - P * Fh.T + lam2 * GG) + _vec(-(F * S + S * F.T + GG))
        sol = mpmath.odefun(rhs, 0, _vec(mpmath.eye(k)) + [mpmath.mpf(0)] * n + _vec(self.sigma(s)))
        y = sol(s - t)
        PsiHat, P = _mat(k, y[:n]), _mat(k, y[n:2 * n])
        return (PsiHat - self.psi(t, s)) * self.R(s), P


def _finite_at_zero(F, G, zero):
    """F(0) and G(0) finite: the solves start at t = 0; else (a coefficient like 1/sqrt(t),
    integrable but infinite at 0) they run in u = t^(1/ROOT_POWER)."""
    try:
        values = list(np.ravel(np.array(F(zero).tolist(), dtype=object))) + \
            list(np.ravel(np.array(G(zero).tolist(), dtype=object)))
        return all(mpmath.isfinite(v) for v in values)
    except (ZeroDivisionError, OverflowError, ValueError, FloatingPointError, TypeError):
        return False


def _gl_vector(integrand, a, b, n_out, k, degree=4):
    """Vector Gauss-Legendre quadrature with an error check (degree vs degree+1), bisecting.

    |coarse - fine| estimates the coarse rule's error; the fine rule (twice the nodes) is
    accepted when that estimate to the power 1.5 (QUADPACK's rule of thumb for the better rule's
    error; Gauss rules converge faster still) is below the target 10^-(dps-8)."""
    from mpmath.calculus.quadrature import GaussLegendre
    gl = GaussLegendre(mpmath.mp)

    def rule(lo, hi, d):
        nodes = gl.get_nodes(-1, 1, d, mpmath.mp.prec)
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        acc = [mpmath.zeros(k, k) for _ in range(n_out)]
        for x, w in nodes:
            vals = integrand(mid + half * x)
            for j in range(n_out):
                acc[j] += vals[j] * (w * half)
        return acc

    def recurse(lo, hi, depth):
        coarse, fine = rule(lo, hi, degree), rule(lo, hi, degree + 1)
        err = max(mpmath.mnorm(c - f, 1) for c, f in zip(coarse, fine))
        scale = max(max(mpmath.mnorm(f, 1) for f in fine), mpmath.mpf(10) ** (-300))
        if err <= scale * mpmath.mpf(10) ** (-(mpmath.mp.dps - 8) / mpmath.mpf(1.5)) or depth > 12:
            return fine
        m = (lo + hi) / 2
        left, right = recurse(lo, m, depth + 1), recurse(m, hi, depth + 1)
        return [x + y for x, y in zip(left, right)]
    return recurse(a, b, 0)


class ScipyReference:
    """Float64 references with scipy (one coordinate)."""

    def __init__(self, spec, times, lam=None, tick=None):
        from scipy.integrate import solve_ivp
        self.spec, self.k = spec, spec.k
        self.tick = tick or (lambda: None)      # called in every right-hand side and integrand
        self.env = {} if spec.basis.symbol is None else {spec.basis.symbol.name: float(sp.N(lam))}
        self._Fc, self._Gc = _Compiled(spec.F, "np"), _Compiled(spec.G, "np")
        k = self.k
        S0 = np_matrix(spec.Sigma0, t=0.0, **self.env)
        with mpmath.workdps(30):
            R0 = np.array(R0_of(spec, mpmath.matrix(S0.tolist())).tolist(), dtype=float)

        def rhs(t, y):                         # y = [Sigma, Phi, R (k > 1)]
            self.tick()
            F, G = self.F(t), self.G(t)
            S = y[:k * k].reshape(k, k)
            Phi = y[k * k:2 * k * k].reshape(k, k)
            out = [(F @ S + S @ F.T + G @ G.T).ravel(), (F @ Phi).ravel()]
            if k > 1:
                R = y[2 * k * k:].reshape(k, k)
                out.append((F @ R + G @ G.T @ np.linalg.inv(R).T / 2).ravel())
            return np.concatenate(out)
        y0 = np.concatenate([S0.ravel(), np.eye(k).ravel()] + ([R0.ravel()] if k > 1 else []))
        ts = np.sort(np.asarray(times, dtype=float))
        self._m = 1 if _finite_at_zero(self.F, self.G, 0.0) else ROOT_POWER
        m = self._m
        if m > 1:                              # in u with t = u^m: dy/du = m u^(m-1) rhs(u^m, y)
            inner = rhs

            def rhs(u, y):
                return m * u ** (m - 1) * inner(u ** m, y)
        u_end = ts[-1] ** (1.0 / m)
        u_stiff = ts[0] ** (1.0 / m)
        # t = u^m starts at u0 > 0: the state moves by O(u0) there (an integrable coefficient
        # ~ t^-a, a <= 1 - 1/m, is bounded in u), far below the float64 tolerances
        u0 = 0.0 if m == 1 else U0 * u_stiff
        first = solve_ivp(rhs, (u0, u_stiff), y0, method="Radau", rtol=1e-12, atol=1e-16, dense_output=True)
        second = solve_ivp(rhs, (u_stiff, u_end), first.y[:, -1], method="DOP853", rtol=1e-13, atol=1e-16,
                           dense_output=True)
        self._parts = [(0.0, u_stiff, first.sol), (u_stiff, u_end, second.sol)]

    def F(self, t):
        return self._Fc(dict(self.env, t=float(t)))

    def G(self, t):
        return self._Gc(dict(self.env, t=float(t)))

    def _y(self, t):
        u = float(t) ** (1.0 / self._m)
        for lo, hi, sol in self._parts[::-1]:
            if u >= lo:
                return sol(u)
        return self._parts[0][2](u)

    def sigma(self, t):
        k = self.k
        return self._y(t)[:k * k].reshape(k, k)

    def R(self, t):
        k = self.k
        if k == 1:
            return np.sqrt(np.maximum(self.sigma(t), 0))
        return self._y(t)[2 * k * k:].reshape(k, k)

    def phi(self, t):
        k = self.k
        return self._y(t)[k * k:2 * k * k].reshape(k, k)

    def data_to_state(self, t):
        if self.spec.form == "marginal":
            return np_matrix(sp.Matrix([[self.spec.mean]]), t=float(t), **self.env)
        return self.phi(t)

    def psi(self, t, s):
        from scipy.integrate import solve_ivp
        k = self.k
        sol = solve_ivp(lambda r, y: (self.F(r) @ y.reshape(k, k)).ravel(), (float(s), float(t)),
                        np.eye(k).ravel(), method="DOP853", rtol=1e-13, atol=1e-16)
        return sol.y[:, -1].reshape(k, k)

    def weights(self, s, t, node_times, factor="R", with_terms=False):
        """Weights int_s^t 1/2 Psi(t,r) G G^T K_r^-T l_j(r) dr with K = R (gDDIM) or K = L (Cholesky).

        The weights sum to K_t - Psi(t,s) K_s; the quadrature's absolute tolerance is relative to
        the size of those two terms (never 0: an integrand that is identically zero, a coordinate
        without noise, would otherwise be subdivided forever). With ``with_terms`` returns
        (weights, that size)."""
        from scipy.integrate import quad_vec, solve_ivp
        k = self.k
        K = self.R if factor == "R" else (lambda r: np.linalg.cholesky(self.sigma(r)))

        def back_rhs(r, y):                    # d/dr Psi(t,r) = -Psi(t,r) F(r), r from t to s
            self.tick()
            return -(y.reshape(k, k) @ self.F(r)).ravel()
        back = solve_ivp(back_rhs, (float(t), float(s)), np.eye(k).ravel(), method="DOP853",
                         rtol=1e-13, atol=1e-16, dense_output=True)
        terms = max(np.max(np.abs(K(t))), np.max(np.abs(back.sol(float(s)).reshape(k, k) @ K(s))))

        def integrand(r):
            self.tick()
            G = self.G(r)
            W = back.sol(r).reshape(k, k) @ G @ G.T @ np.linalg.inv(K(r)).T / 2
            return np.stack([W * l for l in lagrange_weights_at(r, node_times)])
        val, _ = quad_vec(integrand, float(s), float(t), epsabs=1e-14 * terms, epsrel=1e-12, norm="max")
        return (val, terms) if with_terms else val
