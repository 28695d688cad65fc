"""High-precision quadrature, linear ODEs and interpolants on adaptive Chebyshev panels.

On a panel [a, a+h] a function is represented by its values at the n+1 Chebyshev points. A
linear ODE Y' = A(t) Y is solved by spectral collocation (Y_i = Y(a) + h/2 sum_j S_ij A_j Y_j
with the Chebyshev integration matrix S, solved directly, so stiffness does not limit h);
quadrature uses the Clenshaw-Curtis weights. A panel is accepted when the last Chebyshev
coefficients are below the tolerance (so the interpolant, used for dense output, is accurate
to that level too); the next panel's size follows from the observed coefficient decay.
One machinery serves Psi, Sigma and R (ODEs), the weights (quadrature) and the dense files.

Three panel loops remain because their refinement differs in kind: ``_drive`` marches (an ODE
carries its state from panel to panel, the next size from the coefficient decay); ``quad``
bisects independent panels per item (no state, so only the coordinates that fail are refined);
``interpolate`` marches on float64 edges that the dense files store (its halving rule fixes the
committed files' edges, which a shared step rule would move).
"""

import contextlib
import functools

import gmpy2
import numpy as np

from . import _hp

N_CHEB = 32
MAX_PANELS = 20000


@functools.lru_cache(maxsize=None)
def _chebyshev(n):
    """Ascending Chebyshev points on [-1, 1], integration matrix S (from -1), coefficient matrix C."""
    import mpmath
    with mpmath.workprec(_hp.PREC_BITS + 40):
        theta = [mpmath.pi - mpmath.pi * j / n for j in range(n + 1)]
        x = [mpmath.cos(th) for th in theta]                       # ascending, x_0 = -1
        Tm = [[mpmath.cos(m * th) for th in theta] for m in range(n + 3)]   # T_m(x_j)
        # values -> Chebyshev coefficients (DCT-I on the points)
        C = mpmath.matrix(n + 1, n + 1)
        for m in range(n + 1):
            for j in range(n + 1):
                c = Tm[m][j] / (2 if j in (0, n) else 1)
                C[m, j] = 2 * c / n / (2 if m in (0, n) else 1)
        # antiderivative coefficients, evaluated at the points minus the value at -1
        S = mpmath.matrix(n + 1, n + 1)
        for l in range(n + 1):
            c = [C[m, l] for m in range(n + 1)]
            b = [mpmath.mpf(0)] * (n + 3)
            b[1] += c[0]
            for m in range(1, n + 1):
                b[m + 1] += c[m] / (2 * (m + 1))
                if m > 1:                     # int T_m = T_{m+1}/(2(m+1)) - T_{m-1}/(2(m-1))
                    b[m - 1] -= c[m] / (2 * (m - 1))
            F0 = sum(b[m] * (-1) ** m for m in range(n + 3))
            for j in range(n + 1):
                S[j, l] = sum(b[m] * Tm[m][j] for m in range(n + 3)) - F0
        conv = lambda v: gmpy2.mpfr(mpmath.nstr(v, 90))
        xs = np.array([conv(v) for v in x], dtype=object)
        Sm = np.array([[conv(S[i, j]) for j in range(n + 1)] for i in range(n + 1)], dtype=object)
        Cm = np.array([[conv(C[i, j]) for j in range(n + 1)] for i in range(n + 1)], dtype=object)
    w = np.array([gmpy2.mpfr((-1) ** j) / (2 if j in (0, n) else 1) for j in range(n + 1)], dtype=object)
    return xs, Sm, Cm, w


def _apply_rows(M, Y):
    """M [n+1, n+1] applied along the first axis of Y [n+1, ...]."""
    return np.tensordot(M, Y, axes=(1, 0))


