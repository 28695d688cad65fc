"""Table variants: the multistep variable (t | rho | logsnr) and the data-prediction form (x0).

References are independent of derive's algebra: DPM-Solver++'s closed forms for VP (mpmath),
validation's mpmath / scipy references (check_variant_table, MpReference), and an exact
probability-flow solution for Gaussian data (scipy, from the spec's F, G, Sigma_0).
"""


import mpmath
import numpy as np
import pytest
import torch

import derive
import gddim_runtime as gr
from conftest import forbid_host_reads
from derive._errors import SpecError
from derive._pipeline import TableRequest
from gddim_runtime._variants import gddim_x0, gddim_x0_pc
from validation._check_variants import check_variant_table, integrand_mp, tau_mp
from validation._reference import MpReference, _gl_vector
from validation.exact import MixtureScore, TableModel


@pytest.fixture(scope="module")
def vp():
    return derive.derive("vp_linear", verifier=check_variant_table)


@pytest.fixture(scope="module")
def cld():
    return derive.derive("cld", verifier=check_variant_table)


@pytest.fixture
def x0_sampler():
    """The data-prediction sampler's name, as the runtime registers it (gddim_runtime/_samplers.py)."""
    assert gr.SAMPLERS["gddim_x0"] is gddim_x0 and gr.SAMPLERS["gddim_x0_pc"] is gddim_x0_pc
    return "gddim_x0"


# ----- VP = DPM-Solver++ ------------------------------------------------------------------------
def _vp_alpha_sigma(t):
    t = mpmath.mpf(t)
    log_a = -(mpmath.mpf("0.1") * t + mpmath.mpf("19.9") * t ** 2 / 2)
    return mpmath.exp(log_a / 2), mpmath.sqrt(-mpmath.expm1(log_a))


def _dpm_solver_pp(times, i, q):
    """DPM-Solver++ weights of x0 at t_i, t_{i-1}, ... for the step t_i -> t_{i+1} (Lu et al. 2022,
    Taylor/"heun" form; 3M with the exact quadratic's D2 coefficient), and sigma_t / sigma_s."""
    with mpmath.workdps(40):
        lam = [mpmath.log(a / s) for a, s in map(_vp_alpha_sigma, times)]
        a_t, s_t = _vp_alpha_sigma(times[i + 1])
        s_s = _vp_alpha_sigma(times[i])[1]
        h = lam[i + 1] - lam[i]
        phi1 = mpmath.expm1(-h)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - mpmath.mpf(1) / 2
        out = []
        for e in np.eye(q):
            m = [mpmath.mpf(v) for v in e]
            x = -a_t * phi1 * m[0]
            if q >= 2:
                r0 = (lam[i] - lam[i - 1]) / h
                D1_0 = (m[0] - m[1]) / r0
                D1 = D1_0
                if q == 3:
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    D1_1 = (m[1] - m[2]) / r1
                    D2 = (D1_0 - D1_1) / (r0 + r1)
                    D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
                    x -= 2 * a_t * phi3 * D2          # exact quadratic (DPM-Solver's 3M code: 1 x)
                x += a_t * phi2 * D1
            out.append(float(x))
        return np.array(out), float(s_t / s_s)


@pytest.mark.parametrize("grid", ["logsnr", "quadratic"])
def test_vp_x0_weights_are_dpm_solver_pp(vp, grid):
    tab = vp.table(nfe=7, order=3, grid=grid, variable="logsnr", form="x0", verify="none")
    t, X, Xpsi = tab.tensors["t"], tab.tensors["x0_weights_ms"], tab.tensors["x0_psi"]
    for i in range(len(t) - 1):
        q = min(3, i + 1)
        ref, ratio = _dpm_solver_pp(t, i, q)
        assert np.allclose(X[i, :q, 0, 0, 0], ref, rtol=1e-13, atol=0), (i, X[i, :q, 0, 0, 0], ref)
        assert abs(Xpsi[i, 0, 0, 0] - ratio) <= 1e-15 * ratio
        assert np.all(X[i, q:] == 0)
    # order 2 in the paper's "midpoint" form differs by O(h^2) in the D1 coefficient: not what we emit
    with mpmath.workdps(30):
        lam = [mpmath.log(a / s) for a, s in map(_vp_alpha_sigma, t[:3])]
        h, r = lam[2] - lam[1], (lam[1] - lam[0]) / (lam[2] - lam[1])
        a_t = _vp_alpha_sigma(t[2])[0]
        midpoint_lag1 = float(a_t * mpmath.expm1(-h) / (2 * r))
    assert abs(X[1, 1, 0, 0, 0] - midpoint_lag1) > 1e-3 * abs(midpoint_lag1)


