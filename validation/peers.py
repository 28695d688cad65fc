"""Peers for VP inside the benchmark: diffusers' schedulers on the same continuous process as gDDIM.

    python -m validation.bench --peers          # -> validation/results/peers.md and peers.csv

Process: a VP spec (default ``vp_linear``: alpha_bar(t) = mean_t^2, t from T = 1 down to t_min = 1e-3).
Diffusers works on 1000 discrete steps; they are put on the same continuous process by
``trained_betas`` such that alphas_cumprod[i] = alpha_bar((i + 1) / 1000) (from the spec's own
mean, MPFR rounded once; diffusers keeps betas in float32, so its alphas_cumprod differ from these
by ~1e-7 relative) and a model that maps timestep tau to t = (tau + 1) / 1000 (tau = 0 is t_min,
tau = 999 is T, fractional tau of Karras/Lu/exponential schedules likewise). The model is the
exact eps of the data at that t (``validation.exact.MixtureScore`` with the spec's D_t, Sigma_t),
so every difference is discretisation error. Same prior noise x_T = sqrt(1 - alpha_bar(T)) z for
every sampler; the model calls are counted, not assumed (NFE = calls; gDDIM's NFE includes its
final denoising evaluation, diffusers' multistep schedulers jump to clean data in their last step
without an extra call).

Peers (diffusers 0.42.1), each with every variant below, the best variant per metric reported:
  DDIM                 timestep_spacing leading (diffusers' default) / trailing / linspace;
                       clip_sample=False (its default True clips x0 to [-1, 1]), set_alpha_to_one
  DPM-Solver++ 2M, 3M  sigmas default (spacing linspace / leading / trailing), Karras, Lu lambdas,
                       exponential; lower_order_final True / False; final_sigmas_type zero / sigma_min
  UniPC 2, 3           bh1 / bh2; sigmas default (3 spacings), Karras, exponential; lower_order_final;
                       final_sigmas_type
  DEIS 3               sigmas default (3 spacings), Karras, exponential; lower_order_final (DEIS
                       lowers the order of its last step only below 15 steps)
Ours: deterministic gDDIM, orders 1-4 on the grids quadratic, logsnr and edm (rho = 7), the
configurations the toolkit offers today; NFE = steps + the final denoising evaluation.

Data: the 2-D rings, the 4-mode image mixture (3 x 16 x 16) and a 64-D mixture of 10 components
with unequal weights and spreads (``mixture64``). Metrics as in validation.bench: endpoint error
against the exact probability-flow solution from the same noise followed by E[x_0 | u_t_min]
(dopri5 at 1e-9), and the component Frechet distance (CFD) with its Monte-Carlo floor.
"""

import csv
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import gddim_runtime as gr
from derive import _hp

from .bench import Tables, component_fd, denoise, images, rings
from .exact import DenseModel, MixtureScore, TableModel

NFES = (5, 10, 20)
GRIDS = ("quadratic", "logsnr", "edm")
ORDERS = (1, 2, 3, 4)
N_TRAIN = 1000


