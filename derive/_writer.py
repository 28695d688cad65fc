"""The one writer of coefficient files (format defined in gddim_runtime/_format.py).

Every write is atomic: the bytes go to a temporary file in the target folder, are flushed
and fsynced, then renamed over the target, so an interrupted run leaves the previous file.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from gddim_runtime._format import FORMAT, FORMAT_VERSION, HEADER_KEY, content_hash


def atomic_write(path, data):
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)                 # mkstemp makes 0600; give a normal file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def table_bytes(tensors, meta, kind=FORMAT):
    """Serialise float64 tensors + metadata (deterministic: sorted keys, fixed separators)."""
    from safetensors.numpy import save
    tensors = {name: np.ascontiguousarray(a, dtype=np.float64).copy() for name, a in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    header = {"format": kind, "format_version": str(FORMAT_VERSION), "meta": meta_json,
              "content_sha256": content_hash(tensors, meta_json)}
    return save(dict(sorted(tensors.items())), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