class Dense:
    """Piecewise Chebyshev interpolant of an ODE solution; call with an object array of times."""

    def __init__(self, edges, panels, n):
        self.edges, self.panels, self.n = edges, panels, n
        self._edge_f = np.array([float(e) for e in edges])

    @property
    def shape(self):
        return self.panels[0].shape[1:]

    def _exact_panel(self, v, i):
        """The panel holding v by exact comparison, from the float64 guess i: panels refined
        towards a kink of the coefficients (|t - c|) can be narrower than a float64 step, and an
        interpolant read outside its panel is garbage (Sigma -3.9e8 for a covariance of size 1)."""
        last = len(self.panels) - 1
        while i < last and v >= self.edges[i + 1]:
            i += 1
        while i > 0 and v < self.edges[i]:
            i -= 1
        return i

    def __call__(self, tq):
        tq = np.asarray(tq, dtype=object).reshape(-1)
        xs, _, _, w = _chebyshev(self.n)
        out = np.empty((len(tq),) + self.shape, dtype=object)
        idx = np.clip(np.searchsorted(self._edge_f, [float(v) for v in tq], side="right") - 1,
                      0, len(self.panels) - 1)
        idx = np.array([self._exact_panel(v, i) for v, i in zip(tq, idx)], dtype=int)
        for p in np.unique(idx):
            sel = np.nonzero(idx == p)[0]
            a, b = self.edges[p], self.edges[p + 1]
            Y = self.panels[p]
            rows, cs = [], []
            for q in sel:
                x = 2 * (tq[q] - a) / (b - a) - 1
                d = x - xs
                hit = [j for j, v in enumerate(d) if v == 0]
                if hit:
                    out[q] = Y[hit[0]]
                    continue
                rows.append(q)
                cs.append(w / d)
            if rows:                           # one product for every query of the panel
                C = np.array(cs, dtype=object)                        # [Q, n+1]
                num = np.tensordot(C, Y, axes=(1, 0))                 # [Q, ...]
                den = np.array([np.sum(c) for c in cs], dtype=object)
                out[rows] = num / den.reshape((-1,) + (1,) * (num.ndim - 1))
        return out


def _inside(breaks, a, b):
    """The breakpoints strictly between a and b, ascending (exact MPFR)."""
    return sorted(v for v in breaks if a < v < b)


def _drive(step, y0, a, b, h0, n, tol, breaks=()):
    """Adaptive panel loop; ``step(tn, h, y)`` returns the values at the panel's nodes. Panels
    end exactly on ``breaks`` (points where the coefficients are not smooth), so no panel holds
    a kink."""
    xs, _, C, _ = _chebyshev(n)
    a = a if isinstance(a, gmpy2.mpfr) else _hp.mpf(a)
    b = b if isinstance(b, gmpy2.mpfr) else _hp.mpf(b)
    span = b - a
    h = span if h0 is None else min(_hp.mpf(h0), span)
    edges, panels = [a], []
    y = np.asarray(y0, dtype=object)
    cur = a
    tiny = gmpy2.mpfr("1e-300")
    stops = _inside(breaks, a, b) + [b]
    while cur < b:
        if len(panels) > MAX_PANELS or h < span * gmpy2.mpfr("1e-40"):
            raise _hp.EvaluationError(f"solution not resolvable near t = {float(cur):.6g}")
        stop = next(v for v in stops if v > cur)
        h = min(h, stop - cur)
        tn = cur + (xs + 1) * (h / 2)
        Y = step(tn, h, y)
        scale = max(_hp.abs_max(Y), tiny)
        tail = _hp.abs_max(_apply_rows(C[-3:], Y))
        # Chebyshev tails of an analytic solution shrink like (h / c)^n: aim at 0.1 tol next time
        ratio = tail / (tol * scale) if gmpy2.is_finite(tail) else gmpy2.mpfr(1e6)
        factor = min(max((gmpy2.mpfr("0.1") / ratio) ** (gmpy2.mpfr(1) / n), gmpy2.mpfr("0.25")), gmpy2.mpfr(3)) \
            if ratio > 0 else gmpy2.mpfr(3)
        if ratio > 1:
            h = h * min(factor, gmpy2.mpfr("0.7"))
            continue
        panels.append(Y)
        cur = tn[-1] if h < stop - cur else stop
        edges.append(cur)
        y = Y[-1]
        h = h * factor
    return Dense(edges, panels, n)


