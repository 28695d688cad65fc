"""Benchmark: the gDDIM result table on data whose score is known exactly.

    python -m validation.bench           # the full table: ~16 min on 2 cores, -> validation/results/
    python -m validation.bench --quick   # VP, CLD, BDM at NFE 10/20: < 1 min, -> validation/results/quick/

Data are isotropic Gaussian mixtures, whose score is exact under every linear SDE
(validation.exact), so every difference between samplers is discretisation error. Writes
results.md (tables, definitions), results.csv and PNG plots to --out, and prints the main table.

Metrics:
  endpoint error  mean over samples of |u - u_ref| / sqrt(dim) on the data channel, where u_ref is
                  the probability-flow solution from the same prior noise (adaptive dopri5 at
                  rtol = atol = 1e-9 with the exact score) followed by the same final denoising
                  step E[[x0; 0] | u_t_min] that the samplers take; deterministic samplers only.
  CFD             component Frechet distance (main table): each sample is assigned to its most
                  likely mixture component; per component FD_c = |mean - mu_c|^2/d + (s - sigma_c)^2
                  for the isotropic fit s^2 = E|x - mean|^2/d; CFD = sum_c w_c FD_c (an empty mode
                  counts sigma_c^2). It sees misplaced mass, spread and collapse within each mode.
                  The mode-weight total variation is in the CSV.
  SW2             sliced Wasserstein-2 distance to as many exact data samples (256 directions), in
                  the CSV; at these sample sizes its noise floor is above most sampler differences.
  Noise floors    the same metric between two independent exact sample sets of the same size.
"""

import argparse
import csv
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import sympy as sp
import torch

import gddim_runtime as gr
from derive import _grids, _hp, _tables
from derive._derivation import Derivation
from derive._spec import load_spec

from .exact import DenseModel, MixtureScore, TableModel

ROOT = Path(__file__).resolve().parents[1]
SDES = ROOT / "derive" / "sdes"


# ----- data -------------------------------------------------------------------------------

def rings():
    """2-D: 8 components on a circle of radius 2 and 4 on radius 1, std 0.1 (gDDIM's toy)."""
    a = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
    b = torch.arange(4, dtype=torch.float64) * 2 * math.pi / 4 + math.pi / 4
    means = torch.cat([torch.stack([2 * a.cos(), 2 * a.sin()], 1), torch.stack([b.cos(), b.sin()], 1)])
    return means, torch.full((12,), 0.1, dtype=torch.float64)


def images(size=32):
    """3 x size x size: 4 components centred on smooth procedural images, std 0.1."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size, dtype=torch.float64),
                          torch.linspace(0, 1, size, dtype=torch.float64), indexing="ij")
    pats = []
    for c in range(4):
        ch = [torch.sin(2 * math.pi * ((c + 1) * x + k * y / 2)) * 0.8 + 0.2 * (k - 1) for k in range(3)]
        pats.append(torch.stack(ch))
    return torch.stack(pats), torch.full((4,), 0.1, dtype=torch.float64)


def exact_samples(means, stds, n, gen):
    idx = torch.randint(0, means.shape[0], (n,), generator=gen)
    return means[idx] + stds[idx].view(-1, *[1] * (means.ndim - 1)) * torch.randn((n,) + means.shape[1:], generator=gen,
                                                                                   dtype=torch.float64)


def component_fd(x, means, stds, weights=None):
    """Per-component Frechet distance: samples assigned to their most likely mixture component,
    FD_c = |mean_c - mu_c|^2 / d + (s_c - sigma_c)^2 for the isotropic fit s_c^2 = E|x - mean_c|^2 / d,
    averaged with the true weights; plus the total variation of the mode weights. A sampler that
    collapses each mode (s_c -> 0) or misplaces mass is penalised; exact samples score ~0."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    mu = means.reshape(means.shape[0], -1)
    d = x.shape[1]
    C = mu.shape[0]
    w = torch.full((C,), 1.0 / C, dtype=torch.float64) if weights is None else weights
    logp = -((x[:, None, :] - mu[None]) ** 2).sum(-1) / (2 * stds[None] ** 2) - d * torch.log(stds[None]) + torch.log(w[None])
    lab = logp.argmax(1)
    fd, tv = 0.0, 0.0
    for c in range(C):
        xc = x[lab == c]
        frac = xc.shape[0] / x.shape[0]
        tv += abs(frac - float(w[c])) / 2
        if xc.shape[0] < 2:
            fd += float(w[c]) * float(stds[c]) ** 2          # an empty mode: as bad as a collapsed one
            continue
        m = xc.mean(0)
        s = float(((xc - m) ** 2).sum(1).mean() / d) ** 0.5
        fd += float(w[c]) * (float(((m - mu[c]) ** 2).sum() / d) + (s - float(stds[c])) ** 2)
    return fd, tv


