"""Independent references for every table quantity, from F(t), G(t), Sigma_0 and R_0 alone.

- ``MpReference``: 45 digits (DPS). Phi, Sigma (Lyapunov) and R by Taylor series (the series of
  F and G G^T from differences at high precision, the solution's from its recurrence), R from
  dR/dt = F R + 1/2 G G^T R^-T (the other form of the R-ODE than derive uses); at the grid times
  Phi and Sigma by Bulirsch-Stoer extrapolation; weights by Gauss-Legendre quadrature of the
  integrand of MATH.md section 4 itself (derive integrates by parts); PsiHat and P_st by their
  own backward ODE (MATH.md section 5, Bulirsch-Stoer). Every solve and quadrature stops at the
  kinks of F and G (``kinks``, found numerically, not from derive).
- ``ScipyReference``: float64 solve_ivp (Radau on the stiff start, DOP853 rtol 1e-13 after)
  and scipy.integrate.quad_vec: the second, cheaper opinion a user would compute by hand.
"""

import gmpy2
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


def R0_of(spec, Sigma0, coord_value=None):
    if isinstance(spec.R0, sp.MatrixBase):
        return mp_matrix(spec.R0, **_basis_env(spec, coord_value))
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


def _basis_env(spec, coord_value):
    return {} if spec.basis.symbol is None else {spec.basis.symbol.name: coord_value}


_SWITCHING = (sp.Abs, sp.sign, sp.Heaviside)
KINK_SAMPLES = 2048


def kinks(spec, coord_value=None):
    """Times in (0, T) where F or G (or the marginal family's mean / std) is not smooth, found
    numerically and independently of derive (which solves for them exactly): the sign changes of
    the arguments of Abs, sign and Heaviside, of a - b in Min / Max, of lhs - rhs in a Piecewise
    condition, and the integer crossings of floor / ceiling arguments, on KINK_SAMPLES points,
    each bisected to the working precision. The Taylor series and the extrapolation cannot see a
    kink from one side (the series of the branch runs on past it), so every solve and quadrature
    below stops exactly there."""
    from derive._spec import t
    exprs = list(spec.F) + list(spec.G) + ([spec.mean, spec.std] if spec.form == "marginal" else [])
    args = []
    for e in exprs:
        for node in sp.preorder_traversal(sp.sympify(e)):
            if not node.has(t):
                continue
            if isinstance(node, _SWITCHING):
                args.append((node.args[0], False))
            elif isinstance(node, (sp.Min, sp.Max)):
                args += [(a - b, False) for i, a in enumerate(node.args) for b in node.args[i + 1:]]
            elif isinstance(node, sp.Piecewise):
                args += [(rel.lhs - rel.rhs, False) for _, cond in node.args
                         for rel in cond.atoms(sp.core.relational.Relational)]
            elif isinstance(node, (sp.floor, sp.ceiling, sp.frac)):
                args.append((node.args[0], True))
    if not args:
        return []
    T = mpmath.mpf(sp.N(spec.T, mpmath.mp.dps + 10))
    env = _basis_env(spec, None if coord_value is None else mpmath.mpf(sp.N(coord_value, mpmath.mp.dps + 10)))
    xs = [T * i / KINK_SAMPLES for i in range(KINK_SAMPLES + 1)]
    found = set()
    for arg, integer in {(a, i) for a, i in args if a.has(t)}:
        f = _Compiled(arg, "mp")
        g = lambda x, f=f: f(dict(env, t=x))[0, 0]
        vals = [g(x) for x in xs]
        for i in range(KINK_SAMPLES):
            lo, hi, vlo, vhi = xs[i], xs[i + 1], vals[i], vals[i + 1]
            if not (mpmath.isfinite(vlo) and mpmath.isfinite(vhi)):
                continue
            if integer:
                levels = range(int(mpmath.floor(min(vlo, vhi))) + 1, int(mpmath.floor(max(vlo, vhi))) + 1)
            else:
                levels = [0] if (vlo < 0 < vhi or vhi < 0 < vlo or (vlo == 0 and 0 < i)) else []
            for n in levels:
                found.add(lo if vlo == n else _bisect(lambda x: g(x) - n, lo, hi))
    return sorted(x for x in found if 0 < x < T)


def _roots(values, m):
    """values^(1/m) at 30 more bits (kinks in u = t^(1/m))."""
    with mpmath.extraprec(30):
        return [mpmath.root(v, m) for v in values]


