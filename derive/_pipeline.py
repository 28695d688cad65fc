"""The derive job: spec -> derivation -> tables -> checked -> written (atomically)."""

import concurrent.futures
import importlib.metadata
import multiprocessing
import os
import re
import sys
from pathlib import Path

import yaml

from . import _codegen, _grids, _hp, _tables
from ._cli import resolve_spec
from ._derivation import Derivation
from ._errors import SpecError
from ._spec import _number, load_spec
from ._writer import atomic_write, table_bytes
from gddim_runtime._format import DENSE_FORMAT

IDENTITY_TOL = 1e-35          # internal high-precision identities (working precision ~1e-60)


def tool_versions():
    out = {}
    for dist in ("gddim-toolkit", "sympy", "mpmath", "gmpy2", "numpy", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def table_configs(spec, args):
    """List of dicts (nfe, steps, order, grid, lam, corrector, denoise) after validation."""
    d = spec.tables
    nfes = args.nfe if args.nfe is not None else list(d.nfe)
    order = args.order if args.order is not None else d.order
    grid = args.grid if args.grid is not None else d.grid
    corrector = args.corrector if args.corrector is not None else d.corrector
    denoise = args.denoise if args.denoise is not None else d.denoise
    lams = args.lam if args.lam is not None else list(d.lam)
    if not 1 <= order <= 4:
        raise SpecError("--order", "order", f"must be 1..4, got {order}")
    kind = _grids.parse_kind(grid)
    lam_values = []
    for text in lams:
        lam = _number(text, "--lam", "lam")
        if lam <= 0:
            raise SpecError("--lam", "lam", f"must be > 0 (lam = 0 is the deterministic table), got {text}")
        if lam > 100:
            raise SpecError("--lam", "lam", f"must be <= 100, got {text}")
        lam_values.append(lam)
    configs = []
    for nfe in nfes:
        if kind[0] == "file":
            steps = len(_grids.read_times(kind[1])) - 1
            if args.nfe is not None and steps + int(denoise) != nfe:
                raise SpecError(kind[1], "grid", f"{steps} steps + {int(denoise)} denoise != --nfe {nfe}")
            nfe = steps + int(denoise)
        steps = nfe - int(denoise)
        if nfe < 1 or nfe > 10000:
            raise SpecError("--nfe", "nfe", f"must be in 1..10000, got {nfe}")
        if steps < 1:
            raise SpecError("--nfe", "nfe", f"NFE {nfe} leaves no sampling step (final denoise takes one)")
        if nfe < order:
            raise SpecError("--nfe", "nfe", f"NFE {nfe} is smaller than the order {order}")
        for lam in (lam_values or [None]):
            configs.append(dict(nfe=nfe, steps=steps, order=order, grid=grid, kind=kind, lam=lam,
                                corrector=bool(corrector), denoise=bool(denoise)))
    return configs


def _label(cfg, name):
    kind, param = cfg["kind"]
    if kind == "power":
        g = {1.0: "uniform", 2.0: "quadratic"}.get(param, f"power{param:g}")
    elif kind == "file":
        g = "file-" + re.sub(r"[^a-z0-9]+", "-", Path(param).stem.lower()).strip("-")
    elif kind == "edm":
        g = f"edm{param:g}"
    else:
        g = kind
    out = f"{name}_nfe{cfg['nfe']}_{g}_q{cfg['order']}"
    if cfg["lam"] is not None:
        out += "_lam" + str(cfg["lam"]).replace("/", "over")
    if cfg["corrector"]:
        out += "_pc"
    if not cfg["denoise"]:
        out += "_nodenoise"
    return out


def _command(spec_arg, cfg):
    parts = ["python -m derive", spec_arg, "--nfe", str(cfg["nfe"]), "--order", str(cfg["order"]),
             "--grid", cfg["grid"]]
    if cfg["lam"] is not None:
        parts += ["--lam", str(cfg["lam"])]
    if cfg["corrector"]:
        parts.append("--corrector")
    if not cfg["denoise"]:
        parts.append("--no-denoise")
    return " ".join(parts)


def _stage(spec, what, fn):
    try:
        return fn()
    except SpecError:
        raise
    except _hp.EvaluationError as exc:
        raise SpecError(spec.path, what, f"evaluation failed: {exc}") from None
    except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as exc:
        raise SpecError(spec.path, what, f"evaluation failed: {type(exc).__name__}: {exc}") from None


def build_table(deriv, cfg, spec_arg, versions, verify="fast", times=None, moment_cache=None):
    """(float64 tensors, meta) for one configuration; raises SpecError on bad input."""
    spec = deriv.spec
    if times is None:
        times = _stage(spec, "grid", lambda: _grids.make_grid(cfg["kind"], cfg["steps"], deriv))
    lam = None if cfg["lam"] is None else _hp.mpf(cfg["lam"])
    hp = _stage(spec, "tables", lambda: _tables.build(deriv, times, cfg["order"], lam, cfg["corrector"],
                                                      moment_cache=moment_cache))
    identities = _tables.residuals(deriv, hp)
    tensors = _stage(spec, "tables", lambda: _tables.to_float64(hp, deriv))
    steps = len(times) - 1
    from validation._check import decade          # validation is derive's checker (imported lazily)
    meta = {
        "generated": "GENERATED by python -m derive (gddim-toolkit); do not edit",
        "command": _command(spec_arg, cfg),
        "spec": {"name": spec.name, "sha256": spec.sha256, "state": list(spec.state), "form": spec.form,
                 "basis": {"kind": spec.basis.kind, "size": list(spec.basis.size),
                           "symbol": None if spec.basis.symbol is None else spec.basis.symbol.name},
                 "t_min": str(spec.t_min), "T": str(spec.T)},
        "k": spec.k, "P": spec.basis.n_coords,
        "grid": {"name": cfg["grid"] if cfg["kind"][0] != "file" else "file", "kind": cfg["kind"][0],
                 "param": cfg["kind"][1] if cfg["kind"][0] != "file" else None},
        "order": cfg["order"], "lam": None if cfg["lam"] is None else str(cfg["lam"]),
        "corrector": cfg["corrector"], "denoise": cfg["denoise"], "steps": steps,
        "nfe": steps + int(cfg["denoise"]),
        "nfe_accounting": f"{steps} multistep steps (one model evaluation each; the corrector reuses it)"
                          + (" + 1 final denoising evaluation at t_min" if cfg["denoise"] else ""),
        "kinds": {"psi": deriv.psi_kind, "sigma": deriv.sigma_kind, "R": deriv.R_kind},
        "tools": versions,
        "verification": {"level": "none" if verify == "none" else verify,
                         "identities_hp": {k: decade(v) for k, v in identities.items()}},
    }
    if verify != "none":
        bad = {k: v for k, v in identities.items() if not v <= IDENTITY_TOL}
        if bad:
            raise VerificationFailed(f"{spec.name}: high-precision identities violated: {bad}")
        from validation import check_table           # the independent fast check before writing
        report = check_table(spec, tensors, meta, level=verify)
        meta["verification"].update(report.summary())
        if not report.passed:
            raise VerificationFailed(f"{spec.name}: verification failed:\n{report.text()}")
    return tensors, meta


class VerificationFailed(Exception):
    pass


_WORK = {}


def _moments_one(task):
    deriv = _WORK["deriv"]
    s, t, p_max = task
    try:
        return _tables.step_moments(deriv, _hp.mpf(s), _hp.mpf(t), p_max)
    except (ArithmeticError, ValueError, TypeError) as exc:       # one message for the parent
        raise _hp.EvaluationError(f"step t = {s:.6g} -> {t:.6g}: {exc}") from None


def _build_one(i):
    deriv, configs, spec_arg, versions, verify, grids, cache = _WORK["args"]
    return build_table(deriv, configs[i], spec_arg, versions, verify, times=grids[i], moment_cache=cache)


def _p_max(cfg, i):
    return (min(cfg["order"] + 1, i + 2) if cfg["corrector"] else min(cfg["order"], i + 1)) - 1


def _build_all(deriv, configs, spec_arg, versions, verify):
    """Steps and tables are independent: spread them over forked workers, one per core.

    Phase 1 computes the quadrature moments of every distinct step of every grid (the bulk of
    the work, and it balances: a 49-step table no longer sits on one core); phase 2 assembles
    and checks each table from those moments.
    """
    spec = deriv.spec
    grids = [_stage(spec, "grid", lambda c=cfg: _grids.make_grid(c["kind"], c["steps"], deriv)) for cfg in configs]
    need = {}
    for cfg, times in zip(configs, grids):
        for i in range(len(times) - 1):
            key = (times[i], times[i + 1])
            need[key] = max(need.get(key, 0), _p_max(cfg, i))
    tasks = [(s, t, p) for (s, t), p in need.items()]
    _stage(spec, "derivation", deriv.warm)              # R's ODE once, in the parent, before the fork
    workers = min(os.cpu_count() or 1, max(len(configs), 1))
    use_pool = workers > 1 and "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork") if use_pool else None
    _WORK["deriv"] = deriv
    try:
        if use_pool and tasks:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                moments = list(pool.map(_moments_one, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
        else:
            moments = [_stage(spec, "tables", lambda t=t: _moments_one(t)) for t in tasks]
        cache = {(float(s), float(t)): M for (s, t, _), M in zip(tasks, moments)}
        _WORK["args"] = (deriv, configs, spec_arg, versions, verify, grids, cache)
        if use_pool and len(configs) > 1:
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                return list(pool.map(_build_one, range(len(configs))))
        return [_build_one(i) for i in range(len(configs))]
    except _hp.EvaluationError as exc:
        raise SpecError(spec.path, "tables", f"evaluation failed: {exc}") from None
    finally:
        _WORK.clear()


def run(args):
    spec_path = resolve_spec(args.spec)
    spec = load_spec(spec_path)
    configs = [] if args.no_tables else table_configs(spec, args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    versions = tool_versions()
    deriv = _stage(spec, "derivation", lambda: Derivation(spec))
    say(f"{spec.name}: Psi {deriv.psi_kind}, Sigma {deriv.sigma_kind}, R {deriv.R_kind}")
    verify = "none" if args.no_verify else args.verify
    spec_arg = spec.name if spec_path.parent == Path(__file__).resolve().parent / "sdes" else str(args.spec)
    outputs = {}
    try:
        from ._inspect import describe
        for cfg, (tensors, meta) in zip(configs, _build_all(deriv, configs, spec_arg, versions, verify)):
            label = _label(cfg, spec.name)
            outputs[f"{label}.safetensors"] = table_bytes(tensors, meta)
            outputs[f"{label}.md"] = describe(tensors, meta)
            say(f"  {label}: {meta['steps']} steps, order {cfg['order']}"
                + (f", lam {cfg['lam']}" if cfg["lam"] is not None else "")
                + f", verification {meta['verification'].get('worst', meta['verification']['level'])}")
        if deriv.spec.basis.n_coords == 1 or args.dense:
            dense = _stage(spec, "dense", lambda: _tables.dense(deriv))
            dmeta = {"generated": "GENERATED by python -m derive (gddim-toolkit); do not edit",
                     "spec": {"name": spec.name, "sha256": spec.sha256}, "tolerance": 1e-14,
                     "panels": int(len(dense["edges"]) - 1), "tools": versions}
            outputs[f"{spec.name}_dense.safetensors"] = table_bytes(dense, dmeta, kind=DENSE_FORMAT)
            say(f"  {spec.name}_dense: {dmeta['panels']} Chebyshev panels for off-grid baselines")
        outputs["spec.yaml"] = ("# GENERATED by python -m derive (normalised spec; exact numbers): do not edit.\n"
                                + yaml.safe_dump(spec.normalized, sort_keys=False, allow_unicode=True))
        outputs["closed_forms.md"] = _stage(spec, "codegen", lambda: _codegen.markdown(deriv, versions))
        outputs["closed_forms.py"] = _stage(spec, "codegen", lambda: _codegen.python_module(deriv, versions))
    except VerificationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folder = Path(args.out) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        atomic_write(folder / name, data)
    say(f"wrote {len(outputs)} files to {folder}/")
    return 0
