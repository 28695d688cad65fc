"""Small time-conditioned networks for the learned-network benchmark, their training loop and checkpoints.

One architecture per data kind, the same for every process (only the k input/output channels differ):
  rings_net   2-D points: u [B, k, 2] -> eps [B, k, 2]; residual MLP, 3 layers of 128.
  digits_net  8 x 8 images: u [B, k, 8, 8] -> eps [B, k, 8, 8]; residual MLP, 3 layers of 256 (a conv
              net of similar quality cost 10x more per evaluation on this 2-core CPU, and the table
              needs ~10^4 evaluations per process).
  Classifier 8 x 8 digits -> 10 classes, its 32-d penultimate layer is the Frechet feature space.
Time enters through [log t, t] features (t spans 1e-5 .. 1, the small times matter for CLD and BDM).
"""

import math
import time

import torch
from torch import nn

import gddim_runtime as gr


class TimeEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.freq = nn.Parameter(torch.randn(dim // 2) * 2.0, requires_grad=False)
        self.net = nn.Sequential(nn.Linear(dim + 2, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        t = t.to(torch.float32).reshape(-1, 1)
        s = torch.log(t.clamp_min(1e-6)) / 4
        ang = s * self.freq[None]
        return self.net(torch.cat([ang.sin(), ang.cos(), s, t], dim=1))


class ResMLP(nn.Module):
    """u [B, k, *data] -> same shape: input layer, residual SiLU layers with the time embedding added, output."""

    def __init__(self, k, data_shape, hidden, layers=3):
        super().__init__()
        self.k, self.data_shape = k, tuple(data_shape)
        n = k * math.prod(self.data_shape)
        self.embed = TimeEmbed(64)
        self.temb = nn.Linear(64, layers * hidden)
        self.inp = nn.Linear(n, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, n)

    def forward(self, u, t):
        B = u.shape[0]
        e = self.temb(self.embed(t)).chunk(len(self.hidden), dim=1)
        h = self.inp(u.reshape(B, -1).to(torch.float32))
        for lin, te, nm in zip(self.hidden, e, self.norm):
            h = h + lin(torch.nn.functional.silu(nm(h) + te))
        return self.out(torch.nn.functional.silu(h)).reshape(u.shape).to(u.dtype)


class Preconditioned(nn.Module):
    """eps_theta(u, t) = eps_G(u, t) + net(u, t): a skip connection to the exact eps_R of Gaussian data
    N(mean, var I) under the same SDE (per coordinate/frequency: eps_G = R^T (Sigma + var d d^T)^-1 (u - d mean),
    d = D_t e_0), from the dense coefficients. The network learns only the non-Gaussian part; without it the
    CLD networks' eps at t ~ T (where the exact eps is a linear function of u) was off by ~0.1 in mean square,
    which the backward flow's expanding Psi amplified into diverging samples (the EDM-style c_skip idea)."""

    def __init__(self, net, dense, data_shape, mean, var):
        super().__init__()
        self.net, self.dense = net, dense
        self.basis = dense.basis(data_shape)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64).reshape(data_shape), persistent=False)
        self.var = float(var)

    def _apply(self, fn, recurse=True):
        """``.to(device)``, ``.cuda()``, ... also move the skip's dense coefficients (not module tensors): to
        the device ``fn`` sends a float64 probe to; they stay float64 whatever dtype the module takes."""
        super()._apply(fn, recurse)
        self.dense = self.dense.to(fn(torch.zeros((), dtype=torch.float64)).device)
        return self

    def forward(self, u, t):
        eps_g = gr.gaussian_eps(self.dense, u, t, self.mean, self.var).to(torch.float64)
        return (eps_g + self.net(u, t).to(torch.float64)).to(u.dtype)


def rings_net(k):
    return ResMLP(k, (2,), hidden=128, layers=3)


def digits_net(k):
    return ResMLP(k, (8, 8), hidden=256, layers=3)


class Classifier(nn.Module):
    def __init__(self, feat=32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1),
                                  nn.SiLU(), nn.Flatten(), nn.Linear(32 * 16, feat), nn.SiLU())
        self.head = nn.Linear(feat, 10)

    def features(self, x):
        return self.body(x.reshape(-1, 1, 8, 8).to(torch.float32))

    def forward(self, x):
        return self.head(self.features(x))


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def train_eps_R(net, dense, draw, steps, batch, lr=2e-3, seed=0, log=None, ema=0.999, times="quadratic"):
    """Train ``net`` in the eps_R parametrisation with gr.add_noise; t from gr.sample_times(kind=times)
    (default uniform in sqrt t, the variable of the quadratic sampling grid: a first run uniform in t left
    the rings network 0.3-0.5 off the exact eps (mean square) for t in 0.02-0.1, where the modes form).

    draw(n, generator) -> x0 [n, *data_shape] (float32). Adam with cosine decay; returns (EMA copy of the
    network, seconds, final smoothed loss)."""
    import copy
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    avg = copy.deepcopy(net).requires_grad_(False)
    start, smooth = time.perf_counter(), None
    for step in range(steps):
        x0 = draw(batch, g)
        t = gr.sample_times(dense, batch, kind=times, generator=g)
        u, eps = gr.add_noise(dense, x0, t, generator=g)
        loss = gr.diffusion_loss(dense, net(u, t.to(torch.float32)), x0, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema, (1 + step) / (10 + step))
            for pa, pn in zip(avg.net.parameters() if hasattr(avg, 'net') else avg.parameters(),
                              net.net.parameters() if hasattr(net, 'net') else net.parameters()):
                pa.mul_(d).add_(pn.detach(), alpha=1 - d)
        lv = float(loss.detach())
        smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: loss {smooth:.4f} ({time.perf_counter() - start:.0f} s)")
    return avg.eval(), time.perf_counter() - start, smooth


def save(net, path, meta):
    net = getattr(net, "net", net)            # a Preconditioned wrapper stores only the learned part
    import json
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"meta": json.dumps(meta, sort_keys=True)})


def load(net, path):
    """Load into ``net`` (for a Preconditioned wrapper: into its inner network)."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    getattr(net, "net", net).load_state_dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return net.eval(), meta