def sliced_w2(a, b, n_dir=256, seed=0):
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], n_dir, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = (a.to(torch.float64) @ d).sort(0).values, (b.to(torch.float64) @ d).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


# ----- tables in memory ---------------------------------------------------------------------

class Tables:
    """Runtime tables for one process, built in memory (moments shared between orders)."""

    def __init__(self, name, basis_size=None, data_variance=None):
        self.spec = load_spec(SDES / f"{name}.yaml")
        if data_variance is not None:      # Gaussian data N(mu, c^2 I): c^2 joins the x block of Sigma_0
            e0 = sp.zeros(self.spec.k, self.spec.k)
            e0[0, 0] = sp.Rational(data_variance)
            self.spec = dataclasses.replace(self.spec, Sigma0=self.spec.Sigma0 + e0)
        if basis_size is not None and self.spec.basis.kind == "dct2d":       # e.g. BDM on 16 x 16 images
            self.spec = dataclasses.replace(self.spec, basis=dataclasses.replace(self.spec.basis, size=tuple(basis_size)))
        self.deriv = Derivation(self.spec)
        self.cache = {}
        self._moments = {}
        self.dense = None

    def table(self, steps, order=3, lam=None, corrector=False, weights=True, grid="quadratic"):
        key = (steps, order, lam, corrector, weights, grid)
        if key not in self.cache:
            d = self.deriv
            times = _grids.make_grid(_grids.parse_kind(grid), steps, d)
            cache = self._moments.setdefault((grid, steps), {})
            hp = _tables.build(d, times, order, None if lam is None else _hp.mpf(lam), corrector,
                               moment_cache=cache, weights=weights)
            arrays = _tables.to_float64(hp, d)
            meta = {"spec": {"basis": {"kind": self.spec.basis.kind, "size": list(self.spec.basis.size)}},
                    "denoise": True, "lam": None if lam is None else str(lam)}
            self.cache[key] = gr.Table({n: torch.from_numpy(a) for n, a in arrays.items()}, meta, self.spec.name)
        return self.cache[key]

    def dense_coeffs(self):
        if self.dense is None:
            arrays = _tables.dense(self.deriv, tol=1e-12, n=16)
            self.dense = gr.dense_from_tensors(arrays)
        return self.dense


# ----- one experiment -----------------------------------------------------------------------

# The samplers' final step E[[x0; 0] | u_t_min] = D^-1 (u - R eps) on data-space u and eps (eps_R), the
# runtime's own (kept under this name for bench_auto, bench_variants and peers).
denoise = gr.final_denoise


