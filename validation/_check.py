"""Check a table against independent references; the report a user reads.

Levels:
  fast  identities of the table itself + float64 scipy cross-check (Psi, Sigma, R at every grid
        time, the weights of a few steps); seconds; run by ``python -m derive`` before writing.
  full  everything against the mpmath 40-digit reference (all steps, all weights, P_st),
        plus derive's own high-precision closed forms against the same reference at 1e-30.

Error measure per (step, coordinate) matrix: max |table - ref| / max |ref| (normwise
relative) and the same difference in float64 ulps of max |ref|.
With a per-coordinate basis, a spread of coordinates is checked (both ends of the spectrum).
"""

import dataclasses
import time

import mpmath
import numpy as np
import sympy as sp

from ._reference import DPS, MpReference, ScipyReference

TOL_FULL = 1e-13       # issue target: tables within 1e-13 of the 40-digit reference
TOL_FAST = 1e-7        # float64 solve_ivp at rtol 1e-13 through CLD's stiff start is good to ~1e-9
TOL_IDENTITY = 1e-12   # identities between float64 tables (a few roundings of O(1) sums)
TOL_CLOSED = 1e-30     # derive's closed forms at high precision vs the 40-digit reference


@dataclasses.dataclass
class Row:
    quantity: str
    worst_step: int
    rel: float
    ulps: float
    method: str
    tol: float

    @property
    def passed(self):
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)


class Report:
    def __init__(self, name, level):
        self.name, self.level, self.rows, self.seconds = name, level, [], 0.0
        self.coords = []

    def add(self, quantity, errors, method, tol):
        """errors: list of (step, rel, ulps); keeps the worst."""
        if not errors:
            return
        step, rel, ulps = max(errors, key=lambda e: (not np.isfinite(e[1]), e[1]))
        for row in self.rows:
            if row.quantity == quantity and row.method == method:
                if rel > row.rel:
                    row.worst_step, row.rel, row.ulps = step, rel, ulps
                return
        self.rows.append(Row(quantity, step, rel, ulps, method, tol))

    @property
    def passed(self):
        return all(r.passed for r in self.rows)

    def worst(self):
        rows = [r for r in self.rows if "identity" not in r.method]
        return max(rows, key=lambda r: r.rel) if rows else None

    def text(self):
        head = f"{self.name}: verification level {self.level}, coordinates {self.coords}, {self.seconds:.1f} s"
        lines = [head, f"{'quantity':<26} {'worst step':>10} {'max rel err':>12} {'ulps':>10}  {'reference':<34} result"]
        for r in self.rows:
            lines.append(f"{r.quantity:<26} {r.worst_step:>10} {r.rel:>12.2e} {r.ulps:>10.1f}  {r.method:<34} "
                         f"{'pass' if r.passed else 'FAIL'} (tol {r.tol:.0e})")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)

    def summary(self):
        """For file metadata: bounds as powers of ten, stable across machines and BLAS builds."""
        w = self.worst()
        return {"level": self.level, "passed": self.passed, "coordinates": self.coords,
                "worst": "none" if w is None else f"{w.quantity} {decade(w.rel)} ({w.method})",
                "max_rel": {r.quantity + " / " + r.method: decade(r.rel) for r in self.rows}}


def decade(x):
    """'<= 1e-14' style bound (the next power of ten at or above x)."""
    if not np.isfinite(x):
        return str(x)
    return "0" if x == 0 else f"<= 1e{int(np.ceil(np.log10(x) - 1e-9))}"


