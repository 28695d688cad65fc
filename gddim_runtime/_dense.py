"""Coefficients at any t in [t_min, T] from a dense file: piecewise Chebyshev, barycentric, float64."""

import torch

from ._format import DENSE_FORMAT, TableError, read_table
from ._table import usable_device

NAMES = ("F", "GGT", "R", "L", "D")


class DenseCoefficients:
    """F, G G^T, R, L, D (data-to-state) at arbitrary t, on the device, without host syncs."""

    def __init__(self, tensors, meta, path=""):
        self.meta, self.path = meta, path
        self.edges, self.nodes = tensors["edges"], tensors["nodes"]
        self.values = {n: tensors[n] for n in NAMES}
        n = self.nodes.shape[0] - 1
        w = torch.ones(n + 1, dtype=torch.float64, device=self.nodes.device)
        w[1::2] = -1                                       # Chebyshev points: w_j = (-1)^j, halved at the ends
        w[0] *= 0.5
        w[-1] *= 0.5
        self.weights = w

    @property
    def P(self):
        """Number of coordinate blocks (1, or H * W frequencies for a dct2d basis)."""
        return self.values["R"].shape[2]

    @property
    def k(self):
        return self.values["R"].shape[-1]

    @property
    def t_min(self):
        return self.edges[0]

    @property
    def T(self):
        return self.edges[-1]

    def basis(self, data_shape):
        """(kind, size) for data of ``data_shape``: identity when P = 1, else dct2d over the last two axes.

        The only per-coordinate basis a spec can declare is dct2d. Its size [H, W] is in the file's meta
        (spec.basis.size, derive writes it) and the data's last two axes must equal it: images of the same
        H * W but transposed or reshaped would put each frequency's coefficients on another DCT frequency.
        A file without it (in-memory tensors) is matched on H * W = P alone."""
        if self.P == 1:
            return ("identity", ())
        size = tuple(int(n) for n in tuple(data_shape)[-2:])
        recorded = ((self.meta or {}).get("spec") or {}).get("basis") or {}
        want = tuple(recorded["size"]) if recorded.get("kind") == "dct2d" and recorded.get("size") else None
        if len(size) != 2 or size[0] * size[1] != self.P or (want is not None and size != want):
            need = f"must be {want}" if want is not None else f"must multiply to {self.P}"
            raise TableError(f"{self.path}: {self.P} frequency blocks (dct2d) do not fit data of shape "
                             f"{tuple(data_shape)}: the last two axes {need}")
        return ("dct2d", size)

    def at(self, t):
        """Coefficients at t (float64). A 0-d t gives dict name -> [P, k, k]; t of shape [B] (any
        times, one per sample) gives dict name -> [B, P, k, k]. Everything stays on the device."""
        t = t.to(torch.float64)
        if t.dim() == 0:
            return {name: v[0] for name, v in self._at(t.reshape(1)).items()}
        if t.dim() != 1:
            raise ValueError(f"t must be 0-d or [B], got shape {tuple(t.shape)}")
        return self._at(t)

    def _at(self, t):
        M = len(self.edges) - 1
        t = t.contiguous()
        i = (torch.searchsorted(self.edges, t, right=True) - 1).clamp(0, M - 1)        # panel per time [B]
        a, b = self.edges[i], self.edges[i + 1]
        x = (2 * (t - a) / (b - a) - 1).unsqueeze(1)                                 # [B, 1] in [-1, 1]
        d = x - self.nodes                                                           # [B, n+1]
        hit = d == 0
        c = torch.where(hit, torch.ones_like(d), self.weights / torch.where(hit, torch.ones_like(d), d))
        c = torch.where(hit.any(dim=1, keepdim=True), hit.to(c.dtype), c)            # exactly on a node
        c = c / c.sum(dim=1, keepdim=True)
        out = {}
        for name, v in self.values.items():
            vi = v[i]                                                                # [B, n+1, P, k, k]
            out[name] = torch.bmm(c.unsqueeze(1), vi.reshape(vi.shape[0], vi.shape[1], -1)).reshape(
                (vi.shape[0],) + tuple(vi.shape[2:]))
        return out

    def to(self, device):
        # no usable_device check: a network holding its coefficients (the learned skip) moves them with
        # nn.Module.to / _apply, the meta device included (deferred initialisation)
        if isinstance(device, torch.dtype):        # converted silently, then failed later in a float64 matmul
            raise TypeError(f"DenseCoefficients.to takes a device, not a dtype ({device}): the coefficients stay "
                            "float64 (the helpers return results in the inputs' dtype)")
        tensors = {"edges": self.edges, "nodes": self.nodes, **self.values}
        return DenseCoefficients({k: v.to(device) for k, v in tensors.items()}, self.meta, self.path)


