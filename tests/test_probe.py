"""gr.gaussian_probe and derive's warning: a sampler that is unstable on the process is named, a stable one not.

The class (sweep 4): an explicit multistep extrapolation of eps on a stiff drift. F = [[-200, 1], [0, -1]]
with order 3 on the quadratic grid: tables whose every coefficient is right (validation's full check
passes) gave samples of size 1e60 / 1e49 / 1e25 at NFE 10 / 50 / 200 for data of size 0.5, finite, so no
error anywhere.
"""

import math

import pytest

import derive
import gddim_runtime as gr
from conftest import ROOT, run_derive

STIFF = """\
name: stiff2
state: [a, b]
parameters: {k1: 200, eps: 1e-6}
drift: [[-k1, 1], [0, -1]]
diffusion: [[0], [sqrt(2)]]
initial_covariance: [[eps, 0], [0, eps]]
time: {t_min: 1e-3, T: 1}
"""


def test_probe_is_the_exact_flow_on_vp():
    """VP, data N(0, s^2): the flow maps the marginal at T onto the marginal at t_min, and the final denoising
    gives the posterior mean, whose variance is s^2 * s^2 a / (s^2 a + sigma^2) at t_min (a = alpha_bar): the
    probe's rms over 4096 draws against that closed form (its Monte-Carlo error is ~1 %), for two scales."""
    tab = gr.load(ROOT / "coeffs" / "vp_linear" / "vp_linear_nfe50_auto4_q4_pc_x0.safetensors")
    t = 1e-3
    a = math.exp(-(0.1 * t + 19.9 * t * t / 2))
    for s in (0.5, 3.0):
        want = math.sqrt(s * s * a / (s * s * a + 1 - a))
        got = gr.gaussian_probe(tab, scale=s, batch=4096)
        assert abs(got - want) < 0.04 * want, (s, got, want)


def test_probe_names_the_unstable_table_and_passes_the_stable_ones():
    d = derive.derive(STIFF)
    bad = gr.gaussian_probe(d.table(nfe=10, order=3, grid="quadratic", verify="none").to_runtime())
    good = [gr.gaussian_probe(d.table(nfe=n, order=o, grid="quadratic", verify="none").to_runtime())
            for n, o in ((50, 1), (200, 2))]
    assert bad > 1e20
    assert all(0.5 < g < 1.5 for g in good), good
    # the same table is stable on a non-stiff process: the probe sees the process, not the configuration
    assert 0.5 < gr.gaussian_probe(gr.load(ROOT / "coeffs" / "cld" / "cld_nfe10_quadratic_q3.safetensors")) < 1.5


def test_probe_of_every_committed_table_is_near_one():
    """0.60-2.26 measured at batch 64 (low NFE narrows the data or widens CLD's v before the denoising: CLD
    NFE 10 auto4 2.16 at batch 4096 on the blended auto grid, 1.47 on the proxies' grid before it, whose
    first step 1 -> 0.44 sent learned networks astray; the rest is the Monte-Carlo error of 64 draws);
    never near unstable (PROBE_LIMIT 10; unstable tables give 1e2 .. 1e61)."""
    for path in sorted((ROOT / "coeffs").glob("*/*_nfe*.safetensors")):
        ratio = gr.gaussian_probe(gr.load(path), batch=64)
        assert 0.4 < ratio < 3, (path.name, ratio)


JORDAN3 = """\
name: jordan3
state: [x, y, z]
parameters: {a: 1, eps: 1e-3}
drift: [[-a, 1, 0], [0, -a, 1], [0, 0, -a]]
diffusion: [[0], [0], [exp(t / 2)]]
initial_covariance: [[eps, 0, 0], [0, eps, 0], [0, 0, eps]]
time: {t_min: 1e-3, T: 5}
"""


