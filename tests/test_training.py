"""Training side of the runtime: dense coefficients at batched times, add_noise, targets and losses.

References are independent of the dense files: validation's ScipyReference (float64 solve_ivp of the
Lyapunov, Psi and R ODEs from F, G, Sigma_0, R_0 alone) and, for BDM's marginal form, MpReference
(its defining formulas). Empirical moments are compared with tolerances of 5 standard errors (stated
per check); the seeds are fixed, so the tests are deterministic.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gddim_runtime as gr
from conftest import ROOT

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
Z = 5.0          # tolerance in standard errors for every Monte-Carlo comparison


def _dense_of(deriv):
    from derive import _tables
    arrays = _tables.dense(deriv)                       # what python -m derive --dense writes (tol 1e-14)
    return gr.dense_from_tensors(arrays, path=deriv.spec.name)


@pytest.fixture(scope="module")
def dense(derivations):
    cache = {}

    def get(name):
        if name not in cache:
            path = ROOT / "coeffs" / name / f"{name}_dense.safetensors"
            cache[name] = gr.load_dense(path) if path.exists() else _dense_of(derivations(name))
        return cache[name]
    return get


def _rel(a, b):
    """Normwise relative difference per leading index (max over entries), worst case."""
    a, b = a.flatten(1), b.flatten(1)
    return float(((a - b).abs().max(1).values / b.abs().max(1).values.clamp_min(1e-300)).max())


# ----- dense coefficients at batched times -------------------------------------------------------

@pytest.mark.parametrize("name", ["cld", "vp_linear", "psld", "bdm8"])
def test_dense_batched_matches_table_at_grid_times(name, dense, derivations):
    """at(t [B]) agrees with a table derived for the same spec to <= 1e-12 relative at every grid time,
    and each row equals the 0-d evaluation exactly (the RK45 sampler's path)."""
    from validation.bench import Tables
    d = dense(name)
    tabs = Tables.__new__(Tables)
    tabs.spec, tabs.deriv, tabs.cache, tabs._moments, tabs.dense = derivations(name).spec, derivations(name), {}, {}, None
    tab = tabs.table(29, 1)
    T = tab.tensors
    c = d.at(T["t"])
    for mine, theirs in (("R", "R"), ("L", "L"), ("D", "data_to_state"), ("F", "F"), ("GGT", "GGT")):
        assert c[mine].shape == T[theirs].shape
        assert _rel(c[mine], T[theirs]) <= 1e-12, (name, mine)
    for i in (0, 7, len(T["t"]) - 1):
        one = d.at(T["t"][i])
        for n in one:
            assert torch.equal(one[n], c[n][i])


def test_dense_batched_off_grid_and_shapes(dense):
    """Random times (not grid points) against the 0-d path; bad shapes refused."""
    d = dense("cld")
    t = d.t_min + (d.T - d.t_min) * torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = d.at(t)
    assert c["R"].shape == (64, 1, 2, 2)
    for i in (0, 31, 63):
        assert _rel(c["R"][i:i + 1], d.at(t[i])["R"][None]) <= 1e-15
    with pytest.raises(ValueError):
        d.at(t.reshape(8, 8))


# ----- add_noise: moments against the reference --------------------------------------------------

def _moments_check(u, eps, mean, Sigma, R):
    """u, eps [n, k] samples; mean [k], Sigma, R [k, k] from the reference. Mean, covariance and the
    cross-covariance E[(u - mean) eps^T] = R (which pins R_t, not just R R^T) within Z standard errors:
    SE(mean_a) = sqrt(S_aa / n); SE(cov_ab) = sqrt((S_aa S_bb + S_ab^2) / n) (Gaussian, known mean);
    SE(cross_ab) = sqrt((S_aa + R_ab^2) / n)."""
    n, k = u.shape
    r = u - mean
    emp_cov = r.T @ r / n
    cross = r.T @ eps / n
    d = torch.diagonal(Sigma)
    se_mean = (d / n).sqrt()
    se_cov = ((d[:, None] * d[None] + Sigma ** 2) / n).sqrt()
    se_cross = ((d[:, None] + R ** 2) / n).sqrt()
    assert ((u.mean(0) - mean).abs() <= Z * se_mean).all(), (u.mean(0), mean, se_mean)
    assert ((emp_cov - Sigma).abs() <= Z * se_cov).all(), (emp_cov, Sigma, se_cov)
    assert ((cross - R).abs() <= Z * se_cross).all(), (cross, R, se_cross)


@pytest.mark.parametrize("name", ["cld", "psld", pytest.param("hold3", marks=pytest.mark.slow)])
def test_add_noise_moments(name, dense, derivations):
    """Per coordinate u_t ~ N(Psi(t,0) [x0; 0], Sigma_t) with Cov(u_t, eps) = R_t, against ScipyReference."""
    from validation._reference import ScipyReference
    d = dense(name)
    spec = derivations(name).spec
    times = [float(spec.t_min) * 3, 0.05, 0.3, 0.9]
    ref = ScipyReference(spec, times)
    mu = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    B = 25000
    g = torch.Generator().manual_seed(1)
    for t in times:
        x0 = mu.expand(B, 4)
        u, eps = gr.add_noise(d, x0, torch.full((B,), t, dtype=torch.float64), generator=g)
        k = spec.k
        assert u.shape == eps.shape == (B, k, 4) and u.dtype == torch.float64
        S, R, D = (torch.from_numpy(np.asarray(m, dtype=float)) for m in (ref.sigma(t), ref.R(t), ref.data_to_state(t)))
        # pool the 4 coordinates after removing each one's own mean D e_0 mu_j
        means = D[:, 0][None, :, None] * mu[None, None, :]                     # [1, k, 4]
        r = (u - means).permute(0, 2, 1).reshape(-1, k)
        e = eps.permute(0, 2, 1).reshape(-1, k)
        _moments_check(r, e, torch.zeros(k, dtype=torch.float64), S, R)
        # the per-coordinate means themselves (n = B each)
        se = (torch.diagonal(S) / B).sqrt()[:, None]
        assert ((u.mean(0) - means[0]).abs() <= Z * se).all(), (name, t)


def test_add_noise_bdm_per_frequency(dense, derivations):
    """BDM (8 x 8, dct2d): u_t returned in data space; per DCT frequency lam_ij the coefficient is
    mean_t(lam_ij) x0_ij + std_t eps_ij (MpReference's defining formulas), checked at every frequency."""
    from validation._reference import MpReference
    d = dense("bdm8")
    spec = derivations("bdm8").spec
    lams = spec.basis.values()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8, dtype=torch.float64), torch.linspace(-1, 1, 8, dtype=torch.float64),
                            indexing="ij")
    img = torch.sin(3 * xx) * torch.cos(2 * yy) + 0.5 * xx        # a smooth, non-constant image
    B = 20000
    g = torch.Generator().manual_seed(2)
    refs = [MpReference(spec, lam) for lam in lams]
    for t in (2e-3, 0.2, 0.6, 0.95):
        u, eps = gr.add_noise(d, img.expand(B, 8, 8), torch.full((B,), t, dtype=torch.float64), generator=g)
        assert u.shape == eps.shape == (B, 1, 8, 8)
        uf, ef, xf = gr.dct2(u[:, 0]), gr.dct2(eps[:, 0]), gr.dct2(img)
        mean = torch.tensor([float(r.data_to_state(t)[0, 0]) for r in refs], dtype=torch.float64).view(8, 8) * xf
        var = torch.tensor([float(r.sigma(t)[0, 0]) for r in refs], dtype=torch.float64).view(8, 8)
        std = var.sqrt()
        r = uf - mean
        assert ((uf.mean(0) - mean).abs() <= Z * (var / B).sqrt()).all()
        assert (((r ** 2).mean(0) - var).abs() <= Z * (2 * var ** 2 / B).sqrt()).all()
        assert (((r * ef).mean(0) - std).abs() <= Z * ((var + var) / B).sqrt()).all()
        if t < 0.5:                                    # the mean check has teeth (late, the blur removes it)
            assert float(mean.abs().max()) > 10 * float((var / B).sqrt().max())


