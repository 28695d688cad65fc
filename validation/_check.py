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


def _err(a, b, scale=0.0):
    """Normwise relative error of ``a`` against ``b``, relative to max(|b|, ``scale``).

    ``scale`` is the size of the terms that ``b`` sums (a weight is a difference of R_t and
    Psi R_s): an exactly zero or cancelling reference is then judged against the numbers it is
    made of, not against itself."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = max(float(np.max(np.abs(b))), float(scale))
    diff = np.max(np.abs(a - b))
    if not np.isfinite(diff):
        return float("inf"), float("inf")
    if scale == 0:
        return (0.0 if diff == 0 else float("inf")), (0.0 if diff == 0 else float("inf"))
    return float(diff / scale), float(diff / np.spacing(scale))


def _err_coords(a, b, scale=None):
    """Worst over the leading coordinate axis of per-coordinate ``_err`` (scale: [P] or None)."""
    out = (0.0, 0.0)
    for p in range(a.shape[0]):
        e = _err(a[p], b[p], 0.0 if scale is None else scale[p])
        if not e[0] <= out[0]:
            out = e
    return out


def _amax(A):
    """max |A| over the trailing matrix axes: [P, k, k] -> [P]."""
    return np.max(np.abs(A), axis=(-2, -1))


def _np(M):
    return np.array(M.tolist(), dtype=float) if isinstance(M, mpmath.matrix) else np.asarray(M, dtype=float)


def _err_mp(a, ref, terms=0):
    """Relative error of float64 ``a`` against a high-precision mpmath matrix ``ref`` (relative to
    max(|ref|, ``terms``), the size of what ``ref`` sums; see ``_err``)."""
    ref_f = np.array([[float(ref[i, j]) for j in range(ref.cols)] for i in range(ref.rows)])
    scale = max([abs(ref[i, j]) for i in range(ref.rows) for j in range(ref.cols)] + [abs(terms)])
    ref_f = np.append(ref_f, float(abs(terms)))
    diff = max(abs(mpmath.mpf(float(a[i, j])) - ref[i, j]) for i in range(ref.rows) for j in range(ref.cols))
    if diff <= mpmath.mpf(2) ** -1075:
        return 0.0, 0.0             # below float64's finest step: D_T = exp(-1e3) at a blurred frequency is 0 there
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
    transpose = lambda A: np.swapaxes(A, -1, -2)
    # per coordinate, relative to the terms summed: R_t and the products inside Psi R_s, |Psi| |R_s|
    # (float64 rounds Psi R_s at that size: on a stiff drift Psi reaches 1e88 over one step and the
    # product cancels to R_t's size; a huge Psi at one frequency must not hide the others, an exactly
    # zero difference must not divide by itself)
    errs = []
    for i in range(N):
        PR = psi[i] @ R[i]
        terms = np.maximum(_amax(R[i + 1]), _amax(np.abs(psi[i]) @ np.abs(R[i])))
        errs.append((i, *_err_coords(W[i].sum(axis=0), R[i + 1] - PR, terms)))
    report.add("sum_j eps_weights", errs, "identity R_t - Psi R_s", TOL_IDENTITY)
    unused = [(i, float(np.max(np.abs(W[i, min(q, i + 1):]))) if min(q, i + 1) < q else 0.0, 0.0) for i in range(N)]
    report.add("unused lags == 0", unused, "identity (exact zeros)", 0.0)
    report.add("R R^T vs sigma", [(i, *_err_coords(R[i] @ transpose(R[i]), S[i], _amax(R[i]) ** 2)) for i in range(len(R))],
               "identity R R^T = Sigma", TOL_IDENTITY)
    report.add("L L^T vs sigma", [(i, *_err_coords(L[i] @ transpose(L[i]), S[i], _amax(L[i]) ** 2)) for i in range(len(L))],
               "identity L L^T = Sigma", TOL_IDENTITY)
    upper = [(i, float(np.max(np.abs(np.triu(L[i], 1)))), 0.0) for i in range(len(L))]
    report.add("L lower triangular", upper, "identity (exact zeros)", 0.0)
    if "corrector_weights" in tensors:
        C = tensors["corrector_weights"]
        errs = []
        for i in range(N):
            PR = psi[i] @ R[i]
            terms = np.maximum(_amax(R[i + 1]), _amax(np.abs(psi[i]) @ np.abs(R[i])))
            errs.append((i, *_err_coords(C[i].sum(axis=0), R[i + 1] - PR, terms)))
        report.add("sum_j corrector_weights", errs, "identity R_t - Psi R_s", TOL_IDENTITY)
    if "noise_chol" in tensors:
        upper = [(i, float(np.max(np.abs(np.triu(tensors["noise_chol"][i], 1)))), 0.0) for i in range(N)]
        report.add("noise_chol lower tri.", upper, "identity (exact zeros)", 0.0)


def _coord_value(spec, p):
    return spec.basis.values()[p]


BUDGET_S = {"fast": 60.0, "full": 110.0}    # per table; a 5-step full check stays under 120 s


class OutOfTime(Exception):
    pass


class Budget:
    """Wall-clock budget of one table check; ``where`` names the quantity, coordinate and step."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.deadline = time.perf_counter() + seconds
        self.where = "start"

    def at(self, quantity, p, step=None):
        self.where = f"{quantity}, coordinate {p}" + ("" if step is None else f", step {step}")
        self.tick()

    def tick(self):
        """Called from the references' integrands and ODE right-hand sides."""
        if time.perf_counter() > self.deadline:
            raise OutOfTime(self.where)


