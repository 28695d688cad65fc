"""Sampler tables: weights against closed forms, MATH.md anchors, identities, exactness, grids."""

import gmpy2
import mpmath
import numpy as np
import pytest

from derive import _grids, _hp, _tables
from validation._reference import ScipyReference


def hp(x):
    return _hp.mpf(x)


def step(d, s, t, p_max=0):
    return _tables.step_moments(d, hp(s), hp(t), p_max)


def test_cld_one_step_anchor(derivations):
    """MATH.md section 8: R_t - Psi(t,s) R_s for s = 0.5 -> t = 0.45, and P_st for lam = 1."""
    d = derivations("cld")
    M0 = _hp.to_float64(step(d, 0.5, 0.45))[0, 0]
    np.testing.assert_allclose(M0, [[-0.183910, -0.101358], [0.536168, 0.260552]], atol=5e-7)
    _, P = _tables.stochastic_step(d, hp(0.5), hp(0.45), hp(1))
    np.testing.assert_allclose(_hp.to_float64(P)[0], [[0.046792, -0.070432], [-0.070432, 0.188201]], atol=5e-7)


@pytest.mark.parametrize("lam, variance, weight", [(0, None, -1.798964), (0.5, 0.340448, -2.014696),
                                                   (1, 0.715417, -2.397478)])
def test_vp_anchors(derivations, lam, variance, weight):
    """MATH.md section 8: VP linear, s = 0.6 -> t = 0.4."""
    d = derivations("vp_linear")
    if lam == 0:
        assert abs(float(step(d, 0.6, 0.4)[0, 0, 0, 0]) - weight) < 5e-7
        return
    w, P = _tables.stochastic_step(d, hp(0.6), hp(0.4), hp(lam))
    assert abs(float(w[0, 0, 0]) - weight) < 5e-7
    assert abs(float(P[0, 0, 0]) - variance) < 5e-7


def _alpha(t):
    return mpmath.exp(-(mpmath.mpf("0.1") * t + mpmath.mpf("19.9") * t ** 2 / 2))


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 2.0])
def test_vp_is_ddim_eta(derivations, lam):
    """VP: order 1 is DDIM; lam > 0 is DDIM-eta with variance (1-a_t)[1 - ((1-a_t)/(1-a_s))^l2 (a_s/a_t)^l2]."""
    d = derivations("vp_linear")
    for s, t in [(0.9, 0.7), (0.3, 0.29), (0.05, 0.001)]:
        with mpmath.workprec(_hp.PREC_BITS):
            at, as_ = _alpha(mpmath.mpf(t)), _alpha(mpmath.mpf(s))
            ddim = mpmath.sqrt(1 - at) - mpmath.sqrt(at / as_) * mpmath.sqrt(1 - as_)
            l2 = mpmath.mpf(lam) ** 2
            var = (1 - at) * (1 - ((1 - at) / (1 - as_)) ** l2 * (as_ / at) ** l2)
            M0 = mpmath.mpf(str(step(d, s, t)[0, 0, 0, 0]))
            assert abs(M0 - ddim) < 1e-45 * abs(ddim)
            _, P = _tables.stochastic_step(d, hp(s), hp(t), hp(lam))
            assert abs(mpmath.mpf(str(P[0, 0, 0])) - var) < 1e-45


@pytest.mark.parametrize("name", ["vp_linear", "cld"])
def test_lam_to_zero_is_deterministic(derivations, name):
    d = derivations(name)
    M0 = step(d, 0.5, 0.45)[0]
    w, P = _tables.stochastic_step(d, hp(0.5), hp(0.45), gmpy2.mpfr("1e-12"))
    assert _hp.abs_max(w - M0) / _hp.abs_max(M0) < 1e-20
    assert _hp.abs_max(P) < 1e-20


def test_stochastic_cov_is_psd(derivations):
    d = derivations("cld")
    for lam in (0.1, 1, 3):
        _, P = _tables.stochastic_step(d, hp(0.2), hp(0.1), hp(lam))
        eig = np.linalg.eigvalsh(_hp.to_float64(P)[0])
        assert eig.min() > 0 and np.allclose(_hp.to_float64(P)[0], _hp.to_float64(P)[0].T, rtol=0, atol=0)


CASES = [("vp_linear", "quadratic"), ("cld", "quadratic"), ("bdm", "quadratic"), ("psld", "logsnr")]
SLOW_CASES = [(n, g) for n in ("vp_linear", "vp_cosine", "ve", "sub_vp", "cld", "bdm", "psld", "hold3")
              for g in ("uniform", "quadratic", "logsnr", "edm") if (n, g) not in CASES]


