"""Sampler tables: per-step transition, factors and exponential-integrator weights.

Grid in sampling order t_0 = T > ... > t_N = t_min; step i goes from s = t_i to t = t_{i+1}
(MATH.md uses the paper's reversed indexing). All quantities at high precision (``_hp``),
rounded to float64 once.

Multistep weights (MATH.md section 4). With h = t - s and x = (r - s)/h, the weight of the
model output at node x_j is C_j = int_s^t W'(r) l_j(x(r)) dr with W(r) = Psi(t,r) R_r
(d/dr W = 1/2 Psi(t,r) G G^T R^-T). Expanding l_j in monomials, C_j = sum_p a_jp M_p with the
moments M_p = int_s^t W'(r) x^p dr, and by parts

    M_0 = R_t - Psi(t,s) R_s,    M_p = R_t - p int_0^1 W(s + h x) x^(p-1) dx   (p >= 1),

so only W (no R^-1, no G) is integrated, by adaptive Clenshaw-Curtis panels to QUAD_TOL (1e-36
relative per coordinate).
"""

import numpy as np

from . import _hp, _ode

import gmpy2

QUAD_TOL = gmpy2.mpfr("1e-36")   # relative, per coordinate: 36 digits, above the 30 promised


def lagrange_monomials(nodes):
    """a[j][p]: coefficients of x^p in the Lagrange basis polynomial l_j through ``nodes``."""
    out = []
    for j, xj in enumerate(nodes):
        poly = [gmpy2.mpfr(1)]
        denom = gmpy2.mpfr(1)
        for m, xm in enumerate(nodes):
            if m == j:
                continue
            poly = [(poly[p - 1] if p > 0 else 0) - xm * (poly[p] if p < len(poly) else 0)
                    for p in range(len(poly) + 1)]
            denom *= xj - xm
        out.append([c / denom for c in poly])
    return out


def step_moments(deriv, s, t, p_max):
    """M_p, p = 0..p_max, for the step s -> t: array [p_max+1, n_distinct, k, k]."""
    h = t - s
    one = np.array([t], dtype=object)
    R_t = deriv.R(one)[0]
    M0 = R_t - deriv.psi(one, np.array([s], dtype=object))[0] @ deriv.R(np.array([s], dtype=object))[0]
    if p_max == 0:
        return _zero_noise_free(deriv, M0[None], axis=1)

    def W(xn, coords):
        rn = s + h * xn
        return deriv.psi(np.array([t], dtype=object), rn, coords) @ deriv.R(rn, coords)   # [M, I, k, k]
    kinks = [(b - s) / h for b in getattr(deriv, "breaks", ()) if min(s, t) < b < max(s, t)]     # in x
    J = _ode.quad(W, gmpy2.mpfr(0), gmpy2.mpfr(1), deriv.n_distinct, tol=QUAD_TOL, powers=p_max,
                  breaks=kinks)  # [n_distinct, p_max, k, k]
    J = np.swapaxes(J, 0, 1)
    M = np.concatenate([M0[None], np.stack([R_t - p * J[p - 1] for p in range(1, p_max + 1)])])
    return _zero_noise_free(deriv, M, axis=1)


def _zero_noise_free(deriv, M, axis):
    """Exact zeros at the coordinates without noise (W' = 0 there: every moment vanishes)."""
    nf = getattr(deriv, "noise_free", None)
    if nf is not None and nf.any():
        M = M.copy()
        index = [slice(None)] * M.ndim
        index[axis] = np.nonzero(nf)[0]
        M[tuple(index)] = gmpy2.mpfr(0)
    return M


def combine(moments, nodes):
    """Weights [len(nodes), n_distinct, k, k] of the outputs at ``nodes`` (x units) from the moments."""
    a = lagrange_monomials(nodes)
    return np.stack([sum(a[j][p] * moments[p] for p in range(len(nodes))) for j in range(len(nodes))])


