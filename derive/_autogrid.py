"""The ``auto`` grid: steps placed where the multistep sampler's measured local error is large;
and ``recommend``: the configuration (order, form, variable, corrector) for a process and NFE,
chosen by running every candidate sampler on two-mode proxies (second half of this module).

``make_auto_grid``: AUTO_SHARE (0.7) of the steps placed as the proxies ask, the rest on the quadratic
grid's density (``blend_grids``; the proxies' modes part at low noise, so alone they leave the high-noise
end with few steps, where learned networks on high-dimensional data went astray: README, "The auto
grid and learned networks"). The proxies' grid (``proxy_grid``, GRID_SOURCE "best"): per NFE and order,
of two grids the one on which the two-mode proxies end closer to their reference (``grid_choice``): the measured grid
(``measured_density``: each step's share of the proxies' global error, from the order-q x0+pc
sampler restarted at every t_i of a 40-step grid on the exact state; validation/results/
auto_default.md) and the Gaussian-proxy grid described next. ``recommend`` also charges each candidate for what a
small model error does to it (``Proxies.amplification``): the proxies' score is exact, a network's is not.

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
import numbers

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
GRID_SOURCE = "best"         # "measured": two-mode proxies' per-step errors (measured_grid); "gaussian": error_density;
                             # "best": per NFE and order, the one of the two the proxies end closer on (grid_choice)
AUTO_SHARE = gmpy2.mpfr("0.7")   # of the steps placed as the proxies ask (the rest: the quadratic grid's density)
MEASURED_SHARE = gmpy2.mpfr(1)   # of the steps placed by the measured density (the rest: the Gaussian-proxy grid)
MEASURE_STEPS = 40           # steps of the grid on which measured_density measures
MEASURE_SUBSTEPS = 12        # reference steps per measured step (states_at)


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
    """The auto grid for ``n_steps`` steps of the order-``order`` sampler (float64, decreasing): AUTO_SHARE
    of the steps placed as the proxies ask (``proxy_grid``), the rest on the quadratic grid's density
    (``blend_grids``). Why: the proxies are one-dimensional two-mode mixtures whose modes part at low noise,
    so their grids take long first steps from T; data in many dimensions (digits, images) make decisions at
    high noise, and learned networks on them went astray there (the digits CLD network at NFE 10: endpoint
    0.61 on auto:4 against 0.098 with the blend; PSLD at NFE 5: 29 against 1.3)."""
    proxy = proxy_grid(deriv, n_steps, order)
    if AUTO_SHARE == 1:
        return proxy
    from . import _grids
    quadratic = _grids.make_grid(_grids.parse_kind("quadratic"), n_steps, deriv)
    return blend_grids(proxy, quadratic, AUTO_SHARE)


def proxy_grid(deriv, n_steps, order):
    """The grid the proxies ask for: GRID_SOURCE "best" (default): of the measured grid and the
    Gaussian-proxy grid, the one on which the two-mode proxies end closer to their reference (``grid_choice``)."""
    if GRID_SOURCE == "best":
        return grid_choice(deriv, n_steps, order)[0]
    if GRID_SOURCE == "measured":
        return measured_grid(deriv, n_steps, order)
    return gaussian_grid(deriv, n_steps, order)


def blend_grids(a, b, share):
    """The grid of N steps whose step density is ``share`` x a's + (1 - share) x b's: each grid's cumulative
    step count is piecewise linear in t between its times (i / N at a[i]); the blend of the two is inverted
    at j / N. a and b decrease from the same T to the same t_min (a's ends are kept exactly). MPFR
    arithmetic on the float64 times (correctly rounded), each time rounded to float64 once."""
    n = len(a) - 1
    if len(b) != n + 1:
        raise ValueError("blend_grids: the grids need the same number of steps")
    share = gmpy2.mpfr(share)
    A, B = [gmpy2.mpfr(v) for v in a], [gmpy2.mpfr(v) for v in b]

    knots = sorted(set(A[1:-1]) | set(B[1:-1]) | {A[0], A[-1]}, reverse=True)   # where the blend bends

    def counts(ts):                                       # i / N at ts[i], linear between, at every knot
        out, i = [], 0
        for t in knots:                                   # knots and ts both decrease: one pass
            while i < n - 1 and ts[i + 1] > t:
                i += 1
            out.append((i + (ts[i] - t) / (ts[i] - ts[i + 1])) / n)
        return out
    c = [share * x + (1 - share) * y for x, y in zip(counts(A), counts(B))]
    times, m = [float(A[0])], 0
    for j in range(1, n):
        target = gmpy2.mpfr(j) / n
        while c[m + 1] < target:
            m += 1
        frac = (target - c[m]) / (c[m + 1] - c[m])
        times.append(float(knots[m] + frac * (knots[m + 1] - knots[m])))
    times.append(float(A[-1]))
    return times


def gaussian_grid(deriv, n_steps, order):
    """The Gaussian-proxy grid: error_density's steps, QUADRATIC_SHARE of them on the quadratic grid's density."""
    tt, dens = _density_cached(deriv, order)
    return grid_from_density(tt, dens, order, n_steps)


def grid_choice(deriv, n_steps, order):
    """(times, "measured" | "gaussian", {source: proxy error}): the measured grid (asymptotic: its density is
    measured on MEASURE_STEPS steps) against the Gaussian-proxy grid at this step count, each scored by the
    smallest summed proxy endpoint error of the order-q samplers in t (eps or x0 form, corrector or not);
    ties go to the measured grid. Measured on VP, CLD, PSLD rings and BDM 3x8x8 (auto_default.md): the
    proxies prefer the Gaussian-proxy grid where it is better on the data (VP NFE 5, BDM NFE 20)."""
    cache = deriv.__dict__.setdefault("_autogrid_choice", {})
    key = (n_steps, order, MEASURE_STEPS, MEASURE_SUBSTEPS, QUADRATIC_SHARE, MEASURED_SHARE)
    if key not in cache:
        proxies = Proxies(deriv)
        grids = {"measured": measured_grid(deriv, n_steps, order), "gaussian": gaussian_grid(deriv, n_steps, order)}
        score = {}
        for src, times in grids.items():
            st = _Steps(deriv, times, proxies.coords)
            score[src] = min(proxies.error(st, order, form, "t", corr) for form in FORMS for corr in (False, True))
        src = "measured" if score["measured"] <= score["gaussian"] else "gaussian"
        cache[key] = (grids[src], src, score)
    return cache[key]


def _cumulative(tt, dens):
    cum = [gmpy2.mpfr(0)]
    for m in range(len(tt) - 1):
        cum.append(cum[-1] + (dens[m] + dens[m + 1]) / 2 * (tt[m + 1] - tt[m]))
    return cum


# ---------------------------------------------------------------------------------------------
# The recommended configuration (``recommend``): order, form, variable and corrector, chosen by
# simulating each candidate sampler on two-mode proxies.
#
# Why two modes. On Gaussian data every sampler is linear and its error can be computed exactly,
# but Gaussian proxies rank the forms wrongly: they favour the data-prediction form on VP by 2-4x
# where the rings (and a two-point mixture, measured with the runtime's samplers) favour the eps
# form by 1.5x; what decides it is how x0hat jumps between modes, which one mode does not have.
# Proxy: in each of up to MAX_COORDS basis coordinates, data x = +-m + c n (equal weights,
# n ~ N(0, 1)), modes of width c = 0.1 at three separations 2m = 1, 2, 4 (data in [-1, 1]-like
# units), scaled by the spectral prior's sqrt(lam_1 / (lam_1 + lam_p)). Its score under
# any linear SDE is exact from the derivation: with d = D_t e_0 and S = Sigma_t + c^2 d d^T,
# E[x | u] = m tanh(m d^T S^-1 u) and eps_R = R^T S^-1 (u - d E[x | u]).
#
# Simulation: each candidate runs as the runtime's samplers do (gddim, gddim_pc, gddim_x0,
# gddim_x0_pc: the same history, the corrector's evaluation at the predicted state, the same
# final denoising) from u_T = R_T z for N_NOISE fixed prior draws, with weights computed here
# from their integrals, int_s^t kernel(r) l_j(tau(r)) dr, by Gauss-Legendre in log r per step
# (float64; a measuring device, not a table: within 1e-9 of derive's tables, tests). Reference:
# the data-prediction sampler of order 4 on REF_STEPS smooth steps (1e-5 of dopri5, tests).
# Score: the mean endpoint error |x_N - x_ref| summed over the proxies. This is the global error at the real step sizes: large
# high-order steps and an unstable corrector (the eps-form PEC on CLD) show as they are, which the
# h^(q+1) model above cannot (it preferred order 1-2 at NFE 5-10 on VP).
# ---------------------------------------------------------------------------------------------

GL_NODES = 16                     # Gauss-Legendre nodes per step (in log r)
GL_NODES_REF = 4                  # per reference step
REF_STEPS = 480                   # reference steps (candidate-grid spacing)
N_NOISE = 64                      # prior draws per proxy (numpy PCG64, seed 0)
BIMODAL = (("0.5", "0.1"), ("1", "0.1"), ("2", "0.1"))  # (m, c) of the two-mode proxies: x = +-m + c n
FORMS = ("eps", "x0")
VARIABLES = ("t", "rho", "logsnr")
ORDERS = (1, 2, 3, 4)
MEASURE_MODES = BIMODAL          # the proxies measured_density measures on
SCORE = "w1"                     # recommend ranks by "w1" (distribution error) or "endpoint" (pathwise error)
MODEL_ERROR = 1e-3               # rms error of every model output (eps_R units) whose effect recommend adds to the score:
                                 # chosen on the three learned rings networks (1e-4..1e-2 tried), held out on the four
                                 # digits networks (auto_default.md, "Model error in the score")
MODEL_ERROR_MAX = 1.0            # an eps error of rms 1 is as large as eps itself: the model knows nothing
PROBE = 1e-6                     # the error size amplification measures the first-order effect with
SAMPLER = {("eps", False): "gddim", ("eps", True): "gddim_pc", ("x0", False): "gddim_x0",
           ("x0", True): "gddim_x0_pc"}


def _f64(A):
    return _hp.to_float64(A, "proxy estimate")


def _mv(M, u):
    """Per-proxy matrix [B, k, k] times the batch of states [B, n, k]."""
    return np.einsum("bij,bnj->bni", M, u)


class _Steps:
    """Float64 process quantities of one grid (decreasing ``times``) for the coordinates
    ``coords``: Sigma, R, D at the grid times, the step transitions, and the weights of any
    (order, form, variable, corrector) from their integrals by Gauss-Legendre in log r."""

    def __init__(self, deriv, times, coords, n_gl=GL_NODES):
        self.deriv, self.coords = deriv, coords
        self.tt = _hp.array(times)
        tt = self.tt
        self.N, self.k = len(tt) - 1, deriv.k
        self.Sig, self.R = _f64(deriv.sigma(tt, coords)), _f64(deriv.R(tt, coords))       # [N+1, C, k, k]
        self.D = _f64(deriv.data_to_state(tt)[:, coords])
        self.x0_psi = self.R[1:] @ np.linalg.inv(self.R[:-1])
        self._psi = None
        xg, wg = np.polynomial.legendre.leggauss(n_gl)
        self.nodes, self.qw = [], []
        for i in range(self.N):
            ls, lt = gmpy2.log(tt[i]), gmpy2.log(tt[i + 1])
            rn = np.array([gmpy2.exp(lt + (ls - lt) * gmpy2.mpfr(float((x + 1) / 2))) for x in xg], dtype=object)
            self.nodes.append(rn)
            self.qw.append(-float(ls - lt) * (wg / 2) * _f64(rn))                            # int_s^t = -int_t^s
        self._kern, self._tau, self._w = {}, {}, {}

    @property
    def psi(self):
        if self._psi is None:
            self._psi = _f64(self.deriv.psi(self.tt[1:], self.tt[:-1], self.coords))
        return self._psi

    def kernel(self, form):
        """[N] arrays [n, C, k, k]: 1/2 Psi(t,r) G G^T Sigma^-1 R (eps) or -R_t R_r^-1 1/2 G G^T Sigma^-1 D (x0)."""
        if form not in self._kern:
            d, c, out = self.deriv, self.coords, []
            for i, rn in enumerate(self.nodes):
                G = d.G(rn, c)
                half = (G @ _hp.T(G)) @ _hp.inv(d.sigma(rn, c)) / 2
                t = self.tt[i + 1:i + 2]
                if form == "eps":
                    out.append(_f64(d.psi(t, rn, c) @ half @ d.R(rn, c)))
                else:
                    out.append(_f64(-(d.R(t, c) @ _hp.inv(d.R(rn, c)) @ half @ d.data_to_state(rn)[:, c])))
            self._kern[form] = out
        return self._kern[form]

    def taus(self, variable):
        if variable not in self._tau:
            from ._variants import tau
            self._tau[variable] = (_f64(tau(self.deriv, self.tt, variable, self.coords)),
                                   [_f64(tau(self.deriv, rn, variable, self.coords)) for rn in self.nodes])
        return self._tau[variable]

    def weights(self, order, form, variable, corrector=False):
        """[N] arrays [q_i, C, k, k]: the predictor's weights (nodes t_i, t_{i-1}, ...) or the
        corrector's (nodes t_{i+1}, t_i, ...)."""
        key = (order, form, variable, corrector)
        if key not in self._w:
            tg, tn = self.taus(variable)
            kern, out = self.kernel(form), []
            for i in range(self.N):
                q = min(order + 1, i + 2) if corrector else min(order, i + 1)
                first = i + 1 if corrector else i
                dtau = tg[i + 1] - tg[i]
                ys = [(tg[first - j] - tg[i]) / dtau for j in range(q)]                        # [C]
                y = (tn[i] - tg[i]) / dtau                                                     # [n, C]
                W = []
                for j in range(q):
                    lj = np.ones_like(y)
                    for m in range(q):
                        if m != j:
                            lj = lj * (y - ys[m]) / (ys[j] - ys[m])
                    W.append(np.einsum("n,nc,ncij->cij", self.qw[i], lj, kern[i]))
                out.append(np.stack(W))
            self._w[key] = out
        return self._w[key]


class Proxies:
    """The two-mode proxies of one derivation: per coordinate of ``_coords`` and (m, c) of
    BIMODAL, N_NOISE prior draws; ``endpoint(steps, ...)`` runs a sampler on them."""

    def __init__(self, deriv, modes=BIMODAL):
        self.deriv, self.modes = deriv, modes
        self.coords = _coords(deriv)
        scale = np.array([math.sqrt(float(v)) for v in spectral_prior(deriv, self.coords)])
        C, k = len(self.coords), deriv.k
        self.cidx = np.tile(np.arange(C), len(modes))                                    # proxy -> coordinate
        self.m = np.repeat([float(m) for m, _ in modes], C) * scale[self.cidx]
        self.c = np.repeat([float(c) for _, c in modes], C) * scale[self.cidx]
        self.z = np.random.default_rng(0).standard_normal((N_NOISE, k))
        self._ref = None
        self._key = (type(self), tuple(self.m), tuple(self.c))        # what the caches on a grid are keyed by

    def _model(self, st, i):
        """(eps(u), x0hat(u)) maps at grid index i for the proxies' batch u [B, n, k]."""
        Sig, R, D = (X[i][self.cidx] for X in (st.Sig, st.R, st.D))
        d = D[:, :, 0]                                                                   # [B, k]
        S = Sig + (self.c ** 2)[:, None, None] * d[:, :, None] * d[:, None, :]
        Sinv = np.linalg.inv(S)
        E = np.swapaxes(R, 1, 2) @ Sinv
        Dinv = np.linalg.inv(D)
        m = self.m[:, None]

        def eps(u):
            a = np.einsum("bi,bij,bnj->bn", d, Sinv, u)
            mbar = m * np.tanh(m * a)
            return _mv(E, u - d[:, None, :] * mbar[..., None])

        def x0(u):
            return _mv(Dinv, u - _mv(R, eps(u)))
        return eps, x0

    def endpoint(self, st, order, form="eps", variable="t", corrector=False):
        """Data coordinate after the final denoising [B, n] of the sampler on the grid ``st`` (kept on ``st``:
        ``error`` and ``amplification`` both need it)."""
        cache = st.__dict__.setdefault("_proxy_endpoints", {})
        key = self._key + (order, form, variable, corrector)
        if key not in cache:
            cache[key] = self.simulate(st, order, form, variable, corrector)
            cache[key].setflags(write=False)
        return cache[key]

    def simulate(self, st, order, form="eps", variable="t", corrector=False, start=0, u=None, history=None,
                 record=False, model_error=0.0):
        """The sampler on the grid ``st`` from grid index ``start`` (state ``u`` [B, n, k], default the prior
        draws at T; ``history``: the model outputs at the earlier grid indices, {index: [B, n, k]}) to the
        final denoising: the data coordinate [B, n]; record: the states at every grid index instead;
        model_error: the exact model with independent errors in every output (``_models``)."""
        N, ci = st.N, self.cidx
        models = self._models(st, model_error)
        out_of = (lambda i, v: models[i][0](v)) if form == "eps" else (lambda i, v: models[i][1](v))
        step = (st.psi if form == "eps" else st.x0_psi)[:, ci]
        W = [w[:, ci] for w in st.weights(order, form, variable)]
        Wc = [w[:, ci] for w in st.weights(order, form, variable, True)] if corrector else None
        if u is None:
            u = np.einsum("bij,nj->bni", st.R[0][ci], self.z)
        outs = dict(history or {})
        outs[start] = out_of(start, u)
        states = [u]
        with np.errstate(all="ignore"):
            for i in range(start, N):
                pred = _mv(step[i], u) + sum(_mv(W[i][j], outs[i - j]) for j in range(len(W[i])))
                if not corrector:
                    u = pred
                    if i + 1 < N or record:
                        outs[i + 1] = out_of(i + 1, u)
                    states.append(u)
                    continue
                outs[i + 1] = out_of(i + 1, pred)
                if form == "x0" and i == N - 1:
                    u = pred                                  # gddim_x0_pc: the last step is not corrected
                else:
                    u = _mv(step[i], u) + sum(_mv(Wc[i][j], outs[i + 1 - j]) for j in range(len(Wc[i])))
                states.append(u)
            if record:
                return states
            if corrector and form == "eps":                   # gddim_pc denoises with the output at the prediction
                x = _mv(np.linalg.inv(st.D[N][ci]), u - _mv(st.R[N][ci], outs[N]))
            else:
                x = models[N][1](u)
        return x[..., 0]

    def _models(self, st, model_error=0.0):
        """Per grid index the (eps, x0) maps; model_error > 0: every eps output off by model_error * xi_i
        (xi_i standard normal [B, n, k], numpy PCG64 seeded 1000 + i, independent between calls), and the x0
        output by the same error mapped through x0 = D^-1 (u - R eps)."""
        cache = st.__dict__.setdefault("_proxy_models", {})
        key = self._key + (model_error,)
        if key not in cache:
            if not model_error:
                cache[key] = [self._model(st, i) for i in range(st.N + 1)]
            else:
                cache[key] = [self._perturbed(st, i, eps, x0, model_error)
                              for i, (eps, x0) in enumerate(self._models(st))]
        return cache[key]

    def _perturbed(self, st, i, eps, x0, model_error):
        xi = model_error * np.random.default_rng(1000 + i).standard_normal((len(self.cidx), len(self.z), st.k))
        dx = _mv(np.linalg.inv(st.D[i][self.cidx]) @ st.R[i][self.cidx], xi)
        return (lambda u: eps(u) + xi), (lambda u: x0(u) - dx)

    def states_at(self, times):
        """The reference flow's states [B, n, k] at the decreasing ``times`` (order-4 data prediction,
        MEASURE_SUBSTEPS steps geometric in t inside each interval, REF_STEPS' accuracy or better)."""
        fine = [times[0]]
        for a, b in zip(times[:-1], times[1:]):
            r = (b / a) ** (1 / MEASURE_SUBSTEPS)
            fine += [a * r ** j for j in range(1, MEASURE_SUBSTEPS)] + [b]
        st = _Steps(self.deriv, fine, self.coords, GL_NODES_REF)
        return self.simulate(st, 4, "x0", "t", record=True)[::MEASURE_SUBSTEPS]

    def reference(self):
        """The reference endpoint [B, n]: order-4 data prediction on REF_STEPS smooth steps."""
        cache = self.deriv.__dict__.setdefault("_autogrid_reference", {})
        key = (self.modes, N_NOISE, REF_STEPS)
        if key in cache:
            self._ref = cache[key]
        if self._ref is None:
            spec = self.deriv.spec
            tt = candidate_grid(spec.t_min, spec.T, REF_STEPS)
            times = [float(v) for v in tt[::-1]]
            times[0], times[-1] = float(_hp.mpf(spec.T)), float(_hp.mpf(spec.t_min))
            st = _Steps(self.deriv, times, self.coords, GL_NODES_REF)
            self._ref = cache[key] = self.endpoint(st, 4, "x0", "t")
        return self._ref

    def errors(self, st, order, form="eps", variable="t", corrector=False):
        """Mean endpoint error over the draws per (m, c) of the modes, summed over the coordinates
        ([len(modes)] array; inf where not finite); SCORE "w1": the 1-D Wasserstein distance between the
        draws' endpoints and the reference's (sorted), which is what a distribution metric sees."""
        x, ref = self.endpoint(st, order, form, variable, corrector), self.reference()
        if SCORE == "w1":                     # the distribution's error: W1 of the sorted draws, per proxy
            x, ref = np.sort(np.where(np.isfinite(x), x, np.inf), axis=1), np.sort(ref, axis=1)
        e = np.mean(np.abs(x - ref), axis=1)
        e = e.reshape(len(self.modes), -1).sum(axis=1)
        return np.where(np.isfinite(e), e, np.inf)

    def error(self, st, order, form="eps", variable="t", corrector=False):
        """The summed error over all proxies (inf if not finite)."""
        return float(np.sum(self.errors(st, order, form, variable, corrector)))

    def amplification(self, st, order, form="eps", variable="t", corrector=False, model_error=MODEL_ERROR):
        """How far a model error of rms ``model_error`` in every output (independent between calls) moves the
        endpoints, to first order: model_error * mean |x(probe) - x(exact)| / PROBE over the draws, summed over
        the proxies (inf if not finite), x(probe) the run with errors of rms PROBE. First order on purpose: at
        larger errors single draws near a proxy's decision boundary change mode, and those discrete jumps
        (2m / N_NOISE each) would decide the ranking. The exact score has no error, so ``error`` cannot see
        this, and candidates of similar exact-score error differ in it by factors up to 65 (per unit error, VP NFE 10:
        1.5 for auto:4 x0+pc/rho to 97 for auto:1 eps/t; CLD NFE 10: 4 to 245; auto_default.md)."""
        with np.errstate(all="ignore"):
            d = np.abs(self.simulate(st, order, form, variable, corrector, model_error=PROBE)
                       - self.endpoint(st, order, form, variable, corrector))
            e = float(np.sum(np.mean(d, axis=-1))) * model_error / PROBE
        return e if math.isfinite(e) else math.inf


def measured_density(deriv, order):
    """(times [M+1] decreasing, w [M]): the step density measured on the two-mode proxies, per interval of
    the Gaussian-proxy auto grid with MEASURE_STEPS steps. Per step i, its share of the global error:
    c_i = |X_i - X_{i+1}| (mean over the draws, summed over the proxies), X_i the endpoint of the order-q
    data-prediction predictor-corrector (variable t) started at t_i from the exact state with the exact
    history (X_N: the exact state's denoising; sum_i (X_i - X_{i+1}) is the sampler's global error).
    c_i ~ g h_i^(q+1) gives the local error density g_i = c_i / h_i^(q+1) and the step density
    w_i = g_i^(1/(q+1)) = c_i^(1/(q+1)) / h_i (rounded to 6 digits: the float64 simulation decides the
    grid to that precision, the grid itself is MPFR)."""
    cache = deriv.__dict__.setdefault("_autogrid_measured", {})
    key = (order, MEASURE_MODES, N_NOISE, MEASURE_STEPS, MEASURE_SUBSTEPS)
    if key in cache:
        return cache[key]
    tt, dens = _density_cached(deriv, order)
    base = grid_from_density(tt, dens, order, MEASURE_STEPS)
    proxies = Proxies(deriv, MEASURE_MODES)
    st = _Steps(deriv, base, proxies.coords)
    exact = proxies.states_at(base)
    x0_of = [m[1] for m in proxies._models(st)]
    finals, hist = [], {}
    for i in range(st.N):
        finals.append(proxies.simulate(st, order, "x0", "t", True, start=i, u=exact[i], history=hist))
        hist[i] = x0_of[i](exact[i])
    finals.append(x0_of[st.N](exact[st.N])[..., 0])
    w = []
    for i in range(st.N):
        c = float(np.sum(np.mean(np.abs(finals[i] - finals[i + 1]), axis=1)))
        h = base[i] - base[i + 1]
        w.append(gmpy2.mpfr(float(f"{c ** (1 / (order + 1)) / h:.6g}")) if math.isfinite(c) else gmpy2.mpfr(0))
    cache[key] = (base, w)
    return cache[key]


def measured_grid(deriv, n_steps, order):
    """Float64 times [N+1] decreasing from T to t_min equidistributing ``measured_density`` (piecewise
    constant, floored at DENSITY_FLOOR of its mean; T and t_min the spec's values)."""
    base, w = measured_density(deriv, order)
    mean = sum(w, gmpy2.mpfr(0)) / len(w)
    if not mean > 0:
        raise SpecError("--grid", "grid", "auto grid: zero measured error on the proxies")
    w = [max(v, mean * DENSITY_FLOOR) for v in w]
    if MEASURED_SHARE < 1:                   # the rest of the steps as the Gaussian-proxy grid places them
        edges_f = [gmpy2.mpfr(v) for v in base]
        total = sum((w[i] * (edges_f[i] - edges_f[i + 1]) for i in range(len(w))), gmpy2.mpfr(0))
        w = [w[i] / total * MEASURED_SHARE + (1 - MEASURED_SHARE) / len(w) / (edges_f[i] - edges_f[i + 1])
             for i in range(len(w))]
    edges = [_hp.mpf(base[0])] + [gmpy2.mpfr(v) for v in base[1:-1]] + [_hp.mpf(deriv.spec.t_min)]
    edges[0] = _hp.mpf(deriv.spec.T)
    cum = [gmpy2.mpfr(0)]                                 # from T downwards
    for i in range(len(w)):
        cum.append(cum[-1] + w[i] * (edges[i] - edges[i + 1]))
    total = cum[-1]
    times = [float(edges[0])]
    m = 0
    for j in range(1, n_steps):
        target = total * j / n_steps
        while cum[m + 1] < target:
            m += 1
        times.append(float(edges[m] - (target - cum[m]) / w[m]))
    times.append(float(edges[-1]))
    return times


def _density_cached(deriv, order):
    """error_density for ``order``, kept on the derivation (the grid for every NFE reuses it)."""
    cache = deriv.__dict__.setdefault("_autogrid_density", {})
    if order not in cache:
        cache[order] = error_density(deriv, order)
    return cache[order]


def candidates(orders=ORDERS, forms=FORMS, variables=VARIABLES, correctors=(False, True)):
    """The configurations ``recommend`` compares, in its tie-breaking order (simplest first)."""
    return [(q, f, v, c) for q in orders for f in forms for v in variables for c in correctors]


def serving_table(order, grid, variable):
    """Keyword arguments of ``Derived.table`` for a table that serves every sampler of SAMPLER (the x0 tensors
    and the corrector weights beside the eps ones): what recommend and validation.calibrate hand out."""
    return {"order": order, "grid": grid, "variable": variable, "form": "x0", "corrector": True}


def check_model_error(value):
    """The model error a user may set (--model-error): a real number in [0, MODEL_ERROR_MAX]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= MODEL_ERROR_MAX:
        raise SpecError("--model-error", "model_error", f"needs a number in [0, {MODEL_ERROR_MAX:g}] (rms of the eps "
                        f"error per call), got {value!r}")
    return float(value)


def candidate_scores(deriv, nfe, configs=None, model_error=MODEL_ERROR, prune=False, proxies=None, grid=None):
    """The two terms of ``recommend``'s score per candidate: ({config: exact-score proxy error},
    {config: ``amplification`` at ``model_error``}), each candidate on its own auto:<q> grid for ``nfe``
    model calls. A candidate whose variable is undefined for the process (singular Sigma or D on the grid)
    is left out. prune: skip the amplification of candidates that cannot win (their exact-score error
    alone exceeds a total already reached; the amplification is >= 0), which leaves the pick unchanged.
    proxies (default ``Proxies(deriv)``) and grid ((deriv, n_steps, q) -> times, default ``make_auto_grid``):
    for validation.model_error's measured alternatives. model_error: see ``check_model_error``."""
    if nfe < 2:
        raise SpecError("--order", "order", f"auto needs NFE >= 2 (one step + the final denoising), got {nfe}")
    check_model_error(model_error)
    configs = candidates() if configs is None else configs
    proxies = Proxies(deriv) if proxies is None else proxies
    grid = make_auto_grid if grid is None else grid
    steps, exact, amp = {}, {}, {}
    for cfg in configs:
        q = cfg[0]
        if q not in steps:                    # the auto:<q> grid the table will be derived on
            steps[q] = _Steps(deriv, grid(deriv, nfe - 1, q), proxies.coords)
        try:
            exact[cfg] = proxies.error(steps[q], *cfg)
        except _hp.EvaluationError:
            continue
    reached = math.inf
    for cfg in sorted(exact, key=lambda c: (exact[c], configs.index(c))):
        if prune and exact[cfg] > reached:
            break
        amp[cfg] = (proxies.amplification(steps[cfg[0]], *cfg, model_error=model_error) if model_error
                    else 0.0)                 # no charge: not even a diverging probe run counts
        reached = min(reached, exact[cfg] + amp[cfg])
    return exact, amp


