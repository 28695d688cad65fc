"""Independent check of the table variants (derive/_variants.py, derive/MATH_x0.md).

Tables with a multistep variable other than t (meta ``variable``: rho | logsnr) or the
data-prediction form (meta ``form``: x0) carry weights that ``_check.check_table`` does not
know. ``check_variant_table`` verifies them from F, G, Sigma_0 and R_0 alone, reusing nothing
of derive's algebra:

- everything the base check knows (Psi, Sigma, R, L, x0_weights, the sum of the eps weights)
  by ``check_table`` itself, on the table with its eps weights summed over the lags (that sum,
  R_t - Psi R_s, does not depend on the variable);
- ``full``: every step's weights against Gauss-Legendre quadrature (``_reference._gl_vector``,
  45 digits) of the integrands themselves, with Phi, Sigma and R from ``MpReference``
  (Taylor series and Bulirsch-Stoer, 45 digits) and tau(r) = det(Sigma_r)^(1/2k) / |det D_r|^(1/k) (-log of it for logsnr)
  from the same reference:
      eps  C_j = int_s^t 1/2 Phi_t Phi_r^-1 G G^T R_r^-T l_j(tau(r)) dr
      x0   X_j = -int_s^t R_t R_r^-1 1/2 G G^T Sigma_r^-1 D_r l_j(tau(r)) dr,  x0_psi = R_t R_s^-1;
- ``fast``: the same integrals in float64 (scipy quad_vec, ScipyReference) for four steps;
- ``x0_weights_flat`` (the step's weight spread flat in tau): X_j = (D_t - R_t R_s^-1 D_s) a_j with
  a_j = int_0^1 l_j(y) dy, l_j the Lagrange basis through the nodes (tau(t_{i-j}) - tau(s)) / (tau(t) - tau(s)),
  D and R from the reference and a_j by mpmath.quad (full) / numpy's polynomial integral (fast);
- identities of the table alone: sum_j X_j = D_t - x0_psi D_s, x0_psi R_s = R_t, exact zeros.

Hook (validation/_check.py, at the top of ``check_table``): tables with these meta keys are
handed to ``check_variant_table``, which calls ``check_table`` on the base part.
"""

import mpmath
import numpy as np

from ._check import TOL_FAST, TOL_FULL, TOL_IDENTITY, _coord_value, _err, _err_mp, check_table
from ._reference import DPS, MpReference, ScipyReference, _gl_vector, lagrange_weights_at

VARIANT_TENSORS = ("x0_psi", "x0_weights_ms", "x0_weights_flat", "x0_corrector_weights")


def is_variant(meta):
    return meta.get("variable", "t") != "t" or meta.get("form", "eps") != "eps"


# ----- tau and the integrands, mpmath ---------------------------------------------------------
def _det_mp(A):
    return mpmath.det(A)


def tau_mp(ref, r, variable):
    """tau(r) from the reference's Sigma and D (mpmath)."""
    if variable == "t":
        return r
    k = ref.k
    rho = _det_mp(ref.sigma(r)) ** (mpmath.mpf(1) / (2 * k)) / abs(_det_mp(ref.data_to_state(r))) ** (mpmath.mpf(1) / k)
    return rho if variable == "rho" else -mpmath.log(rho)


def integrand_mp(ref, form, t, r):
    """The eps or x0 integrand at r for a step ending at t (k x k mpmath matrix)."""
    G = ref.G(r)
    GG = G * G.T
    if form == "eps":
        return ref.phi(t) * mpmath.inverse(ref.phi(r)) * GG * mpmath.inverse(ref.R(r)).T / 2
    return -(ref.R(t) * mpmath.inverse(ref.R(r)) * GG * mpmath.inverse(ref.sigma(r)) * ref.data_to_state(r) / 2)


def weights_mp(ref, form, s, t, node_times, variable):
    """Weights of the outputs at ``node_times`` for the step s -> t (list of mpmath matrices)."""
    nodes = [tau_mp(ref, x, variable) for x in node_times]

    def f(r):
        W = integrand_mp(ref, form, t, r)
        return [W * l for l in lagrange_weights_at(tau_mp(ref, r, variable), nodes)]
    return _gl_vector(f, s, t, len(nodes), ref.k, cuts=ref.kinks)            # split at the kinks of F, G


# ----- the same in float64 (scipy) -------------------------------------------------------------
def tau_np(ref, r, variable):
    if variable == "t":
        return float(r)
    k = ref.k
    rho = np.linalg.det(ref.sigma(r)) ** (1 / (2 * k)) / abs(np.linalg.det(ref.data_to_state(r))) ** (1 / k)
    return rho if variable == "rho" else -np.log(rho)