def stochastic_step(deriv, s, t, lam):
    """(PsiHat(t,s) - Psi(t,s)) R_s and P_st for stochastic gDDIM (MATH.md section 5).

    PsiHat is the transition of FHat = F + (1+lam^2)/2 G G^T Sigma^-1 and P_st the noise
    covariance; P_st = Sigma_t - PsiHat Sigma_s PsiHat^T (the backward Lyapunov ODE of
    MATH.md section 5 has this solution; the checker integrates that ODE instead).
    k = 1 in closed form: PsiHat = Psi^(-lam^2) (Sigma_t / Sigma_s)^((1+lam^2)/2).
    """
    lam2 = gmpy2.mpfr(lam) ** 2 if not isinstance(lam, gmpy2.mpfr) else lam ** 2
    ts, ss = np.array([t], dtype=object), np.array([s], dtype=object)
    Psi = deriv.psi(ts, ss)[0]
    S_t, S_s = deriv.sigma(ts)[0], deriv.sigma(ss)[0]
    R_s = deriv.R(ss)[0]
    if deriv.k == 1:
        if any(v <= 0 for v in np.ravel(Psi)):
            raise _hp.EvaluationError("Psi(t,s) <= 0: stochastic weights undefined")
        PsiHat = _hp.POW(Psi, -lam2) * _hp.POW(S_t / S_s, (1 + lam2) / 2)
    else:
        c = (1 + lam2) / 2

        def make_A(tau_n):                    # d/dtau PsiHat(s - tau, s) = -FHat(s - tau) PsiHat
            rn = s - tau_n
            Gn = deriv.G(rn)
            return -(deriv.F(rn) + c * (Gn @ _hp.T(Gn)) @ _hp.inv(deriv.sigma(rn)))
        kinks = [s - b for b in getattr(deriv, "breaks", ()) if t < b < s]                    # in tau
        sol = _ode.solve_linear(make_A, _hp.eye(deriv.k, (deriv.n_distinct,)), gmpy2.mpfr(0), s - t, breaks=kinks)
        PsiHat = sol.panels[-1][-1]
    P = S_t - PsiHat @ S_s @ _hp.T(PsiHat)
    P = (P + _hp.T(P)) / 2
    return _zero_noise_free(deriv, (PsiHat - Psi) @ R_s, 0), _zero_noise_free(deriv, P, 0)


def build(deriv, times, order, lam=None, corrector=False, moment_cache=None, weights=True):
    """All table arrays at high precision, per distinct coordinate (axis n_distinct). Returns a dict.

    ``moment_cache`` (a dict) shares the step moments between calls on the same grid (the
    moments do not depend on the order: building orders 1-4 costs one quadrature per step).
    ``weights=False`` skips the multistep weights (baselines on a fine grid need none).
    """
    tt = _hp.array(times)
    N = len(times) - 1
    k, n_distinct = deriv.k, deriv.n_distinct
    out = {"t": tt}
    out["psi"] = deriv.psi(tt[1:], tt[:-1])
    out["R"] = deriv.R(tt)
    out["sigma"] = deriv.sigma(tt)
    out["L"] = _hp.cholesky(out["sigma"], semidefinite=True)
    eps_w = _hp.zeros((N, order, n_distinct, k, k))
    corr_w = _hp.zeros((N, order + 1, n_distinct, k, k)) if corrector else None
    for i in range(N):
        s, t = tt[i], tt[i + 1]
        h = t - s
        q = min(order, i + 1)
        p_max = min(order + 1, i + 2) - 1 if corrector else q - 1
        if not weights:
            continue
        key = (float(s), float(t))
        if moment_cache is not None and key in moment_cache and len(moment_cache[key]) > p_max:
            M = moment_cache[key][:p_max + 1]
        else:
            M = step_moments(deriv, s, t, p_max)
            if moment_cache is not None:
                moment_cache[key] = M
        nodes = [(tt[i - j] - s) / h for j in range(q)]
        eps_w[i, :q] = combine(M, nodes)
        if corrector:
            qc = min(order + 1, i + 2)
            nodes_c = [(tt[i + 1 - j] - s) / h for j in range(qc)]
            corr_w[i, :qc] = combine(M, nodes_c)
    out["eps_weights"] = eps_w
    if corrector:
        out["corrector_weights"] = corr_w
    if lam is not None:
        sde_w, chol = _hp.zeros((N, n_distinct, k, k)), _hp.zeros((N, n_distinct, k, k))
        for i in range(N):
            w, P = stochastic_step(deriv, tt[i], tt[i + 1], lam)
            sde_w[i], chol[i] = w, _hp.cholesky(P, semidefinite=True)
        out["eps_weights_sde"], out["noise_chol"] = sde_w, chol
    out["data_to_state"] = deriv.data_to_state(tt)
    Dinv = _hp.inv(out["data_to_state"][-1])
    out["x0_weights"] = np.stack([Dinv, -(Dinv @ out["R"][-1])])
    out["F"] = deriv.F(tt)
    G = deriv.G(tt)
    out["GGT"] = G @ _hp.T(G)
    return out


