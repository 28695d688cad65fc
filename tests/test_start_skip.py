"""The start skip (derive/_start.py): grids '<kind>@<rho_s>' that start at t_s < T, and the skipped state.

References: the spec's own closed forms (VP linear: rho(t) = sqrt(expm1(beta_0 t + (beta_1 - beta_0) t^2 / 2)),
VE: rho = sigma(t)), the exact probability flow integrated by dopri5 (the skip is exact when the data are a Dirac
at 0, x0hat = 0), and validation's full check of tables derived on such grids.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import derive
from derive import _grids, _start
from derive._errors import SpecError


def _vp_rho(t):
    return math.sqrt(math.expm1(0.1 * t + 9.95 * t * t))


@pytest.fixture(scope="module")
def vp():
    return derive.derive("vp_linear")


@pytest.mark.parametrize("rho_s", [25.0, 60.0, 3.0])
def test_start_time_and_grids_vp(vp, rho_s):
    """t_s has rho(t_s) = rho_s (closed form, 1e-12); power grids follow their formula from t_s; the logsnr grid
    is uniform in log rho from rho_s down to rho(t_min)."""
    d = vp.derivation
    t_s = _start.start_time(d, rho_s)
    assert abs(_vp_rho(t_s) / rho_s - 1) < 1e-12
    for kappa in (1.0, 2.0, 3.5):
        text = {1.0: "uniform", 2.0: "quadratic"}.get(kappa, f"power:{kappa}") + f"@{rho_s:g}"
        times = _start.make_grid(text, 7, d)
        a, b = t_s ** (1 / kappa), 1e-3 ** (1 / kappa)
        ref = [(a + (b - a) * i / 7) ** kappa for i in range(8)]
        assert times[0] == t_s and times[-1] == 1e-3
        assert max(abs(x - y) for x, y in zip(times, ref)) < 1e-14
    times = _start.make_grid(f"logsnr@{rho_s:g}", 6, d)
    lr = [math.log(_vp_rho(t)) for t in times]
    steps = np.diff(lr)
    assert times[0] == t_s and np.allclose(steps, steps[0], rtol=1e-9, atol=0)
    assert abs(lr[0] - math.log(rho_s)) < 1e-12


def test_start_at_or_above_rho_T_is_the_plain_grid(vp):
    """rho_s >= rho(T) (VP linear: 152) skips nothing: the same times as the grid from T."""
    d = vp.derivation
    for kind in ("quadratic", "logsnr", "edm"):
        assert _start.make_grid(f"{kind}@1000", 6, d) == _grids.make_grid(_grids.parse_kind(kind), 6, d)


def test_start_ve_is_sigma(vp):
    """VE: rho = sigma(t), so t_s is where sigma(t_s) = rho_s (the spec's sigma, closed form)."""
    d = derive.derive("ve").derivation
    t_s = _start.start_time(d, 10.0)
    sig = math.sqrt(float(d.sigma(np.array([_start._hp.mpf(t_s)], dtype=object))[0, 0, 0, 0]))
    assert abs(sig / 10.0 - 1) < 1e-12


@pytest.mark.parametrize("text, problem", [("quadratic@-1", "rho_s > 0"), ("quadratic@x", "rho_s > 0"),
                                           ("auto@25", "applies to"), ("nope@25", "unknown grid"),
                                           ("quadratic@0.001", r"at or below rho\(t_min\)")])
def test_bad_start(vp, text, problem):
    with pytest.raises(SpecError, match=problem):
        _start.make_grid(text, 5, vp.derivation)


@pytest.mark.parametrize("name, shape", [("vp_linear", (6,)), ("cld", (4,))])
def test_skipped_state_is_the_exact_flow_for_zero_data(name, shape):
    """Data = a Dirac at 0 (x0hat = 0 at every t): the exact probability flow (dopri5 at 1e-11 on the dense
    coefficients) from u_T = R_T z at T to t_s equals skip_map u_T = R_ts R_T^-1 u_T, for VP and CLD (k = 2)."""
    import gddim_runtime as gr
    from validation.bench import Tables
    from validation.exact import DenseModel, MixtureScore
    d = derive.derive(name)
    deriv = d.derivation
    t_s = _start.start_time(deriv, 25.0)
    assert t_s < float(_start._hp.mpf(deriv.spec.T))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.txt"
        path.write_text(f"{float(_start._hp.mpf(deriv.spec.T))!r} {t_s!r}\n")
        tab = d.table(nfe=2, order=1, grid=str(path), verify="none").to_runtime()
    dense = Tables(name).dense_coeffs()
    mix = MixtureScore(torch.zeros((1,) + shape, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    k = deriv.k
    z = torch.randn((16, k) + shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u_T = gr.block_apply(tab.tensors["R"][0], z, tab.basis)
    u = gr.sample(DenseModel(mix, dense), tab, x_T=u_T, sampler="probability_flow_rk45", dense=dense, rtol=1e-11,
                  atol=1e-11, dtype=torch.float64, denoise=False)
    skipped = gr.block_apply(torch.from_numpy(_start.skip_map(deriv, t_s)), u_T, tab.basis)
    off = float((u - skipped).abs().max() / skipped.abs().max())
    assert off < 1e-7
    assert float((u - u_T).abs().max() / skipped.abs().max()) > 1e3 * off      # the flow did move the state


@pytest.mark.slow          # 25 s alone, ~2 min on the shared machine: validation's full check of two tables
@pytest.mark.parametrize("name", ["vp_linear", "cld"])
def test_start_tables_pass_the_full_check(name):
    """Tables on a grid that starts at t_s (x0 form, corrector, order 3) pass validation's full check."""
    d = derive.derive(name)
    times = _start.make_grid("quadratic@25", 5, d.derivation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.txt"
        path.write_text(" ".join(map(repr, times)) + "\n")
        tab = d.table(nfe=6, order=3, grid=str(path), form="x0", corrector=True, verify="full")
    assert tab.meta["verification"]["passed"] is True
    assert float(tab.tensors["t"][0]) == times[0] < float(_start._hp.mpf(d.spec.T))


def test_grid_option_start(vp, tmp_path):
    """derive's own grid option '<kind>@<rho_s>': the same times as derive/_start.py, its own file name, the runtime
    starts there (fresh noise R_t0 z), bad starts refused in one line; the CLI writes such a table."""
    import subprocess
    import sys
    import gddim_runtime as gr
    from validation.exact import MixtureScore, TableModel
    tab = vp.table(nfe=6, order=3, grid="quadratic@25", form="x0", corrector=True, verify="fast")
    assert list(tab.tensors["t"]) == _start.make_grid("quadratic@25", 5, vp.derivation)
    assert "quadratic-from-rho25" in tab.filename and tab.meta["grid"]["kind"] == "start"
    assert vp.table(nfe=6, grid="logsnr@60", verify="none").filename != vp.table(nfe=6, grid="logsnr@25",
                                                                                      verify="none").filename
    rt = tab.to_runtime()
    mix = MixtureScore(torch.zeros(1, 4, dtype=torch.float64), torch.full((1,), 0.1, dtype=torch.float64))
    u, info = gr.sample(TableModel(mix, rt), rt, batch=3, data_shape=(4,), dtype=torch.float64, return_info=True,
                        generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == 6 and torch.isfinite(u).all()
    for bad in ("auto@25", "quadratic@0", "quadratic@0.001"):
        with pytest.raises(SpecError):
            vp.table(nfe=6, grid=bad, verify="none")
    out = subprocess.run([sys.executable, "-m", "derive", "vp_linear", "--nfe", "6", "--order", "2", "--grid",
                          "logsnr@25", "--out", str(tmp_path), "--verify", "fast"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "vp_linear").glob("*logsnr-from-rho25*.safetensors"))
    assert "note" not in out.stdout
    # rho(T) = 149 for vp_linear: a start at 1e6 skips nothing, and the CLI says so (it said nothing)
    rho_T = float(_grids._rho(vp.derivation, np.array([_start._hp.mpf(1)], dtype=object))[0])
    assert 100 < rho_T < 1e6
    out = subprocess.run([sys.executable, "-m", "derive", "vp_linear", "--nfe", "6", "--order", "2", "--grid",
                          "logsnr@1e6", "--out", str(tmp_path), "--verify", "fast"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "note: --grid logsnr@1e6: " in out.stdout and "starts at T" in out.stdout, out
