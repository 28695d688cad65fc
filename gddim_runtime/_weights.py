"""Tables for any grid and NFE at run time, in float64, from a dense file (no sympy, mpmath, scipy).

``derive`` writes ``<name>_dense.safetensors``: F, G G^T, R, L and D (data-to-state) as piecewise
Chebyshev interpolants on [t_min, T] (16th degree per panel, 1e-14 relative per panel). This
module builds the sampler table of any grid from them (same names and shapes as a derive table;
derive's 60-digit tables stay the verified reference, ``tests/test_runtime_weights.py``).

Grid in sampling order t_0 = T > ... > t_N = t_min; step i from s = t_i to t = t_{i+1}, h = t - s.
Weights (MATH.md section 4), with x = (r - s)/h and l_j the Lagrange basis through the nodes
x_j = (t_{i-j} - s)/h:

    C_ij = int_s^t 1/2 Psi(t,r) G_r G_r^T R_r^-T l_j(x(r)) dr,     psi_i = Psi(t, s).

The integrand is integrated as it stands (derive integrates by parts, which in float64 would
cancel: the moments are small differences of R_t and its averages). l_j has one sign on [0, 1]
(all nodes lie at x <= 0), so the quadrature sums no cancelling terms. [t_min, T] is cut at the
grid times and the dense panel edges into pieces on which F, G G^T, R are single polynomials;
on each piece Psi(a, r) (a = the piece's start) solves d/dr Psi(a,r) = -Psi(a,r) F(r) by
Chebyshev collocation (integral form, 33 Lobatto points; exp of the integrated F when k = 1),
the integrand is summed by Clenshaw-Curtis on the same points and a piece is halved until the
nested 17-point rule agrees (so the 33-point rule is at rounding level). Psi(t, r) =
Psi(t, a) Psi(a, r) chains the pieces of one step.
"""

import decimal
import math
import numbers

import numpy as np

from ._format import TableError

_M = 32                          # Chebyshev-Lobatto points per piece: _M + 1 (nested rule: every other one)
_EST_TOL = 1e-10                 # nested 17-point rule vs 33-point rule; the 33-point error is ~ its square
_F_LEN = 2.0                     # max ||F|| * piece length, so that Psi(a, r) is resolved by 33 points
_MAX_PIECES = 2 ** 20            # quadrature pieces over [t_min, T]; past it the dense file is out of range
_MAX_HALVED = 2 ** 14            # pieces halved in one round: a smooth integrand needs a handful
_GRIDS = "uniform, quadratic, power:<kappa>, logsnr, edm[:<rho>] or a sequence of times"


