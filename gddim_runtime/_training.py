"""Training side: the forward process at random continuous times, targets and losses, time samplers.

    dense = gr.load_dense("coeffs/cld/cld_dense.safetensors", device="cuda")
    t = gr.sample_times(dense, x0.shape[0], generator=g)               # uniform in [t_min, T]
    u_t, eps = gr.add_noise(dense, x0, t, generator=g)                  # u_t, eps [B, k, *data_shape]
    loss = gr.diffusion_loss(dense, model(u_t, t.float()), x0, t, eps)  # eps_R: E|eps_theta - eps|^2

Everything stays on x0's device; there is no host synchronisation (no .item(), no data-dependent
Python branching), so these functions run inside a CUDA training step or a captured graph.

Forward process (MATH.md sections 1-2): given data x0, the state at time t is

    u_t = D_t [x0; 0 ...] + R_t eps,   eps ~ N(0, I),   R_t R_t^T = Sigma_t,

D_t = Psi(t, 0) (data_to_state; mean_t for a marginal-form spec such as BDM) and R_t the spec's gDDIM
factor (R_0 as the spec says). The auxiliary components' initial law (CLD's velocity) is part of
Sigma_t through Sigma_0, so eps covers it. With a dct2d basis the k x k blocks act per frequency of
the orthonormal 2-D DCT of the last two axes; u_t and eps are returned in data space (eps is drawn in
data space: its DCT is again N(0, I)), which is what the model sees and what the sampler expects.
"""

import torch

from ._dct import dct2, idct2

PARAMETRIZATIONS = ("eps_R", "eps_L", "score", "x0")
TIME_SAMPLERS = ("uniform", "quadratic", "log")


def _per_sample(M, u, basis):
    """Apply per-sample, per-coordinate blocks M [B, P, k, k] to u [B, k, *data] (coefficient space)."""
    B, P, k, _ = M.shape
    lead = u.ndim - 2
    if basis[0] == "dct2d":
        H, W = basis[1]
        Mb = M.view(B, H, W, k, k).permute(0, 3, 4, 1, 2)                   # [B, k, k, H, W]
        Mb = Mb.reshape((B, k, k) + (1,) * (lead - 2) + (H, W))
    else:
        Mb = M.reshape((B, k, k) + (1,) * lead)
    return (Mb * u.unsqueeze(1)).sum(dim=2)


def _codec(basis):
    return (dct2, idct2) if basis[0] == "dct2d" else ((lambda x: x), (lambda x: x))


def _lift(x0, k):
    """[B, *data] -> [B, k, *data] with the data in component 0 and zeros elsewhere ([x0; 0 ...])."""
    return torch.cat([x0.unsqueeze(1), x0.new_zeros((x0.shape[0], k - 1) + tuple(x0.shape[1:]))], dim=1)


def _coefficients(dense, t, like):
    """The dense coefficients at the times t; t outside [t_min, T] (or NaN) is refused by a device-side
    assert (no host sync): the Chebyshev panels extrapolate there (NaN at 1.5 T, a wrong Sigma at 5 T),
    which would train on garbage pairs without a word (timesteps 0..999 passed for t, say).

    The bounds allow the rounding of t's own dtype: a sampler hands a float32 network the grid's ends
    rounded to float32, which can lie 2^-24 outside (bdm8: T = 0.99598 became 0.9959800243, refused);
    such a time is evaluated at the end it rounds (clamped), never extrapolated."""
    if not torch.is_tensor(t) or not t.is_floating_point():
        got = f"a {t.dtype} tensor" if torch.is_tensor(t) else type(t).__name__
        raise TypeError(f"t must be a floating-point tensor of times [B], got {got}")
    tt = t.to(device=dense.edges.device, dtype=torch.float64).reshape(-1)
    # relative rounding: t's own dtype's, and at least float32's (a float32 grid time widened to float64 by a
    # network's float64 skip keeps its float32 rounding); float16's subnormal spacing near t_min
    info = torch.finfo(t.dtype)
    eps = 2 * max(info.eps, torch.finfo(torch.float32).eps)
    floor = (1e-12 * dense.T).clamp(min=info.smallest_normal * info.eps)                  # no host read
    lo, hi = dense.t_min * (1 - eps) - floor, dense.T * (1 + eps) + floor
    torch._assert_async(((tt >= lo) & (tt <= hi)).all(),
                        f"gddim_runtime: t outside [t_min, T] of {dense.path} (or NaN): draw times with sample_times")
    c = dense.at(tt.clamp(dense.t_min, dense.T))
    return {n: v.to(device=like.device) for n, v in c.items()}


def _as_dense(dense):
    """The dense coefficients, checked: a path is refused (reading the file at every training step would be
    the hidden cost), and so is a sampling Table (it holds the grid's coefficients only)."""
    from ._dense import DenseCoefficients
    if isinstance(dense, DenseCoefficients):
        return dense
    hint = (": load it once, dense = gddim_runtime.load_dense(path)" if isinstance(dense, (str, bytes))
            or hasattr(dense, "__fspath__") else "")
    raise TypeError(f"dense must be gddim_runtime.load_dense(<name>_dense.safetensors), got {type(dense).__name__}{hint}")


