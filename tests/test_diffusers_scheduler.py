"""GDDIMScheduler in diffusers pipelines: a tiny random UNet end to end, and on exact-score VP data
(a Gaussian, analytic eps) the pipeline's samples against gddim_runtime.sample and the exact answer."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: E402
from diffusers.models.modeling_utils import ModelMixin  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402

import gddim_runtime as gr  # noqa: E402
from gddim_runtime.diffusers import GDDIMScheduler  # noqa: E402

VP = ROOT / "coeffs" / "vp_linear"
DENSE = str(VP / "vp_linear_dense.safetensors")


def vp_linear(t):
    """D_t = sqrt(alpha_bar), R_t = sqrt(1 - alpha_bar) of derive/sdes/vp_linear.yaml, written out here."""
    log_alpha = -(0.1 * t + (20 - 0.1) * t ** 2 / 2)
    return torch.exp(log_alpha / 2), torch.sqrt(-torch.expm1(log_alpha))


def gaussian_eps(x, t, mu, c):
    """Exact eps for data N(mu, c^2 I): x_t ~ N(D mu, D^2 c^2 + R^2), eps = -R score."""
    D, R = vp_linear(t)
    return R * (x - D * mu) / (D ** 2 * c ** 2 + R ** 2)


class GaussianEpsNet(ModelMixin, ConfigMixin):
    """The exact eps as a diffusers model (DDPM timestep tau, t = (tau + 1)/1000), float64."""

    @register_to_config
    def __init__(self, sample_size=8, in_channels=3, mu=0.1, c=0.15):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))   # sets .dtype/.device
        self.calls = []

    def forward(self, sample, timestep, return_dict=True):
        tau = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
        self.calls.append(float(tau[0]))
        t = ((tau + 1) / 1000).view(-1, 1, 1, 1)
        return UNet2DOutput(sample=gaussian_eps(sample, t, self.config.mu, self.config.c))


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def test_tiny_unet_pipeline_end_to_end():
    """pipe.scheduler = GDDIMScheduler(...) in a DDPMPipeline with a random UNet: runs, NFE as asked,
    DDPM timesteps from 999 down to t_min's 0."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.scheduler = GDDIMScheduler(DENSE, solver_order=3, grid="quadratic")
    seen = []
    pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1])))
    out = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
    images = out.images
    assert images.shape == (2, 8, 8, 3) and np.all(np.isfinite(images))
    assert len(seen) == 6
    assert seen[0] == pytest.approx(999.0, abs=1e-9) and seen[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a > b for a, b in zip(seen, seen[1:]))
    assert pipe.scheduler.init_noise_sigma == pytest.approx(float(vp_linear(torch.tensor(1.0, dtype=torch.float64))[1]))


@pytest.mark.parametrize("c", [0.15, 0.0])
@pytest.mark.parametrize("order, grid, nfe", [(3, "quadratic", 10), (2, "logsnr", 8), (4, "edm", 12)])
def test_exact_score_matches_gr_sample(order, grid, nfe, c):
    """On N(mu, c^2 I) data with the exact eps, DDPMPipeline + GDDIMScheduler equals gr.sample with the
    same grid and order (float64, 1e-6; measured ~1e-15); for c = 0 (a point mass) both give mu exactly
    (gDDIM is exact when eps is constant along the flow)."""
    mu = 0.1
    net = GaussianEpsNet(mu=mu, c=c)
    pipe = DDPMPipeline(unet=net, scheduler=DDPMScheduler())
    pipe.scheduler = GDDIMScheduler(DENSE, solver_order=order, grid=grid)
    images = pipe(batch_size=3, num_inference_steps=nfe, generator=torch.Generator().manual_seed(1),
                  output_type="pt").images
    x_pipe = images * 2 - 1                                         # output_type "pt": [B, C, H, W] in [0, 1]
    assert len(net.calls) == nfe
    # The same start: DDPMPipeline draws x_T ~ N(0, I) with the generator (the state itself).
    z = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    committed = VP / f"vp_linear_nfe{nfe}_{grid}_q{order}.safetensors"  # derive's own table where there is one
    table = gr.load(committed) if committed.is_file() else gr.table_from_dense(DENSE, nfe=nfe, order=order, grid=grid)
    x_ref = gr.sample(lambda u, t: gaussian_eps(u, t.view(-1, 1, 1, 1, 1), mu, c), table, x_T=z[:, None],
                      dtype=torch.float64)[:, 0]
    assert float(x_ref.abs().max()) < 1                             # the pipeline's clamp to [-1, 1] is inactive
    assert float((x_pipe - x_ref).abs().max()) < 1e-6
    if c == 0:
        assert float((x_pipe - mu).abs().max()) < 1e-9


