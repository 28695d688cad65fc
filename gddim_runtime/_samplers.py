"""Samplers: one entry point ``sample``, one registry, one signature for every variant.

Every sampler is ``fn(ev, prep, u, *, callback, denoise, generator, lam) -> u`` where ``u`` is
the state in coefficient space (frequency space for a dct2d basis), ``ev(u, i)`` returns the
model output converted to eps_R at grid time t_i (and counts NFE), and ``prep`` holds the
table's coefficients cast once to the state dtype. No sampler syncs with the host inside its
loop: grid indices are Python ints, all values stay on the device.
"""

import sys

import torch

from ._dct import dct2, idct2
from ._format import TableError
from ._table import Table, block_apply

PARAMETRIZATIONS = ("eps_R", "eps_L", "score", "x0", "eps_L_v")


class SamplingError(ValueError):
    """Bad input to ``sample`` or a misbehaving model: one line saying what and where."""


def _conversion(parametrization, R, L, D):
    """(A, B) with eps_R = A u + B out, float64 [..., k, k] (None for a zero A / identity B).

    eps_L: eps_R = R^T L^-T eps_L.  score: eps_R = -R^T s.  x0: eps_R = R^-1 (u - D x0).
    eps_L_v (CLD-SGM style, only the last component of eps_L): L^-T is upper triangular, so
    s_v = -eps_v / L_vv exactly; the other score components are unknown and set to 0, which
    leaves G G^T s (the probability-flow / SDE drift) exact when G acts on the last component.
    """
    if parametrization == "eps_R":
        return None, None
    Rt = R.transpose(-1, -2)
    if parametrization == "eps_L":
        eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
        return None, Rt @ torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)
    if parametrization == "score":
        return None, -Rt
    if parametrization == "x0":
        Rinv = torch.linalg.inv(R)
        return Rinv, -Rinv @ D
    if parametrization == "eps_L_v":
        k = R.shape[-1]
        return None, Rt[..., :, k - 1:] / L[..., k - 1:, k - 1:]
    raise SamplingError(f"unknown parametrization {parametrization!r}; choose from {', '.join(PARAMETRIZATIONS)}")


class _Prepared:
    """Coefficients in the state dtype (cast once per call) and eps_R conversion matrices."""

    def __init__(self, table, dtype, parametrization):
        T64 = table.tensors
        self.table, self.dtype, self.basis = table, dtype, table.basis
        self.parametrization = parametrization
        self.N, self.q = table.steps, table.order
        cast = lambda x: None if x is None else x.to(dtype)
        self.c = {name: cast(v) for name, v in T64.items() if name != "t"}
        self.t = T64["t"]
        R = T64["R"]
        self.score_of_eps = cast(-torch.linalg.inv(R).transpose(-1, -2))   # s = -R^-T eps_R
        if parametrization == "eps_L_v":
            GGT, k = T64["GGT"], table.k
            if k < 2 or torch.any(GGT[..., :k - 1, :] != 0) or torch.any(GGT[..., :, :k - 1] != 0):
                raise SamplingError("eps_L_v needs k > 1 and noise on the last state component only (as CLD)")
        A, B = _conversion(parametrization, R, T64["L"], T64["data_to_state"])
        self.A, self.B = cast(A), cast(B)                                   # per grid index i

    def apply(self, name, index, u):
        return block_apply(self.c[name][index], u, self.basis)


