"""Choose the sampler configuration with the user's own model (issue 12).

``--order auto`` (derive/_autogrid.recommend) chooses without the data: it simulates every candidate on
two-mode proxies whose score is exact. No data-blind rule can be within 1.2x of the best on every data
set: on three VP data sets (peers.csv) the best single configuration is 2.7-3.7x off somewhere at each
NFE (``python -m validation.bench_auto --across-data``). The model knows the data, so this module asks
it: each candidate runs with the model on a small batch of prior draws and is compared with the
model's own probability flow from the same draws (adaptive dopri5, then the same final denoising),
by the mean endpoint error (the default score), the per-coordinate W1 distance of the endpoints'
distribution ("w1"), the larger of those two ratios to their best ("both"), the energy distance of the
endpoints to the reference's in data space ("energy"), or the larger of the endpoint and energy ratios
("endpoint+energy"). The held-out measurement below kept "endpoint" the default.

Measured (``python -m validation.bench_auto --calibrated``, validation/results/auto_default.md; the
exact model, 128 draws of one noise seed and again 256 (``choose``'s default; the same counts), scored on 1000
draws of another, 64-128 for the images; rings, BDM 8x8, VP on the 64-D mixture and on 3 x 16 x 16 images):
the endpoint pick is within 1.2x in endpoint error of the
held-out best of ~120 configurations (the one best on another noise seed) at all 18 (process, NFE) points,
of the in-sample best at 16 (the data-blind recommendation before its model-error charge: 8 and 5; on the 64-D mixture it is 6.2x and
9.4x off at NFE 10 and 20, the pick 1.00x), but it does not look after the distribution: its component
Frechet distance is within 1.2x of the held-out best at 12 (in-sample 9 and 11). Per-coordinate W1 is no cure: on
the rings (rotation symmetric, the marginals hardly see the modes) it picked configurations 3-255x off in CFD.

What is measured is the discretisation error of each sampler on this model -- what the samplers differ
in -- not the model's error.

    import derive, gddim_runtime as gr
    from validation.calibrate import choose
    d = derive.derive("cld")
    best, evaluations = choose(d, model, nfe=10, batch=256, data_shape=(2,))
    table = d.table(nfe=10, **best["table"]).to_runtime()
    x = gr.sample(model, table, batch=10000, data_shape=(2,), sampler=best["sampler"])

From the shell (``main``; the model factory ``module:function`` as ``python -m gddim_runtime sample``):

    python -m validation.calibrate cld --model mypkg.nets:make_model --nfe 10 20 --data-shape 2 --out chosen/

Candidates: the auto:<q> and quadratic grids x orders 1-4 x variables t, rho, logsnr x the four samplers
(96). Cost: per NFE one table per (grid, order, variable) (each serves the four samplers), the dopri5 reference
(a few hundred model calls on the batch) and NFE calls per candidate on the batch.
"""

import math
import sys
from pathlib import Path

import torch

import gddim_runtime as gr
from derive._autogrid import SAMPLER, serving_table
from gddim_runtime import model_dtype_of

ORDERS = (1, 2, 3, 4)
VARIABLES = ("t", "rho", "logsnr")
SAMPLERS = {sampler: form_corrector for form_corrector, sampler in SAMPLER.items()}   # name -> (form, corrector)


def prior_draws(table, batch, data_shape, generator, dtype=torch.float64):
    """x_T = R_T z in data space, z ~ N(0, I) from ``generator`` (the runtime's own prior draw; R_T applied
    per frequency for a dct2d basis)."""
    R_T = table.tensors["R"][0]
    z = torch.randn((batch, table.k) + tuple(data_shape), generator=generator, dtype=torch.float64,
                    device=generator.device).to(R_T.device)
    basis = table.basis
    to_coef, from_coef = (gr.dct2, gr.idct2) if basis[0] == "dct2d" else ((lambda x: x),) * 2
    return from_coef(gr.block_apply(R_T, to_coef(z), basis)).to(dtype)


