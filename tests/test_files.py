"""Generated files: regenerate-and-diff, determinism, atomic writes, the reader's refusals."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT, run_derive
from derive._writer import atomic_write, table_bytes
from gddim_runtime._format import HEADER_KEY, TableError, read_table

COEFFS = ROOT / "coeffs"


def _compare_folder(committed, fresh):
    """Byte comparison; where only tool versions differ (another machine), compare the rest."""
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    for name in names:
        a, b = (committed / name).read_bytes(), (fresh / name).read_bytes()
        if a == b:
            continue
        if name.endswith(".safetensors"):
            (ta, ma), (tb, mb) = read_table(committed / name), read_table(fresh / name)
            assert ma["tools"] != mb["tools"], f"{name} differs although the tool versions are the same"
            for key in ta:
                assert ta[key].tobytes() == tb[key].tobytes(), f"{name}: tensor {key} changed"
        else:
            raise AssertionError(f"{name} differs from a fresh regeneration (run python -m derive {committed.name})")


@pytest.mark.parametrize("name", ["vp_linear", "cld", pytest.param("bdm", marks=pytest.mark.slow)])
def test_committed_coeffs_regenerate(tmp_path, name):
    proc = run_derive(name, "--out", tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    _compare_folder(COEFFS / name, tmp_path / name)


def test_deterministic_across_processes(tmp_path):
    """Same spec and options in two processes with different hash seeds: identical bytes."""
    import subprocess
    import sys
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", "derive", "sub_vp", "--nfe", "6", "--out", str(out), "--quiet"],
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append(out / "sub_vp")
    for p in outs[0].iterdir():
        assert p.read_bytes() == (outs[1] / p.name).read_bytes(), p.name


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.safetensors"
    target.write_bytes(b"old")

    def crash(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.safetensors"]     # no temp left


def _small_table(tmp_path):
    tensors = {"t": np.array([1.0, 0.5]), "psi": np.ones((1, 1, 1, 1)), "R": np.ones((2, 1, 1, 1)),
               "sigma": np.ones((2, 1, 1, 1)), "L": np.ones((2, 1, 1, 1)), "eps_weights": np.ones((1, 1, 1, 1, 1)),
               "x0_weights": np.ones((2, 1, 1, 1)), "data_to_state": np.ones((2, 1, 1, 1)),
               "F": np.ones((2, 1, 1, 1)), "GGT": np.ones((2, 1, 1, 1))}
    path = tmp_path / "x.safetensors"
    path.write_bytes(table_bytes(tensors, {"note": "test"}))
    return path


def test_reader_refuses_bad_files(tmp_path):
    path = _small_table(tmp_path)
    read_table(path)                                              # sound file loads
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-9])
    with pytest.raises(TableError, match="truncated"):
        read_table(tmp_path / "trunc.safetensors")
    # edit one float64 in the payload: content hash mismatch
    edited = bytearray(data)
    edited[-3] ^= 0x01
    (tmp_path / "edit.safetensors").write_bytes(bytes(edited))
    with pytest.raises(TableError, match="hash mismatch"):
        read_table(tmp_path / "edit.safetensors")
    # a newer format version
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    inner = json.loads(header["__metadata__"][HEADER_KEY])
    inner["format_version"] = "99"
    header["__metadata__"][HEADER_KEY] = json.dumps(inner)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    (tmp_path / "new.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(TableError, match="newer format version 99"):
        read_table(tmp_path / "new.safetensors")
    with pytest.raises(TableError, match="no such file"):
        read_table(tmp_path / "missing.safetensors")


def test_inspect_and_plot(tmp_path):
    table = COEFFS / "cld" / "cld_nfe10_quadratic_q3.safetensors"
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "derive", "inspect", str(table), "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "command: `python -m derive cld --nfe 10 --order 3 --grid quadratic`" in proc.stdout
    assert "verification" in proc.stdout and (tmp_path / "p.png").stat().st_size > 10000
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "derive", "inspect", str(bad)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
