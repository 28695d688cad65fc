"""The dense file (<name>_dense.safetensors) against the references, between the grid times.

The dense file holds F, G G^T, R, L and D as piecewise Chebyshev interpolants (derive/_codegen,
read by gddim_runtime/_dense.py); table_from_dense, the training helpers, the diffusers scheduler and
RK45 read coefficients from it at any t. Checked here where the interpolants are least constrained:
every panel's midpoint (between two Chebyshev nodes), per checked coordinate, against
ScipyReference (fast) or the 45-digit MpReference (full), through the runtime's own reader.
"""

import time

import mpmath
import numpy as np
import torch

from ._check import TOL_FAST, Report, _chol, _coord_value, _err, _err_mp, ggt, pick_coords
from ._reference import DPS, MpReference, ScipyReference

TOL_DENSE_FULL = 1e-12    # the interpolants are built to 1e-14 per panel (README "Any NFE at run time")


def check_dense(spec, tensors, meta, level="fast", n_coords=None):
    """A Report of the dense file's F, G G^T, R, L, D at panel midpoints against the reference."""
    from gddim_runtime import dense_from_tensors
    start = time.perf_counter()
    report = Report(f"{meta['spec']['name']} dense", level)
    if meta["spec"]["sha256"] != spec.sha256:
        report.add("spec hash", [(0, float("inf"), float("inf"))], "dense file built from another spec", 0.0)
        return report
    dense = dense_from_tensors(tensors, meta)
    edges = tensors["edges"]
    panels = list(range(len(edges) - 1))                                           # every panel: an edit anywhere
    mids = [float((edges[j] + edges[j + 1]) / 2) for j in panels]
    values = dense.at(torch.tensor(mids, dtype=torch.float64))                    # name -> [M, P, k, k]
    coords = pick_coords(dense.P, n_coords or (2 if level == "fast" else 4))
    report.coords = coords
    for p in coords:
        cv = _coord_value(spec, p)
        if level == "fast":
            ref = ScipyReference(spec, [float(edges[0])] + mids + [float(edges[-1])], cv)
            want = {"F": ref.F, "GGT": lambda t: ggt(ref.G(t)), "R": ref.R,
                    "L": lambda t: np.linalg.cholesky(ref.sigma(t)), "D": ref.data_to_state}
            rows = {n: [(j, *_err(values[n][m, p].numpy(), want[n](t))) for m, (j, t) in enumerate(zip(panels, mids))]
                    for n in want}
            how, tol = "scipy solve_ivp float64", TOL_FAST
        else:
            with mpmath.workdps(DPS):
                ref = MpReference(spec, cv)
                tm = [mpmath.mpf(t) for t in mids]
                ref.march(tm)
                want = {"F": ref.F, "GGT": lambda t: ggt(ref.G(t)), "R": ref.R,
                        "L": lambda t: _chol(ref.sigma(t)), "D": ref.data_to_state}
                rows = {n: [(j, *_err_mp(values[n][m, p].numpy(), want[n](t))) for m, (j, t) in enumerate(zip(panels, tm))]
                        for n in want}
            how, tol = f"mpmath Taylor/BS/GL, {DPS} digits", TOL_DENSE_FULL
        for n, errs in rows.items():
            report.add(f"dense {n} (panel midpoints)", errs, how, tol)
    report.seconds = time.perf_counter() - start
    return report