def _check_table_properties(d, grid, corrector=True):
    order = 3
    times = _grids.make_grid(_grids.parse_kind(grid), 6, d)
    tab = _tables.build(d, times, order, corrector=corrector)
    W, C = tab["eps_weights"], tab["corrector_weights"]
    coords = sorted({0, d.Pu - 1})
    for i in range(len(times) - 1):
        target = tab["R"][i + 1] - tab["psi"][i] @ tab["R"][i]
        scale = _hp.abs_max(target)
        # sum of weights (predictor and corrector) = R_t - Psi R_s
        assert _hp.abs_max(W[i].sum(axis=0) - target) <= 1e-40 * scale
        assert _hp.abs_max(C[i].sum(axis=0) - target) <= 1e-40 * scale
        q = min(order, i + 1)
        assert all(v == 0 for v in np.ravel(W[i, q:]))                 # unused lags exactly zero
        # a polynomial eps of degree < q is integrated exactly: compare with scipy's direct quadrature
        for p in coords:
            ref = ScipyReference(d.spec, times, d.spec.basis.values()[int(np.nonzero(d.coord_index == p)[0][0])]
                                 if d.spec.basis.symbol is not None else None)
            nodes = [times[i - j] for j in range(q)]
            Cref = ref.weights(times[i], times[i + 1], nodes)
            for deg in range(q):
                poly = lambda r: (r - times[i]) ** deg + 0.5
                ours = sum(_hp.to_float64(W[i, j, p]) * poly(nodes[j]) for j in range(q))
                theirs = sum(Cref[j] * poly(nodes[j]) for j in range(q))
                np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=1e-10 * np.abs(theirs).max())


@pytest.mark.parametrize("name, grid", CASES)
def test_table_properties(derivations, name, grid):
    _check_table_properties(derivations(name), grid)


@pytest.mark.slow
@pytest.mark.parametrize("name, grid", SLOW_CASES)
def test_table_properties_all(derivations, name, grid):
    _check_table_properties(derivations(name), grid)


@pytest.mark.parametrize("grid", ["quadratic", "logsnr"])
def test_order1_is_ddim_step(derivations, grid):
    """VP order 1 = DDIM (Song et al. 2021, eta = 0) written from the schedule, not from derive:
    a(t) = exp(-(0.1 t + 19.9 t^2 / 2)), x_t = sqrt(a_t / a_s) x_s + (sqrt(1 - a_t) - sqrt(a_t / a_s)
    sqrt(1 - a_s)) eps. Every step of the built table at 45 digits, and its float64 rounding exact."""
    d = derivations("vp_linear")
    times = _grids.make_grid(_grids.parse_kind(grid), 6, d)
    tab = _tables.build(d, times, 1)
    f64 = _tables.to_float64(tab, d)
    with mpmath.workprec(_hp.PREC_BITS):
        for i in range(6):
            a_s, a_t = _alpha(mpmath.mpf(times[i])), _alpha(mpmath.mpf(times[i + 1]))
            psi = mpmath.sqrt(a_t / a_s)
            w = mpmath.sqrt(1 - a_t) - psi * mpmath.sqrt(1 - a_s)
            for value, ours, rounded in ((psi, tab["psi"][i, 0, 0, 0], f64["psi"][i, 0, 0, 0]),
                                         (w, tab["eps_weights"][i, 0, 0, 0, 0], f64["eps_weights"][i, 0, 0, 0, 0])):
                assert abs(mpmath.mpf(str(ours)) - value) < 1e-45 * abs(value)
                assert rounded == float(value)
            assert abs(mpmath.mpf(str(tab["R"][i + 1, 0, 0, 0])) - mpmath.sqrt(1 - a_t)) < 1e-45


@pytest.mark.parametrize("grid", ["uniform", "quadratic", "power:3", "logsnr", "edm", "edm:5"])
def test_grids(derivations, grid):
    d = derivations("vp_linear")
    times = _grids.make_grid(_grids.parse_kind(grid), 10, d)
    assert times[0] == 1.0 and times[-1] == 0.001 and len(times) == 11
    assert all(a > b for a, b in zip(times, times[1:]))
    rho = [float(x) for x in _grids._rho(d, _hp.array(times))]
    if grid == "logsnr":
        steps = np.diff(np.log(rho))
        np.testing.assert_allclose(steps, steps[0], rtol=1e-12)
    if grid.startswith("edm"):
        r = 7.0 if grid == "edm" else 5.0
        steps = np.diff(np.power(rho, 1 / r))
        np.testing.assert_allclose(steps, steps[0], rtol=1e-12)
    if grid == "quadratic":
        steps = np.diff(np.sqrt(times))
        np.testing.assert_allclose(steps, steps[0], rtol=1e-12)


def test_grid_rejects_nonmonotone(tmp_path, derivations):
    from derive._errors import SpecError
    d = derivations("vp_linear")
    f = tmp_path / "g.txt"
    for text in ("1 0.5 0.7 0.001", "1 0.5 0.5 0.001", "1 nan 0.001"):
        f.write_text(text)
        with pytest.raises(SpecError):
            _grids.make_grid(_grids.parse_kind(str(f)), 0, d)