def _lobatto(m):
    """Ascending Chebyshev-Lobatto points on [-1, 1], the integration matrix S (S[i] f = int_-1^x_i f)."""
    x = -np.cos(np.pi * np.arange(m + 1) / m)
    if m % 2 == 0:
        x[m // 2] = 0.0                                                       # cos(pi/2) would be 6e-17
    Vinv = np.linalg.inv(np.polynomial.chebyshev.chebvander(x, m))        # values -> Chebyshev coefficients
    S = np.polynomial.chebyshev.chebvander(x, m + 1) @ np.polynomial.chebyshev.chebint(Vinv, lbnd=-1, axis=0)
    return x, S


_X, _S = _lobatto(_M)
_W33 = _S[-1]                                                 # Clenshaw-Curtis weights on [-1, 1]
_W17 = _lobatto(_M // 2)[1][-1]                              # on the even-indexed points


class _Interp:
    """The dense file's interpolants evaluated in numpy float64 at given times and panels."""

    def __init__(self, dense):
        if isinstance(dense, (str, bytes)) or hasattr(dense, "__fspath__"):
            from ._dense import load_dense
            dense = load_dense(dense)
        self.meta, self.path = dense.meta, dense.path
        self.edges = dense.edges.detach().cpu().numpy()
        self.nodes = dense.nodes.detach().cpu().numpy()
        self.values = {n: v.detach().cpu().numpy() for n, v in dense.values.items()}
        n = len(self.nodes) - 1
        w = np.ones(n + 1)
        w[1::2] = -1
        w[0] *= 0.5
        w[-1] *= 0.5
        self.bary = w
        _, _, self.P, self.k, _ = self.values["R"].shape
        self.t_min, self.T = float(self.edges[0]), float(self.edges[-1])

    def integral_trace_F(self, t):
        """int_t_min^t tr F(r) dr at coordinate 0 (exact for the panel polynomials)."""
        if not hasattr(self, "_trF"):
            C = np.polynomial.chebyshev
            n = len(self.nodes) - 1
            trF = np.trace(self.values["F"][:, :, 0], axis1=-2, axis2=-1)               # [M, n+1]
            coef = np.linalg.solve(C.chebvander(self.nodes, n), trF.T)                 # [n+1, M]
            half = np.diff(self.edges) / 2
            anti = C.chebint(coef, lbnd=-1, axis=0) * half                              # int_a^r on each panel
            whole = C.chebval(1.0, anti)                                                # [M]
            self._trF = (anti, np.concatenate([[0.0], np.cumsum(whole)]))
        anti, start = self._trF
        p = self.panel(t)
        a, b = self.edges[p], self.edges[p + 1]
        x = 2 * (t - a) / (b - a) - 1
        return start[p] + np.array([np.polynomial.chebyshev.chebval(xi, anti[:, pi]) for xi, pi in zip(x, p)])

    def panel(self, t):
        return np.clip(np.searchsorted(self.edges, t, side="right") - 1, 0, len(self.edges) - 2)

    def __call__(self, names, t, panel=None):
        """dict name -> [len(t), P, k, k] at times t (1-D), on the given panels (default: t's own)."""
        t = np.asarray(t, dtype=np.float64)
        panel = self.panel(t) if panel is None else panel
        a, b = self.edges[panel], self.edges[panel + 1]
        d = (2 * (t - a) / (b - a) - 1)[:, None] - self.nodes[None]
        hit = d == 0
        c = self.bary / np.where(hit, 1.0, d)
        rows = hit.any(axis=1)
        c[rows] = hit[rows]
        c /= c.sum(axis=1, keepdims=True)
        out = {}
        for name in names:
            v = self.values[name]
            res = np.empty((len(t),) + v.shape[2:])
            for p in np.unique(panel):
                sel = panel == p
                res[sel] = np.tensordot(c[sel], v[p], axes=([1], [0]))
            out[name] = res
        return out


def _parse_grid(grid):
    if not isinstance(grid, str):
        return ("times", None)
    if grid in ("uniform", "quadratic"):
        return ("power", 1.0 if grid == "uniform" else 2.0)
    name, _, param = grid.partition(":")
    try:
        value = float(param) if param else None
    except ValueError:
        value = float("nan")
    if name == "power" and value is not None and math.isfinite(value) and 0.1 <= value <= 20:
        return ("power", value)
    if grid == "logsnr":
        return ("logsnr", None)
    if name == "edm" and (value is None or (math.isfinite(value) and 0.5 <= value <= 50)):
        return ("edm", 7.0 if value is None else value)
    raise TableError(f"grid: unknown grid {grid!r}; use {_GRIDS}")


def _log_rho(ip, t):
    """log of the noise-to-signal ratio at coordinate 0: (sum log|L_ii| - log|det D|) / k (derive/_grids.py).

    For k > 1, D = Psi(t, 0) can be ill-conditioned (hold3: its determinant from the entries
    would lose 4 digits and move the grid by 2e-13), so log|det D| comes from Liouville's
    formula, log|det D(t_min)| + int_t_min^t tr F, integrated exactly on the panels.
    """
    v = ip(("L", "D"), t)
    L = v["L"][:, 0]
    logdetL = np.log(np.abs(np.diagonal(L, axis1=-2, axis2=-1))).sum(-1)
    if ip.k == 1:
        D = np.abs(v["D"][:, 0, 0, 0])
        logdetD = np.log(np.where(D > 0, D, np.nan))
    else:
        sign, logdet0 = np.linalg.slogdet(ip(("D",), np.array([ip.t_min]))["D"][0, 0])
        logdetD = logdet0 + ip.integral_trace_F(t) if sign != 0 else np.full(len(t), np.nan)
    out = (logdetL - logdetD) / ip.k
    if not np.all(np.isfinite(out)):
        raise TableError(f"{ip.path}: grid: noise-to-signal ratio undefined (singular Sigma or D)")
    return out


def make_times(ip, grid, steps):
    """Float64 grid [steps + 1], decreasing from T to t_min, as derive/_grids.py defines it."""
    grid_name, param = _parse_grid(grid)
    T, t_min = ip.T, ip.t_min
    if grid_name == "times":
        times = [float(v) for v in (grid.tolist() if hasattr(grid, "tolist") else grid)]
        if len(times) < 2 or any(not math.isfinite(v) for v in times):
            raise TableError("grid: needs at least two finite times")
        if any(b >= a for a, b in zip(times, times[1:])):
            raise TableError("grid: times must decrease strictly (sampling order)")
        if times[0] > T or times[-1] < t_min:
            raise TableError(f"grid: times must lie in the dense file's [t_min, T] = [{t_min!r}, {T!r}]")
        return np.array(times)
    i = np.arange(steps + 1) / steps
    if grid_name == "power":                                        # at 40 digits, rounded once (as derive's)
        with decimal.localcontext(decimal.Context(prec=40)):
            kappa = decimal.Decimal(param)
            a, b = (decimal.Decimal(v) ** (1 / kappa) for v in (T, t_min))
            times = np.array([float((a + (b - a) * j / steps) ** kappa) for j in range(steps + 1)])
    else:
        lo, hi = _log_rho(ip, np.array([t_min, T]))
        if not lo < hi:
            raise TableError(f"grid: {grid_name} grid needs a noise-to-signal ratio increasing in t")
        if grid_name == "logsnr":
            targets = hi + (lo - hi) * i
        else:
            a, b = np.exp(hi / param), np.exp(lo / param)
            targets = param * np.log(a + (b - a) * i)
        lo_t, hi_t = np.full(steps - 1, t_min), np.full(steps - 1, T)
        for _ in range(64):                                    # bisection as derive's, on log rho
            mid = (lo_t + hi_t) / 2
            below = _log_rho(ip, mid) < targets[1:-1]
            lo_t, hi_t = np.where(below, mid, lo_t), np.where(below, hi_t, mid)
        times = np.concatenate([[T], (lo_t + hi_t) / 2, [t_min]])
        if np.any(np.diff(_log_rho(ip, times)) >= 0):
            raise TableError(f"grid: {grid_name} grid: the noise-to-signal ratio is not monotone in t")
    times[0], times[-1] = T, t_min
    if np.any(np.diff(times) >= 0):
        raise TableError("grid: repeated times (too many steps for this interval)")
    return times


def _lagrange(x, nodes):
    """l_j(x) for every node j: [len(nodes), len(x)] (product form)."""
    out = np.ones((len(nodes), len(x)))
    for j, xj in enumerate(nodes):
        for m, xm in enumerate(nodes):
            if m != j:
                out[j] *= (x - xm) / (xj - xm)
    return out


def _pieces(ip, times):
    """Pieces (a, b, panel, step) cutting [t_min, T] at grid times and panel edges, ascending."""
    tt = np.asarray(times)
    cuts = np.union1d(tt, ip.edges[(ip.edges > tt[-1]) & (ip.edges < tt[0])])
    a, b = cuts[:-1], cuts[1:]
    mid = (a + b) / 2
    panel = ip.panel(mid)
    step = np.searchsorted(-tt, -mid) - 1                       # t_{i+1} < mid < t_i
    if ip.k == 1:                                               # Psi = exp(-int F): exact on any piece
        return a, b, panel, step
    Fmax = np.abs(ip.values["F"]).sum(-1).max(axis=(1, 2, 3))   # a bound on ||F||_inf per panel
    n_sub = np.maximum(1, np.ceil((b - a) * Fmax[panel] / _F_LEN))
    if not n_sub.sum() <= _MAX_PIECES:                          # also NaN
        raise TableError(f"{ip.path}: weights: ||F|| up to {Fmax.max():.3g} needs more than {_MAX_PIECES} "
                         "quadrature pieces; derive this table with python -m derive")
    n_sub = n_sub.astype(int)
    rep = np.repeat(np.arange(len(a)), n_sub)
    frac = np.concatenate([np.arange(n) for n in n_sub])
    lo = a[rep] + (b - a)[rep] * frac / n_sub[rep]
    hi = np.where(frac + 1 == n_sub[rep], b[rep], a[rep] + (b - a)[rep] * (frac + 1) / n_sub[rep])
    return lo, hi, panel[rep], step[rep]


def _transition(F, half):
    """Psi(a, r) at the Lobatto points of each piece: F [n, m+1, P, k, k] -> [n, m+1, P, k, k]."""
    n, m1, P, k, _ = F.shape
    if k == 1:
        return np.exp(-half[:, None, None] * np.einsum("ij,njp->nip", _S, F[..., 0, 0]))[..., None, None]
    # Integral collocation, d/dr Psi(a,r) = -Psi(a,r) F(r): Psi_i^T + half sum_j S_ij F_j^T Psi_j^T = I.
    A = half[:, None, None, None, None, None] * np.einsum("ij,njpba->npiajb", _S, F)
    A = A.reshape(n, P, m1 * k, m1 * k) + np.eye(m1 * k)
    rhs = np.broadcast_to(np.tile(np.eye(k), (m1, 1)), (n, P, m1 * k, k))
    Z = np.linalg.solve(A, rhs).reshape(n, P, m1, k, k)                             # Z[.., i, a, c] = Psi_i[c, a]
    return np.swapaxes(Z, -1, -2).transpose(0, 2, 1, 3, 4)


def _piece_terms(ip, lo, hi, panel, nodes, groups, times, step):
    """Per piece: Psi(a, b) [n, P, k, k], int_a^b 1/2 Psi(a,r) G G^T R^-T l_j dr [n, J, P, k, k] and
    the nested rule's relative error estimate [n]."""
    n, m = len(lo), _M
    half = (hi - lo) / 2
    r = lo[:, None] + half[:, None] * (_X[None] + 1)
    r[:, 0], r[:, -1] = lo, hi                                  # exact piece ends
    v = ip(("F", "GGT", "R"), r.reshape(-1), np.repeat(panel, m + 1))
    F, GGT, R = (v[q].reshape((n, m + 1) + v[q].shape[1:]) for q in ("F", "GGT", "R"))
    Phi = _transition(F, half)
    # 1/2 Psi(a,r) G G^T R^-T = 1/2 Psi(a,r) (R^-1 G G^T)^T (G G^T symmetric).
    base = 0.5 * Phi @ np.swapaxes(np.linalg.solve(R, GGT), -1, -2)                  # [n, m+1, P, k, k]
    s, t = times[step], times[step + 1]
    xs = (r - s[:, None]) / (t - s)[:, None]
    ell = np.zeros((n, nodes.shape[1], m + 1))
    for p in range(n):
        for g0, g1 in groups:
            q = int((~np.isnan(nodes[p, g0:g1])).sum())
            ell[p, g0:g0 + q] = _lagrange(xs[p], nodes[p, g0:g0 + q])
    f = ell[:, :, :, None, None, None] * base[:, None]                                # [n, J, m+1, P, k, k]
    I33 = half[:, None, None, None, None] * np.einsum("i,njipab->njpab", _W33, f)
    I17 = half[:, None, None, None, None] * np.einsum("i,njipab->njpab", _W17, f[:, :, ::2])
    scale = np.abs(f).max(axis=(2, 4, 5)) * (hi - lo)[:, None, None] + 1e-300        # [n, J, P]
    err = (np.abs(I33 - I17).max(axis=(3, 4)) / scale).max(axis=(1, 2))
    return Phi[:, -1], I33, err


def _step_weights(ip, times, nodes, groups):
    """psi [N, P, k, k] and the weights [N, J, P, k, k] of the lags whose x-nodes are given per step
    (nodes [N, J], NaN where unused; groups: column ranges, one Lagrange basis each)."""
    lo, hi, panel, step = _pieces(ip, times)
    N, P, k, J = len(times) - 1, ip.P, ip.k, nodes.shape[1]
    chunk = max(4, 2 ** 16 // (P * k * k * J))
    done = {"lo": [], "step": [], "Phi": [], "I": []}
    for _ in range(40):
        if len(lo) == 0:
            break
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            out = [_piece_terms(ip, lo[c:c + chunk], hi[c:c + chunk], panel[c:c + chunk], nodes[step[c:c + chunk]],
                                groups, times, step[c:c + chunk]) for c in range(0, len(lo), chunk)]
        Phi, I, err = (np.concatenate([o[q] for o in out]) for q in range(3))
        if not np.all(np.isfinite(err)):
            raise TableError(f"{ip.path}: weights: the integrand overflows float64 near "
                             f"t = {lo[~np.isfinite(err)][0]:.6g} (F, G G^T or R in the dense file out of range)")
        ok = err <= _EST_TOL
        for key, val in (("lo", lo), ("step", step), ("Phi", Phi), ("I", I)):
            done[key].append(val[ok])
        bad = ~ok
        mid = (lo[bad] + hi[bad]) / 2
        lo, hi = np.concatenate([lo[bad], mid]), np.concatenate([mid, hi[bad]])
        panel, step = np.tile(panel[bad], 2), np.tile(step[bad], 2)
        if len(lo) > _MAX_HALVED:
            break
    if len(lo):
        raise TableError(f"{ip.path}: weights: quadrature did not converge near t = {lo[0]:.6g}")
    order = np.argsort(np.concatenate(done["lo"]), kind="stable")
    step_all = np.concatenate(done["step"])[order]
    Phi_all, I_all = np.concatenate(done["Phi"])[order], np.concatenate(done["I"])[order]
    psi = np.zeros((N, P, k, k))
    W = np.zeros((N, J, P, k, k))
    for i in range(N):
        Pref = np.broadcast_to(np.eye(k), (P, k, k)).copy()   # Psi(t, a) over the step's pieces, ascending
        acc = np.zeros((J, P, k, k))
        for p in np.flatnonzero(step_all == i):
            acc += Pref[None] @ I_all[p]
            Pref = Pref @ Phi_all[p]
        psi[i], W[i] = Pref, -acc                              # int_s^t = -int_t^s
    return psi, W


def _parse_lam(lam, ip):
    from fractions import Fraction
    if lam is None:
        return None
    try:
        value = Fraction(str(lam))
    except (ValueError, ZeroDivisionError):
        raise TableError(f"lam: not a number: {lam!r}") from None
    if value <= 0:
        raise TableError(f"lam: needs lam > 0 (lam = 0 is the deterministic table), got {lam!r}")
    if ip.k != 1:
        raise TableError(f"lam: run-time stochastic weights need k = 1 (this family has k = {ip.k}); "
                         "use python -m derive --lam")
    return value


def _stochastic(psi, R, M0, lam2, ip):
    """k = 1: (PsiHat - Psi) R_s and sqrt(P_st) with a = log(R_t / (Psi R_s)) = log1p(M0 / (Psi R_s)):
    PsiHat / Psi = exp((1 + lam^2) a), P_st = -Sigma_t expm1(2 lam^2 a) (derive/_tables.py's closed
    form, written without cancellation; M0 = R_t - Psi R_s is the quadrature's order-1 weight)."""
    ratio = M0 / (psi * R[:-1])
    if np.any(psi <= 0) or np.any(ratio <= -1):
        raise TableError(f"{ip.path}: lam: Psi(t,s) <= 0 or R_t <= 0: stochastic weights undefined")
    a = np.log1p(ratio)
    P = -(R[1:] ** 2) * np.expm1(2 * lam2 * a)
    return psi * R[:-1] * np.expm1((1 + lam2) * a), np.sqrt(np.maximum(P, 0))


def table_from_dense(dense, nfe=None, order=3, grid="quadratic", denoise=True, corrector=False, lam=None,
                     device="cpu", basis=None, probe=True):
    """A sampler Table for any grid, computed in float64 from a dense file (``<name>_dense.safetensors``).

    dense: a path or ``gddim_runtime.load_dense(...)``; nfe: model evaluations (steps = nfe - 1
    with the final denoising evaluation, nfe without); order q: 1-4 (the first steps use the
    orders the history allows); grid: uniform | quadratic | power:<kappa> | logsnr | edm[:<rho>]
    (derive's definitions, derive/_grids.py) or a decreasing sequence of times in
    [t_min, T] (nfe is then ignored); corrector: also Adams-Moulton weights; lam: also the
    stochastic gDDIM step (MATH.md section 5; k = 1 only, closed form); basis: (kind,
    size) of the table, e.g. ("dct2d", (32, 32)) (default: the dense file's spec.basis if it
    records one, else identity when P = 1 and a square dct2d otherwise). Returns the same tensors as
    a derive table (README "Table format"), float64 on ``device``, via ``from_tensors``.
    Accuracy: <= 1e-12 relative to derive's 60-digit tables on the built-in specs (README).
    probe: run the table's own sampler on Gaussian data with the exact score (``gaussian_probe``,
    0.01-3 s) and warn (``UnstableSamplerWarning``) when it is unstable on the process.
    """
    from ._table import from_tensors
    ip = _Interp(dense)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= 4:
        raise TableError(f"order: needs an integer 1-4, got {order!r}")
    if not isinstance(denoise, (bool, np.bool_)) or not isinstance(corrector, (bool, np.bool_)):
        raise TableError(f"denoise, corrector: need True or False, got {denoise!r}, {corrector!r}")
    order, denoise, corrector = int(order), bool(denoise), bool(corrector)
    explicit = not isinstance(grid, str)
    if not explicit:
        if nfe is None or isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
            raise TableError(f"nfe: needs an integer (model evaluations), got {nfe!r}")
        if nfe - (1 if denoise else 0) < 1:
            raise TableError(f"nfe: needs at least {2 if denoise else 1} (one sampling step), got {nfe!r}")
        nfe = int(nfe)
    steps = None if explicit else nfe - (1 if denoise else 0)
    times = make_times(ip, grid, steps)
    lam = _parse_lam(lam, ip)
    tensors = _tensors(ip, times, order, corrector, lam)
    basis = _table_basis(ip, basis)
    N = len(times) - 1
    grid_meta = ({"kind": "file", "name": "<times>", "param": None} if explicit else
                 {"kind": _parse_grid(grid)[0], "name": grid, "param": _parse_grid(grid)[1]})
    dmeta = ip.meta.get("spec", {})
    meta = {
        "generated": "gddim_runtime.table_from_dense: float64 quadrature of the dense interpolants",
        "source": ip.path, "spec": {"name": dmeta.get("name"), "sha256": dmeta.get("sha256"),
                                    "basis": {"kind": basis[0], "size": basis[1], "symbol": None},
                                    "T": repr(ip.T), "t_min": repr(ip.t_min)},
        "grid": grid_meta, "order": order, "nfe": N + (1 if denoise else 0), "steps": N,
        "denoise": bool(denoise), "corrector": bool(corrector), "lam": None if lam is None else str(lam),
        "k": ip.k, "P": ip.P,
    }
    tensors = {name: np.ascontiguousarray(v, dtype=np.float64) for name, v in tensors.items()}
    table = from_tensors(tensors, meta, device=device,
                         path=f"{ip.path or '<dense>'}[{meta['grid']['name']}, N={N}, q={order}]")
    if probe:
        from ._probe import warn_if_unstable
        warn_if_unstable(table)
    return table


def _lag_nodes(times, order, corrector, lam):
    """Lagrange x-nodes per step [N, J] (NaN where a lag is not yet reached) and their column groups:
    predictor lags t_i, t_{i-1}, ...; with ``corrector`` the Adams-Moulton lags t_{i+1}, t_i, ...;
    with ``lam`` one node x = 0 (l = 1: the weight R_t - Psi R_s itself)."""
    N = len(times) - 1
    J = 2 * order + 1 if corrector else order
    nodes = np.full((N, J), np.nan)
    for i in range(N):
        s, h = times[i], times[i + 1] - times[i]
        q = min(order, i + 1)
        nodes[i, :q] = (times[i - np.arange(q)] - s) / h
        if corrector:
            qc = min(order + 1, i + 2)
            nodes[i, order:order + qc] = (times[i + 1 - np.arange(qc)] - s) / h
    groups = [(0, order)] + ([(order, J)] if corrector else [])
    if lam is not None:
        nodes = np.concatenate([nodes, np.zeros((N, 1))], axis=1)
        groups.append((J, J + 1))
    return nodes, groups


def _tensors(ip, times, order, corrector, lam):
    """The table's arrays (float64 numpy, derive's names and shapes) on the grid ``times``."""
    J = 2 * order + 1 if corrector else order
    nodes, groups = _lag_nodes(times, order, corrector, lam)
    psi, W = _step_weights(ip, times, nodes, groups)
    at = ip(("F", "GGT", "R", "L", "D"), times)
    L = at["L"]
    Dinv = np.linalg.inv(at["D"][-1])
    tensors = {
        "t": times.copy(), "psi": psi, "R": at["R"], "sigma": L @ np.swapaxes(L, -1, -2), "L": L,
        "eps_weights": W[:, :order], "data_to_state": at["D"],
        "x0_weights": np.stack([Dinv, -(Dinv @ at["R"][-1])]), "F": at["F"], "GGT": at["GGT"],
    }
    if corrector:
        tensors["corrector_weights"] = W[:, order:J]
    if lam is not None:
        tensors["eps_weights_sde"], tensors["noise_chol"] = _stochastic(psi, at["R"], W[:, J], float(lam) ** 2, ip)
    return tensors


def _table_basis(ip, basis):
    """(basis name, [H, W] or []) of the table: as given, else the dense file's spec.basis if it
    records one, else identity for P = 1 and a square dct2d otherwise; checked against P."""
    P = ip.P
    dmeta = ip.meta.get("spec", {})
    if basis is None and isinstance(dmeta.get("basis"), dict):               # dense files that record it
        basis = (dmeta["basis"]["kind"], dmeta["basis"]["size"])
    if basis is None:
        side = math.isqrt(P)
        basis = ("identity", ()) if P == 1 else ("dct2d", (side, side))
        if P > 1 and side * side != P:
            raise TableError(f"{ip.path}: P = {P} coordinates: give basis=('dct2d', (H, W))")
    recorded = dmeta.get("basis") if isinstance(dmeta.get("basis"), dict) else None
    try:
        name, size = basis[0], [int(v) for v in basis[1]]
    except (TypeError, ValueError, IndexError):
        raise TableError(f"basis: expected (kind, size) such as ('dct2d', (H, W)), got {basis!r}") from None
    bad = (name not in ("identity", "dct2d") or (name == "dct2d" and (len(size) != 2 or min(size) < 1
                                                                      or size[0] * size[1] != P))
           or (name != "dct2d" and P != 1)
           or (recorded is not None and recorded.get("kind") == "dct2d" and size != [int(v) for v in recorded["size"]]))
    if bad:
        raise TableError(f"{ip.path}: basis {basis!r} does not match the dense file's P = {P} coordinates"
                         + (f" (its spec's basis: {recorded['kind']} {recorded.get('size')})" if recorded else ""))
    return name, size