def weights_np(ref, form, s, t, node_times, variable):
    from scipy.integrate import quad_vec
    nodes = [tau_np(ref, x, variable) for x in node_times]
    Phi_t, R_t = ref.phi(t), ref.R(t)

    def f(r):
        G = ref.G(r)
        GG = G @ G.T
        if form == "eps":
            W = Phi_t @ np.linalg.inv(ref.phi(r)) @ GG @ np.linalg.inv(ref.R(r)).T / 2
        else:
            W = -(R_t @ np.linalg.inv(ref.R(r)) @ GG @ np.linalg.inv(ref.sigma(r)) @ ref.data_to_state(r) / 2)
        return np.stack([W * l for l in lagrange_weights_at(tau_np(ref, r, variable), nodes)])
    lo, hi = sorted((float(s), float(t)))
    inner = [v for v in getattr(ref, "kinks", ()) if lo < v < hi]
    # ascending, with the kinks of F, G as points (quad_vec ignores points when a > b)
    val, _ = quad_vec(f, lo, hi, epsabs=0, epsrel=1e-12, points=inner or None)
    return val if float(s) <= float(t) else -val


def flat_weights_mp(ref, s, t, node_times, variable):
    """x0_weights_flat of the step s -> t: (D_t - R_t R_s^-1 D_s) int_0^1 l_j(y) dy (mpmath matrices)."""
    taus = [tau_mp(ref, x, variable) for x in node_times]
    t0, dt = tau_mp(ref, s, variable), tau_mp(ref, t, variable) - tau_mp(ref, s, variable)
    nodes = [(x - t0) / dt for x in taus]
    M0 = ref.data_to_state(t) - ref.R(t) * mpmath.inverse(ref.R(s)) * ref.data_to_state(s)
    return [M0 * mpmath.quad(lambda y, j=j: lagrange_weights_at(y, nodes)[j], [0, 1]) for j in range(len(nodes))]


def flat_weights_np(ref, s, t, node_times, variable):
    taus = [tau_np(ref, x, variable) for x in node_times]
    t0, dt = tau_np(ref, s, variable), tau_np(ref, t, variable) - tau_np(ref, s, variable)
    nodes = [(x - t0) / dt for x in taus]
    M0 = ref.data_to_state(t) - ref.R(t) @ np.linalg.inv(ref.R(s)) @ ref.data_to_state(s)
    out = []
    for j in range(len(nodes)):
        P = np.polynomial.Polynomial([1.0])
        for m in range(len(nodes)):
            if m != j:
                P = P * np.polynomial.Polynomial([-nodes[m], 1.0]) / (nodes[j] - nodes[m])
        out.append(M0 * (P.integ()(1.0) - P.integ()(0.0)))
    return np.stack(out)


# ----- the check -------------------------------------------------------------------------------
def _base(tensors, meta):
    """The part ``check_table`` knows: variant tensors dropped; with a variable other than t the
    eps weights summed over the lags (order 1), which the variable does not change."""
    base = {n: v for n, v in tensors.items() if n not in VARIANT_TENSORS}
    base_meta = {n: v for n, v in meta.items() if n not in ("variable", "form")}
    if meta.get("variable", "t") != "t":
        base["eps_weights"] = tensors["eps_weights"].sum(axis=1, keepdims=True)
        base.pop("corrector_weights", None)
        base_meta.update(order=1, corrector=False)
    return base, base_meta


def _identities(report, tensors, meta):
    N = len(tensors["t"]) - 1
    if "x0_weights_ms" in tensors:
        X, Xpsi, D, R = (tensors[n] for n in ("x0_weights_ms", "x0_psi", "data_to_state", "R"))
        q = X.shape[1]
        report.add("sum_j x0_weights_ms", [(i, *_err(X[i].sum(axis=0), D[i + 1] - Xpsi[i] @ D[i])) for i in range(N)],
                   "identity D_t - R_t R_s^-1 D_s", TOL_IDENTITY)
        report.add("x0_psi R_s vs R_t", [(i, *_err(Xpsi[i] @ R[i], R[i + 1])) for i in range(N)],
                   "identity R_t R_s^-1 R_s = R_t", TOL_IDENTITY)
        if "x0_weights_flat" in tensors:
            Xf = tensors["x0_weights_flat"]
            report.add("sum_j x0_weights_flat", [(i, *_err(Xf[i].sum(axis=0), D[i + 1] - Xpsi[i] @ D[i]))
                                                 for i in range(N)], "identity D_t - R_t R_s^-1 D_s", TOL_IDENTITY)
        if "x0_corrector_weights" in tensors:
            Xc = tensors["x0_corrector_weights"]
            report.add("sum_j x0_corrector_weights",
                       [(i, *_err(Xc[i].sum(axis=0), D[i + 1] - Xpsi[i] @ D[i])) for i in range(N)],
                       "identity D_t - R_t R_s^-1 D_s", TOL_IDENTITY)
        report.add("x0 unused lags == 0", [(i, float(np.max(np.abs(X[i, min(q, i + 1):]))) if min(q, i + 1) < q
                                            else 0.0, 0.0) for i in range(N)], "identity (exact zeros)", 0.0)
    if meta.get("variable", "t") != "t":
        W = tensors["eps_weights"]
        q = W.shape[1]
        report.add("eps(tau) unused lags == 0", [(i, float(np.max(np.abs(W[i, min(q, i + 1):]))) if min(q, i + 1) < q
                                                  else 0.0, 0.0) for i in range(N)], "identity (exact zeros)", 0.0)


