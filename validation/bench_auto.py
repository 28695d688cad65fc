"""Measure ``--grid auto`` against every other grid and order on exact-score data (issue 12 item 4).

    python -m validation.bench_auto [--setups vp cld bdm] [--nfe 5 10 20] [--out validation/results/auto.md]
    python -m validation.bench_auto --default [--setups ...]   # derive._autogrid.recommend vs every
        configuration offered (validation/results/auto_default.md); --floor: the recommendation, the
        paper default, the exact flow and EM at 1000 (CLD at NFE 10-30); --auto-only: the auto-grid rows
        alone (after a change to the auto grid; render with --from-csv OLD NEW)

Setups: vp, cld, psld on the 2-D rings; bdm, bdm8 on the 4-mode image mixtures; vp64: VP on the 64-D
mixture of validation.peers (unequal weights: the CFD and its floor use them); vpimg: VP on the 4-mode
3 x 16 x 16 image mixture (pixel space, as in validation.peers).

Data, prior noise, reference and metrics as ``validation.bench`` (its data builders: the 2-D
rings for VP and CLD, the 4-mode image mixture for BDM in its DCT basis; exact mixture score,
validation.exact): endpoint error = mean |x - x_ref| / sqrt(dim) against an adaptive dopri5
probability-flow solution from the same noise (rtol = atol = 1e-8) followed by the same final
denoising step; CFD = component Frechet distance with its two-sample noise floor. Sampler:
deterministic gDDIM (eps form, polynomial in t), orders 1-4, NFE - 1 steps + the final
denoising evaluation. Grids: derive's times (``derive._grids.make_grid``: auto designed for the
table's order, uniform, quadratic, power:3, logsnr, edm); weights from the grid times by
``gddim_runtime.table_from_dense`` (float64, within 1e-12 of derive's tables; README "Any NFE at
run time"), so only the grid and the order differ between rows.
"""

import argparse
import csv
import functools
import math
import time
from pathlib import Path

import torch

import gddim_runtime as gr
from derive import _grids

from . import bench
from .calibrate import SAMPLERS as VARIANT_SAMPLERS
from .calibrate import SCORES, evaluate, pick, prior_draws, reference
from .exact import DenseModel, MixtureScore, TableModel
from .peers import draw, mixture64

ROOT = Path(__file__).resolve().parents[1]
NFES = (5, 10, 20)
ORDERS = (1, 2, 3, 4)
GRIDS = ("auto", "uniform", "quadratic", "power:3", "logsnr", "edm")
REF_TOL = 1e-8
# setup -> (spec, data builder: (means, stds[, weights]), samples, dct basis size)
SETUPS = {"vp": ("vp_linear", bench.rings, 1000, None), "cld": ("cld", bench.rings, 1000, None),
          "psld": ("psld", bench.rings, 1000, None),
          "bdm": ("bdm", lambda: bench.images(16), 64, (16, 16)), "bdm8": ("bdm", lambda: bench.images(8), 64, (8, 8)),
          "vp64": ("vp_linear", lambda: mixture64(), 1000, None),
          "vpimg": ("vp_linear", lambda: bench.images(16), 64, None)}


class Data:
    """An exact-score mixture: means [C, *shape], stds [C], weights [C] or None (equal)."""

    def __init__(self, means, stds, weights=None):
        self.means, self.stds, self.weights = means, stds, weights
        self.shape = tuple(means.shape[1:])
        dim = math.prod(self.shape)
        self.label = ("rings" if self.shape == (2,) else "images " + "x".join(map(str, self.shape))
                      if len(self.shape) == 3 else f"mixture {dim}-D")

    def cfd(self, x):
        return bench.component_fd(x, self.means, self.stds, self.weights)[0]

    def floor(self, batch):
        """The CFD of ``batch`` exact samples (seed 2): the two-sample noise floor."""
        gen = torch.Generator().manual_seed(2)
        if self.weights is None:
            return self.cfd(bench.exact_samples(self.means, self.stds, batch, gen))
        return self.cfd(draw(self.means, self.stds, self.weights, batch, gen))

    def score(self, basis):
        return MixtureScore(self.means, self.stds, self.weights, basis=basis)