def _bisect(f, lo, hi):
    """The right end of a bracket [lo, hi] of a sign change of f, 30 bits finer than the working
    precision: a series started there differences f on the far side of the kink only."""
    with mpmath.extraprec(30):
        flo = f(lo)
        while hi - lo > abs(hi) * mpmath.eps:
            mid = (lo + hi) / 2
            fm = f(mid)
            if fm != 0 and (fm < 0) == (flo < 0):
                lo, flo = mid, fm
            else:
                hi = mid
        return +hi


class _TaylorSeries:
    """Dense solution of a matrix ODE by Taylor series (the method of mpmath.odefun, a fraction of
    its cost): mpmath.odefun finds the series of the whole solution from Euler steps at (n + 1)
    times the working precision, n = 70 right-hand sides at ~11000 bits per segment. Here only
    the coefficient functions (F, G G^T: explicit in t) are differenced at that precision; the
    solution's series follows from its recurrence at the working precision (gmpy2):

    - ``kind="R"``:   R' = A R + 1/2 B R^-T,  Q = R^-1:  Q_m = -Q_0 sum_{j=1..m} R_j Q_{m-j},
                      (m+1) R_{m+1} = sum_j A_j R_{m-j} + 1/2 sum_j B_j Q_{m-j}^T
    - ``kind="back"``: Y' = -Y A:  (m+1) Y_{m+1} = -sum_j Y_{m-j} A_j  (Y(r) = Psi(t, r), r >= t)
    - ``kind="phi"``:  Y' = A Y;  ``kind="sigma"``: Y' = A Y + Y A^T + B (the Lyapunov ODE)

    ``coeffs(x)`` returns [A(x)] (back, phi) or [A(x), G(x)] with B = G G^T (R, sigma) as mpmath
    matrices. Segments as odefun's: a radius from the last coefficient (tail below 2^-(prec+10)
    of the solution's scale, halved), at most 1/2, and ending on ``stops`` (kinks)."""

    DEGREE = 70

    def __init__(self, kind, coeffs, x0, Y0, tick, stops=()):
        self.kind, self.coeffs, self.tick = kind, coeffs, tick
        self.stops = sorted(stops)        # kinks (kept at their own, finer precision): a segment ends there
        self.prec = mpmath.mp.prec + 40
        with mpmath.workprec(self.prec), _gmp_context():
            self.segments = [self._segment(mpmath.mpf(x0), _gmat(Y0))]

    def _coefficient_series(self, x0, n, tol_prec):
        """Taylor coefficients at x0, j = 0..n, of each matrix ``coeffs`` returns (gmpy2 arrays at
        self.prec): forward differences with step 2^-tol_prec of values taken at (n + 1) times the
        precision, in fixed point (exact integer differences; each entry in units of 2^-big of
        its size at x0)."""
        big = self.prec * (n + 1)
        with mpmath.workprec(big):
            h = mpmath.ldexp(1, -tol_prec)
            rows, frac = [], None
            for i in range(n + 1):
                self.tick()
                mats = self.coeffs(x0 + i * h)
                vals = [M[a, b] for M in mats for a in range(M.rows) for b in range(M.cols)]
                if frac is None:
                    shapes = [(M.rows, M.cols) for M in mats]
                    mags = [mpmath.mag(v) if v else None for v in vals]
                    top = max([m for m in mags if m is not None], default=0)
                    frac = [big - (top if m is None else m) for m in mags]
                rows.append([_fixed(v, f) for v, f in zip(vals, frac)])
        D = np.array(rows, dtype=object)
        firsts = [D[0]]
        for j in range(1, n + 1):
            D = D[1:] - D[:-1]
            firsts.append(D[0])
        out = [[] for _ in shapes]
        with gmpy2.context(gmpy2.get_context(), precision=self.prec):
            fact = 1
            for j, f in enumerate(firsts):
                fact *= max(j, 1)
                flat = [gmpy2.mul_2exp(gmpy2.mpfr(v), tol_prec * j - fc) / fact for v, fc in zip(f, frac)]
                at = 0
                for q, (r, c) in enumerate(shapes):
                    out[q].append(np.array(flat[at:at + r * c], dtype=object).reshape(r, c))
                    at += r * c
        return out

    def _segment(self, x0, Y0):
        """(x0, x1, [Y_m]): the series at x0 and the end x1 of the interval it is trusted on."""
        n = self.DEGREE
        self.k = Y0.shape[0]
        tol_prec = mpmath.mp.prec - 40 + 10
        series = self._coefficient_series(x0, n, tol_prec)
        A = series[0]
        if self.kind in ("R", "sigma"):    # B = G G^T by the Cauchy product of G's series
            Gs = series[1]
            B = [sum((Gs[i].dot(Gs[j - i].T) for i in range(1, j + 1)), Gs[0].dot(Gs[j].T)) for j in range(n + 1)]
        a_nonzero = [any(v != 0 for v in Aj.ravel()) for Aj in A]    # F constant or polynomial: most are 0
        Y = [Y0]
        if self.kind == "R":
            Q = [_ginv(Y0)]
        for m in range(n):
            self.tick()
            if self.kind == "phi":             # Y' = A Y
                acc = A[0].dot(Y[m])
                for j in range(1, m + 1):
                    if a_nonzero[j]:
                        acc = acc + A[j].dot(Y[m - j])
            elif self.kind == "sigma":         # Y' = A Y + Y A^T + B
                AY = A[0].dot(Y[m])
                for j in range(1, m + 1):
                    if a_nonzero[j]:
                        AY = AY + A[j].dot(Y[m - j])
                acc = AY + AY.T + B[m]
            elif self.kind == "R":
                if m:
                    acc = Y[1].dot(Q[m - 1])
                    for j in range(2, m + 1):
                        acc = acc + Y[j].dot(Q[m - j])
                    Q.append(-Q[0].dot(acc))
                acc = A[0].dot(Y[m]) + B[0].dot(Q[m].T) / 2
                for j in range(1, m + 1):
                    if a_nonzero[j]:
                        acc = acc + A[j].dot(Y[m - j])
                    acc = acc + B[j].dot(Q[m - j].T) / 2
            else:
                acc = -Y[m].dot(A[0])
                for j in range(1, m + 1):
                    if a_nonzero[j]:
                        acc = acc - Y[m - j].dot(A[j])
            Y.append(acc / (m + 1))
        scale = max(abs(v) for v in Y0.ravel())
        radius = gmpy2.mpfr(1)
        tol = gmpy2.mpfr(2) ** (-tol_prec)
        for c in (Y[n], Y[n - 1]):
            top = max(abs(v) for v in c.ravel())
            if top:
                radius = min(radius, gmpy2.root(tol * max(scale, tol) / top, n))
        end = x0 + _mpf(radius / 2)
        return x0, min([v for v in self.stops if x0 < v < end] + [end]), Y

    def __call__(self, x):
        """Y(x) (mpmath matrix) for x >= x0."""
        with mpmath.workprec(self.prec), _gmp_context():
            x = mpmath.mpf(x)
            if x < self.segments[0][0]:
                raise ValueError("Taylor solution read before its start")
            while x > self.segments[-1][1]:
                x0, x1, Y = self.segments[-1]
                self.segments.append(self._segment(x1, _horner(Y, _gmp(x1 - x0))))
            for x0, x1, Y in self.segments:
                if x <= x1:
                    break
            V = _horner(Y, _gmp(x - x0))
            return mpmath.matrix([[_mpf(v) for v in row] for row in V])


