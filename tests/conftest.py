import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SDES = ROOT / "derive" / "sdes"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def derivations():
    """Derivation objects of the built-in specs, built once per session."""
    from derive._derivation import Derivation
    from derive._spec import load_spec
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Derivation(load_spec(SDES / f"{name}.yaml"))
        return cache[name]
    return get


def run_derive(*args, cwd=None):
    """Run python -m derive in a subprocess; returns CompletedProcess."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "derive", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=env, timeout=600)


def forbid_host_reads(patch):
    """Make every device-to-host read raise (patch: pytest's monkeypatch or one of its contexts).

    On CPU a tensor read costs nothing, so this is how the tests see a host sync that on CUDA would
    stall the stream: bool/item/int/float/tolist on a tensor and torch.tensor(...) inside sample.
    The runtime's one deliberate read (the NaN flag after the loop) is switched off."""
    import torch
    from gddim_runtime import _samplers

    def boom(*a, **k):
        raise AssertionError("host read inside sample")
    for name in ("__bool__", "item", "__int__", "__float__", "tolist"):
        patch.setattr(torch.Tensor, name, boom)
    patch.setattr(torch, "tensor", boom)
    patch.setattr(_samplers, "_first_bad", lambda plan: -1)
