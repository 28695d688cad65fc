"""The runtime on CUDA: no host synchronisation in a whole ``sample`` call, graph capture equal to
eager, the same samples as on the CPU. Marked gpu; skipped where CUDA is absent (pytest -m gpu)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gddim_runtime as gr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
COEFFS = Path(__file__).resolve().parents[1] / "coeffs"


def _model(x, t):
    return 0.1 * x * t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


@pytest.mark.parametrize("file, shape, sampler, parametrization", [
    ("cld/cld_nfe50_quadratic_q3", (3, 32, 32), "gddim", "eps_R"),
    ("cld/cld_nfe50_quadratic_q3", (3, 32, 32), "gddim", "eps_L"),
    ("cld/cld_nfe50_quadratic_q3", (3, 32, 32), "gddim", "x0"),
    ("cld/cld_nfe50_quadratic_q3", (3, 32, 32), "heun", "eps_L"),
    ("cld/cld_nfe50_quadratic_q3", (3, 32, 32), "euler_maruyama", "score"),
    ("bdm/bdm_nfe50_quadratic_q3", (3, 32, 32), "gddim", "eps_R"),
    ("vp_linear/vp_linear_nfe50_quadratic_q3", (3, 32, 32), "ancestral", "eps_R"),
])
def test_whole_call_never_syncs(file, shape, sampler, parametrization):
    """torch.cuda.set_sync_debug_mode("error") around the whole sample call: set-up, loop, final
    denoising; the finiteness check after the loop waits on an event, which is explicit."""
    table = gr.load(COEFFS / f"{file}.safetensors", device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    gr.sample(_model, table, batch=8, data_shape=shape, sampler=sampler, parametrization=parametrization,
              generator=gen)                                                  # warm-up: cuBLAS handles, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u = gr.sample(_model, table, batch=8, data_shape=shape, sampler=sampler, parametrization=parametrization,
                      generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(u).all()


def test_gpu_equals_cpu():
    """The same x_T on CPU and CUDA (float64): the same samples up to rounding."""
    cpu = gr.load(COEFFS / "cld/cld_nfe20_quadratic_q3.safetensors")
    x_T = torch.randn((4, 2, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = gr.sample(_model, cpu, x_T=x_T, dtype=torch.float64)
    b = gr.sample(_model, cpu.to("cuda"), x_T=x_T.cuda(), dtype=torch.float64).cpu()
    assert (a - b).abs().max() <= 1e-12 * a.abs().max()


def test_nan_is_reported_on_gpu():
    table = gr.load(COEFFS / "cld/cld_nfe10_quadratic_q3.safetensors", device="cuda")
    bad = lambda x, t: torch.where(t.view(-1, 1, 1, 1) < 0.5, torch.full_like(x, float("nan")), x)
    with pytest.raises(gr.SamplingError, match=r"not finite \(NaN/inf\) at step \d+"):
        gr.sample(bad, table, batch=2, data_shape=(3, 4, 4))


@pytest.mark.parametrize("file", ["cld/cld_nfe50_quadratic_q3", "bdm/bdm_nfe50_quadratic_q3"])
def test_graph_capture_equals_eager(file):
    """compile="reduce-overhead" (torch.compile of the step, CUDA graphs per step) against eager, float32."""
    table = gr.load(COEFFS / f"{file}.safetensors", device="cuda")
    x_T = torch.randn((16, table.k, 3, 32, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    a = gr.sample(_model, table, x_T=x_T)
    for _ in range(2):                                                         # second call replays the graphs
        b = gr.sample(_model, table, x_T=x_T, compile="reduce-overhead")
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    c = gr.sample(_model, table, x_T=x_T, compile=True)                        # True on CUDA: the whole-call graph
    assert (a - c).abs().max() <= 1e-4 * a.abs().max()


# ----- the data-prediction samplers, training and torchrun on CUDA -------------------------------

@pytest.fixture(scope="module")
def x0_table():
    """A CLD x0-form table with the corrector weights, derived here (derive needs no GPU)."""
    from derive import derive
    return derive("cld").table(nfe=10, order=3, form="x0", corrector=True, verify="fast")


@pytest.mark.parametrize("sampler", ["gddim_x0", "gddim_x0_pc"])
def test_x0_samplers_never_sync_and_equal_cpu(x0_table, sampler):
    """The data-prediction samplers: no host synchronisation in the whole call, and the CPU's samples."""
    cpu, gpu = x0_table.to_runtime("cpu"), x0_table.to_runtime("cuda")
    x_T = torch.randn((4, 2, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = gr.sample(_model, cpu, x_T=x_T, dtype=torch.float64, sampler=sampler)
    x_g = x_T.cuda()
    gr.sample(_model, gpu, x_T=x_g, dtype=torch.float64, sampler=sampler)              # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b = gr.sample(_model, gpu, x_T=x_g, dtype=torch.float64, sampler=sampler)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (a - b.cpu()).abs().max() <= 1e-12 * a.abs().max()


def test_training_on_cuda_matches_cpu_and_add_noise_never_syncs():
    """add_noise on CUDA: no host synchronisation, u_t = D_t [x0; 0] + R_t eps with the CPU's dense
    coefficients; the eps_L target and loss equal the CPU's for the same eps (float64)."""
    path = COEFFS / "cld" / "cld_dense.safetensors"
    d_cpu, d_gpu = gr.load_dense(path), gr.load_dense(path, device="cuda")
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn((6, 3, 4, 4), generator=gen, dtype=torch.float64)
    t = gr.sample_times(d_cpu, 6, generator=gen)
    x0_g, t_g = x0.cuda(), t.cuda()
    g = torch.Generator("cuda").manual_seed(0)
    gr.add_noise(d_gpu, x0_g, t_g, generator=g)                                     # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        u_g, eps_g = gr.add_noise(d_gpu, x0_g, t_g, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    c = d_cpu.at(t)
    eps = eps_g.cpu()
    lifted = torch.stack([x0, torch.zeros_like(x0)], 1).flatten(2)
    D, R = c["D"][:, 0], c["R"][:, 0]                                                 # identity basis: P = 1
    want = torch.einsum("bij,bjn->bin", D, lifted) + torch.einsum("bij,bjn->bin", R, eps.flatten(2))
    assert (u_g.cpu().flatten(2) - want).abs().max() <= 1e-12 * want.abs().max()
    for p in ("eps_L", "score", "x0"):
        a = gr.training_target(d_cpu, x0, t, eps, p)
        b = gr.training_target(d_gpu, x0_g, t_g, eps_g, p).cpu()
        assert (a - b).abs().max() <= 1e-12 * a.abs().max(), p
    out = torch.randn(eps.shape, generator=gen, dtype=torch.float64)
    la = gr.diffusion_loss(d_cpu, out, x0, t, eps, "eps_L")
    lb = gr.diffusion_loss(d_gpu, out.cuda(), x0_g, t_g, eps_g, "eps_L").cpu()
    assert abs(float(la) - float(lb)) <= 1e-12 * abs(float(la))


def test_torchrun_nccl_equals_one_process(tmp_path):
    """torchrun with nccl (one rank per GPU; here one GPU): the manifest and shard hold the samples
    that a plain CUDA run with the same seed gives (noise per sample from (seed, index) on the device)."""
    root = COEFFS.parent
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    base = ["-m", "gddim_runtime", "sample", "--coeffs", str(COEFFS / "cld" / "cld_nfe10_quadratic_q3.safetensors"),
            "--model", "toy_models:shrink", "--batch", "7", "--seed", "3", "--device", "cuda", "--dtype", "float64"]
    plain = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one.pt")], capture_output=True,
                           text=True, env=env, timeout=300)
    assert plain.returncode == 0, plain.stderr
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          *base[1:], "--out", str(tmp_path / "tr.pt")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    a, b = gr.read_samples(tmp_path / "one.pt"), gr.read_samples(tmp_path / "tr.pt")
    assert a.shape == b.shape == (7, 2, 2, 4)
    assert (a - b).abs().max() <= 1e-12 * a.abs().max()


# ----- compile="graph": the whole call as one CUDA graph ------------------------------------------

@pytest.mark.parametrize("file, sampler, parametrization", [
    ("cld/cld_nfe50_quadratic_q3", "gddim", "eps_R"),
    ("cld/cld_nfe20_quadratic_q3", "heun", "eps_L"),
    ("cld/cld_nfe20_quadratic_q3", "gddim", "x0"),
    ("bdm/bdm_nfe20_quadratic_q3", "gddim", "eps_R"),
])
def test_whole_call_graph_equals_eager(file, sampler, parametrization):
    """compile="graph": captured on the first call, replayed after; every replay equals eager for
    its own x_T (float64), counts the same model evaluations, and a replay never syncs."""
    table = gr.load(COEFFS / f"{file}.safetensors", device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    kw = dict(sampler=sampler, parametrization=parametrization, dtype=torch.float64, return_info=True)
    for r in range(3):
        x_T = torch.randn((8, table.k, 3, 32, 32), device="cuda", generator=gen, dtype=torch.float64)
        a, ia = gr.sample(_model, table, x_T=x_T, **kw)
        if r == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            b, ib = gr.sample(_model, table, x_T=x_T, compile="graph", **kw)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert (a - b).abs().max() <= 1e-12 * a.abs().max(), r
        assert ia["nfe"] == ib["nfe"]


def test_whole_call_graph_x0_corrector(x0_table):
    table = x0_table.to_runtime("cuda")
    x_T = torch.randn((4, 2, 3, 8, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(3),
                      dtype=torch.float64)
    a = gr.sample(_model, table, x_T=x_T, dtype=torch.float64, sampler="gddim_x0_pc")
    for _ in range(2):
        b = gr.sample(_model, table, x_T=x_T, dtype=torch.float64, sampler="gddim_x0_pc", compile="graph")
        assert (a - b).abs().max() <= 1e-12 * a.abs().max()


def _nan_above(x, t):
    """_model, but NaN wherever |x| > 1e30: a finite x_T holding one such value fails at step 0."""
    return torch.where(x.abs() > 1e30, torch.full_like(x, float("nan")), _model(x, t))


def test_whole_call_graph_reports_nan():
    """The NaN flags are reset inside the graph: a clean replay after a bad one passes; a model output
    that is NaN at step 0 and a NaN x_T (its own flag, checked since the runtime names a bad x_T)
    each raise their own message when replayed."""
    table = gr.load(COEFFS / "cld/cld_nfe10_quadratic_q3.safetensors", device="cuda")
    x_T = torch.ones((2, 2, 3, 4, 4), device="cuda")
    big, nan = x_T.clone(), x_T.clone()
    big[1, 0, 2, 3, 3] = 1e31
    nan[1, 0, 2, 3, 3] = float("nan")
    assert torch.isfinite(gr.sample(_nan_above, table, x_T=x_T, compile="graph")).all()   # captured here
    with pytest.raises(gr.SamplingError, match=r"model output is not finite \(NaN/inf\) at step 0"):
        gr.sample(_nan_above, table, x_T=big, compile="graph")                          # replayed
    assert torch.isfinite(gr.sample(_nan_above, table, x_T=x_T, compile="graph")).all()  # flags reset in the graph
    with pytest.raises(gr.SamplingError, match=r"x_T is not finite \(NaN/inf\)"):
        gr.sample(_nan_above, table, x_T=nan, compile="graph")
    assert torch.isfinite(gr.sample(_nan_above, table, x_T=x_T, compile="graph")).all()