def check_table(spec, tensors, meta, level="fast", n_coords=None, budget_s=None):
    """Verify a table (float64 tensors + meta) for ``spec``; returns a Report.

    The check has a time budget (``budget_s``, default BUDGET_S[level]); when it runs out the
    report fails with one row naming the quantity, coordinate and step it was computing."""
    if meta.get("variable", "t") != "t" or meta.get("form", "eps") != "eps":
        from ._check_variants import check_variant_table       # tau-variable / data-prediction tables
        return check_variant_table(spec, tensors, meta, level=level, n_coords=n_coords)
    start = time.perf_counter()
    report = Report(f"{meta['spec']['name']} nfe{meta['nfe']} q{meta['order']}", level)
    if meta["spec"]["sha256"] != spec.sha256:
        report.add("spec hash", [(0, float("inf"), float("inf"))],
                   f"table built from another spec: its sha256 {meta['spec']['sha256'][:12]} ({meta['spec']['name']}), "
                   f"this spec's {spec.sha256[:12]} ({spec.name}); any edit of the spec counts, its description too", 0.0)
        return report
    identities(report, tensors, meta)
    P = tensors["psi"].shape[1]
    coords = pick_coords(P, n_coords or (2 if level == "fast" else 6))
    report.coords = coords
    budget = Budget(BUDGET_S[level] if budget_s is None else budget_s)
    refs = {}      # coordinates with the same basis value (dct2d: (i, j) and (j, i)) share one reference
    try:
        for p in coords:
            coord_value = _coord_value(spec, p)             # the basis symbol's value (dct2d: frequency)
            if level == "fast":
                _fast(report, spec, tensors, meta, p, coord_value, budget)
            else:
                _full(report, spec, tensors, meta, p, coord_value, budget, refs)
    except OutOfTime as exc:
        report.add("time budget", [(0, float("inf"), float("inf"))],
                   f"ran out of {budget.seconds:g} s at {exc}", 0.0)
    report.seconds = time.perf_counter() - start
    return report