def test_vp_dpm_solver_pp_needs_logsnr(vp):
    """With the polynomial in t (or rho) the x0 weights are not DPM-Solver++ (order >= 2)."""
    for variable in ("t", "rho"):
        tab = vp.table(nfe=7, order=2, grid="logsnr", variable=variable, form="x0", verify="none")
        ref, _ = _dpm_solver_pp(tab.tensors["t"], 3, 2)
        assert not np.allclose(tab.tensors["x0_weights_ms"][3, :2, 0, 0, 0], ref, rtol=1e-6)


def test_x0_order1_is_ddim_on_vp(vp, x0_sampler):
    """Order 1: the x0 form and the eps form are the same DDIM step (different arithmetic)."""
    tab = vp.table(nfe=8, order=1, grid="quadratic", form="x0", verify="none").to_runtime()
    mix = MixtureScore(torch.tensor([[1.0, -1.0], [-0.5, 0.5]], dtype=torch.float64), [0.1, 0.2])
    x_T = torch.randn((32, 1, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=x0_sampler, dtype=torch.float64)
    b = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler="gddim", dtype=torch.float64)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


# ----- independent verification --------------------------------------------------------------------
@pytest.mark.parametrize("variable,form", [("rho", "eps"), ("logsnr", "x0"), ("t", "x0")])
def test_vp_variant_tables_pass_the_check(vp, variable, form):
    tab = vp.table(nfe=8, order=3, grid="quadratic", variable=variable, form=form, corrector=variable != "t")
    assert tab.meta["variable"] == variable and tab.meta["form"] == form
    rep = tab.verify("fast", verifier=check_variant_table)
    rows = {r.quantity for r in rep.rows}
    assert rep.passed, rep.text()
    assert ("x0_weights_ms" in rows) == (form == "x0")
    assert ("eps_weights" in rows and ("corrector_weights" in rows) == (variable != "t"))


@pytest.mark.parametrize("name,delta", [("x0_weights_ms", 1e-5), ("eps_weights", 1e-5), ("x0_psi", 1e-5)])
def test_check_catches_a_planted_defect(vp, name, delta):
    tab = vp.table(nfe=6, order=2, grid="quadratic", variable="rho", form="x0", verify="none")
    tensors = dict(tab.tensors)
    bad = tensors[name].copy()
    bad[2, ..., 0, 0] *= 1 + delta            # one step, one lag (eps/x0 weights: [2, 0]; psi: [2])
    if bad.ndim == 5:
        bad[2, 1:] = tab.tensors[name][2, 1:]
    tensors[name] = bad
    assert check_variant_table(vp.spec, tab.tensors, tab.meta, level="fast").passed
    assert not check_variant_table(vp.spec, tensors, tab.meta, level="fast").passed


def test_swapped_lags_fail(vp):
    tab = vp.table(nfe=6, order=3, grid="quadratic", variable="logsnr", form="x0", verify="none")
    tensors = dict(tab.tensors)
    X = tensors["x0_weights_ms"].copy()
    X[2, [0, 1]] = X[2, [1, 0]]             # step 2: one the fast level checks
    tensors["x0_weights_ms"] = X
    assert not check_variant_table(vp.spec, tensors, tab.meta, level="fast").passed