def _check_data(x, name):
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1 or x.shape[0] < 1:
        got = (f"{x.dtype} of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__)
        raise ValueError(f"{name} must be a real floating tensor [B, *data_shape] with B >= 1, got {got}")


def add_noise(dense, x0, t, generator=None):
    """(u_t, eps), both [B, k, *data_shape]: u_t = D_t [x0; 0] + R_t eps with eps ~ N(0, I).

    dense: ``load_dense(<name>_dense.safetensors)`` on x0's device; x0 [B, *data_shape] (any float
    dtype; the result has it); t [B] times in [t_min, T] (one per sample). Coefficients are evaluated
    in float64 (interpolation error <= 1e-12 relative) and cast to x0's dtype once.
    """
    dense = _as_dense(dense)
    _check_data(x0, "x0")
    B = x0.shape[0]
    if not torch.is_tensor(t) or t.shape != (B,):
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"t must be a tensor of shape [{B}] (one time per sample), got {got}")
    basis = dense.basis(x0.shape[1:])
    k = dense.k
    c = _coefficients(dense, t, x0)
    R, D = c["R"].to(x0.dtype), c["D"].to(x0.dtype)
    eps = torch.randn((B, k) + tuple(x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
    to_coef, to_data = _codec(basis)
    u = _per_sample(D, _lift(to_coef(x0), k), basis) + _per_sample(R, to_coef(eps), basis)
    return to_data(u), eps


def training_target(dense, x0, t, eps, parametrization="eps_R"):
    """The regression target whose conditional mean the network must learn, [B, k, *data_shape].

    With s = grad log p(u_t | x0) = -R^-T eps (the conditional score):
      eps_R   eps                        (gDDIM, K = R)
      eps_L   L^T R^-T eps = -L^T s      (K = L: Cholesky, as CLD-SGM)
      score   -R^-T eps
      x0      [x0; 0 ...]                (D^-1 (u_t - R eps): the runtime's x0 output, whose auxiliary
                                          components are those of D^-1 u_t's data part, i.e. 0)
    Each minimiser is the conditional expectation given u_t: the true eps_R, eps_L, score or
    E[D^-1 (u_t - R eps) | u_t], exactly what ``sample(..., parametrization=...)`` converts.
    """
    dense = _as_dense(dense)
    if parametrization == "eps_R":
        return eps
    if parametrization == "x0":
        return _lift(x0, dense.k)
    basis = dense.basis(x0.shape[1:])
    c = _coefficients(dense, t, eps)
    R, L = c["R"], c["L"]
    Rinv_T = torch.linalg.inv(R).transpose(-1, -2)
    if parametrization == "score":
        M = -Rinv_T
    elif parametrization == "eps_L":
        M = L.transpose(-1, -2) @ Rinv_T
    else:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose from {', '.join(PARAMETRIZATIONS)}")
    to_coef, to_data = _codec(basis)
    return to_data(_per_sample(M.to(eps.dtype), to_coef(eps), basis))


def diffusion_loss(dense, output, x0, t, eps, parametrization="eps_R", weighting=None, reduction="mean"):
    """Denoising loss of a model output in ``parametrization``; per sample the mean over [k, *data].

    Maths (s_theta the model's score, s = -R^-T eps the conditional score, Sigma_t = R R^T = L L^T):
      eps_R  |eps_theta - eps|^2 = (s_theta - s)^T Sigma_t (s_theta - s): denoising score matching
             weighted by Sigma_t = R_t R_t^T (for k = 1, VP: Ho et al.'s "simple" loss, lambda = sigma_t^2).
      eps_L  |eps_L,theta - L^T R^-T eps|^2 = (s_theta - s)^T L L^T (s_theta - s): the SAME weighting
             Sigma_t; eps_R and eps_L losses agree for the same score network. K = R vs K = L differ in
             what the network must represent (eps_R is flat along probability-flow paths), not in the loss.
      score  |s_theta - s|^2: unweighted score matching (lambda = I; its variance grows like Sigma^-1
             at small t). weighting="eps" multiplies the error by R^T and gives the eps_R loss.
      x0     |x0_theta - [x0; 0]|^2: data prediction; in eps units the error is R^-1 D (x0_theta - x0),
             i.e. weighting by D^T R^-T R^-1 D (the SNR for k = 1). weighting="eps" gives the eps_R loss.
    weighting: None (as above), "eps" (every parametrisation converted to eps_R units, so all four equal
    the eps_R loss of the equivalent network), or a tensor [B] of per-sample weights lambda(t).
    reduction: "mean" (scalar) or "none" ([B]).
    """
    dense = _as_dense(dense)
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"unknown parametrization {parametrization!r}; choose from {', '.join(PARAMETRIZATIONS)}")
    target = training_target(dense, x0, t, eps, parametrization)
    if not torch.is_tensor(output) or output.shape != target.shape:
        got = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
        raise ValueError(f"output has shape {got}, the {parametrization} target {tuple(target.shape)} "
                         "([B, k, *data_shape]; a network returning [B, *data_shape] for k = 1 needs .unsqueeze(1)): "
                         "broadcasting them would train on a wrong loss")
    err = output - target
    lam = None
    if isinstance(weighting, str):
        if weighting != "eps":
            raise ValueError(f"unknown weighting {weighting!r}: None, 'eps' or a tensor [B]")
        if parametrization in ("score", "x0"):
            basis = dense.basis(x0.shape[1:])
            c = _coefficients(dense, t, err)
            M = -c["R"].transpose(-1, -2) if parametrization == "score" else torch.linalg.solve(c["R"], c["D"])
            to_coef, to_data = _codec(basis)
            err = to_data(_per_sample(M.to(err.dtype), to_coef(err), basis))
        elif parametrization == "eps_L":
            basis = dense.basis(x0.shape[1:])
            c = _coefficients(dense, t, err)
            M = c["R"].transpose(-1, -2) @ torch.linalg.inv(c["L"]).transpose(-1, -2)   # eps_R = R^T L^-T eps_L
            to_coef, to_data = _codec(basis)
            err = to_data(_per_sample(M.to(err.dtype), to_coef(err), basis))
    elif weighting is not None:
        lam = torch.as_tensor(weighting, device=err.device)
        if lam.shape not in ((), (err.shape[0],)):
            raise ValueError(f"weighting must be a number, 'eps' or a tensor [{err.shape[0]}] (one weight per sample), "
                             f"got shape {tuple(lam.shape)}")
    per = err.pow(2).flatten(1).mean(dim=1)
    if lam is not None:
        per = per * lam.to(per.dtype)
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}: 'mean' or 'none'")
    return per.mean()


