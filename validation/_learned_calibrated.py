"""Calibrate with the learned networks (``python -m validation.learned --calibrated``).

Per (data, process, NFE): ``validation.calibrate.choose`` with the trained network itself (256 prior draws,
CPU generator seed 0) against the data-blind recommendation (``--order auto``) and the paper's table
(quadratic q3 eps/t), all three sampled from the same prior noise as validation.learned's table (seed 3).
Endpoint error: against the network's own probability flow from that noise (dopri5 at 1e-8, then the same
final denoising) -- the discretisation error, what the sampler choice controls; the metric (rings CFD,
digits classifier FD) and its TV as validation.learned, beside the network's exact flow (its model error)
and the data's noise floor.
"""

import math
import time

import torch

import derive
import gddim_runtime as gr

from . import learned as L
from ._learned_eval import DigitsMetric, RingsMetric, SAMPLE_N, prior
from .calibrate import choose, model_dtype_of, reference

CASES = tuple((kind, name) for kind, names in L.PROCESSES.items() for name in names)   # every committed network


def _rules(d, nfe, net, shape, device="cpu"):
    """label -> (table keyword arguments, sampler), and the seconds calibrate took."""
    from derive import _autogrid
    t0 = time.perf_counter()
    best, _ = choose(d, net, nfe, batch=256, data_shape=shape, generator=torch.Generator().manual_seed(0),
                     device=device)
    seconds = time.perf_counter() - t0
    rec = _autogrid.recommend(d.derivation, nfe)
    return {"calibrated": (best["table"], best["sampler"]),
            "recommended (data-blind)": (rec["table"], rec["sampler"]),
            "paper (quadratic q3 eps/t)": (dict(order=3, grid="quadratic"), "gddim")}, seconds


def run(nfes=(10, 20), cases=CASES, log=print, device="cpu"):
    """Markdown lines: one row per (case, NFE, rule); the networks, samplers and flows run on ``device`` (the
    prior draws come from a CPU generator, so they are the same on every device)."""
    metrics = {}                                        # built once per kind asked for (digits loads a classifier)
    lines = ["| data / process | NFE | rule | configuration | endpoint error | metric / TV | exact flow of the net | "
             "noise floor | calibrate (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, name in cases:
        proc, shape, n = L.Process(name), L.SHAPES[kind], SAMPLE_N[kind]
        net = L.network(kind, proc, log)[0].eval().to(device)     # the skip's coefficients move with it
        if kind not in metrics:
            metrics[kind] = RingsMetric() if kind == "rings" else DigitsMetric(log)
        d, x_T, metric = derive.derive(name), prior(proc, n, shape).to(device), metrics[kind]
        ref = reference(d, net, x_T)[:, 0]
        flow, floor = metric(ref.cpu()), metric.floor(n)
        for nfe in nfes:
            rules, seconds = _rules(d, nfe, net, shape, device)
            for label, (kw, sampler) in rules.items():
                tab = d.table(nfe=nfe, verify="none", **kw).to_runtime(device)
                x = gr.sample(net, tab, x_T=x_T, sampler=sampler, dtype=torch.float64,
                              model_dtype=model_dtype_of(net))[:, 0]
                err = float(((x - ref).reshape(n, -1).norm(dim=1) / math.sqrt(math.prod(shape))).mean())
                m, tv = metric(x.cpu())
                config = f"{kw['grid']} q{kw['order']} {kw.get('variable', 't')} {sampler}"
                lines.append(f"| {kind} / {name} | {nfe} | {label} | {config} | {err:.2e} | {m:.4g} / {tv:.3f} | "
                             f"{flow[0]:.4g} / {flow[1]:.3f} | {floor[0]:.3g} / {floor[1]:.3f} | {seconds:.0f} |")
                log(lines[-1])
    return lines