def test_exact_on_polynomials_in_tau(vp):
    """sum_j X_j tau(t_{i-j})^m = int X(r) tau(r)^m dr for m < q (validation's mpmath integrand, 45 digits)."""
    tab = vp.table(nfe=6, order=3, grid="quadratic", variable="logsnr", form="x0", verify="none")
    t, X = tab.tensors["t"], tab.tensors["x0_weights_ms"]
    i = 3
    with mpmath.workdps(45):
        ref = MpReference(vp.spec)
        tm = [mpmath.mpf(float(v)) for v in t]
        taus = [tau_mp(ref, x, "logsnr") for x in tm]
        tau_s = taus[i]

        def f(r):
            W = integrand_mp(ref, "x0", tm[i + 1], r)
            return [W * (tau_mp(ref, r, "logsnr") - tau_s) ** m for m in range(3)]
        J = _gl_vector(f, tm[i], tm[i + 1], 3, 1)
        for m in range(3):
            lhs = sum(X[i, j, 0, 0, 0] * float((taus[i - j] - tau_s) ** m) for j in range(3))
            assert abs(lhs - float(J[m][0, 0])) <= 1e-13 * abs(float(J[0][0, 0])), m


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["logsnr", "t"])
def test_cld_x0_tables_full_check(cld, variable):
    tab = cld.table(nfe=6, order=3, grid="quadratic", variable=variable, form="x0", verify="none")
    rep = tab.verify("full", verifier=check_variant_table)
    assert rep.passed, rep.text()


def test_cld_x0_table_fast_check(cld):
    tab = cld.table(nfe=6, order=2, grid="logsnr", variable="logsnr", form="x0", verify="fast")
    assert tab.meta["verification"]["passed"]
    assert "sum_j x0_weights_ms = D_t - R_t R_s^-1 D_s" in tab.meta["verification"]["identities_hp"]


# ----- options, names, unchanged defaults ------------------------------------------------------------
def test_request_options_and_names(vp):
    r = vp.request(10, order=3, variable="logsnr", form="x0")      # order 3: the paper's grid (default: auto)
    assert r.label("vp_linear") == "vp_linear_nfe10_quadratic_q3_inlogsnr_x0"
    assert r.command("vp_linear").endswith("--grid quadratic --variable logsnr --form x0")
    plain = vp.request(10, order=3)
    assert (plain.variable, plain.form) == ("t", "eps") and not plain.is_variant
    assert plain.label("vp_linear") == "vp_linear_nfe10_quadratic_q3"
    assert "variable" not in plain.command("vp_linear")
    for bad in ({"variable": "sigma"}, {"form": "v"}):
        with pytest.raises(SpecError) as exc:
            TableRequest(nfe=10, **bad)
        assert list(bad)[0] in str(exc.value)


def test_default_table_unchanged_by_explicit_defaults(vp):
    a = vp.table(nfe=5, order=2, verify="none")
    b = vp.table(nfe=5, order=2, variable="t", form="eps", verify="none")
    assert a.to_bytes() == b.to_bytes()
    assert "variable" not in a.meta and "x0_psi" not in a.tensors


def test_cli_writes_variant_file(tmp_path):
    from conftest import run_derive
    proc = run_derive("vp_linear", "--nfe", "5", "--order", "2", "--variable", "rho", "--form", "x0",
                      "--no-verify", "--out", tmp_path, "--quiet")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "vp_linear" / "vp_linear_nfe5_quadratic_q2_inrho_x0.safetensors"
    table = gr.load(path)
    assert table.meta["variable"] == "rho" and table.has("x0_weights_ms")
    assert "x0_weights_ms" in (tmp_path / "vp_linear" / "vp_linear_nfe5_quadratic_q2_inrho_x0.md").read_text()
    bad = run_derive("vp_linear", "--variable", "sigma", "--out", tmp_path)
    assert bad.returncode == 2


