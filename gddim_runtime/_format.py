"""The coefficient-table file format: the one reader, and the constants the writer shares.

A table is a safetensors file (tensors cannot execute code on load, unlike pickle) holding
float64 tensors and one metadata entry, HEADER_KEY, whose value is a JSON object (one key,
because safetensors writes its metadata map in hash order; one key keeps files byte-stable):

    format          "gddim-table"
    format_version  FORMAT_VERSION
    meta            JSON text: provenance, grid, order, lam, NFE accounting, verification
    content_sha256  sha256 over (name, dtype, shape, bytes) of every tensor and ``meta``

Tensor layout (grid in sampling order, step i from t_i to t_{i+1}; P coordinates, k state):
    t [N+1]; psi [N,P,k,k]; R, sigma, L [N+1,P,k,k]; eps_weights [N,q,P,k,k];
    corrector_weights [N,q+1,P,k,k] (optional); eps_weights_sde, noise_chol [N,P,k,k]
    (optional, lam > 0); x0_weights [2,P,k,k] (state weight, eps weight);
    data_to_state [N+1,P,k,k] (D_t: E[u_t | data] = D_t data); F, GGT [N+1,P,k,k] (F(t_i), G G^T(t_i),
    for baselines that step on the grid).
Only numpy and safetensors are needed here.
"""

import hashlib
import json

import numpy as np

FORMAT = "gddim-table"
DENSE_FORMAT = "gddim-dense"
HEADER_KEY = "gddim"
FORMAT_VERSION = 1
REQUIRED = ("t", "psi", "R", "sigma", "L", "eps_weights", "x0_weights", "data_to_state", "F", "GGT")
OPTIONAL = ("corrector_weights", "eps_weights_sde", "noise_chol")
# Dense file (baselines that need coefficients off the grid, e.g. adaptive RK45): piecewise
# Chebyshev interpolants on [t_min, T]; edges [M+1], nodes [n+1] on [-1, 1] and, for each
# quantity, values [M, n+1, P, k, k] at the mapped nodes.
DENSE_REQUIRED = ("edges", "nodes", "F", "GGT", "R", "L", "D")


class TableError(ValueError):
    """A table file that cannot be used: one line naming the file and the problem."""


def content_hash(tensors, meta_json):
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(meta_json.encode())
    return h.hexdigest()


def _regular_file(path):
    """TableError unless ``path`` is a regular file (following links): a FIFO named *.safetensors blocked
    the reader for ever, Ctrl-C ignored; a folder read as 'truncated or not safetensors: No such device'."""
    import os
    import stat
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except OSError as exc:
        raise TableError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise TableError(f"{path}: {what}, not a table file")


def read_table(path, kind=FORMAT):
    """Load and check a table file; returns (tensors: dict of float64 numpy arrays, meta: dict).

    ``kind`` is FORMAT (sampler tables) or DENSE_FORMAT (dense interpolants).
    """
    from safetensors import SafetensorError, safe_open
    path = str(path)
    _regular_file(path)
    try:
        with safe_open(path, framework="np") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError, MemoryError) as exc:
        raise TableError(f"{path}: not a readable table (truncated or not safetensors): {exc}") from None
    try:
        header = json.loads(raw) if raw is not None else {}
    except ValueError:
        header = {}
    if not isinstance(header, dict) or header.get("format") != kind:
        found = header.get("format") if isinstance(header, dict) else None
        raise TableError(f"{path}: not a {kind} file (format {found!r})")
    version = header.get("format_version")
    if not (isinstance(version, str) and version.isascii() and version.isdigit()
            and version == str(int(version))):                                # as written: str(int), no "01"
        raise TableError(f"{path}: bad format_version {version!r}")
    version = int(version)
    if version > FORMAT_VERSION:
        raise TableError(f"{path}: written by a newer format version {version}; this reader knows "
                         f"{FORMAT_VERSION} (upgrade gddim-toolkit)")
    if version < 1:
        raise TableError(f"{path}: unknown format_version {version}")
    meta_json = header.get("meta", "")
    if not isinstance(meta_json, str):
        raise TableError(f"{path}: bad meta entry")
    if content_hash(tensors, meta_json) != header.get("content_sha256"):
        raise TableError(f"{path}: content hash mismatch (file edited or corrupted); regenerate it "
                         "with python -m derive")
    try:
        meta = json.loads(meta_json)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise TableError(f"{path}: meta is not a JSON object")
    missing = [n for n in (REQUIRED if kind == FORMAT else DENSE_REQUIRED) if n not in tensors]
    if missing:
        raise TableError(f"{path}: missing tensors {missing}")
    for name, a in tensors.items():
        if a.dtype != np.float64:
            raise TableError(f"{path}: tensor {name} is {a.dtype}, expected float64")
    return tensors, meta
