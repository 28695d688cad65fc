"""python -m derive: derive closed forms and sampler tables for a linear diffusion SDE.

Examples:
  python -m derive                          # the default spec (cld), its default tables
  python -m derive sdes/vp_linear.yaml      # a spec file (or a built-in name: vp_linear)
  python -m derive cld --nfe 10 20 50 --order 3 --grid quadratic     # the paper's tables
  python -m derive cld --nfe 50 --lam 0.5 --corrector
  python -m derive cld --nfe 10 20 --variable logsnr --form x0
  python -m derive inspect coeffs/cld/cld_nfe50_quadratic_q3.safetensors --plot cld.png

Exit status: 0 ok, 1 a verification failed, 2 bad input (one line on stderr naming file, key
and problem), 3 internal error (one line naming the stage; GDDIM_DEBUG=1 prints the traceback).
"""

import argparse
import sys
import warnings
from pathlib import Path

from . import _hp
from ._api import Derived, spec_name_for
from ._errors import SpecError, run_cli
from ._pipeline import TableOptions, resolve_spec

DEFAULT_SPEC = "cld"


def _order(text):
    """--order: an integer or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs 1-4 or auto, got {text!r}") from None


def _parser():
    p = argparse.ArgumentParser(prog="python -m derive", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                   help="spec YAML file or built-in name (default: %(default)s)")
    p.add_argument("--out", default="coeffs", help="output root: files go to OUT/<spec name>/ (default: %(default)s)")
    p.add_argument("--nfe", type=int, nargs="+", default=None,
                   help="write exactly these tables, one per NFE (default: the spec's tables.nfe)")
    p.add_argument("--order", type=_order, default=None,
                   help="multistep order q, 1-4, or auto: per NFE the order, auto:<q> grid, variable, form and "
                        "corrector derive/_autogrid.recommend picks; options given explicitly still win (default: the "
                        "spec's tables.order, else auto)")
    p.add_argument("--grid", default=None,
                   help="uniform | quadratic | power:<kappa> | logsnr | edm[:<rho>] | auto[:<q>] | <file of times> "
                        "(default: spec, else the recommendation's with order auto, quadratic with an integer order); "
                        "<kind>@<rho_s>: that grid started at t_s where the noise-to-signal ratio is rho_s (the start "
                        "skip: no model call above t_s)")
    p.add_argument("--lam", type=str, nargs="+", default=None,
                   help="also write stochastic gDDIM weights for these lam > 0 (default: spec, else none)")
    p.add_argument("--corrector", action="store_true", default=None,
                   help="also write Adams-Moulton corrector weights (default: spec, else off)")
    p.add_argument("--no-denoise", dest="denoise", action="store_false", default=None,
                   help="no final denoising evaluation: steps = NFE (default: steps = NFE - 1)")
    p.add_argument("--variable", choices=["t", "rho", "logsnr"], default=None,
                   help="variable of the multistep polynomial: t (the paper, default), rho (noise-to-signal "
                        "ratio, DEIS) or logsnr (-log rho); file name suffix _in<variable>")
    p.add_argument("--form", choices=["eps", "x0"], default=None,
                   help="x0: also the data-prediction tensors x0_psi, x0_weights_ms (DPM-Solver++ for VP "
                        "with --variable logsnr); file name suffix _x0 (default: eps)")
    p.add_argument("--model-error", type=float, default=None,
                   help="with --order auto: the rms error of the model's eps output per call that the recommendation "
                        "charges for (default 1e-3, measured on trained networks; 0 for an exact score)")
    p.add_argument("--no-tables", action="store_true", help="closed forms only, no sampler tables")
    p.add_argument("--dense", action="store_true",
                   help="also write <name>_dense.safetensors (interpolants of F, G G^T, R, L, D for the "
                        "adaptive RK45 baseline; default: only when there is no per-coordinate basis)")
    p.add_argument("--verify", choices=["fast", "full"], default="fast",
                   help="check before writing: fast identities + float64 scipy cross-check, or the "
                        "full 45-digit validation (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip the check (recorded in the files)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes (default: one per core; 1: no fork); the files do not depend on it")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def _inspect_parser():
    p = argparse.ArgumentParser(prog="python -m derive inspect", description="Print what a table file holds.")
    p.add_argument("file", help="a .safetensors table written by python -m derive")
    p.add_argument("--plot", default=None, help="also draw Psi, Sigma, R, L and the weights to this PNG")
    p.add_argument("--coord", type=int, default=0, help="coordinate p to show (default: %(default)s)")
    return p


def _options(args):
    """The table options as data (None: the spec's default), the only thing the core sees of argparse."""
    return TableOptions(nfe=None if args.nfe is None else tuple(args.nfe), order=args.order, grid=args.grid,
                        lam=None if args.lam is None else tuple(args.lam), corrector=args.corrector,
                        denoise=args.denoise, variable=args.variable, form=args.form,
                        model_error=args.model_error)


def _warn_if_unstable(tab):
    """A warning (stderr, also with --quiet) when the table's own sampler blows up on Gaussian data with the
    exact score (gr.gaussian_probe, run by Derived.tables, above PROBE_LIMIT): the numbers are right, the
    multistep is unstable."""
    from gddim_runtime._probe import PROBE_LIMIT
    from gddim_runtime._samplers import default_sampler
    if tab.probe is not None and not tab.probe < PROBE_LIMIT:
        print(f"warning: {tab.name}: its sampler ({default_sampler(tab.to_runtime())}) is unstable on this process: "
              f"with the exact score of Gaussian data its samples or its state before the final denoising come out "
              f"{tab.probe:.3g} times their exact size (gr.gaussian_probe; 0.6-1.6 on the committed tables); the "
              "coefficients are right, the multistep is not (a stiff drift, too few steps): use --order auto, a "
              "lower --order or more steps", file=sys.stderr, flush=True)


DATA_LEFT_NOTE = 0.05         # ve.yaml's 1 / sigma_max = 2e-2 is the largest among the built-ins


def derive_main(args):
    """python -m derive SPEC: derive, build and check the tables, write OUT/<name>/."""
    if args.jobs is not None and args.jobs < 1:
        raise SpecError("--jobs", "jobs", f"must be >= 1, got {args.jobs}")
    if not args.out or (Path(args.out).exists() and not Path(args.out).is_dir()):
        raise SpecError("--out", "out", f"{args.out!r}: " + ("empty" if not args.out else "exists and is not a folder"))
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    path = resolve_spec(args.spec)
    d = Derived(path, spec_arg=spec_name_for(path, args.spec))
    options = _options(args)                                 # checked even with --no-tables
    requests = [] if args.no_tables else d.requests(options)
    kinds = d.kinds
    say(f"{d.spec.name}: Psi {kinds['psi']}, Sigma {kinds['sigma']}, R {kinds['R']}")
    if d.data_left_at_T > DATA_LEFT_NOTE:
        say(f"  note: the data is still visible at T = {d.spec.T}: one unit of data shifts u_T by "
            f"{d.data_left_at_T:.3g} of its standard deviations (|L_T^-1 D_T e_0|), but sampling starts from "
            "N(0, Sigma_T), so samples come out biased by about that much per unit of data; raise time.T or "
            "strengthen the drift / noise (Derived.data_left_at_T)")
    from gddim_runtime._probe import UnstableSamplerWarning
    with warnings.catch_warnings():                         # printed per table below, one line each
        warnings.simplefilter("ignore", UnstableSamplerWarning)
        tables = d.tables(requests, verify="none" if args.no_verify else args.verify, jobs=args.jobs)
    T = float(_hp.mpf(d.spec.T))
    for tab in tables:
        r, v = tab.request, tab.meta["verification"]
        say(f"  {tab.name}: {tab.meta['steps']} steps, order {r.order}" + (f", lam {r.lam}" if r.lam is not None else "")
            + f", verification {v.get('worst', v['level'])}")
        _warn_if_unstable(tab)
        if "@" in r.grid and float(tab.tensors["t"][0]) == T:
            say(f"    note: --grid {r.grid}: the noise-to-signal ratio at T is at or below {r.grid.split('@')[1]}, "
                "so this grid starts at T (nothing is skipped)")
    dense = d.dense() if d.spec.basis.n_coords == 1 or args.dense else None
    if dense is not None:
        say(f"  {d.spec.name}_dense: {dense.meta['panels']} Chebyshev panels for off-grid baselines")
    written = d.write(args.out, tables, dense)
    say(f"wrote {len(written)} files to {written[-1].parent}/ (listed in {written[-1].name})")
    return 0


def _main(argv):
    if argv and argv[0] == "inspect":
        from ._inspect import inspect_main
        args = _inspect_parser().parse_args(argv[1:])
        return inspect_main(args.file, args.plot, args.coord)
    return derive_main(_parser().parse_args(argv))


def main(argv=None):
    """Entry point of python -m derive; returns the exit status (README 'python -m derive')."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_cli(_main, argv, "derive")
