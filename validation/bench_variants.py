"""Measure the table variants on exact-score data: eps form vs data-prediction (x0) form, and the
variable of the multistep polynomial (t | rho | logsnr), at NFE 5, 10, 20 on VP, CLD and BDM.

    python -m validation.bench_variants [--procs vp_linear cld bdm] [--out validation/results/variants.md]

Same data, prior noise, reference and metrics as ``validation.bench`` (endpoint error against
an adaptive dopri5 probability-flow solution from the same noise followed by the same final
denoising step; component Frechet distance, CFD). Tables are built in memory through derive's
API (order 3, grids logsnr and quadratic); every sampler spends NFE - 1 steps plus the final
denoising evaluation. Samplers: ``gddim`` (eps form, weights in the table's variable),
``gddim_pc`` (its Adams-Moulton corrector, no extra call), ``gddim_x0`` and ``gddim_x0_pc``
(data-prediction form and its UniC-style corrector, gddim_runtime._variants).
"""

import argparse
import math
import time

import torch

import derive
import gddim_runtime as gr

from . import bench
from .exact import MixtureScore, TableModel

NFES = (5, 10, 20)
VARIABLES = ("t", "rho", "logsnr")
SAMPLERS = {"gddim": "eps", "gddim_pc": "eps+pc", "gddim_x0": "x0", "gddim_x0_pc": "x0+pc"}
def mixture64(dim=64, C=10, seed=7):
    """validation.peers' 64-D mixture: unequal weights (1..C), spreads 0.1-0.5, means ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn((C, dim), generator=g, dtype=torch.float64)
    w = torch.arange(1, C + 1, dtype=torch.float64)
    return means, torch.linspace(0.1, 0.5, C, dtype=torch.float64), w / w.sum()


# setup name -> (spec, data, batch, dct basis size)
SETUPS = {"vp_linear": ("vp_linear", bench.rings, 2000, None), "vp_linear64": ("vp_linear", mixture64, 1000, None),
          "cld": ("cld", bench.rings, 1000, None), "bdm": ("bdm", lambda: bench.images(16), 128, (16, 16)),
          "bdm8": ("bdm", lambda: bench.images(8), 128, (8, 8))}


def _draw(means, stds, weights, n, gen):
    idx = torch.multinomial(weights, n, replacement=True, generator=gen)
    noise = torch.randn((n,) + means.shape[1:], generator=gen, dtype=torch.float64)
    return means[idx] + stds[idx].view(-1, *[1] * (means.ndim - 1)) * noise


def run(name, grids, nfes, rows, log, ref_tol=1e-7, order=3, variables=VARIABLES):
    spec_name, data_fn, batch, basis_size = SETUPS[name]
    data = data_fn()
    means, stds = data[:2]
    weights = data[2] if len(data) > 2 else torch.full((len(stds),), 1 / len(stds), dtype=torch.float64)
    data_shape = tuple(means.shape[1:])
    tabs = bench.Tables(spec_name, basis_size)
    d = derive.derive(tabs.spec)
    basis = (tabs.spec.basis.kind, tuple(tabs.spec.basis.size))
    mix = MixtureScore(means, stds, weights, basis=basis)
    dense = tabs.dense_coeffs()
    t_ref = d.table(nfe=2, order=1, verify="none").to_runtime()
    x_T = bench.prior(t_ref, batch, data_shape, basis)
    start = time.perf_counter()
    ref, ref_nfe = bench.reference_endpoint(mix, dense, t_ref, x_T, ref_tol)
    cfd_floor = bench.component_fd(_draw(means, stds, weights, batch, torch.Generator().manual_seed(2)),
                                   means, stds, weights)[0]
    label = ("rings" if data_shape == (2,) else f"mixture {data_shape[0]}-D") if len(data_shape) == 1 \
        else "images " + "x".join(map(str, data_shape))
    log(f"{name} ({label}), order {order}: reference dopri5 rtol {ref_tol:g}, NFE {ref_nfe}, {time.perf_counter() - start:.0f} s; "
        f"CFD floor {cfd_floor:.2e}")
    dim = math.prod(data_shape)
    for grid in grids:
        for nfe in nfes:
            for variable in variables:
                start = time.perf_counter()
                tab = d.table(nfe=nfe, order=order, grid=grid, variable=variable, form="x0", corrector=True,
                              verify="none").to_runtime()
                built = time.perf_counter() - start
                for sampler in SAMPLERS:
                    u, inf = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=sampler, dtype=torch.float64,
                                       return_info=True)
                    x = u[:, 0]
                    err = float((x - ref[:, 0]).reshape(batch, -1).norm(dim=1).mean() / math.sqrt(dim))
                    cfd = bench.component_fd(x, means, stds, weights)[0]
                    rows.append({"process": spec_name, "data": label, "grid": grid, "nfe": nfe, "model_calls": inf["nfe"],
                                 "variable": variable, "form": SAMPLERS[sampler],
                                 "endpoint_error": err, "cfd": cfd, "cfd_floor": cfd_floor, "order": order})
                log(f"  {grid} NFE {nfe} {variable}: " + ", ".join(
                    f"{r['form']} {r['endpoint_error']:.3e} / {r['cfd']:.2e}" for r in rows[-len(SAMPLERS):])
                    + f"  (table {built:.0f} s)")


def markdown(rows, header):
    out = [header, ""]
    keys = []
    for r in rows:
        key = (r["process"], r["data"], r["grid"])
        if key not in keys:
            keys.append(key)
    for p, dname, grid in keys:
        sel = [r for r in rows if (r["process"], r["data"], r["grid"]) == (p, dname, grid)]
        nfes = sorted({r["nfe"] for r in sel})
        out += [f"### {p} ({dname}), grid {grid}, order {sel[0].get('order', 3)} (CFD floor {sel[0]['cfd_floor']:.1e})", "",
                "| form | variable | " + " | ".join(f"NFE {n}: endpoint / CFD" for n in nfes) + " |",
                "|---|---|" + "---|" * len(nfes)]
        for form in SAMPLERS.values():
            for variable in VARIABLES:
                cells = []
                for n in nfes:
                    hit = [r for r in sel if (r["form"], r["variable"], r["nfe"]) == (form, variable, n)]
                    cells.append(f"{hit[0]['endpoint_error']:.2e} / {hit[0]['cfd']:.1e}" if hit else "")
                if any(cells):
                    out.append(f"| {form} | {variable} | " + " | ".join(cells) + " |")
        best = []
        for n in nfes:
            at = [r for r in sel if r["nfe"] == n]
            b = min(at, key=lambda r: r["endpoint_error"])
            best.append(f"NFE {n}: {b['form']}/{b['variable']}")
        out += ["", "Best endpoint error: " + ", ".join(best) + ".", ""]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m validation.bench_variants", description=__doc__.split("\n")[0])
    p.add_argument("--procs", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--grids", nargs="+", default=["logsnr", "quadratic"])
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--variables", nargs="+", default=list(VARIABLES), choices=list(VARIABLES))
    p.add_argument("--out", default=None, help="append the markdown tables to this file")
    args = p.parse_args(argv)
    rows = []
    for name in args.procs:
        run(name, args.grids, args.nfe, rows, lambda *a: print(*a, flush=True), order=args.order,
            variables=args.variables)
    text = markdown(rows, f"## {', '.join(args.procs)}")
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