def _fast(report, spec, tensors, meta, p, coord_value, budget):
    t = tensors["t"]
    N = len(t) - 1
    q = meta["order"]
    budget.at("reference ODEs", p)
    ref = ScipyReference(spec, t, coord_value, tick=budget.tick)
    how = "scipy solve_ivp float64"
    errs = []
    for i in range(N):
        budget.at("psi", p, i)
        errs.append((i, *_err(tensors["psi"][i, p], ref.psi(t[i + 1], t[i]))))
    report.add("psi", errs, how, TOL_FAST)
    report.add("sigma", [(i, *_err(tensors["sigma"][i, p], ref.sigma(t[i]))) for i in range(N + 1)], how, TOL_FAST)
    report.add("R", [(i, *_err(tensors["R"][i, p], ref.R(t[i]))) for i in range(N + 1)], how, TOL_FAST)
    errs = []
    for i in sorted({0, min(1, N - 1), N // 2, N - 1}):
        budget.at("eps_weights", p, i)
        qi = min(q, i + 1)
        C, terms = ref.weights(t[i], t[i + 1], [t[i - j] for j in range(qi)], with_terms=True)
        errs.append((i, *_err(tensors["eps_weights"][i, :qi, p], C, terms)))
    report.add("eps_weights", errs, "scipy quad_vec float64", TOL_FAST)
    _data_and_coefficients(report, tensors, p, ref, _err, TOL_FAST, how)


def _data_and_coefficients(report, tensors, p, ref, err, tol, how):
    """What the samplers read besides the weights: D_t (the data's mean map, the x0 form's and the
    denoising's), x0_weights (the final denoising: D^-1 and -D^-1 R at t_N) and F, G G^T at the grid
    times (the baselines' steps). Unchecked, a table with any of them edited passed (sweep 6)."""
    t = tensors["t"]
    N = len(t) - 1
    Ds = [ref.data_to_state(t[i]) for i in range(N + 1)]
    report.add("data_to_state", [(i, *err(tensors["data_to_state"][i, p], Ds[i])) for i in range(N + 1)], how, tol)
    D_inv = _inv(Ds[N])
    report.add("x0_weights", [(0, *err(tensors["x0_weights"][0, p], D_inv)),
                              (1, *err(tensors["x0_weights"][1, p], -_mm(D_inv, ref.R(t[N]))))], how, tol)
    rows = []
    for i in range(N + 1):
        rows += [(i, *err(tensors["F"][i, p], ref.F(t[i]))), (i, *err(tensors["GGT"][i, p], ggt(ref.G(t[i]))))]
    report.add("F, G G^T", rows, "the spec evaluated by validation's own evaluator", tol)


def _mm(a, b):
    """a b for numpy arrays (the scipy reference) and mpmath matrices (the 45-digit one) alike."""
    return a @ b if isinstance(a, np.ndarray) else a * b


def _inv(a):
    return np.linalg.inv(a) if isinstance(a, np.ndarray) else a ** -1


def ggt(G):
    """G G^T of a reference's G (numpy or mpmath)."""
    return _mm(G, G.T)


def _full(report, spec, tensors, meta, p, coord_value, budget, refs=None):
    t = tensors["t"]
    N = len(t) - 1
    q = meta["order"]
    how = f"mpmath Taylor/BS/GL, {DPS} digits"
    refs = {} if refs is None else refs
    with mpmath.workdps(DPS):
        budget.at("reference ODEs", p)
        if coord_value not in refs:
            refs[coord_value] = MpReference(spec, coord_value, tick=budget.tick)
        ref = refs[coord_value]
        tm = [mpmath.mpf(float(v)) for v in t]
        budget.at("R and sigma", p)
        ref.march(tm)                                   # one solve through every grid time
        Rs, Ss = [], []
        for i, x in enumerate(tm):
            budget.at("R and sigma", p, i)
            Rs.append(ref.R(x))
            Ss.append(ref.sigma(x))
        Ps = []
        for i in range(N):
            budget.at("psi", p, i)
            Ps.append(ref.psi(tm[i + 1], tm[i]))
        report.add("psi", [(i, *_err_mp(tensors["psi"][i, p], Ps[i])) for i in range(N)], how, TOL_FULL)
        report.add("sigma", [(i, *_err_mp(tensors["sigma"][i, p], Ss[i])) for i in range(N + 1)], how, TOL_FULL)
        report.add("R", [(i, *_err_mp(tensors["R"][i, p], Rs[i])) for i in range(N + 1)], how, TOL_FULL)
        report.add("L", [(i, *_err_mp(tensors["L"][i, p], _chol(Ss[i]))) for i in range(N + 1)], how, TOL_FULL)
        errs, errs_c = [], []
        for i in range(N):
            qi = min(q, i + 1)
            # the weights sum to R_t - Psi R_s: judged relative to those terms
            terms = max(_mp_amax(Rs[i + 1]), _mp_amax(Ps[i] * Rs[i]))
            budget.at("eps_weights" + (" and corrector_weights" if "corrector_weights" in tensors else ""), p, i)
            node_sets = [[tm[i - j] for j in range(qi)]]
            if "corrector_weights" in tensors:       # same step, same integrand: one quadrature
                node_sets.append([tm[i + 1 - j] for j in range(min(q + 1, i + 2))])
            C = ref.weights_sets(tm[i], tm[i + 1], node_sets)
            errs += [(i, *_err_mp(tensors["eps_weights"][i, j, p], C[0][j], terms)) for j in range(qi)]
            if "corrector_weights" in tensors:
                errs_c += [(i, *_err_mp(tensors["corrector_weights"][i, j, p], C[1][j], terms))
                           for j in range(len(node_sets[1]))]
        report.add("eps_weights", errs, how, TOL_FULL)
        report.add("corrector_weights", errs_c, how, TOL_FULL)
        if "eps_weights_sde" in tensors:
            e1, e2 = [], []
            for i in range(N):
                budget.at("eps_weights_sde", p, i)
                w, Pst = ref.stochastic(tm[i], tm[i + 1], sp.Rational(meta["lam"]))
                terms = max(_mp_amax(Rs[i + 1]), _mp_amax(Ps[i] * Rs[i]))
                e1.append((i, *_err_mp(tensors["eps_weights_sde"][i, p], w, terms)))
                Lc = tensors["noise_chol"][i, p]
                e2.append((i, *_err_mp(Lc @ Lc.T, Pst, max(_mp_amax(Ss[i + 1]), _mp_amax(Ps[i] * Ss[i] * Ps[i].T)))))
            report.add("eps_weights_sde", e1, how + " (P ODE)", TOL_FULL)
            report.add("noise_chol (as L L^T)", e2, how + " (P ODE)", TOL_FULL)
        _data_and_coefficients(report, dict(tensors, t=tm), p, ref, _err_mp, TOL_FULL, how)
        budget.at("closed forms", p)
        _closed_forms(report, spec, meta, tm, p, ref, Ss)


def _mp_amax(M):
    return max(abs(M[i, j]) for i in range(M.rows) for j in range(M.cols))


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
