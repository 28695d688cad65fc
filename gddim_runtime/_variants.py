"""The data-prediction multistep sampler (tables derived with ``--form x0``; derive/MATH_x0.md).

With A = F + 1/2 G G^T Sigma^-1 (transition R_t R_s^-1) and s = -Sigma^-1 (u - D x0hat), the
probability flow is du/dt = A u - 1/2 G G^T Sigma^-1 D x0hat; the linear part is integrated
exactly and x0hat is extrapolated by the Lagrange polynomial of the table's variable:

    u_{i+1} = x0_psi[i] u_i + sum_j x0_weights_ms[i, j] x0hat_{i-j},   x0hat = D^-1 (u - R eps_R)

(x0hat is the k-vector E[[x0; 0] | u_t]: the data's posterior mean, zeros in the auxiliary components). For VP with
``--variable logsnr`` this is DPM-Solver++ (2M with the exact phi_2 weight; 3M the exact
quadratic). Same model calls as ``gddim``: one per step, plus the final denoising at t_min.

``gddim_x0_pc``: the same predictor with a UniC-style corrector (tables derived with
``--form x0 --corrector``): the model is evaluated once per step, at the predicted state
u~_{i+1}; that output both corrects the step (Lagrange nodes t_{i+1}, t_i, ...,
``x0_corrector_weights``) and joins the history of the next predictor. No extra model call:
N + 1 evaluations for N steps, the last one (at t_N, predicted state, no correction) reused by
the final denoising step, exactly as ``gddim`` spends them.

Options (derive/MATH_x0.md section 5). ``last`` (gddim_x0_pc): "predict" (above), "correct" (the
output at t_N also corrects the last step, as UniPC's zero-length final step does; the denoising
applies it to the corrected state) or "none" (no call at t_N: N calls, for an ending on the state
at t_min, ``sample(..., denoise=False)``). ``predictor`` (both): "exact" or "flat"
(``x0_weights_flat``: the step's total weight spread flat in tau; UniPC's "bh2" UniP-2 for VP).
An ending on the state at t_min spends the final denoising's call on one more step instead: the
x0 form's last step already maps onto D_tmin x0hat (R_tmin R_s^-1 is small there).

Both have the signature of the samplers in ``_samplers.SAMPLERS``; register them with
``SAMPLERS.update(gddim_x0=gddim_x0, gddim_x0_pc=gddim_x0_pc)`` (imported from this module).
Torch only; no host syncs in the loop (grid indices are Python ints, coefficients cast once).
"""

import torch

from ._table import block_apply


def x0_conversion(plan):
    """(Cu, Co) float64 [N+1, P, k, k]: x0hat_i = Cu[i] u_i + Co[i] (slot content at i).

    Cu = D^-1, Co = -D^-1 R folded into whatever the evaluator stores (raw output or eps_R)."""
    tensors = plan.table.tensors
    D = tensors["data_to_state"]
    Dinv = torch.linalg.inv_ex(D, check_errors=False).inverse
    idx = torch.arange(D.shape[0], device=D.device)
    return Dinv, plan.fold(-(Dinv @ tensors["R"]), idx)


def _require_weights(plan, names, option):
    """SamplingError unless the table holds ``names`` (the data-prediction weights derive's ``option`` writes)."""
    tensors = plan.table.tensors
    if any(n not in tensors for n in names):
        from ._samplers import SamplingError
        raise SamplingError(f"{plan.table.path}: no data-prediction {'corrector ' if 'corr' in option else ''}"
                            f"weights; derive with {option}")


def _lin(M, parts, basis):
    """sum_m M[m] parts[m] (block products)."""
    out = block_apply(M[0], parts[0], basis)
    for m in range(1, len(parts)):
        out.add_(block_apply(M[m], parts[m], basis))
    return out


def _predictor(plan, predictor):
    """The predictor's weight tensor name: "exact" x0_weights_ms, "flat" x0_weights_flat."""
    names = {"exact": "x0_weights_ms", "flat": "x0_weights_flat"}
    if predictor not in names:
        from ._samplers import SamplingError
        raise SamplingError(f"predictor must be one of {', '.join(names)}, got {predictor!r}")
    return names[predictor]