def _err(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = np.max(np.abs(b))
    diff = np.max(np.abs(a - b))
    if scale == 0:
        return (0.0 if diff == 0 else float("inf")), (0.0 if diff == 0 else float("inf"))
    return float(diff / scale), float(diff / np.spacing(scale))


def _np(M):
    return np.array(M.tolist(), dtype=float) if isinstance(M, mpmath.matrix) else np.asarray(M, dtype=float)


def _err_mp(a, ref):
    """Relative error of float64 ``a`` against a high-precision mpmath matrix ``ref``."""
    ref_f = np.array([[float(ref[i, j]) for j in range(ref.cols)] for i in range(ref.rows)])
    scale = max(abs(ref[i, j]) for i in range(ref.rows) for j in range(ref.cols))
    diff = max(abs(mpmath.mpf(float(a[i, j])) - ref[i, j]) for i in range(ref.rows) for j in range(ref.cols))
    if scale == 0:
        return (0.0, 0.0) if diff == 0 else (float("inf"), float("inf"))
    return float(diff / scale), float(diff / np.spacing(float(np.max(np.abs(ref_f)))))


def pick_coords(P, n):
    if P <= n:
        return list(range(P))
    return sorted(set(int(round(x)) for x in np.linspace(0, P - 1, n)))


def identities(report, tensors, meta):
    """Checks that need nothing but the table."""
    psi, R, S, L, W = (tensors[n] for n in ("psi", "R", "sigma", "L", "eps_weights"))
    N, q = W.shape[0], W.shape[1]
    errs = []
    for i in range(N):
        lhs = W[i].sum(axis=0)
        rhs = R[i + 1] - psi[i] @ R[i]
        errs.append((i, *_err(lhs, rhs)))
    report.add("sum_j eps_weights", errs, "identity R_t - Psi R_s", TOL_IDENTITY)
    unused = [(i, float(np.max(np.abs(W[i, min(q, i + 1):]))) if min(q, i + 1) < q else 0.0, 0.0) for i in range(N)]
    report.add("unused lags == 0", unused, "identity (exact zeros)", 0.0)
    report.add("R R^T vs sigma", [(i, *_err(R[i] @ np.swapaxes(R[i], -1, -2), S[i])) for i in range(len(R))],
               "identity R R^T = Sigma", TOL_IDENTITY)
    report.add("L L^T vs sigma", [(i, *_err(L[i] @ np.swapaxes(L[i], -1, -2), S[i])) for i in range(len(L))],
               "identity L L^T = Sigma", TOL_IDENTITY)
    upper = [(i, float(np.max(np.abs(np.triu(L[i], 1)))), 0.0) for i in range(len(L))]
    report.add("L lower triangular", upper, "identity (exact zeros)", 0.0)
    if "corrector_weights" in tensors:
        C = tensors["corrector_weights"]
        errs = [(i, *_err(C[i].sum(axis=0), R[i + 1] - psi[i] @ R[i])) for i in range(N)]
        report.add("sum_j corrector_weights", errs, "identity R_t - Psi R_s", TOL_IDENTITY)
    if "noise_chol" in tensors:
        upper = [(i, float(np.max(np.abs(np.triu(tensors["noise_chol"][i], 1)))), 0.0) for i in range(N)]
        report.add("noise_chol lower tri.", upper, "identity (exact zeros)", 0.0)


def _coord_value(spec, p):
    return spec.basis.values()[p]


def check_table(spec, tensors, meta, level="fast", n_coords=None):
    """Verify a table (float64 tensors + meta) for ``spec``; returns a Report."""
    start = time.perf_counter()
    report = Report(f"{meta['spec']['name']} nfe{meta['nfe']} q{meta['order']}", level)
    if meta["spec"]["sha256"] != spec.sha256:
        report.add("spec hash", [(0, float("inf"), float("inf"))], "table built from another spec", 0.0)
        return report
    identities(report, tensors, meta)
    t = tensors["t"]
    N = len(t) - 1
    q = meta["order"]
    P = tensors["psi"].shape[1]
    coords = pick_coords(P, n_coords or (2 if level == "fast" else 6))
    report.coords = coords
    for p in coords:
        lam = _coord_value(spec, p)
        if level == "fast":
            _fast(report, spec, tensors, meta, p, lam)
        else:
            _full(report, spec, tensors, meta, p, lam)
    report.seconds = time.perf_counter() - start
    return report


def _fast(report, spec, tensors, meta, p, lam):
    t = tensors["t"]
    N = len(t) - 1
    q = meta["order"]
    ref = ScipyReference(spec, t, lam)
    how = "scipy solve_ivp float64"
    report.add("psi", [(i, *_err(tensors["psi"][i, p], ref.psi(t[i + 1], t[i]))) for i in range(N)], how, TOL_FAST)
    report.add("sigma", [(i, *_err(tensors["sigma"][i, p], ref.sigma(t[i]))) for i in range(N + 1)], how, TOL_FAST)
    report.add("R", [(i, *_err(tensors["R"][i, p], ref.R(t[i]))) for i in range(N + 1)], how, TOL_FAST)
    errs = []
    for i in sorted({0, min(1, N - 1), N // 2, N - 1}):
        qi = min(q, i + 1)
        C = ref.weights(t[i], t[i + 1], [t[i - j] for j in range(qi)])
        errs.append((i, *_err(tensors["eps_weights"][i, :qi, p], C)))
    report.add("eps_weights", errs, "scipy quad_vec float64", TOL_FAST)


def _full(report, spec, tensors, meta, p, lam):
    t = tensors["t"]
    N = len(t) - 1
    q = meta["order"]
    how = f"mpmath odefun/GL, {DPS} digits"
    with mpmath.workdps(DPS):
        ref = MpReference(spec, lam)
        tm = [mpmath.mpf(float(v)) for v in t]
        Rs = [ref.R(x) for x in tm]
        Ss = [ref.sigma(x) for x in tm]
        report.add("psi", [(i, *_err_mp(tensors["psi"][i, p], ref.psi(tm[i + 1], tm[i]))) for i in range(N)], how, TOL_FULL)
        report.add("sigma", [(i, *_err_mp(tensors["sigma"][i, p], Ss[i])) for i in range(N + 1)], how, TOL_FULL)
        report.add("R", [(i, *_err_mp(tensors["R"][i, p], Rs[i])) for i in range(N + 1)], how, TOL_FULL)
        report.add("L", [(i, *_err_mp(tensors["L"][i, p], _chol(Ss[i]))) for i in range(N + 1)], how, TOL_FULL)
        errs, errs_c = [], []
        for i in range(N):
            qi = min(q, i + 1)
            C = ref.weights(tm[i], tm[i + 1], [tm[i - j] for j in range(qi)])
            errs += [(i, *_err_mp(tensors["eps_weights"][i, j, p], C[j])) for j in range(qi)]
            if "corrector_weights" in tensors:
                qc = min(q + 1, i + 2)
                C = ref.weights(tm[i], tm[i + 1], [tm[i + 1 - j] for j in range(qc)])
                errs_c += [(i, *_err_mp(tensors["corrector_weights"][i, j, p], C[j])) for j in range(qc)]
        report.add("eps_weights", errs, how, TOL_FULL)
        report.add("corrector_weights", errs_c, how, TOL_FULL)
        if "eps_weights_sde" in tensors:
            e1, e2 = [], []
            for i in range(N):
                w, Pst = ref.stochastic(tm[i], tm[i + 1], sp.Rational(meta["lam"]))
                e1.append((i, *_err_mp(tensors["eps_weights_sde"][i, p], w)))
                Lc = tensors["noise_chol"][i, p]
                e2.append((i, *_err_mp(Lc @ Lc.T, Pst)))
            report.add("eps_weights_sde", e1, how + " (P ODE)", TOL_FULL)
            report.add("noise_chol (as L L^T)", e2, how + " (P ODE)", TOL_FULL)
        D = ref.data_to_state(tm[-1])
        Dinv = mpmath.inverse(D)
        report.add("x0_weights", [(0, *_err_mp(tensors["x0_weights"][0, p], Dinv)),
                                  (1, *_err_mp(tensors["x0_weights"][1, p], -Dinv * Rs[-1]))], how, TOL_FULL)
        _closed_forms(report, spec, meta, tm, p, ref, Ss)


def _chol(S):
    try:
        return mpmath.cholesky(S)
    except (ValueError, ZeroDivisionError):
        k = S.rows
        return mpmath.matrix([[mpmath.sqrt(max(S[0, 0], 0))]]) if k == 1 else S * 0


def _closed_forms(report, spec, meta, tm, p, ref, Ss):
    """Where derive claims a closed form, compare its high-precision values (not the float64 table)."""
    from derive._derivation import Derivation, CLOSED
    from derive import _hp
    if meta["kinds"]["psi"] != CLOSED and meta["kinds"]["sigma"] != CLOSED:
        return
    deriv = Derivation(spec)
    u = deriv.coord_index[p]
    tt = _hp.array([float(x) for x in tm])
    checks = []
    if meta["kinds"]["sigma"] == CLOSED:
        vals = deriv.sigma(tt)
        checks.append(("sigma (closed form, hp)", [(i, _rel_hp(vals[i, u], Ss[i])) for i in range(len(tm))]))
    if meta["kinds"]["psi"] == CLOSED:
        vals = deriv.psi(tt[1:], tt[:-1])
        checks.append(("psi (closed form, hp)", [(i, _rel_hp(vals[i, u], ref.psi(tm[i + 1], tm[i]))) for i in range(len(tm) - 1)]))
    for name, errs in checks:
        report.add(name, [(i, e, 0.0) for i, e in errs], f"mpmath {DPS} digits vs derive MPFR", TOL_CLOSED)


def _rel_hp(a, ref):
    k = ref.rows
    scale = max(abs(ref[i, j]) for i in range(k) for j in range(k))
    diff = max(abs(mpmath.mpf(str(a[i, j])) - ref[i, j]) for i in range(k) for j in range(k))
    return float(diff / scale) if scale else float(diff)
