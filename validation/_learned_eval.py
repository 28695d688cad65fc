"""The measuring half of ``python -m validation.learned``: samplers x NFE on the trained networks, metrics,
results.md / results.csv / PNGs. See validation/learned.py for the set-up and the definitions."""

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import gddim_runtime as gr

from . import learned as L
from .bench import component_fd, denoise, exact_samples, rings

FULL_NFES = (10, 20, 50, 100, 1000)
QUICK_NFES = (10, 20, 50)
SAMPLE_N = {"rings": 2000, "digits": 898}


# ----- metrics ------------------------------------------------------------------------------------

def frechet(a, b):
    """Frechet distance between Gaussians fitted to feature sets a, b [n, d] (float64)."""
    from scipy import linalg
    a, b = a.to(torch.float64).numpy(), b.to(torch.float64).numpy()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    return float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * root))


class DigitsMetric:
    """FD in classifier features and predicted-class TV against one half of the real digits."""

    def __init__(self, log):
        X, _ = L.digits()
        self.clf, self.meta = L.classifier(log)
        perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(11))
        self.A, self.B = X[perm[:898]], X[perm[898:]]
        with torch.no_grad():
            self.fB = self.clf.features(self.B)
            self.hB = self._hist(self.B)

    def _hist(self, x):
        with torch.no_grad():
            return torch.bincount(self.clf(x).argmax(1), minlength=10).to(torch.float64) / x.shape[0]

    def __call__(self, x):
        x = x.to(torch.float32).clamp(-1, 1)
        with torch.no_grad():
            f = self.clf.features(x)
        return frechet(f, self.fB), float((self._hist(x) - self.hB).abs().sum() / 2)

    def floor(self, n):
        return self(self.A[:n])


class RingsMetric:
    def __init__(self):
        self.means, self.stds = rings()

    def __call__(self, x):
        return component_fd(x.to(torch.float64), self.means, self.stds)

    def floor(self, n):
        return self(exact_samples(self.means, self.stds, n, torch.Generator().manual_seed(21)))


# ----- samplers -----------------------------------------------------------------------------------