def gddim_x0(run, predictor="exact"):
    """Deterministic data-prediction multistep (exponential integrator in R_t R_s^-1, x0 extrapolated).

    predictor: "exact" (the Lagrange polynomial integrated against the step's kernel) or "flat" (the
    step's total weight spread flat in tau: x0_weights_flat)."""
    plan, evaluate = run.plan, run.evaluate
    tensors = plan.table.tensors
    name = _predictor(plan, predictor)
    _require_weights(plan, (name, "x0_psi"), "--form x0")
    N = plan.N
    q = tensors[name].shape[1]
    basis = plan.basis
    slots = run.allocate(q + 2, run.u0)          # 0: state, 1: model output, 2..q+1: ring of x0hat
    Cu, Co = (plan.cast(c) for c in x0_conversion(plan))
    psi, X = plan.cast(tensors["x0_psi"]), plan.cast(tensors[name])
    u, out = slots[0], slots[1]
    ring = [slots[2 + m % q] for m in range(N)]
    for i in range(N):
        evaluate(u, i, out)
        ring[i].copy_(block_apply(Cu[i], u, basis)).add_(block_apply(Co[i], out, basis))
        new = block_apply(psi[i], u, basis)
        for j in range(min(q, i + 1)):
            new.add_(block_apply(X[i, j], ring[i - j], basis))
        u.copy_(new)
        run.notify(i, u)
    return u, None


def gddim_x0_pc(run, last="predict", predictor="exact"):
    """Data-prediction predictor-corrector (UniC-style: the corrector reuses the next step's model call).

    last: how the last step ends. "predict": the predicted state, its model output at t_N is the one
    the final denoising reuses (N + 1 calls); "correct": that output also corrects the last step and
    the final denoising applies it to the corrected state (N + 1 calls); "none": the predicted state,
    no model call at t_N (N calls: for an ending without the final denoising). predictor: as gddim_x0."""
    plan, evaluate = run.plan, run.evaluate
    tensors = plan.table.tensors
    name = _predictor(plan, predictor)
    if last not in ("predict", "correct", "none"):
        from ._samplers import SamplingError
        raise SamplingError(f"last must be one of predict, correct, none, got {last!r}")
    _require_weights(plan, (name, "x0_psi", "x0_corrector_weights"), "--form x0 --corrector")
    N = plan.N
    q = tensors[name].shape[1]
    S = q + 1                                     # ring: the corrector reaches one lag further
    basis = plan.basis
    slots = run.allocate(S + 3, run.u0)           # 0: state, 1: model output, 2: predicted state, 3..: ring
    Cu, Co = (plan.cast(c) for c in x0_conversion(plan))
    psi, X, Xc = (plan.cast(tensors[n]) for n in ("x0_psi", name, "x0_corrector_weights"))
    u, out, pred = slots[0], slots[1], slots[2]
    ring = [slots[3 + m % S] for m in range(N + 1)]
    evaluate(u, 0, out)
    ring[0].copy_(block_apply(Cu[0], u, basis)).add_(block_apply(Co[0], out, basis))
    for i in range(N):
        qi = min(q, i + 1)
        pred.copy_(_lin([psi[i]] + [X[i, j] for j in range(qi)], [u] + [ring[i - j] for j in range(qi)], basis))
        if i == N - 1 and last == "none":
            u.copy_(pred)
            run.notify(i, u)
            return u, None
        evaluate(pred, i + 1, out)
        ring[i + 1].copy_(block_apply(Cu[i + 1], pred, basis)).add_(block_apply(Co[i + 1], out, basis))
        if i < N - 1 or last == "correct":
            qc = min(q + 1, i + 2)
            u.copy_(_lin([psi[i]] + [Xc[i, j] for j in range(qc)], [u] + [ring[i + 1 - j] for j in range(qc)], basis))
        else:
            u.copy_(pred)                          # last step: the output at t_N belongs to this state
        run.notify(i, u)
    return u, out

