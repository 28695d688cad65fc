"""Orthonormal 2-D DCT-II over the last two axes, as two matrix products (any device, any dtype)."""

import functools
import math

import torch


@functools.lru_cache(maxsize=16)
def dct_matrix(n, dtype=torch.float64, device="cpu"):
    """C [n, n] with C[k, m] = s_k cos(pi (2m + 1) k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n).

    Built in float64 on ``device`` itself (no host-to-device copy, so no host sync on a GPU).
    """
    k = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(1)
    m = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(0)
    C = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    C[0] /= math.sqrt(2.0)
    return C.to(dtype=dtype)


def dct2(x):
    """Orthonormal DCT-II of the last two axes (scipy.fft.dctn(x, type=2, norm='ortho'))."""
    H, W = x.shape[-2:]
    CH, CW = dct_matrix(H, x.dtype, x.device), dct_matrix(W, x.dtype, x.device)
    return CH @ x @ CW.T


def idct2(y):
    """Inverse of ``dct2`` (the transposes: the matrices are orthogonal)."""
    H, W = y.shape[-2:]
    CH, CW = dct_matrix(H, y.dtype, y.device), dct_matrix(W, y.dtype, y.device)
    return CH.T @ y @ CW