def solve_linear(make_A, y0, a, b, h0=None, n=N_CHEB, tol=_hp.TOL, max_refinements=30, breaks=()):
    """Dense solution of the linear ODE Y' = A(t) Y, Y(a) = y0 [P, k, m], for b > a; panel edges
    on ``breaks`` (``_drive``).

    ``make_A(tn)`` returns A at the panel nodes, [n+1, P, k, k]. Each panel solves the
    Chebyshev collocation system Y_i - h/2 sum_j S_ij A_j Y_j = y0 (implicit, so stiffness does
    not limit the panel size; only the resolution of the solution does) by mixed-precision
    iterative refinement: float64 LU of the system for the corrections, the residual in MPFR
    from the structure (A_j Y_j, then S), O(n^2 k m) high-precision work per iteration.
    Falls back to MPFR elimination if the refinement does not converge.
    """
    _, S, _, _ = _chebyshev(n)
    S64 = _hp.to_float64(S, "integration matrix")
    y0 = np.asarray(y0, dtype=object)
    P, k, m = y0.shape
    N = (n + 1) * k
    to_mp = np.vectorize(lambda v: gmpy2.mpfr(float(v), 53), otypes=[object])

    def step(tn, h, y):
        A = make_A(tn)                                          # [n+1, P, k, k]
        coef = S * (h / 2)                                      # [n+1, n+1]
        A64 = _hp.to_float64(A, "ODE coefficient")
        c64 = S64 * float(h / 2)
        # float64 system: Mat[p, (i, a), (j, b)] = delta - c_ij A_j[p, a, b]
        Mat64 = -c64[None, :, None, :, None] * np.transpose(A64, (1, 2, 0, 3))[:, None, :, :, :]
        Mat64 = Mat64.reshape(P, N, N) + np.eye(N)[None]
        Y0 = np.broadcast_to(y[None], (n + 1, P, k, m))
        X = _hp.zeros((n + 1, P, k, m))
        target = _hp.abs_max(y) * tol * gmpy2.mpfr("1e-6") if _hp.abs_max(y) > 0 else tol
        for _ in range(max_refinements):
            r = Y0 - (X - _apply_rows(coef, A @ X))            # residual of the collocation system
            if _hp.abs_max(r) <= target:
                return X
            r64 = np.transpose(_hp.to_float64(r, "residual"), (1, 0, 2, 3)).reshape(P, N, m)
            dx = np.linalg.solve(Mat64, r64).reshape(P, n + 1, k, m)
            X = X + to_mp(np.transpose(dx, (1, 0, 2, 3)))
        # ill-conditioned panel: exact elimination in MPFR
        Mat = _hp.zeros((P, n + 1, k, n + 1, k))
        Mat -= coef[None, :, None, :, None] * np.transpose(A, (1, 2, 0, 3))[:, None, :, :, :]
        for i in range(n + 1):
            for a_ in range(k):
                Mat[:, i, a_, i, a_] += 1
        Rhs = np.broadcast_to(y[:, None, :, :], (P, n + 1, k, m)).reshape(P, N, m).copy()
        X = _hp.solve(Mat.reshape(P, N, N), Rhs)
        return np.transpose(X.reshape(P, n + 1, k, m), (1, 0, 2, 3))
    with _one_blas_thread():
        return _drive(step, y0, a, b, h0, n, tol, breaks)


