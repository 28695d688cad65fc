"""gddim_runtime: a lean torch sampler that consumes gddim-toolkit coefficient tables.

    import gddim_runtime as gr
    table = gr.load("coeffs/cld/cld_nfe50_quadratic_q3.safetensors", device="cuda")
    u = gr.sample(model, table, batch=64, data_shape=(3, 32, 32), parametrization="eps_R",
                  sampler="gddim", generator=torch.Generator("cuda").manual_seed(0))

Imports torch, numpy and safetensors only (never sympy, mpmath or scipy). The torch parts
load on first use, so that ``derive`` can share the format constant without importing torch.
"""

from ._format import FORMAT_VERSION, TableError, read_table

_LAZY = {
    "from_tensors": "._table",
    "read_samples": "._distributed",
    "load": "._table", "Table": "._table", "split": "._table", "merge": "._table", "block_apply": "._table",
    "sample": "._samplers", "default_sampler": "._samplers", "model_dtype_of": "._samplers",
    "SAMPLERS": "._samplers", "PARAMETRIZATIONS": "._samplers",
    "SamplingError": "._samplers", "dct2": "._dct", "idct2": "._dct", "final_denoise": "._samplers",
    "load_dense": "._dense", "dense_from_tensors": "._dense", "DenseCoefficients": "._dense",
    "table_from_dense": "._weights", "GDDIMScheduler": ".diffusers",
    "add_noise": "._training", "training_target": "._training", "diffusion_loss": "._training", "sample_times": "._training",
    "gaussian_eps": "._training", "gaussian_probe": "._probe",
    "UnstableSamplerWarning": "._probe", "PROBE_LIMIT": "._probe",
}

__all__ = ["FORMAT_VERSION", "TableError", "read_table", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'gddim_runtime' has no attribute {name!r}")