def _fixed(v, frac):
    """The integer nearest below v * 2^frac (v a finite mpf)."""
    sign, man, exp, bc = v._mpf_
    if not man:
        if bc:
            raise ArithmeticError("coefficient is not finite")
        return 0
    shift = exp + frac
    n = man << shift if shift >= 0 else man >> -shift
    return -n if sign else n


def _horner(Y, d):
    acc = Y[-1]
    for c in Y[-2::-1]:
        acc = acc * d + c
    return acc


class MpReference:
    """High-precision reference for one coordinate (``coord_value``: its basis value, e.g. the
    dct2d frequency, or None without a basis)."""

    def __init__(self, spec, coord_value=None, dps=DPS, tick=None):
        self.spec, self.k, self.dps = spec, spec.k, dps
        self.tick = tick or (lambda: None)      # called in every right-hand side and integrand
        self._back = {}                         # t -> Psi(t, r) for r >= t (Taylor series)
        self._dense = {}                        # "phi" / "sigma" / "R" -> dense solution, built when first read
        self._at = {}                           # t -> {"phi", "sigma", "R"} from ``march``
        self._memo = {}                         # weights and stochastic results by their arguments
        self.kinks = []                         # times where F, G are not smooth (``kinks``)
        # A marginal-form spec with a per-coordinate basis (BDM: 1024 frequencies) is checked
        # against its defining formulas (Psi = mean_t / mean_s, Sigma = std^2, R = std) instead of
        # ODE solves, which cost minutes per frequency there; weights still by direct quadrature.
        self.direct = spec.form == "marginal" and spec.basis.symbol is not None
        with mpmath.workdps(dps):
            self.coord_value = None if coord_value is None else mpmath.mpf(sp.N(coord_value, dps + 10))
            self.env = _basis_env(spec, self.coord_value)
            k = self.k
            self._Fc, self._Gc = _Compiled(spec.F, "mp"), _Compiled(spec.G, "mp")
            if spec.form == "marginal":
                self._mc = {"mean": _Compiled(spec.mean, "mp"), "std": _Compiled(spec.std, "mp")}
            if self.direct:
                self.Sigma0 = mp_matrix(spec.Sigma0, t=mpmath.mpf(0), **self.env)
                return
            self.Sigma0 = mp_matrix(spec.Sigma0, t=mpmath.mpf(0), **self.env)
            self._m = 1 if _finite_at_zero(self.F, self.G, mpmath.mpf(0)) else ROOT_POWER
            self._R0 = R0_of(spec, self.Sigma0, self.coord_value) if k > 1 else None
            self.kinks = kinks(spec, coord_value)

    def _forward(self, t, y):
        """Right-hand side of the marched forward solve on gmpy2 arrays, y = [Phi, Sigma]:
        Phi' = F Phi, Sigma' = F Sigma + Sigma F^T + G G^T."""
        self.tick()
        k, n = self.k, self.k * self.k
        F, G = self._gF(t), self._gG(t)
        Phi, S = y[:n].reshape(k, k), y[n:].reshape(k, k)
        FS = F.dot(S)
        return np.concatenate([F.dot(Phi).ravel(), (FS + FS.T + G.dot(G.T)).ravel()])

    def _gF(self, t):
        """F(t) as a gmpy2 array (t a gmpy2 number; evaluated by the compiled mpmath form)."""
        return _gmat(self.F(_mpf(t)))

    def _gG(self, t):
        return _gmat(self.G(_mpf(t)))

    def _y0(self):
        return _vec(mpmath.eye(self.k)) + _vec(self.Sigma0) + (_vec(self._R0) if self.k > 1 else [])

    def _solution(self, name):
        """Dense solution t -> Phi / Sigma / R (``_TaylorSeries``), for reads between the grid
        times (the weights' quadrature nodes): Phi' = F Phi, Sigma' = F Sigma + Sigma F^T + G G^T,
        R' = F R + 1/2 G G^T R^-T (the other form of the R-ODE than derive's)."""
        if name not in self._dense:
            k, n = self.k, self.k * self.k
            block = {"phi": 0, "sigma": 1, "R": 2}[name]
            Y0 = _mat(k, self._y0()[block * n:(block + 1) * n])
            m = self._m

            def coeffs(x):                 # in u = t^(1/m) when a coefficient is infinite at 0
                tv, d = (x, 1) if m == 1 else (x ** m, m * x ** (m - 1))
                return [self.F(tv) * d] + ([self.G(tv) * mpmath.sqrt(d)] if name != "phi" else [])
            with mpmath.workdps(self.dps):
                x0 = 0 if m == 1 else mpmath.mpf("1e-16")
                stops = self.kinks if m == 1 else _roots(self.kinks, m)
                sol = _TaylorSeries(name, coeffs, x0, Y0, self.tick, stops)
            self._dense[name] = sol if m == 1 else (lambda t, sol=sol: sol(mpmath.root(t, m)))
        return self._dense[name]

    def march(self, times):
        """Phi and Sigma at ``times`` by one Bulirsch-Stoer solve of ``_forward`` from t = 0
        through the sorted times (no dense solution needed there); later reads at these exact
        times are served from it. R is not marched: the weights' quadrature reads it between
        the grid times, so its dense solution is built anyway."""
        new = sorted({mpmath.mpf(x) for x in times} - set(self._at))
        if self.direct or not new:
            return
        k, n = self.k, self.k * self.k
        m = self._m
        with mpmath.workdps(self.dps):
            y0 = self._y0()[:2 * n]
            if m == 1:
                ys = bulirsch_stoer(self._forward, 0, y0, new, [n, n], stops=self.kinks)
            else:                      # in u = t^(1/m)
                rhs = lambda u, y: m * u ** (m - 1) * self._forward(u ** m, y)
                ys = bulirsch_stoer(rhs, mpmath.mpf("1e-16"), y0, [mpmath.root(x, m) for x in new], [n, n],
                                    stops=_roots(self.kinks, m))
        for x, y in zip(new, ys):
            self._at[x] = {"phi": _mat(k, y[:n]), "sigma": _mat(k, y[n:2 * n]), "R": None}

    def _read(self, name, t):
        hit = self._at.get(t)
        if hit is not None and hit[name] is not None:
            return hit[name]
        return self._solution(name)(t)

    def F(self, t):
        return self._Fc(dict(self.env, t=t))

    def G(self, t):
        return self._Gc(dict(self.env, t=t))

    def _marginal(self, which, t):
        return self._mc[which](dict(self.env, t=t))

    def phi(self, t):
        if self.direct:
            return self._marginal("mean", t) / self._marginal("mean", mpmath.mpf(0))[0, 0]
        return self._read("phi", t)

    def psi(self, t, s):
        """Psi(t, s); for s >= t (every sampling step) from its own ODE in r started at t,
        dPsi(t, r)/dr = -Psi(t, r) F(r): Phi(t) Phi(s)^-1 would lose the digits of cond(Phi(s)),
        exp(|lambda_max - lambda_min| s) for a stiff F (20 of 45 digits for over-damped CLD)."""
        if self.direct or s < t:
            return self.phi(t) * mpmath.inverse(self.phi(s))
        if t not in self._back:
            k = self.k
            self._back[t] = _TaylorSeries("back", lambda r: [self.F(r)], t, mpmath.eye(k),
                                          self.tick, self.kinks)
        return self._back[t](s)

    def sigma(self, t):
        if self.direct:
            return self._marginal("std", t) ** 2
        return self._read("sigma", t)

    def R(self, t):
        if self.k == 1:
            return mpmath.matrix([[mpmath.sqrt(self.sigma(t)[0, 0])]])
        return self._read("R", t)

    def data_to_state(self, t):
        if self.spec.form == "marginal":
            return self._marginal("mean", t)
        return self.phi(t)

    def weights(self, s, t, node_times):
        """C_j = int_s^t 1/2 Psi(t,r) G G^T R_r^-T l_j(r) dr for the Lagrange nodes ``node_times``."""
        return self.weights_sets(s, t, [node_times])[0]

    def weights_sets(self, s, t, node_sets):
        """``weights`` for several sets of Lagrange nodes on the same step (predictor and
        corrector) from one quadrature: the integrand's matrix is computed once per point and
        every set's panels must converge."""
        key = ("weights", s, t, tuple(tuple(nodes) for nodes in node_sets))
        if key not in self._memo:
            self._memo[key] = self._weights_sets(s, t, node_sets)
        return self._memo[key]

    def _weights_sets(self, s, t, node_sets):
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
            return [W * l for nodes in node_sets for l in lagrange_weights_at(r, nodes)]
        flat = _gl_vector(integrand, s, t, sum(len(nodes) for nodes in node_sets), k, cuts=self.kinks)
        out = []
        for nodes in node_sets:
            out.append(flat[:len(nodes)])
            flat = flat[len(nodes):]
        return out

    def stochastic(self, s, t, lam):
        """(PsiHat - Psi) R_s and P_st by the backward ODE in tau = s - r (MATH.md section 5),
        y = [PsiHat(s - tau, s), P, Sigma(s - tau)], solved by Bulirsch-Stoer to the one end point
        it is needed at (mpmath.odefun's Taylor series cost 5-10 times more there: its
        derivatives come from finite differences at ~70 times the working precision)."""
        key = ("stochastic", s, t, lam)
        if key not in self._memo:
            self._memo[key] = self._stochastic(s, t, lam)
        return self._memo[key]

    def _stochastic(self, s, t, lam):
        k = self.k
        n = k * k
        with mpmath.extradps(BS_EXTRA_DIGITS), _gmp_context():
            lam2 = _gmp(mpmath.mpf(sp.N(lam, self.dps + 30))) ** 2
            c = (1 + lam2) / 2

        s_g = _gmp(mpmath.mpf(s))

        def rhs(tau, y):
            self.tick()
            r = s_g - tau
            F, G = self._gF(r), self._gG(r)
            GG = G.dot(G.T)
            Ph, P, S = y[:n].reshape(k, k), y[n:2 * n].reshape(k, k), y[2 * n:].reshape(k, k)
            Fh = F + c * GG.dot(_ginv(S))
            FhP, FS = Fh.dot(P), F.dot(S)
            return np.concatenate([-Fh.dot(Ph).ravel(), (lam2 * GG - FhP - FhP.T).ravel(), (-(FS + FS.T + GG)).ravel()])
        y0 = _vec(mpmath.eye(k)) + [mpmath.mpf(0)] * n + _vec(self.sigma(s))
        y = bulirsch_stoer(rhs, 0, y0, [s - t], [n, n, n], stops=[s - b for b in self.kinks if t < b < s])[0]
        PsiHat, P = _mat(k, y[:n]), _mat(k, y[n:2 * n])
        return (PsiHat - self.psi(t, s)) * self.R(s), P