def test_add_noise_mixed_times_and_float32(dense):
    """One time per sample: a batch with mixed t equals the rows drawn with constant t (same noise)."""
    d = dense("cld")
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([1e-3, 0.01, 0.1, 0.3, 0.7, 1.0], dtype=torch.float64)
    u, eps = gr.add_noise(d, x0, t, generator=torch.Generator().manual_seed(4))
    for i in range(6):
        c = d.at(t[i])
        want = c["D"][0][:, 0, None] * x0[i][None] + c["R"][0] @ eps[i]
        assert torch.allclose(u[i], want, rtol=1e-14, atol=1e-15)
    u32, eps32 = gr.add_noise(d, x0.float(), t, generator=torch.Generator().manual_seed(4))
    assert u32.dtype == eps32.dtype == torch.float32
    for i in range(6):
        c = d.at(t[i])
        want = c["D"][0][:, 0, None] * x0[i][None] + c["R"][0] @ eps32[i].double()
        assert torch.allclose(u32[i].double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        gr.add_noise(d, x0, t[:3])


# ----- losses: the exact network of Gaussian data attains the analytic minimum ------------------------

def _gaussian_case(dense, derivations, t, c=0.5, mu=0.3, B=20000, dim=8, seed=5):
    """CLD, data x0 ~ N(mu, c^2 I) in R^dim: exact networks from the reference coefficients.

    Per coordinate u_t ~ N(m, C), m = D e_0 mu, C = Sigma + c^2 D e_0 e_0^T D^T. The conditional-mean
    networks: score* = -C^-1 (u - m), eps_R* = -R^T score*, eps_L* = -L^T score*,
    x0* = D^-1 (u + Sigma score*) (= D^-1 (u - R eps_R*), the runtime's x0)."""
    from validation._reference import ScipyReference
    spec = derivations("cld").spec
    ref = ScipyReference(spec, [t])
    S, R, D = (torch.from_numpy(np.asarray(m, dtype=float)) for m in (ref.sigma(t), ref.R(t), ref.data_to_state(t)))
    L = torch.linalg.cholesky(S)
    d0 = D[:, 0]
    m = d0 * mu
    C = S + c ** 2 * torch.outer(d0, d0)
    g = torch.Generator().manual_seed(seed)
    x0 = mu + c * torch.randn(B, dim, generator=g, dtype=torch.float64)
    tt = torch.full((B,), t, dtype=torch.float64)
    u, eps = gr.add_noise(dense("cld"), x0, tt, generator=g)
    _gaussian_case.last_u = u
    r = u - m[None, :, None]
    score = -torch.einsum("ab,nbj->naj", torch.linalg.inv(C), r)
    nets = {"score": score, "eps_R": -torch.einsum("ba,nbj->naj", R, score),
            "eps_L": -torch.einsum("ba,nbj->naj", L, score),
            "x0": torch.einsum("ab,nbj->naj", torch.linalg.inv(D), u + torch.einsum("ab,nbj->naj", S, score))}
    Ci, Di, k = torch.linalg.inv(C), torch.linalg.inv(D), 2
    minima = {"eps_R": (k - torch.trace(Ci @ S)) / k, "eps_L": (k - torch.trace(Ci @ S)) / k,
              "score": torch.trace(torch.linalg.inv(S) - Ci) / k,
              "x0": torch.trace(Di @ (S - S @ Ci @ S) @ Di.T) / k}
    return x0, tt, eps, nets, {p: float(v) for p, v in minima.items()}


@pytest.mark.parametrize("t", [0.02, 0.2, 0.6])
def test_exact_network_attains_minimal_loss(t, dense, derivations):
    """Every parametrisation: the exact conditional-mean network's loss equals the analytic minimum
    (per element: eps_R, eps_L: (k - tr(C^-1 Sigma))/k; score: tr(Sigma^-1 - C^-1)/k;
    x0: tr(D^-1 (Sigma - Sigma C^-1 Sigma) D^-T)/k) within Z standard errors of the per-sample losses;
    a perturbed network (+delta) is worse by delta^2 (paired difference, Z standard errors), and
    with weighting='eps' all four losses are the same number (the eps_R loss)."""
    d = dense("cld")
    x0, tt, eps, nets, minima = _gaussian_case(dense, derivations, t)
    eps_weighted = []
    for p, out in nets.items():
        per = gr.diffusion_loss(d, out, x0, tt, eps, parametrization=p, reduction="none")
        se = float(per.std() / math.sqrt(per.numel()))
        assert abs(float(per.mean()) - minima[p]) <= Z * se, (p, float(per.mean()), minima[p], se)
        delta = 0.1 * math.sqrt(minima[p])
        worse = gr.diffusion_loss(d, out + delta, x0, tt, eps, parametrization=p, reduction="none")
        diff = worse - per
        assert float(diff.mean()) > 0
        assert abs(float(diff.mean()) - delta ** 2) <= Z * float(diff.std() / math.sqrt(diff.numel())), p
        eps_weighted.append(float(gr.diffusion_loss(d, out, x0, tt, eps, parametrization=p, weighting="eps")))
    assert max(eps_weighted) - min(eps_weighted) <= 1e-9 * max(eps_weighted), eps_weighted


def test_gaussian_eps_is_the_exact_network(dense, derivations):
    """gr.gaussian_eps (from the dense file) equals the reference's exact eps_R of Gaussian data (CLD), and
    for BDM (dct2d) the per-frequency formula R (R^2 + var mean_t^2)^-1 (u - mean_t m)."""
    d = dense("cld")
    for t in (0.02, 0.6):
        x0, tt, eps, nets, _ = _gaussian_case(dense, derivations, t, B=500)     # data N(0.3, 0.5^2 I)
        got = gr.gaussian_eps(d, _gaussian_case.last_u, tt, 0.3, 0.25)
        assert torch.allclose(got, nets["eps_R"], rtol=1e-8, atol=1e-9)
        assert torch.equal(gr.gaussian_eps(d, _gaussian_case.last_u, tt, 0.3, torch.tensor(0.25)), got)  # 0-d
    b = dense("bdm8")
    g = torch.Generator().manual_seed(10)
    u = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9], dtype=torch.float64)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    got = gr.gaussian_eps(b, u, t, m, 0.3)
    c = b.at(t)
    R, D = c["R"][:, :, 0, 0].view(4, 8, 8), c["D"][:, :, 0, 0].view(4, 8, 8)
    want = gr.idct2(R * (gr.dct2(u[:, 0]) - D * gr.dct2(m)) / (R ** 2 + 0.3 * D ** 2))
    assert torch.allclose(got[:, 0], want, rtol=1e-12, atol=1e-12)


