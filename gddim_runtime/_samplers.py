"""Samplers: one entry point ``sample``, one registry, one loop structure for every variant.

Everything a step needs is computed once per call, before the loop, in float64 and cast once to
the state dtype (``_Plan``): the model's time tensors, the score / eps conversions folded into
each step's weights, dt and sqrt(-dt) folded into the baselines' matrices. The state and the
model outputs live in one preallocated buffer [B, slots, k, *data] (coefficient space), and a
step is one fused linear map over a run of consecutive slots written in place into another slot
(``_Lin``: one batched matmul for k x k blocks, multiply-adds for scalar or per-frequency
coefficients). The current state alternates between the first and the last slot so that the
inputs of every step are one contiguous run. Grid indices are Python ints; nothing in the loop
asks the host for a value, so on a GPU the loop never waits (and can be captured as a graph).

A sampler is ``fn(run, **its options) -> (u, o)``: ``u`` the final state (a buffer slot) and
``o`` the slot holding the model output at t_N when the sampler already evaluated it (the shared
ending in ``sample`` then reuses it for the final denoising step) or None.
"""

import contextvars
import inspect
import math
import numbers
import sys
import warnings

import torch

from ._dct import dct2, idct2
from ._table import Table, block_apply

PARAMETRIZATIONS = ("eps_R", "eps_L", "score", "x0", "eps_L_v")


class SamplingError(ValueError):
    """Bad input to ``sample`` or a misbehaving model: one line saying what and where."""


class NonFiniteError(SamplingError):
    """A model output went NaN/inf during the run (with an exact model: the state overflowed)."""


PROBED_SAMPLERS = ("euler_maruyama", "heun")     # explicit steps: probed on Gaussian data before the first run
_PROBING = contextvars.ContextVar("gddim_probing", default=False)   # inside gaussian_probe's own sample() call