class _Evaluator:
    """Calls the model, converts its output to eps_R, counts NFE, flags NaN (grid steps)."""

    def __init__(self, model, prep, data_shape, batch, model_dtype):
        self.model, self.prep, self.data_shape, self.batch = model, prep, tuple(data_shape), batch
        self.model_dtype = model_dtype
        self.nfe = 0
        dev = prep.t.device
        self.bad_step = torch.full((), -1, dtype=torch.long, device=dev)
        self.expected = (batch, 1 if prep.parametrization == "eps_L_v" else prep.table.k) + self.data_shape

    def to_data(self, u):
        return idct2(u) if self.prep.basis[0] == "dct2d" else u

    def to_coef(self, x):
        return dct2(x) if self.prep.basis[0] == "dct2d" else x

    def _model(self, u, t, where):
        """The model's output at the 0-d time t, checked and cast to the state dtype (data space)."""
        prep = self.prep
        x = self.to_data(u)
        out = self.model(x if self.model_dtype is None else x.to(self.model_dtype),
                         t.to(self.model_dtype or prep.dtype).expand(self.batch))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != self.expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SamplingError(f"model returned {got} at {where()}, expected {self.expected}")
        self.nfe += 1
        return out.to(prep.dtype)

    def _eps(self, u, out, A, B):
        """eps_R = A u + B out in coefficient space."""
        out = self.to_coef(out)
        eps = out if B is None else block_apply(B, out, self.prep.basis)
        return eps if A is None else eps + block_apply(A, u, self.prep.basis)

    def __call__(self, u, i):
        prep = self.prep
        out = self._model(u, prep.t[i], lambda: f"step {i} (t = {float(prep.t[i]):.6g})")
        finite = torch.isfinite(out.sum())             # one cheap reduction; NaN/inf propagate
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, torch.tensor(i, device=finite.device), self.bad_step)
        return self._eps(u, out, None if prep.A is None else prep.A[i], None if prep.B is None else prep.B[i])

    def at_time(self, u, t, c):
        """Model output converted to eps_R at an arbitrary time t, with dense coefficients c."""
        out = self._model(u, t, lambda: f"t = {float(t):.6g}")
        A, B = _conversion(self.prep.parametrization, c["R"], c["L"], c["D"])
        cast = lambda x: None if x is None else x.to(self.prep.dtype)
        return self._eps(u, out, cast(A), cast(B))

    def raise_if_bad(self):
        step = int(self.bad_step)                       # one sync, after the loop
        if step >= 0:
            raise SamplingError(f"model output is not finite (NaN/inf) at step {step} "
                                f"(t = {float(self.prep.t[step]):.6g})")


def _denoise(ev, prep, u, eps=None):
    """E[u_0 | u_{t_N}] = D^-1 (u - R eps): the final denoising evaluation at t_min."""
    eps = ev(u, prep.N) if eps is None else eps
    return prep.apply("x0_weights", 0, u) + prep.apply("x0_weights", 1, eps)


def gddim(ev, prep, u, *, callback=None, denoise=True, generator=None, lam=None, corrector=False, **_):
    """Deterministic gDDIM: exponential multistep (Adams-Bashforth in t) on the probability flow."""
    history, eps_next = [], None
    for i in range(prep.N):
        eps = eps_next if eps_next is not None else ev(u, i)
        history = [eps] + history[:prep.q - 1]                          # lag 0 = newest (t_i)
        # Predictor: u_{i+1} = Psi u_i + sum_j C_ij eps_{i-j}.
        u_new = prep.apply("psi", i, u)
        for j in range(min(prep.q, i + 1)):
            u_new = u_new + block_apply(prep.c["eps_weights"][i, j], history[j], prep.basis)
        if corrector:
            # Corrector (Adams-Moulton): model at the predicted point, reused as next history.
            eps_next = ev(u_new, i + 1)
            u_new = prep.apply("psi", i, u) + block_apply(prep.c["corrector_weights"][i, 0], eps_next, prep.basis)
            for j in range(1, min(prep.q + 1, i + 2)):
                u_new = u_new + block_apply(prep.c["corrector_weights"][i, j], history[j - 1], prep.basis)
        u = u_new
        if callback is not None:
            callback({"i": i, "t": prep.t[i + 1], "u": u})
    return _denoise(ev, prep, u, eps_next) if denoise else u


def gddim_pc(ev, prep, u, **kw):
    """gDDIM with the corrector; the corrector's evaluation is the next step's history (no extra NFE)."""
    return gddim(ev, prep, u, corrector=True, **kw)


def gddim_sde(ev, prep, u, *, callback=None, denoise=True, generator=None, lam=None, **_):
    """Stochastic gDDIM (order 1, lam from the table): u' = Psi u + (PsiHat - Psi) R eps + chol(P) z."""
    for i in range(prep.N):
        eps = ev(u, i)
        z = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        u = prep.apply("psi", i, u) + prep.apply("eps_weights_sde", i, eps) + prep.apply("noise_chol", i, z)
        if callback is not None:
            callback({"i": i, "t": prep.t[i + 1], "u": u})
    return _denoise(ev, prep, u) if denoise else u


