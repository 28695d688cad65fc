"""The ``auto`` grid: steps placed where the multistep sampler's measured local error is large.

Data proxy. Gaussian data N(0, c^2) in each data coordinate keep an exact score under every
linear SDE, from the derivation alone: the marginal covariance is S_t = Sigma_t + c^2 d_t d_t^T
(d_t = D_t e_0, the data's column of D_t), the probability flow is linear,
du/dt = A_S u with A_S = F + 1/2 G G^T S^-1, and the model output along it is
eps(t) = R_t^T S_t^-1 u_t. Unlike Dirac data (where gDDIM is exact and eps is constant along
the path, MATH.md section 3), eps changes where the noise-to-signal ratio crosses c; the
proxies c^2 = 1e-4, 1e-3, ..., 1 span the scales of data in [0, 1]-like units, so the grid is
built for the class, not for one data set.

Local error. The order-q exponential multistep step s -> t replaces eps by its Lagrange
interpolant P through q nodes; its local error is int_s^t Psi(t, r) K_r (eps - P)(r) dr with
K_r = 1/2 G G^T R_r^-T, i.e. ~ C h^(q+1) |K eps^(q)| for a step of size h. Propagated to the
end by the flow's transition Phi_S(t_min, t) and mapped to data space by the final denoising
step (x0 = e_0^T D^-1 (u - R eps), whose derivative for the proxy is
e_0^T D^-1 (I - Sigma S^-1)), one proxy's error density is

    g(t) = | e_0^T D^-1 (I - Sigma S^-1) |_{t_min} Phi_S(t_min, t) K_t d^q/dt^q [R^T S^-1 Phi_S(t, T)] R_T |

(Frobenius norm over the k prior directions), summed over the proxies and over a spread of
basis coordinates. Minimising sum_i g(t_i) h_i^(q+1) with N steps gives h ~ g^(-1/(q+1)):
the grid equidistributes the density g^(1/(q+1)) (floored at 1e-3 of its mean, so that no
stretch of [t_min, T] is left without steps).

Computation: on a fine candidate grid (768 intervals uniform in log t + 4 t / T) in MPFR (``_hp``): Phi_S in closed form for k = 1 (sqrt(S_t / S_s)), for k > 1 by
the trapezoid rule on u_t = Psi(t,s) u_s + int_s^t Psi(t,r) 1/2 G G^T S^-1 u_r dr with
Psi exact; eps^(q) by q-th divided differences. The cumulative density is inverted piecewise
linearly and each time rounded to float64 once; T and t_min are the spec's values exactly.
Deterministic: MPFR arithmetic is correctly rounded, no float64 library call enters.
"""

import math

import gmpy2
import numpy as np

from . import _hp
from ._errors import SpecError

PROXY_VARIANCES = ("1e-4", "1e-3", "1e-2", "1e-1", "1")      # data variance c^2 in the x component
N_CANDIDATE = 768            # intervals of the candidate grid
SLOPE = 4                    # w(t) = log t + SLOPE t / T: the candidate grid's variable
MAX_COORDS = 8               # basis coordinates used (spread over the sorted frequency values)
DENSITY_FLOOR = gmpy2.mpfr("1e-3")   # relative to the mean density


def candidate_grid(t_min, T, n=N_CANDIDATE):
    """Increasing MPFR times in [t_min, T], uniform in w(t) = log t + SLOPE t / T (geometric near
    t_min, uniform near T): a smooth spacing, so that divided differences of the trapezoid
    solution see its smooth error expansion, not the jitter of a merged grid."""
    a, b = _hp.mpf(t_min), _hp.mpf(T)
    w = lambda x: gmpy2.log(x) + SLOPE * x / b
    wa, wb = w(a), w(b)
    out = [a]
    for i in range(1, n):
        target = wa + (wb - wa) * i / n
        lo, hi = a, b
        for _ in range(80):                     # bisection: w is increasing
            mid = (lo + hi) / 2
            if w(mid) < target:
                lo = mid
            else:
                hi = mid
        out.append((lo + hi) / 2)
    out.append(b)
    return np.array(out, dtype=object)