def reference(derived, model, x_T, parametrization="eps_R", tol=1e-8, dtype=torch.float64, model_dtype=None):
    """The model's probability flow from x_T to t_min (adaptive dopri5 at rtol = atol = tol on the dense
    coefficients) followed by the final denoising with the model at t_min, as every table ends. Runs on
    x_T's device; the model gets its inputs in ``model_dtype`` (default: ``model_dtype_of(model)``)."""
    device = x_T.device
    dense = derived.dense().to_runtime(device)
    one = derived.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime(device)
    return gr.sample(model, one, x_T=x_T, sampler="probability_flow_rk45", dense=dense, rtol=tol,
                     atol=tol, dtype=dtype, parametrization=parametrization,
                     model_dtype=model_dtype or model_dtype_of(model))


def _grid_name(grid, order):
    """The grid text of a candidate: "auto" is the auto grid designed for the candidate's order."""
    return f"auto:{order}" if grid == "auto" else grid


GRIDS = ("auto", "quadratic")


def candidates(orders=ORDERS, variables=VARIABLES, grids=GRIDS, samplers=tuple(SAMPLERS)):
    """(grid, order, variable, sampler) in tie-breaking order (simplest first); grid "auto" = auto:<order>.
    The quadratic grid beside auto: auto's measured grid is built on two-mode proxies that part at low
    noise, and on data whose modes part at high noise (the 64-D mixture) it is 5-20x behind the
    quadratic grid at NFE 10-20 (validation/results/auto_default.md); offering both lets the model decide."""
    return [(g, q, v, s) for g in grids for q in orders for v in variables for s in samplers]


def _checked_configs(configs):
    """The candidates as a list, each (a grid derive knows, order 1-4, variable, sampler) or a ValueError naming it:
    a wrong one was evaluated as inf and the call ended in 'no candidate gave a finite endpoint'."""
    configs = list(configs)
    if not configs:
        raise ValueError("configs is empty: give candidates (grid, order, variable, sampler), or None for all")
    from derive._errors import SpecError
    from derive._grids import parse_kind
    for c in configs:
        ok = (isinstance(c, (tuple, list)) and len(c) == 4 and isinstance(c[0], str) and c[1] in ORDERS
              and c[2] in VARIABLES and c[3] in SAMPLERS)
        if ok:
            try:
                parse_kind(_grid_name(c[0], c[1]))
            except SpecError:
                ok = False
        if not ok:
            raise ValueError(f"candidate {c!r} is not (a grid python -m derive knows, e.g. {GRIDS}, order in {ORDERS}, "
                             f"variable in {VARIABLES}, sampler in {tuple(SAMPLERS)})")
    return [tuple(c) for c in configs]