def prior(t_ref, batch, data_shape, basis):
    """x_T = R_T z for z from seed 0 (data space; R_T applied per frequency for a dct2d basis): the
    prior noise every sampler of the exact-score benchmarks starts from."""
    z = torch.randn((batch, t_ref.k) + tuple(data_shape), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    to_coef, from_coef = (gr.dct2, gr.idct2) if basis[0] == "dct2d" else ((lambda x: x),) * 2
    return from_coef(gr.block_apply(t_ref.tensors["R"][0], to_coef(z), basis))


def reference_endpoint(mix, dense, t_ref, x_T, tol=1e-9):
    """(reference endpoint, its dopri5 NFE): the probability flow from x_T (dopri5 at rtol = atol =
    tol, exact score) followed by the same final denoising evaluation E[[x0; 0] | u_tmin] =
    D^-1 (u - R eps) with the exact eps that every sampler applies."""
    ref, info = gr.sample(DenseModel(mix, dense), t_ref, x_T=x_T, sampler="probability_flow_rk45", dense=dense,
                          rtol=tol, atol=tol, dtype=torch.float64, denoise=False, return_info=True)
    ref = denoise(t_ref, ref, TableModel(mix, t_ref)(ref, t_ref.tensors["t"][-1:].expand(x_T.shape[0])))
    return ref, info["nfe"]


def run_process(name, data, nfes, batch, quick, rows, log):
    means, stds = data
    data_shape = tuple(means.shape[1:])
    tabs = Tables(name, data_shape[1:] if len(data_shape) == 3 else None)
    label = "rings" if len(data_shape) == 1 else "images " + "x".join(map(str, data_shape))
    basis = (tabs.spec.basis.kind, tuple(tabs.spec.basis.size))
    mix = MixtureScore(means, stds, basis=basis)
    k = tabs.spec.k
    truth = exact_samples(means, stds, batch, torch.Generator().manual_seed(1))
    other = exact_samples(means, stds, batch, torch.Generator().manual_seed(2))
    floor = sliced_w2(other, truth)
    cfd_floor = component_fd(other, means, stds)[0]
    dense = tabs.dense_coeffs()
    t_ref = tabs.table(1, order=1, weights=True)
    x_T = prior(t_ref, batch, data_shape, mix.basis)
    ref, ref_nfe = reference_endpoint(mix, dense, t_ref, x_T)
    log(f"{name}: reference dopri5 NFE {ref_nfe}, SW2 noise floor {floor:.4f}")
    dim = math.prod(data_shape)

    def record(sampler, nfe_target, u, nfe, deterministic, extra=""):
        x = u[:, 0]
        err = float((x - ref[:, 0]).reshape(batch, -1).norm(dim=1).mean() / math.sqrt(dim)) if deterministic else float("nan")
        cfd, tv = component_fd(x, means, stds)
        rows.append({"process": name, "data": label, "sampler": sampler + extra,
                     "nfe_target": nfe_target, "nfe": nfe, "endpoint_error": err, "cfd": cfd, "mode_tv": tv,
                     "cfd_floor": cfd_floor, "sw2": sliced_w2(x, truth), "sw2_floor": floor})

    def run(sampler, table, nfe_target, deterministic, extra="", **kw):
        model = DenseModel(mix, dense) if sampler == "probability_flow_rk45" else TableModel(mix, table)
        u, info = gr.sample(model, table, x_T=x_T, sampler=sampler, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(3), return_info=True, **kw)
        record(sampler, nfe_target, u, info["nfe"], deterministic, extra)
        return u, info["nfe"]

    orders = (1, 2, 3, 4)
    lam_nfe = 50 if 50 in nfes else nfes[-1]        # the lam sweep (the paper's, at NFE 50)
    for nfe in nfes:
        steps = nfe - 1
        if steps < 1:
            continue
        for q in orders:
            if nfe >= q:
                run("gddim", tabs.table(steps, q), nfe, True, f" q{q}")
        run("gddim_pc", tabs.table(steps, 3, corrector=True), nfe, True, " q3")
        for lam in ((0.1, 0.5, 1.0) if nfe == lam_nfe else (1.0,)):
            run("gddim_sde", tabs.table(steps, 1, lam=lam), nfe, False, f" lam{lam}")
        base = tabs.table(steps, 1)
        run("euler_maruyama", base, nfe, False, lam=1.0)
        heun_steps = max(1, nfe // 2)
        run("heun", tabs.table(heun_steps, 1), nfe, True)
        if k == 1:
            run("ancestral", base, nfe, False)
        log(f"{name}: NFE {nfe} done")
    if 1000 not in nfes:       # Euler-Maruyama at 1000 NFE (the paper's long-run baseline) in any case
        run("euler_maruyama", tabs.table(999, 1, weights=False), 1000, False, lam=1.0)
    # RK45 with the tolerance swept so that its NFE lands near each target
    for tol in ((1.0, 1e-1, 1e-2) if quick else (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)):
        u, nfe = run("probability_flow_rk45", t_ref, 0, True, f" tol{tol:g}", dense=dense, rtol=tol, atol=tol)
        rows[-1]["nfe_target"] = nfe
    return tabs, mix, x_T, ref


def ablation_K(tabs, mix, x_T, ref, nfes, rows, log, orders=(1, 3)):
    """CLD: the exponential integrator with K = L (eps_L frozen / extrapolated) vs K = R, same grids.

    The K = L weights int 1/2 Psi G G^T L^-T l_j dr come from validation's scipy reference (the
    toolkit emits only K = R tables); both sides run through the runtime's gDDIM sampler, and the
    final denoising step is the same for both."""
    means, stds = mix.means, mix.stds
    for nfe in nfes:
        steps = nfe - 1
        for q in orders:
            tab = tabs.table(steps, q)
            # the K = L table's weights act on eps_L itself: the runtime applies them to the model's
            # output unconverted (parametrization "eps_R", i.e. "the table's eps")
            u_L = gr.sample(TableModel(mix, tab, "eps_L"), _table_K_L(tabs.spec, tab), x_T=x_T, dtype=torch.float64)
            u_R = gr.sample(TableModel(mix, tab), tab, x_T=x_T, dtype=torch.float64)
            for K, out in (("L", u_L), ("R", u_R)):
                err = float((out[:, 0] - ref[:, 0]).reshape(out.shape[0], -1).norm(dim=1).mean()
                            / math.sqrt(out[0, 0].numel()))
                rows.append({"nfe": nfe, "order": q, "K": K, "endpoint_error": err,
                             "cfd": component_fd(out[:, 0], means, stds)[0]})
            log(f"K ablation NFE {nfe} q{q}: K=L {rows[-2]['endpoint_error']:.3e}, K=R {rows[-1]['endpoint_error']:.3e}")


def _table_K_L(spec, tab):
    """``tab`` (identity basis) with the K = L multistep weights from validation's scipy reference in
    place of eps_weights (lag j of step i at node t_{i-j}, the first steps at the order their history
    allows), and the final denoising's eps column taking eps_L: x0_weights[1] R^T L^-T at t_N."""
    from ._reference import ScipyReference
    tensors = tab.tensors
    times = [float(v) for v in tensors["t"]]
    sref = ScipyReference(spec, times)
    W = torch.zeros_like(tensors["eps_weights"])                            # [N, q, 1, k, k]
    for i in range(len(times) - 1):
        nodes = times[i::-1][:tab.order]                                    # t_i, t_{i-1}, ... (newest first)
        C = sref.weights(times[i], times[i + 1], nodes, factor="L")
        for j in range(len(nodes)):
            W[i, j, 0] = torch.from_numpy(C[j])
    R_N, L_N = tensors["R"][-1], tensors["L"][-1]
    eps_L_to_R = R_N.transpose(-1, -2) @ torch.linalg.inv(L_N).transpose(-1, -2)   # eps_R = R^T L^-T eps_L
    x0_weights = torch.stack([tensors["x0_weights"][0], tensors["x0_weights"][1] @ eps_L_to_R])
    return gr.Table(dict(tensors, eps_weights=W, x0_weights=x0_weights), tab.meta, f"{tab.path} (K = L)")


def eps_paths(tabs, mix, x_T, path):
    """Figure-1 argument: eps_R (flat) vs eps_L (oscillating) along an exact probability-flow path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchdiffeq import odeint
    dense = tabs.dense_coeffs()
    t0, t1 = float(tabs.spec.T), float(tabs.spec.t_min)
    ts = torch.from_numpy(np.geomspace(t0, t1, 200))
    score, eps_R, eps_L = (DenseModel(mix, dense, p) for p in ("score", "eps_R", "eps_L"))
    ident = ("identity", ())

    def flow(t, x):
        c = dense.at(t)
        return gr.block_apply(c["F"], x, ident) - 0.5 * gr.block_apply(c["GGT"], score(x, t[None]), ident)
    traj = odeint(flow, x_T[:1], ts, method="dopri5", rtol=1e-9, atol=1e-9)
    eR = torch.stack([eps_R(x, t[None])[0, :, 0] for t, x in zip(ts, traj)]).numpy()
    eL = torch.stack([eps_L(x, t[None])[0, :, 0] for t, x in zip(ts, traj)]).numpy()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for a_, e, title in ((ax[0], eR, "K = R (gDDIM)"), (ax[1], eL, "K = L (Cholesky)")):
        a_.plot(ts.numpy(), e[:, 0], label="eps x")
        a_.plot(ts.numpy(), e[:, 1], label="eps v")
        a_.set_xscale("log")
        a_.set_xlabel("t")
        a_.set_title(title)
        a_.legend()
    fig.suptitle("CLD, rings data: eps along one exact probability-flow path")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return float(np.abs(np.diff(eR, axis=0)).sum()), float(np.abs(np.diff(eL, axis=0)).sum())


def plot_errors(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    procs = sorted({(r["process"], r["data"]) for r in rows})
    ncol = min(3, len(procs))
    nrow = -(-len(procs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 4 * nrow), squeeze=False)
    for ax in axes.flat[len(procs):]:
        ax.set_visible(False)
    for ax, (p, d) in zip(axes.flat, procs):
        sel = [r for r in rows if r["process"] == p and r["data"] == d and np.isfinite(r["endpoint_error"])]
        for s in sorted({r["sampler"].split(" tol")[0] for r in sel}):
            pts = sorted((r["nfe"], r["endpoint_error"]) for r in sel if r["sampler"].split(" tol")[0] == s)
            ax.loglog(*zip(*pts), marker="o", label=s)
        ax.set_title(f"{p} ({d})")
        ax.set_xlabel("NFE")
        ax.set_ylabel("endpoint error")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rk45_cell(sel, n, fmt, empty):
    """RK45 (adaptive) at column n: fmt of its runs with NFE within [0.7, 1.5] x n; where even its
    cheapest run spends more than n, say so; else ``empty``."""
    near = [r for r in sel if 0.7 * n <= r["nfe"] <= 1.5 * n]
    if near:
        return fmt(near)
    cheapest = min(r["nfe"] for r in sel)
    return f"needs > {n} (min {cheapest})" if n < cheapest else empty


PAPER_ROWS = (("euler_maruyama", "EM"), ("probability_flow_rk45", "Prob.Flow RK45"), ("heun", "2nd Heun"),
              ("ancestral", "Ancestral"), ("gddim q3", "gDDIM (q = 3)"))


def paper_table(rows, nfes):
    """The paper's Table 3 layout (its samplers only, gDDIM at order 3); entries: component FD.

    RK45 (adaptive) shows the run whose NFE is nearest the column within [0.7, 1.5] x, as CFD (NFE)."""
    cols = sorted(set(nfes) | {1000})
    lines = ["| model | sampler | " + " | ".join(f"NFE {n}" for n in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for p, d in dict.fromkeys((r["process"], r["data"]) for r in rows):
        for key, label in PAPER_ROWS:
            sel = [r for r in rows if (r["process"], r["data"]) == (p, d) and r["sampler"].split(" tol")[0] == key]
            if not sel:
                continue
            cells = []
            for n in cols:
                if key == "probability_flow_rk45":
                    nearest = lambda near: min(near, key=lambda r: abs(math.log(r["nfe"] / n)))
                    cells.append(_rk45_cell(sel, n, lambda near: "{cfd:.2e} ({nfe})".format(**nearest(near)), "-"))
                else:
                    hit = [r for r in sel if r["nfe_target"] == n]
                    cells.append(f"{hit[0]['cfd']:.2e}" if hit else "-")
            lines.append(f"| {p} ({d}) | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_table(rows, nfes):
    """Every sampler and order: rows (process, sampler), columns NFE, entries: component FD."""
    cols = sorted(set(nfes) | {1000})
    lines = ["| process | sampler | " + " | ".join(f"NFE {n}" for n in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    keys = []
    for r in rows:
        key = (r["process"], r["data"], r["sampler"].split(" tol")[0])
        if key not in keys:
            keys.append(key)
    for p, d, s in keys:
        cells = []
        for n in cols:
            sel = [r for r in rows if (r["process"], r["data"], r["sampler"].split(" tol")[0]) == (p, d, s)]
            if s.startswith("probability_flow_rk45"):
                cells.append(_rk45_cell(sel, n, lambda near: " / ".join(f"{r['cfd']:.2e} ({r['nfe']})" for r in near), ""))
            else:
                hit = [r for r in sel if r["nfe_target"] == n]
                cells.append(f"{hit[0]['cfd']:.2e}" if hit else "")
        lines.append(f"| {p} ({d}) | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(quick=True, out=None, log=print):
    start = time.perf_counter()
    nfes = (10, 20) if quick else (10, 20, 50, 100, 1000)
    rows, krows = [], []
    if quick:
        setups = [("vp_linear", rings(), 2000), ("cld", rings(), 2000), ("bdm", images(16), 128)]
    else:
        setups = [("vp_linear", rings(), 4000), ("cld", rings(), 4000), ("psld", rings(), 4000),
                  ("bdm", images(32), 128), ("cld", images(16), 128)]
    cld = None
    for name, data, batch in setups:
        res = run_process(name, data, nfes, batch, quick, rows, log)
        if name == "cld" and cld is None:
            cld = res
    tabs, mix, x_T, ref = cld
    ablation_K(tabs, mix, x_T, ref, (20,) if quick else (20, 30, 40, 50), krows, log)
    single = single_gaussian(log)
    result = {"rows": rows, "k_ablation": krows, "single": single, "nfes": nfes, "seconds": time.perf_counter() - start}
    if out is not None:
        write(result, Path(out), tabs, mix, x_T)
    return result


def _dirac_path(spec, mu, times, z, dps=24):
    """m(t) + R_t z at the first and last of ``times`` from validation's mpmath reference (not the table):
    the exact probability-flow solution for Dirac data mu from u_T = m(T) + R(T) z (m = D_t e_0 mu)."""
    import mpmath
    from ._reference import MpReference
    ref = MpReference(spec, None, dps=dps)
    out = []
    with mpmath.workdps(dps):
        for t in (times[0], times[-1]):
            tm = mpmath.mpf(float(t))
            D, R = (torch.tensor(M.tolist(), dtype=torch.float64) for M in (ref.data_to_state(tm), ref.R(tm)))
            out.append(D[:, :1] * mu + torch.einsum("ab,zb...->za...", R, z))
    return out


def single_gaussian(log):
    """gDDIM on single-Gaussian data (MATH.md section 3: exact when K = R).

    Dirac data mu (VP, CLD, PSLD), one step T -> t_min (order 1) and 5 steps at order 3: the state at
    t_min BEFORE the final denoising (which returns mu for any state when the data are a Dirac) must
    equal m(t_min) + R(t_min) z from u_T = m(T) + R(T) z, with m and R from validation's mpmath
    reference (24 digits), not from the table; max abs error over 64 samples, and the same in float64
    ulps of the largest term the updates cancel (max |Psi_i| |u_i|). Gaussian data
    N(mu, c^2 I) on CLD: the table derived with c^2 in Sigma_0 (so R_t factors the data's true
    covariance) must land on the probability-flow solution from the same u_T, computed independently
    by dopri5 (rtol = atol = 1e-10) with the exact score on the plain CLD coefficients; the plain CLD
    table (R_t of Dirac data) applied to the same data is shown beside it, and is not exact."""
    mu = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    single = []
    for name in ("vp_linear", "cld", "psld"):
        tabs = Tables(name)
        z = torch.randn((64, tabs.spec.k, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        x_T, exact = _dirac_path(tabs.spec, mu, tabs.table(1, 1).tensors["t"], z)
        for steps, q in ((1, 1), (5, 3)):
            tab = tabs.table(steps, q)
            states = [x_T]
            u = gr.sample(TableModel(MixtureScore(mu, [0.0]), tab), tab, x_T=x_T, dtype=torch.float64, denoise=False,
                          callback=lambda info: states.append(info["u"]))
            # rounding scale: the largest term the updates cancel, |Psi_i| |u_i|
            scale = max(float(gr.block_apply(tab.tensors["psi"][i].abs(), states[i].abs(), tab.basis).max())
                        for i in range(steps))
            err = float((u - exact).abs().max())
            single.append({"process": name, "data": "Dirac", "table": f"R for the data, {steps} step{'s' * (steps > 1)} q{q}",
                           "max_error": err, "ulps": err / (scale * torch.finfo(torch.float64).eps)})
    c = 0.5
    plain = Tables("cld")
    fitted = Tables("cld", data_variance=c ** 2).table(1, 1)
    gauss = MixtureScore(mu, [c])
    z = torch.randn((64, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = gr.block_apply(fitted.tensors["R"][0], z, fitted.basis)
    dense = plain.dense_coeffs()
    ref = gr.sample(DenseModel(gauss, dense), plain.table(1, 1), x_T=x_T, sampler="probability_flow_rk45",
                    dense=dense, rtol=1e-10, atol=1e-10, dtype=torch.float64, denoise=False)
    for label, tab, model in (("R for the data", fitted, TableModel(MixtureScore(mu, [0.0]), fitted)),
                              ("R for Dirac data", plain.table(1, 1), TableModel(gauss, plain.table(1, 1)))):
        u = gr.sample(model, tab, x_T=x_T, dtype=torch.float64, denoise=False)
        single.append({"process": "cld", "data": f"N(mu, {c}^2 I)", "table": label,
                       "max_error": float((u - ref).abs().max())})
    log("single Gaussian: " + ", ".join(f"{s['process']} {s['data']} {s['table']}: {s['max_error']:.1e}"
                                        + (f" ({s['ulps']:.1f} ulps)" if "ulps" in s else "") for s in single))
    return single


def single_section(single):
    """The results.md section of ``single_gaussian`` (markdown lines)."""
    return (["## gDDIM on single-Gaussian data: state at t_min before the final denoising", "",
             single_gaussian.__doc__.split("\n\n", 1)[1].replace("\n    ", " ").strip(), "",
             "| process | data | table | max error | ulps of max Psi u |", "|---|---|---|---|---|"]
            + [f"| {s['process']} | {s['data']} | {s['table']} | {s['max_error']:.2e} | "
               + (f"{s['ulps']:.1f} |" if "ulps" in s else "- |") for s in single])


def write(result, out, tabs, mix, x_T):
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_errors(rows, out / "error_vs_nfe.png")
    var_R, var_L = eps_paths(tabs, mix, x_T, out / "eps_path.png")
    md = ["# gDDIM on exact-score data", "", __doc__.split("\n\n", 2)[2].strip(), "",
          f"Run: `python -m validation.bench{' --quick' if result['nfes'] == (10, 20) else ''}` "
          f"({result['seconds']:.0f} s on this machine). Float64 state.", "",
          "## Main table: component Frechet distance to the data distribution (lower is better)", "",
          "Noise floors (two exact sample sets): " + ", ".join(
              f"{p} {d}: CFD {fl:.1e}, SW2 {sw:.3f}" for p, d, fl, sw in sorted(
                  {(r["process"], r["data"], r["cfd_floor"], r["sw2_floor"]) for r in rows})) + ".", "",
          "In the layout of the paper's Table 3 (its samplers; FID there, CFD here):", "",
          paper_table(rows, result["nfes"]), "",
          "Every sampler and order (gddim_pc: with the corrector; gddim_sde: stochastic gDDIM, lam as "
          "named; the lam sweep is at NFE 50):", "",
          main_table(rows, result["nfes"]), "",
          "RK45 cells list CFD (actual NFE) for the tolerances whose NFE fell within [0.7, 1.5] x the column; "
          "'needs > n (min m)': even rtol = atol = 1 took m evaluations (the paper's '> 100' cells are "
          "FID, these are the NFE the adaptive solver insisted on).", "",
          "## Probability flow RK45 (dopri5), every tolerance", "",
          "| process | rtol = atol | NFE | CFD | endpoint error |", "|---|---|---|---|---|"] + [
          f"| {r['process']} ({r['data']}) | {r['sampler'].split(' tol')[1]} | {r['nfe']} | {r['cfd']:.2e} | "
          f"{r['endpoint_error']:.2e} |" for r in rows if r["sampler"].startswith("probability_flow_rk45")] + ["",
          "## Endpoint error vs the exact probability-flow solution", "", "![error vs NFE](error_vs_nfe.png)", "",
          "## K = L vs K = R on CLD (rings), same grid and order", "",
          "Endpoint error (CFD in brackets); the paper's FID for this ablation: K = L 368 / 167 / 4.12 / 3.31, "
          "K = R 3.90 / 2.64 / 2.37 / 2.26 at NFE 20 / 30 / 40 / 50.", "",
          "| NFE | order | K = L | K = R |", "|---|---|---|---|"]
    for n, q in sorted({(r["nfe"], r["order"]) for r in result["k_ablation"]}):
        e = {r["K"]: r for r in result["k_ablation"] if (r["nfe"], r["order"]) == (n, q)}
        md.append(f"| {n} | {q} | " + " | ".join(f"{e[K]['endpoint_error']:.3e} ({e[K]['cfd']:.2e})" for K in "LR") + " |")
    md += ["", f"Total variation of eps along one exact path: K = R {var_R:.3f}, K = L {var_L:.3f}.", "",
           "![eps paths](eps_path.png)", ""] + single_section(result["single"])
    (out / "results.md").write_text("\n".join(md) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m validation.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="VP, CLD, BDM (3x16x16) at NFE 10/20 (+ EM at 1000), the configuration the claim tests use: "
                        "under a minute")
    p.add_argument("--out", help="output folder (default: validation/results, or validation/results/quick with --quick)")
    p.add_argument("--peers", action="store_true",
                   help="instead: gDDIM vs diffusers' schedulers on VP (validation/peers.py) -> OUT/peers.md, peers.csv "
                        "(with --quick: fewer samples, -> peers_quick.*)")
    args = p.parse_args(argv)
    if args.peers:
        from . import peers
        out = args.out or ROOT / "validation" / "results"
        res = peers.run_all(args.quick, out)
        print(peers.summary(res["rows"], res["nfes"]))
        print(f"({res['seconds']:.0f} s; {Path(out) / ('peers_quick.md' if args.quick else 'peers.md')})")
        return
    out = args.out or ROOT / "validation" / "results" / ("quick" if args.quick else "")
    res = run_all(args.quick, out)
    print(paper_table(res["rows"], res["nfes"]))
    print(f"(every sampler and order: {Path(out) / 'results.md'})")
    print(f"({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
