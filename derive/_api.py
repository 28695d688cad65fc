"""derive's Python API: derive a spec once, then build any table in memory.

    import derive
    d = derive.derive("cld")                          # built-in name, spec file, YAML text or Spec
    tab = d.table(nfe=20, order=3, grid="logsnr")     # built and checked (fast) in memory
    d.table(nfe=10, variable="logsnr", form="x0")      # polynomial in log rho; + data-prediction tensors
    tab.tensors["eps_weights"], tab.meta["steps"]      # float64 numpy arrays, provenance dict
    tab.verify("full").passed                          # the installed verifier (python -m validation's)
    table = tab.to_runtime("cpu")                      # a gddim_runtime.Table, no file involved
    tab.save("my_tables")                              # my_tables/<label>.safetensors + .md + spec.yaml + manifest
    d.dense().tensors["R"]                             # Chebyshev interpolants for off-grid baselines

``python -m derive`` is this API plus argparse: the same objects write the same bytes.
"""

import dataclasses
import functools
from pathlib import Path

import numpy as np
import yaml

from . import _codegen, _hp, _spec
from ._derivation import Derivation
from ._errors import SpecError, stage
from ._inspect import describe
from ._pipeline import (TableOptions, TableRequest, build_tables, builtin_dir, dense_table, find_verifier,
                        resolve_spec, tool_versions, _stage)
from ._writer import table_bytes, write_folder
from gddim_runtime._format import DENSE_FORMAT


