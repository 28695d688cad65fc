"""The data-prediction multistep sampler (tables derived with ``--form x0``; derive/MATH_x0.md).

With A = F + 1/2 G G^T Sigma^-1 (transition R_t R_s^-1) and s = -Sigma^-1 (u - D x0hat), the
probability flow is du/dt = A u - 1/2 G G^T Sigma^-1 D x0hat; the linear part is integrated
exactly and x0hat is extrapolated by the Lagrange polynomial of the table's variable:

    u_{i+1} = x0_psi[i] u_i + sum_j x0_weights_ms[i, j] x0hat_{i-j},   x0hat = D^-1 (u - R eps_R)

(x0hat is the full k-vector E[u_0 | u_t]; its first component estimates the data). For VP with
``--variable logsnr`` this is DPM-Solver++ (2M with the exact phi_2 weight; 3M the exact
quadratic). Same model calls as ``gddim``: one per step, plus the final denoising at t_min.

``gddim_x0(run)`` has the signature of the samplers in ``_samplers.SAMPLERS``; register it with
``SAMPLERS["gddim_x0"] = gddim_x0`` (imported from this module). Torch only; no host syncs in
the loop (grid indices are Python ints, coefficients cast once before it).
"""

import torch

from ._table import block_apply


def x0_conversion(plan):
    """(Cu, Co) float64 [N+1, P, k, k]: x0hat_i = Cu[i] u_i + Co[i] (slot content at i).

    Cu = D^-1, Co = -D^-1 R folded into whatever the evaluator stores (raw output or eps_R)."""
    T = plan.table.tensors
    D = T["data_to_state"]
    Dinv = torch.linalg.inv_ex(D, check_errors=False).inverse
    idx = torch.arange(D.shape[0], device=D.device)
    return Dinv, plan.fold(-(Dinv @ T["R"]), idx)


def gddim_x0(run):
    """Deterministic data-prediction multistep (exponential integrator in R_t R_s^-1, x0 extrapolated)."""
    plan, ev = run.plan, run.ev
    T = plan.table.tensors
    if "x0_weights_ms" not in T or "x0_psi" not in T:
        from ._samplers import SamplingError
        raise SamplingError(f"{plan.table.path}: no data-prediction weights; derive with --form x0")
    N = plan.N
    q = T["x0_weights_ms"].shape[1]
    basis = plan.basis
    slots = run.allocate(q + 2, run.u0)          # 0: state, 1: model output, 2..q+1: ring of x0hat
    Cu, Co = (plan.cast(c) for c in x0_conversion(plan))
    psi, X = plan.cast(T["x0_psi"]), plan.cast(T["x0_weights_ms"])
    u, out = slots[0], slots[1]
    ring = [slots[2 + m % q] for m in range(N)]
    for i in range(N):
        ev(u, i, out)
        ring[i].copy_(block_apply(Cu[i], u, basis)).add_(block_apply(Co[i], out, basis))
        new = block_apply(psi[i], u, basis)
        for j in range(min(q, i + 1)):
            new.add_(block_apply(X[i, j], ring[i - j], basis))
        u.copy_(new)
        run.notify(i, u)
    return u, None
