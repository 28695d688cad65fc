"""Table variants: the multistep polynomial in another variable tau(t), and the data-prediction form.

Both are integrals of a closed-form integrand against Lagrange polynomials, computed here by
direct adaptive Clenshaw-Curtis quadrature of the integrand at MPFR precision (``_ode.quad``,
the same rule and tolerance as ``_tables``) and rounded to float64 once. The maths is in
``derive/MATH_x0.md``.

Variable (``TableRequest.variable``): the nodes of the Lagrange basis are tau(t_{i-j}):

    t       tau = t (the paper; the default, computed by ``_tables`` by parts, unchanged)
    rho     tau = det(Sigma_t)^(1/2k) / |det D_t|^(1/k)  (DEIS's rho = std/mean for k = 1)
    logsnr  tau = -log rho  (= lambda = log(alpha/sigma) for VP: DPM-Solver's variable)

taken per coordinate p (for k = 1 each frequency its own std/mean; for P = 1 the same as the
scalar the logsnr grid uses). Lagrange bases are invariant under affine maps of tau, so
log rho, lambda and log SNR = 2 lambda give the same weights.

eps form (``eps_weights`` in tau):   C_j = int_s^t 1/2 Psi(t,r) G G^T Sigma_r^-1 R_r l_j(tau(r)) dr
x0 form (``x0_psi``, ``x0_weights_ms``; ``x0_weights_flat``: the same step weight spread flat in tau):
    u_t = R_t R_s^-1 u_s + sum_j X_j x0hat_j,
    X_j = -int_s^t R_t R_r^-1 1/2 G G^T Sigma_r^-1 D_r l_j(tau(r)) dr
(R^-T = Sigma^-1 R). High-precision identities: sum_j C_j = R_t - Psi(t,s) R_s and
sum_j X_j = D_t - R_t R_s^-1 D_s (d/dr [R_t R_r^-1 D_r] is minus the x0 integrand).
"""

import gmpy2
import numpy as np

from . import _grids, _hp, _ode
from ._errors import SpecError

VARIABLES = ("t", "rho", "logsnr")
FORMS = ("eps", "x0")
QUAD_TOL = gmpy2.mpfr("1e-36")           # as _tables.QUAD_TOL
_LOG = np.frompyfunc(gmpy2.log, 1, 1)

# tensors this module adds: name -> axis of P (for the expansion of distinct coordinates)
AXES = {"x0_psi": 1, "x0_weights_ms": 2, "x0_weights_flat": 2, "x0_corrector_weights": 2}


def _det(A):
    """det of a batch [..., k, k] of MPFR matrices (k <= 2 directly, else through mpmath)."""
    k = A.shape[-1]
    if k == 1:
        return A[..., 0, 0]
    if k == 2:
        return A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
    flat = A.reshape(-1, k, k)
    return np.array([_grids._det(m) for m in flat], dtype=object).reshape(A.shape[:-2])


def tau(deriv, tt, variable, coords=None):
    """tau at times ``tt`` [M] for the coordinates ``coords`` (default all): object array [M, I]."""
    tt = np.asarray(tt, dtype=object)
    n = deriv.n_distinct if coords is None else len(coords)
    if variable == "t":
        return np.repeat(tt[:, None], n, axis=1)
    k = deriv.k
    S = deriv.sigma(tt, coords)
    D = deriv.data_to_state(tt)
    D = D if coords is None else D[:, coords]
    detS, detD = _det(S), np.abs(_det(D))
    if any(v <= 0 for v in detS.ravel()) or any(v == 0 for v in detD.ravel()):
        raise _hp.EvaluationError(f"variable {variable}: noise-to-signal ratio undefined (singular Sigma or D)")
    rho = _hp.POW(detS, gmpy2.mpfr(1) / (2 * k)) / _hp.POW(detD, gmpy2.mpfr(1) / k)
    if variable == "rho":
        return rho
    if variable == "logsnr":
        return -_LOG(rho)
    raise SpecError("--variable", "variable", f"must be one of {', '.join(VARIABLES)}, got {variable!r}")


