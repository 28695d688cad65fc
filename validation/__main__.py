"""python -m validation PATH: verify tables against independent high-precision references.

PATH is a table (.safetensors), a folder of tables (e.g. coeffs/cld), or a spec (YAML file or
built-in name: its default tables are built in memory through derive's Python API and checked).
The spec of a table is read from spec.yaml beside it (written by python -m derive) unless
--spec is given.

Prints, per table: quantity, worst step, max relative error, max error in float64 ulps, the
reference method and pass/fail. Exit status 0 all pass, 1 any failure, 2 bad input, 3 internal
error (one line naming the stage; GDDIM_DEBUG=1 prints the traceback).
"""

import argparse
import sys
from pathlib import Path

from derive import derive
from derive._errors import SpecError, run_cli, stage
from derive._inspect import check_described
from derive._pipeline import resolve_spec
from derive._spec import load_spec
from gddim_runtime._format import DENSE_FORMAT, TableError, read_table
from gddim_runtime._table import from_tensors

from ._check import check_table
from ._check_dense import check_dense


def _parser():
    p = argparse.ArgumentParser(prog="python -m validation", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="table file, folder of tables, or spec")
    p.add_argument("--level", choices=["fast", "full"], default="full", help="check level (default: %(default)s)")
    p.add_argument("--spec", default=None, help="spec file or built-in name for the tables (default: spec.yaml beside them)")
    p.add_argument("--coords", type=int, default=None,
                   help="coordinates checked for a basis spec (default: 2 fast, 6 full, spread over the spectrum)")
    return p


def _read_tables(path, spec_arg):
    """(spec, [(name, tensors, meta)]) of a table file or a folder of tables."""
    files = (sorted(f for f in path.glob("*.safetensors") if not f.name.endswith("_dense.safetensors"))
             if path.is_dir() else [path])
    if not files:
        raise SpecError(path, "path", "no .safetensors tables here")
    beside = files[0].parent / "spec.yaml"
    if not spec_arg and not beside.is_file():
        raise SpecError(str(beside), "file", "no spec.yaml beside the table (python -m derive writes one); "
                        "give the spec with --spec SPEC.yaml")
    spec = load_spec(resolve_spec(spec_arg) if spec_arg else beside)
    jobs = []
    for f in files:
        try:
            tensors, meta = read_table(f)
            from_tensors(tensors, meta, path=f)     # the runtime's checks: shapes, finite values, meta it reads
            check_described(meta, f)                # and the meta entries the report reads
        except TableError as exc:
            raise SpecError(f, "table", str(exc).split(": ", 1)[-1]) from None
        jobs.append((f.name, tensors, meta, _manifest_problem(f)))
    return spec, jobs


def _manifest_problem(file):
    """None, or what is wrong with ``file`` against the manifest.json python -m derive wrote beside it: not
    listed (renamed or added by hand) or other bytes than recorded (edited or replaced)."""
    import hashlib
    import json
    manifest = file.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        entries = {e["file"]: e for e in json.loads(manifest.read_text())["files"]}
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is not a manifest python -m derive wrote"
    if file.name not in entries:
        return f"not listed in {manifest.name} (renamed or added by hand: the file name no longer tells what it holds)"
    if hashlib.sha256(file.read_bytes()).hexdigest() != entries[file.name].get("sha256"):
        return f"its bytes differ from the sha256 {manifest.name} records (edited or replaced after python -m derive)"
    return None


def _build_tables(spec_arg):
    """(spec, [(name, tensors, meta)]) of a spec's default tables, built in memory (unchecked)."""
    d = derive(spec_arg)
    return d.spec, [(tab.name, tab.tensors, tab.meta, None) for tab in d.tables(verify="none")]


def _main(argv):
    args = _parser().parse_args(argv)
    path = Path(args.path)
    if path.is_dir() or path.suffix == ".safetensors":
        with stage("reading tables"):
            spec, jobs = _read_tables(path, args.spec)
    else:
        spec, jobs = _build_tables(args.path)
    ok = True
    for name, tensors, meta, problem in jobs:
        with stage(f"checking {name}"):
            report = check_table(spec, tensors, meta, level=args.level, n_coords=args.coords)
            if problem:
                report.add("manifest", [(0, float("inf"), float("inf"))], problem, 0.0)
        print(f"## {name}\n{report.text()}\n", flush=True)
        ok &= report.passed
    for dense_path in _dense_files(path):
        with stage(f"checking {dense_path.name}"):
            try:
                tensors, meta = read_table(dense_path, kind=DENSE_FORMAT)
            except TableError as exc:
                raise SpecError(dense_path, "dense", str(exc).split(": ", 1)[-1]) from None
            report = check_dense(spec, tensors, meta, level=args.level, n_coords=args.coords)
            problem = _manifest_problem(dense_path)
            if problem:
                report.add("manifest", [(0, float("inf"), float("inf"))], problem, 0.0)
        print(f"## {dense_path.stem}\n{report.text()}\n", flush=True)
        ok &= report.passed
    return 0 if ok else 1


def _dense_files(path):
    """The dense file of a folder of tables (none for a single table file or a spec name)."""
    return sorted(path.glob("*_dense.safetensors")) if path.is_dir() else []


def main(argv=None):
    return run_cli(_main, sys.argv[1:] if argv is None else list(argv), "validation")


if __name__ == "__main__":
    sys.exit(main())