@contextlib.contextmanager
def _one_blas_thread():
    """One BLAS thread for the small float64 systems: a threaded BLAS on a busy machine spends
    10-100 times longer waiting for its threads than computing (measured: 132 x 132 solve 0.5 ms
    on one thread, 4-50 ms threaded on a loaded 2-core box). No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def cumulative(fn, a, b, h0=None, n=N_CHEB, tol=_hp.TOL, breaks=()):
    """Dense antiderivative Y(t) = int_a^t fn(r) dr (b > a); fn: times [M] -> [M, ...]."""
    _, S, _, _ = _chebyshev(n)
    y0 = _zeros_like(fn, a)

    def step(tn, h, y):
        return y + _apply_rows(S, fn(tn)) * (h / 2)
    return _drive(step, y0, a, b, h0, n, tol, breaks)


def quad(fn, a, b, n_items, tol=_hp.TOL, n=N_CHEB, max_depth=60, powers=None, breaks=()):
    """Adaptive Clenshaw-Curtis quadrature of int_a^b fn, refined per item; [a, b] is first cut
    at ``breaks`` (points where fn is not smooth).

    With ``powers`` = p the result is the moments [n_items, p, ...] of int_a^b fn(x) x^j dx,
    j < p, from the same evaluations (the smoothness test looks at fn alone).

    ``fn(xn, items)`` evaluates the integrand at nodes xn [M] for the item indices ``items``
    (e.g. the per-coordinate frequencies) and returns [M, len(items), ...]. A panel is accepted
    for an item when the last Chebyshev coefficients of the integrand are below tol times the
    item's scale (max |fn| over [a, b] at the first nodes); only the items that fail are
    bisected, so smooth coordinates cost one panel while sharp ones refine where they need.
    """
    xs, S, C, _ = _chebyshev(n)
    wcc = S[-1]                                   # Clenshaw-Curtis weights on [-1, 1]
    a = a if isinstance(a, gmpy2.mpfr) else _hp.mpf(a)
    b = b if isinstance(b, gmpy2.mpfr) else _hp.mpf(b)
    result, scale = None, None
    cuts = [a] + _inside(breaks, a, b) + [b]
    stack = [(lo, hi, np.arange(n_items), 0) for lo, hi in zip(cuts[:-1], cuts[1:])][::-1]
    while stack:
        lo, hi, items, depth = stack.pop()
        h = hi - lo
        xn = lo + (xs + 1) * (h / 2)
        f = fn(xn, items)                                          # [n+1, I, ...]
        if result is None:
            result = _hp.zeros((n_items,) + ((powers,) if powers else ()) + f.shape[2:])
            scale = np.max(np.abs(f), axis=(0,) + tuple(range(2, f.ndim)))
            scale = np.where(scale > 0, scale, gmpy2.mpfr(1))
        tail = np.max(np.abs(_apply_rows(C[-3:], f)), axis=(0,) + tuple(range(2, f.ndim)))
        ok = np.array([bool(tl <= tol * sc) for tl, sc in zip(tail, scale[items])])
        if depth >= max_depth:
            if not ok.all():
                raise _hp.EvaluationError("quadrature did not converge (singular or non-finite integrand)")
        if powers:
            wp = np.stack([wcc * xn ** j for j in range(powers)])  # [p, n+1]
            val = np.moveaxis(np.tensordot(wp, f, axes=(1, 0)), 0, 1) * (h / 2)   # [I, p, ...]
        else:
            val = np.tensordot(wcc, f, axes=(0, 0)) * (h / 2)      # [I, ...]
        result[items[ok]] += val[ok]
        if not ok.all():
            mid = lo + h / 2
            rest = items[~ok]
            stack += [(lo, mid, rest, depth + 1), (mid, hi, rest, depth + 1)]
    return result


def _zeros_like(fn, a):
    probe = fn(np.array([a], dtype=object))
    return _hp.zeros(probe.shape[1:])


def interpolate(fn, a, b, n=16, tol=1e-14, max_panels=4096, breaks=()):
    """Piecewise Chebyshev interpolant of fn on [a, b] with float64 panel edges (one at each of
    ``breaks``, rounded to float64: a kink 1e-17 away from an edge is below the tolerance).

    ``fn(tn)`` returns [n+1, Q, P, ...] (Q quantities, P coordinates); a panel is accepted when
    the last Chebyshev coefficients of every quantity and coordinate are below ``tol`` times its
    largest value on the panel. Returns (edges [M+1] floats, values [M, n+1, Q, P, ...] MPFR).
    """
    xs, _, C, _ = _chebyshev(n)
    a, b = float(a), float(b)
    edges, panels = [a], []
    cur, h = a, (b - a) / 16
    stops = [float(v) for v in breaks if a < float(v) < b]
    while cur < b:
        if len(panels) > max_panels or h < (b - a) * 1e-14:
            raise _hp.EvaluationError(f"no accurate interpolant near t = {cur:.6g}")
        hi = b if cur + h >= b * (1 - 1e-15) else float(cur + h)
        hi = min([v for v in stops if cur < v < hi] + [hi])
        lo_m, hi_m = _hp.mpf(cur), _hp.mpf(hi)
        Y = fn(lo_m + (xs + 1) * ((hi_m - lo_m) / 2))
        red = tuple(range(3, Y.ndim))
        scale = np.max(np.abs(Y), axis=(0,) + red)
        tail = np.max(np.abs(_apply_rows(C[-3:], Y)), axis=(0,) + red)
        ok = all(t_ <= tol * max(s_, gmpy2.mpfr("1e-300")) for t_, s_ in zip(np.ravel(tail), np.ravel(scale)))
        if not ok:
            h = (hi - cur) / 2
            continue
        panels.append(Y)
        edges.append(hi)
        cur = hi
        h = (hi - edges[-2]) * 1.5
    return edges, np.stack(panels)