def test_loss_weights_and_targets(dense):
    """A tensor weighting multiplies per-sample losses; targets relate as s = -R^-T eps, eps_L = -L^T s."""
    d = dense("cld")
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.01, 0.9, 5, dtype=torch.float64)
    u, eps = gr.add_noise(d, x0, t, generator=g)
    out = torch.zeros_like(u)
    w = torch.arange(1, 6, dtype=torch.float64)
    plain = gr.diffusion_loss(d, out, x0, t, eps, reduction="none")
    assert torch.allclose(gr.diffusion_loss(d, out, x0, t, eps, weighting=w, reduction="none"), plain * w)
    s = gr.training_target(d, x0, t, eps, "score")
    eL = gr.training_target(d, x0, t, eps, "eps_L")
    c = d.at(t)
    for i in range(5):
        R, L = c["R"][i, 0], c["L"][i, 0]
        assert torch.allclose(-R.T @ s[i], eps[i], atol=1e-12)
        assert torch.allclose(-L.T @ s[i], eL[i], atol=1e-12)
    x0t = gr.training_target(d, x0, t, eps, "x0")
    assert torch.equal(x0t[:, 0], x0) and torch.equal(x0t[:, 1], torch.zeros_like(x0))
    with pytest.raises(ValueError):
        gr.diffusion_loss(d, out, x0, t, eps, parametrization="v")