def residuals(deriv, hp):
    """Internal identities at high precision (before rounding): worst relative residuals."""
    R, S = hp["R"], hp["sigma"]
    scale = _hp.abs_max(S) or gmpy2.mpfr(1)
    rrt = _hp.abs_max(R @ _hp.T(R) - S) / scale
    out = {"R R^T - Sigma": float(rrt)}
    if len(hp["t"]) > 2:
        tt = hp["t"]
        a = deriv.psi(tt[2:], tt[1:-1]) @ deriv.psi(tt[1:-1], tt[:-2])
        b = deriv.psi(tt[2:], tt[:-2])
        out["Psi semigroup"] = float(_hp.abs_max(a - b) / max(_hp.abs_max(b), gmpy2.mpfr("1e-300")))
    return out


def to_float64(hp, deriv):
    """Round every table once and expand the distinct coordinates to the full axis P."""
    idx = deriv.coord_index
    out = {}
    for name, value in hp.items():
        if name == "t":
            out[name] = _hp.to_float64(value, name)
            continue
        axis = {"psi": 1, "R": 1, "sigma": 1, "L": 1, "eps_weights": 2, "corrector_weights": 2,
                "eps_weights_sde": 1, "noise_chol": 1, "x0_weights": 1, "data_to_state": 1,
                "F": 1, "GGT": 1}[name]
        arr = _hp.to_float64(value, name)
        out[name] = np.ascontiguousarray(np.take(arr, idx, axis=axis))
    return out


def dense(deriv, tol=1e-14, n=16):
    """Piecewise Chebyshev interpolants of F, G G^T, R, L, D on [t_min, T] (for off-grid baselines)."""
    def fn(tn):
        G = deriv.G(tn)
        S = deriv.sigma(tn)
        return np.stack([deriv.F(tn), G @ _hp.T(G), deriv.R(tn), _hp.cholesky(S, semidefinite=True),
                         deriv.data_to_state(tn)], axis=1)                  # [n+1, 5, n_distinct, k, k]
    edges, values = _ode.interpolate(fn, _hp.mpf(deriv.spec.t_min), _hp.mpf(deriv.spec.T), n=n, tol=tol,
                                     breaks=getattr(deriv, "breaks", ()))
    xs = _ode._chebyshev(n)[0]
    idx = deriv.coord_index
    out = {"edges": np.array(edges, dtype=np.float64), "nodes": _hp.to_float64(xs, "nodes")}
    for q, name in enumerate(("F", "GGT", "R", "L", "D")):
        out[name] = np.ascontiguousarray(np.take(_hp.to_float64(values[:, :, q], name), idx, axis=2))
    return out
