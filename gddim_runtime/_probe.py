"""A table's sampler on Gaussian data, whose score is exact and linear in the state: does it follow the flow?

The coefficient checks (validation) prove every number of a table; they cannot see whether the
sampler built from those numbers is stable on the process. An explicit multistep extrapolation of
eps has a bounded stability region: on a stiff drift (F = [[-200, 1], [0, -1]], order 3, quadratic
grid) verified tables gave samples of size 1e60 / 1e49 / 1e25 at NFE 10 / 50 / 200 for data of
size 0.5, finite, so nothing failed. ``gaussian_probe`` runs the table's sampler on data N(0, s^2)
per data coordinate, whose score at the grid times follows from the table's own sigma and D.
"""

import torch

from ._dct import dct2, idct2
from ._samplers import SamplingError, sample
from ._table import block_apply


def gaussian_probe(table, sampler=None, scale=1.0, batch=256, seed=0):
    """The rms of the samples' data component over ``batch`` prior draws, divided by ``scale``, when the
    model is the exact score of data N(0, scale^2) in every data coordinate: about 1 for a sampler
    that follows the probability flow (less at low NFE, where modes come out narrow; 0.5-1.1 on the
    committed tables), 1e2 .. 1e60 or inf where the sampler is unstable on the process. ``sampler``:
    default the table's own (``default_sampler``). One sample() call in float64 on the table's device."""
    tensors = table.tensors
    t, basis = tensors["t"], table.basis
    d = tensors["data_to_state"][..., :1]                                # [N+1, P, k, 1]: the data's column
    S_inv = torch.linalg.inv(tensors["sigma"] + scale ** 2 * d @ d.transpose(-1, -2))
    dct = basis[0] == "dct2d"

    def score(x, tt):
        i = int((t == tt[0]).nonzero()[0, 0])                              # the samplers call at grid times
        u = dct2(x) if dct else x
        s = -block_apply(S_inv[i], u, basis)
        return idct2(s) if dct else s
    data_shape = (1,) + tuple(basis[1]) if dct else (1,)
    try:
        u = sample(score, table, batch=batch, data_shape=data_shape, parametrization="score", sampler=sampler,
                   dtype=torch.float64, generator=torch.Generator(t.device).manual_seed(seed), progress=False)
    except SamplingError:                                                   # the state overflowed to inf / NaN
        return float("inf")
    x = u[:, 0]
    return float(x.square().mean().sqrt() / scale) if bool(torch.isfinite(x).all()) else float("inf")
