"""Benchmark: wall time of `python -m derive <builtin>` for every built-in spec.

    python -m validation.bench_derive [--out DIR]

Each run is a fresh process (imports included), default tables and fast verification, as a
user runs it. Prints a Markdown table.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--specs", nargs="*", default=None, help="built-in names (default: all)")
    args = p.parse_args(argv)
    names = args.specs or sorted(x.stem for x in (ROOT / "derive" / "sdes").glob("*.yaml"))
    print(f"| spec | wall time (s) | files |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "derive", name, "--out", tmp, "--quiet"],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            wall = time.perf_counter() - start
            n = len(list((Path(tmp) / name).glob("*"))) if proc.returncode == 0 else f"failed: {proc.stderr.strip()}"
            print(f"| {name} | {wall:.1f} | {n} |", flush=True)


if __name__ == "__main__":
    main()
