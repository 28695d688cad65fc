"""derive: from a linear SDE spec to verified gDDIM coefficient tables.

    python -m derive my_sde.yaml            # see python -m derive --help

    import derive
    d = derive.derive("cld")                # built-in name, spec file, YAML text or Spec
    tab = d.table(nfe=20, order=3, grid="logsnr")
    gddim_runtime.sample(model, tab.to_runtime("cuda"), ...)

Public surface: ``derive`` / ``Derived`` (derive a spec once, build tables in memory),
``TableRequest`` / ``TableOptions`` (the options of a table, as data), ``BuiltTable`` /
``DenseTable`` (tables in memory: ``.tensors``, ``.meta``, ``.verify``, ``.save``,
``.to_runtime``), ``load_spec`` / ``build_spec`` (the spec language), ``Derivation`` (Psi,
Sigma, R: closed forms and high-precision evaluators), ``SpecError`` (bad input, exit 2),
``VerificationFailed`` (a failed check, exit 1).
"""

from ._api import BuiltTable, DenseTable, Derived, derive
from ._derivation import Derivation
from ._errors import SpecError, VerificationFailed
from ._pipeline import TableOptions, TableRequest
from ._spec import Spec, build_spec, load_spec

__all__ = ["BuiltTable", "DenseTable", "Derivation", "Derived", "Spec", "SpecError", "TableOptions",
           "TableRequest", "VerificationFailed", "build_spec", "derive", "load_spec"]
