"""Any linear SDE: generated specs across the whole spec language (tests/spec_strategies.py).

Property: ``python -m derive SPEC`` on a generated spec exits 0 with tables that passed the
fast check (a valid process by construction), or exits 2 with exactly one line naming file
and key (a spec with a defect put in on purpose). Never a traceback, never an internal error
(exit 3), never a failed verification (exit 1), never a hang (each example runs in a forked
child that is killed after ``PER_EXAMPLE_S``).

The default run draws a representative handful of examples; ``-m slow`` draws >= 2000
(``GDDIM_ANYSDE_EXAMPLES`` overrides both). For a survey that records every failure class
instead of stopping at the first: ``python tests/test_any_sde.py --survey 200``.

Measured on the shared 2-core box (loaded by other jobs), 2026-11-27: before this session's
fixes (tree bc7c8dd) 60 specs in 1837 s: 34 pass, 13 past the 60 s limit (matrix, mostly a
zero-noise coordinate: hang), 5 traceback KeyError: sign, 5 + 2 valid specs refused with nan,
1 refused "not resolvable near t = 0". After (shared tree 11:30): 181 specs in 2924 s (seed 7,
120 s limit): 177 pass (53 defects all refused with one line), 3 exit 3 in codegen (Ci not
printable; fixed since in derive/_codegen.py, the spec now exits 0), 1 slow k = 4 (88 s alone).
Every spec that failed before, rerun on the shared tree at 11:30, exits 0.

Census of 2026-11-27 (the same generator and classification, ``--survey``): 2136 specs in three runs
-- 1156 on an H200 machine's CPUs (12 workers, session-start code, median 4.4 s), 454 here on the same
code, 526 here after the fixes (nice 19, load 8). 2125 as required (1648 valid specs derived and
fast-checked, 477 defects refused with one line); 7 failures on the machine in two classes, both fixed
(c1e1e61, 468ecae) and kept as tests/census_specs: a kink hidden in ((c - t)^4)^(1/4) (6) and a closed
form cancelling beyond 800 bits (1); 4 more ran past 120 s wall at nice 19 under load and take 19-22 s
CPU alone. The slow-marked test itself (2000 examples in one pytest run) was not run end to end.
"""

import collections
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spec_strategies as ss  # noqa: E402

PER_EXAMPLE_S = float(os.environ.get("GDDIM_ANYSDE_TIMEOUT", 120))
DEFAULT_EXAMPLES = int(os.environ.get("GDDIM_ANYSDE_EXAMPLES", 4))
SLOW_EXAMPLES = int(os.environ.get("GDDIM_ANYSDE_EXAMPLES", 2000))
ONE_LINE = re.compile(r"^error: [^\n]+: [^\n]+: [^\n]+$")


def derive_in_child(spec, folder, timeout=PER_EXAMPLE_S):
    """Write ``spec`` (a spec dict, or YAML text) and run derive's CLI on it in a forked child:
    (rc, stdout, stderr, seconds).

    rc is None when the child ran past ``timeout`` (it is then killed with its process group).
    The child runs exactly what ``python -m derive`` runs (derive._cli.main), without paying
    the interpreter and sympy start-up per example; an exception escaping main is printed as
    the interpreter would print it.
    """
    folder = Path(folder)
    path = folder / "spec.yaml"
    path.write_text(spec if isinstance(spec, str) else ss.dump(spec))
    out_f, err_f = folder / "stdout.txt", folder / "stderr.txt"
    argv = [str(path), "--out", str(folder / "out"), "--quiet"]
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:                                                   # child
        rc = 1
        try:
            os.setpgid(0, 0)
            for fd, name in ((1, out_f), (2, err_f)):
                handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            from derive._cli import main
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)
    deadline = start + timeout
    status = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    rc = None if status is None else os.waitstatus_to_exitcode(status)
    return rc, out_f.read_text(), err_f.read_text(), seconds


