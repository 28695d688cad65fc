"""Benchmark: wall time of derive, as a user runs it.

    python -m validation.bench_derive [--specs NAME ...] [--out DIR]
    python -m validation.bench_derive --sweep [--spec NAME] [--nfe N]

Default: `python -m derive <builtin>` for every built-in spec, a fresh process each (imports
included), default tables (order auto) and fast verification, and the same with the paper's tables
(`--order 3 --grid quadratic`); files go to DIR/{auto,paper}/<name>/ (default: a temporary folder,
removed). Prints a Markdown table.

--sweep: the same 16 tables (orders 1-4 x grids uniform, quadratic, logsnr, edm; one NFE),
each checked (fast) and saved, (a) through the Python API (one ``derive.derive``, then
``table(...).save``) and (b) as 16 ``python -m derive`` subprocesses; checks that both wrote
identical tables and prints both wall times and their ratio.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import derive

ROOT = Path(__file__).resolve().parents[1]
ORDERS = (1, 2, 3, 4)
GRIDS = ("uniform", "quadratic", "logsnr", "edm")


def _derive_cli(*args):
    return subprocess.run([sys.executable, "-m", "derive", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


PAPER = ("--order", "3", "--grid", "quadratic")       # the paper's tables, the default before order auto


def per_spec(names, out):
    """Per built-in: the default run (order auto: the recommendation + its tables) and the paper's
    quadratic q3 tables, each a fresh ``python -m derive`` into its own folder."""
    print("| spec | default run, order auto (s) | paper tables, --order 3 --grid quadratic (s) | files |\n"
          "|---|---|---|---|")
    for name in names:
        walls, n = [], None
        for label, extra in (("auto", ()), ("paper", PAPER)):
            start = time.perf_counter()
            proc = _derive_cli(name, "--out", Path(out) / label, "--quiet", *extra)
            walls.append(time.perf_counter() - start)
            if proc.returncode != 0:
                n = f"failed ({label}): {proc.stderr.strip()}"
            elif n is None:
                n = len(list((Path(out) / label / name).glob("*")))
        print(f"| {name} | {walls[0]:.1f} | {walls[1]:.1f} | {n} |", flush=True)


def sweep(spec, nfe, out):
    """Wall times (API, subprocesses) of the 16-table sweep; raises if the two disagree on a byte."""
    out = Path(out)
    start = time.perf_counter()
    d = derive.derive(spec)
    api_files = [d.table(nfe=nfe, order=q, grid=g).save(out / "api") for q in ORDERS for g in GRIDS]
    t_api = time.perf_counter() - start
    start = time.perf_counter()
    for q in ORDERS:
        for g in GRIDS:
            proc = _derive_cli(spec, "--nfe", nfe, "--order", q, "--grid", g, "--out", out / "cli", "--quiet")
            if proc.returncode != 0:
                raise RuntimeError(f"python -m derive failed: {proc.stderr.strip()}")
    t_cli = time.perf_counter() - start
    for path in api_files:
        if path.read_bytes() != (out / "cli" / d.spec.name / path.name).read_bytes():
            raise RuntimeError(f"{path.name}: the API and python -m derive wrote different bytes")
    return t_api, t_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--specs", nargs="*", default=None, help="built-in names (default: all)")
    p.add_argument("--out", default=None, help="keep the written files in OUT (default: a temporary folder)")
    p.add_argument("--sweep", action="store_true", help="API vs subprocesses on a 4 orders x 4 grids sweep")
    p.add_argument("--spec", default="vp_linear", help="spec of the sweep (default: %(default)s)")
    p.add_argument("--nfe", type=int, default=20, help="NFE of the sweep's tables (default: %(default)s)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        if args.sweep:
            t_api, t_cli = sweep(args.spec, args.nfe, out)
            n = len(ORDERS) * len(GRIDS)
            print(f"| {args.spec}, NFE {args.nfe}, {n} tables (orders 1-4 x {', '.join(GRIDS)}) | wall time (s) |\n"
                  f"|---|---|\n| Python API (one derivation, table().save() each) | {t_api:.1f} |\n"
                  f"| {n} python -m derive subprocesses | {t_cli:.1f} |\n"
                  f"ratio {t_cli / t_api:.1f}x (identical table bytes)")
        else:
            per_spec(args.specs or derive._pipeline.builtin_names(), out)


if __name__ == "__main__":
    main()