TARGET_COL = 18       # Bulirsch-Stoer: the column a step should converge at (cheapest per unit step)
BS_EXTRA_DIGITS = 12  # ... and the digits it carries beyond the working precision


def _gmp_context():
    """gmpy2 arithmetic at mpmath's current precision."""
    return gmpy2.context(gmpy2.get_context(), precision=mpmath.mp.prec)


def _gmp(x):
    """mpmath mpf -> gmpy2 mpfr, exactly (at a precision >= the mpf's)."""
    sign, man, exp, bc = x._mpf_
    if not man:
        return gmpy2.mpfr(float(x))             # 0, inf, nan
    v = gmpy2.mul_2exp(gmpy2.mpfr(man), exp)
    return -v if sign else v


def _mpf(v):
    """gmpy2 mpfr -> mpmath mpf, exactly."""
    if not gmpy2.is_finite(v):
        return mpmath.mpf(float(v))
    m, e = v.as_mantissa_exp()
    return mpmath.mpf((int(m), int(e)))


def _gmat(M):
    return np.array([[_gmp(M[i, j]) for j in range(M.cols)] for i in range(M.rows)], dtype=object)


def _ginv(A):
    """Inverse of a small gmpy2 matrix (Gauss-Jordan, partial pivoting)."""
    k = A.shape[0]
    M = np.concatenate([A, np.array([[gmpy2.mpfr(int(i == j)) for j in range(k)] for i in range(k)], dtype=object)],
                       axis=1)
    for c in range(k):
        p = max(range(c, k), key=lambda i: abs(M[i, c]))
        if M[p, c] == 0:
            raise ZeroDivisionError("singular matrix")
        M[[c, p]] = M[[p, c]]
        M[c] = M[c] / M[c, c]
        for i in range(k):
            if i != c:
                M[i] = M[i] - M[i, c] * M[c]
    return M[:, k:]