def run(setup, nfes, rows, log, grids=GRIDS, orders=ORDERS, batch=None, cache=None):
    start = time.perf_counter()
    st = Setup(setup, batch)
    data, batch, spec_name, dense, basis = st.data, st.batch, st.spec_name, st.dense, st.basis
    path = None if cache is None else Path(cache) / f"bench_auto_ref_{setup}_{batch}.pt"
    if path is not None and path.is_file():                 # the reference of an earlier run (same noise)
        ref, ref_nfe = torch.load(path), "cached"
    else:
        ref, ref_nfe = st.reference()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ref, path)
    floor = data.floor(batch)
    label = data.label
    log(f"{setup} ({label}, {batch} samples): reference dopri5 NFE {ref_nfe}, "
        f"{time.perf_counter() - start:.0f} s; CFD floor {floor:.2e}")
    tabs, mix, x_T, dim = st.tabs, st.mix, st.x_T, st.dim
    for nfe in nfes:
        for grid in grids:
            for q in orders:
                if nfe - 1 < 1:
                    continue
                t0 = time.perf_counter()
                times = _grids.make_grid(_grids.parse_kind(grid), nfe - 1, tabs.deriv, order=q)
                tgrid = time.perf_counter() - t0
                tab = gr.table_from_dense(dense, order=q, grid=times, basis=basis)
                u, inf = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler="gddim", dtype=torch.float64,
                                   return_info=True)
                x = u[:, 0]
                err = float((x - ref[:, 0]).reshape(batch, -1).norm(dim=1).mean() / math.sqrt(dim))
                cfd = data.cfd(x)
                rows.append({"setup": setup, "process": spec_name, "data": label, "nfe": nfe, "calls": inf["nfe"],
                             "grid": grid, "order": q, "endpoint_error": err, "cfd": cfd, "cfd_floor": floor,
                             "grid_seconds": tgrid})
            log(f"  NFE {nfe} {grid}: " + ", ".join(f"q{r['order']} {r['endpoint_error']:.3e}/{r['cfd']:.1e}"
                                                    for r in rows[-len(orders):]))


def summary(rows):
    """Per setup and NFE: auto (best order, and order 3) vs the best other grid x order, both metrics."""
    out = ["| data (process) | NFE | metric | auto, best order | auto q3 | best other (grid, order) | "
           "quadratic q3 (default) | auto best / best other | CFD floor |",
           "|---|---|---|---|---|---|---|---|---|"]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        for nfe in sorted({r["nfe"] for r in rows if r["setup"] == setup}):
            sel = [r for r in rows if (r["setup"], r["nfe"]) == (setup, nfe)]
            for metric, name in (("endpoint_error", "endpoint"), ("cfd", "CFD")):
                auto = [r for r in sel if r["grid"] == "auto"]
                other = [r for r in sel if r["grid"] != "auto"]
                if not auto or not other:
                    continue
                a = min(auto, key=lambda r: r[metric])
                a3 = [r for r in auto if r["order"] == 3]
                b = min(other, key=lambda r: r[metric])
                d3 = [r for r in sel if (r["grid"], r["order"]) == ("quadratic", 3)]
                cell = lambda rs: f"{rs[0][metric]:.2e}" if rs else "-"
                out.append(f"| {sel[0]['data']} ({sel[0]['process']}) | {nfe} | {name} | {a[metric]:.2e} (q{a['order']}) | "
                           f"{cell(a3)} | {b[metric]:.2e} ({b['grid']} q{b['order']}) | {cell(d3)} | "
                           f"{a[metric] / b[metric]:.2f} | {sel[0]['cfd_floor']:.1e} |")
    return "\n".join(out)