def prior(proc, n, shape, seed=3):
    """x_T = R_T z in data space, the same for every sampler (z from one seeded generator)."""
    tab = proc.tabs.table(1, 1, weights=False)
    z = torch.randn((n, proc.k) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if tab.basis[0] == "dct2d":
        return gr.idct2(gr.block_apply(tab.tensors["R"][0], gr.dct2(z), tab.basis))
    return gr.block_apply(tab.tensors["R"][0], z, tab.basis)


def k_equals_L(net, proc, x_T, steps, q, device="cpu"):
    """Exponential multistep with K = L: eps_L = L^T R^-T eps_R of the same network, frozen/extrapolated
    (weights int 1/2 Psi G G^T L^-T l_j dr from ScipyReference), then the same final denoising step."""
    from ._reference import ScipyReference
    tab = proc.tabs.table(steps, q)
    times = [float(v) for v in tab.tensors["t"]]
    tab = tab.to(device)
    T = tab.tensors
    sref = ScipyReference(proc.tabs.spec, times)
    u, hist = x_T.clone(), []
    with torch.no_grad():
        for i in range(steps):
            eR = net(u, T["t"][i].expand(u.shape[0]))
            conv = T["L"][i].transpose(-1, -2) @ torch.linalg.inv(T["R"][i]).transpose(-1, -2)
            hist = [gr.block_apply(conv, eR, tab.basis)] + hist[:q - 1]
            C = sref.weights(times[i], times[i + 1], times[i::-1][:len(hist)], factor="L")
            u = gr.block_apply(T["psi"][i], u, tab.basis)
            for j, e in enumerate(hist):
                u = u + gr.block_apply(torch.from_numpy(C[j])[None].to(device), e, tab.basis)
        return denoise(tab, u, net(u, T["t"][-1].expand(u.shape[0])))


def plan(k, quick, nfes):
    """(label, sampler, table args, nfe) for every run; gDDIM orders 1-4, stochastic gDDIM (lam = 1),
    EM, Heun (2 evaluations a step), ancestral (k = 1). At NFE 1000 (a 999-step table per order costs minutes
    to derive here) only EM, Heun, ancestral and gDDIM q1 / q3. --quick: orders 1-3, NFE 10/20/50 + EM@1000."""
    runs = []
    for nfe in nfes:
        s = nfe - 1
        big = nfe >= 1000
        for q in ((1, 2, 3) if quick else ((1, 3) if big else (1, 2, 3, 4))):
            runs.append((f"gDDIM q{q}", "gddim", dict(steps=s, order=q), nfe))
        if not big and not (quick and nfe >= 50):
            runs.append(("gDDIM-SDE lam1", "gddim_sde", dict(steps=s, order=1, lam=1.0), nfe))
        runs.append(("EM", "euler_maruyama", dict(steps=s, order=1, weights=False), nfe))
        runs.append(("Heun", "heun", dict(steps=max(1, nfe // 2), order=1, weights=False), nfe))
        if k == 1 and not quick:
            runs.append(("Ancestral", "ancestral", dict(steps=s, order=1, weights=False), nfe))
    if 1000 not in nfes:
        runs.append(("EM", "euler_maruyama", dict(steps=999, order=1, weights=False), 1000))
    return runs


def run_process(kind, proc, net, metric, n, quick, nfes, rows, samples, log, device="cpu"):
    shape = L.SHAPES[kind]
    t0, c0 = time.perf_counter(), time.process_time()
    x_T = prior(proc, n, shape).to(device)
    dense = proc.dense.to(device)
    net = net.to(device)                                   # the skip's coefficients move with it
    gen = lambda: torch.Generator(device=device).manual_seed(5)

    def record(label, nfe_target, nfe, x, sec):
        x = x.cpu()
        m, tv = metric(x[:, 0])
        rows.append({"data": kind, "process": proc.name, "sampler": label, "nfe_target": nfe_target, "nfe": nfe,
                     "metric": m, "tv": tv, "seconds": round(sec, 2)})
        if label in ("gDDIM q3", "EM", "gDDIM q1", "K=L q3") and nfe_target in (10, 20, 50, 1000):
            samples[(kind, proc.name, label, nfe_target)] = x[:, 0].to(torch.float32)

    with torch.no_grad():
        for label, sampler, targs, nfe in plan(proc.k, quick, nfes):
            a = dict(targs)
            tc = time.process_time()
            tab = proc.tabs.table(a.pop("steps"), a.pop("order"), **a).to(device)
            if time.process_time() - tc > 5:
                log(f"  {proc.name}: table {targs} {time.process_time() - tc:.0f} s CPU")
            start = time.perf_counter()
            x, info = gr.sample(net, tab, x_T=x_T, sampler=sampler, dtype=torch.float64, model_dtype=torch.float32,
                                generator=gen(), return_info=True)
            record(label, nfe, info["nfe"], x, time.perf_counter() - start)
        for tol in ((1e-2,) if quick else (1e-1, 1e-2, 1e-3)):
            start = time.perf_counter()
            x, info = gr.sample(net, proc.tabs.table(1, 1, weights=False).to(device), x_T=x_T,
                                sampler="probability_flow_rk45", dense=dense, rtol=tol, atol=tol, dtype=torch.float64, model_dtype=torch.float32,
                                return_info=True)
            record(f"RK45 tol{tol:g}", info["nfe"], info["nfe"], x, time.perf_counter() - start)
        if proc.name == "cld":
            for nfe in ((20, 50) if quick else nfes):
                if nfe > 100:
                    continue
                for q in ((3,) if quick else (1, 3)):
                    start = time.perf_counter()
                    x = k_equals_L(net, proc, x_T, nfe - 1, q, device)
                    record(f"K=L q{q}", nfe, nfe, x, time.perf_counter() - start)
    log(f"{kind} / {proc.name}: {sum(1 for r in rows if (r['data'], r['process']) == (kind, proc.name))} runs, "
        f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU")


# ----- tables, claims, figures ------------------------------------------------------------------------

def _cell(rows, n):
    hit = [r for r in rows if r["nfe_target"] == n]
    return f"{hit[0]['metric']:.3g}" if hit else ""


def _rk45_cell(rows, n):
    near = [r for r in rows if 0.7 * n <= r["nfe"] <= 1.5 * n]
    if near:
        r = min(near, key=lambda r: abs(math.log(r["nfe"] / n)))
        return f"{r['metric']:.3g} ({r['nfe']})"
    if rows and n < min(r["nfe"] for r in rows):
        return f"needs > {n}"
    return ""


def table(rows, nfes, kind):
    cols = sorted(set(nfes) | {1000})
    lines = ["| process | sampler | " + " | ".join(f"NFE {n}" for n in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for proc in dict.fromkeys(r["process"] for r in rows if r["data"] == kind):
        sel = [r for r in rows if r["data"] == kind and r["process"] == proc]
        labels = list(dict.fromkeys(r["sampler"].split(" tol")[0] for r in sel))
        for lab in labels:
            rs = [r for r in sel if r["sampler"].split(" tol")[0] == lab]
            cells = [(_rk45_cell(rs, n) if lab == "RK45" else _cell(rs, n)) for n in cols]
            lines.append(f"| {proc} | {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _get(rows, kind, proc, label, n):
    hit = [r for r in rows if (r["data"], r["process"], r["sampler"], r["nfe_target"]) == (kind, proc, label, n)]
    return hit[0]["metric"] if hit else None


def claims(rows, floors, nfes):
    """The paper's claims, evaluated on the numbers (rules stated in the text)."""
    out = []
    keys = list(dict.fromkeys((r["data"], r["process"]) for r in rows))
    out.append("**gDDIM (q = 3) at NFE 20 / 50 vs Euler-Maruyama at NFE 1000.** Holds where gDDIM's value is "
               "at most EM@1000's plus the noise floor (differences below the floor are not resolved).")
    out.append("")
    out.append("| data | process | EM@1000 | gDDIM@20 | gDDIM@50 | floor | holds at 20 | holds at 50 |")
    out.append("|---|---|---|---|---|---|---|---|")
    for kind, proc in keys:
        em, g20, g50 = (_get(rows, kind, proc, lab, n) for lab, n in (("EM", 1000), ("gDDIM q3", 20), ("gDDIM q3", 50)))
        fl = floors[kind][0]
        f = lambda v: "-" if v is None else f"{v:.3g}"
        h = lambda v: "-" if v is None or em is None else ("yes" if v <= em + fl else "no")
        out.append(f"| {kind} | {proc} | {f(em)} | {f(g20)} | {f(g50)} | {fl:.3g} | {h(g20)} | {h(g50)} |")
    out += ["", "**K = R vs K = L on CLD** (same network, same grid and order; K = L integrates eps_L = L^T R^-T eps_R):", "",
            "| data | order | NFE | K = L | K = R | K = R better |", "|---|---|---|---|---|---|"]
    for kind, proc in keys:
        if proc != "cld":
            continue
        for r in rows:
            if (r["data"], r["process"]) == (kind, proc) and r["sampler"].startswith("K=L"):
                q = r["sampler"][-1]
                kr = _get(rows, kind, proc, f"gDDIM q{q}", r["nfe_target"])
                if kr is not None:
                    out.append(f"| {kind} | {q} | {r['nfe_target']} | {r['metric']:.3g} | {kr:.3g} | "
                               f"{'yes' if kr < r['metric'] else 'no'} |")
    out += ["", "**Higher order helps** (gDDIM q = 1 vs the best of q = 2-4 at the same NFE):", "",
            "| data | process | NFE | q1 | q2 | q3 | q4 | best q>1 better |", "|---|---|---|---|---|---|---|---|"]
    for kind, proc in keys:
        for n in nfes:
            if n > 100:
                continue
            v = [_get(rows, kind, proc, f"gDDIM q{q}", n) for q in (1, 2, 3, 4)]
            if v[0] is None:
                continue
            hi = [x for x in v[1:] if x is not None]
            out.append(f"| {kind} | {proc} | {n} | " + " | ".join("-" if x is None else f"{x:.3g}" for x in v)
                       + f" | {'yes' if hi and min(hi) < v[0] else 'no'} |")
    return "\n".join(out)


def plot_errors(rows, floors, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(dict.fromkeys((r["data"], r["process"]) for r in rows))
    ncol = 4
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.8 * nrow), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, (kind, proc) in zip(axes.flat, keys):
        sel = [r for r in rows if (r["data"], r["process"]) == (kind, proc)]
        for lab in dict.fromkeys(r["sampler"].split(" tol")[0] for r in sel):
            pts = sorted((r["nfe"], r["metric"]) for r in sel if r["sampler"].split(" tol")[0] == lab)
            ax.loglog(*zip(*pts), marker="o", ms=3, label=lab)
        ax.axhline(floors[kind][0], color="k", ls="--", lw=0.8, label="noise floor")
        ax.set_title(f"{kind}: {proc}")
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD (classifier features)" if kind == "digits" else "component FD")
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_samples(samples, real, kind, proc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [(lab, n, x) for (k_, p, lab, n), x in samples.items() if (k_, p) == (kind, proc)]
    sel = [("data", 0, real)] + sorted(sel, key=lambda s: (s[0], s[1]))
    if kind == "digits":
        fig, axes = plt.subplots(len(sel), 1, figsize=(8, 1.1 * len(sel)))
        for ax, (lab, n, x) in zip(np.atleast_1d(axes), sel):
            strip = torch.cat(list(x[:16].clamp(-1, 1)), dim=1).numpy()
            ax.imshow(strip, cmap="gray_r", vmin=-1, vmax=1)
            ax.set_axis_off()
            ax.set_title(lab if lab == "data" else f"{lab}, NFE {n}", fontsize=7)
    else:
        ncol = min(4, len(sel))
        nrow = -(-len(sel) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3 * nrow), squeeze=False)
        for ax in axes.flat[len(sel):]:
            ax.set_visible(False)
        for ax, (lab, n, x) in zip(axes.flat, sel):
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_title(lab if lab == "data" else f"{lab}, NFE {n}", fontsize=8)
    fig.suptitle(f"{kind}: {proc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_all(quick=True, out=None, device="cpu", log=print):
    start, cpu = time.perf_counter(), time.process_time()
    nfes = QUICK_NFES if quick else FULL_NFES
    rows, samples, floors, train = [], {}, {}, {}
    metrics = {"digits": DigitsMetric(log), "rings": RingsMetric()}
    procs = {}
    for kind, names in L.PROCESSES.items():
        n = SAMPLE_N[kind] // (2 if quick and kind == "rings" else 1)
        floors[kind] = metrics[kind].floor(n)
        log(f"{kind}: noise floor {floors[kind][0]:.4g} (TV {floors[kind][1]:.3f}), {n} samples")
        for name in names:
            if name not in procs:
                procs[name] = L.Process(name)
            net, meta = L.network(kind, procs[name], log)
            train[(kind, name)] = meta
            run_process(kind, procs[name], net, metrics[kind], n, quick, nfes, rows, samples, log, device)
            seconds = (time.perf_counter() - start, time.process_time() - cpu)
            if out is not None:            # after every process, so that a cut-short run leaves what it measured
                done = f"{len(train)} of {sum(map(len, L.PROCESSES.values()))}"
                write(rows, samples, floors, train, metrics["digits"].meta, nfes, quick, seconds, Path(out), done)
    return rows, floors, seconds


def write(rows, samples, floors, train, clf_meta, nfes, quick, seconds, out, done=""):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_errors(rows, floors, out / "error_vs_nfe.png")
    real = {"digits": L.digits()[0][:16], "rings": exact_samples(*rings(), 2000, torch.Generator().manual_seed(0))}
    figs = []
    for kind, proc in dict.fromkeys((r["data"], r["process"]) for r in rows):
        name = f"samples_{kind}_{proc}.png"
        plot_samples(samples, real[kind].to(torch.float32), kind, proc, out / name)
        figs.append(name)
    import platform
    md = ["# Learned networks: gDDIM and baselines on trained eps_R networks", "",
          L.__doc__.split("\n\n", 2)[2].strip(), "",
          f"Run: `python -m validation.learned{' --quick' if quick else ''}` ({seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU "
          f"on this 2-core machine shared with other jobs; (data, process) pairs measured: {done}, "
          f"{torch.get_num_threads()} torch threads, CPU: {platform.processor() or platform.machine()}; no GPU was "
          "available to this task). State in float64, networks in float32.", "",
          f"Digit classifier: held-out accuracy {clf_meta['held_out_accuracy']:.4f} (360 test digits, "
          f"{clf_meta['train_seconds']} s to train).", "",
          "Noise floors (real vs real, same sample size): " + ", ".join(
              f"{k}: {v[0]:.3g} (TV {v[1]:.3f})" for k, v in floors.items()) + ".", "",
          "## Training (CPU, this machine, single thread, shared with other jobs)", "",
          "| data | process | parameters | steps x batch | seconds | final loss (eps_R) |", "|---|---|---|---|---|---|"]
    for (kind, name), m in train.items():
        md.append(f"| {kind} | {name} | {m['params']} | {m['steps']} x {m['batch']} | {m['train_seconds']} | {m['final_loss']} |")
    for kind, title in (("digits", "Digits 8 x 8: FD in classifier features (lower is better)"),
                        ("rings", "Rings 2-D: component Frechet distance (lower is better)")):
        md += ["", f"## {title}", "",
               "In the shape of the paper's Table 3. RK45: value (actual NFE) of the tolerance whose NFE is nearest "
               "the column within [0.7, 1.5] x; 'needs > n': its cheapest run took more. gDDIM-SDE: stochastic "
               "gDDIM, order 1, lam = 1. K=L: CLD only (see above).", "", table(rows, nfes, kind)]
    md += ["", "## The paper's claims with learned networks", "", claims(rows, floors, nfes), "",
           "## Figures", "", "![error vs NFE](error_vs_nfe.png)", ""] + [f"![{f}]({f})" for f in figs]
    md += ["", "Mode coverage (TV of predicted-class / mode histograms) is the `tv` column of results.csv."]
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "training.json").write_text(json.dumps({f"{k}/{n}": m for (k, n), m in train.items()}, indent=1,
                                                  sort_keys=True) + "\n")
