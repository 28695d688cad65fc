"""Coefficients at any t in [t_min, T] from a dense file: piecewise Chebyshev, barycentric, float64."""

import torch

from ._format import DENSE_FORMAT, TableError, read_table


class DenseCoefficients:
    """F, G G^T, R, L, D (data-to-state) at arbitrary t, on the device, without host syncs."""

    def __init__(self, tensors, meta, path=""):
        self.meta, self.path = meta, path
        self.edges, self.nodes = tensors["edges"], tensors["nodes"]
        self.values = {n: tensors[n] for n in ("F", "GGT", "R", "L", "D")}
        n = self.nodes.shape[0] - 1
        w = torch.ones(n + 1, dtype=torch.float64, device=self.nodes.device)
        w[1::2] = -1                                       # Chebyshev points: w_j = (-1)^j, halved at the ends
        w[0] *= 0.5
        w[-1] *= 0.5
        self.weights = w

    def at(self, t):
        """dict name -> [P, k, k] at the 0-d tensor t (float64)."""
        t = t.to(torch.float64)
        i = (torch.searchsorted(self.edges, t.reshape(1), right=True) - 1).clamp(0, len(self.edges) - 2)[0]
        a, b = self.edges[i], self.edges[i + 1]
        x = 2 * (t - a) / (b - a) - 1
        d = x - self.nodes
        hit = d == 0
        c = torch.where(hit, torch.ones_like(d), self.weights / torch.where(hit, torch.ones_like(d), d))
        c = torch.where(hit.any(), hit.to(c.dtype), c)
        c = c / c.sum()
        return {name: torch.tensordot(c, v[i], dims=([0], [0])) for name, v in self.values.items()}

    def to(self, device):
        tensors = {"edges": self.edges, "nodes": self.nodes, **self.values}
        return DenseCoefficients({k: v.to(device) for k, v in tensors.items()}, self.meta, self.path)


def load_dense(path, device="cpu"):
    import numpy as np
    arrays, meta = read_table(path, kind=DENSE_FORMAT)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}
    return DenseCoefficients(tensors, meta, str(path))
