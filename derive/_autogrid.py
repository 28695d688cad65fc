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
basis coordinates (up to 8, both ends of the spectrum). With a basis the proxies' variance at
frequency lam_p is c^2 lam_1 / (lam_1 + lam_p) (``spectral_prior``: the 1/f^2 spectrum of
natural images; equal variance at every frequency would hand the steps to high frequencies
whose errors the un-blurring flow amplifies, for data that has no power there). Minimising
sum_i g(t_i) h_i^(q+1) with N steps gives h ~ g^(-1/(q+1)): the grid equidistributes the
density g^(1/(q+1)) (floored at 1e-3 of its mean, so that no stretch of [t_min, T] is left
without steps), normalised and averaged half and half with the quadratic grid's density 1/sqrt(t)
(QUADRATIC_SHARE). Why the half: Gaussian proxies have one mode, so they see nothing of the
decisions between the modes of multimodal data, which in many dimensions happen at high noise
(large t); with the proxies alone the first step from T was too long and BDM images
(3 x 8 x 8) ended 1.4-2x behind the quadratic grid at NFE 10-20, VP rings 1.5x
(validation/results/auto.md). Shares 0.3 and 0.5 were measured; 0.5 kept.

Computation: on a fine candidate grid (768 intervals uniform in log t + 4 t / T) in MPFR
(``_hp``): Phi_S in closed form for k = 1 (sqrt(S_t / S_s)), for k > 1 by the trapezoid rule
on u_t = Psi(t,s) u_s + int_s^t Psi(t,r) 1/2 G G^T S^-1 u_r dr with Psi exact; eps^(q) by
q-th divided differences. The cumulative density is inverted piecewise linearly and each time
rounded to float64 once; T and t_min are the spec's values exactly.
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
QUADRATIC_SHARE = gmpy2.mpfr(1) / 2   # of the steps placed by the quadratic grid's density (see docstring)
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


def spectral_prior(deriv, coords):
    """Relative data variance per basis coordinate: lam_1 / (lam_1 + lam_p), lam_1 the smallest
    non-zero frequency value (1 without a basis): the 1/f^2 power spectrum of natural images,
    which blurring processes (dct2d bases) are built for."""
    if deriv.coord_values is None:
        return np.array([gmpy2.mpfr(1)] * len(coords), dtype=object)
    vals = [v for v in deriv.coord_values if v > 0]
    if not vals:
        return np.array([gmpy2.mpfr(1)] * len(coords), dtype=object)
    lam1 = min(vals)
    return np.array([lam1 / (lam1 + abs(deriv.coord_values[p])) for p in coords], dtype=object)


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
    cvec = np.repeat(np.array(variances, dtype=object), n_c) * np.tile(spectral_prior(deriv, coords), V)   # [B]
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


def error_density(deriv, order, tt=None, per_coord=False):
    """(times [M] increasing, density [M]): the summed proxy error density g(t) at each time
    (per_coord: [M, C], summed over the proxies of each of the C basis coordinates used)."""
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
    norm = _hp._apply(_hp.SQRT, norm2)                                   # [M - q, B]
    n_c = norm.shape[1] // len(PROXY_VARIANCES)
    by_coord = norm.reshape(len(norm), len(PROXY_VARIANCES), n_c).sum(axis=1)          # [M - q, C]
    dens = by_coord if per_coord else by_coord.sum(axis=1)
    full = np.empty((M,) + dens.shape[1:], dtype=object)
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


def _root(dens, order):
    return np.array([gmpy2.root(v, order + 1) if v > 0 else gmpy2.mpfr(0) for v in np.ravel(dens)],
                    dtype=object).reshape(np.shape(dens))


def grid_from_density(tt, dens, order, n_steps):
    """Float64 times [N+1] decreasing from T to t_min equidistributing dens^(1/(order+1))."""
    return grid_from_weights(tt, _root(dens, order), n_steps)


def grid_from_weights(tt, w, n_steps):
    """Float64 times [N+1] decreasing from T to t_min equidistributing the step density w [M] on tt."""
    w = np.asarray(w, dtype=object)
    mean = sum(w, gmpy2.mpfr(0)) / len(w)
    if not mean > 0:
        raise SpecError("--grid", "grid", "auto grid: zero local-error estimate (no noise on any coordinate?)")
    w = np.array([max(v, mean * DENSITY_FLOOR) for v in w], dtype=object)
    if QUADRATIC_SHARE > 0:                  # a share of the steps on the quadratic grid's density 1/sqrt(t)
        quad = np.array([1 / gmpy2.sqrt(v) for v in tt], dtype=object)
        w = w / _cumulative(tt, w)[-1] * (1 - QUADRATIC_SHARE) + quad / _cumulative(tt, quad)[-1] * QUADRATIC_SHARE
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
