"""Model factories for the runtime CLI test (python -m gddim_runtime sample --model toy_models:...)."""

import torch


class Shrink(torch.nn.Module):
    data_shape = (2, 4)

    def forward(self, u, t):
        return 0.1 * u


def shrink():
    return Shrink()


def broken():
    return lambda u, t: u[..., :1]


def vp_rings_exact():
    """The exact eps_R of validation.bench's 2-D rings under vp_linear (python -m validation.calibrate)."""
    import derive
    from validation import bench
    from validation.exact import DenseModel, MixtureScore
    d = derive.derive("vp_linear")
    dense = d.dense().to_runtime()
    model = DenseModel(MixtureScore(*bench.rings()), dense)
    model.data_shape = (2,)
    return model