def _steps_to_check(meta, N, level):
    return range(N) if level == "full" else sorted({0, min(1, N - 1), min(2, N - 1), N // 2, N - 1})


def check_variant_table(spec, tensors, meta, level="fast", n_coords=None):
    """Verify a variant table (meta ``variable`` and/or ``form``); returns validation's Report."""
    base, base_meta = _base(tensors, meta)
    report = check_table(spec, base, base_meta, level=level, n_coords=n_coords)
    report.name = f"{meta['spec']['name']} nfe{meta['nfe']} q{meta['order']} {meta.get('variable', 't')} {meta.get('form', 'eps')}"
    if meta["spec"]["sha256"] != spec.sha256:
        return report
    _identities(report, tensors, meta)
    variable, form = meta.get("variable", "t"), meta.get("form", "eps")
    t = tensors["t"]
    N, q = len(t) - 1, meta["order"]
    checks = ([("eps_weights", "eps", 0)] if variable != "t" else []) + \
             ([("corrector_weights", "eps", 1)] if variable != "t" and "corrector_weights" in tensors else []) + \
             ([("x0_weights_ms", "x0", 0)] if form == "x0" else []) + \
             ([("x0_corrector_weights", "x0", 1)] if "x0_corrector_weights" in tensors else [])
    steps = _steps_to_check(meta, N, level)
    for p in report.coords:
        coord_value = _coord_value(spec, p)          # the basis symbol's value (dct2d: frequency)
        if level == "full":
            with mpmath.workdps(DPS):
                ref = MpReference(spec, coord_value)
                tm = [mpmath.mpf(float(v)) for v in t]
                how = f"mpmath GL in {variable}, {DPS} digits"
                for name, f, shift in checks:
                    errs = []
                    for i in steps:
                        qi = min(q + shift, i + 1 + shift)
                        C = weights_mp(ref, f, tm[i], tm[i + 1], [tm[i + shift - j] for j in range(qi)], variable)
                        errs += [(i, *_err_mp(tensors[name][i, j, p], C[j])) for j in range(qi)]
                    report.add(name, errs, how, TOL_FULL)
                if "x0_weights_flat" in tensors:
                    errs = []
                    for i in steps:
                        qi = min(q, i + 1)
                        C = flat_weights_mp(ref, tm[i], tm[i + 1], [tm[i - j] for j in range(qi)], variable)
                        errs += [(i, *_err_mp(tensors["x0_weights_flat"][i, j, p], C[j])) for j in range(qi)]
                    report.add("x0_weights_flat", errs, f"mpmath Taylor/BS D, R and quad in {variable}, {DPS} digits",
                               TOL_FULL)
                if form == "x0":
                    Rs = [ref.R(x) for x in tm]
                    report.add("x0_psi", [(i, *_err_mp(tensors["x0_psi"][i, p], Rs[i + 1] * mpmath.inverse(Rs[i])))
                                          for i in range(N)], f"mpmath Taylor/BS/GL, {DPS} digits", TOL_FULL)
        else:
            ref = ScipyReference(spec, t, coord_value)
            how = f"scipy quad_vec in {variable} float64"
            for name, f, shift in checks:
                errs = []
                for i in steps:
                    qi = min(q + shift, i + 1 + shift)
                    C = weights_np(ref, f, t[i], t[i + 1], [t[i + shift - j] for j in range(qi)], variable)
                    errs.append((i, *_err(tensors[name][i, :qi, p], C)))
                report.add(name, errs, how, TOL_FAST)
            if "x0_weights_flat" in tensors:
                errs = []
                for i in steps:
                    qi = min(q, i + 1)
                    C = flat_weights_np(ref, t[i], t[i + 1], [t[i - j] for j in range(qi)], variable)
                    errs.append((i, *_err(tensors["x0_weights_flat"][i, :qi, p], C)))
                report.add("x0_weights_flat", errs, f"scipy D, R and polynomial integral in {variable} float64", TOL_FAST)
            if form == "x0":
                report.add("x0_psi", [(i, *_err(tensors["x0_psi"][i, p], ref.R(t[i + 1]) @ np.linalg.inv(ref.R(t[i]))))
                                      for i in range(N)], "scipy solve_ivp float64", TOL_FAST)
    return report