def evaluate(derived, model, nfe, x_T, *, parametrization="eps_R", configs=None, tol=1e-8, dtype=torch.float64,
             log=None, ref=None, model_dtype=None):
    """{(grid, order, variable, sampler): {"endpoint": e, "w1": w, "energy": g}} for every candidate on the
    draws x_T (data space): e the mean endpoint error |x - x_ref| / sqrt(dim), w the 1-D Wasserstein
    distance between the draws' endpoints and the reference's per coordinate (sorted), averaged over the
    coordinates, g their energy distance / sqrt(dim). inf where a sampler fails or a variable is
    undefined for the process.
    ref: ``reference(derived, model, x_T, ...)`` when already computed (it does not depend on the NFE).
    Runs on x_T's device; the model gets its inputs in ``model_dtype`` (default: ``model_dtype_of(model)``,
    so a float32 network gets float32 while the sampler's state stays in ``dtype``)."""
    configs = candidates() if configs is None else _checked_configs(configs)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2 (one step and the final denoising), got {nfe!r}")
    model_dtype = model_dtype or model_dtype_of(model)
    if ref is None:
        ref = reference(derived, model, x_T, parametrization, tol, dtype, model_dtype)
    ref = ref[:, 0].reshape(len(x_T), -1)
    ref_sorted = ref.sort(dim=0).values
    dim = ref.shape[1]
    tables, out = {}, {}
    for grid, q, variable, sampler in configs:
        gname = _grid_name(grid, q)
        if (gname, q, variable) not in tables:
            try:
                tables[(gname, q, variable)] = derived.table(nfe=nfe, **serving_table(q, gname, variable),
                                                             verify="none").to_runtime(x_T.device)
            except Exception as exc:                  # a variable undefined for the process (SpecError et al.)
                tables[(gname, q, variable)] = exc
        tab, key = tables[(gname, q, variable)], (grid, q, variable, sampler)
        if isinstance(tab, Exception):
            out[key] = {"endpoint": math.inf, "w1": math.inf, "energy": math.inf}
            continue
        u = gr.sample(model, tab, x_T=x_T, sampler=sampler, dtype=dtype, parametrization=parametrization,
                      model_dtype=model_dtype)
        u = u[:, 0].reshape(len(x_T), -1)
        e = float(((u - ref).norm(dim=1) / math.sqrt(dim)).mean())
        w = float((u.sort(dim=0).values - ref_sorted).abs().mean())
        out[key] = {m: v if math.isfinite(v) else math.inf
                    for m, v in (("endpoint", e), ("w1", w), ("energy", energy_distance(u, ref) / math.sqrt(dim)))}
        if log:
            log(f"  {gname} q{q} {variable} {sampler}: " + ", ".join(f"{m} {v:.3e}" for m, v in out[key].items()))
    return out


def energy_distance(x, y):
    """The energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets [n, d] (V-statistic over
    all pairs; Szekely and Rizzo): zero iff the distributions agree, and it sees the joint distribution
    (mode widths and mode weights), which per-coordinate W1 does not on rotation-symmetric data."""
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return math.inf
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


METRICS = {"endpoint": ("endpoint",), "w1": ("w1",), "both": ("endpoint", "w1"), "energy": ("energy",),
           "endpoint+energy": ("endpoint", "energy")}      # score -> the metrics of evaluate it combines
SCORES = tuple(METRICS)


def ranking(evaluations, score="endpoint"):
    """The keys of ``evaluate``'s dict, best first under ``score`` (ties: the earlier candidate). A score of
    one metric ranks by that metric; one of two ("both", "endpoint+energy") by the larger of the candidate's
    two ratios to the per-metric best (the configuration closest to the best on both at once)."""
    if score not in METRICS:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if not any(math.isfinite(v["endpoint"]) for v in evaluations.values()):
        raise ValueError("no candidate configuration gave a finite endpoint")
    metrics = METRICS[score]
    best = {m: min(v[m] for v in evaluations.values()) for m in metrics}
    ratio = lambda v, b: v / b if b > 0 else (1.0 if v == 0 else math.inf)
    value = ((lambda v: v[metrics[0]]) if len(metrics) == 1 else
             (lambda v: max(ratio(v[m], best[m]) for m in metrics)))
    order = sorted(enumerate(evaluations), key=lambda ik: (value(evaluations[ik[1]]), ik[0]))
    return [key for _, key in order]


def pick(evaluations, score="endpoint"):
    """The key of ``evaluate``'s dict with the smallest score: ``ranking``'s first."""
    return ranking(evaluations, score)[0]