def full_table(rows, setup):
    sel = [r for r in rows if r["setup"] == setup]
    nfes = sorted({r["nfe"] for r in sel})
    out = [f"### {sel[0]['process']} ({sel[0]['data']}), endpoint error / CFD", "",
           "| grid | order | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for grid in dict.fromkeys(r["grid"] for r in sel):
        for q in sorted({r["order"] for r in sel}):
            cells = []
            for n in nfes:
                hit = [r for r in sel if (r["grid"], r["order"], r["nfe"]) == (grid, q, n)]
                cells.append(f"{hit[0]['endpoint_error']:.2e} / {hit[0]['cfd']:.1e}" if hit else "")
            out.append(f"| {grid} | {q} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def read_csv(paths):
    """Rows of earlier runs; a (setup, NFE, grid, order) row of a later file replaces an earlier one."""
    rows = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                for key in ("nfe", "calls", "order"):
                    r[key] = int(r[key])
                for key in ("endpoint_error", "cfd", "cfd_floor", "grid_seconds"):
                    r[key] = float(r[key])
                rows[(r["setup"], r["nfe"], r["grid"], r["order"])] = r
    return list(rows.values())


def markdown(rows, command, seconds=None):
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    batch = {s: SETUPS[s][2] for s in setups}
    return "\n".join([
        "# `--grid auto` vs every other grid and order (exact-score data)", "",
        __doc__.split("\n\n", 2)[2].strip(), "",
        f"Command: `{command}`" + (f" ({seconds:.0f} s)" if seconds else "") + "; samples per setup: "
        + ", ".join(f"{s} {batch[s]}" for s in setups) + " (fewer than validation.bench's 4000 / 128 to keep "
        "the run short on this shared 2-core machine; the CFD floor column is the two-sample noise at that size).", "",
        "## auto vs the best other configuration", "",
        "auto, best order: the best of auto's four orders; best other: the best of the 5 other grids x 4 orders "
        "(20 configurations) for that metric; ratio < 1: auto leads.", "",
        summary(rows), "",
        "## Every configuration", ""] + [full_table(rows, s) + "\n" for s in setups]) + "\n"


# ----- the recommended default (derive._autogrid.recommend) against every configuration offered -----

VARIANT_GRIDS = ("auto", "quadratic")        # every order x form x variable x corrector on these
OTHER_GRIDS = ("uniform", "power:3", "logsnr", "edm")   # eps form in t (the paper's rule), every order


def _score(x, ref, data, dim, batch):
    per = (x - ref[:, 0]).reshape(batch, -1).norm(dim=1) / math.sqrt(dim)
    return float(per.mean()), float(per.median()), data.cfd(x)


def _prior(t_ref, batch, data_shape, basis, seed):
    """bench.prior's x_T = R_T z with z from ``seed`` (seed 0: bench.prior itself)."""
    if seed == 0:
        return bench.prior(t_ref, batch, data_shape, basis)
    return prior_draws(t_ref, batch, data_shape, torch.Generator().manual_seed(seed))


class Setup:
    """One setup of SETUPS on ``batch`` samples (default: the setup's own) and prior-noise ``seed`` (0:
    bench.prior's): the data, the in-memory tables, the exact mixture score, the dense coefficients, the
    one-step reference table and x_T. ``derived`` (derive's full derivation, for ``Derived.table``) is
    built on first use: the grid-only benchmark (``run``) does not need it."""

    def __init__(self, name, batch=None, seed=0):
        self.spec_name, data_fn, n, basis_size = SETUPS[name]
        self.name, self.batch, self.seed = name, batch or n, seed
        self.data = Data(*data_fn())
        self.tabs = bench.Tables(self.spec_name, basis_size)
        self.basis = (self.tabs.spec.basis.kind, tuple(self.tabs.spec.basis.size))
        self.mix = self.data.score(self.basis)
        self.dense = self.tabs.dense_coeffs()
        self.t_ref = self.tabs.table(1, order=1)
        self.x_T = _prior(self.t_ref, self.batch, self.data.shape, self.basis, seed)
        self.dim = math.prod(self.data.shape)

    @functools.cached_property
    def derived(self):
        import derive
        return derive.derive(self.tabs.spec)

    def reference(self):
        """(the dopri5 reference endpoint from x_T with its final denoising, its NFE)."""
        return bench.reference_endpoint(self.mix, self.dense, self.t_ref, self.x_T, REF_TOL)


def run_default(setup, nfes, rows, log, batch=None, orders=ORDERS, variables=("t", "rho", "logsnr"), seed=0,
                auto_only=False):
    """Per NFE: the recommended configuration, and every configuration offered (the grids of
    VARIANT_GRIDS x orders x forms x variables x correctors, OTHER_GRIDS x orders in eps/t), all
    from the same prior noise against the same dopri5 reference. Rows carry rec = 1 for the
    recommendation (its configuration also appears among the offered ones). auto_only: the
    auto-grid rows alone (after a change to the auto grid; the other rows do not depend on it)."""
    from derive import _autogrid
    st = Setup(setup, batch, seed)
    spec_name, batch, data, tabs, d, basis, mix, dense, x_T, dim = (
        st.spec_name, st.batch, st.data, st.tabs, st.derived, st.basis, st.mix, st.dense, st.x_T, st.dim)
    start = time.perf_counter()
    ref, ref_nfe = st.reference()
    floor, ref_cfd, label = data.floor(batch), data.cfd(ref[:, 0]), data.label
    log(f"{setup} ({label}, {batch} samples): reference dopri5 NFE {ref_nfe}, {time.perf_counter() - start:.0f} s; "
        f"CFD floor {floor:.2e}, CFD of the reference (exact flow) {ref_cfd:.2e}")
    base = {"setup": setup, "process": spec_name, "data": label, "batch": batch, "seed": seed, "cfd_floor": floor,
            "ref_cfd": ref_cfd}
    for nfe in nfes:
        t0 = time.perf_counter()
        rec = _autogrid.recommend(d.derivation, nfe)
        t_rec = time.perf_counter() - t0
        log(f"  NFE {nfe}: recommended {rec['sampler']} q{rec['order']} {rec['variable']} on {rec['grid']} "
            f"({t_rec:.1f} s)")
        key_rec = ("auto", rec["order"], rec["form"], rec["variable"], rec["corrector"])
        out = []

        def add(grid, q, tab, sampler, variable):
            u, inf = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=sampler, dtype=torch.float64,
                               return_info=True)
            err, med, cfd = _score(u[:, 0], ref, data, dim, batch)
            form, corr = VARIANT_SAMPLERS[sampler]
            out.append({**base, "nfe": nfe, "calls": inf["nfe"], "grid": grid, "order": q, "form": form,
                        "variable": variable, "corrector": int(corr),
                        "rec": int((grid, q, form, variable, corr) == key_rec), "endpoint_error": err,
                        "endpoint_median": med, "cfd": cfd, "rec_seconds": t_rec})
        for grid in ("auto",) if auto_only else VARIANT_GRIDS:
            for q in orders:
                for variable in variables:
                    gname = f"auto:{q}" if grid == "auto" else grid
                    try:
                        tab = d.table(nfe=nfe, order=q, grid=gname, variable=variable, form="x0", corrector=True,
                                      verify="none").to_runtime()
                    except Exception as exc:                # a variable undefined for the process
                        log(f"    {grid} q{q} {variable}: skipped ({exc})")
                        continue
                    for sampler in VARIANT_SAMPLERS:
                        add(grid, q, tab, sampler, variable)
            log(f"    {grid}: " + ", ".join(f"q{r['order']}{r['form']}{'+pc' if r['corrector'] else ''}/{r['variable']} "
                                          f"{r['endpoint_error']:.2e}" for r in out if r["grid"] == grid
                                          and r["endpoint_error"] < 2 * min(x["endpoint_error"] for x in out)))
        if not any(r["rec"] for r in out):                  # an order outside ``orders``
            tab = d.table(nfe=nfe, order=rec["order"], grid=rec["grid"], variable=rec["variable"], form="x0",
                          corrector=True, verify="none").to_runtime()
            add("auto", rec["order"], tab, rec["sampler"], rec["variable"])
        for grid in () if auto_only else OTHER_GRIDS:
            for q in orders:
                times = _grids.make_grid(_grids.parse_kind(grid), nfe - 1, tabs.deriv, order=q)
                add(grid, q, gr.table_from_dense(dense, order=q, grid=times, basis=basis), "gddim", "t")
        r = [x for x in out if x["rec"]][0]
        b = min(out, key=lambda x: x["endpoint_error"])
        log(f"    recommended {r['endpoint_error']:.3e} / {r['cfd']:.2e}; best offered {b['endpoint_error']:.3e} "
            f"({_config(b)})")
        rows.extend(out)


def _config(r):
    return (f"{r['grid']} q{r['order']} {r['form']}{'+pc' if int(r['corrector']) else ''}/{r['variable']}")


def default_summary(rows):
    """Per setup, NFE and metric: the recommendation vs the best configuration offered."""
    out = ["| data (process), samples | NFE | metric | recommended (config) | best offered (config) | "
           "ratio | paper default: quadratic q3 eps/t | CFD floor / CFD of the exact flow |",
           "|---|---|---|---|---|---|---|---|"]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        for nfe in sorted({r["nfe"] for r in rows if r["setup"] == setup}):
            sel = [r for r in rows if (r["setup"], r["nfe"], r.get("seed", 0)) == (setup, nfe, 0)]
            rec = [r for r in sel if int(r["rec"])][0]
            paper = [r for r in sel if (r["grid"], r["order"], r["form"], r["variable"], int(r["corrector"]))
                     == ("quadratic", 3, "eps", "t", 0)]
            o, ratio = oracle(sel)
            out.append(f"| {rec['data']} ({rec['process']}), {rec['batch']} | {nfe} | max of mean endpoint and CFD ratios | "
                       f"{max(rec[m] / min(r[m] for r in sel) for m in ('endpoint_error', 'cfd')):.2f} | "
                       f"{ratio:.2f} ({_config(o)}: the best any single configuration achieves) | | | |")
            for metric, name in (("endpoint_error", "endpoint (mean)"), ("endpoint_median", "endpoint (median)"),
                                 ("cfd", "CFD")):
                b = min(sel, key=lambda r: r[metric])
                p = f"{paper[0][metric]:.2e}" if paper else "-"
                out.append(f"| {rec['data']} ({rec['process']}), {rec['batch']} | {nfe} | {name} | "
                           f"{rec[metric]:.2e} ({_config(rec)}) | {b[metric]:.2e} ({_config(b)}) | "
                           f"{rec[metric] / b[metric]:.2f} | {p} | {rec['cfd_floor']:.1e} / {rec['ref_cfd']:.1e} |")
    return "\n".join(out)


def mark_recommended(rows, log=print):
    """Set rec = 1 on the rows of the configuration derive._autogrid.recommend picks now (the rule
    may be newer than the run: every auto-grid configuration is in the rows, so it is looked up)."""
    from derive import _autogrid
    for setup in dict.fromkeys(r["setup"] for r in rows):
        spec_name, _, _, basis_size = SETUPS[setup]
        deriv = bench.Tables(spec_name, basis_size).deriv
        for nfe in sorted({r["nfe"] for r in rows if r["setup"] == setup}):
            rec = _autogrid.recommend(deriv, nfe)
            key = ("auto", rec["order"], rec["form"], rec["variable"], int(rec["corrector"]))
            hit = 0
            for r in rows:
                if (r["setup"], r["nfe"]) == (setup, nfe):
                    r["rec"] = int((r["grid"], r["order"], r["form"], r["variable"], int(r["corrector"])) == key)
                    hit += r["rec"]
            if not hit:
                log(f"{setup} NFE {nfe}: the recommended {key} was not run")


def oracle(sel, metrics=("endpoint_error", "cfd")):
    """The single configuration whose worst ratio to the per-metric best is smallest, and that ratio."""
    best = {m: min(r[m] for r in sel) for m in metrics}
    r = min(sel, key=lambda r: max(r[m] / best[m] for m in metrics))
    return r, max(r[m] / best[m] for m in metrics)


def heldout_summary(rows, metrics=(("endpoint_error", "endpoint (mean)"), ("cfd", "CFD"))):
    """Per setup, NFE and metric, for rows run on two prior-noise seeds: the recommendation's ratio to the
    best configuration selected after the fact on the same noise (in-sample, biased low: winner's curse)
    and to the configuration selected on the other seed, evaluated on this one (held out)."""
    key = lambda r: (r["grid"], r["order"], r["form"], r["variable"], int(r["corrector"]))
    out = ["| data (process) | NFE | metric | seed | recommended | best in-sample (config) | ratio | "
           "best held out: selected on the other seed (config) | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        for nfe in sorted({r["nfe"] for r in rows if r["setup"] == setup}):
            by_seed = {}
            for r in rows:
                if (r["setup"], r["nfe"]) == (setup, nfe):
                    by_seed.setdefault(r.get("seed", 0), {})[key(r)] = r
            if len(by_seed) != 2:
                continue
            seeds = sorted(by_seed)
            for metric, name in metrics:
                for s, other in (seeds, seeds[::-1]):
                    here, there = by_seed[s], by_seed[other]
                    common = [k for k in here if k in there]
                    rec = [here[k] for k in common if int(here[k]["rec"])][0]
                    best = min((here[k] for k in common), key=lambda r: r[metric])
                    pick = here[min(common, key=lambda k: there[k][metric])]
                    out.append(f"| {rec['data']} ({rec['process']}) | {nfe} | {name} | {s} | {rec[metric]:.2e} | "
                               f"{best[metric]:.2e} ({_config(best)}) | {rec[metric] / best[metric]:.2f} | "
                               f"{pick[metric]:.2e} ({_config(pick)}) | {rec[metric] / pick[metric]:.2f} |")
    return "\n".join(out)


def across_data(path, limit=1.2, metrics=(("endpoint_error",), ("endpoint_error", "cfd"))):
    """Can one configuration per (process, NFE), chosen without the data, be within ``limit`` of the best
    on every data set? From a peers CSV (validation.peers: our configurations on several VP data sets,
    the same noise for all): per NFE and metric set, the configuration whose worst ratio to the per-data-set
    best is smallest, that ratio, and how many configurations are within ``limit`` everywhere. Only
    configurations run on every data set and within their NFE (calls <= target) count."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["who"] == "gDDIM" and int(r["nfe"]) <= int(r["nfe_target"])]
    data = sorted({r["data"] for r in rows})
    out = [f"| NFE | metrics | configurations on all {len(data)} data sets | within {limit}x of the best on every "
           f"data set | the best single configuration: worst ratio (config) | its ratios ({', '.join(data)}) |",
           "|---|---|---|---|---|---|"]
    for nfe in sorted({int(r["nfe_target"]) for r in rows}):
        val = {}
        for r in rows:
            if int(r["nfe_target"]) == nfe:
                val.setdefault(r["config"], {})[r["data"]] = r
        val = {c: v for c, v in val.items() if len(v) == len(data)}
        for ms in metrics:
            best = {(d, m): min(float(v[d][m]) for v in val.values()) for d in data for m in ms}
            worst = {c: max(float(v[d][m]) / best[(d, m)] for d in data for m in ms) for c, v in val.items()}
            c = min(worst, key=lambda c: (worst[c], c))
            ratios = ", ".join("/".join(f"{float(val[c][d][m]) / best[(d, m)]:.2f}" for m in ms) for d in data)
            out.append(f"| {nfe} | {' + '.join('CFD' if m == 'cfd' else 'endpoint' for m in ms)} | {len(val)} | "
                       f"{sum(w <= limit for w in worst.values())} | {worst[c]:.2f} ({c}) | {ratios} |")
    return "\n".join(out)


def _key(r):
    return r["grid"], r["order"], r["form"], r["variable"], int(r["corrector"])


CAL_METRICS = ("endpoint_error", "cfd")


def held_out_best(sel, other, metrics=CAL_METRICS):
    """{metric: the seed-0 value of the configuration best on seed 1}, or None without seed-1 rows.
    sel, other: {configuration: row} of one (setup, NFE) on seed 0 and on seed 1."""
    common = [k for k in other if k in sel]
    return {m: sel[min(common, key=lambda k: other[k][m])][m] for m in metrics} if common else None


def calibrated_run(setup, nfes, rows, log, batch=256, seed=1):
    """validation.calibrate with the exact model on ``batch`` prior draws of ``seed`` (not the rows' noise;
    256: ``calibrate.choose``'s default):
    its pick under each score looked up in ``rows`` (a --default run on seed 0), as ratios to the best
    configuration offered there per metric -- in-sample (the best on seed 0 itself, a winner's-curse
    oracle) and, where ``rows`` hold a --seed 1 run, held out (the configuration best on seed 1's rows,
    scored on seed 0: the best a rule that does not see the scoring noise can claim) -- beside the
    recommendation's. Returns (markdown table rows, records {"setup", "nfe", "rule", "in", "held"}: the
    ratios per metric, "held" None without seed-1 rows)."""
    st = Setup(setup, batch, seed)
    d, x_T, model = st.derived, st.x_T, DenseModel(st.mix, st.dense)
    ref = reference(d, model, x_T)                          # the model's flow from x_T: one for every NFE
    out, records = [], []
    for nfe in nfes:
        sel = {_key(r): r for r in rows if (r["setup"], r["nfe"], r.get("seed", 0)) == (setup, nfe, 0)}
        other = {_key(r): r for r in rows if (r["setup"], r["nfe"], r.get("seed", 0)) == (setup, nfe, 1)}
        if not sel:
            log(f"{setup} NFE {nfe}: no --default rows to compare with")
            continue
        t0 = time.perf_counter()
        ev = evaluate(d, model, nfe, x_T, ref=ref)
        seconds = time.perf_counter() - t0
        best = {m: min(r[m] for r in sel.values()) for m in CAL_METRICS}
        held = held_out_best(sel, other)

        def cell(rule, r):
            rec = {"setup": setup, "nfe": nfe, "rule": rule, "in": {m: r[m] / best[m] for m in CAL_METRICS},
                   "held": held and {m: r[m] / held[m] for m in CAL_METRICS}}
            records.append(rec)
            text = " / ".join(f"{rec['in'][m]:.2f}" for m in CAL_METRICS)
            return text + (" [" + " / ".join(f"{rec['held'][m]:.2f}" for m in CAL_METRICS) + "]" if held else "")
        cells = [cell("recommended", [r for r in sel.values() if int(r["rec"])][0])]
        for score in SCORES:
            grid, q, variable, sampler = pick(ev, score)
            form, corr = VARIANT_SAMPLERS[sampler]
            r = sel[(grid, q, form, variable, int(corr))]
            cells.append(f"{_config(r)}: {cell(score, r)}")
        out.append(f"| {r['data']} ({r['process']}) | {nfe} | {' | '.join(cells)} | {seconds:.0f} |")
        log(out[-1])
    return out, records


def calibrated_counts(records, limit=1.2):
    """Per rule: at how many (setup, NFE) points its pick is within ``limit`` of the best, per metric,
    against the in-sample best (all points) and the held-out best (the points with seed-1 rows)."""
    lines = [f"| rule | endpoint within {limit}x: in-sample | CFD: in-sample | endpoint: held out | CFD: held out |",
             "|---|---|---|---|---|"]
    for rule in dict.fromkeys(r["rule"] for r in records):
        sel = [r for r in records if r["rule"] == rule]
        held = [r for r in sel if r["held"]]
        count = lambda rs, side, m: f"{sum(r[side][m] <= limit for r in rs)} of {len(rs)}"
        lines.append(f"| {rule} | {count(sel, 'in', 'endpoint_error')} | {count(sel, 'in', 'cfd')} | "
                     f"{count(held, 'held', 'endpoint_error')} | {count(held, 'held', 'cfd')} |")
    return "\n".join(lines)


CALIBRATED_HEADER = ["| data (process) | NFE | recommended (data-blind) | "
                     + " | ".join(f"calibrated, score {s}" for s in SCORES) + " | seconds |",
                     "|---|---|---|" + "---|" * len(SCORES) + "---|"]


def read_default_csv(paths):
    rows = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                r.setdefault("seed", "0")
                for key in ("nfe", "calls", "order", "corrector", "rec", "batch", "seed"):
                    r[key] = int(r[key])
                for key in ("endpoint_error", "endpoint_median", "cfd", "cfd_floor", "ref_cfd", "rec_seconds"):
                    r[key] = float(r[key])
                rows[(r["setup"], r["nfe"], r["seed"], r["grid"], r["order"], r["form"], r["variable"], r["corrector"])] = r
    return list(rows.values())


def floor_run(setup, nfes, batch, log):
    """The recommended default and the paper's default (quadratic q3 eps/t) at each NFE against the
    floor: the exact probability flow from the same noise (dopri5 + final denoising), Euler-Maruyama
    at 1000 steps (fresh noise, seed 3, as validation.bench) and two exact sample sets (CFD floor)."""
    from derive import _autogrid
    st = Setup(setup, batch)
    spec_name, batch, tabs, d, mix, x_T, dim = st.spec_name, st.batch, st.tabs, st.derived, st.mix, st.x_T, st.dim
    ref, _ = st.reference()
    cfd, floor = st.data.cfd, st.data.floor(batch)
    em_table = tabs.table(999, 1, weights=False)
    em = gr.sample(TableModel(mix, em_table), em_table, x_T=x_T,
                   sampler="euler_maruyama", dtype=torch.float64, generator=torch.Generator().manual_seed(3), lam=1.0)
    out = [f"{spec_name} ({batch} samples): CFD of the exact flow {cfd(ref[:, 0]):.2e}, EM at 1000 {cfd(em[:, 0]):.2e}, "
           f"two exact sample sets {floor:.2e}", "",
           "| NFE | configuration | endpoint error (mean / median) | CFD |", "|---|---|---|---|"]
    for nfe in nfes:
        rec = _autogrid.recommend(d.derivation, nfe)
        for label, kw, sampler in (
                (f"recommended: {rec['grid']} {rec['form']}{'+pc' if rec['corrector'] else ''}/{rec['variable']}",
                 rec["table"],
                 rec["sampler"]),
                ("paper default: quadratic q3 eps/t", dict(order=3, grid="quadratic"), "gddim")):
            tab = d.table(nfe=nfe, verify="none", **kw).to_runtime()
            u = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=sampler, dtype=torch.float64)
            per = (u[:, 0] - ref[:, 0]).reshape(batch, -1).norm(dim=1) / math.sqrt(dim)
            out.append(f"| {nfe} | {label} | {float(per.mean()):.2e} / {float(per.median()):.2e} | {cfd(u[:, 0]):.2e} |")
            log(out[-1])
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m validation.bench_auto", description=__doc__.split("\n")[0])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--grids", nargs="+", default=list(GRIDS))
    p.add_argument("--batch", type=int, default=None, help="samples per setup (default: per setup, see SETUPS)")
    p.add_argument("--csv", default=None, help="write every row to this CSV file")
    p.add_argument("--out", default=None, help="write the markdown report here (e.g. validation/results/auto.md)")
    p.add_argument("--cache", default=None, help="folder for the dopri5 references (reused by later runs)")
    p.add_argument("--from-csv", nargs="+", default=None, help="render the report from these CSV files, run nothing")
    p.add_argument("--default", action="store_true",
                   help="the recommended default (derive._autogrid.recommend) vs every configuration offered")
    p.add_argument("--orders", type=int, nargs="+", default=list(ORDERS), help="orders offered (--default)")
    p.add_argument("--variables", nargs="+", default=["t", "rho", "logsnr"], help="variables offered (--default)")
    p.add_argument("--auto-only", action="store_true",
                   help="--default: run the auto-grid rows alone (render later with --from-csv OLD NEW: "
                        "a later file's rows replace the earlier's)")
    p.add_argument("--floor", action="store_true", help="recommended vs paper default vs the exact flow and EM at 1000")
    p.add_argument("--seed", type=int, default=0, help="prior noise seed of a --default run (0: validation.bench's)")
    p.add_argument("--calibrated", action="store_true",
                   help="validation.calibrate's pick (exact model, --batch draws of seed 1, default 256 as "
                        "calibrate.choose) looked up in --from-csv's rows")
    p.add_argument("--across-data", default=None, metavar="PEERS_CSV",
                   help="from a validation.peers CSV: the best any single configuration does over all its data sets")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.across_data:
        text = across_data(args.across_data)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    if args.floor:
        text = "\n\n".join(floor_run(s, args.nfe, args.batch or 4000, lambda *a: print(*a, flush=True))
                             for s in args.setups)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    if args.calibrated:
        rows = read_default_csv(args.from_csv)
        mark_recommended(rows)
        lines, records = [], []
        for setup in args.setups:
            more, recs = calibrated_run(setup, args.nfe, rows, lambda *a: print(*a, flush=True),
                                       batch=args.batch or 256)
            lines += more
            records += recs
        text = "\n".join(CALIBRATED_HEADER + lines) + "\n\n" + calibrated_counts(records)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    if args.default:
        rows = read_default_csv(args.from_csv) if args.from_csv else []
        if args.from_csv:
            mark_recommended(rows)
        if not args.from_csv:
            for setup in args.setups:
                run_default(setup, args.nfe, rows, lambda *a: print(*a, flush=True), batch=args.batch,
                            orders=tuple(args.orders), variables=tuple(args.variables), seed=args.seed,
                            auto_only=args.auto_only)
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        text = default_summary(rows) if any(r.get("seed", 0) == 0 for r in rows) else ""
        if len({r.get("seed", 0) for r in rows}) > 1:
            text += "\n\n" + heldout_summary(rows)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    if args.from_csv:
        rows = read_csv(args.from_csv)
    else:
        rows = []
        for setup in args.setups:
            run(setup, args.nfe, rows, lambda *a: print(*a, flush=True), grids=args.grids, batch=args.batch,
                cache=args.cache)
    seconds = None if args.from_csv else time.perf_counter() - start
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    print(summary(rows))
    if args.out:
        Path(args.out).write_text(markdown(rows, "python -m validation.bench_auto", seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
