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