def _coords(deriv):
    """Up to MAX_COORDS coordinate indices (of the Pu distinct values) spread over the spectrum."""
    if deriv.Pu == 1:
        return np.array([0])
    live = [p for p in range(deriv.Pu) if not deriv.noise_free[p]]
    live.sort(key=lambda p: deriv.coord_values[p])
    if len(live) <= MAX_COORDS:
        return np.array(live)
    pick = sorted({live[round(j * (len(live) - 1) / (MAX_COORDS - 1))] for j in range(MAX_COORDS)})
    return np.array(pick)


def proxy_paths(deriv, tt, coords):
    """The proxies along the candidate times ``tt`` (increasing): a dict of [M, B, k, k] arrays
    (batch B = proxy-major over (variance, coordinate)): Sigma, S, S^-1, R, D, G G^T and
    Y(t) = Phi_S(t, T) R_T, the proxy's probability-flow state from u_T = R_T z, per unit z."""
    k, M = deriv.k, len(tt)
    Sig = deriv.sigma(tt, coords)                        # [M, C, k, k]
    R = deriv.R(tt, coords)
    D = deriv.data_to_state(tt)[:, coords]
    G = deriv.G(tt, coords)
    GG = G @ _hp.T(G)
    n_c = len(coords)
    variances = [gmpy2.mpfr(v) for v in PROXY_VARIANCES]
    V = len(variances)
    rep = lambda X: np.concatenate([X] * V, axis=1)
    Sig, R, D, GG = rep(Sig), rep(R), rep(D), rep(GG)
    cvec = np.repeat(np.array(variances, dtype=object), n_c)            # [B]
    d = D[..., :, :1]                                                    # [M, B, k, 1]
    S = Sig + cvec[None, :, None, None] * (d @ _hp.T(d))
    Sinv = _hp.inv(S)
    if k == 1:                                                           # Phi_S(t, T) = sqrt(S_t / S_T)
        root = _hp._apply(_hp.SQRT, S[..., 0, 0] / S[M - 1][None, :, 0, 0])
        Y = root[..., None, None] * R[M - 1][None]
    else:                                                                # trapezoid, from T down to t_min
        Y = np.empty_like(S)
        Y[M - 1] = R[M - 1]
        psi = rep(deriv.psi(tt[:-1], tt[1:], coords))                    # Psi(t_m, t_{m+1})
        Bm = GG @ Sinv / 2
        I = _hp.eye(k, (S.shape[1],))
        for m in range(M - 2, -1, -1):
            h = tt[m] - tt[m + 1]                                        # < 0: sampling direction
            rhs = psi[m] @ ((I + Bm[m + 1] * (h / 2)) @ Y[m + 1])
            Y[m] = _hp.inv(I - Bm[m] * (h / 2)) @ rhs
    return {"Sigma": Sig, "S": S, "Sinv": Sinv, "R": R, "D": D, "GG": GG, "Y": Y, "variance": cvec}


def error_density(deriv, order, tt=None):
    """(times [M] increasing, density [M]): the summed proxy error density g(t) at each time."""
    spec = deriv.spec
    tt = candidate_grid(spec.t_min, spec.T) if tt is None else tt
    k, M = deriv.k, len(tt)
    p = proxy_paths(deriv, tt, _coords(deriv))
    Sig, S, Sinv, R, D, GG, Y = (p[key] for key in ("Sigma", "S", "Sinv", "R", "D", "GG", "Y"))
    E = _hp.T(R) @ Sinv                                                  # eps = E u
    K = GG @ _hp.inv(_hp.T(R)) / 2                                       # 1/2 G G^T R^-T
    eps = E @ Y                                                          # [M, B, k, k]
    # data-space sensitivity of the final denoised sample to u at t_min, times Phi_S(t_min, .)
    X = (_hp.inv(D[0]) @ (_hp.eye(k, (S.shape[1],)) - Sig[0] @ Sinv[0]))[:, :1, :]   # [B, 1, k]
    out_map = (X @ Y[0])[None] @ _hp.inv(Y)                              # [M, B, 1, k]
    # q-th derivative by divided differences over q+1 consecutive points, centred on a point
    q = order
    deriv_q = _divided(eps, tt, q)                                       # [M - q, B, k, k]
    lo = q // 2
    idx = np.arange(lo, lo + M - q)
    g = out_map[idx] @ K[idx] @ deriv_q                                  # [M - q, B, 1, k]
    norm2 = np.sum(g * g, axis=(2, 3))                                   # [M - q, B]
    dens = np.array([sum((_hp.SQRT(v) for v in row), gmpy2.mpfr(0)) for row in norm2], dtype=object)
    full = np.empty(M, dtype=object)
    full[idx] = dens
    full[:lo] = dens[0]
    full[lo + M - q:] = dens[-1]
    return tt, full