def bulirsch_stoer(rhs, x0, y0, x_ends, blocks, max_col=24, stops=()):
    """[y(x) for x in ``x_ends``] (mpmath lists) of y' = rhs(x, y), y(x0) = y0, to the working
    precision; ``rhs`` takes and returns gmpy2 arrays (the integrator's arithmetic).

    Gragg's modified midpoint rule with n_j = 2j substeps, extrapolated in h^2 (Aitken-Neville),
    carrying ``BS_EXTRA_DIGITS`` more digits; a step is accepted when the last two diagonal values
    agree to 10^-(dps + 2) relative to each block of y (``blocks``: lengths of consecutive
    blocks, each a matrix judged normwise on its own scale, so a small P beside a large PsiHat
    keeps its digits). The step size is steered to converge near column ``TARGET_COL`` (at 45
    digits high columns are cheaper per unit step than short steps), halved where the error
    stops falling. ``x_ends`` are monotone, on one side of x0; steps end exactly on them (no
    dense output); steps also end on ``stops`` (kinks of the right-hand side) between x0 and the
    last end."""
    out = []
    if stops and x_ends:
        x0m, last = mpmath.mpf(x0), mpmath.mpf(x_ends[-1])
        inner = [v for v in stops if min(x0m, last) < v < max(x0m, last)]
        ends = sorted({mpmath.mpf(v) for v in x_ends} | set(inner), reverse=last < x0m)
        wanted = {mpmath.mpf(v) for v in x_ends}
        rows = bulirsch_stoer(rhs, x0, y0, ends, blocks, max_col)
        by_x = dict(zip(ends, rows))
        return [by_x[mpmath.mpf(v)] for v in x_ends if mpmath.mpf(v) in wanted]
    cuts = [0]
    for b in blocks:
        cuts.append(cuts[-1] + b)
    digits = mpmath.mp.dps
    with mpmath.extradps(BS_EXTRA_DIGITS), _gmp_context():
        tol = gmpy2.mpfr(10) ** (-(digits + 2))
        x = _gmp(mpmath.mpf(x0))
        y = np.array([_gmp(mpmath.mpf(v)) for v in y0], dtype=object)
        H = abs(_gmp(mpmath.mpf(x_ends[0])) - x) if x_ends else 0
        for xe in x_ends:
            xe = _gmp(mpmath.mpf(xe))
            sign = 1 if xe >= x else -1
            while x != xe:
                left = abs(xe - x)
                if not H:
                    H = left
                h = left / int(gmpy2.ceil(left / H)) if H < left else left   # equal steps up to xe
                ok, y_new, H_next = _bs_step(rhs, x, y, sign * h, tol, cuts, max_col)
                if ok:
                    y, x = y_new, (xe if h == left else x + sign * h)
                elif H_next < left * tol:
                    raise ArithmeticError(f"Bulirsch-Stoer: no convergence at x = {float(x):.17g} "
                                          f"(step {float(H_next):.3g})")
                H = H_next if (h == H or not ok) else max(H, H_next)   # a step cut short to land on xe keeps H
            out.append([_mpf(v) for v in y])
    return [[+v for v in row] for row in out]


