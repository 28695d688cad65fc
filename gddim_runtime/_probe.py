"""A table's sampler on Gaussian data, whose score is exact and linear in the state: does it follow the flow?

The coefficient checks (validation) prove every number of a table; they cannot see whether the
sampler built from those numbers is stable on the process. An explicit multistep extrapolation of
eps has a bounded stability region: on a stiff drift (F = [[-200, 1], [0, -1]], order 3, quadratic
grid) verified tables gave samples of size 1e60 / 1e49 / 1e25 at NFE 10 / 50 / 200 for data of
size 0.5, finite, so nothing failed. ``gaussian_probe`` runs the table's sampler on data N(0, s^2)
per data coordinate, whose score at the grid times follows from the table's own sigma and D.
"""

import warnings

import torch

from ._dct import dct2, idct2
from ._samplers import _PROBING, NonFiniteError, default_sampler, final_denoise, sample
from ._table import block_apply


PROBE_LIMIT = 10          # measured: 0.6-1.55 on the committed tables; unstable ones 1e2 .. 1e61 or inf


class UnstableSamplerWarning(UserWarning):
    """A table whose own sampler strays from the probability flow on Gaussian data (``gaussian_probe``
    at or above ``PROBE_LIMIT``): its coefficients are right, the multistep is unstable on the process."""


def warn_if_unstable(table, name=None, sampler=None, lam=None):
    """``gaussian_probe(table, sampler, lam=lam)`` (default: the table's own sampler), kept on the table per
    (sampler, lam); an ``UnstableSamplerWarning`` naming the table and the sampler when it is >= PROBE_LIMIT."""
    sampler = default_sampler(table) if sampler is None else sampler
    cache = table.derived.setdefault("probe", {})
    if (sampler, lam) in cache:
        return cache[sampler, lam]
    ratio = cache[sampler, lam] = gaussian_probe(table, sampler, lam=lam)
    if not ratio < PROBE_LIMIT:
        cure = ("more steps, or a gddim sampler (the exponential integrator takes the linear drift exactly)"
                if sampler in ("euler_maruyama", "heun") else
                "--order auto (derive), another sampler, a lower order or more steps")
        warnings.warn(UnstableSamplerWarning(
            f"{name or table.path}: its sampler ({sampler}) is unstable on this process: with the "
            f"exact score of Gaussian data its samples or its state before the final denoising come out {ratio:.3g} "
            f"times their exact size (gr.gaussian_probe; 0.6-1.6 on the committed tables); the coefficients are "
            f"right, the steps are not (a stiff or oscillating drift, too few steps): use {cure}"), stacklevel=3)
    return ratio


def gaussian_probe(table, sampler=None, scale=1.0, batch=256, seed=0, lam=None):
    """How far the table's sampler strays from the probability flow when the model is the exact score of
    data N(0, scale^2) in every data coordinate: the largest of (a) the rms of the samples' data component
    over ``scale`` (after the final denoising when the table takes it) and (b) per state component, the rms
    of the state at t_N (before the denoising) over its exact rms sqrt(diag(Sigma + scale^2 d d^T)), d the
    data's column of D. About 1 for a sampler that follows the flow (less at low NFE, where modes come
    out narrow, or widens CLD's v before the denoising; 0.60-1.55 on the committed tables); 1e2 .. 1e60 or inf where the sampler is unstable on the
    process. (b) sees what the denoising projects away: an eps-form corrector that blew a noise-free
    component up 2000x (a Jordan-block process, sweep 7) kept (a) at 1.0. ``sampler``: default the table's
    own (``default_sampler``); lam: Euler-Maruyama's. One sample() call in float64 on the table's device; a
    sampler the table cannot run raises SamplingError (it was reported as inf, i.e. as unstable)."""
    tensors = table.tensors
    t, basis = tensors["t"], table.basis
    d = tensors["data_to_state"][..., :1]                                # [N+1, P, k, 1]: the data's column
    V = tensors["sigma"] + scale ** 2 * d @ d.transpose(-1, -2)           # the state's covariance
    S_inv = torch.linalg.inv(V)
    dct = basis[0] == "dct2d"

    def score(x, tt):
        i = int((t == tt[0]).nonzero()[0, 0])                              # the samplers call at grid times
        u = dct2(x) if dct else x
        s = -block_apply(S_inv[i], u, basis)
        return idct2(s) if dct else s
    data_shape = (1,) + tuple(basis[1]) if dct else (1,)
    token = _PROBING.set(True)
    try:
        u = sample(score, table, batch=batch, data_shape=data_shape, parametrization="score", sampler=sampler,
                   dtype=torch.float64, generator=torch.Generator(t.device).manual_seed(seed), progress=False,
                   denoise=False, **({} if lam is None else {"lam": lam}))
    except NonFiniteError:                                                  # the state overflowed to inf / NaN
        return float("inf")
    finally:
        _PROBING.reset(token)
    if not bool(torch.isfinite(u).all()):
        return float("inf")
    var = torch.diagonal(V[-1], dim1=-2, dim2=-1).mean(0)                  # [k], over coordinates (orthonormal DCT)
    ms = u.square().transpose(0, 1).reshape(u.shape[1], -1).mean(1)
    state = (ms / var.clamp(min=1e-6 * float(var.max()))).sqrt().max()     # a nearly noise-free component: floor
    if table.meta.get("denoise", True):
        u = final_denoise(table, u, score(u, t[-1:]), "score")
    x = u[:, 0]
    return max(float(x.square().mean().sqrt() / scale), float(state))