@pytest.mark.parametrize("kind,transform", [("uniform", lambda t: t), ("quadratic", torch.sqrt), ("log", torch.log)])
def test_sample_times(kind, transform, dense):
    """Times lie in [t_min, T] and are uniform in the named variable: its mean and variance within Z SE."""
    d = dense("cld")
    n = 200000
    t = gr.sample_times(d, n, kind=kind, generator=torch.Generator().manual_seed(7))
    assert t.shape == (n,) and float(t.min()) >= float(d.t_min) and float(t.max()) <= float(d.T)
    a, b = float(transform(d.t_min)), float(transform(d.T))
    v = transform(t)
    mean, var = (a + b) / 2, (b - a) ** 2 / 12
    assert abs(float(v.mean()) - mean) <= Z * math.sqrt(var / n)
    assert abs(float(v.var()) - var) <= Z * math.sqrt((b - a) ** 4 / 180 / n)


# ----- bad input to the training helpers (a second hostile-user sweep) ------------------------------

def test_loss_refuses_outputs_that_would_broadcast(dense):
    """A UNet returning [B, C, H, W] for k = 1 (target [B, 1, C, H, W]) broadcast to [B, B, C, H, W]: the
    exact eps scored 1.97 instead of 0 and memory grew B times; a [B, 1] weighting broadcast to [B, B]."""
    d = dense("vp_linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    t = gr.sample_times(d, 4, generator=g)
    u, eps = gr.add_noise(d, x0, t, generator=g)
    assert float(gr.diffusion_loss(d, eps, x0, t, eps)) == 0.0
    with pytest.raises(ValueError, match=r"output has shape \(4, 3, 4, 4\), the eps_R target \(4, 1, 3, 4, 4\)"):
        gr.diffusion_loss(d, eps[:, 0], x0, t, eps)
    with pytest.raises(ValueError, match=r"output has shape \(4, 1, 3, 4, 4\), the x0 target \(4, 2, 3, 4, 4\)"):
        gr.diffusion_loss(dense("cld"), eps, x0, t, torch.cat([eps, eps], 1), parametrization="x0")
    with pytest.raises(ValueError, match=r"weighting must be .* got shape \(4, 1\)"):
        gr.diffusion_loss(d, eps, x0, t, eps, weighting=torch.ones(4, 1))
    zero = torch.zeros_like(eps)
    per = gr.diffusion_loss(d, zero, x0, t, eps, reduction="none")
    assert torch.allclose(gr.diffusion_loss(d, zero, x0, t, eps, weighting=2.0), 2 * per.mean())
    assert torch.allclose(gr.diffusion_loss(d, zero, x0, t, eps, weighting=t), (t * per).mean())


@pytest.mark.parametrize("bad_t", [torch.full((3,), 5.0), torch.tensor([0.5, 1.5, 0.5]), torch.tensor([0.5, -0.5, 0.2]),
                                   torch.tensor([0.5, float("nan"), 0.2]), torch.tensor([0.5, 2e-4, 0.2])])
def test_times_outside_the_process_are_refused(dense, bad_t):
    """The Chebyshev panels extrapolate outside [t_min, T]: at t = 5 Sigma came out 0.23 for 0.56, at 1.5 NaN; a
    NaN time gave NaN pairs; all silently (timesteps 0..999 handed over as t, say). The device-side assert
    keeps the helpers free of host syncs."""
    d = dense("cld")
    x0 = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"t outside \[t_min, T\]"):
        gr.add_noise(d, x0, bad_t.double())
    u, eps = gr.add_noise(d, x0, torch.tensor([1e-3, 1.0, 0.3], dtype=torch.float64))   # the ends are in
    with pytest.raises(RuntimeError, match=r"t outside \[t_min, T\]"):
        gr.training_target(d, x0, bad_t.double(), eps, "score")
    with pytest.raises(RuntimeError, match=r"t outside \[t_min, T\]"):
        gr.gaussian_eps(d, u, bad_t.double())


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["cld", "vp_linear", "ve"]), dtype=st.sampled_from(DTYPES),
       u=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)), bump=st.sampled_from([-1, 0, 1]),
       widen=st.booleans())
