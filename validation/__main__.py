"""python -m validation PATH: verify tables against independent high-precision references.

PATH is a table (.safetensors), a folder of tables (e.g. coeffs/cld), or a spec (YAML file or
built-in name: its default tables are built in memory and checked). The spec of a table is
read from spec.yaml beside it (written by python -m derive) unless --spec is given.

Prints, per table: quantity, worst step, max relative error, max error in float64 ulps, the
reference method and pass/fail. Exit status 0 all pass, 1 any failure, 2 bad input.
"""

import argparse
import sys
from pathlib import Path


def _parser():
    p = argparse.ArgumentParser(prog="python -m validation", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="table file, folder of tables, or spec")
    p.add_argument("--level", choices=["fast", "full"], default="full", help="check level (default: %(default)s)")
    p.add_argument("--spec", default=None, help="spec file for the tables (default: spec.yaml beside them)")
    p.add_argument("--coords", type=int, default=None,
                   help="coordinates checked for a basis spec (default: 2 fast, 6 full, spread over the spectrum)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    from derive._errors import SpecError
    from derive._spec import load_spec
    from gddim_runtime._format import TableError, read_table
    from ._check import check_table
    try:
        path = Path(args.path)
        jobs = []
        if path.is_dir() or path.suffix == ".safetensors":
            files = (sorted(f for f in path.glob("*.safetensors") if not f.name.endswith("_dense.safetensors"))
                     if path.is_dir() else [path])
            if not files:
                raise SpecError(path, "path", "no .safetensors tables here")
            spec_file = Path(args.spec) if args.spec else files[0].parent / "spec.yaml"
            spec = load_spec(spec_file)
            for f in files:
                tensors, meta = read_table(f)
                jobs.append((f.name, tensors, meta))
        else:
            from derive._cli import resolve_spec
            from derive._derivation import Derivation
            from derive._pipeline import build_table, table_configs, tool_versions
            spec = load_spec(resolve_spec(args.path))
            deriv = Derivation(spec)
            ns = argparse.Namespace(nfe=None, order=None, grid=None, lam=None, corrector=None, denoise=None)
            for cfg in table_configs(spec, ns):
                tensors, meta = build_table(deriv, cfg, spec.name, tool_versions(), verify="none")
                jobs.append((f"{spec.name} nfe{cfg['nfe']}", tensors, meta))
    except (SpecError, TableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = True
    for name, tensors, meta in jobs:
        report = check_table(spec, tensors, meta, level=args.level, n_coords=args.coords)
        print(f"## {name}\n{report.text()}\n", flush=True)
        ok &= report.passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