def _integrands(deriv, t, rn, coords, forms):
    """The eps and/or x0 integrands at nodes ``rn`` [M]: dict form -> [M, I, k, k]."""
    G = deriv.G(rn, coords)
    S = deriv.sigma(rn, coords)
    half = (G @ _hp.T(G)) @ _hp.inv(S) / 2                                # 1/2 G G^T Sigma^-1
    out = {}
    tt = np.array([t], dtype=object)
    if "eps" in forms:
        out["eps"] = deriv.psi(tt, rn, coords) @ half @ deriv.R(rn, coords)
    if "x0" in forms:
        D = deriv.data_to_state(rn)
        D = D if coords is None else D[:, coords]
        R_t = deriv.R(tt, coords)                                           # [1, I, k, k]
        out["x0"] = -(R_t @ _hp.inv(deriv.R(rn, coords)) @ half @ D)
    return out


def step_moments(deriv, s, t, p_max, variable, forms):
    """Moments M_p = int_s^t integrand(r) y(r)^p dr, y = (tau(r) - tau(s)) / (tau(t) - tau(s)).

    Returns dict form -> [p_max + 1, n_distinct, k, k] (tau per coordinate)."""
    h = t - s
    ends = tau(deriv, np.array([s, t], dtype=object), variable)              # [2, n_distinct]
    t0, dtau = ends[0], ends[1] - ends[0]
    forms = tuple(forms)

    def fn(xn, items):
        rn = s + h * xn
        y = (tau(deriv, rn, variable, items) - t0[items]) / dtau[items]     # [M, I]
        vals = _integrands(deriv, t, rn, items, forms)
        pw = np.stack([y ** p for p in range(p_max + 1)], axis=2)[..., None, None]    # [M, I, p, 1, 1]
        return np.stack([vals[f][:, :, None] * pw for f in forms], axis=2)           # [M, I, F, p, k, k]
    kinks = [(b - s) / h for b in getattr(deriv, "breaks", ()) if min(s, t) < b < max(s, t)]     # in x
    J = _ode.quad(fn, gmpy2.mpfr(0), gmpy2.mpfr(1), deriv.n_distinct, tol=QUAD_TOL,
                  breaks=kinks)                                                 # [n_distinct, F, p, k, k]
    J = J * h
    return {f: np.moveaxis(J[:, m], 1, 0) for m, f in enumerate(forms)}


def lagrange_weights(moments, nodes):
    """Weights [len(nodes), n_distinct, k, k] from moments [p, n_distinct, k, k]; nodes: list of
    [n_distinct] arrays (y units)."""
    q = len(nodes)
    n_distinct = moments.shape[1]
    out = []
    for j in range(q):
        poly = [np.full(n_distinct, gmpy2.mpfr(1), dtype=object)]                 # coefficients of y^p
        denom = np.full(n_distinct, gmpy2.mpfr(1), dtype=object)
        for m in range(q):
            if m == j:
                continue
            poly = [(poly[p - 1] if p > 0 else 0) - nodes[m] * (poly[p] if p < len(poly) else 0)
                    for p in range(len(poly) + 1)]
            denom = denom * (nodes[j] - nodes[m])
        out.append(sum((poly[p] / denom)[:, None, None] * moments[p] for p in range(q)))
    return np.stack(out)