def test_times_rounded_to_the_model_dtype_are_accepted(dense, name, dtype, u, bump, widen):
    """Any time in [t_min, T] rounded to a float dtype, or one step of that dtype beside it, is accepted
    and evaluated at a time in [t_min, T] (the learned bdm8 run died on CUDA and CPU alike: a sampler
    gave its float32 network T = 0.99598 as 0.9959800243 and the float64 check refused it); times
    5 % beyond either end stay refused in every dtype. ve's t_min = 1e-5 is subnormal in float16, where
    the rounding is absolute (2^-25), 0.3 % of it. A float32 time widened to float64 keeps float32's
    allowance (sweep 9: refused by gaussian_eps inside a network whose skip runs in float64)."""
    d = dense(name)
    t_min, T = float(d.t_min), float(d.T)
    t = torch.tensor([t_min + u * (T - t_min)] * 3, dtype=torch.float64).to(dtype)
    if bump:
        t = torch.nextafter(t, torch.full_like(t, bump * math.inf))
    if widen and dtype == torch.float32:           # a float32 time handed on in float64 (a network's float64 skip)
        t = t.to(torch.float64)
    x0 = torch.randn(3, 2, dtype=torch.float64)
    eps = torch.randn(3, d.k, 2, dtype=torch.float64)
    got = gr.training_target(d, x0, t, eps, "score")
    inside = t.double().clamp(t_min, T)
    assert torch.equal(got, gr.training_target(d, x0, inside, eps, "score"))
    for bad in (0.95 * t_min, 1.05 * T):
        with pytest.raises(RuntimeError, match=r"t outside \[t_min, T\]"):
            gr.training_target(d, x0, torch.full((3,), bad, dtype=torch.float64).to(dtype), eps, "score")