def _spec_from_text(text, where="<text>"):
    try:
        data = yaml.load(text, Loader=_spec._Loader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(where, "yaml", problem) from None
    if not isinstance(data, dict):
        raise SpecError(where, "file", f"top level must be a mapping, found {type(data).__name__}")
    return _spec.build_spec(data, where)


def read_spec(spec):
    """(Spec, the spec as a command line names it) from a Spec, a path, a built-in name or YAML text."""
    if isinstance(spec, _spec.Spec):
        return spec, spec_name_for(spec.path, spec.path)
    if isinstance(spec, str) and ("\n" in spec or ":" in spec and not _is_file(spec)):
        return _spec_from_text(spec), "spec.yaml"    # commands name the normalised spec.yaml written beside
    if not isinstance(spec, (str, Path)):
        raise SpecError("spec", "spec", f"expected a path, a built-in name or YAML text, got {type(spec).__name__}")
    path = resolve_spec(spec)
    return _spec.load_spec(path), spec_name_for(path, spec)


def _is_file(text):
    try:
        return Path(text).is_file()
    except (OSError, ValueError):           # a name too long for the file system, a NUL byte
        return False


def spec_name_for(path, arg):
    """A built-in is named by its name in commands, any other spec file as the user wrote it."""
    return Path(path).stem if Path(path).parent == builtin_dir() else str(arg)


@dataclasses.dataclass(frozen=True)
class BuiltTable:
    """One sampler table in memory: float64 ``tensors`` (file layout, README 'Table format') and ``meta``."""
    request: TableRequest
    spec: _spec.Spec
    tensors: dict
    meta: dict
    probe: float | None = None     # gr.gaussian_probe of the table's own sampler (None: not run, verify="none")

    @property
    def name(self):
        """File stem, predictable from the options (``TableRequest.label``)."""
        return self.request.label(self.spec.name)

    @property
    def filename(self):
        return f"{self.name}.safetensors"

    def to_bytes(self):
        """The .safetensors file's bytes (deterministic)."""
        return table_bytes(self.tensors, self.meta)

    def describe(self, coord=0):
        """The readable text of ``python -m derive inspect`` (the .md companion)."""
        return describe(self.tensors, self.meta, coord)

    def verify(self, level="fast", verifier=None, n_coords=None):
        """Check against the independent reference; returns the verifier's report (``.passed``, ``.text()``)."""
        if level not in ("fast", "full"):
            raise SpecError("verify", "level", f"must be 'fast' or 'full', got {level!r}")
        verifier = verifier or find_verifier()
        kwargs = {} if n_coords is None else {"n_coords": n_coords}
        return verifier(self.spec, self.tensors, self.meta, level=level, **kwargs)

    def save(self, folder):
        """Write ``folder/<name>.safetensors``, its ``.md`` and the spec.yaml it was derived from (atomically),
        then ``folder/manifest.json``: the folder verifies as it is (``python -m validation folder``). A folder
        whose spec.yaml is another spec's is refused (its tables would fail validation's spec hash)."""
        return _save(self.spec, folder, {self.filename: self.to_bytes(), f"{self.name}.md": self.describe()})

    def to_runtime(self, device="cpu"):
        """A ``gddim_runtime.Table`` on ``device`` for ``gddim_runtime.sample``, without a file."""
        import gddim_runtime
        return gddim_runtime.from_tensors(self.tensors, self.meta, device=device, path=f"<memory>/{self.filename}")


def spec_yaml(spec):
    """The spec.yaml written beside the tables: the normalised spec, whose hash the tables record."""
    return ("# GENERATED by python -m derive (normalised spec; exact numbers): do not edit.\n"
            + yaml.safe_dump(spec.normalized, sort_keys=False, allow_unicode=True))


def _save(spec, folder, outputs):
    """``outputs`` plus spec.yaml into ``folder`` (refused when its spec.yaml is another spec's); the first path."""
    folder = Path(folder)
    mine, theirs = spec_yaml(spec), folder / "spec.yaml"
    with stage("write"):
        try:
            if theirs.is_file() and theirs.read_text() != mine:
                raise SpecError(folder, "save", f"holds the tables of another spec (its spec.yaml differs from "
                                f"{spec.name}'s): save into another folder")
            write_folder(folder, {**outputs, "spec.yaml": mine})
        except OSError as exc:
            raise SpecError(folder, "save", f"cannot write: {exc.strerror or exc}") from None
    return folder / next(iter(outputs))


@dataclasses.dataclass(frozen=True)
class DenseTable:
    """Piecewise Chebyshev interpolants of F, G G^T, R, L, D on [t_min, T] (the dense file)."""
    spec: _spec.Spec
    tensors: dict
    meta: dict

    @property
    def filename(self):
        return f"{self.spec.name}_dense.safetensors"

    def to_bytes(self):
        return table_bytes(self.tensors, self.meta, file_format=DENSE_FORMAT)

    def save(self, folder):
        """As ``BuiltTable.save``: the dense file, spec.yaml and the manifest."""
        return _save(self.spec, folder, {self.filename: self.to_bytes()})

    def to_runtime(self, device="cpu"):
        """``gddim_runtime.DenseCoefficients`` on ``device`` (coefficients at any t), without a file."""
        import gddim_runtime
        return gddim_runtime.dense_from_tensors(self.tensors, self.meta, device, f"<memory>/{self.filename}")


class Derived:
    """A spec with its derivation (sympy closed forms or numerical fallbacks), done once.

    ``verifier``: the check used by ``verify="fast"|"full"`` (default: the installed one, see
    ``derive._pipeline``); ``spec_arg``: how commands recorded in the files name the spec.
    """

    def __init__(self, spec, verifier=None, spec_arg=None):
        with stage("spec"):
            self.spec, default_arg = read_spec(spec)
        self.spec_arg = spec_arg or default_arg
        self.verifier = verifier
        self.versions = tool_versions()

    @functools.cached_property
    def derivation(self):
        """The Derivation (sympy + MPFR evaluators), done on first use."""
        return _stage(self.spec, "derivation", lambda: Derivation(self.spec))

    @property
    def kinds(self):
        """How Psi, Sigma and R were obtained: 'closed form', 'semi-closed' or 'numerical'."""
        d = self.derivation
        return {"psi": d.psi_kind, "sigma": d.sigma_kind, "R": d.R_kind}

    @functools.cached_property
    def data_left_at_T(self):
        """How visible the data still is at T: max over coordinates of |L_T^-1 D_T e_0| (L_T L_T^T = Sigma_T),
        the shift of u_T, in its own standard deviations, that one unit of data causes. Sampling starts
        from N(0, Sigma_T), which ignores that shift: with data of size s the prior is off by about s
        times this figure (vp_linear 6.6e-3, cld 4.0e-3, bdm 1.2e-2, ve 2e-2; an oscillator run to T = 2
        0.19 left its mode weights 0.46 / 0.30 / 0.24 for 0.50 / 0.30 / 0.20 with the exact score)."""
        T = np.array([_hp.mpf(self.spec.T)], dtype=object)
        d = self.derivation

        def left():                        # a float64 overflow (drift 1000 to T = 1) is the spec's: one line
            D = _hp.to_float64(d.data_to_state(T), "data_to_state")[0][..., :1]
            L = np.linalg.cholesky(_hp.to_float64(d.sigma(T), "sigma")[0])
            return float(np.linalg.norm(np.linalg.solve(L, D)[..., 0], axis=-1).max())
        return _stage(self.spec, "the process at time.T", left)

    def request(self, nfe, order=None, grid=None, lam=None, corrector=None, denoise=None, variable=None, form=None,
                model_error=None):
        """A TableRequest; options left None take the spec's ``tables`` defaults (variable t, form eps);
        model_error: what order auto's recommendation charges for (``TableOptions``)."""
        options = TableOptions(nfe=(nfe,), order=order, grid=grid, lam=None if lam is None else (lam,),
                               corrector=corrector, denoise=denoise, variable=variable, form=form,
                               model_error=model_error)
        return options.requests(self.spec, self.derivation)[0]

    def requests(self, options=None):
        """TableRequests for ``options`` (TableOptions; default: the spec's default tables)."""
        return (options or TableOptions()).requests(self.spec, self.derivation)

    def table(self, nfe, order=None, grid=None, lam=None, corrector=None, denoise=None, variable=None, form=None, *,
              verify="fast", model_error=None):
        """Build one table in memory (see ``TableRequest`` for the options; None: spec default).

        variable: "t" | "rho" | "logsnr" (the multistep polynomial's variable); form: "eps" | "x0"
        (also the data-prediction tensors; README 'Data-prediction form').

        verify: "fast" (default; the check ``python -m derive`` runs before writing), "full"
        (45-digit reference) or "none"; a failed check raises ``VerificationFailed``.
        """
        return self.tables([self.request(nfe, order, grid, lam, corrector, denoise, variable, form, model_error)],
                           verify=verify)[0]

    def tables(self, requests=None, *, verify="fast", jobs=1):
        """Build several tables (default: the spec's defaults); jobs > 1 forks that many workers.

        Unless verify="none", each table's own sampler is also run on Gaussian data with the exact score
        (``gddim_runtime.gaussian_probe``, 0.01-3 s, in ``BuiltTable.probe``): an
        ``gddim_runtime.UnstableSamplerWarning`` names a table whose sampler is unstable on the process."""
        requests = self.requests() if requests is None else list(requests)
        bad = [r for r in requests if not isinstance(r, TableRequest)]
        if bad:
            raise SpecError("tables", "requests", f"expected TableRequest values (d.request(nfe=...)), got {bad[0]!r}")
        built = build_tables(self.derivation, requests, self.spec_arg, self.versions, verify=verify,
                             verifier=self.verifier, jobs=jobs)
        out = [BuiltTable(r, self.spec, tensors, meta) for r, (tensors, meta) in zip(requests, built)]
        if verify == "none":
            return out
        from gddim_runtime._probe import warn_if_unstable
        return [dataclasses.replace(tab, probe=warn_if_unstable(tab.to_runtime(), tab.name)) for tab in out]

    def dense(self):
        """The dense interpolants (what ``<name>_dense.safetensors`` holds)."""
        tensors, meta = dense_table(self.derivation, self.versions)
        return DenseTable(self.spec, tensors, meta)

    def closed_forms(self):
        """{'closed_forms.md': text, 'closed_forms.py': text} as written beside the tables."""
        return {"closed_forms.md": _stage(self.spec, "codegen", lambda: _codegen.markdown(self.derivation, self.versions)),
                "closed_forms.py": _stage(self.spec, "codegen",
                                          lambda: _codegen.python_module(self.derivation, self.versions))}

    def outputs(self, tables=(), dense=None):
        """File name -> content of the output folder (tables, their .md, dense, spec.yaml, closed forms)."""
        out = {}
        for tab in tables:
            out[tab.filename] = tab.to_bytes()
            out[f"{tab.name}.md"] = tab.describe()
        if dense is not None:
            out[dense.filename] = dense.to_bytes()
        out["spec.yaml"] = spec_yaml(self.spec)
        out.update(self.closed_forms())
        return out

    def write(self, out="coeffs", tables=(), dense=None):
        """Write ``out/<spec name>/`` (atomically, file by file), then its manifest.json; returns the paths.
        tables: BuiltTable values (or one); dense: ``self.dense()`` or None."""
        tables = [tables] if isinstance(tables, BuiltTable) else list(tables)
        if not all(isinstance(x, BuiltTable) for x in tables) or not (dense is None or isinstance(dense, DenseTable)):
            raise SpecError("write", "tables", "expected BuiltTable values (d.table(...)) and dense=d.dense() or None")
        outputs = self.outputs(tables, dense)
        folder = Path(out) / self.spec.name
        theirs = folder / "spec.yaml"
        with stage("write"):
            try:
                if "spec.yaml" in outputs and theirs.is_file() and theirs.read_bytes() != _bytes(outputs["spec.yaml"]):
                    # two specs of one name (or an edited spec) mixed their tables there, and validation then
                    # failed on the spec hash (sweep 11); save() refused this already
                    raise SpecError(folder, "--out", f"holds the tables of another spec named {self.spec.name!r} "
                                    "(its spec.yaml differs): remove the folder or write elsewhere (--out)")
                return write_folder(folder, outputs)
            except OSError as exc:
                raise SpecError(folder, "--out", f"cannot write: {exc.strerror or exc}") from None


def _bytes(content):
    return content.encode() if isinstance(content, str) else bytes(content)


def derive(spec, verifier=None):
    """Derive ``spec`` (built-in name, spec file path, YAML text or a Spec) once; returns ``Derived``."""
    return Derived(spec, verifier=verifier)