def build(deriv, times, order, variable, form, corrector=False):
    """High-precision variant tensors for one grid: dict name -> array (n_distinct distinct coordinates).

    eps form with variable != t: ``eps_weights`` (and ``corrector_weights``) in tau, replacing
    derive's t-weights; x0 form: ``x0_psi`` [N, n_distinct, k, k] and ``x0_weights_ms`` [N, q, n_distinct, k, k],
    with ``corrector``: ``x0_corrector_weights`` [N, q+1, n_distinct, k, k] (nodes t_{i+1}, t_i, ...);
    and ``x0_weights_flat`` [N, q, n_distinct, k, k]: the step's total weight M_0 = int_s^t K dr spread
    flat over the step in tau, X_j = M_0 int_0^1 l_j(y) dy (M_0 times the Adams-Bashforth coefficients
    in tau; for VP, q = 2, logsnr: UniPC's UniP-2 with B(h) = e^h - 1, "bh2"). Same nodes, no quadrature.
    """
    tt = _hp.array(times)
    N = len(times) - 1
    k, n_distinct = deriv.k, deriv.n_distinct
    forms = (("eps",) if variable != "t" else ()) + (("x0",) if form == "x0" else ())
    out = {}
    if not forms:
        return out
    taus = tau(deriv, tt, variable)                                         # [N+1, n_distinct]
    if "eps" in forms:
        out["eps_weights"] = _hp.zeros((N, order, n_distinct, k, k))
        if corrector:
            out["corrector_weights"] = _hp.zeros((N, order + 1, n_distinct, k, k))
    if "x0" in forms:
        out["x0_weights_ms"] = _hp.zeros((N, order, n_distinct, k, k))
        R = deriv.R(tt)
        out["x0_psi"] = R[1:] @ _hp.inv(R[:-1])
        out["x0_weights_flat"] = _hp.zeros((N, order, n_distinct, k, k))
        if corrector:
            out["x0_corrector_weights"] = _hp.zeros((N, order + 1, n_distinct, k, k))
    for i in range(N):
        s, t = tt[i], tt[i + 1]
        q = min(order, i + 1)
        qc = min(order + 1, i + 2) if corrector else 0
        M = step_moments(deriv, s, t, max(q, qc) - 1, variable, forms)
        dtau = taus[i + 1] - taus[i]
        nodes = [(taus[i - j] - taus[i]) / dtau for j in range(q)]
        nodes_c = [(taus[i + 1 - j] - taus[i]) / dtau for j in range(qc)]
        if "eps" in forms:
            out["eps_weights"][i, :q] = lagrange_weights(M["eps"], nodes)
            if qc:
                out["corrector_weights"][i, :qc] = lagrange_weights(M["eps"], nodes_c)
        if "x0" in forms:
            out["x0_weights_ms"][i, :q] = lagrange_weights(M["x0"], nodes)
            flat = np.stack([M["x0"][0] / (p + 1) for p in range(q)])              # M_p of M_0 spread flat in y
            out["x0_weights_flat"][i, :q] = lagrange_weights(flat, nodes)
            if qc:
                out["x0_corrector_weights"][i, :qc] = lagrange_weights(M["x0"], nodes_c)
    return out


def residuals(deriv, times, hp):
    """High-precision identities of the variant tensors: worst relative residuals (dict)."""
    tt = _hp.array(times)
    out = {}
    R, D = deriv.R(tt), deriv.data_to_state(tt)
    tiny = gmpy2.mpfr("1e-300")
    if "x0_weights_ms" in hp:
        ref = D[1:] - hp["x0_psi"] @ D[:-1]
        out["sum_j x0_weights_ms = D_t - R_t R_s^-1 D_s"] = float(
            _hp.abs_max(hp["x0_weights_ms"].sum(axis=1) - ref) / max(_hp.abs_max(ref), tiny))
        rr = hp["x0_psi"] @ R[:-1] - R[1:]
        out["x0_psi R_s = R_t"] = float(_hp.abs_max(rr) / max(_hp.abs_max(R), tiny))
        if "x0_weights_flat" in hp:
            out["sum_j x0_weights_flat = D_t - R_t R_s^-1 D_s"] = float(
                _hp.abs_max(hp["x0_weights_flat"].sum(axis=1) - ref) / max(_hp.abs_max(ref), tiny))
        if "x0_corrector_weights" in hp:
            out["sum_j x0_corrector_weights = D_t - R_t R_s^-1 D_s"] = float(
                _hp.abs_max(hp["x0_corrector_weights"].sum(axis=1) - ref) / max(_hp.abs_max(ref), tiny))
    if "eps_weights" in hp:
        ref = R[1:] - deriv.psi(tt[1:], tt[:-1]) @ R[:-1]
        out["sum_j eps_weights(tau) = R_t - Psi R_s"] = float(
            _hp.abs_max(hp["eps_weights"].sum(axis=1) - ref) / max(_hp.abs_max(ref), tiny))
    return out


def to_float64(hp, deriv):
    """Round the variant tensors once and expand the distinct coordinates to the full axis P."""
    idx = deriv.coord_index
    axes = {"eps_weights": 2, "corrector_weights": 2, **AXES}
    return {name: np.ascontiguousarray(np.take(_hp.to_float64(v, name), idx, axis=axes[name]))
            for name, v in hp.items()}
