"""python -m derive: derive closed forms and sampler tables for a linear diffusion SDE.

Examples:
  python -m derive                          # the default spec (cld), its default tables
  python -m derive sdes/vp_linear.yaml      # a spec file (or a built-in name: vp_linear)
  python -m derive cld --nfe 10 20 50 --order 3 --grid quadratic
  python -m derive cld --nfe 50 --lam 0.5 --corrector
  python -m derive inspect coeffs/cld/cld_nfe50_quadratic_q3.safetensors --plot cld.png

Exit status: 0 success, 2 bad input (one line on stderr naming file, key and problem),
1 a failed verification.
"""

import argparse
import sys
from pathlib import Path

from ._errors import SpecError

DEFAULT_SPEC = "cld"


def builtin_dir():
    return Path(__file__).resolve().parent / "sdes"


def builtin_names():
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


def resolve_spec(arg):
    path = Path(arg)
    if path.is_file():
        return path
    if path.suffix == "" and (builtin_dir() / f"{arg}.yaml").is_file():
        return builtin_dir() / f"{arg}.yaml"
    raise SpecError(arg, "spec", f"no such file or built-in spec (built-ins: {', '.join(builtin_names())})")


def _parser():
    p = argparse.ArgumentParser(prog="python -m derive", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                   help="spec YAML file or built-in name (default: %(default)s)")
    p.add_argument("--out", default="coeffs", help="folder for coeffs/<name>/ (default: %(default)s)")
    p.add_argument("--nfe", type=int, nargs="+", default=None,
                   help="write exactly these tables, one per NFE (default: the spec's tables.nfe)")
    p.add_argument("--order", type=int, default=None, help="multistep order q, 1-4 (default: spec, else 3)")
    p.add_argument("--grid", default=None,
                   help="uniform | quadratic | power:<kappa> | logsnr | edm[:<rho>] | <file of times> "
                        "(default: spec, else quadratic)")
    p.add_argument("--lam", type=str, nargs="+", default=None,
                   help="also write stochastic gDDIM weights for these lam > 0 (default: spec, else none)")
    p.add_argument("--corrector", action="store_true", default=None,
                   help="also write Adams-Moulton corrector weights (default: spec, else off)")
    p.add_argument("--no-denoise", dest="denoise", action="store_false", default=None,
                   help="no final denoising evaluation: steps = NFE (default: steps = NFE - 1)")
    p.add_argument("--no-tables", action="store_true", help="closed forms only, no sampler tables")
    p.add_argument("--dense", action="store_true",
                   help="also write <name>_dense.safetensors (interpolants of F, G G^T, R, L, D for the "
                        "adaptive RK45 baseline; default: only when there is no per-coordinate basis)")
    p.add_argument("--verify", choices=["fast", "full"], default="fast",
                   help="check before writing: fast identities + float64 scipy cross-check, or the "
                        "full 40-digit validation (default: %(default)s)")
    p.add_argument("--no-verify", action="store_true", help="skip the check (recorded in the files)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def _inspect_parser():
    p = argparse.ArgumentParser(prog="python -m derive inspect", description="Print what a table file holds.")
    p.add_argument("file", help="a .safetensors table written by python -m derive")
    p.add_argument("--plot", default=None, help="also draw Psi, Sigma, R, L and the weights to this PNG")
    p.add_argument("--coord", type=int, default=0, help="coordinate p to show (default: %(default)s)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "inspect":
            from ._inspect import inspect_main
            args = _inspect_parser().parse_args(argv[1:])
            return inspect_main(args)
        args = _parser().parse_args(argv)
        from ._pipeline import run
        return run(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already written are complete, others untouched", file=sys.stderr)
        return 130