def dense_from_tensors(tensors, meta=None, device="cpu", path="<memory>"):
    """DenseCoefficients from in-memory arrays (no file): dict name -> float64 numpy array or torch tensor,
    named as in the dense file (edges, nodes, F, GGT, R, L, D), uploaded to ``device``."""
    import numpy as np
    device = usable_device(device)
    missing = [n for n in ("edges", "nodes", *NAMES) if n not in tensors]
    if missing:
        raise TableError(f"{path}: missing dense tensors {missing}")
    out = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v).to(device)
           for k, v in tensors.items()}
    _check_dense(out, meta, path)
    return DenseCoefficients(out, meta or {}, path)


def _check_dense(tensors, meta, path):
    """The structure DenseCoefficients relies on, checked once (TableError naming the tensor): float64 and
    finite everywhere (a NaN panel made table_from_dense's adaptive quadrature run for ever), edges strictly
    increasing from t_min >= 0 and matching meta's t_min and T, nodes the Chebyshev points the barycentric
    weights assume, every value tensor [panels, nodes, P, k, k] with
    one P and k, meta a mapping. Edited dense files raised IndexError / ValueError / AttributeError deep
    inside, or sampled wrong (sweep 6)."""
    for name in ("edges", "nodes", *NAMES):
        a = tensors[name]
        if not torch.is_tensor(a) or a.dtype != torch.float64:
            raise TableError(f"{path}: dense tensor {name} must be float64, got "
                             f"{a.dtype if torch.is_tensor(a) else type(a).__name__}")
        if not bool(torch.isfinite(a).all()):
            raise TableError(f"{path}: dense tensor {name} holds NaN or inf")
    edges, nodes = tensors["edges"], tensors["nodes"]
    if edges.ndim != 1 or len(edges) < 2 or not bool((edges[1:] > edges[:-1]).all()) or not bool(edges[0] >= 0):
        raise TableError(f"{path}: dense tensor edges must increase strictly from t_min >= 0 to T")
    n = len(nodes) - 1
    cheb = -torch.cos(torch.pi * torch.arange(n + 1, dtype=torch.float64, device=nodes.device) / max(n, 1))
    if nodes.ndim != 1 or n < 1 or not bool(((nodes - cheb).abs() <= 1e-15).all()):
        raise TableError(f"{path}: dense tensor nodes must be the Chebyshev points -cos(pi j / n), j = 0..n "
                         "(the weights assume them)")
    R = tensors["R"]
    if R.ndim != 5 or R.shape[-1] != R.shape[-2]:
        raise TableError(f"{path}: dense tensor R has shape {tuple(R.shape)}, expected [panels, nodes, P, k, k]")
    want = (len(edges) - 1, len(nodes), R.shape[2], R.shape[3], R.shape[4])
    for name in NAMES:
        if tuple(tensors[name].shape) != want:
            raise TableError(f"{path}: dense tensor {name} has shape {tuple(tensors[name].shape)}, expected {want} "
                             "([panels, nodes, P, k, k])")
    if meta is not None and not isinstance(meta, dict) or not isinstance((meta or {}).get("spec", {}), dict):
        raise TableError(f"{path}: dense meta (and its spec entry) must be JSON objects")
    spec = (meta or {}).get("spec", {})
    for key, at in (("t_min", 0), ("T", -1)):          # exact numbers as text ("1/1000"); edges hold them rounded
        if key in spec:
            from fractions import Fraction
            try:
                exact = float(Fraction(spec[key]))
            except (TypeError, ValueError, ZeroDivisionError):
                raise TableError(f"{path}: dense meta spec.{key} {spec[key]!r} is not an exact number") from None
            if abs(float(edges[at]) - exact) > 4e-16 * abs(exact):
                raise TableError(f"{path}: dense edges run from {float(edges[0]):.17g} to {float(edges[-1]):.17g}, "
                                 f"but the spec's {key} is {spec[key]}")


def load_dense(path, device="cpu"):
    usable_device(device)                             # before reading the file
    arrays, meta = read_table(path, kind=DENSE_FORMAT)
    return dense_from_tensors(arrays, meta, device, str(path))