def test_probe_sees_a_component_that_the_denoising_hides():
    """Sweep 7: on a Jordan-block process with noise on the last state only, the eps-form corrector at NFE 50
    (uniform grid, q3) ended with z 2000x its true size (independent scipy reference), while the final
    denoising projected that away and the data's rms stayed at 1.0: the probe said 1.015. It now also compares
    each state component before the denoising with its exact rms sqrt(diag(Sigma + D D^T)); the table's plain
    predictor is the control (1.03 measured)."""
    import torch
    d = derive.derive(JORDAN3)
    tab = d.table(50, order=3, grid="uniform", corrector=True, verify="none").to_runtime()
    assert gr.default_sampler(tab) == "gddim_pc"
    assert gr.gaussian_probe(tab) > 100
    assert 0.9 < gr.gaussian_probe(tab, sampler="gddim") < 1.2
    # the data after the denoising alone would not tell: it is within 10 % of the control's
    T = tab.tensors
    ratios = []
    for sampler in ("gddim_pc", "gddim"):
        S_inv = torch.linalg.inv(T["sigma"] + T["data_to_state"][..., :1] @ T["data_to_state"][..., :1].mT)
        score = lambda x, tt: -gr.block_apply(S_inv[int((T["t"] == tt[0]).nonzero()[0, 0])], x, tab.basis)
        x = gr.sample(score, tab, batch=256, data_shape=(1,), parametrization="score", sampler=sampler,
                      dtype=torch.float64, generator=torch.Generator().manual_seed(0))[:, 0]
        ratios.append(float(x.square().mean().sqrt()))
    assert abs(ratios[0] - ratios[1]) < 0.1 * ratios[1], ratios


def test_api_and_run_time_tables_warn_when_unstable(tmp_path):
    """The probe ran in the CLI only: derive.derive(...).table(...) and gr.table_from_dense gave an unstable
    sampler without a word (sweep 7: 4.3e4 off, and 1e4-1e5 at NFE 10-20). Both warn now; verify="none" and
    probe=False skip the probe, and a stable table is silent."""
    import warnings
    d = derive.derive(STIFF)
    with pytest.warns(gr.UnstableSamplerWarning, match=r"stiff2_nfe10_quadratic_q3: its sampler \(gddim\) is unstable"):
        tab = d.table(nfe=10, order=3, grid="quadratic")
    assert tab.probe > 1e20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert d.table(nfe=10, order=3, grid="quadratic", verify="none").probe is None
        assert 0.5 < d.table(nfe=50, order=1, grid="quadratic").probe < 1.5
    path = tmp_path / "stiff2_dense.safetensors"
    path.write_bytes(d.dense().to_bytes())
    with pytest.warns(gr.UnstableSamplerWarning, match="is unstable on this process"):
        gr.table_from_dense(path, nfe=10, order=3, grid="quadratic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gr.table_from_dense(path, nfe=10, order=3, grid="quadratic", probe=False)
        gr.table_from_dense(path, nfe=50, order=1, grid="quadratic")


def test_derive_warns_on_stderr_even_when_quiet(tmp_path):
    spec = tmp_path / "stiff2.yaml"
    spec.write_text(STIFF)
    out = run_derive(spec, "--nfe", "10", "--order", "3", "--grid", "quadratic", "--out", tmp_path / "o", "--quiet")
    assert out.returncode == 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: stiff2_nfe10_quadratic_q3: its sampler (gddim) is "
                                                   "unstable on this process"), lines
    out = run_derive(spec, "--nfe", "50", "--order", "1", "--grid", "quadratic", "--out", tmp_path / "o", "--quiet")
    assert out.returncode == 0 and out.stderr == "", out.stderr


STIFFER = """\
name: stiff3
state: [a, b, c]
parameters: {k1: 1000, k3: 1e-3, eps: 1e-6}
drift: [[-k1, 1, 0], [0, -1, 1], [0, 0, -k3]]
diffusion: [[0], [0], [1]]
initial_covariance: [[eps, 0, 0], [0, eps, 0], [0, 0, eps]]
time: {t_min: 1e-3, T: 1}
"""


@pytest.mark.slow          # 30 s: the semi-closed R of a rate-1000 chain
def test_stiffer_chain_right_tables_pass_and_order_auto_says_why_not():
    """Rates -1000 .. -1e-3: Psi reaches 2.7e88 over the first step, and float64 rounds Psi R_s at
    |Psi| |R_s|, far above R_t: the identity check scaled by |Psi R_s| refused right tables ("sum_j
    eps_weights 2.6e-12 FAIL", exit 1; an independent scipy reference agreed to 1e-14, sweep 4). Scaled
    by |Psi| |R_s| they pass; the probe names them unstable; order auto says what float64 cannot do."""
    from derive._errors import SpecError
    d = derive.derive(STIFFER)
    with pytest.warns(gr.UnstableSamplerWarning):
        tab = d.table(nfe=10, order=3, grid="quadratic", verify="fast")
    assert tab.meta["verification"]["passed"] and abs(tab.tensors["psi"]).max() > 1e80
    assert not gr.gaussian_probe(tab.to_runtime()) < 1e10
    with pytest.raises(SpecError, match="order auto: its proxies need D_t"):
        d.table(nfe=10, verify="none")


