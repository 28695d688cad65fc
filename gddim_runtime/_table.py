"""A coefficient table on a device, and how its k x k blocks act on a state.

State layout: u has shape [B, k, *data_shape]: channel 1 holds the k state components (CLD:
u[:, 0] is x, u[:, 1] is v, each with the full data shape). ``split``/``merge`` convert to and
from the list-of-components form. With a dct2d basis the sampler works in frequency space
(orthonormal 2-D DCT-II of the last two axes) and block p = i * W + j acts on frequency (i, j).
"""

import dataclasses

import numpy as np
import torch

from ._format import REQUIRED, TableError, read_table


def usable_device(device, what="device"):
    """torch.device(device) when tensors can live there in this process, else TableError in one line
    ("cuda" without CUDA, "meta" (holds no data), a name torch does not know, a bad type). ``what``
    names the argument in the message."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TableError(f"{what} {device!r}: not a torch device ({str(exc).splitlines()[0]})") from None
    if dev.type == "meta":
        raise TableError(f"{what} {device!r}: the meta device holds no data; give cpu or cuda")
    try:
        torch.empty(0, device=dev)                    # "cuda" without CUDA, a missing cuda:N, "mps" ...
    except (RuntimeError, AssertionError) as exc:
        raise TableError(f"{what} {device!r}: not usable here ({str(exc).splitlines()[0]})") from None
    return dev


@dataclasses.dataclass
class Table:
    """Float64 coefficient tensors on one device plus the file's metadata."""
    tensors: dict
    meta: dict
    path: str = ""
    derived: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

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
        device = usable_device(device)
        return Table({n: v.to(device) for n, v in self.tensors.items()}, self.meta, self.path,
                     {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in self.derived.items()})

    def ggt_sqrt(self):
        """Symmetric PSD square root of G G^T at every grid time [N+1, P, k, k] (computed once per table)."""
        if "ggt_sqrt" not in self.derived:
            self.derived["ggt_sqrt"] = sqrt_psd(self.tensors["GGT"])
        return self.derived["ggt_sqrt"]

    def noise_on_last_only(self):
        """True when G G^T is zero outside its last row and column (CLD: noise drives v only)."""
        if "noise_on_last_only" not in self.derived:
            GGT, k = self.tensors["GGT"], self.k
            self.derived["noise_on_last_only"] = bool(k > 1 and not torch.any(GGT[..., :k - 1, :] != 0)
                                                      and not torch.any(GGT[..., :, :k - 1] != 0))
        return self.derived["noise_on_last_only"]