def classify(expect, rc, err):
    """'pass' or the failure class (a short label used to group failures)."""
    if rc is None:
        return "hang (ran past the per-example limit)"
    if "Traceback" in err:
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
        where = re.findall(r'File "[^"]*/((?:derive|validation)/[^"]+)", line \d+, in (\w+)', err)
        at = f" at {where[-1][0]}:{where[-1][1]}" if where else ""
        return f"traceback {last.split(':')[0]}{at}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if rc == 3:
        return "internal error (exit 3)"
    if rc == 1:
        return "verification failed (exit 1)"
    if rc == 2:
        if len(lines) != 1 or not ONE_LINE.match(lines[0]):
            return "exit 2 without one 'file: key: problem' line"
        if expect == "ok":
            key = lines[0].split(": ")[2] if lines[0].count(": ") >= 3 else "?"
            return f"valid spec refused ({key}: {_problem_class(lines[0])})"
        return "pass"
    if rc == 0:
        return "pass" if expect == "ok" else "defect accepted (exit 0)"
    return f"exit {rc}"


def _problem_class(line):
    problem = line.split(": ", 3)[-1]
    problem = re.sub(r"[-+]?\d[\d.e+-]*", "N", problem)
    return problem[:80]


def check_outcome(expect, label, spec, rc, out, err, folder):
    cls = classify(expect, rc, err)
    text = spec if isinstance(spec, str) else ss.dump(spec)
    assert cls == "pass", f"{cls}\n--- {label} spec ---\n{text}--- stderr ---\n{err[-3000:]}"
    if rc == 0:
        written = list((Path(folder) / "out").rglob("*.safetensors"))
        assert any("_nfe" in p.name for p in written), "exit 0 but no table written"


def _run_one(case):
    expect, label, spec = case
    with tempfile.TemporaryDirectory(prefix="anysde_") as tmp:
        rc, out, err, _ = derive_in_child(spec, tmp)
        check_outcome(expect, label, spec, rc, out, err, tmp)


# No shrinking: one example can take a minute (the per-example limit); the failure message
# carries the whole spec, and the survey below groups failures by class.
_COMMON = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


@settings(max_examples=DEFAULT_EXAMPLES, **_COMMON)
@given(ss.any_spec(max_k=2))
def test_generated_specs_derive_or_refuse_cleanly(case):
    """The default run's representative draw: every form, k <= 2 (quick), defects included."""
    _run_one(case)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **dict(_COMMON, derandomize=False))
@given(ss.any_spec())
def test_generated_specs_many(case):
    _run_one(case)


@settings(max_examples=2, **_COMMON)
@given(ss.marginal())
def test_generated_marginal_families(spec):
    _run_one(("ok", "marginal", spec))


# ----- what the census found: each failing class's smallest spec, kept as generated --------------

CENSUS_SPECS = Path(__file__).resolve().parent / "census_specs"


@pytest.mark.parametrize("path", sorted(CENSUS_SPECS.glob("*.yaml")), ids=lambda p: p.stem)
def test_census_findings_now_derive(path, tmp_path):
    """Valid specs that a census run (``--survey``) found failing, one per failure class: each now
    exits 0 with tables that passed the fast check (the file's comment says what failed before)."""
    rc, out, err, _ = derive_in_child(path.read_text(), tmp_path)
    check_outcome("ok", path.stem, path.read_text(), rc, out, err, tmp_path)


# ----- the spec loader alone: cheap, so many examples ------------------------------------

@settings(max_examples=int(os.environ.get("GDDIM_ANYSDE_LOAD_EXAMPLES", 150)), **_COMMON)
@given(ss.any_spec())
def test_generated_specs_load_or_refuse_with_one_line(case):
    """build_spec accepts every valid generated spec and refuses every defect with one SpecError."""
    from derive._errors import SpecError
    from derive._spec import _Loader, build_spec
    expect, label, spec = case
    if expect == "ok":
        built = build_spec(yaml.load(ss.dump(spec), Loader=_Loader), "gen.yaml")
        assert built.k == len(spec["state"])
    else:
        with pytest.raises(SpecError) as info:
            build_spec(yaml.load(ss.dump(spec), Loader=_Loader), "gen.yaml")
        assert "\n" not in str(info.value) and str(info.value).startswith("gen.yaml: ")


# ----- survey: every failure class, not only the first -----------------------------------

