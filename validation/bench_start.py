"""The start skip (derive/_start.py) on a process without peers: our own samplers from T vs from t_s.

    python -m validation.bench_start [SPEC]       # default cld; prints, writes nothing (~16 min here on CLD)

Rings (2-D, 200 samples, seed 0), prior u_T = R_T z; the exact flow (dopri5 at 1e-9) from u_T is the
reference (the state at t_min for the [state] form, E[x_0 | u_t_min] otherwise). Per NFE 5 / 10 / 20 the best
endpoint error over forms x0[state], x0, eps, x0+pc, x0+pc[correct], orders 2-3, variables t / rho and grids
quadratic / logsnr, from T and from rho_s = 60, 25, 10 (the state at t_s: R_ts R_T^-1 u_T); and the skip floor
(the exact flow from the skipped state against the exact flow from u_T). Output of the committed run:
validation/results/start_cld.txt.
"""
import math
import tempfile
from pathlib import Path
import torch
import gddim_runtime as gr
import derive
from derive import _start
from validation.bench import Tables, rings, denoise
from validation.exact import DenseModel, MixtureScore, TableModel


def main(name="cld"):
    NS = 200
    tabs = Tables(name); deriv = tabs.deriv
    means, stds = rings(); mix = MixtureScore(means, stds)
    t_ref = tabs.table(1, order=1)
    k = deriv.k
    z = torch.randn((NS, k, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u_T = gr.block_apply(t_ref.tensors["R"][0], z, t_ref.basis)
    dense = tabs.dense_coeffs()
    ref = gr.sample(DenseModel(mix, dense), t_ref, x_T=u_T, sampler="probability_flow_rk45", dense=dense, rtol=1e-9, atol=1e-9,
                    dtype=torch.float64, denoise=False)
    refx0 = denoise(t_ref, ref, TableModel(mix, t_ref)(ref, t_ref.tensors["t"][-1:].expand(NS)))[:, 0]
    d = derive.derive(name)
    def err(x, r): return float((x - r).reshape(NS, -1).norm(dim=1).mean() / math.sqrt(2))
    forms = {"x0[state]": ("gddim_x0", {}, False, 0), "x0": ("gddim_x0", {}, True, -1), "eps": ("gddim", {}, True, -1),
             "x0+pc": ("gddim_x0_pc", {}, True, -1), "x0+pc[correct]": ("gddim_x0_pc", {"last": "correct"}, True, -1)}
    cache = {}
    def table(grid, steps, q, v):
        key = (grid, steps, q, v)
        if key not in cache:
            times = _start.make_grid(grid, steps, deriv)
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "g.txt"; p.write_text(" ".join(map(repr, times)))
                cache[key] = d.table(nfe=steps + 1, order=q, grid=str(p), variable=v, form="x0", corrector=True, verify="none").to_runtime()
        return cache[key]
    floor = {}
    for rs in (60, 25, 10):
        t_s = _start.start_time(deriv, rs)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "g.txt"; p.write_text(f"{t_s!r} {float(t_ref.tensors['t'][-1])!r}")
            tb = d.table(nfe=2, order=1, grid=str(p), verify="none").to_runtime()
        u = gr.sample(DenseModel(mix, dense), tb, x_T=gr.block_apply(torch.from_numpy(_start.skip_map(deriv, t_s)), u_T, tb.basis),
                      sampler="probability_flow_rk45", dense=dense, rtol=1e-9, atol=1e-9, dtype=torch.float64, denoise=False)
        floor[rs] = (t_s, err(u[:, 0], ref[:, 0]))
    print(name, "skip floors (rho_s: t_s, err)", floor, flush=True)
    for nfe in (5, 10, 20):
        best = {}
        for base in ("quadratic", "logsnr"):
            for st in ("", "@60", "@25", "@10"):
                for f, (sampler, kw, den, ds) in forms.items():
                    for q in (2, 3):
                        for v in ("t", "rho"):
                            tab = table(base + st, nfe + ds, q, v)
                            xs = gr.block_apply(torch.from_numpy(_start.skip_map(deriv, float(tab.tensors["t"][0]))), u_T, tab.basis) if st else u_T
                            try:
                                u = gr.sample(TableModel(mix, tab), tab, x_T=xs, sampler=sampler, dtype=torch.float64, denoise=den, **kw)
                            except Exception:                   # a combination the sampler refuses
                                continue
                            e = err(u[:, 0], refx0 if den else ref[:, 0])
                            key = st or "T"
                            if not math.isfinite(e): continue
                            if key not in best or e < best[key][0]: best[key] = (e, f"{f} {v} q{q} {base}{st}")
        print(f"{name} NFE {nfe}: " + "; ".join(f"{k}: {v[0]:.3e} ({v[1]})" for k, v in best.items()), flush=True)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m validation.bench_start", description=__doc__.split("\n")[0])
    builtin = sorted(f.stem for f in (Path(derive.__file__).parent / "sdes").glob("*.yaml"))
    p.add_argument("spec", nargs="?", default="cld", choices=builtin, help="a built-in spec (default: %(default)s)")
    main(p.parse_args().spec)