@pytest.mark.parametrize("call, match", [
    (lambda d, x0, t: gr.add_noise(d, x0, torch.arange(3)), "t must be a floating-point tensor"),
    (lambda d, x0, t: gr.add_noise(d, x0, 0.5), r"t must be a tensor of shape \[3\]"),
    (lambda d, x0, t: gr.add_noise(d, x0.long(), t), "x0 must be a real floating tensor"),
    (lambda d, x0, t: gr.add_noise(d, x0.to(torch.complex128), t), "x0 must be a real floating tensor"),
    (lambda d, x0, t: gr.add_noise(d, x0[:0], t[:0]), "with B >= 1"),
    (lambda d, x0, t: gr.gaussian_eps(d, x0[:, :1], t), r"u must be \[B, k = 2, \*data_shape\], got shape \(3, 1\)"),
    (lambda d, x0, t: gr.gaussian_eps(d, torch.stack([x0, x0], 1), t[:2]), r"t must be a tensor of shape \[3\]"),
    (lambda d, x0, t: gr.gaussian_eps(d, torch.stack([x0, x0], 1), t, var=-1.0), "var must be a number >= 0"),
    # per-dimension variances passed the check and died in a batched matmul (sweep 5)
    (lambda d, x0, t: gr.gaussian_eps(d, torch.stack([x0, x0], 1), t, var=torch.tensor([1.0, 2.0])),
     "per-dimension variances cannot enter; pass their mean")])
def test_training_helpers_name_bad_arguments(dense, call, match):
    d = dense("cld")
    x0, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        call(d, x0, t)


def test_dct_size_recorded_in_the_dense_file_is_enforced(dense, derivations):
    """Images of the same H * W but another shape put each frequency's coefficients on another frequency;
    the sampler refused them but the training helpers took any H * W = P."""
    from derive import _tables
    arrays = _tables.dense(derivations("bdm8"))
    recorded = gr.dense_from_tensors(arrays, meta={"spec": {"basis": {"kind": "dct2d", "size": [8, 8]}}}, path="bdm8")
    bare = gr.dense_from_tensors(arrays, path="bdm8")
    assert recorded.basis((3, 8, 8)) == bare.basis((3, 8, 8)) == ("dct2d", (8, 8))
    assert bare.basis((3, 4, 16)) == ("dct2d", (4, 16))              # nothing recorded: H * W = P is all it has
    with pytest.raises(gr.TableError, match=r"last two axes must be \(8, 8\)"):
        recorded.basis((3, 4, 16))
    with pytest.raises(gr.TableError, match=r"last two axes must be \(8, 8\)"):
        gr.add_noise(recorded, torch.zeros(2, 3, 4, 16), torch.tensor([0.1, 0.2]))


def test_dense_argument_and_sample_times_arguments_are_checked(dense):
    """A path or a sampling Table as ``dense`` failed with AttributeError / "'tuple' object is not callable";
    sample_times(batch=-1 or 2.5) with raw torch errors, and dtype=int64 returned zeros."""
    path = ROOT / "coeffs" / "vp_linear" / "vp_linear_dense.safetensors"
    x0, t = torch.zeros(2, 3), torch.tensor([0.1, 0.2], dtype=torch.float64)
    with pytest.raises(TypeError, match="load it once"):
        gr.add_noise(str(path), x0, t)
    with pytest.raises(TypeError, match="got Table"):
        gr.add_noise(gr.load(ROOT / "coeffs" / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors"), x0, t)
    d = dense("vp_linear")
    for kw, match in ((dict(batch=-1), "batch must be a positive integer"), (dict(batch=2.5), "batch must be"),
                      (dict(batch=3, dtype=torch.int64), "dtype must be a floating")):
        with pytest.raises(ValueError, match=match):
            gr.sample_times(d, **kw)


def test_dense_to_a_dtype_is_refused(dense):
    """DenseCoefficients.to(torch.float32) converted every coefficient and the next helper call died in a
    matmul ("expected scalar type Double but found Float"; sweep 9); Table.to refuses a dtype likewise."""
    with pytest.raises(TypeError, match="takes a device, not a dtype"):
        dense("cld").to(torch.float32)
    assert dense("cld").to("cpu").values["R"].dtype == torch.float64