def survey(n, seed=0, report=None, keep=None, max_k=6):
    """Draw ``n`` specs, run each, count outcomes per class; keep the smallest spec of each class.

    ``keep``: a folder that receives every failing spec as fail_<i>.yaml (stderr appended as comments).
    """
    from hypothesis import seed as hseed
    stats, smallest, times = collections.Counter(), {}, []

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(ss.any_spec(max_k=max_k))
    def body(case):
        expect, label, spec = case
        with tempfile.TemporaryDirectory(prefix="anysde_") as tmp:
            rc, out, err, sec = derive_in_child(spec, tmp)
        times.append(sec)
        cls = classify(expect, rc, err)
        stats[(label if cls == "pass" else "FAIL", cls)] += 1
        text = ss.dump(spec)
        if cls != "pass" and keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            note = "".join(f"# {ln}\n" for ln in [cls, *err.strip().splitlines()[-5:]])
            Path(keep, f"fail_{len(times):04d}.yaml").write_text(note + text)
        if cls != "pass" and (cls not in smallest or len(text) < len(smallest[cls][0])):
            tail = err.strip().splitlines()[-1] if err.strip() else ""
            smallest[cls] = (text, tail, sec)
        print(f"[{len(times)}/{n}] {sec:6.1f}s {label:8s} {cls}", flush=True)

    start = time.perf_counter()
    body()
    wall = time.perf_counter() - start
    summary = {"examples": len(times), "wall_s": round(wall, 1),
               "median_s": round(sorted(times)[len(times) // 2], 2) if times else None,
               "max_s": round(max(times), 1) if times else None,
               "outcomes": {f"{a} | {b}": c for (a, b), c in sorted(stats.items())},
               "failures": {k: {"spec": v[0], "last_line": v[1], "seconds": round(v[2], 1)}
                            for k, v in smallest.items()}}
    if report:
        Path(report).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--survey", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None)
    p.add_argument("--keep", default=None, help="folder for every failing spec")
    p.add_argument("--max-k", type=int, default=6)
    a = p.parse_args()
    s = survey(a.survey, a.seed, a.report, a.keep, a.max_k)
    print(json.dumps({k: v for k, v in s.items() if k != "failures"}, indent=1))
    for k, v in s["failures"].items():
        print(f"\n## {k}\n{v['spec']}last line: {v['last_line']}")


def test_census_kink_in_the_data_prediction_weights():
    """The hidden-kink census spec with the x0 form in rho, corrector included, at the full level:
    derive's variant quadrature ends its panels at the kink (it did not converge before) and the
    45-digit Gauss-Legendre reference splits there too (it was 1.5e-12 off before)."""
    from derive import derive
    built = derive(str(CENSUS_SPECS / "hidden_kink_weights.yaml")).table(       # raises VerificationFailed
        nfe=4, order=2, grid="uniform", form="x0", variable="rho", corrector=True, verify="full")
    assert {"x0_weights_ms", "x0_corrector_weights", "corrector_weights"} <= set(built.tensors)


HEURISTIC_GCD = """\
name: gen_matrix
state: [rho, gamma, s]
parameters: {expr: (1/4), name: 5/6}
definitions: {r: sqrt(((4 * (E) + (-587/61))**(3/2))**2), G: (exp(4 * (E) + (-685/63)))**(3/2)}
drift:
- [((4 * (3.0) + (-12))**2)**(1/2), 4 * ((5/2)) + (-10), 4 * (E) + (-685/63)]
- [((4 * (E) + (-685/63))**2)**(1/2), 4 * ((G)**(3/2)) + (-4), (71/62) * (r) + (-4/5)]
- [4 * (((-5/3))**3) + (500/27), 4 * (pi) + (-377/30), (4 * (E) + (-587/61))**-2]
diffusion:
- [4 * ((4 * (pi) + (-679/60))**0.5) + (-237/53), (4/5) * (sin(4 * (pi) + (-377/30))) + 0, '0']
- ['0', 4 * (atan(E)) + (-307/63), '0']
- [4 * (pi) + (-377/30), sinh(4 * (pi) + (-377/30)), sqrt((t)**2)]
initial_covariance:
- [1/4, '0', '0']
- ['0', '4', '0']
- ['0', '0', 1/5]
R0: sqrtm
time: {t_min: 1/20, T: 1/2}
tables:
  nfe: [2]
  order: 1
  grid: uniform
"""


def test_a_sympy_polynomial_failure_falls_back_instead_of_an_internal_error():
    """Found by test_generated_specs_many (slow): sympy's factorisation of this constant 3 x 3 drift's
    characteristic polynomial raised HeuristicGCDFailed, which is a BasePolynomialError but not a
    PolynomialError, so it escaped the closed-form attempt as an internal error (exit 3). Every sympy
    polynomial failure now means "no closed form here"; the table derives and verifies."""
    import derive
    tab = derive.derive(HEURISTIC_GCD).table(nfe=2, order=1, grid="uniform")
    assert tab.verify("fast").passed