OSCILLATOR = """\
name: osc40
state: [x, v]
parameters: {w: 40, g: 2}
drift: [[0, w], [-w, -g]]
diffusion: [[0], [2]]
initial_covariance: [[1e-4, 0], [0, 1e-4]]
time: {t_min: 1e-3, T: 1}
"""


def _gaussian(table):
    """The exact score of N(0, 1) data on ``table``'s grid (k-state, one data coordinate): -(Sigma + d d^T)^-1 u,
    and the state's exact rms per component at t_min."""
    import torch
    d = table.tensors["data_to_state"][..., :1]
    S = table.tensors["sigma"] + d @ d.mT                              # [N+1, 1, k, k]

    def score(x, t):
        i = int((table.tensors["t"] == t[0]).nonzero()[0, 0])
        return -torch.linalg.solve(S[i, 0], x[..., 0].T).T[..., None]
    return score, torch.diagonal(S[-1, 0]).sqrt()


@pytest.mark.parametrize("spec, sampler, unstable", [(STIFF, "euler_maruyama", 50), (STIFF, "heun", 10),
                                                     (OSCILLATOR, "euler_maruyama", 200), (OSCILLATOR, "heun", 50)])
def test_explicit_baselines_warn_when_their_step_blows_up(spec, sampler, unstable):
    """Euler-Maruyama and Heun are explicit: on a stiff (rate 200) or oscillating (40 rad per unit time)
    drift they blow up at too few steps and stay finite, so nothing failed (EM at NFE 50 on the stiff chain:
    samples 3e22 times their size with the exact score). sample() now probes them once per (table, sampler,
    lam) and warns. The claim checked independently: with the exact score of Gaussian data (written here),
    the warned run's state is > 10x its exact rms, and the unwarned one within 3x."""
    import warnings

    import torch
    d = derive.derive(spec)
    for nfe, blows_up in ((unstable, True), (1000, False)):
        tab = d.table(nfe=nfe, order=1, grid="uniform", verify="none").to_runtime()
        score, exact = _gaussian(tab)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            x = gr.sample(score, tab, batch=512, data_shape=(1,), parametrization="score", sampler=sampler,
                          dtype=torch.float64, generator=torch.Generator().manual_seed(1), denoise=False)
        warned = [w for w in seen if issubclass(w.category, gr.UnstableSamplerWarning)]
        size = float((x[:, :, 0].square().mean(0).sqrt() / exact).max()) if bool(torch.isfinite(x).all()) else math.inf
        assert bool(warned) == blows_up, (nfe, size)
        assert size > 10 if blows_up else size < 3, (nfe, size)
        if blows_up:
            assert sampler in str(warned[0].message) and "more steps" in str(warned[0].message)


def test_probe_refuses_a_sampler_the_table_cannot_run():
    """A table without corrector weights cannot run gddim_pc: the probe said inf (unstable) instead."""
    tab = gr.load(ROOT / "coeffs" / "cld" / "cld_nfe10_quadratic_q3.safetensors")
    with pytest.raises(gr.SamplingError, match="no corrector weights"):
        gr.gaussian_probe(tab, sampler="gddim_pc")


def test_the_sample_time_probe_runs_once_per_table_sampler_and_lam():
    """The explicit baselines' probe is kept on the table: a second call does not probe again, and lam given
    as a 0-d tensor (a new object each call) counts as its value (sweep 12: it probed and warned every call)."""
    import torch
    tab = gr.load(ROOT / "coeffs" / "cld" / "cld_nfe10_quadratic_q3.safetensors")
    zeros = lambda x, t: torch.zeros_like(x)
    for lam in (torch.tensor(1.0), torch.tensor(1.0), 1.0, None, None):
        gr.sample(zeros, tab, batch=2, data_shape=(2,), sampler="euler_maruyama", lam=lam)
    gr.sample(zeros, tab, batch=2, data_shape=(2,), sampler="heun")
    assert sorted(tab.derived["probe"], key=str) == sorted([("euler_maruyama", 1.0), ("euler_maruyama", None),
                                                            ("heun", None)], key=str)
