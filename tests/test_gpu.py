"""The runtime on CUDA: no host synchronisation in a whole ``sample`` call, graph capture equal to
eager, the same samples as on the CPU. Marked gpu; skipped where CUDA is absent (pytest -m gpu)."""

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
    """compile=True (torch.compile, mode reduce-overhead: CUDA graphs) against eager, float32."""
    table = gr.load(COEFFS / f"{file}.safetensors", device="cuda")
    x_T = torch.randn((16, table.k, 3, 32, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    a = gr.sample(_model, table, x_T=x_T)
    for _ in range(2):                                                         # second call replays the graphs
        b = gr.sample(_model, table, x_T=x_T, compile=True)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
