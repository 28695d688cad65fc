"""The checker: passes sound tables, fails on each planted defect (mutation tests)."""

import numpy as np
import pytest

from conftest import ROOT, SDES
from derive._pipeline import TableOptions, build_table, tool_versions
from validation import check_table


@pytest.fixture(scope="module")
def cld_table(derivations):
    return _unverified_table(derivations("cld"), "cld", nfe=4)


def _unverified_table(d, name, nfe):
    """(spec, tensors, meta) of an order-2 quadratic table with lam = 1 and the corrector, unchecked."""
    request = TableOptions(nfe=(nfe,), order=2, grid="quadratic", lam=("1",), corrector=True,
                           denoise=False).requests(d.spec)[0]
    tensors, meta = build_table(d, request, name, tool_versions(), verify="none")
    return d.spec, tensors, meta


def _mutants(tensors):
    """(name, mutated tensors) for each planted defect."""
    out = []
    t = {k: v.copy() for k, v in tensors.items()}
    t["eps_weights"][2, 1, 0, 1, 0] *= 1 + 1e-9
    out.append(("one weight off by 1e-9", t))
    t = {k: v.copy() for k, v in tensors.items()}
    t["psi"][1, 0, 0, 1] *= 1 + 1e-9
    out.append(("one psi entry off by 1e-9", t))
    t = {k: v.copy() for k, v in tensors.items()}
    t["noise_chol"] = np.ascontiguousarray(np.swapaxes(t["noise_chol"], -1, -2))
    out.append(("transposed P_st factor", t))
    t = {k: v.copy() for k, v in tensors.items()}
    t["eps_weights"] = np.ascontiguousarray(t["eps_weights"][:, ::-1])
    out.append(("lag order swapped", t))
    t = {k: v.copy() for k, v in tensors.items()}
    t["R"] = t["L"].copy()
    out.append(("L instead of R", t))
    return out


@pytest.mark.slow
def test_full_check_passes_sound_table(cld_table):
    spec, tensors, meta = cld_table
    report = check_table(spec, tensors, meta, level="full")
    assert report.passed, report.text()
    assert max(r.rel for r in report.rows) < 1e-13


@pytest.fixture(scope="module")
def vp_small(derivations):
    """VP, 3 steps, order 2, lam = 1, corrector: every tensor kind a table can hold, small enough for
    the full 45-digit check in the default run (about 8 s of CPU)."""
    return _unverified_table(derivations("vp_linear"), "vp_linear", nfe=3)


def test_full_check_of_every_quantity(vp_small):
    """The full level (mpmath, 45 digits) on a small table, every quantity: the checker's rows for the
    weights, P_st, psi, Sigma, R, L, x0 and derive's closed forms, and here data_to_state, F and G G^T
    against the same reference; all within 1e-13 relative (float64 rounding)."""
    import mpmath
    from validation._reference import DPS, MpReference
    spec, tensors, meta = vp_small
    report = check_table(spec, tensors, meta, level="full")
    assert report.passed, report.text()
    checked = {r.quantity.split(" (")[0] for r in report.rows if r.method.startswith("mpmath")}
    assert checked == {"psi", "sigma", "R", "L", "eps_weights", "corrector_weights", "eps_weights_sde", "noise_chol",
                       "x0_weights"}, checked
    assert max(r.rel for r in report.rows) < 1e-13
    ref = MpReference(spec)
    with mpmath.workdps(DPS):
        for i, t in enumerate(tensors["t"]):
            tm = mpmath.mpf(float(t))
            G = ref.G(tm)
            for name, value in (("data_to_state", ref.data_to_state(tm)), ("F", ref.F(tm)), ("GGT", G * G.T)):
                ours = mpmath.mpf(float(tensors[name][i, 0, 0, 0]))
                assert abs(ours - value[0, 0]) <= 1e-13 * abs(value[0, 0]), (name, i)
    assert tensors["t"][0] == float(spec.T) and tensors["t"][-1] == float(spec.t_min)


def test_fast_check_catches_mutants(cld_table):
    """The fast check (identities + scipy) must catch the defects identities can see."""
    spec, tensors, meta = cld_table
    assert check_table(spec, tensors, meta, level="fast").passed
    for name, mutant in _mutants(tensors):
        if name == "lag order swapped" or name == "L instead of R":
            continue                      # sums and R R^T stay intact: only a reference sees these
        assert not check_table(spec, mutant, meta, level="fast").passed, name


@pytest.mark.slow
def test_full_check_catches_every_mutant(cld_table):
    spec, tensors, meta = cld_table
    for name, mutant in _mutants(tensors):
        report = check_table(spec, mutant, meta, level="full")
        assert not report.passed, name


def test_fast_check_catches_lag_swap_and_L(cld_table):
    spec, tensors, meta = cld_table
    for name, mutant in _mutants(tensors)[3:]:
        assert not check_table(spec, mutant, meta, level="fast").passed, name


def test_cli_on_committed_folder(tmp_path):
    import os
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "validation", str(ROOT / "coeffs" / "vp_linear"), "--level", "fast"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 3 and "max rel err" in proc.stdout