def gaussian_eps(dense, u, t, mean=0.0, var=1.0):
    """The exact eps_R of Gaussian data x0 ~ N(mean, var I) at (u_t, t): per coordinate (frequency for dct2d)
    eps = R^T (Sigma + var d d^T)^-1 (u - d mean), d = D_t e_0, Sigma = L L^T. u [B, k, *data_shape] in data
    space, t [B]; mean a number or a [*data_shape] tensor. Use it as a skip connection (the network learns
    eps - gaussian_eps): near T, where the true eps is this linear function of u, a plain network's small
    errors are amplified by the backward flow's expanding Psi (CLD diverges without it in a few thousand steps)."""
    dense = _as_dense(dense)
    _check_data(u, "u")
    if u.ndim < 2 or u.shape[1] != dense.k:
        raise ValueError(f"u must be [B, k = {dense.k}, *data_shape], got shape {tuple(u.shape)}")
    if not torch.is_tensor(t) or t.numel() not in (1, u.shape[0]):
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"t must be a tensor of shape [{u.shape[0]}] or a single time, got {got}")
    if torch.is_tensor(var) and var.numel() == 1 and var.is_floating_point():
        var = var.reshape(()).to(torch.float64)            # one number, kept on its device (no host read)
    elif isinstance(var, bool) or not isinstance(var, (int, float)) or not 0 <= var < float("inf"):
        raise ValueError(f"var must be a number >= 0 (one variance for every coordinate: the per-coordinate blocks "
                         f"are shared, so per-dimension variances cannot enter; pass their mean), got {var!r}")
    data_shape = tuple(u.shape[2:])
    basis = dense.basis(data_shape)
    c = _coefficients(dense, t.reshape(-1).expand(u.shape[0]), u)
    R, D, L = c["R"], c["D"], c["L"]
    d = D[..., :, :1]
    M = R.transpose(-1, -2) @ torch.linalg.inv(L @ L.transpose(-1, -2) + var * d @ d.transpose(-1, -2))
    to_coef, to_data = _codec(basis)
    m = torch.as_tensor(mean, dtype=torch.float64, device=u.device).expand((u.shape[0],) + data_shape)
    r = to_coef(u.to(torch.float64)) - _per_sample(D, _lift(to_coef(m), D.shape[-1]), basis)
    return to_data(_per_sample(M, r, basis)).to(u.dtype)


def sample_times(dense, batch, kind="uniform", generator=None, device=None, dtype=torch.float64):
    """t [batch] in [t_min, T]: uniform in t ("uniform"), uniform in sqrt(t) ("quadratic", the variable
    in which the paper's quadratic sampling grid is uniform: more weight at small t), or uniform in
    log t ("log"). Drawn on ``device`` (default: the dense file's) without host syncs."""
    dense = _as_dense(dense)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    dev = dense.edges.device if device is None else device
    lo, hi = dense.t_min.to(dev), dense.T.to(dev)
    v = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
    if kind == "uniform":
        t = lo + (hi - lo) * v
    elif kind == "quadratic":
        t = (lo.sqrt() + (hi.sqrt() - lo.sqrt()) * v) ** 2
    elif kind == "log":
        t = torch.exp(lo.log() + (hi.log() - lo.log()) * v)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; choose from {', '.join(TIME_SAMPLERS)}")
    return t.clamp(lo, hi).to(dtype)


__all__ = ["add_noise", "training_target", "diffusion_loss", "sample_times", "gaussian_eps", "PARAMETRIZATIONS", "TIME_SAMPLERS"]
