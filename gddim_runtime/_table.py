"""A coefficient table on a device, and how its k x k blocks act on a state.

State layout: u has shape [B, k, *data_shape]: channel 1 holds the k state components (CLD:
u[:, 0] is x, u[:, 1] is v, each with the full data shape). ``split``/``merge`` convert to and
from the list-of-components form. With a dct2d basis the sampler works in frequency space
(orthonormal 2-D DCT-II of the last two axes) and block p = i * W + j acts on frequency (i, j).
"""

import dataclasses

import numpy as np
import torch

from ._format import TableError, read_table


@dataclasses.dataclass
class Table:
    """Float64 coefficient tensors on one device plus the file's metadata."""
    tensors: dict
    meta: dict
    path: str = ""

    @property
    def device(self):
        return self.tensors["t"].device

    @property
    def t(self):
        return self.tensors["t"]

    @property
    def k(self):
        return self.tensors["psi"].shape[-1]

    @property
    def P(self):
        return self.tensors["psi"].shape[1]

    @property
    def steps(self):
        return self.tensors["psi"].shape[0]

    @property
    def order(self):
        return self.tensors["eps_weights"].shape[1]

    @property
    def basis(self):
        b = self.meta["spec"]["basis"]
        return b["kind"], tuple(b["size"])

    def __getitem__(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise TableError(f"{self.path}: table has no {name!r} (derive it with the matching option, "
                             "e.g. --corrector or --lam)") from None

    def has(self, name):
        return name in self.tensors

    def to(self, device):
        return Table({n: v.to(device) for n, v in self.tensors.items()}, self.meta, self.path)


def load(path, device="cpu"):
    """Read, check (format version, content hash) and upload a table once; float64 on ``device``."""
    arrays, meta = read_table(path)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in arrays.items()}
    table = Table(tensors, meta, str(path))
    kind, size = table.basis
    if kind == "dct2d" and table.P != size[0] * size[1]:
        raise TableError(f"{path}: basis {size} does not match P = {table.P}")
    return table


def split(u):
    """[B, k, *data] -> list of k tensors [B, *data] (CLD: [x, v])."""
    return list(u.unbind(1))


def merge(parts):
    """Inverse of ``split``."""
    return torch.stack(list(parts), dim=1)


def block_apply(M, u, basis):
    """Apply per-coordinate k x k blocks M [P, k, k] to u [B, k, *data] (frequency space for dct2d).

    P = 1: one batched matmul (10x faster than einsum here). dct2d: per-frequency blocks as
    broadcast products over the last two axes (k = 1 is a single elementwise product).
    """
    if M.shape[0] == 1:
        out = torch.matmul(M[0], u.reshape(u.shape[0], u.shape[1], -1))
        return out.reshape((u.shape[0], M.shape[-2]) + tuple(u.shape[2:]))
    H, W = basis[1]
    Mhw = M.view(H, W, *M.shape[1:])
    rows, cols = M.shape[-2:]
    if rows == cols == 1:
        return u * Mhw[..., 0, 0]
    return torch.stack([sum(Mhw[..., a, b] * u[:, b] for b in range(cols)) for a in range(rows)], dim=1)