def _tri_inv(L):
    """L^-1 for lower-triangular L [..., k, k] by a triangular solve (no inverse, no host sync)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def _conversion(parametrization, R, L, D):
    """(A, B) with eps_R = A u + B out, float64 [..., k, k] (None for a zero A / identity B).

    eps_L: eps_R = R^T L^-T eps_L.  score: eps_R = -R^T s.  x0: eps_R = R^-1 (u - D x0).
    eps_L_v (CLD-SGM style, only the last component of eps_L): L^-T is upper triangular, so
    s_v = -eps_v / L_vv exactly; the other score components are unknown and set to 0, which
    leaves G G^T s (the probability-flow / SDE drift) exact when G acts on the last component.
    B has k_out columns (1 for eps_L_v).
    """
    if parametrization == "eps_R":
        return None, None
    Rt = R.transpose(-1, -2)
    if parametrization == "eps_L":
        return None, Rt @ _tri_inv(L).transpose(-1, -2)
    if parametrization == "score":
        return None, -Rt
    if parametrization == "x0":
        Rinv = torch.linalg.inv_ex(R, check_errors=False).inverse
        return Rinv, -Rinv @ _data_column(D)
    if parametrization == "eps_L_v":
        k = R.shape[-1]
        return None, Rt[..., :, k - 1:] / L[..., k - 1:, k - 1:]
    raise SamplingError(f"unknown parametrization {parametrization!r}; choose from {', '.join(PARAMETRIZATIONS)}")


def _data_column(D):
    """D with its auxiliary columns zeroed: an x0 output is E[[x0; 0] | u], so whatever a model puts in the
    auxiliary components (CLD's v) is ignored rather than moving the samples (0.52 per unit, sweep 7)."""
    out = torch.zeros_like(D)
    out[..., :1] = D[..., :1]
    return out


def _score_conversion(parametrization, R, L, D):
    """(Sx, So) with the score s = Sx u + So out, float64 (Sx None when zero), from triangular
    solves with the Cholesky factor L (Sigma^-1 = L^-T L^-1, R^-T = Sigma^-1 R): no inverse."""
    k = R.shape[-1]
    Linv = _tri_inv(L)
    LinvT = Linv.transpose(-1, -2)
    if parametrization == "eps_R":
        return None, -(LinvT @ (Linv @ R))
    if parametrization == "eps_L":
        return None, -LinvT
    if parametrization == "score":
        return None, torch.eye(k, dtype=R.dtype, device=R.device).expand_as(R)
    if parametrization == "x0":
        Sinv = LinvT @ Linv
        return -Sinv, Sinv @ _data_column(D)
    if parametrization == "eps_L_v":
        So = torch.zeros(R.shape[:-1] + (1,), dtype=R.dtype, device=R.device)
        So[..., k - 1, 0] = -1 / L[..., k - 1, k - 1]
        return None, So
    raise SamplingError(f"unknown parametrization {parametrization!r}")


def _pad(M, k):
    """[..., k, k_out] -> [..., k, k]: model outputs with k_out < k sit in the last components of a slot."""
    if M is None or M.shape[-1] == k:
        return M
    out = torch.zeros(M.shape[:-1] + (k,), dtype=M.dtype, device=M.device)
    out[..., k - M.shape[-1]:] = M
    return out


class _Plan:
    """Per call: the table's coefficients in float64 on its device, the model's time tensors, the
    conversions, the step's NaN flags. Built without a single host synchronisation."""

    def __init__(self, table, dtype, parametrization, batch, data_shape, model_dtype):
        tensors = table.tensors
        self.table, self.dtype, self.basis, self.parametrization = table, dtype, table.basis, parametrization
        self.batch, self.data_shape, self.model_dtype = batch, tuple(data_shape), model_dtype
        self.N, self.q, self.k, self.P = table.steps, table.order, table.k, table.P
        self.k_out = 1 if parametrization == "eps_L_v" else self.k
        self.dct = self.basis[0] == "dct2d"
        self.t = tensors["t"]
        self.device = self.t.device
        t_model = self.t.to(model_dtype or dtype).unsqueeze(1).expand(self.N + 1, batch)
        self.t_model = t_model.unbind(0)                                       # views, one per grid time
        self.ok = torch.ones(self.N + 2, dtype=torch.bool, device=self.device)  # per grid time; last: u_T
        self.ok_at = self.ok.unbind(0)
        A, B = _conversion(parametrization, tensors["R"], tensors["L"], tensors["data_to_state"])
        self.A = A                                                            # float64 [N+1, P, k, k] or None
        self.B = _pad(B, self.k)
        # raw slots hold the model output itself (converted into each weight); with A (x0) they hold eps_R
        self.raw = A is None

    def cast(self, x):
        return x.to(self.dtype)

    def fold(self, W, index):
        """Weights that act on eps_R at grid ``index`` [...], made to act on a slot's content."""
        if not self.raw or self.B is None:
            return W
        return W @ self.B[index]

    def to_data(self, u):
        return idct2(u) if self.dct else u

    def to_coef(self, x):
        return dct2(x) if self.dct else x


class _Evaluator:
    """Calls the model at grid index i, checks the shape, flags NaN on the device, counts NFE and
    writes the output (coefficient space) into a buffer slot: raw, or as eps_R when the
    parametrisation has a state term (x0)."""

    def __init__(self, model, plan):
        self.model, self.plan = model, plan
        self.nfe = 0
        self.expected = (plan.batch, plan.k_out) + plan.data_shape
        self.offset = plan.k - plan.k_out
        if not plan.raw:
            self.A = [plan.cast(a) for a in plan.A]
            self.Bc = plan.cast(plan.B)

    def output(self, u, t, where):
        plan = self.plan
        x = plan.to_data(u)
        given = x if plan.model_dtype is None else x.to(plan.model_dtype)
        version = given._version
        out = self.model(given, t)
        if given._version != version and given.data_ptr() == x.data_ptr():   # host metadata: no sync
            raise SamplingError(f"the model modified its input in place at {where()} (it is a view of the sampler's "
                                "state, which it corrupted): work on a copy, e.g. x = x.clone() or x * 0.5 for x.mul_(0.5)")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != self.expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SamplingError(f"model returned {got} at {where()}, expected {self.expected}")
        if not out.is_floating_point():                 # complex: its imaginary part would be dropped by the copy
            raise SamplingError(f"model returned a {out.dtype} tensor at {where()}; expected real floating point")
        self.nfe += 1
        return out

    def __call__(self, u, i, slot):
        plan = self.plan
        out = self.output(u, plan.t_model[i], lambda: f"step {i} (t = {float(plan.t[i]):.6g})")
        plan.ok_at[i].logical_and_(torch.isfinite(out).all())     # checked after the loop (a sum overflowed float16)
        o = plan.to_coef(out.to(plan.dtype)) if plan.dct else out
        if plan.raw:
            (slot[:, self.offset:] if self.offset else slot).copy_(o)
        else:
            slot.copy_(block_apply(self.A[i], u, plan.basis) + block_apply(self.Bc[i], o.to(plan.dtype), plan.basis))


class _Lin:
    """out_i = sum_s W[i, s] X_s over a run of consecutive buffer slots, written in place.

    W float64 [N, S, P, k, k]; ``first[i]`` the run's first slot and ``out[i]`` the output slot
    of step i. P = 1, k > 1: one batched matmul [k, S k] x [S k, n] per step; k = 1 (scalar or
    per-frequency): multiply-adds; P > 1, k > 1: per-frequency block products. With ``add``
    the result is added to the output slot instead.
    """

    def __init__(self, W, run, first, out, add=False):
        plan, buf = run.plan, run.buf
        N, S, P, k, _ = W.shape
        B = buf.shape[0]
        W = plan.cast(W)
        self.add = add
        self.steps = []
        if P == 1 and k > 1:
            self.mode = "bmm"
            flat = W[:, :, 0].permute(0, 2, 1, 3).reshape(N, k, S * k)     # row a, column (slot, component)
            mats = flat.unsqueeze(1).expand(N, B, k, S * k).unbind(0)
            flat_buf = buf.view(B, buf.shape[1] * k, -1)
            runs = {f: flat_buf[:, f * k:(f + S) * k] for f in set(first)}  # two layouts: views made once
            outs = {o: flat_buf[:, o * k:(o + 1) * k] for o in set(out)}
            self.steps = [(mats[i], runs[first[i]], outs[out[i]]) for i in range(N)]
        else:
            self.mode = "scalar" if k == 1 else "blocks"
            if P > 1:
                H, Wd = plan.basis[1]
                W = W.reshape(N, S, H, Wd, k, k)
            else:
                W = W[:, :, 0]
            runs = {f: run.slots[f:f + S] for f in set(first)}
            if k == 1:
                coef = [row.unbind(0) for row in W[..., 0, 0].unbind(0)]     # one unbind per step, not per slot
                self.steps = [(coef[i], runs[first[i]], run.slots[out[i]]) for i in range(N)]
            else:
                for i in range(N):
                    self.steps.append(([[[W[i, s, ..., a, b] for b in range(k)] for a in range(k)] for s in range(S)],
                                       runs[first[i]], run.slots[out[i]]))

    def __call__(self, i):
        if self.mode == "bmm":
            M, X, out = self.steps[i]
            if self.add:
                out.baddbmm_(M, X)
            else:
                torch.bmm(M, X, out=out)
        elif self.mode == "scalar":
            c, xs, out = self.steps[i]
            if self.add:
                out.addcmul_(xs[0], c[0])
            else:
                torch.mul(xs[0], c[0], out=out)
            for s in range(1, len(xs)):
                out.addcmul_(xs[s], c[s])
        else:
            c, xs, out = self.steps[i]
            k = len(c[0])
            for a in range(k):
                o = out[:, a]
                for s, x in enumerate(xs):
                    for b in range(k):
                        if s == 0 and b == 0 and not self.add:
                            torch.mul(x[:, b], c[s][a][b], out=o)
                        else:
                            o.addcmul_(x[:, b], c[s][a][b])


class _Noise:
    """Standard normal draws into a preallocated tensor: one generator for the batch (the default:
    the same numbers as torch.randn(shape, generator=...)), or one generator per sample (seeded
    from the seed and the sample's global index: a sample's noise does not depend on the batch)."""

    def __init__(self, generator=None, per_sample=None):
        self.generator, self.per_sample = generator, per_sample

    def fill(self, z):
        if self.per_sample is None:
            return z.normal_(generator=self.generator)
        for b, g in enumerate(self.per_sample):
            z[b].normal_(generator=g)
        return z


class _Run:
    """One call's state: plan, evaluator, slot buffer, noise, and the per-step notification."""

    def __init__(self, plan, evaluate, noise, notify):
        self.plan, self.evaluate, self.noise, self.notify = plan, evaluate, noise, notify
        self.buf = None
        self.z = None

    def allocate(self, n_slots, u0):
        """Zeroed buffer [B, n_slots, k, *data] with u0 in slot 0 (zeros: unused lags weigh exactly 0)."""
        plan = self.plan
        self.buf = torch.zeros((plan.batch, n_slots, plan.k) + plan.data_shape, dtype=plan.dtype, device=plan.device)
        self.slots = [self.buf[:, s] for s in range(n_slots)]
        self.slots[0].copy_(u0)
        return self.slots

    def draw(self):
        """A fresh standard normal tensor [B, k, *data] (contiguous scratch, overwritten each step)."""
        plan = self.plan
        if self.z is None:
            self.z = torch.empty((plan.batch, plan.k) + plan.data_shape, dtype=plan.dtype, device=plan.device)
        return self.noise.fill(self.z)

    def noise_op(self, M, out):
        """out_i += M[i] z (M float64 [N, P, k, k]) for a z drawn into the scratch tensor."""
        plan = self.plan
        M = plan.cast(M)
        P, k = plan.P, plan.k
        steps = []
        for i in range(plan.N):
            if P == 1 and k > 1:
                B = plan.batch
                steps.append(lambda i=i, o=self.slots[out[i]].view(B, k, -1), m=M[i, 0].expand(B, k, k):
                             o.baddbmm_(m, self.z.view(B, k, -1)))
            elif k == 1:
                c = M[i, 0, 0, 0] if P == 1 else M[i, :, 0, 0].reshape(plan.basis[1])
                steps.append(lambda i=i, o=self.slots[out[i]], c=c: o.addcmul_(self.z, c))
            else:
                Mi = M[i]
                steps.append(lambda i=i, o=self.slots[out[i]], Mi=Mi: o.add_(block_apply(Mi, self.z, plan.basis)))
        return steps


def _alternating(N, n_slots):
    """State slot before step i (0 when i is even, the last slot when odd) and after it."""
    cur = [0 if i % 2 == 0 else n_slots - 1 for i in range(N + 1)]
    return cur, cur[1:]


def _two_slot_step(run, M_u, M_o, noise=None):
    """Shared loop for u_{i+1} = M_u[i] u_i + M_o[i] o_i (+ noise[i] z): slots [u_a, o, u_b]."""
    plan, evaluate = run.plan, run.evaluate
    N = plan.N
    slots = run.slots
    cur, nxt = _alternating(N, 3)
    # even: run [u_a, o] -> u_b; odd: run [o, u_b] -> u_a
    W = torch.stack([torch.stack([M_u[i], M_o[i]]) if i % 2 == 0 else torch.stack([M_o[i], M_u[i]])
                     for i in range(N)])
    lin = _Lin(W, run, [0 if i % 2 == 0 else 1 for i in range(N)], nxt)
    add_noise = run.noise_op(noise, nxt) if noise is not None else None
    for i in range(N):
        evaluate(slots[cur[i]], i, slots[1])
        lin(i)
        if add_noise is not None:
            run.draw()
            add_noise[i]()
        run.notify(i, slots[nxt[i]])
    return slots[cur[N]], None


def _multistep(run, corrector):
    """Exponential multistep (Adams-Bashforth in t) on the probability flow, optional Adams-Moulton
    corrector whose evaluation at the predicted point is the next step's history (no extra NFE)."""
    plan, evaluate = run.plan, run.evaluate
    tensors = plan.table.tensors
    N, q, P, k = plan.N, plan.q, plan.P, plan.k
    S = q + 1 if corrector else q                                   # ring of model outputs
    n_slots = S + 2
    slots = run.slots
    cur, nxt = _alternating(N, n_slots)
    dev = plan.device
    i_ = torch.arange(N, device=dev)
    first = (i_ % 2)                                                # the run starts at slot 0 (even) or 1 (odd)

    def weights(C, shift):
        """Fused [N, S+1, P, k, k]: psi at the state's column, lag j at the column of its ring slot."""
        n_lags = C.shape[1]
        j_ = torch.arange(n_lags, device=dev)
        idx = i_[:, None] + shift - j_[None, :]                     # grid index of lag j
        valid = (idx >= 0).to(C.dtype)[..., None, None, None]
        Cf = plan.fold(C, idx.clamp_min(0)) * valid
        col = 1 + idx % S - first[:, None]
        W = torch.zeros((N, S + 1, P, k, k), dtype=torch.float64, device=dev)
        W[i_[:, None].expand(N, n_lags), col] = Cf
        W[i_, first * S] = tensors["psi"]
        return W

    firsts = [i % 2 for i in range(N)]
    pred = _Lin(weights(tensors["eps_weights"], 0), run, firsts, nxt)
    corr = _Lin(weights(tensors["corrector_weights"], 1), run, firsts, nxt) if corrector else None
    ring = [1 + m % S for m in range(N + 1)]
    for i in range(N):
        if not (corrector and i > 0):
            evaluate(slots[cur[i]], i, slots[ring[i]])
        pred(i)
        if corrector:
            evaluate(slots[nxt[i]], i + 1, slots[ring[i + 1]])
            corr(i)
        run.notify(i, slots[nxt[i]])
    return slots[cur[N]], (slots[ring[N]] if corrector else None)


def gddim(run):
    """Deterministic gDDIM: exponential multistep (Adams-Bashforth in t) on the probability flow."""
    run.allocate(run.plan.q + 2, run.u0)
    return _multistep(run, corrector=False)


def gddim_pc(run):
    """gDDIM with the corrector; the corrector's evaluation is the next step's history (no extra NFE)."""
    run.allocate(run.plan.q + 3, run.u0)
    return _multistep(run, corrector=True)


def gddim_sde(run):
    """Stochastic gDDIM (order 1, lam from the table): u' = Psi u + (PsiHat - Psi) R eps + chol(P) z."""
    plan = run.plan
    tensors = plan.table.tensors
    run.allocate(3, run.u0)
    steps = torch.arange(plan.N, device=plan.device)
    return _two_slot_step(run, tensors["psi"], plan.fold(tensors["eps_weights_sde"], steps), noise=tensors["noise_chol"])


def _drift(plan, c):
    """Probability-flow drift F u - c G G^T s as (on u, on the slot content): the score conversion
    and G G^T fused into one matrix per grid time (float64)."""
    tensors = plan.table.tensors
    Sx, So = _score_conversion(plan.parametrization if plan.raw else "eps_R", tensors["R"], tensors["L"],
                               tensors["data_to_state"])
    GGT = tensors["GGT"]
    D_u = tensors["F"] if Sx is None else tensors["F"] - c * GGT @ Sx
    return D_u, -c * GGT @ _pad(So, plan.k)


def euler_maruyama(run):
    """Euler-Maruyama on du = [F u - (1+lam^2)/2 G G^T s] dt + lam G dw, backwards on the grid."""
    plan = run.plan
    lam = 1.0 if run.lam is None else float(run.lam)
    t = plan.t
    dt = (t[1:] - t[:-1])[:, None, None, None]                     # negative
    D_u, D_o = _drift(plan, (1 + lam ** 2) / 2)
    eye = torch.eye(plan.k, dtype=torch.float64, device=plan.device)
    run.allocate(3, run.u0)
    noise = lam * (-dt).sqrt() * plan.table.ggt_sqrt()[:-1] if lam > 0 else None
    return _two_slot_step(run, eye + dt * D_u[:-1], dt * D_o[:-1], noise=noise)


def heun(run):
    """Heun's 2nd-order method in t on the probability flow du/dt = F u - 1/2 G G^T s (Euler last step)."""
    plan, evaluate = run.plan, run.evaluate
    N, k = plan.N, plan.k
    t = plan.t
    dt = (t[1:] - t[:-1])[:, None, None, None]
    D_u, D_o = _drift(plan, 0.5)
    eye = torch.eye(k, dtype=torch.float64, device=plan.device)
    slots = run.allocate(5, run.u0)
    cur, nxt = _alternating(N, 5)
    # even: u 0, o1 1, ue 2, o2 3 -> 4; odd (mirrored): u 4, o1 3, ue 2, o2 1 -> 0
    o1 = [1 if i % 2 == 0 else 3 for i in range(N)]
    o2 = [3 if i % 2 == 0 else 1 for i in range(N)]
    euler_u, euler_o = eye + dt * D_u[:-1], dt * D_o[:-1]
    W_e = torch.stack([torch.stack([euler_u[i], euler_o[i]] if i % 2 == 0 else [euler_o[i], euler_u[i]])
                       for i in range(N)])
    last = N - 1
    to_ue = _Lin(W_e, run, [0 if i % 2 == 0 else 3 for i in range(N)], [nxt[i] if i == last else 2 for i in range(N)])
    h = dt / 2
    cols = [eye + h * D_u[:-1], h * D_o[:-1], h * D_u[1:], h * D_o[1:]]  # u, o1, ue, o2
    W_f = torch.stack([torch.stack(cols if i % 2 == 0 else cols[::-1])[:, i] for i in range(N)])
    final = _Lin(W_f, run, [0 if i % 2 == 0 else 1 for i in range(N)], nxt)
    for i in range(N):
        evaluate(slots[cur[i]], i, slots[o1[i]])
        to_ue(i)
        if i < last:
            evaluate(slots[2], i + 1, slots[o2[i]])
            final(i)
        run.notify(i, slots[nxt[i]])
    return slots[cur[N]], None


def ancestral(run):
    """Ancestral sampling (DDPM / BDM): draw u_{t_{i+1}} from q(u_t | u_s, x0 = E[x0 | u_s]); k = 1 only.

    mean = c_x0 x0 + c_u u_s with x0 = D^-1 (u_s - R eps): one fused map on (u, eps) plus the noise."""
    plan = run.plan
    if plan.k != 1:
        raise SamplingError("ancestral sampling is defined for scalar / diagonal families (k = 1)")
    tensors = plan.table.tensors
    psi, S, D, R = tensors["psi"], tensors["sigma"], tensors["data_to_state"], tensors["R"]
    a = 1 / psi                                                           # Psi(s, t) for s = t_i > t = t_{i+1}
    var_st = S[:-1] - a ** 2 * S[1:]                                      # Var[u_s | u_t]
    post_var = 1 / (1 / S[1:] + a ** 2 / var_st)
    c_x0 = post_var * D[1:] / S[1:]
    c_u = post_var * a / var_st
    std = post_var.clamp_min(0).sqrt()
    Dinv = 1 / D[:-1]
    steps = torch.arange(plan.N, device=plan.device)
    run.allocate(3, run.u0)
    return _two_slot_step(run, c_x0 * Dinv + c_u, -c_x0 * Dinv * plan.fold(R[:-1], steps), noise=std)


def probability_flow_rk45(run, *, dense=None, rtol=1e-5, atol=1e-5, max_steps=10_000):
    """Adaptive Dormand-Prince 5(4) (torchdiffeq dopri5) on the probability flow, T -> t_min, NFE counted.

    Needs coefficients off the grid: ``dense`` = gddim_runtime.load_dense(<name>_dense.safetensors).
    max_steps: accepted steps at most (calibrate's references at 1e-8 take ~150); a model whose output
    is not finite, explodes or differs between calls on the same input (dropout left in train mode) never
    settles the step size, and ends in a SamplingError instead of running for ever.
    The score comes from triangular solves with L (no inverse); the adaptive step control itself
    reads error norms on the host (inherent to adaptive stepping).
    """
    if dense is None:
        raise SamplingError("probability_flow_rk45 needs dense=gddim_runtime.load_dense(<name>_dense.safetensors)")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (rtol, atol)):
        raise SamplingError(f"probability_flow_rk45: rtol and atol must be finite numbers > 0, got {rtol!r}, {atol!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise SamplingError(f"probability_flow_rk45: max_steps must be a positive integer, got {max_steps!r}")
    if not hasattr(dense, "at") or not hasattr(dense, "meta"):
        raise SamplingError(f"dense= takes gddim_runtime.load_dense(<name>_dense.safetensors), got {type(dense).__name__}")
    spec_t, spec_d = ((m or {}).get("spec") or {} for m in (run.plan.table.meta, dense.meta))
    if spec_t.get("sha256") and spec_d.get("sha256") and spec_t["sha256"] != spec_d["sha256"]:
        raise SamplingError(f"dense= {dense.path} was derived from spec {spec_d.get('name')!r} ({spec_d['sha256'][:12]}), "
                            f"the table from {spec_t.get('name')!r} ({spec_t['sha256'][:12]}): another process")
    if dense.k != run.plan.k:
        raise SamplingError(f"dense= {dense.path} has k = {dense.k} state components, the table {run.plan.k}")
    from torchdiffeq import odeint
    plan, evaluate = run.plan, run.evaluate
    lo, hi = plan.t[-1], plan.t[0]
    basis = plan.basis

    def flow(t, x):
        t = torch.minimum(torch.maximum(t.to(lo.dtype), lo), hi)   # dopri5's first-step probe may leave [t_min, T]
        c = dense.at(t)
        Sx, So = _score_conversion(plan.parametrization, c["R"], c["L"], c["D"])
        D_u = c["F"] if Sx is None else c["F"] - 0.5 * c["GGT"] @ Sx
        D_o = -0.5 * c["GGT"] @ So
        out = evaluate.output(x, t.to(plan.model_dtype or plan.dtype).expand(plan.batch), lambda: f"t = {float(t):.6g}")
        o = plan.to_coef(out.to(plan.dtype))
        return block_apply(plan.cast(D_u), x, basis) + block_apply(plan.cast(D_o), o, basis)

    times = torch.stack([plan.t[0], plan.t[-1]]).to(plan.dtype)
    try:
        u = odeint(flow, run.u0, times, method="dopri5", rtol=rtol, atol=atol,
                   options={"max_num_steps": int(max_steps)})[-1]
    except AssertionError as exc:                 # torchdiffeq: 'underflow in dt ...', 'max_num_steps exceeded ...'
        raise SamplingError(f"probability_flow_rk45 did not reach t_min ({exc}): the model's output is not finite, "
                            "explodes, or changes between calls on the same input (dropout in train mode? "
                            "call model.eval())") from None
    slots = run.allocate(2, u)
    run.notify(plan.N - 1, slots[0])
    return slots[0], None


_COMPILED = {}


def _compiled_step(model, plan, mode):
    """One gDDIM step as a pure function of tensors, compiled once per (model, shapes, dtypes) and
    reused for every step and call: the model, the conversion and the update over psi and all lags
    in one graph (on CUDA with mode "reduce-overhead": replayed as a CUDA graph)."""
    key = (id(model), plan.dtype, plan.model_dtype, plan.basis, plan.P, plan.k, plan.k_out, plan.q, plan.batch,
           plan.data_shape, str(plan.device), mode)
    hit = _COMPILED.get(key)
    if hit is not None and hit[0] is model:
        return hit[1]
    dct, P, k, k_out, dtype, md = plan.dct, plan.P, plan.k, plan.k_out, plan.dtype, plan.model_dtype
    expected = (plan.batch, k_out) + plan.data_shape
    H, Wd = plan.basis[1] if dct else (1, 1)

    def step(u, hist, W, t):
        """hist: the q - 1 previous outputs (newest first); returns (u_new, o, finite)."""
        x = idct2(u) if dct else u
        out = model(x if md is None else x.to(md), t)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SamplingError(f"model returned {got}, expected {expected}")
        finite = torch.isfinite(out).all()
        o = out.to(dtype)
        o = dct2(o) if dct else o
        if k_out < k:
            o = torch.cat([torch.zeros_like(u[:, :k - k_out]), o], 1)
        xs = [u, o, *hist]                                                    # psi's column, then lags 0..q-1
        if P == 1:
            c = lambda s, a, b: W[s, 0, a, b]
        else:
            Wh = W.reshape(W.shape[0], H, Wd, k, k)
            c = lambda s, a, b: Wh[s, :, :, a, b]
        # every output component as one sum of products: one fused pointwise kernel after compilation
        u_new = torch.stack([sum(c(s, a, b) * x[:, b] for s, x in enumerate(xs) for b in range(k))
                             for a in range(k)], 1)
        return u_new, o, finite

    fn = torch.compile(step, mode=mode, dynamic=False)
    if len(_COMPILED) >= 8:
        _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = (model, fn)
    return fn


def _gddim_compiled(run, mode):
    """gDDIM (predictor) through the compiled step; the same arithmetic as ``gddim`` up to rounding."""
    plan, evaluate = run.plan, run.evaluate
    tensors = plan.table.tensors
    N, q = plan.N, plan.q
    dev = plan.device
    i_ = torch.arange(N, device=dev)
    j_ = torch.arange(q, device=dev)
    idx = i_[:, None] - j_[None, :]
    valid = (idx >= 0).to(torch.float64)[..., None, None, None]
    C = plan.fold(tensors["eps_weights"], idx.clamp_min(0)) * valid              # [N, q, P, k, k] in lag order
    W = plan.cast(torch.cat([tensors["psi"][:, None], C], 1))                   # [N, q+1, P, k, k]: psi, lag 0..q-1
    Ws = [W[i] for i in range(N)]
    step = _compiled_step(evaluate.model, plan, mode)
    cudagraphs = mode == "reduce-overhead" and plan.device.type == "cuda"
    u = run.u0.contiguous()
    zero = torch.zeros_like(u)
    hist = [zero] * (q - 1)                                                # lags not yet reached weigh exactly 0
    for i in range(N):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        u, o, finite = step(u, hist, Ws[i], plan.t_model[i])
        evaluate.nfe += 1
        plan.ok_at[i].logical_and_(finite)
        if cudagraphs:                                                     # the next replay reuses output memory
            u, o = u.clone(), o.clone()
        hist = [o, *hist[:-1]] if q > 1 else []
        run.notify(i, u)
    return u, None


GRAPH_SAMPLERS = ("gddim", "gddim_pc", "gddim_x0", "gddim_x0_pc", "heun")
_GRAPHS = {}


def _graph_call(model, table, sampler, parametrization, batch, data_shape, dtype, model_dtype, denoise, lam,
                options, noise, x_T, **_):
    """``sample`` as one CUDA graph: captured on the first call for this (model, table, sampler,
    shapes, dtypes), replayed after. The initial state is drawn eagerly (it follows the generator)
    and copied into the graph's input; the NaN flags are reset inside the graph; the result is a
    copy of the graph's output. Returns (samples in data space, model evaluations)."""
    key = (id(model), id(table), sampler, parametrization, batch, tuple(data_shape), dtype, model_dtype, denoise,
           lam, tuple(sorted(options.items())))
    hit = _GRAPHS.get(key)
    if hit is None or hit["model"] is not model or hit["table"] is not table:
        hit = _capture(model, table, sampler, parametrization, batch, data_shape, dtype, model_dtype, denoise, lam,
                       options)
        if len(_GRAPHS) >= 4:                                             # each graph keeps its memory pool
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[key] = hit
    plan = hit["plan"]
    hit["u0"].copy_(_initial_state(plan, noise, x_T))
    hit["graph"].replay()
    _raise_if_not_finite(plan)
    return plan.to_data(hit["out"]).clone(), hit["nfe"]


def _capture(model, table, sampler, parametrization, batch, data_shape, dtype, model_dtype, denoise, lam, options):
    """Warm the call up twice on a side stream (lazy initialisation, workspaces), then capture it."""
    plan = _Plan(table, dtype, parametrization, batch, data_shape, model_dtype)
    run = _Run(plan, _Evaluator(model, plan), _Noise(None), lambda i, u: None)
    run.lam = lam if lam is not None else (None if table.meta.get("lam") is None else _lam(table))
    run.u0 = torch.zeros((batch, plan.k) + tuple(data_shape), dtype=dtype, device=plan.device)

    def body():
        plan.ok.fill_(True)
        run.evaluate.nfe = 0
        return _integrate(run, sampler, False, denoise, dict(options))

    side = torch.cuda.Stream(device=plan.device)
    side.wait_stream(torch.cuda.current_stream(plan.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream(plan.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = body()
    except RuntimeError as exc:
        raise SamplingError(f"compile='graph': the call could not be captured as a CUDA graph "
                            f"(the model must not read values on the host or change shapes): {exc}") from exc
    return {"model": model, "table": table, "plan": plan, "graph": graph, "u0": run.u0, "out": out,
            "nfe": run.evaluate.nfe}


SAMPLERS = {"gddim": gddim, "gddim_pc": gddim_pc, "gddim_sde": gddim_sde, "euler_maruyama": euler_maruyama,
            "heun": heun, "ancestral": ancestral, "probability_flow_rk45": probability_flow_rk45}

from ._variants import gddim_x0, gddim_x0_pc  # noqa: E402  (data-prediction form; uses this module's loop)
SAMPLERS.update(gddim_x0=gddim_x0, gddim_x0_pc=gddim_x0_pc)


def _sampler_options(name):
    """The keyword options a sampler takes beyond ``run`` (e.g. RK45: dense, rtol, atol)."""
    return [p for p in inspect.signature(SAMPLERS[name]).parameters if p != "run"]


def _denoise(run, u, o):
    """E[[x0; 0] | u_{t_N}] = D^-1 (u - R eps): the final denoising step at t_min (reuses o if evaluated)."""
    if o is None:
        o = torch.zeros_like(u)
        run.evaluate(u, run.plan.N, o)
    return _apply_denoise(run.plan, u, o)


def _apply_denoise(plan, u, o):
    """x0_weights applied to the state u and the slot content o at t_N (coefficient space)."""
    X0, X1 = plan.table.tensors["x0_weights"]
    if plan.raw and plan.B is not None:
        X1 = X1 @ plan.B[plan.N]                                      # the slot holds the raw model output
    return block_apply(plan.cast(X0), u, plan.basis) + block_apply(plan.cast(X1), o, plan.basis)


def final_denoise(table, x, out, parametrization="eps_R"):
    """The final denoising step that ``sample`` takes, on its own: E[[x0; 0] | u_{t_N}] = D^-1 (u - R eps_R)
    at the table's last grid time t_N = t_min, with the table's x0_weights.

    x: the state at t_N [B, k, *data] (data space, as ``sample(..., denoise=False)`` returns it);
    out: the model's output at (x, t_N) in ``parametrization`` (not "eps_L_v": its eps has no x half).
    Returns E[[x0; 0] | u_{t_N}] (the data's posterior mean, zeros in the auxiliary components) in data
    space, in x's dtype.
    """
    if parametrization == "eps_L_v":
        raise SamplingError("eps_L_v cannot take the final denoising step (it needs the x half of the score)")
    _check_table_and_parametrization(table, parametrization)
    for name, a in (("x", x), ("out", out)):          # a smaller out was broadcast into a wrong result (sweep 12)
        if not torch.is_tensor(a) or not a.is_floating_point():
            raise SamplingError(f"final_denoise: {name} must be a real floating-point tensor, got "
                                f"{a.dtype if torch.is_tensor(a) else type(a).__name__}")
    if x.ndim < 3 or x.shape[1] != table.k or out.shape != x.shape:
        raise SamplingError(f"final_denoise: x {tuple(x.shape)} and out {tuple(out.shape)} must both be "
                            f"[B, {table.k}, *data_shape]")
    plan = _Plan(table, x.dtype, parametrization, x.shape[0], x.shape[2:], None)
    u, o = plan.to_coef(x), plan.to_coef(out.to(x.dtype))
    if not plan.raw:                                                   # what the evaluator stores: eps_R
        A, B = plan.cast(plan.A[plan.N]), plan.cast(plan.B[plan.N])
        o = block_apply(A, u, plan.basis) + block_apply(B, o, plan.basis)
    return plan.to_data(_apply_denoise(plan, u, o))


def _first_bad(plan):
    """The first grid index whose model output was not finite, N + 1 for a non-finite u_T, or -1: one
    host read after the loop (on CUDA through a non-blocking copy and an event wait, so no implicit
    synchronisation)."""
    ok = plan.ok
    if ok.device.type == "cuda":
        host = torch.empty(ok.shape, dtype=ok.dtype, pin_memory=True)
        host.copy_(ok, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        ok = host
    if not bool(ok[-1]):
        return len(ok) - 1
    bad = (~ok).nonzero()
    return int(bad[0, 0]) if len(bad) else -1


@torch.no_grad()              # inference only: the steps write into buffers (out=), which autograd refuses
def sample(model, table, batch=None, data_shape=None, parametrization="eps_R", sampler=None,
           generator=None, x_T=None, dtype=torch.float32, denoise=None, callback=None, progress=None,
           lam=None, model_dtype=None, return_info=False, compile=False, **options):
    """Draw samples with a coefficient table (gDDIM, Zhang, Tao & Chen 2023, and baselines).

    model: callable ``model(x, t)``: x [B, k, *data_shape] in data space (pixels also for a
        dct2d table; each sample contiguous, the batch may be a strided view of the sampler's
        buffer), t [B] (the grid time, in ``model_dtype`` or ``dtype``); returns a tensor of the
        same shape ([B, 1, *data_shape] for ``eps_L_v``) in ``parametrization``, under torch.no_grad().
    table: a Table (``gddim_runtime.load`` / ``from_tensors``); its device is the whole computation's.
    batch, data_shape: number of samples and the shape of one state component (CLD on CIFAR:
        64 and (3, 32, 32); a dct2d table needs its basis size as the last two axes). Taken from
        ``x_T`` when given.
    parametrization: what the model outputs: "eps_R" (gDDIM's eps, s = -R^-T eps), "eps_L"
        (Cholesky, as CLD-SGM), "score", "x0" (E[[x0; 0] | u_t]: its auxiliary components, CLD's v, are ignored), "eps_L_v" (only the last
        component of eps_L, [B, 1, *data_shape]; no final denoising).
    sampler: a name in ``SAMPLERS``: "gddim" (multistep of the table's order), "gddim_pc"
        (with the corrector; table with corrector weights), "gddim_sde" (table with lam > 0),
        "gddim_x0" / "gddim_x0_pc" (data-prediction form; table derived with --form x0),
        baselines "euler_maruyama", "heun", "ancestral" (k = 1), "probability_flow_rk45".
        Default: the one the table was derived for (``default_sampler``: form x0 -> gddim_x0[_pc],
        corrector weights -> gddim_pc, else gddim), so ``--order auto`` tables sample as recommended.
    generator: torch.Generator on the table's device for the initial noise and the stochastic
        samplers' noise; the result is deterministic given it.
    x_T: the state at the table's first time t_0 (T, or t_s for a grid '<kind>@<rho_s>': noise u_T
        maps there as R_t0 R_T^-1 u_T, derive/_start.py), [B, k, *data_shape] in data space, e.g.
        R_t0 z for z ~ N(0, I) (what ``sample`` draws when x_T is None).
    dtype: the state's, float32 by default (float64 for reference; 16-bit refused where HALF_STATE_REFUSED says).
    denoise: take the final denoising step E[[x0; 0] | u_{t_N}] at t_min (one more model
        evaluation); default: what the table's NFE accounting assumes (meta "denoise").
    callback: called after every step with {"i": step, "t": t_{i+1} (0-d tensor), "u": the state's copy (coefficients)}.
    progress: a tqdm bar (default: on a terminal, for 50 steps or more).
    lam: Euler-Maruyama's noise scale (0: probability flow; default 1, or the table's lam).
    model_dtype: the dtype the model runs in (its input cast to it, its output back to ``dtype``);
        default: a torch.nn.Module's own (``model_dtype_of``), else ``dtype``.
    return_info: also return {"nfe": model evaluations}.
    compile: False (eager); "graph" (CUDA; what True means there): the whole call captured once
        as one CUDA graph per (model, table, sampler, shapes, dtypes) and replayed (README "GPU":
        1.65x eager at batch 256, 5.8x at batch 1 on an H200); the model must be capturable;
        samplers without noise and with a fixed step count; no callback. True on the CPU, or a
        torch.compile mode string: gDDIM's step compiled with torch.compile once per model and
        shapes (CPU: needs a C++ compiler; 2.36x eager here); sampler "gddim", outputs not "x0".
    options: the sampler's own (probability_flow_rk45: dense= from ``load_dense``, rtol=, atol=); others refused.

    Returns the state at t_min [B, k, *data_shape] (data space, after the final denoising step
    when ``denoise``); with ``return_info`` also {"nfe": ...}. The loop never waits for the host;
    one read after it checks that every model output was finite (SamplingError naming the step).
    """
    _check_model(model)
    sampler = default_sampler(table) if sampler is None else sampler
    if compile is True and table.tensors["t"].device.type == "cuda":
        compile = "graph"                          # measured on an H200: 1.65-5.8x eager; the compiled step 0.64x
    model_dtype = _checked_dtypes(model, sampler, dtype, model_dtype)
    noise, batch, data_shape, denoise = _checked_request(
        table, sampler, parametrization, compile, options, generator, x_T, batch, data_shape, denoise, callback, lam)
    _probe_explicit(table, sampler, lam)
    call = _graph_call if compile == "graph" else _eager_call
    out, nfe = call(model, table, sampler, parametrization, batch, data_shape, dtype, model_dtype, denoise, lam,
                    options, noise, x_T, compile=compile, callback=callback, progress=progress)
    return (out, {"nfe": nfe}) if return_info else out


def _check_table_and_parametrization(table, parametrization):
    """What sample() and final_denoise() both take: a Table and a known parametrization (SamplingError)."""
    if not isinstance(table, Table):
        raise SamplingError(f"expected a Table from gddim_runtime.load, got {type(table).__name__}")
    if parametrization not in PARAMETRIZATIONS:
        raise SamplingError(f"unknown parametrization {parametrization!r}; choose from {', '.join(PARAMETRIZATIONS)}")


def _check_model(model):
    """sample(None, ...), sample(torch.nn.Linear, ...) (the class): one SamplingError, not a TypeError inside."""
    if not callable(model) or isinstance(model, type):
        raise SamplingError(f"model must be a callable model(x, t) (an instance), got "
                            f"{'the class ' + model.__name__ if isinstance(model, type) else type(model).__name__}")


def _probe_explicit(table, sampler, lam):
    """PROBED_SAMPLERS on a table: the stability probe once per (table, sampler, lam) -- an explicit step that
    blows up stays finite (EM on a stiff drift: 3e22 at NFE 50) -- and its UnstableSamplerWarning."""
    if sampler in PROBED_SAMPLERS and not _PROBING.get():
        from ._probe import warn_if_unstable
        key = float(lam) if torch.is_tensor(lam) and lam.numel() == 1 else lam   # a 0-d tensor: one key, not one per call
        warn_if_unstable(table, sampler=sampler, lam=key)


def model_dtype_of(model):
    """The dtype a model runs in: that of its first floating-point parameter (a torch.nn.Module, e.g. a
    float32 network), else None (the model takes the state's dtype, e.g. an exact score function)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if isinstance(p, torch.Tensor) and p.is_floating_point():
                return p.dtype
    return None


_X0_HALF = ("its data prediction applies D^-1, which reaches 5e4-8e4 at T on CLD and BDM (above float16's maximum; "
            "in bfloat16 the cancelling terms left CLD's samples 85 % off)")
HALF_STATE_REFUSED = {       # measured with the exact model (sweep 9): why each cannot hold its state in 16 bits
    "gddim_x0": _X0_HALF, "gddim_x0_pc": _X0_HALF,
    "probability_flow_rk45": "dopri5's first-step estimate overflows float16 (the model got t = NaN) and bfloat16 "
                             "took 879 model calls for 117"}


def _checked_dtypes(model, sampler, dtype, model_dtype):
    """The model's dtype (given, else ``model_dtype_of``); floating dtypes only; the eps-form corrector
    below float64 gets a warning with its measured cost."""
    for name, value in (("dtype", dtype), ("model_dtype", model_dtype)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise SamplingError(f"{name} must be a floating torch dtype (torch.float32, torch.float64, "
                                f"torch.bfloat16, ...), got {value!r}")
    if dtype in (torch.float16, torch.bfloat16) and sampler in HALF_STATE_REFUSED:
        raise SamplingError(f"sampler {sampler!r} needs a state of at least float32, got dtype={dtype}: "
                            f"{HALF_STATE_REFUSED[sampler]}; keep dtype=torch.float32 and run the network in half "
                            f"precision with model_dtype={dtype}")
    if sampler == "gddim_pc" and dtype != torch.float64:
        warnings.warn("gddim_pc (the eps-form predictor-corrector) amplifies rounding by up to ~1e11 on stiff processes: "
                      "in float32 a point mass with the exact eps ends 4e3 (CLD, NFE 10) / 3e-2 (NFE 50) away, gddim 6e-8; "
                      "sample with dtype=torch.float64, or use the x0 form (gddim_x0_pc)", RuntimeWarning, stacklevel=4)
    return model_dtype_of(model) if model_dtype is None else model_dtype


def default_sampler(table):
    """The sampler a table was derived for: the data-prediction form for an x0-form table, the
    predictor-corrector when it holds corrector weights (derive --corrector), else gDDIM's
    predictor. ``--order auto``'s recommendation (form, corrector) maps onto exactly these."""
    if not isinstance(table, Table):
        return "gddim"
    if table.meta.get("form") == "x0" and table.has("x0_weights_ms"):
        return "gddim_x0_pc" if table.has("x0_corrector_weights") else "gddim_x0"
    return "gddim_pc" if table.has("corrector_weights") else "gddim"


def _eager_call(model, table, sampler, parametrization, batch, data_shape, dtype, model_dtype, denoise, lam, options,
                noise, x_T, compile, callback, progress):
    """``sample`` step by step on the host (eager, or with the compiled gDDIM step): (samples, nfe)."""
    plan = _Plan(table, dtype, parametrization, batch, data_shape, model_dtype)
    run = _Run(plan, _Evaluator(model, plan), noise, None)
    run.u0 = _initial_state(plan, noise, x_T)
    run.lam = lam if lam is not None else (None if table.meta.get("lam") is None else _lam(table))
    with _Progress(plan, sampler, progress, callback) as run.notify:
        u = _integrate(run, sampler, compile, denoise, options)
    _raise_if_not_finite(plan)
    return plan.to_data(u).contiguous(), run.evaluate.nfe


def _checked_request(table, sampler, parametrization, compile, options, generator, x_T, batch, data_shape, denoise,
                     callback=None, lam=None):
    """``sample``'s arguments checked once before dispatch (SamplingError saying what is wrong and
    what to give): returns the noise source, batch, data_shape and whether to denoise."""
    _check_table_and_parametrization(table, parametrization)
    if x_T is not None and not torch.is_tensor(x_T):
        raise SamplingError(f"x_T must be a torch.Tensor [B, k, *data_shape], got {type(x_T).__name__}")
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    noise = options.pop("_noise", None) or _Noise(generator)            # the distributed CLI's per-sample noise
    _check_options(sampler, options)
    if compile == "graph":
        if callback is not None:
            raise SamplingError("compile='graph' replays the whole call on the device: no per-step callback")
        if table.tensors["t"].device.type != "cuda":
            raise SamplingError("compile='graph' captures the whole call as a CUDA graph: the table must be on CUDA")
        if sampler not in GRAPH_SAMPLERS:
            raise SamplingError(f"compile='graph' is available for the samplers that draw no noise and take a fixed "
                                f"number of steps ({', '.join(GRAPH_SAMPLERS)}), not {sampler!r}")
    elif compile and (sampler != "gddim" or parametrization == "x0"):
        raise SamplingError(f"compile= is available for sampler 'gddim' with outputs eps_R, eps_L, score or eps_L_v "
                            f"(got sampler {sampler!r}, parametrization {parametrization!r})")
    if sampler == "gddim_pc" and not table.has("corrector_weights"):
        raise SamplingError(f"{table.path}: no corrector weights; derive with --corrector")
    if sampler == "gddim_sde" and not table.has("eps_weights_sde"):
        raise SamplingError(f"{table.path}: no stochastic weights; derive with --lam L")
    if torch.is_tensor(lam) and lam.numel() == 1 and lam.is_floating_point():
        lam = float(lam)
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam)
                            or lam < 0):
        raise SamplingError(f"lam must be a finite number >= 0 (0: the probability flow), got {lam!r}")
    if lam is not None and sampler != "euler_maruyama":
        raise SamplingError(f"lam is Euler-Maruyama's noise scale; sampler {sampler!r} does not take it (gddim_sde "
                            "uses the lam its table was derived with: python -m derive --lam)")
    if denoise not in (None, True, False):
        raise SamplingError(f"denoise must be True, False or None (the table's default), got {denoise!r}")
    if parametrization == "eps_L_v" and not table.noise_on_last_only():
        raise SamplingError("eps_L_v needs k > 1 and noise on the last state component only (as CLD)")
    batch, data_shape = _batch_shape(table, x_T, batch, data_shape)
    if denoise is None:
        denoise = bool(table.meta.get("denoise", True)) and parametrization != "eps_L_v"
    if denoise and parametrization == "eps_L_v":
        raise SamplingError("eps_L_v cannot take the final denoising step (it needs the x half of the score); "
                            "pass denoise=False")
    return noise, batch, data_shape, denoise


def _check_options(sampler, options):
    """Refuse keyword options the sampler does not take, listing what sample() and it take."""
    valid = _sampler_options(sampler)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        named = list(inspect.signature(sample).parameters)[2:-1]
        raise SamplingError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                            f"sampler {sampler!r}; sample() takes {', '.join(named)}"
                            + (f" and {sampler}'s {', '.join(valid)}" if valid else f" ({sampler} has no options)"))


def _batch_shape(table, x_T, batch, data_shape):
    """(batch, data_shape as a tuple of ints), from x_T when given; checked against the table's basis."""
    k = table.k
    if x_T is not None:
        if x_T.ndim < 3 or x_T.shape[1] != k:
            raise SamplingError(f"x_T has shape {tuple(x_T.shape)}; expected [B, {k}, *data_shape]")
        given = (batch, None if data_shape is None else tuple(data_shape))
        batch, data_shape = x_T.shape[0], tuple(x_T.shape[2:])
        if given[0] not in (None, batch) or given[1] not in (None, data_shape):
            raise SamplingError(f"batch={given[0]!r}, data_shape={given[1]!r} contradict x_T's shape "
                                f"{tuple(x_T.shape)}; give x_T alone")
    if batch is None or data_shape is None:
        raise SamplingError("give batch and data_shape (or x_T)")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise SamplingError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(data_shape, numbers.Integral):
        data_shape = (data_shape,)
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in data_shape):
        raise SamplingError(f"data_shape must be a sequence of positive integers, got {data_shape!r}")
    batch, data_shape = int(batch), tuple(int(n) for n in data_shape)
    basis_name, size = table.basis
    if basis_name == "dct2d" and (len(data_shape) < 2 or data_shape[-2:] != size):
        raise SamplingError(f"data_shape {data_shape} does not match the table's dct2d basis: last two axes must be {size}")
    return batch, data_shape


def _initial_state(plan, noise, x_T):
    """u_T in coefficient space: x_T as given, else R_T z for fresh standard noise z (~ N(0, Sigma_T))."""
    if x_T is not None:
        return plan.to_coef(x_T.to(device=plan.device, dtype=plan.dtype))
    z = noise.fill(torch.empty((plan.batch, plan.k) + plan.data_shape, device=plan.device, dtype=plan.dtype))
    return block_apply(plan.cast(plan.table.tensors["R"][0]), z, plan.basis)


class _Progress:
    """The per-step notification (``with ... as notify``): advances the progress bar and calls the
    user's callback with {"i", "t": t_{i+1}, "u": a copy of the state}; closes the bar on exit."""

    def __init__(self, plan, sampler, progress, callback):
        self.t, self.callback = plan.t, callback
        if progress is None:
            progress = sys.stderr.isatty() and plan.N >= 50
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=plan.N, desc=sampler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def __call__(self, i, u):
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback({"i": i, "t": self.t[i + 1], "u": u.clone()})


def _integrate(run, sampler, compile, denoise, options):
    """The sampler's loop from u_T to t_N, then the shared ending: the final denoising step."""
    run.plan.ok_at[-1].logical_and_(torch.isfinite(run.u0).all())   # a NaN x_T; a model may not propagate it
    if compile:
        mode = compile if isinstance(compile, str) else ("reduce-overhead" if run.plan.device.type == "cuda" else "default")
        u, o = _gddim_compiled(run, mode)
    else:
        u, o = SAMPLERS[sampler](run, **options)
    return _denoise(run, u, o) if denoise else u


def _raise_if_not_finite(plan):
    """SamplingError naming the first step whose model output was NaN/inf (one host read, after the loop)."""
    step = _first_bad(plan)
    if step == plan.N + 1:
        raise SamplingError("x_T is not finite (NaN/inf): the initial state must be finite")
    if step >= 0:
        raise NonFiniteError(f"model output is not finite (NaN/inf) at step {step} (t = {float(plan.t[step]):.6g})")


def _lam(table):
    from fractions import Fraction
    return float(Fraction(table.meta["lam"]))