# ----- the runtime sampler ------------------------------------------------------------------------------
def test_x0_dirac_data_exact_on_cld(cld, x0_sampler):
    """Dirac data: x0hat is constant, so every step is exact: u(t_min) = D m0 + R z with z = R_T^-1 u_T,
    D and R from validation's mpmath reference; no final denoise."""
    mu = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    mix = MixtureScore(mu, [0.0])
    def mat(M):
        return torch.tensor([[float(v) for v in row] for row in M.tolist()], dtype=torch.float64)
    tab0 = cld.table(nfe=6, order=3, grid="quadratic", form="x0", verify="none").to_runtime()
    with mpmath.workdps(20):
        ref = MpReference(cld.spec, dps=20)
        t0, tmin = mpmath.mpf(float(tab0.t[0])), mpmath.mpf(float(tab0.t[-1]))
        D, R, D_T, R_T = mat(ref.data_to_state(tmin)), mat(ref.R(tmin)), mat(ref.data_to_state(t0)), mat(ref.R(t0))
    for variable in ("t", "logsnr"):
        tab = cld.table(nfe=6, order=3, grid="quadratic", variable=variable, form="x0", verify="none").to_runtime()
        z = torch.randn((8, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        m0 = torch.stack([mu[0], torch.zeros(2, dtype=torch.float64)])           # [k, n]: data in the x component
        x_T = D_T @ m0 + torch.einsum("ab,nbj->naj", R_T, z)
        out = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=x0_sampler, dtype=torch.float64, denoise=False)
        exact = D @ m0 + torch.einsum("ab,nbj->naj", R, z)
        scale = exact.abs().max()
        assert float((out - exact).abs().max() / scale) <= 1e-11, variable


def _gaussian_flow_reference(spec, mu, c):
    """Exact probability flow T -> t_min for data N(mu, c^2 I): u(t_min) = M u_T + beta mu (scipy, float64)."""
    from scipy.integrate import solve_ivp
    from validation._reference import ScipyReference
    k = spec.k
    T, tmin = float(spec.T), float(spec.t_min)
    ref = ScipyReference(spec, [tmin, T])
    e0 = np.zeros(k)
    e0[0] = 1

    def rhs(t, y):
        M, beta = y[:k * k].reshape(k, k), y[k * k:]
        G, D = ref.G(t), ref.data_to_state(t)
        De = D @ e0
        H = 0.5 * G @ G.T @ np.linalg.inv(ref.sigma(t) + c ** 2 * np.outer(De, De))
        A = ref.F(t) + H
        return np.concatenate([(A @ M).ravel(), A @ beta - H @ De])
    sol = solve_ivp(rhs, (T, tmin), np.concatenate([np.eye(k).ravel(), np.zeros(k)]), method="Radau",
                    rtol=1e-12, atol=1e-14)
    return torch.from_numpy(sol.y[:k * k, -1].reshape(k, k).copy()), torch.from_numpy(sol.y[k * k:, -1].copy())


@pytest.mark.slow
def test_x0_convergence_order_on_cld(cld, x0_sampler):
    """Gaussian data (x0hat varies along the path): error of the x0 form at t_min vs the exact flow,
    NFE 10, 20, 40 on the logsnr grid; fitted slopes ~ the order (measured -1.80 for q = 2, -2.85 for q = 3)."""
    mu, c = torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.5
    mix = MixtureScore(mu, [c])
    M, beta = _gaussian_flow_reference(cld.spec, mu, c)
    z = torch.randn((16, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nfes = (10, 20, 40)
    for q, variable, lo in ((2, "logsnr", 1.6), (3, "t", 2.5)):
        errs = []
        for nfe in nfes:
            tab = cld.table(nfe=nfe, order=q, grid="logsnr", variable=variable, form="x0", verify="none").to_runtime()
            x_T = gr.block_apply(tab.tensors["R"][0], z, tab.basis)
            exact = torch.einsum("ab,nbj->naj", M, x_T) + beta[None, :, None] * mu[0][None, None, :]
            out = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=x0_sampler, dtype=torch.float64, denoise=False)
            errs.append(float((out - exact)[:, 0].abs().max()))
        slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
        assert lo <= slope <= q + 1, (q, errs, slope)


def test_x0_corrector_table_and_sampler(vp, cld, x0_sampler):
    """--form x0 --corrector: x0_corrector_weights pass the independent check (VP, fast), and the
    UniC-style sampler is exact on Dirac data (CLD; any correct weights are) with N + 1 model calls."""
    tab = vp.table(nfe=7, order=2, grid="logsnr", variable="logsnr", form="x0", corrector=True)
    rep = tab.verify("fast", verifier=check_variant_table)
    assert rep.passed and "x0_corrector_weights" in {r.quantity for r in rep.rows}, rep.text()
    bad = dict(tab.tensors)
    bad["x0_corrector_weights"] = bad["x0_corrector_weights"].copy()
    bad["x0_corrector_weights"][2, 1] *= 1 + 1e-5
    assert not check_variant_table(vp.spec, bad, tab.meta, level="fast").passed
    mu = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    tabc = cld.table(nfe=6, order=3, grid="quadratic", variable="logsnr", form="x0", corrector=True,
                     verify="none").to_runtime()
    ref = cld.table(nfe=6, order=3, grid="quadratic", variable="logsnr", form="x0", verify="none").to_runtime()
    x_T = torch.randn((8, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mix = MixtureScore(mu, [0.0])
    a, info = gr.sample(TableModel(mix, tabc), tabc, x_T=x_T, sampler="gddim_x0_pc", dtype=torch.float64,
                        return_info=True)
    b = gr.sample(TableModel(mix, ref), ref, x_T=x_T, sampler="gddim_x0", dtype=torch.float64, denoise=True)
    assert info["nfe"] == 6
    assert float((a - b).abs().max()) <= 1e-11 * float(b.abs().max())     # both exact: x0hat = mu throughout
    assert torch.allclose(a[:, 0], mu[0].expand(8, 2), atol=1e-9)


def test_a_verifier_blind_to_variants_is_refused():
    """derive refuses a variant table whose verifier did not check the variant tensors (no silent pass)."""
    from derive._errors import VerificationFailed
    from validation._check import check_table

    def blind(spec, tensors, meta, level="fast"):
        base = {n: v for n, v in tensors.items() if n in ("x0_weights",) or not n.startswith("x0_")}
        return check_table(spec, base, {k: v for k, v in meta.items() if k not in ("variable", "form")}, level=level)
    d = derive.derive("vp_linear", verifier=blind)
    with pytest.raises(VerificationFailed, match="did not check x0_psi, x0_weights_ms"):
        d.table(nfe=5, order=2, form="x0")
    assert d.table(nfe=5, order=2).meta["verification"]["passed"]          # plain tables: unchanged


@pytest.mark.parametrize("parametrization", ["eps_R", "eps_L", "x0"])
def test_x0_samplers_never_read_the_host(cld, x0_sampler, monkeypatch, parametrization):
    """As tests/test_runtime.py's check for the built-in samplers: every host read raises inside sample."""
    tab = cld.table(nfe=6, order=2, grid="quadratic", variable="rho", form="x0", corrector=True, verify="none").to_runtime()
    x_T = torch.randn((3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = lambda x, t: 0.1 * x * t.view(-1, 1, 1)
    outs = {}
    for sampler in ("gddim_x0", "gddim_x0_pc"):
        with monkeypatch.context() as m:
            forbid_host_reads(m)
            outs[sampler] = gr.sample(model, tab, x_T=x_T, sampler=sampler, parametrization=parametrization,
                                      dtype=torch.float64, return_info=True)
        assert torch.isfinite(outs[sampler][0]).all() and outs[sampler][1]["nfe"] == 6


# ----- the flat predictor and the endings of gddim_x0_pc (issue 12) -------------------------------------------
def test_vp_flat_weights_are_unipc_bh2(vp):
    """x0_weights_flat for VP in logsnr, order 2, is UniPC's UniP-2 with B(h) = e^h - 1 ("bh2", diffusers'
    multistep_uni_p_bh_update: x_t = sigma_t/sigma_s x - alpha_t (e^-h - 1) m0 - alpha_t B_h rho D1 with
    rho = 1/2, B_h = e^-h - 1, D1 = (m1 - m0) / r1, r1 = (lambda_{i-1} - lambda_i) / h; equally DPM-Solver++ 2M
    in the "midpoint" form, diffusers' default solver_type), mpmath; order 3:
    M_0 times the Adams-Bashforth coefficients in lambda (exact on 1, y, y^2 with flat weight)."""
    tab = vp.table(nfe=7, order=3, grid="logsnr", variable="logsnr", form="x0", verify="none")
    t, X3 = tab.tensors["t"], tab.tensors["x0_weights_flat"]
    X2 = vp.table(nfe=7, order=2, grid="logsnr", variable="logsnr", form="x0", verify="none").tensors["x0_weights_flat"]
    with mpmath.workdps(40):
        lam = [mpmath.log(a / s) for a, s in map(_vp_alpha_sigma, t)]
        for i in range(1, len(t) - 1):
            h = lam[i + 1] - lam[i]
            a_t = _vp_alpha_sigma(t[i + 1])[0]
            M0 = -a_t * mpmath.expm1(-h)
            r1 = (lam[i - 1] - lam[i]) / h
            c = -a_t * mpmath.expm1(-h) / 2                     # -alpha_t B_h rho, applied to D1
            ref = [M0 - c / r1, c / r1]
            assert np.allclose(X2[i, :2, 0, 0, 0], [float(v) for v in ref], rtol=1e-13, atol=0), (i, X2[i], ref)
            if i >= 2:
                y = [mpmath.mpf(0), r1, (lam[i - 2] - lam[i]) / h]
                for m in range(3):
                    lhs = sum(X3[i, j, 0, 0, 0] * float(y[j] ** m) for j in range(3))
                    assert abs(lhs - float(M0 / (m + 1))) <= 1e-13 * float(M0), (i, m)


def test_flat_weights_checked_and_defect_caught(vp):
    tab = vp.table(nfe=6, order=2, grid="quadratic", variable="rho", form="x0", verify="none")
    rep = check_variant_table(vp.spec, tab.tensors, tab.meta, level="fast")
    assert rep.passed and "x0_weights_flat" in {r.quantity for r in rep.rows}, rep.text()
    bad = dict(tab.tensors)
    bad["x0_weights_flat"] = bad["x0_weights_flat"].copy()
    bad["x0_weights_flat"][2, 1] *= 1 + 1e-5
    assert not check_variant_table(vp.spec, bad, tab.meta, level="fast").passed


def test_x0_pc_endings_calls_and_dirac_exactness(cld):
    """last="none": N calls; "predict" and "correct": N + 1. On Dirac data every ending is exact (x0hat = mu), with
    either predictor: the state at t_min is D m0 + R z (validation's mpmath D, R), the denoised output mu."""
    from gddim_runtime._samplers import SamplingError
    mu = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    mix = MixtureScore(mu, [0.0])
    tab = cld.table(nfe=6, order=3, grid="quadratic", variable="logsnr", form="x0", corrector=True,
                    verify="none").to_runtime()
    def mat(M):
        return torch.tensor([[float(v) for v in row] for row in M.tolist()], dtype=torch.float64)
    with mpmath.workdps(20):
        ref = MpReference(cld.spec, dps=20)
        t0, tmin = mpmath.mpf(float(tab.t[0])), mpmath.mpf(float(tab.t[-1]))
        D, R, D_T, R_T = mat(ref.data_to_state(tmin)), mat(ref.R(tmin)), mat(ref.data_to_state(t0)), mat(ref.R(t0))
    z = torch.randn((8, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m0 = torch.stack([mu[0], torch.zeros(2, dtype=torch.float64)])
    x_T = D_T @ m0 + torch.einsum("ab,nbj->naj", R_T, z)
    exact = D @ m0 + torch.einsum("ab,nbj->naj", R, z)
    N = tab.steps
    for predictor in ("exact", "flat"):
        for last, calls in (("none", N), ("predict", N + 1), ("correct", N + 1)):
            out, info = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler="gddim_x0_pc", dtype=torch.float64,
                                  denoise=False, return_info=True, last=last, predictor=predictor)
            assert info["nfe"] == calls, (last, info)
            assert float((out - exact).abs().max()) <= 1e-11 * float(exact.abs().max()), (predictor, last)
            if last != "none":
                den = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler="gddim_x0_pc", dtype=torch.float64,
                                last=last, predictor=predictor)
                assert torch.allclose(den[:, 0], mu[0].expand(8, 2), atol=1e-9)
    for bad in ({"last": "both"}, {"predictor": "bh1"}):
        with pytest.raises(SamplingError, match=list(bad)[0]):
            gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler="gddim_x0_pc", dtype=torch.float64, **bad)


def _vp_gaussian_errors(vp, c, configs):
    """Endpoint error of each (nfe, order, grid, variable, sampler options, denoise, extra step) on VP Gaussian
    data N(mu, c^2 I) (4-D), against the exact flow (scipy Radau 1e-12): the state at t_min, or E[x_0 | u_t_min]."""
    mu = torch.tensor([[0.5, -1.0, 0.2, 1.5]], dtype=torch.float64)
    mix = MixtureScore(mu, [c])
    M, beta = _gaussian_flow_reference(vp.spec, mu, c)
    z = torch.randn((64, 1, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = []
    for nfe, q, grid, variable, sampler, kw, denoise, extra in configs:
        tab = vp.table(nfe=nfe + extra, order=q, grid=grid, variable=variable, form="x0", corrector=True,
                       verify="none").to_runtime()
        x_T = tab.tensors["R"][0, 0, 0, 0] * z
        u = M[0, 0] * x_T + beta[0] * mu[0]
        x, info = gr.sample(TableModel(mix, tab), tab, x_T=x_T, sampler=sampler, dtype=torch.float64, denoise=denoise,
                            return_info=True, **kw)
        assert info["nfe"] == nfe
        if denoise:
            a, s2 = float(tab.tensors["data_to_state"][-1, 0, 0, 0]), float(tab.tensors["R"][-1, 0, 0, 0]) ** 2
            u = mu[0] + c ** 2 * a / (a ** 2 * c ** 2 + s2) * (u - a * mu[0])
        out.append(float((x - u).norm(dim=-1).mean() / 2))
    return out


@pytest.mark.parametrize("c", [0.05, 0.1, 0.3])
def test_state_ending_beats_the_denoising_call_at_nfe5(vp, c):
    """NFE 5, Gaussian data of width c (deterministic: fixed noise, exact flow): spending the final denoising's call
    on a fifth step and ending on the state at t_min (x0[state], logsnr grid, q2 in logsnr) against four steps
    + denoising (x0). Measured ratio 0.48 (c = 0.05), 0.52 (0.1), 0.33 (0.3); at c = 1 it is 1.02 (not claimed)."""
    base = (5, 2, "logsnr", "logsnr", "gddim_x0", {})
    state, den = _vp_gaussian_errors(vp, c, [base + (False, 1), base + (True, 0)])
    assert state < 0.7 * den, (state, den)


@pytest.mark.parametrize("c", [0.05, 0.1, 0.3, 1.0])
def test_flat_predictor_and_final_correction_at_nfe20(vp, c):
    """NFE 20, logsnr grid, q2 in logsnr: x0+pc with the flat predictor and the last call correcting (the UniPC-2
    bh2 recipe on our exact times) against x0+pc as before (exact predictor, last step uncorrected). Measured ratio
    0.24 (c = 0.05), 0.53 (0.1), 0.68 (0.3), 0.68 (1.0)."""
    cfg = (20, 2, "logsnr", "logsnr", "gddim_x0_pc")
    new, old = _vp_gaussian_errors(vp, c, [cfg + ({"predictor": "flat", "last": "correct"}, True, 0),
                                           cfg + ({}, True, 0)])
    assert new < 0.8 * old, (new, old)


@pytest.mark.parametrize("c", [0.05, 0.1, 0.3])
def test_final_correction_at_nfe10(vp, c):
    """NFE 10, logsnr grid, q2 in logsnr: the call at t_N also correcting the last step (last="correct", as UniPC's
    zero-length final step) against leaving it uncorrected, same calls. Measured ratio 0.24 (c = 0.05), 0.37 (0.1),
    0.75 (0.3); 0.94 at c = 1 (not claimed)."""
    cfg = (10, 2, "logsnr", "logsnr", "gddim_x0_pc")
    new, old = _vp_gaussian_errors(vp, c, [cfg + ({"last": "correct"}, True, 0), cfg + ({}, True, 0)])
    assert new < 0.85 * old, (new, old)


def test_full_check_covers_every_step(vp):
    """Lags swapped at step 5 of 7 keep every sum identity, and the fast level samples steps {0, 1, 2, 3, 6}
    by design: the full level must look at every step (sweep 8: a full level of step 0 only passed)."""
    tab = vp.table(nfe=8, order=3, grid="quadratic", variable="logsnr", form="x0", verify="none")
    tensors = dict(tab.tensors)
    X = tensors["x0_weights_ms"].copy()
    X[5, [0, 1]] = X[5, [1, 0]]
    tensors["x0_weights_ms"] = X
    assert check_variant_table(vp.spec, tensors, tab.meta, level="fast").passed
    assert not check_variant_table(vp.spec, tensors, tab.meta, level="full").passed
