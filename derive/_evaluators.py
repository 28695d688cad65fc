"""How Psi, Sigma and R are evaluated: MPFR object arrays, vectorised over time points and over
the distinct values of the per-coordinate parameter (BDM frequencies), for the routes that
``_derivation.Derivation`` chose (MATH.md sections 1-2).

- Psi: a compiled closed form; expm(A (I(t) - I(s))) at high precision (``_hp.expm``); or
  Psi(t,s) = Phi(t) Phi(s)^-1 from the dense solution of dPhi/dt = F Phi.
- Sigma: a compiled closed form; the algebraic Lyapunov identity with Psi evaluated; or the
  Lyapunov ODE dSigma/dt = F Sigma + Sigma F^T + G G^T itself (vectorised, ``_lyapunov_system``).
- R: k = 1 sqrt(Sigma); k > 1 the dense solution of dR/dt = (F + 1/2 G G^T Sigma^-1) R.
Dense solutions come from ``_ode.solve_linear`` (adaptive Chebyshev collocation) from t = 0,
in a root of t where a coefficient is not smooth or is infinite there (``_from_zero``).
"""

import gmpy2
import numpy as np

from . import _hp, _ode

_EXP = np.frompyfunc(gmpy2.exp, 1, 1)


class Evaluators:
    """Evaluators on object arrays of times [M] (exact MPFR), returning [M, n_distinct, k, k]:
    n_distinct is the number of distinct per-coordinate parameter values (``coord_index`` maps
    the P coordinates to them). ``Derivation`` sets the routes (``_psi_mode``, ``_sigma_mode``,
    the compiled closed forms) before any of these is called.
    """

    breaks = ()                                # times where F or G is not smooth (Derivation sets them)

    @property
    def Pu(self):                              # old name: derive/_variants.py, tests/test_tables.py
        return self.n_distinct

    def warm(self):                            # old name of prepare_ode_solutions
        self.prepare_ode_solutions()

    def _finite(self, fn, compiled=None):
        """True when ``fn(times)`` is finite on a probe grid over [0, T] at every coordinate value
        and, for a closed form ``compiled``, accurate there.

        A closed form valid for a generic frequency can be 0 * inf at one value (1/lam at lam = 0)
        or take a real power of a negative number (a log branch sympy chose); then the quantity
        falls back to its numerical route instead of failing later with nan. A closed form whose
        terms cancel (huge terms, moderate result) is evaluated at a raised precision when the
        probe shows fewer than ACCURATE_BITS good bits at PREC_BITS, and refused when even four
        times that does not settle it (``_precise``).
        """
        T = _hp.mpf(self.spec.T)
        tt = np.array([T * j / 8 for j in range(9)], dtype=object)
        try:
            vals = fn(tt)
        except (ArithmeticError, ValueError, TypeError):
            return False
        if not all(gmpy2.is_finite(v) for v in np.ravel(vals)):
            return False
        return compiled is None or _precise(fn, compiled, tt, vals)

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
        return (len(tt), self.n_distinct if coords is None else len(coords))

    def F(self, tt, coords=None):
        return self._F(self._env(tt, coords), self._shape(tt, coords))

    def G(self, tt, coords=None):
        return self._G(self._env(tt, coords), self._shape(tt, coords))

    def psi(self, tt, ss, coords=None):
        """Psi(t, s) [M, n_distinct, k, k] for paired arrays tt, ss (coords: subset of that axis)."""
        tt, ss = np.asarray(tt, dtype=object), np.asarray(ss, dtype=object)
        shape = self._shape(tt if len(tt) >= len(ss) else ss, coords)    # a single t broadcasts
        mode = self._psi_mode
        if mode == "marginal":
            m_t = self._mean(self._env(tt, coords), shape)[..., 0, 0]
            m_s = self._mean(self._env(ss, coords), shape)[..., 0, 0]
            return (m_t / m_s)[..., None, None]
        if mode == "identity":
            return _hp.eye(self.k, shape)
        if mode in ("expm", "expm numeric"):
            I = self._linear[3]
            Bv = np.broadcast_to(I(self._env(tt, coords)) - I(self._env(ss, coords)), shape)
            if mode == "expm":
                return self._E(self._env(tt, coords, extra={self._E_argument: Bv}), shape)
            A = _select(self._A[None], coords)
            return _hp.expm(A * Bv[..., None, None])
        if mode == "diagonal":
            D = self._Ediag(self._env(tt, coords), shape) - self._Ediag(self._env(ss, coords), shape)
            out = _hp.zeros(shape + (self.k, self.k))
            for i in range(self.k):
                out[..., i, i] = _hp._apply(_EXP, D[..., i, i])
            return out
        Phi = self._dense_solution("phi")
        if all(v == 0 for v in ss):
            return _select(Phi(tt), coords)
        if all(a <= b for a, b in np.broadcast(tt, ss)):
            return _select(self._psi_backward(tt, ss), coords)
        return _select(Phi(tt) @ _hp.inv(Phi(ss)), coords)   # broadcasts a single t

    def _psi_backward(self, tt, ss):
        """Psi(t, s) for s >= t from its own ODE in r started at t: Z(r) = Psi(t, r)^T solves
        dZ/dr = -F(r)^T Z, Z(t) = I. Phi(t) Phi(s)^-1 would lose the digits of cond(Phi(s)),
        exp(|lambda_max - lambda_min| s) for a stiff F, and the adaptive loops fed with it chase
        that noise. One dense solution per t (a single t with many s: the weights' quadrature)."""
        back = lambda rn: -_hp.T(self.F(rn))
        k, out = self.k, []
        for t_, group in _by_start(tt, ss):
            end = max(group)
            cached = self._backward.get(t_)
            if end > t_ and (cached is None or cached[0] < end):
                sol = _ode.solve_linear(back, _hp.eye(k, (self.n_distinct,)), t_, end, (end - t_) / 4,
                                        breaks=self.breaks)
                cached = self._backward[t_] = (end, sol)
            out.append(_hp.T(cached[1](np.array(group, dtype=object))) if end > t_ else
                       _hp.eye(k, (len(group), self.n_distinct)))
        return _ordered(out, tt, ss)

    def data_to_state(self, tt):
        """D_t with E[u_t | data x] = D_t x: mean_t (marginal form) or Psi(t, 0)."""
        tt = np.asarray(tt, dtype=object)
        if self._psi_mode == "marginal":
            return self._mean(self._env(tt), self._shape(tt)).copy()
        return self.psi(tt, _hp.zeros(tt.shape))

    def sigma(self, tt, coords=None):
        tt = np.asarray(tt, dtype=object)
        if self._sigma_mode == "closed":
            return self._sigma(self._env(tt, coords), self._shape(tt, coords))
        if self._sigma_mode == "lyapunov":
            Bm, Linv = (_select(v[None], coords) for v in self._lyap)
            E = self.psi(tt, _hp.zeros(tt.shape), coords)
            Q = E @ Bm @ _hp.T(E) - Bm
            X = _unvech((Linv @ _vech(Q)[..., None])[..., 0], self.k)
            return E @ _select(self._sigma0()[None], coords) @ _hp.T(E) + X
        return _select(self._dense_solution("sigma")(tt), coords)

    def R0(self):
        """R_0 [n_distinct, k, k]."""
        spec, k = self.spec, self.k
        S0 = self._sigma0()                     # exact Sigma_0 of the spec, not a formula at t = 0
        if not isinstance(spec.R0, str):            # an explicit matrix (else "cholesky" or "sqrtm")
            return _hp.compile_matrix(spec.R0)(self._env(_hp.zeros((1,))), (1, self.n_distinct))[0]
        if spec.R0 == "cholesky":
            return _hp.cholesky(S0)
        out = _hp.zeros(S0.shape)
        for p in range(self.n_distinct):
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

    def prepare_ode_solutions(self):
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
        if which == "phi":                     # Phi' = F Phi, Phi(0) = I
            sol = _from_zero(lambda A, end, brk: _ode.solve_linear(A, _hp.eye(k, (self.n_distinct,)), zero, end,
                                                                    end / 64, breaks=brk),
                             lambda tn: self.F(tn), T, self.breaks)
        elif which == "sigma":                 # Lyapunov ODE, vectorised (see _lyapunov_system)
            S0 = self._sigma0()
            scale = _hp.abs_max(S0) if _hp.abs_max(S0) > 0 else gmpy2.mpfr(1)
            y0 = _vech_augmented(S0, scale)

            def make_L(tn):
                Gn = self.G(tn)
                return _lyapunov_system(self.F(tn), Gn @ _hp.T(Gn), scale)
            Y = _from_zero(lambda A, end, brk: _ode.solve_linear(A, y0, zero, end, end / 64, breaks=brk), make_L, T,
                           self.breaks)

            def sol(tt):
                return _unvech(Y(tt)[..., :-1, 0], k)
        elif which == "R":                     # R' = (F + 1/2 G G^T Sigma^-1) R, R(0) = R_0
            def make_A(tn):
                Gn = self.G(tn)
                return self.F(tn) + (Gn @ _hp.T(Gn)) @ _hp.inv(self.sigma(tn)) / 2
            sol = _from_zero(lambda A, end, brk: _ode.solve_linear(A, self.R0(), zero, end, end / 64, breaks=brk),
                             make_A, T, self.breaks)
        else:
            raise KeyError(which)
        self._dense[which] = sol
        return sol

    def _sigma0(self):
        return _hp.compile_matrix(self.spec.Sigma0)(self._env(_hp.zeros((1,))), (1, self.n_distinct))[0]