def mixture64(dim=64, C=10, seed=7):
    """A 64-D mixture not shaped like the others: unequal weights (1..C), spreads 0.1-0.5, means ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn((C, dim), generator=g, dtype=torch.float64)
    stds = torch.linspace(0.1, 0.5, C, dtype=torch.float64)
    w = torch.arange(1, C + 1, dtype=torch.float64)
    return means, stds, w / w.sum()


def draw(means, stds, weights, n, gen):
    idx = torch.multinomial(weights, n, replacement=True, generator=gen)
    noise = torch.randn((n,) + means.shape[1:], generator=gen, dtype=torch.float64)
    return means[idx] + stds[idx].view(-1, *[1] * (means.ndim - 1)) * noise


class VPModel:
    """eps(x, tau) for diffusers: the exact eps of the data at t = (tau + 1) / 1000; counts calls."""

    def __init__(self, mix, deriv):
        self.mix, self.deriv, self.calls, self._c = mix, deriv, 0, {}

    def coefficients(self, t):
        if t not in self._c:
            tt = _hp.array([t])
            D = _hp.to_float64(self.deriv.data_to_state(tt), "D")[0]
            S = _hp.to_float64(self.deriv.sigma(tt), "sigma")[0]
            self._c[t] = torch.from_numpy(D), torch.from_numpy(S)
        return self._c[t]

    def __call__(self, x, tau):
        t = (float(tau) + 1) / N_TRAIN
        D, S = self.coefficients(t)
        s = self.mix.score(x[:, None].to(torch.float64), D, S)[:, 0]
        self.calls += 1
        return (-S[0, 0, 0].sqrt() * s).to(x.dtype)


def trained_betas(deriv):
    """betas with cumprod(1 - betas)[i] = alpha_bar((i + 1) / 1000), alpha_bar = D_t^2 (a VP spec)."""
    tt = _hp.array([(i + 1) / N_TRAIN for i in range(N_TRAIN)])
    ab = _hp.to_float64(deriv.data_to_state(tt), "D")[:, 0, 0, 0] ** 2
    return 1 - ab / np.concatenate([[1.0], ab[:-1]])


def peer_variants():
    """(peer, variant label, scheduler class name, kwargs) for every configuration tried."""
    out = [("DDIM", f"spacing={s}", "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing=s))
           for s in ("leading", "trailing", "linspace")]
    sigma_opts = {"default": {}, "karras": {"use_karras_sigmas": True}, "lu": {"use_lu_lambdas": True},
                  "exponential": {"use_exponential_sigmas": True}}

    def multistep(peer, cls, base, sigmas, finals=("zero", "sigma_min")):
        for sig in sigmas:
            for spacing in (("linspace", "leading", "trailing") if sig == "default" else ("linspace",)):
                for lof in (True, False):
                    for final in finals:
                        kw = dict(base, timestep_spacing=spacing, lower_order_final=lof, **sigma_opts[sig])
                        label = f"{sig}" + (f" {spacing}" if sig == "default" else "") + f" lof={lof}"
                        if final is not None:
                            kw["final_sigmas_type"] = final
                            label += f" final={final}"
                        out.append((peer, label, cls, kw))
    for q in (2, 3):
        multistep(f"DPM-Solver++ {q}M", "DPMSolverMultistepScheduler", dict(solver_order=q, algorithm_type="dpmsolver++"),
                  ("default", "karras", "lu", "exponential"))
    for q in (2, 3):
        for st in ("bh1", "bh2"):
            multistep(f"UniPC-{q}", "UniPCMultistepScheduler", dict(solver_order=q, solver_type=st),
                      ("default", "karras", "exponential"))
    out = [(p, (f"{kw['solver_type']} " + lab) if p.startswith("UniPC") else lab, c, kw) for p, lab, c, kw in out]
    multistep("DEIS-3", "DEISMultistepScheduler", dict(solver_order=3), ("default", "karras", "exponential"), finals=(None,))
    return out


DEFAULTS = {"DDIM": "spacing=leading", "DPM-Solver++ 2M": "default linspace lof=True final=zero",
            "DPM-Solver++ 3M": "default linspace lof=True final=zero", "UniPC-2": "bh2 default linspace lof=True final=zero",
            "UniPC-3": "bh2 default linspace lof=True final=zero", "DEIS-3": "default linspace lof=True"}


def run_scheduler(cls_name, kw, betas, model, x_T, nfe):
    import diffusers
    cls = getattr(diffusers, cls_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = cls(num_train_timesteps=N_TRAIN, trained_betas=betas, prediction_type="epsilon", **kw)
        sched.set_timesteps(nfe)
        x = x_T.clone() * sched.init_noise_sigma
        model.calls = 0
        for tau in sched.timesteps:
            eps = model(sched.scale_model_input(x, tau), tau)
            x = sched.step(eps, tau, x).prev_sample
    return x, model.calls


def datasets(quick=False):
    m, s = rings()
    out = [("rings (2-D)", m, s, torch.full((12,), 1 / 12, dtype=torch.float64), 1000 if quick else 2000)]
    m, s = images(16)
    out.append(("images 3x16x16", m, s, torch.full((4,), 0.25, dtype=torch.float64), 64 if quick else 128))
    m, s, w = mixture64()
    out.append(("mixture 64-D", m, s, w, 500 if quick else 1000))
    return out


def run_dataset(label, means, stds, weights, batch, spec_name, nfes, rows, log):
    tabs = Tables(spec_name)
    deriv = tabs.deriv
    mix = MixtureScore(means, stds, weights)
    data_shape = tuple(means.shape[1:])
    dim = math.prod(data_shape)
    z = torch.randn((batch,) + data_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_ref = tabs.table(1, order=1)
    x_T = t_ref.tensors["R"][0, 0, 0, 0] * z                                    # sqrt(1 - alpha_bar(T)) z
    dense = tabs.dense_coeffs()
    ref = gr.sample(DenseModel(mix, dense), t_ref, x_T=x_T[:, None], sampler="probability_flow_rk45", dense=dense,
                    rtol=1e-9, atol=1e-9, dtype=torch.float64, denoise=False)
    ref = denoise(t_ref, ref, TableModel(mix, t_ref)(ref, t_ref.tensors["t"][-1:].expand(batch)))[:, 0]
    floor = component_fd(draw(means, stds, weights, batch, torch.Generator().manual_seed(2)), means, stds, weights)[0]

    def record(who, config, nfe_target, x, calls):
        if torch.isfinite(x).all():
            err = float((x - ref).reshape(batch, -1).norm(dim=1).mean() / math.sqrt(dim))
            cfd = component_fd(x, means, stds, weights)[0]
        else:                                     # diverged (diffusers' UniPC-3 / 3M at NFE 5 do): never the best
            err = cfd = float("inf")
        rows.append({"data": label, "who": who, "config": config, "nfe_target": nfe_target, "nfe": calls,
                     "endpoint_error": err, "cfd": cfd, "cfd_floor": floor})

    betas = trained_betas(deriv)
    model = VPModel(mix, deriv)
    variants = peer_variants()
    for nfe in nfes:
        start = time.perf_counter()
        for grid in GRIDS:
            for q in ORDERS:
                tab = tabs.table(nfe - 1, q, grid=grid)
                u, info = gr.sample(TableModel(mix, tab), tab, x_T=x_T[:, None], dtype=torch.float64, return_info=True)
                record("gDDIM", f"q{q} {grid}", nfe, u[:, 0], info["nfe"])
        for peer, vlabel, cls_name, kw in variants:
            try:
                x, calls = run_scheduler(cls_name, kw, betas, model, x_T, nfe)
            except Exception as exc:            # a combination diffusers refuses: recorded, not fatal
                log(f"  {peer} {vlabel} NFE {nfe}: refused ({type(exc).__name__}: {exc})")
                continue
            record(peer, vlabel, nfe, x, calls)
        log(f"{label}: NFE {nfe} done ({time.perf_counter() - start:.0f} s)")


def best(rows, data, nfe, metric, who=None, peers=False):
    sel = [r for r in rows if r["data"] == data and r["nfe_target"] == nfe and r["nfe"] <= nfe
           and (r["who"] != "gDDIM" if peers else r["who"] == (who or "gDDIM"))]
    return min(sel, key=lambda r: r[metric]) if sel else None


def summary(rows, nfes):
    """Per data set, NFE and metric: our best configuration vs the best peer configuration."""
    lines = ["| data | NFE | metric | gDDIM best (config) | best peer (config) | ours / peer | CFD floor |",
             "|---|---|---|---|---|---|---|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        for nfe in nfes:
            for metric in ("endpoint_error", "cfd"):
                o, p = best(rows, data, nfe, metric), best(rows, data, nfe, metric, peers=True)
                if o is None or p is None:
                    continue
                lines.append(f"| {data} | {nfe} | {'endpoint' if metric == 'endpoint_error' else 'CFD'} | "
                             f"{o[metric]:.2e} ({o['config']}) | {p[metric]:.2e} ({p['who']}, {p['config']}) | "
                             f"{o[metric] / p[metric]:.2f} | {o['cfd_floor']:.1e} |")
    return "\n".join(lines)


def per_peer(rows, nfes, metric):
    """Best variant of each peer (and gDDIM) per data set and NFE, and diffusers' default configuration."""
    whos = list(dict.fromkeys(r["who"] for r in rows))
    lines = ["| data | sampler | " + " | ".join(f"NFE {n} best" for n in nfes) + " | "
             + " | ".join(f"NFE {n} default" for n in nfes) + " |", "|---|---|" + "---|" * (2 * len(nfes))]
    for data in dict.fromkeys(r["data"] for r in rows):
        for who in whos:
            cells = []
            for nfe in nfes:
                b = best(rows, data, nfe, metric, who=who)
                cells.append(f"{b[metric]:.2e}" if b else "-")
            for nfe in nfes:
                d = [r for r in rows if r["data"] == data and r["who"] == who and r["nfe_target"] == nfe
                     and r["config"] == DEFAULTS.get(who, "q3 quadratic")]
                cells.append(f"{d[0][metric]:.2e}" if d else "-")
            lines.append(f"| {data} | {who} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(quick=False, out=None, spec_name="vp_linear", log=print):
    start = time.perf_counter()
    rows = []
    for label, means, stds, weights, batch in datasets(quick):
        run_dataset(label, means, stds, weights, batch, spec_name, NFES, rows, log)
    result = {"rows": rows, "nfes": NFES, "seconds": time.perf_counter() - start, "quick": quick}
    if out is not None:
        write(result, Path(out))
    return result


def write(result, out):
    import diffusers
    out.mkdir(parents=True, exist_ok=True)
    rows, nfes = result["rows"], result["nfes"]
    suffix = "_quick" if result["quick"] else ""
    with open(out / f"peers{suffix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n_var = len(peer_variants())
    md = ["# gDDIM vs diffusers' schedulers on VP (exact-score data)", "",
          __doc__.split("\n\n", 2)[2].strip(), "",
          f"Run: `python -m validation.bench --peers{' --quick' if result['quick'] else ''}` "
          f"({result['seconds']:.0f} s on this machine; diffusers {diffusers.__version__}; {n_var} peer configurations "
          f"and {len(GRIDS) * len(ORDERS)} gDDIM configurations per data set and NFE; rows with more model calls than "
          "the NFE are excluded).", "",
          "Best of many configurations on the same noise favours the side with more configurations (the peers).", "",
          "## Ours (best configuration) vs the best peer configuration", "",
          "ours / peer < 1: gDDIM leads; > 1: gDDIM trails by that factor.", "",
          summary(rows, nfes), "",
          "## Best variant of each sampler, and its diffusers default (gDDIM: q3 quadratic), endpoint error", "",
          per_peer(rows, nfes, "endpoint_error"), "",
          "## The same, component Frechet distance", "",
          per_peer(rows, nfes, "cfd"), "",
          f"Every run: `peers{suffix}.csv`."]
    (out / f"peers{suffix}.md").write_text("\n".join(md) + "\n")