def _bs_step(rhs, x, y, h, tol, cuts, max_col):
    """One extrapolated step: (accepted, y(x + h), the next step size)."""
    T, errs = [], []
    f0 = rhs(x, y)
    for j in range(1, max_col + 1):
        n = 2 * j
        hs = h / n
        z0, z1 = y, y + hs * f0
        for m in range(1, n):
            z0, z1 = z1, z0 + (2 * hs) * rhs(x + m * hs, z1)
        row = [z1]
        for c in range(1, j):
            ratio = (gmpy2.mpfr(n) / (2 * (j - c))) ** 2 - 1
            row.append(row[c - 1] + (row[c - 1] - T[j - 2][c - 1]) / ratio)
        T.append(row)
        if j < 2:
            continue
        err = gmpy2.mpfr(0)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            diff = max(abs(v) for v in row[j - 1][lo:hi] - row[j - 2][lo:hi])
            if diff:
                scale = max(max(abs(v) for v in row[j - 1][lo:hi]), max(abs(v) for v in y[lo:hi]))
                err = max(err, diff / scale)
        errs.append(err)
        if err <= tol:
            # high columns pay at 45 digits: steer towards accepting near column TARGET_COL
            grow = 2 if j < TARGET_COL - 4 else (1.3 if j < TARGET_COL else (0.8 if j > TARGET_COL + 2 else 1))
            return True, row[j - 1], abs(h) * grow
        if j >= 6 and not err <= errs[-2] / 2:   # the error stopped falling: the step is far too long
            break
    return False, None, abs(h) / 2