def _from_zero(solve, rate, T, breaks=()):
    """``solve(rate, end, breaks)`` for an ODE or integral from t = 0 to ``end`` = T (``breaks``:
    where the rate is not smooth, in the solve's variable), where the rate (A(t) of
    Y' = A Y, or the integrand) may be smooth only in a root of t (beta(t) ~ sqrt(t) or 1/sqrt(t)):
    when the panels cannot resolve it near t = 0, or it is infinite there, solve again in u with
    t = u^m (m = 2, then 6), where dY/du = m u^(m-1) A(u^m) Y is smooth, and read the solution at
    u = t^(1/m). The smooth rate in u is evaluated at u = 1e-50 u(T) in place of its node u = 0
    (0 * inf there in floating point; the change is 1e-50 relative, below every tolerance)."""
    first = None
    try:
        at_zero = rate(np.array([_hp.mpf(0)], dtype=object))
    except (ArithmeticError, ValueError):      # EvaluationError included
        at_zero = None
    if at_zero is not None and _finite(at_zero):
        try:
            return solve(rate, T, breaks)
        except _hp.EvaluationError as exc:
            if "near t = 0" not in str(exc):
                raise
            first = exc
    for m in (2, 6):
        u_end = _root(np.array([T], dtype=object), m)[0]
        tiny = u_end * gmpy2.mpfr("1e-50")

        def rate_u(un, m=m, tiny=tiny):
            un = np.where(un == 0, tiny, un)
            jac = m * un ** (m - 1)
            return rate(un ** m) * jac.reshape((-1,) + (1,) * 3)
        try:
            sol_u = solve(rate_u, u_end, tuple(_root(np.array(breaks, dtype=object), m)) if breaks else ())
        except _hp.EvaluationError:
            continue
        return lambda tt, sol_u=sol_u, m=m: sol_u(_root(np.asarray(tt, dtype=object), m))
    why = f"{first} (also" if first is not None else "a coefficient is infinite at t = 0 (tried"
    raise _hp.EvaluationError(f"{why} with t = u^2 and t = u^6: a coefficient is not smooth in "
                              "any root of t at t = 0; write the process so that it starts where it "
                              "is smooth, e.g. shift t)")