def sqrt_psd(M):
    """Symmetric PSD square root of [.., k, k] (float64 eigendecomposition)."""
    w, V = torch.linalg.eigh(M.to(torch.float64))
    return (V * w.clamp_min(0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def from_tensors(tensors, meta, device="cpu", path="<memory>"):
    """A Table from in-memory tensors (no file): the same names, shapes and checks as ``load``.

    ``tensors``: dict name -> float64 numpy array or torch tensor, named and shaped as in the
    file format (README 'Table format'; REQUIRED in ``_format``); ``meta``: the dict
    ``read_table`` returns (at least ``spec.basis``). The tensors are uploaded to ``device``
    as float64; ``path`` names the table in error messages.
    """
    device = usable_device(device)
    missing = [n for n in REQUIRED if n not in tensors]
    if missing:
        raise TableError(f"{path}: missing tensors {missing}")
    out = {}
    for name, a in tensors.items():
        if isinstance(a, np.ndarray):
            if a.dtype != np.float64:
                raise TableError(f"{path}: tensor {name} is {a.dtype}, expected float64")
            a = torch.from_numpy(np.ascontiguousarray(a))
        elif not isinstance(a, torch.Tensor):
            raise TableError(f"{path}: tensor {name} is a {type(a).__name__}, expected a numpy array or torch tensor")
        elif a.dtype != torch.float64:
            raise TableError(f"{path}: tensor {name} is {a.dtype}, expected float64")
        out[name] = a.to(device)
    try:
        basis_name, size = meta["spec"]["basis"]["kind"], tuple(meta["spec"]["basis"]["size"])
    except (KeyError, TypeError, IndexError):
        raise TableError(f"{path}: meta has no spec.basis (kind, size)") from None
    table = Table(out, meta, str(path))
    if out["t"].ndim != 1 or out["psi"].ndim != 4 or out["eps_weights"].ndim != 5:
        raise TableError(f"{path}: t, psi, eps_weights must have 1, 4 and 5 axes")
    N, P, k, q = out["t"].shape[0] - 1, table.P, table.k, table.order
    shapes = {"t": (N + 1,), "psi": (N, P, k, k), "eps_weights": (N, q, P, k, k), "x0_weights": (2, P, k, k),
              "corrector_weights": (N, q + 1, P, k, k), "eps_weights_sde": (N, P, k, k), "noise_chol": (N, P, k, k)}
    shapes.update({n: (N + 1, P, k, k) for n in ("R", "sigma", "L", "data_to_state", "F", "GGT")})
    shapes.update(x0_psi=(N, P, k, k), x0_weights_ms=(N, q, P, k, k), x0_weights_flat=(N, q, P, k, k),
                  x0_corrector_weights=(N, q + 1, P, k, k))
    unknown = sorted(set(out) - set(shapes))
    if unknown:                                       # a misspelt corector_weights was silently ignored
        raise TableError(f"{path}: unknown tensor {unknown[0]!r} (a table holds {', '.join(sorted(shapes))})")
    for name, a in out.items():
        if tuple(a.shape) != shapes[name]:
            raise TableError(f"{path}: tensor {name} has shape {tuple(a.shape)}, expected {shapes[name]}")
    _check_values(out, meta, basis_name, size, P, path)
    if torch.device(device).type != "cpu":
        # what samplers derive from the table with host decisions (eigh, structure checks), done here
        # on the CPU copy so that sampling on an accelerator never waits for the host
        cpu = Table({"GGT": torch.as_tensor(tensors["GGT"]), "psi": out["psi"][:0].cpu()}, meta)
        table.derived.update(ggt_sqrt=cpu.ggt_sqrt().to(device), noise_on_last_only=cpu.noise_on_last_only())
    return table


def _check_values(tensors, meta, basis_name, size, P, path):
    """What the samplers take on trust, checked once at load (TableError naming the tensor or key): every
    coefficient finite (a NaN weight was blamed on the model: "model output is not finite"), the grid
    strictly decreasing to t_min >= 0, the basis and the meta entries the samplers read well-formed."""
    for name, a in tensors.items():
        if not bool(torch.isfinite(a).all()):
            raise TableError(f"{path}: tensor {name} holds NaN or inf")
    t = tensors["t"]
    if not bool((t[1:] < t[:-1]).all()) or not bool(t[-1] >= 0):          # t_min = 0 with Sigma_0 > 0 is allowed
        raise TableError(f"{path}: tensor t must decrease strictly from t_0 to t_N = t_min >= 0")
    if basis_name not in ("identity", "dct2d") or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                          for n in size) or len(size) != (2 if basis_name == "dct2d" else 0):
        raise TableError(f"{path}: meta spec.basis {basis_name!r} of size {list(size)} is not a basis gddim_runtime knows")
    if basis_name == "dct2d" and P != size[0] * size[1]:
        raise TableError(f"{path}: basis {size} does not match P = {P}")
    if basis_name == "identity" and P != 1:                # it failed inside sampling with a ValueError (sweep 12)
        raise TableError(f"{path}: basis identity, but the tensors hold P = {P} coordinates (one expected)")
    _check_counts(t, meta, path)
    order = meta.get("order")
    if order is not None and order != tensors["eps_weights"].shape[1]:
        raise TableError(f"{path}: meta order {order!r}, but eps_weights hold {tensors['eps_weights'].shape[1]} lags")
    missing = [n for n in ("x0_psi", "x0_weights_ms") if meta.get("form") == "x0" and n not in tensors]
    if missing:
        raise TableError(f"{path}: meta form 'x0' without the data-prediction tensors {missing}")
    lam = meta.get("lam")
    if lam is not None:
        from fractions import Fraction
        try:
            ok = isinstance(lam, str) and Fraction(lam) > 0
        except (ValueError, ZeroDivisionError):
            ok = False
        if not ok:
            raise TableError(f"{path}: meta lam {lam!r} is not an exact number > 0 (as derive --lam writes it)")
    for key, allowed in (("denoise", (True, False)), ("form", ("eps", "x0")), ("variable", ("t", "rho", "logsnr"))):
        if key in meta and meta[key] not in allowed:
            raise TableError(f"{path}: meta {key} {meta[key]!r} is not one of {allowed}")


def _check_counts(t, meta, path):
    """meta steps and nfe against the grid (nfe = steps + the final denoise), t_0 against the spec's T."""
    from fractions import Fraction
    steps, nfe, denoise = meta.get("steps"), meta.get("nfe"), meta.get("denoise")
    if steps is not None and steps != t.shape[0] - 1:
        raise TableError(f"{path}: meta steps {steps!r}, but tensor t holds {t.shape[0] - 1} steps")
    if None not in (steps, nfe) and denoise in (True, False) and nfe != steps + int(denoise):
        raise TableError(f"{path}: meta nfe {nfe!r} is not steps {steps} + {int(denoise)} (denoise {denoise})")
    T = meta["spec"].get("T")
    if T is not None:
        try:
            T = float(Fraction(str(T)))
        except (ValueError, ZeroDivisionError):
            raise TableError(f"{path}: meta spec.T {T!r} is not a number") from None
        if float(t[0]) > T:
            raise TableError(f"{path}: tensor t starts at {float(t[0])!r}, beyond the spec's T = {T!r}")


def load(path, device="cpu"):
    """Read, check (format version, content hash) and upload a table once; float64 on ``device``."""
    usable_device(device)                             # before reading the file
    arrays, meta = read_table(path)
    return from_tensors(arrays, meta, device=device, path=str(path))


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