def test_matches_derive_table():
    """The scheduler's table is derive's committed vp_linear table (quadratic, order 3) to 1e-12."""
    sched = GDDIMScheduler(DENSE, solver_order=3)
    sched.set_timesteps(10)
    ref = gr.load(VP / "vp_linear_nfe10_quadratic_q3.safetensors")
    for name in ("t", "psi", "eps_weights", "x0_weights", "R", "data_to_state"):
        a, b = sched.table.tensors[name], ref.tensors[name]
        assert float((a - b).abs().max() / b.abs().max()) < 1e-12, name
    assert torch.allclose(sched.timesteps, 1000 * ref.t[:10] - 1, rtol=0, atol=1e-9)


def test_prediction_types_agree():
    """x_0 and v outputs equivalent to an eps output give the same step (DDPM's definitions of x_0 and v)."""
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    outs = {}
    for kind in ("epsilon", "sample", "v_prediction"):
        s = GDDIMScheduler(DENSE, solver_order=2, prediction_type=kind)
        s.set_timesteps(5)
        u = x
        for i, tau in enumerate(s.timesteps):
            t = (tau + 1) / 1000
            D, R = vp_linear(t)
            out = {"epsilon": eps, "sample": (u - R * eps) / D, "v_prediction": D * eps - R * (u - R * eps) / D}[kind]
            u = s.step(out, tau, u).prev_sample
        outs[kind] = u
    assert float((outs["sample"] - outs["epsilon"]).abs().max()) < 1e-10
    assert float((outs["v_prediction"] - outs["epsilon"]).abs().max()) < 1e-10


def test_config_round_trip_and_integer_timesteps(tmp_path):
    sched = GDDIMScheduler(DENSE, solver_order=2, grid="logsnr", integer_timesteps=True)
    sched.save_pretrained(tmp_path)
    again = GDDIMScheduler.from_pretrained(tmp_path)
    assert again.config.grid == "logsnr" and again.config.solver_order == 2
    again.set_timesteps(20)
    tau = again.timesteps
    assert torch.equal(tau, tau.round()) and tau[0] == 999
    assert torch.allclose(again.table.t[:20], (tau + 1) / 1000, rtol=0, atol=1e-15)   # the table is at those times


def test_refusals():
    with pytest.raises(ValueError, match="k = 2"):
        GDDIMScheduler(str(ROOT / "coeffs" / "cld" / "cld_dense.safetensors"))
    with pytest.raises(ValueError, match="prediction_type"):
        GDDIMScheduler(DENSE, prediction_type="flow")
    s = GDDIMScheduler(DENSE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1), 999, torch.zeros(1))
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="expected step"):
        s.step(torch.zeros(1), s.timesteps[2], torch.zeros(1))


def test_import_error_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "try:\n    import gddim_runtime.diffusers\nexcept ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "pip install 'gddim-toolkit[diffusers]'" in proc.stdout, proc.stdout + proc.stderr


def test_dct2d_family_matches_gr_sample(tmp_path):
    """A blurring family (BDM on 4 x 4 images, dct2d basis): stepping in frequency space equals
    gr.sample on the scheduler's table (float64)."""
    from conftest import run_derive
    text = (ROOT / "derive" / "sdes" / "bdm.yaml").read_text()
    assert "size: [32, 32]" in text and "name: bdm\n" in text
    spec = tmp_path / "bdm4.yaml"
    spec.write_text(text.replace("size: [32, 32]", "size: [4, 4]").replace("name: bdm\n", "name: bdm4\n"))
    proc = run_derive(spec, "--out", tmp_path, "--no-tables", "--dense", "--no-verify", "--quiet")
    assert proc.returncode == 0, proc.stderr
    sched = GDDIMScheduler(str(tmp_path / "bdm4" / "bdm4_dense.safetensors"), solver_order=3, grid="logsnr")
    assert sched.config.dct_size == [4, 4]
    sched.set_timesteps(7)

    def model(x, t):                                    # any smooth model of (x, t)
        return torch.tanh(x) * torch.cos(t).view(-1, *[1] * (x.ndim - 1))
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z
    for tau in sched.timesteps:
        x = sched.step(model(x, ((tau + 1) / 1000).expand(2)), tau, x).prev_sample
    ref = gr.sample(model, sched.table, x_T=z[:, None], dtype=torch.float64)[:, 0]
    assert float((x - ref).abs().max() / ref.abs().max()) < 1e-12