def choose(derived, model, nfe, x_T=None, *, batch=256, data_shape=None, generator=None, score="endpoint",
           parametrization="eps_R", configs=None, tol=1e-8, dtype=torch.float64, log=None, device=None,
           model_dtype=None):
    """(best, evaluations): the configuration ``pick`` takes under ``score`` from ``evaluate``'s
    evaluations on the draws x_T (default: ``batch`` draws R_T z of shape data_shape from ``generator``,
    default a CPU generator seeded 0, so the draws are the same on every device).
    device: where the samplers and the model run (default: x_T's device, else the CPU); the model must
    live there. model_dtype: the dtype of the model's inputs (default: its parameters' dtype, see
    ``model_dtype_of``; the samplers' state stays in ``dtype``).
    best: {"grid", "order", "variable", "sampler", "endpoint", "w1", "energy", "table": the keyword arguments of
    ``derived.table`` that build its table}."""
    if x_T is None:
        if data_shape is None:
            raise ValueError("give x_T, or batch and data_shape")
        first = derived.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime(device or "cpu")
        x_T = prior_draws(first, batch, data_shape, generator or torch.Generator().manual_seed(0), dtype)
    elif device is not None:
        x_T = x_T.to(device)
    model_dtype = model_dtype or model_dtype_of(model)
    ref = reference(derived, model, x_T, parametrization, tol, dtype, model_dtype)
    evaluations = evaluate(derived, model, nfe, x_T, parametrization=parametrization, configs=configs, tol=tol,
                           dtype=dtype, log=log, ref=ref, model_dtype=model_dtype)
    grid, q, variable, sampler = key = pick(evaluations, score)
    gname = _grid_name(grid, q)
    data = ref[:, 0].reshape(len(x_T), -1)
    best = {"grid": gname, "order": q, "variable": variable, "sampler": sampler, **evaluations[key],
            "table": serving_table(q, gname, variable), "spread": float((data - data.mean(0)).square().mean().sqrt())}
    return best, evaluations


FOLLOWS = 0.1          # an endpoint error above this fraction of the samples' spread: no candidate follows the model


def not_followed(best):
    """A warning (text) when even the best candidate ends far from the model's own flow, measured against the
    spread of that flow's samples; None otherwise. A network whose error the reverse map amplifies (a 3-state
    chain: psi products of norm 4e5) gave finite samples 1e2-2e4 off at NFE 10-20 with every table, and
    calibrate wrote its pick without a word."""
    if not best["endpoint"] > FOLLOWS * best["spread"]:
        return None
    return (f"warning: the best candidate ends {best['endpoint']:.3g} from the model's own flow, "
            f"{best['endpoint'] / best['spread']:.2g} of the spread of that flow's samples ({best['spread']:.3g}): "
            "no table at this NFE follows this model; raise the NFE, or check the network (its error may be "
            "amplified by the process: train another parametrisation or with gr.gaussian_eps)")


# ----- python -m validation.calibrate -----------------------------------------------------------------

def _factory(text):
    """The model factory ``module:function`` (called with no arguments), as ``python -m gddim_runtime``."""
    import importlib

    from derive._errors import SpecError
    module, _, name = text.partition(":")
    if not module or not name:
        raise SpecError("--model", text, "expected module:function")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SpecError("--model", text, f"cannot load: {exc}") from None


class _UserCodeRaised(Exception):
    """An exception from the user's factory or model (its cause), told apart from calibrate's own."""