ACCURATE_BITS = 140     # ~42 digits: the quadratures' QUAD_TOL (1e-36) with a margin


def _precise(fn, compiled, tt, values):
    """Raise ``compiled.precision`` (x2, x4) until two precisions agree to ACCURATE_BITS at the
    probe times ``tt`` (relative to each time's and coordinate's largest entry, ``_agree``). When
    even 4 x PREC_BITS does not settle it the closed form is not usable (False: its numerical
    route instead); a sympy Sigma whose huge exponential terms cancel beyond 800 bits gave
    Sigma(0.1) = -6.9e26 for a covariance of size 1 (census seed 9103)."""
    base = compiled.precision
    for precision in (base * 2, base * 4):
        compiled.precision = precision
        try:
            finer = fn(tt)
        except (ArithmeticError, ValueError, TypeError):
            break
        if _agree(values, finer):
            compiled.precision = precision // 2
            return True
        values = finer
    compiled.precision = base
    return False


def _agree(a, b):
    """|a - b| <= 2^-ACCURATE_BITS max|b| per leading index (time, coordinate), entrywise; a scale
    below 2^-40 of the coordinate's largest over the probe times counts as that floor (a value
    that is exactly 0, Sigma at t = 0 of a marginal family, has no relative accuracy)."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    lead = a.shape[:2] if a.ndim >= 3 else a.shape[:1]
    a, b = a.reshape(lead + (-1,)), b.reshape(lead + (-1,))
    if not all(gmpy2.is_finite(v) for v in np.ravel(b)):
        return False
    scale = np.max(np.abs(b), axis=-1)                              # [times(, coordinates)]
    floor = np.max(scale, axis=0, keepdims=True) * gmpy2.mpfr(2) ** -40
    scale = np.maximum(scale, floor)
    err = np.max(np.abs(a - b), axis=-1)
    tol = gmpy2.mpfr(2) ** -ACCURATE_BITS
    return all(e <= tol * s for e, s in zip(np.ravel(err), np.ravel(scale)))


def _finite(values):
    try:
        return all(gmpy2.is_finite(v) for v in np.ravel(values))
    except TypeError:
        return False


def _pairs(k):
    return [(i, j) for i in range(k) for j in range(i, k)]


def _vech(S):
    """[..., N]: the upper triangle of S [..., k, k] in the order of _pairs."""
    return np.stack([S[..., i, j] for i, j in _pairs(S.shape[-1])], axis=-1)


def _lyapunov_terms(k):
    """(row, column, a, b): the Lyapunov operator Sigma -> A Sigma + Sigma A^T on vech Sigma has
    A[a, b] added at (row, column) for each term."""
    index = {p: q for q, p in enumerate(_pairs(k))}
    pos = lambda a, b: index[(min(a, b), max(a, b))]
    out = []
    for q, (i, j) in enumerate(_pairs(k)):
        for m in range(k):
            out += [(q, pos(m, j), i, m), (q, pos(i, m), j, m)]
    return out


def _vech_augmented(S, scale):
    """[P, N+1, 1]: the upper triangle of each S [P, k, k] (N = k(k+1)/2 entries), then ``scale``."""
    k = S.shape[-1]
    cols = [S[:, i, j] for i, j in _pairs(k)] + [_hp.const(scale, (S.shape[0],))]
    return np.stack(cols, axis=1)[..., None]


def _unvech(y, k):
    """Symmetric [..., k, k] from the upper-triangle vector y [..., N]."""
    out = _hp.zeros(y.shape[:-1] + (k, k))
    for q, (i, j) in enumerate(_pairs(k)):
        out[..., i, j] = out[..., j, i] = y[..., q]
    return out


def _lyapunov_system(F, GG, scale):
    """A [..., N+1, N+1] with d/dt [vech Sigma; c] = A [vech Sigma; c] for the Lyapunov equation
    dSigma/dt = F Sigma + Sigma F^T + G G^T (c = ``scale`` constant: its column carries G G^T / c).

    Solved directly (stable: no Psi(0, r) = Psi(r, 0)^-1, whose entries grow like exp(|lambda| r)
    for a stiff F and cancel in Psi(t,0) [Sigma_0 + int Psi(0,r) G G^T Psi(0,r)^T] Psi(t,0)^T).
    """
    k = F.shape[-1]
    pairs = _pairs(k)
    N = len(pairs)
    out = _hp.zeros(F.shape[:-2] + (N + 1, N + 1))
    for q, col, a, b in _lyapunov_terms(k):
        out[..., q, col] += F[..., a, b]
    for q, (i, j) in enumerate(pairs):
        out[..., q, N] = GG[..., i, j] / scale
    return out


def _by_start(tt, ss):
    """Pairs (t, [s...]) grouping the paired arrays by t (a single t broadcasts)."""
    groups = {}
    for t_, s_ in np.broadcast(tt, ss):
        groups.setdefault(t_, []).append(s_)
    return list(groups.items())


def _ordered(parts, tt, ss):
    """The per-group results of _by_start back in the order of the pairs."""
    pos, out = {}, []
    for (t_, group), vals in zip(_by_start(tt, ss), parts):
        for j, s_ in enumerate(group):
            pos.setdefault((t_, s_), vals[j])
    for t_, s_ in np.broadcast(tt, ss):
        out.append(pos[(t_, s_)])
    return np.stack(out)


def _root(tt, m):
    """t^(1/m) for m = 2 or 6, elementwise on an object array."""
    out = _hp._apply(_hp.SQRT, tt)
    if m == 6:
        out = np.array([gmpy2.cbrt(v) for v in np.ravel(out)], dtype=object).reshape(np.shape(tt))
    return out


def _select(values, coords):
    return values if coords is None else values[:, coords]
