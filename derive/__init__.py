"""derive: from a linear SDE spec to verified gDDIM coefficient tables.

    python -m derive my_sde.yaml            # see python -m derive --help

Public surface: ``load_spec`` / ``build_spec`` (the spec language), ``Derivation`` (Psi,
Sigma, R: closed forms and high-precision evaluators) and ``SpecError`` (bad input).
"""

from ._derivation import Derivation
from ._errors import SpecError
from ._spec import Spec, build_spec, load_spec

__all__ = ["Derivation", "Spec", "SpecError", "build_spec", "load_spec"]
