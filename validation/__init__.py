"""validation: independent verification of what derive emits, and exact-score benchmarks.

Recomputes every table quantity by its own route (Taylor series and Bulirsch-Stoer extrapolation / Gauss-Legendre at 45 digits,
``_reference.DPS``; scipy solve_ivp in float64) from the spec's F, G, Sigma_0 and R_0; it
reuses only derive's spec parser.

``check_table`` is also derive's check before writing: pyproject.toml registers it under the
entry-point group ``gddim_toolkit.verifiers``, so imports run validation -> derive only.
"""

from ._check import Report, check_table

__all__ = ["Report", "check_table"]