def test_add_noise_is_the_forward_marginal_and_refuses_timesteps_outside_the_process():
    """x_t = D_t x0 + R_t noise at tau = 1000 t - 1 (D, R written out in vp_linear above); timesteps beyond the
    process's [t_min, T] by more than one step were clipped silently (a training bug hidden)."""
    sched = GDDIMScheduler(DENSE)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, 2, generator=g,
                                                                                      dtype=torch.float64)
    tau = torch.tensor([0, 17, 500, 999])
    D, R = vp_linear((tau.double() + 1) / 1000)
    want = D.view(-1, 1, 1, 1) * x0 + R.view(-1, 1, 1, 1) * noise
    assert torch.allclose(sched.add_noise(x0, noise, tau), want, rtol=1e-12, atol=1e-12)
    for bad in ([0, 1001], [-2, 5], [float("nan"), 3]):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
            sched.add_noise(x0[:2], noise[:2], torch.tensor(bad))


def test_scheduler_refuses_nonsense_timesteps_and_settings():
    """timestep_scale 0 (every tau -1, NaN samples) or NaN was accepted; set_timesteps(2.7) became 2 and '5'
    was taken; a NaN timestep passed the membership test (NaN comparisons are False) and restarted the run."""
    for kw in (dict(timestep_scale=0.0), dict(timestep_scale=float("nan")), dict(timestep_shift=float("inf")),
               dict(timestep_scale="1000")):
        with pytest.raises(ValueError, match=r"timestep_(scale|shift): needs a finite number"):
            GDDIMScheduler(DENSE, **kw)
    sched = GDDIMScheduler(DENSE)
    for n in (2.7, "5", True):
        with pytest.raises(ValueError, match="num_inference_steps: needs an integer"):
            sched.set_timesteps(n)
    sched.set_timesteps(np.int64(5))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="timestep nan is not one of scheduler.timesteps"):
        sched.step(torch.zeros_like(x), float("nan"), x)
    assert sched.step(torch.zeros_like(x), sched.timesteps[1], x).prev_sample.shape == x.shape   # the run goes on


def test_saved_scheduler_carries_its_dense_file_and_loads_from_anywhere(tmp_path, monkeypatch):
    """save_pretrained stored dense_path verbatim (an absolute or working-directory path), so the saved folder
    did not load elsewhere; now the dense file is copied beside the config and recorded by its name."""
    import json
    sched = GDDIMScheduler(DENSE, solver_order=2, grid="logsnr")
    sched.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "scheduler_config.json").read_text())
    assert config["dense_path"] == "vp_linear_dense.safetensors" and sched.config.dense_path == DENSE
    assert (tmp_path / "saved" / "vp_linear_dense.safetensors").read_bytes() == open(DENSE, "rb").read()
    monkeypatch.chdir(tmp_path)                                        # somewhere the relative name means nothing
    again = GDDIMScheduler.from_pretrained(tmp_path / "saved")
    again.set_timesteps(6)
    sched.set_timesteps(6)
    assert torch.equal(again.timesteps, sched.timesteps) and again.config.solver_order == 2


def test_step_refuses_a_batch_that_changes_mid_run():
    sched = GDDIMScheduler(DENSE)
    sched.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample
    y = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sample shape \(3, 3, 4, 4\) changed mid-run"):
        sched.step(torch.zeros_like(y), sched.timesteps[1], y)
    with pytest.raises(ValueError, match="must be tensors of the same shape"):
        sched.step(torch.zeros(2, 3, 4), sched.timesteps[1], x)
    y = sched.step(torch.zeros_like(y), sched.timesteps[0], y).prev_sample     # a new run may change it
    assert y.shape == (3, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timesteps \(3\) must be one per sample \(2\)"):
        sched.add_noise(x, torch.randn_like(x), [10, 20, 30])
    assert sched.add_noise(x, torch.randn_like(x), [10, 20]).shape == x.shape


def test_prediction_types_agree_where_d2_plus_r2_is_not_one(tmp_path):
    """On VP, D^2 + R^2 = 1, so the v conversion's denominator never mattered (sweep 8: dropping it passed);
    VE (D = 1, R = sigma) is a k = 1 process where it does. D and R are the table's at each grid time."""
    import derive
    path = tmp_path / "ve_dense.safetensors"
    path.write_bytes(derive.derive("ve").dense().to_bytes())
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    outs = {}
    for kind in ("epsilon", "sample", "v_prediction"):
        s = GDDIMScheduler(str(path), solver_order=2, prediction_type=kind)
        s.set_timesteps(5)
        u = 50 * x
        for i, tau in enumerate(s.timesteps):
            D, R = (float(s.table.tensors[n][i].reshape(-1)[0]) for n in ("data_to_state", "R"))
            out = {"epsilon": eps, "sample": (u - R * eps) / D, "v_prediction": D * eps - R * (u - R * eps) / D}[kind]
            u = s.step(out, tau, u).prev_sample
        outs[kind] = u
    scale = float(outs["epsilon"].abs().max())
    assert float((outs["sample"] - outs["epsilon"]).abs().max()) < 1e-10 * scale
    assert float((outs["v_prediction"] - outs["epsilon"]).abs().max()) < 1e-10 * scale