def _finite_at_zero(F, G, zero):
    """F(0) and G(0) finite: the solves start at t = 0; else (a coefficient like 1/sqrt(t),
    integrable but infinite at 0) they run in u = t^(1/ROOT_POWER)."""
    try:
        values = list(np.ravel(np.array(F(zero).tolist(), dtype=object))) + \
            list(np.ravel(np.array(G(zero).tolist(), dtype=object)))
        return all(mpmath.isfinite(v) for v in values)
    except (ZeroDivisionError, OverflowError, ValueError, FloatingPointError, TypeError):
        return False


def _gl_vector(integrand, a, b, n_out, k, degree=4, cuts=()):
    """``_gl_piece`` on [a, b] cut at ``cuts`` (kinks of the integrand): the sum of the pieces."""
    inner = sorted(v for v in cuts if min(a, b) < v < max(a, b))
    if a > b:
        inner = inner[::-1]
    points = [a] + inner + [b]
    total = None
    for lo, hi in zip(points[:-1], points[1:]):
        part = _gl_piece(integrand, lo, hi, n_out, k, degree)
        total = part if total is None else [x + y for x, y in zip(total, part)]
    return total


def _gl_piece(integrand, a, b, n_out, k, degree=4):
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

    def __init__(self, spec, times, coord_value=None, tick=None):
        from scipy.integrate import solve_ivp
        self.spec, self.k = spec, spec.k
        self.tick = tick or (lambda: None)      # called in every right-hand side and integrand
        self.env = _basis_env(spec, None if coord_value is None else float(sp.N(coord_value)))
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
        # each solve restarts at the kinks of F and G (a dense output across a kink is off by 1e-7)
        with mpmath.workdps(30):
            self.kinks = [float(v) for v in kinks(spec, coord_value)]
        kinks_u = [v ** (1.0 / m) for v in self.kinks]
        cuts = sorted({u0, u_stiff, u_end} | {v for v in kinks_u if u0 < v < u_end})
        self._parts, y = [], y0
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            stiff = hi <= u_stiff
            part = solve_ivp(rhs, (lo, hi), y, method="Radau" if stiff else "DOP853", rtol=1e-12 if stiff else 1e-13,
                             atol=1e-16, dense_output=True)
            self._parts.append((0.0 if lo == u0 else lo, hi, part.sol))
            y = part.y[:, -1]

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
        k = self.k
        sol = self._ivp(lambda r, y: (self.F(r) @ y.reshape(k, k)).ravel(), float(s), float(t), np.eye(k).ravel())
        return sol(float(t)).reshape(k, k)

    def _ivp(self, rhs, a, b, y0):
        """Dense DOP853 solution of y' = rhs from a to b (either direction), restarted at the kinks."""
        from scipy.integrate import solve_ivp
        inner = sorted((v for v in self.kinks if min(a, b) < v < max(a, b)), reverse=b < a)
        pts, parts, y = [a] + inner + [b], [], y0
        for lo, hi in zip(pts[:-1], pts[1:]):
            part = solve_ivp(rhs, (lo, hi), y, method="DOP853", rtol=1e-13, atol=1e-16, dense_output=True)
            parts.append((min(lo, hi), max(lo, hi), part.sol))
            y = part.y[:, -1]

        def sol(x):
            for lo, hi, f in parts:
                if lo <= x <= hi:
                    return f(x)
            return parts[-1][2](x)
        return sol

    def weights(self, s, t, node_times, factor="R", with_terms=False):
        """Weights int_s^t 1/2 Psi(t,r) G G^T K_r^-T l_j(r) dr with K = R (gDDIM) or K = L (Cholesky).

        The weights sum to K_t - Psi(t,s) K_s; the quadrature's absolute tolerance is relative to
        the size of those two terms (never 0: an integrand that is identically zero, a coordinate
        without noise, would otherwise be subdivided forever). With ``with_terms`` returns
        (weights, that size)."""
        from scipy.integrate import quad_vec
        k = self.k
        K = self.R if factor == "R" else (lambda r: np.linalg.cholesky(self.sigma(r)))

        def back_rhs(r, y):                    # d/dr Psi(t,r) = -Psi(t,r) F(r), r from t to s
            self.tick()
            return -(y.reshape(k, k) @ self.F(r)).ravel()
        back = self._ivp(back_rhs, float(t), float(s), np.eye(k).ravel())
        terms = max(np.max(np.abs(K(t))), np.max(np.abs(back(float(s)).reshape(k, k) @ K(s))))

        def integrand(r):
            self.tick()
            G = self.G(r)
            W = back(r).reshape(k, k) @ G @ G.T @ np.linalg.inv(K(r)).T / 2
            return np.stack([W * l for l in lagrange_weights_at(r, node_times)])
        lo, hi = sorted((float(s), float(t)))
        inner = [v for v in self.kinks if lo < v < hi]
        if not inner:
            val, _ = quad_vec(integrand, float(s), float(t), epsabs=1e-14 * terms, epsrel=1e-12, norm="max")
        else:       # ascending with the kinks as points (quad_vec ignores points when a > b: 5e-7 off)
            val, _ = quad_vec(integrand, lo, hi, epsabs=1e-14 * terms, epsrel=1e-12, norm="max", points=inner)
            val = val if float(s) <= float(t) else -val
        return (val, terms) if with_terms else val
