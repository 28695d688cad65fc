"""Peers for VP inside the benchmark: diffusers' schedulers on the same continuous process as gDDIM.

    python -m validation.peers            # every configuration -> validation/results/peers.md, peers.csv
    python -m validation.peers --quick    # the decisive ones of the committed run, fewer samples -> peers_quick.*
    python -m validation.peers --samples 1000 64 500 --ours-only   # every gDDIM row again, the peers' rows kept
    python -m validation.bench --peers [--quick]   # the same

Process: a VP spec (default ``vp_linear``: alpha_bar(t) = mean_t^2, t from T = 1 down to t_min = 1e-3).
Diffusers works on 1000 discrete steps; they are put on the same continuous process by
``trained_betas`` such that alphas_cumprod[i] = alpha_bar((i + 1) / 1000) (from the spec's own
mean, MPFR rounded once; diffusers keeps betas in float32, so its alphas_cumprod differ from these
by ~1e-7 relative) and a model that maps timestep tau to t = (tau + 1) / 1000 (tau = 0 is t_min,
tau = 999 is T; Karras/Lu/exponential schedules round or truncate tau to integers, their sigmas
stay fractional: diffusers' own behaviour). The model is the exact eps of the data at that t
(``validation.exact.MixtureScore`` with the spec's D_t, Sigma_t), so every difference is
discretisation error. Same prior noise x_T = sqrt(1 - alpha_bar(T)) z for every sampler; the model
calls are counted, not assumed (NFE = calls).

What each sampler's output is compared with (the endpoint error): the exact probability-flow solution
from the same noise to t_min (dopri5 at 1e-9), then
  - for a clean output, E[x_0 | u_t_min] (the final denoising every gDDIM table takes as its NFE-th
    call; diffusers' final_sigmas_type="zero" jumps to clean data in its last step; DDIM with
    set_alpha_to_one ends at alpha = 1);
  - for a noisy output, u_t_min itself. final_sigmas_type="sigma_min" and every DEIS schedule end on
    the noisy state at sigma(t_min) (Karras/exponential sigmas with a zero-length last step
    sigma_min -> sigma_min). Until this run they were compared with E[x_0 | u_t_min], which is
    ~1.1e-3 per coordinate away from u_t_min on these data (mode std 0.1, sigma(t_min) = 0.0105):
    UniPC-2 (default spacing, sigma_min) on the images at NFE 20 scored 1.9e-4 there because its
    last, long data-prediction step (t 0.051 -> 0.001) shrinks the deviation from the mode by about
    what the denoising does; against the state it actually approximates its error is 1.05e-3.
  - "+denoise" variants: the noisy ending turned into clean data inside the same budget, like gDDIM:
    x_0 = (x - sigma eps(x, t_min)) / alpha; where the last step has zero length its call (already
    at t_min) is reused, otherwise the scheduler gets NFE - 1 steps and the denoising is the NFE-th
    call. Both are reported; the best of all is taken.

Peers (diffusers 0.42.1), each with every variant below, the best variant per metric reported:
  DDIM                 timestep_spacing leading (diffusers' default) / trailing / linspace;
                       clip_sample=False (its default True clips x0 to [-1, 1]), set_alpha_to_one
  DPM-Solver++ 2M, 3M  sigmas default (spacing linspace / leading / trailing), Karras, Lu lambdas,
                       exponential; lower_order_final True / False; final_sigmas_type zero / sigma_min
  UniPC 2, 3           bh1 / bh2; sigmas default (3 spacings), Karras, exponential; lower_order_final;
                       final_sigmas_type
  DEIS 3               sigmas default (3 spacings), Karras, exponential; lower_order_final (DEIS
                       lowers the order of its last step only below 15 steps)
Ours: deterministic gDDIM from derive's API tables (``derive.derive(spec).table``) and the runtime:
form eps (``gddim``), eps + Adams-Moulton corrector (``gddim_pc``), data prediction (``gddim_x0``,
for VP with variable logsnr = DPM-Solver++) and its UniC-style corrector (``gddim_x0_pc``); the
multistep variable t, rho or logsnr; orders 1-4; grids quadratic, logsnr, edm (rho = 7) and auto
(derive/_autogrid.py); NFE = steps + the final denoising evaluation, correctors reuse the next call.
The data-prediction samplers also with their options, written [flat,correct,state] after the form:
flat = the predictor x0_weights_flat (the step's weight spread flat in tau; UniP-2 "bh2" for VP at
order 2), correct = the call at t_N also corrects the last step (as UniPC's zero-length last step),
state = no final denoising: the output is the state at t_min, compared with the exact u_t_min like
the peers' noisy endings, and the denoising's call is one more step (N = NFE steps; with correct,
N = NFE - 1 and the last call corrects the state).
Grids that start below T (START_GRIDS, written <kind>@<rho_s>; derive/_start.py, derive/MATH_x0.md section 6):
the kind's grid on [t_min, t_s] with rho(t_s) = rho_s (25, 60: t_s = 0.80, 0.90 on VP linear), the state at t_s
R_ts R_T^-1 x_T, no model call above t_s (diffusers' "leading" spacing starts at t = 1 - 1/N + 0.001 the same way,
without the factor). Its own cost, the skip floor: the exact flow from the skipped state against the exact flow
from x_T at T (same metric).

Data: the 2-D rings, the 4-mode image mixture (3 x 16 x 16) and a 64-D mixture of 10 components
with unequal weights and spreads (``mixture64``). Metrics as in validation.bench: endpoint error
(above) and the component Frechet distance (CFD) with its Monte-Carlo floor.
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
GRIDS = ("quadratic", "logsnr", "edm", "auto")
ORDERS = (1, 2, 3, 4)
VARIABLES = ("t", "rho", "logsnr")
FORMS = {"gddim": "eps", "gddim_pc": "eps+pc", "gddim_x0": "x0", "gddim_x0_pc": "x0+pc"}
# the data-prediction samplers' options (gddim_runtime/_variants.py), as [flat,correct,state] after the form:
# flat: predictor="flat"; correct: last="correct"; state: no final denoising, the output is the state at t_min
# (N = NFE steps; x0+pc with last="none" unless correct)
X0_OPTIONS = {"gddim_x0": [("state",)],
              "gddim_x0_pc": [("correct",), ("flat", "correct"), ("flat", "correct", "state")]}
# grids that start below T (derive/_start.py, "<kind>@<rho_s>": the grid on [t_min, t_s], rho(t_s) = rho_s, the state
# at t_s is R_ts R_T^-1 x_T, no model call): rho_s 25 and 60 (VP linear: t_s = 0.80, 0.90; diffusers' "leading"
# spacing starts at t = 0.801 at NFE 5, 0.901 at NFE 10); orders 2 and 3, the grids that won cells
START_GRIDS = ("quadratic@25", "quadratic@60", "logsnr@25", "logsnr@60")
START_ORDERS = (2, 3)
OUR_DEFAULT = "eps t q3 quadratic"                          # the paper's sampler, the toolkit's default table
N_TRAIN = 1000
RESULTS = Path(__file__).resolve().parent / "results"


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
        self.mix, self.deriv, self.calls = mix, deriv, 0
        tt = [(i + 1) / N_TRAIN for i in range(N_TRAIN)]        # every integer tau at once (MPFR, rounded once)
        D = torch.from_numpy(_hp.to_float64(deriv.data_to_state(_hp.array(tt)), "D"))
        S = torch.from_numpy(_hp.to_float64(deriv.sigma(_hp.array(tt)), "sigma"))
        self._c = {t: (D[i], S[i]) for i, t in enumerate(tt)}

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


def _scheduler(cls_name, kw, betas, steps):
    import diffusers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, cls_name)(num_train_timesteps=N_TRAIN, trained_betas=betas, prediction_type="epsilon",
                                              **kw)
        sched.set_timesteps(steps)
    return sched


def run_peer(cls_name, kw, betas, model, x_T, nfe, denoise=False):
    """One diffusers run with exactly ``nfe`` counted model calls -> (x, calls, output).

    output "x0": the scheduler ends on clean data (sigma = 0, or DDIM's alpha = 1); "u_tmin": it ends
    on the noisy state at sigma(t_min) (every ``final_sigmas_type="sigma_min"`` schedule and every DEIS
    schedule do), which is compared with the exact probability-flow state at t_min, not with
    E[x_0 | u_t_min]. ``denoise=True`` turns a noisy ending into clean data inside the same budget,
    as gDDIM does: x_0 = (x - sigma eps(x, t_min)) / alpha at t_min. Where the schedule's last step has
    zero length (Karras / exponential sigmas end sigma_min -> sigma_min, so its last call is already at
    t_min) that call's eps is reused; otherwise the scheduler gets nfe - 1 steps and the denoising
    call is the nfe-th (counted like every other).
    """
    sched = _scheduler(cls_name, kw, betas, nfe)
    sigmas = getattr(sched, "sigmas", None)
    noisy = sigmas is not None and float(sigmas[-1]) > 0
    if noisy:
        alpha, sigma = (float(c.reshape(-1)[0]) for c in model.coefficients(1 / N_TRAIN))
        sigma = math.sqrt(sigma)
        if abs(float(sigmas[-1]) - sigma / alpha) > 1e-2 * sigma / alpha:    # diffusers' sigma = std / mean (float32)
            raise ValueError(f"{cls_name} ends at sigma {float(sigmas[-1])}, not at t_min ({sigma / alpha})")
    reuse = noisy and denoise and float(sigmas[-2]) == float(sigmas[-1])
    if noisy and denoise and not reuse:
        sched = _scheduler(cls_name, kw, betas, nfe - 1)
    x = x_T.clone() * sched.init_noise_sigma
    model.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tau in sched.timesteps:
            eps = model(sched.scale_model_input(x, tau), tau)
            x = sched.step(eps, tau, x).prev_sample
    if not (noisy and denoise):
        return x, model.calls, "u_tmin" if noisy else "x0"
    if reuse:
        if float(sched.timesteps[-1]) != 0:
            raise ValueError(f"{cls_name}: the zero-length last step is not at t_min (tau {float(sched.timesteps[-1])})")
    else:
        eps = model(x, torch.tensor(0))
    return (x - sigma * eps) / alpha, model.calls, "x0"


def run_scheduler(cls_name, kw, betas, model, x_T, nfe):
    """(x, model calls) of one diffusers run as its configuration ends it (see ``run_peer``)."""
    x, calls, _ = run_peer(cls_name, kw, betas, model, x_T, nfe)
    return x, calls


SAMPLES = {"full": (2000, 128, 1000), "quick": (300, 16, 200)}      # rings, images, 64-D mixture


def datasets(samples=SAMPLES["full"]):
    n_rings, n_images, n_mix = samples
    m, s = rings()
    out = [("rings (2-D)", m, s, torch.full((12,), 1 / 12, dtype=torch.float64), n_rings)]
    m, s = images(16)
    out.append(("images 3x16x16", m, s, torch.full((4,), 0.25, dtype=torch.float64), n_images))
    m, s, w = mixture64()
    out.append(("mixture 64-D", m, s, w, n_mix))
    return out


def form_variants():
    """(form label, sampler, run options) for every form: the four samplers, and the data-prediction ones with
    each combination of X0_OPTIONS. run options: kw (sampler options), denoise, steps (N - NFE: -1 with the final
    denoising or a correcting last call, 0 for an ending on the state at t_min with one call per step)."""
    out = [(form, sampler, dict(kw={}, denoise=True, steps=-1)) for sampler, form in FORMS.items()]
    for sampler, combos in X0_OPTIONS.items():
        for opts in combos:
            kw = {"predictor": "flat"} if "flat" in opts else {}
            if sampler == "gddim_x0_pc":
                kw["last"] = "correct" if "correct" in opts else ("none" if "state" in opts else "predict")
            steps = 0 if "state" in opts and "correct" not in opts else -1
            out.append((f"{FORMS[sampler]}[{','.join(opts)}]", sampler, dict(kw=kw, denoise="state" not in opts,
                                                                              steps=steps)))
    return out


def other_datasets(samples=(64, 300)):
    """Mixtures outside the benchmark (``--other``, peers_other.*): the claims must hold for the class, not for the
    benchmark's data. 6 procedural 3 x 16 x 16 images (other patterns than ``images``) with unequal weights and
    widths 0.05-0.3; a 32-D mixture of 8 components (seed 11) with widths 0.05-0.3 and unequal weights; a 24-D
    mixture of 5 components whose mean is far from 0 (means 1 + N(0, I), seed 23, widths 0.02-0.4, weights 1..5:
    the case the start skip, which drops the data's signal above t_s, handles worst), with the 32-D one's count."""
    n_img, n_mix = samples
    y, x = torch.meshgrid(torch.linspace(0, 1, 16, dtype=torch.float64), torch.linspace(0, 1, 16, dtype=torch.float64),
                          indexing="ij")
    pats = torch.stack([torch.stack([0.7 * torch.cos(math.pi * ((c % 3 + 1) * y - (c // 3 + 1) * x) + k) + 0.1 * (c - 2.5)
                                     for k in range(3)]) for c in range(6)])
    w = torch.arange(1, 7, dtype=torch.float64)
    out = [("images-b 3x16x16 (6 modes)", pats, torch.linspace(0.05, 0.3, 6, dtype=torch.float64), w / w.sum(), n_img)]
    g = torch.Generator().manual_seed(11)
    means = 1.5 * torch.randn((8, 32), generator=g, dtype=torch.float64)
    w = torch.arange(8, 0, -1, dtype=torch.float64)
    out.append(("mixture 32-D (seed 11)", means, torch.linspace(0.05, 0.3, 8, dtype=torch.float64), w / w.sum(), n_mix))
    g = torch.Generator().manual_seed(23)
    means = 1.0 + torch.randn((5, 24), generator=g, dtype=torch.float64)
    w = torch.arange(1, 6, dtype=torch.float64)
    out.append(("offset 24-D (5 modes, mean ~1)", means, torch.linspace(0.02, 0.4, 5, dtype=torch.float64), w / w.sum(),
                n_mix))
    return out


def ours_variants(grids=GRIDS, orders=ORDERS):
    """(config label, sampler, table options, run options) for every gDDIM configuration: form x variable x order
    x grid. Order 1 has one polynomial whatever the variable, so only ``t`` is run there."""
    out = []
    for grid in grids:
        for q in orders:
            for variable in (("t",) if q == 1 else VARIABLES):
                for form, sampler, run in form_variants():
                    out.append((f"{form} {variable} q{q} {grid}", sampler, dict(order=q, grid=grid, variable=variable),
                                run))
    return out


def start_variants():
    """gDDIM's configurations on the grids that start below T (START_GRIDS, orders START_ORDERS)."""
    return ours_variants(START_GRIDS, START_ORDERS)


class OurTables:
    """derive's API tables (form x0 + corrector weights: every sampler reads its part), shared by the data sets."""

    def __init__(self, spec_name):
        import derive
        self.derived, self.cache = derive.derive(spec_name), {}

    def get(self, nfe, order, grid, variable):
        key = (nfe, order, grid, variable)
        if key not in self.cache:
            if "@" in grid:                   # a start below T: derive/_start.py's times, as a file grid
                import tempfile
                from derive import _start
                times = _start.make_grid(grid, nfe - 1, self.derived.derivation)
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "start.txt"
                    path.write_text(" ".join(repr(t) for t in times) + "\n")
                    tab = self.derived.table(nfe=nfe, order=order, grid=str(path), variable=variable, form="x0",
                                             corrector=True, verify="none").to_runtime()   # reads the file: inside
            else:
                tab = self.derived.table(nfe=nfe, order=order, grid=grid, variable=variable, form="x0",
                                         corrector=True, verify="none").to_runtime()
            self.cache[key] = tab
        return self.cache[key]


def start_state(x_T, tab, deriv):
    """The state at the table's first time t_0 from the prior noise x_T at T: R_t0 R_T^-1 x_T (derive/_start.py's
    skip_map; x_T itself when t_0 = T). x_T [B, k, *data]."""
    from derive import _start
    t0 = float(tab.tensors["t"][0])
    if t0 == float(_hp.mpf(deriv.spec.T)):
        return x_T
    M = torch.from_numpy(_start.skip_map(deriv, t0))
    return gr.block_apply(M, x_T, tab.basis)


def run_dataset(label, means, stds, weights, batch, spec_name, nfes, rows, log, configs, our_tables=None, floors=None):
    """configs(label, nfe) -> (ours: [(label, sampler, options)], peers: [(peer, label, class, kwargs, denoise)]).
    floors (a list): gets one row per start rho_s among the configurations, the start skip's own cost."""
    tabs = Tables(spec_name)
    deriv = tabs.deriv
    our_tables = our_tables or OurTables(spec_name)
    mix = MixtureScore(means, stds, weights)
    data_shape = tuple(means.shape[1:])
    dim = math.prod(data_shape)
    z = torch.randn((batch,) + data_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_ref = tabs.table(1, order=1)
    x_T = t_ref.tensors["R"][0, 0, 0, 0] * z                                    # sqrt(1 - alpha_bar(T)) z
    dense = tabs.dense_coeffs()
    start = time.perf_counter()
    ref_u = gr.sample(DenseModel(mix, dense), t_ref, x_T=x_T[:, None], sampler="probability_flow_rk45", dense=dense,
                      rtol=1e-9, atol=1e-9, dtype=torch.float64, denoise=False)
    refs = {"x0": denoise(t_ref, ref_u, TableModel(mix, t_ref)(ref_u, t_ref.tensors["t"][-1:].expand(batch)))[:, 0],
            "u_tmin": ref_u[:, 0]}
    floor = component_fd(draw(means, stds, weights, batch, torch.Generator().manual_seed(2)), means, stds, weights)[0]
    log(f"{label}: {batch} samples, reference {time.perf_counter() - start:.0f} s")
    starts = sorted({c[2]["grid"].split("@")[1] for n in nfes for c in configs(label, n)[0] if "@" in c[2]["grid"]},
                    key=float)
    for rho_s in starts if floors is not None else ():
        floors.append(dict(skip_floor(mix, deriv, dense, x_T, ref_u[:, 0], float(rho_s)), data=label))

    def record(who, config, nfe_target, x, calls, output):
        if torch.isfinite(x).all():
            err = float((x - refs[output]).reshape(batch, -1).norm(dim=1).mean() / math.sqrt(dim))
            cfd = component_fd(x, means, stds, weights)[0]
        else:                                     # diverged (diffusers' UniPC-3 / 3M at NFE 5 do): never the best
            err = cfd = float("inf")
        rows.append({"data": label, "who": who, "config": config, "nfe_target": nfe_target, "nfe": calls,
                     "output": output, "endpoint_error": err, "cfd": cfd, "cfd_floor": floor})

    betas = trained_betas(deriv)
    model = VPModel(mix, deriv)
    for nfe in nfes:
        start = time.perf_counter()
        ours, peers = configs(label, nfe)
        for config, sampler, opts, run in ours:
            if nfe < opts["order"]:
                continue
            tab = our_tables.get(nfe + 1 + run["steps"], **opts)          # a table for nfe has nfe - 1 steps
            u, info = gr.sample(TableModel(mix, tab), tab, x_T=start_state(x_T[:, None], tab, deriv), sampler=sampler,
                                dtype=torch.float64,
                                return_info=True, denoise=run["denoise"], **run["kw"])
            record("gDDIM", config, nfe, u[:, 0], info["nfe"], "x0" if run["denoise"] else "u_tmin")
        for peer, vlabel, cls_name, kw, den in peers:
            try:
                x, calls, output = run_peer(cls_name, kw, betas, model, x_T, nfe, denoise=den)
            except Exception as exc:            # a combination diffusers refuses: recorded, not fatal
                log(f"  {peer} {vlabel} NFE {nfe}: refused ({type(exc).__name__}: {exc})")
                continue
            record(peer, vlabel, nfe, x, calls, output)
        log(f"{label}: NFE {nfe} done ({time.perf_counter() - start:.0f} s)")


def skip_floor(mix, deriv, dense, x_T, ref_u, rho_s):
    """The start skip's own cost: the exact flow (dopri5 at 1e-9) from the skipped state R_ts R_T^-1 x_T at t_s
    (rho(t_s) = rho_s) to t_min against the exact flow from x_T at T (``ref_u``), endpoint error of the state."""
    import tempfile
    import derive
    from derive import _start
    t_s = _start.start_time(deriv, rho_s)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "skip.txt"
        path.write_text(f"{t_s!r} {float(_hp.mpf(deriv.spec.t_min))!r}\n")
        tab = derive.derive(deriv.spec.name).table(nfe=2, order=1, grid=str(path), verify="none").to_runtime()
    u = gr.sample(DenseModel(mix, dense), tab, x_T=start_state(x_T[:, None], tab, deriv), sampler="probability_flow_rk45",
                  dense=dense, rtol=1e-9, atol=1e-9, dtype=torch.float64, denoise=False)[:, 0]
    n = x_T.shape[0]
    err = float((u - ref_u).reshape(n, -1).norm(dim=1).mean() / math.sqrt(x_T[0].numel()))
    return {"rho_s": rho_s, "t_s": t_s, "endpoint_error": err}


def all_peers():
    """Every peer configuration as diffusers ends it, and each noisy ending also with the counted denoising."""
    out = []
    for peer, label, cls_name, kw in peer_variants():
        out.append((peer, label, cls_name, kw, False))
        if peer == "DEIS-3" or kw.get("final_sigmas_type") == "sigma_min":
            out.append((peer, label + " +denoise", cls_name, kw, True))
    return out


def quick_configs(csv_path):
    """configs(data, nfe) for the decisive configurations of the full run (``csv_path``): at that data set
    and NFE the best configuration of gDDIM and of each peer per metric, plus diffusers' defaults and
    gDDIM's paper default."""
    with open(csv_path, newline="") as f:
        rows = [dict(r, nfe_target=int(r["nfe_target"]), nfe=int(r["nfe"]), endpoint_error=float(r["endpoint_error"]),
                     cfd=float(r["cfd"])) for r in csv.DictReader(f)]
    defaults = {(w, c) for w, c in DEFAULTS.items()} | {("gDDIM", OUR_DEFAULT)}

    def configs(data, nfe):
        keep = set(defaults)
        for metric in ("endpoint_error", "cfd"):
            for who in {r["who"] for r in rows}:
                b = best(rows, data, nfe, metric, who=who)
                if b is not None:
                    keep.add((who, b["config"]))
        return ([v for v in ours_variants() + start_variants() if ("gDDIM", v[0]) in keep],
                [v for v in all_peers() if (v[0], v[1]) in keep])
    return configs


def best(rows, data, nfe, metric, who=None, peers=False, start=True):
    """start=False: gDDIM's configurations from T only (no grid '<kind>@<rho_s>')."""
    sel = [r for r in rows if r["data"] == data and r["nfe_target"] == nfe and r["nfe"] <= nfe
           and (r["who"] != "gDDIM" if peers else r["who"] == (who or "gDDIM"))
           and (start or "@" not in r["config"])]
    return min(sel, key=lambda r: r[metric]) if sel else None


def summary(rows, nfes, start=True):
    """Per data set, NFE and metric: our best configuration vs the best peer configuration (start=False: ours
    from T only)."""
    lines = ["| data | NFE | metric | gDDIM best (config) | best peer (config) | ours / peer | CFD floor |",
             "|---|---|---|---|---|---|---|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        for nfe in nfes:
            for metric in ("endpoint_error", "cfd"):
                o, p = best(rows, data, nfe, metric, start=start), best(rows, data, nfe, metric, peers=True)
                if o is None or p is None:
                    continue
                ends = [" [ends noisy at t_min]" if r["output"] == "u_tmin" and metric == "endpoint_error" else ""
                        for r in (o, p)]
                lines.append(f"| {data} | {nfe} | {'endpoint' if metric == 'endpoint_error' else 'CFD'} | "
                             f"{o[metric]:.2e} ({o['config']}{ends[0]}) | {p[metric]:.2e} ({p['who']}, {p['config']}{ends[1]}) | "
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
                     and r["config"] == DEFAULTS.get(who, OUR_DEFAULT)]
                cells.append(f"{d[0][metric]:.2e}" if d else "-")
            lines.append(f"| {data} | {who} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_form(rows, nfes):
    """gDDIM's best configuration per form (eps, eps+pc, x0, x0+pc), endpoint error, with its config."""
    lines = ["| data | form | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for data in dict.fromkeys(r["data"] for r in rows):
        for form in [f[0] for f in form_variants()]:
            for start in (False, True):
                cells = []
                for nfe in nfes:
                    sel = [r for r in rows if r["data"] == data and r["who"] == "gDDIM" and r["nfe_target"] == nfe
                           and r["config"].split()[0] == form and ("@" in r["config"]) == start]
                    b = min(sel, key=lambda r: r["endpoint_error"]) if sel else None
                    cells.append(f"{b['endpoint_error']:.2e} ({' '.join(b['config'].split()[1:])})" if b else "-")
                if start and cells == ["-"] * len(nfes):
                    continue
                lines.append(f"| {data} | {form}{' @rho_s' if start else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_all(quick=False, out=None, spec_name="vp_linear", log=print, samples=None, configs=None, data=None, nfes=NFES,
            other=False):
    """quick: the decisive configurations of the committed full run (``quick_configs``) on fewer samples.
    data: only the data sets whose label contains one of these strings."""
    start = time.perf_counter()
    if configs is None:
        every = (ours_variants() + start_variants(), all_peers())
        configs = quick_configs(RESULTS / "peers.csv") if quick else (lambda data, nfe: every)
    samples = samples or SAMPLES["quick" if quick else "full"]
    rows, floors = [], []
    our_tables = OurTables(spec_name)
    batches = {}
    for label, means, stds, weights, batch in (other_datasets(samples[1:]) if other else datasets(samples)):
        if data is None or any(d in label for d in data):
            batches[label] = batch
            run_dataset(label, means, stds, weights, batch, spec_name, nfes, rows, log, configs, our_tables, floors)
    counts = {}
    for r in rows:
        counts.setdefault((r["data"], r["nfe_target"]), [set(), set()])[r["who"] != "gDDIM"].add((r["who"], r["config"]))
    result = {"rows": rows, "nfes": nfes, "seconds": time.perf_counter() - start, "quick": quick, "samples": samples,
              "suffix": "_other" if other else ("_quick" if quick else ""), "other": other, "batches": batches,
              "floors": floors,
              "n_ours": max(len(c[0]) for c in counts.values()), "n_peers": max(len(c[1]) for c in counts.values())}
    if out is not None:
        write(result, Path(out))
    return result


def _kept_rows(out, result):
    """Rows of the data sets not rerun, from the existing peers csv in ``out``: (rows, data labels)."""
    suffix = result["suffix"]
    rerun = set() if result.get("add_forms") else {r["data"] for r in result["rows"]}
    with open(out / f"peers{suffix}.csv", newline="") as f:          # --ours-only: the peers' rows of a rerun data set
        old = [r for r in csv.DictReader(f) if r["data"] not in rerun or (result.get("ours_only") and (
               r["who"] != "gDDIM" or int(r["nfe_target"]) not in result["nfes"]))]
    for r in old:
        r.update(nfe_target=int(r["nfe_target"]), nfe=int(r["nfe"]), endpoint_error=float(r["endpoint_error"]),
                 cfd=float(r["cfd"]), cfd_floor=float(r["cfd_floor"]))
    result["rows"] = old + result["rows"]
    order = [d[0] for d in datasets()]
    result["rows"].sort(key=lambda r: order.index(r["data"]) if r["data"] in order else len(order))
    return sorted({r["data"] for r in old} - (rerun if result.get("ours_only") else
                                              {r["data"] for r in result["rows"]} if result.get("add_forms") else set()),
                  key=lambda d: order.index(d) if d in order else len(order))


def write(result, out, command=None):
    import diffusers
    out.mkdir(parents=True, exist_ok=True)
    rows, nfes = result["rows"], result["nfes"]
    source = result.get("suffix", "_quick" if result["quick"] else "")      # the csv whose rows were kept
    suffix = result.get("out_suffix") or source
    with open(out / f"peers{suffix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n_r, n_i, n_m = result["samples"]
    counts = ", ".join(f"{d} {n}" for d, n in result["batches"].items()) if result.get("other") \
        else f"rings {n_r}, images {n_i}, 64-D mixture {n_m}"
    command = command or f"python -m validation.peers{' --quick' if result['quick'] else ''}"
    per = {}
    for r in rows:                                   # configurations per data set and NFE, counted in the rows written
        per.setdefault((r["data"], r["nfe_target"]), [set(), set()])[r["who"] != "gDDIM"].add((r["who"], r["config"]))
    result = dict(result, n_ours=max(len(c[0]) for c in per.values()), n_peers=max(len(c[1]) for c in per.values()))
    md = ["# gDDIM vs diffusers' schedulers on VP (exact-score data)", "",
          __doc__.split("\n\n", 2)[2].strip(), "",
          f"Run: `{command}` ({result['seconds']:.0f} s on this shared 2-core machine; diffusers {diffusers.__version__}; "
          f"samples: {counts}; up to {result['n_peers']} peer configurations and "
          f"{result['n_ours']} gDDIM configurations per data set and NFE (refused ones not counted); rows with more model calls than the NFE are "
          "excluded).", "",
          *([f"This command ran {result['add_forms']} "
             f"({result['n_new_rows']} rows, on {', '.join(sorted({r['data'] for r in rows} - set(result['kept'])) or ['the data'])}"
             f"; {result['seconds']:.0f} s); every other row is the previous "
             f"peers{source}.csv's, measured on the same noise and sample count (the runs are deterministic).", ""]
            if result.get("add_forms") else []),
          *([f"This command reran every gDDIM configuration ({result['n_new_rows']} rows: the four forms, the "
             f"data-prediction options [flat,correct,state] and the start grids {', '.join(START_GRIDS)}) on "
             f"{', '.join(d for d in dict.fromkeys(r['data'] for r in rows) if d not in result['kept'])} "
             f"({result['seconds']:.0f} s); the peers' rows there are the previous peers{source}.csv's (diffusers' runs "
             "are deterministic: same noise, same sample count)"
             + (f", and so is every row of {', '.join(result['kept'])}." if result["kept"] else "."), ""]
            if result.get("ours_only") else []),
          *([f"Only {', '.join(sorted({r['data'] for r in rows} - set(result['kept'])))} rerun by this command; the rows "
             f"of {', '.join(result['kept'])} are kept from the previous peers{source}.csv (their runs: git log of "
             "that file and of this .md).", ""]
            if result.get("kept") and not result.get("add_forms") and not result.get("ours_only") else []),
          "Best of many configurations on the same noise favours the side with more configurations.", "",
          *(["Quick run: at each data set and NFE only the configurations that were best there in the committed "
             "`peers.csv` (per sampler and metric) and the defaults, on fewer samples; the claims in "
             "tests/test_peers.py are checked on it.", ""] if result["quick"] else []),
          "## Ours (best configuration) vs the best peer configuration", "",
          "ours / peer < 1: gDDIM leads; > 1: gDDIM trails by that factor. gDDIM configs: form variable order grid.", "",
          summary(rows, nfes), "",
          *(["Without the start skip (gDDIM's grids from T only, every grid '<kind>@<rho_s>' left out):", "",
             summary(rows, nfes, start=False), ""] if any("@" in r["config"] for r in rows) else []),
          *(["The start skip's own cost (this command's data sets): the exact flow from the skipped state "
             "R_ts R_T^-1 x_T at t_s to t_min against the exact flow from x_T at T, endpoint error of the state at t_min "
             "(no sampler can do better from the skipped state):", "",
             "| data | rho_s | t_s | skip floor |", "|---|---|---|---|",
             *[f"| {f['data']} | {f['rho_s']:g} | {f['t_s']:.4f} | {f['endpoint_error']:.2e} |"
               for f in result.get("floors", [])], ""] if result.get("floors") else []),
          f"## Best variant of each sampler, and its diffusers default (gDDIM: {OUR_DEFAULT}), endpoint error", "",
          per_peer(rows, nfes, "endpoint_error"), "",
          "## The same, component Frechet distance", "",
          per_peer(rows, nfes, "cfd"), "",
          "## gDDIM's best per form (endpoint error; config: variable order grid)", "",
          by_form(rows, nfes), "",
          f"Every run: `peers{suffix}.csv` (column output: x0 = compared with E[x_0 | u_t_min], u_tmin = compared "
          "with the exact state at t_min)."]
    (out / f"peers{suffix}.md").write_text("\n".join(md) + "\n")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m validation.peers", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the decisive configurations of the committed full run "
                   "(best per peer and ours, defaults) on fewer samples: a few minutes -> peers_quick.*")
    p.add_argument("--samples", type=int, nargs=3, metavar=("RINGS", "IMAGES", "MIX64"),
                   help="samples per data set (default: %s full, %s quick)" % (SAMPLES["full"], SAMPLES["quick"]))
    p.add_argument("--out", help="output folder (default validation/results)")
    p.add_argument("--other", action="store_true", help="the mixtures outside the benchmark (other_datasets) "
                   "-> peers_other.*; --samples gives (unused, images-b, 32-D)")
    p.add_argument("--add-forms", action="store_true", help="with --data: run only the gDDIM forms with "
                   "X0_OPTIONS and keep every other row (peers, the four plain forms) of the existing peers.csv "
                   "(deterministic: same noise, same samples)")
    p.add_argument("--add-start", action="store_true", help="with --data: run only the gDDIM configurations on "
                   "grids that start below T (START_GRIDS) and keep every other row of the existing csv (with "
                   "--quick: of peers_quick.csv, written to peers_quick_start.*)")
    p.add_argument("--ours-only", action="store_true", help="rerun every gDDIM configuration (the four forms, "
                   "X0_OPTIONS, START_GRIDS) on the current code and keep the peers' rows of the existing csv (diffusers "
                   "is deterministic: same noise, same samples; give the csv's --samples); with --data, every row of "
                   "the other data sets is kept too")
    p.add_argument("--nfes", type=int, nargs="+", help=f"NFEs (default {' '.join(map(str, NFES))})")
    p.add_argument("--data", nargs="+", help="rerun only the data sets whose label contains one of these (e.g. "
                   "images); the other data sets' rows are kept from the existing peers.csv (said in peers.md)")
    args = p.parse_args(argv)
    samples = tuple(args.samples) if args.samples else ((0, 64, 300) if args.other else None)
    configs = None
    if args.add_forms:
        new = [v for v in ours_variants() if "[" in v[0]]
        configs = lambda data, nfe: (new, [])                                    # noqa: E731
    if args.add_start:
        new = start_variants()
        configs = lambda data, nfe: (new, [])                                    # noqa: E731
    if args.ours_only:
        if args.add_forms or args.add_start or args.other:
            p.error("--ours-only: not with --add-forms, --add-start or --other")
        new = ours_variants() + start_variants()
        configs = lambda data, nfe: (new, [])                                    # noqa: E731
    res = run_all(args.quick, None, samples=samples, data=args.data, other=args.other, configs=configs,
                  nfes=tuple(args.nfes) if args.nfes else NFES)
    res["add_forms"] = ("only the gDDIM configurations on grids that start below T (START_GRIDS)" if args.add_start
                        else "only the gDDIM configurations with the options [flat,correct,state]" if args.add_forms
                        else None)
    cmd = "python -m validation.peers" + (" --quick" if args.quick else "") + (" --other" if args.other else "") + \
          (" --samples " + " ".join(map(str, args.samples)) if args.samples else "") + \
          (" --data " + " ".join(args.data) if args.data else "") + (" --add-start" if args.add_start else "") + \
          (" --add-forms" if args.add_forms else "") + (" --ours-only" if args.ours_only else "") + (" --nfes " + " ".join(map(str, args.nfes)) if args.nfes else "")
    if args.add_start and args.quick:                 # the benchmark's quick rows + the start rows: a file of its own
        res["out_suffix"] = "_quick_start"
    res["ours_only"] = args.ours_only
    if args.data or args.ours_only:
        new_rows = len(res["rows"])
        res["kept"] = _kept_rows(Path(args.out) if args.out else RESULTS, res)
        res["n_new_rows"] = new_rows
    write(res, Path(args.out) if args.out else RESULTS, cmd)
    print(summary(res["rows"], res["nfes"]))
    print(f"({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