class _Guarded:
    """The user's model with its exceptions marked as the model's; everything else is the model's own."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args):
        try:
            return self.model(*args)
        except Exception as exc:
            raise _UserCodeRaised("the model") from exc


def _users_code(text, call):
    """``call()``; an exception from the user's code becomes one SpecError line naming --model, after
    its traceback (the user's code, so the user's to read; not an 'internal error in calibrate')."""
    import traceback

    from derive._errors import SpecError
    try:
        return call()
    except _UserCodeRaised as exc:
        cause = exc.__cause__
        traceback.print_exception(cause, file=sys.stderr)
        first = str(cause).splitlines()[0] if str(cause) else ""
        raise SpecError("--model", text, f"{exc} raised {type(cause).__name__}: {first} (traceback above)") from None


def report(nfe, best, evaluations, score, top=5):
    """Markdown: the ``top`` candidates by ``score`` (``ranking``'s order, the pick first) with every metric."""
    lines = [f"NFE {nfe}: {best['sampler']} on {best['grid']}, order {best['order']}, variable {best['variable']}",
             "", "| grid | order | variable | sampler | endpoint | w1 | energy |", "|---|---|---|---|---|---|---|"]
    for key in ranking(evaluations, score)[:top]:
        v = evaluations[key]
        lines.append(f"| {_grid_name(key[0], key[1])} | {key[1]} | {key[2]} | {key[3]} | {v['endpoint']:.3e} | "
                     f"{v['w1']:.3e} | {v['energy']:.3e} |")
    return "\n".join(lines)


def _run(args):
    import derive
    from derive._errors import SpecError
    if any(n < 2 for n in args.nfe) or args.batch < 2:
        raise SpecError("options", "--nfe/--batch", "each NFE and the batch must be at least 2")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise SpecError("--out", args.out, "exists and is not a folder")
    if args.device:
        from gddim_runtime._table import usable_device
        try:
            usable_device(args.device)
        except gr.TableError as exc:
            raise SpecError("--device", args.device, str(exc).split(": ", 1)[1]) from None
    factory = _factory(args.model)

    def build():
        try:
            return factory()
        except Exception as exc:
            raise _UserCodeRaised("the factory") from exc
    model = _users_code(args.model, build)
    if not callable(model):
        raise SpecError("--model", args.model, f"the factory returned {type(model).__name__}, not a callable model(u, t)")
    if args.device and callable(getattr(model, "to", None)):
        model = model.to(args.device)                       # a torch.nn.Module: onto the samplers' device
    model = _Guarded(model)
    shape = args.data_shape or getattr(model, "data_shape", None)
    if shape is None or any(s < 1 for s in shape):
        raise SpecError("options", "--data-shape", "required (the model has no .data_shape), positive sizes")
    d = derive.derive(args.spec)
    for nfe in args.nfe:
        try:
            best, ev = _users_code(args.model, lambda: choose(
                d, model, nfe, batch=args.batch, data_shape=tuple(shape), score=args.score,
                generator=torch.Generator().manual_seed(args.seed), device=args.device,
                parametrization=args.parametrization))
        except gr.SamplingError as exc:
            raise SpecError("--model", args.model, str(exc)) from None
        print(report(nfe, best, ev, args.score) + "\n", flush=True)
        if not_followed(best):
            print(not_followed(best) + "\n", flush=True)
        if args.out:                        # the table of the picked form and corrector: its default sampler
            form, corrector = SAMPLERS[best["sampler"]]
            table = d.table(nfe=nfe, **{**best["table"], "form": form, "corrector": corrector})
            try:
                path = table.save(args.out)
            except OSError as exc:
                raise SpecError(args.out, "--out", f"cannot write: {exc.strerror or exc}") from None
            print(f"wrote {path} (its default sampler: {best['sampler']})\n", flush=True)
    return 0


def main(argv=None):
    import argparse

    from derive._errors import run_cli
    p = argparse.ArgumentParser(prog="python -m validation.calibrate",
                                description="Choose the sampler configuration per NFE with your own model.")
    p.add_argument("spec", help="built-in spec name or spec file")
    p.add_argument("--model", required=True, help="factory module:function returning model(u, t)")
    p.add_argument("--nfe", type=int, nargs="+", required=True, help="model evaluations per sample")
    p.add_argument("--data-shape", type=int, nargs="+", help="shape of one state component (default: model.data_shape)")
    p.add_argument("--batch", type=int, default=256, help="prior draws the candidates run on (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    p.add_argument("--score", default="endpoint", choices=SCORES, help="(default: %(default)s)")
    p.add_argument("--parametrization", default="eps_R", choices=gr.PARAMETRIZATIONS,
                   help="the model's output (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device of the model and the samplers (default: cpu)")
    p.add_argument("--out", help="write each chosen table (verified, as python -m derive) into this folder")
    args = p.parse_args(argv)
    return run_cli(lambda _: _run(args), None, "calibrate")


if __name__ == "__main__":
    raise SystemExit(main())