def _divided(Yv, tt, q):
    """q! times the q-th divided difference of Yv over windows of q+1 consecutive times."""
    cur = [Yv[m] for m in range(len(tt))]
    for level in range(1, q + 1):
        cur = [(cur[m + 1] - cur[m]) / (tt[m + level] - tt[m]) for m in range(len(cur) - 1)]
    return np.array(cur, dtype=object).reshape((len(cur),) + Yv.shape[1:]) * math.factorial(q)


def grid_from_density(tt, dens, order, n_steps):
    """Float64 times [N+1] decreasing from T to t_min equidistributing dens^(1/(order+1))."""
    w = np.array([gmpy2.root(v, order + 1) if v > 0 else gmpy2.mpfr(0) for v in dens], dtype=object)
    mean = sum(w, gmpy2.mpfr(0)) / len(w)
    if not mean > 0:
        raise SpecError("--grid", "grid", "auto grid: zero local-error estimate (no noise on any coordinate?)")
    w = np.array([max(v, mean * DENSITY_FLOOR) for v in w], dtype=object)
    cum = [gmpy2.mpfr(0)]
    for m in range(len(tt) - 1):
        cum.append(cum[-1] + (w[m] + w[m + 1]) / 2 * (tt[m + 1] - tt[m]))
    total = cum[-1]
    times = [float(tt[-1])]
    m = 0
    for i in range(1, n_steps):
        target = total * (n_steps - i) / n_steps
        while cum[m + 1] < target:
            m += 1
        frac = (target - cum[m]) / (cum[m + 1] - cum[m])
        times.append(float(tt[m] + frac * (tt[m + 1] - tt[m])))
        m = 0
    times.append(float(tt[0]))
    times = times[:1] + sorted(times[1:-1], reverse=True) + times[-1:]
    return times


def make_auto_grid(deriv, n_steps, order):
    """The auto grid for ``n_steps`` steps of the order-``order`` sampler (float64, decreasing)."""
    tt, dens = error_density(deriv, order)
    return grid_from_density(tt, dens, order, n_steps)


def _cumulative(tt, dens):
    cum = [gmpy2.mpfr(0)]
    for m in range(len(tt) - 1):
        cum.append(cum[-1] + (dens[m] + dens[m + 1]) / 2 * (tt[m + 1] - tt[m]))
    return cum


def _at(tt, cum, x):
    """Piecewise-linear interpolation of ``cum`` (on increasing ``tt``) at x."""
    x = _hp.mpf(x)
    lo, hi = 0, len(tt) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tt[mid] <= x:
            lo = mid
        else:
            hi = mid
    return cum[lo] + (cum[hi] - cum[lo]) * (x - tt[lo]) / (tt[hi] - tt[lo])


def _node_integral(nodes):
    """|int_0^1 prod_j (x - x_j) dx| for the step's nodes x_j (in units of its step)."""
    poly = [gmpy2.mpfr(1)]
    for xj in nodes:
        poly = [(poly[p - 1] if p > 0 else 0) - xj * (poly[p] if p < len(poly) else 0) for p in range(len(poly) + 1)]
    return abs(sum((c / (p + 1) for p, c in enumerate(poly)), gmpy2.mpfr(0)))


def predicted_error(densities, times, order):
    """Sum over steps of the modelled local error, propagated to the data (see module docstring):
    step i of order q_i = min(order, i + 1) errs by mean_step(g_{q_i}) / q_i! |int prod (r - t_{i-j}) dr|.

    densities: {q: (tt, g_q)} from ``error_density``; times: the grid, decreasing."""
    total = gmpy2.mpfr(0)
    cums = {q: (tt, _cumulative(tt, g)) for q, (tt, g) in densities.items()}
    for i in range(len(times) - 1):
        q = min(order, i + 1)
        tt, cum = cums[q]
        s, t = _hp.mpf(times[i]), _hp.mpf(times[i + 1])
        h = t - s
        mean_g = (_at(tt, cum, s) - _at(tt, cum, t)) / (s - t)
        nodes = [(_hp.mpf(times[i - j]) - s) / h for j in range(q)]
        total += mean_g / math.factorial(q) * abs(h) ** (q + 1) * _node_integral(nodes)
    return total