def _sqrt_psd(M):
    """Symmetric PSD square root of [.., k, k] (float64 eigendecomposition)."""
    w, V = torch.linalg.eigh(M.to(torch.float64))
    return (V * w.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def euler_maruyama(ev, prep, u, *, callback=None, denoise=True, generator=None, lam=1.0, **_):
    """Euler-Maruyama on du = [F u - (1+lam^2)/2 G G^T s] dt + lam G dw, backwards on the grid."""
    lam = 1.0 if lam is None else float(lam)
    root = _sqrt_psd(prep.table.tensors["GGT"]).to(prep.dtype)
    for i in range(prep.N):
        s = block_apply(prep.score_of_eps[i], ev(u, i), prep.basis)
        dt = (prep.t[i + 1] - prep.t[i]).to(prep.dtype)                 # negative
        drift = prep.apply("F", i, u) - (1 + lam ** 2) / 2 * prep.apply("GGT", i, s)
        u = u + drift * dt
        if lam > 0:
            z = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
            u = u + lam * (-dt).sqrt() * block_apply(root[i], z, prep.basis)
        if callback is not None:
            callback({"i": i, "t": prep.t[i + 1], "u": u})
    return _denoise(ev, prep, u) if denoise else u


def heun(ev, prep, u, *, callback=None, denoise=True, generator=None, lam=None, **_):
    """Heun's 2nd-order method in t on the probability flow du/dt = F u - 1/2 G G^T s (Euler last step)."""
    def f(x, i):
        s = block_apply(prep.score_of_eps[i], ev(x, i), prep.basis)
        return prep.apply("F", i, x) - 0.5 * prep.apply("GGT", i, s)
    for i in range(prep.N):
        dt = (prep.t[i + 1] - prep.t[i]).to(prep.dtype)
        d = f(u, i)
        u_e = u + dt * d
        u = u + dt / 2 * (d + f(u_e, i + 1)) if i < prep.N - 1 else u_e
        if callback is not None:
            callback({"i": i, "t": prep.t[i + 1], "u": u})
    return _denoise(ev, prep, u) if denoise else u


def ancestral(ev, prep, u, *, callback=None, denoise=True, generator=None, lam=None, **_):
    """Ancestral sampling (DDPM / BDM): draw u_{t_{i+1}} from q(u_t | u_s, x0 = E[x0 | u_s]); k = 1 only."""
    if prep.table.k != 1:
        raise SamplingError("ancestral sampling is defined for scalar / diagonal families (k = 1)")
    T = prep.table.tensors
    psi, S, D, R = T["psi"], T["sigma"], T["data_to_state"], T["R"]
    a = 1 / psi                                                           # Psi(s, t) for s = t_i > t = t_{i+1}
    var_st = S[:-1] - a ** 2 * S[1:]                                      # Var[u_s | u_t]
    post_var = 1 / (1 / S[1:] + a ** 2 / var_st)
    c_x0 = (post_var * D[1:] / S[1:]).to(prep.dtype)                      # mean = c_x0 x0 + c_u u_s
    c_u = (post_var * a / var_st).to(prep.dtype)
    std = post_var.clamp_min(0).sqrt().to(prep.dtype)
    Dinv = (1 / D).to(prep.dtype)
    for i in range(prep.N):
        eps = ev(u, i)
        x0 = block_apply(Dinv[i], u - block_apply(prep.c["R"][i], eps, prep.basis), prep.basis)
        z = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        u = block_apply(c_x0[i], x0, prep.basis) + block_apply(c_u[i], u, prep.basis) + block_apply(std[i], z, prep.basis)
        if callback is not None:
            callback({"i": i, "t": prep.t[i + 1], "u": u})
    return _denoise(ev, prep, u) if denoise else u


def probability_flow_rk45(ev, prep, u, *, callback=None, denoise=True, generator=None, lam=None, dense=None,
                          rtol=1e-5, atol=1e-5, **_):
    """Adaptive Dormand-Prince 5(4) (torchdiffeq dopri5) on the probability flow, T -> t_min, NFE counted.

    Needs coefficients off the grid: ``dense`` = gddim_runtime.load_dense(<name>_dense.safetensors).
    """
    if dense is None:
        raise SamplingError("probability_flow_rk45 needs dense=gddim_runtime.load_dense(<name>_dense.safetensors)")
    from torchdiffeq import odeint

    lo, hi = prep.t[-1], prep.t[0]

    def flow(t, x):
        t = torch.minimum(torch.maximum(t.to(lo.dtype), lo), hi)   # dopri5's first-step probe may leave [t_min, T]
        c = dense.at(t)
        s = block_apply((-torch.linalg.inv(c["R"]).transpose(-1, -2)).to(prep.dtype), ev.at_time(x, t, c), prep.basis)
        return block_apply(c["F"].to(prep.dtype), x, prep.basis) - 0.5 * block_apply(c["GGT"].to(prep.dtype), s, prep.basis)
    times = torch.stack([prep.t[0], prep.t[-1]]).to(prep.dtype)
    u = odeint(flow, u, times, method="dopri5", rtol=rtol, atol=atol)[-1]
    if callback is not None:
        callback({"i": prep.N - 1, "t": prep.t[-1], "u": u})
    return _denoise(ev, prep, u) if denoise else u


SAMPLERS = {"gddim": gddim, "gddim_pc": gddim_pc, "gddim_sde": gddim_sde, "euler_maruyama": euler_maruyama,
            "heun": heun, "ancestral": ancestral, "probability_flow_rk45": probability_flow_rk45}


def sample(model, table, batch=None, data_shape=None, parametrization="eps_R", sampler="gddim",
           generator=None, x_T=None, dtype=torch.float32, denoise=None, callback=None, progress=None,
           lam=None, model_dtype=None, return_info=False, **options):
    """Draw samples with a coefficient table (gDDIM, Zhang, Tao & Chen 2023, and baselines).

    model(u, t): u [B, k, *data_shape] in data space, t [B]; returns the same shape, in the
    given ``parametrization`` (eps_R: gDDIM, eps_L: Cholesky as CLD-SGM, score, x0: E[u_0 | u_t]).
    Returns the state at t_min [B, k, *data_shape] (after the final denoising step when
    ``denoise``, default: the table's NFE accounting); with ``return_info`` also {"nfe": ...}.
    Sampler options pass through ``options`` (probability_flow_rk45: dense=, rtol=, atol=).
    """
    if not isinstance(table, Table):
        raise SamplingError(f"expected a Table from gddim_runtime.load, got {type(table).__name__}")
    if sampler not in SAMPLERS:
        raise SamplingError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if parametrization not in PARAMETRIZATIONS:
        raise SamplingError(f"unknown parametrization {parametrization!r}; choose from {', '.join(PARAMETRIZATIONS)}")
    if sampler == "gddim_pc" and not table.has("corrector_weights"):
        raise SamplingError(f"{table.path}: no corrector weights; derive with --corrector")
    if sampler == "gddim_sde" and not table.has("eps_weights_sde"):
        raise SamplingError(f"{table.path}: no stochastic weights; derive with --lam L")
    k = table.k
    if x_T is not None:
        batch, data_shape = x_T.shape[0], tuple(x_T.shape[2:])
        if x_T.ndim < 3 or x_T.shape[1] != k:
            raise SamplingError(f"x_T has shape {tuple(x_T.shape)}; expected [B, {k}, *data_shape]")
    if batch is None or data_shape is None:
        raise SamplingError("give batch and data_shape (or x_T)")
    data_shape = tuple(int(n) for n in data_shape)
    kind, size = table.basis
    if kind == "dct2d" and (len(data_shape) < 2 or data_shape[-2:] != size):
        raise SamplingError(f"data_shape {data_shape} does not match the table's dct2d basis: last two axes must be {size}")
    dev = table.device
    prep = _Prepared(table, dtype, parametrization)
    ev = _Evaluator(model, prep, data_shape, batch, model_dtype)
    if x_T is None:
        z = torch.randn((batch, k) + data_shape, generator=generator, device=dev, dtype=dtype)
        u = prep.apply("R", 0, z)                                         # u_T = R_T z ~ N(0, Sigma_T)
    else:
        u = ev.to_coef(x_T.to(device=dev, dtype=dtype))
    if denoise is None:
        denoise = bool(table.meta.get("denoise", True)) and parametrization != "eps_L_v"
    if denoise and parametrization == "eps_L_v":
        raise SamplingError("eps_L_v cannot take the final denoising step (it needs the x half of the score); "
                            "pass denoise=False")
    if progress is None:
        progress = sys.stderr.isatty() and table.steps >= 50
    cb = callback
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=table.steps, desc=sampler)

        def cb(info):
            bar.update(1)
            if callback is not None:
                callback(info)
    try:
        u = SAMPLERS[sampler](ev, prep, u, callback=cb, denoise=denoise, generator=generator,
                              lam=lam if lam is not None else (None if table.meta.get("lam") is None else _lam(table)),
                              **options)
    finally:
        if progress:
            bar.close()
    ev.raise_if_bad()
    out = ev.to_data(u)
    return (out, {"nfe": ev.nfe}) if return_info else out


def _lam(table):
    from fractions import Fraction
    return float(Fraction(table.meta["lam"]))