def recommend(deriv, nfe, configs=None, scores=False, model_error=None):
    """The recommended configuration for ``nfe`` model calls (NFE - 1 steps + final denoising):
    {"grid": "auto:<q>", "order": q, "form", "variable", "corrector", "sampler", "proxy_error", "table": the
    keyword arguments of ``Derived.table`` that build a table serving it (as calibrate's pick has: the x0
    tensors and corrector weights, which serve every sampler; ``--order auto`` writes only what its form and
    corrector need)}.

    Each candidate (order, form, variable, corrector) runs on its own auto:<q> grid over the
    two-mode proxies (``Proxies``); the smallest summed score wins: the exact-score error (SCORE "w1": the
    W1 distance of the draws' endpoints to the reference's) plus ``amplification``, what a model error of
    rms MODEL_ERROR in every output moves the endpoints (ties: the earlier candidate). Without that charge
    the proxies, whose score is exact, preferred candidates that multiply model error most, and the default
    tables broke with learned networks (validation/results/auto_default.md, "Model error in the score"). A candidate whose variable is undefined for the process (singular Sigma or D on
    the grid) is skipped. Deterministic: the grid is MPFR; the simulation is float64 numpy from
    a fixed seed. scores: also return {config: proxy error}. model_error: the charge's rms error (default
    MODEL_ERROR; 0 ranks by the exact-score error alone, for a model whose score is exact)."""
    configs = candidates() if configs is None else configs
    model_error = MODEL_ERROR if model_error is None else model_error
    exact, amp = candidate_scores(deriv, nfe, configs, model_error, prune=not scores)
    table = {cfg: exact[cfg] + amp[cfg] for cfg in configs if cfg in amp}
    best = min(table, key=lambda key: (table[key], configs.index(key)))
    q, form, variable, corr = best
    out = {"grid": f"auto:{q}", "order": q, "form": form, "variable": variable, "corrector": corr,
           "sampler": SAMPLER[(form, corr)], "proxy_error": table[best],
           "table": serving_table(q, f"auto:{q}", variable)}
    return (out, table) if scores else out
