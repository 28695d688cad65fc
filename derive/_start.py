"""Grids that start below T: the start skip (issue 12; derive/MATH_x0.md section 6).

A grid written ``<kind>@<rho_s>`` (kind: uniform, quadratic, power:<kappa>, logsnr, edm[:<rho>])
is that kind's grid on [t_min, t_s] instead of [t_min, T], where t_s is the time at which the
noise-to-signal ratio rho (the logsnr grid's: std/|mean| for scalar families, the geometric-mean
ratio for k > 1, ``_grids``) equals rho_s; t_s = T when rho(T) <= rho_s (nothing to skip).

The skipped interval costs no model call. The state at t_s is taken as

    u_{t_s} = R_{t_s} R_T^-1 u_T,

the exact probability flow from T when the data-prediction is x0hat = 0 on [t_s, T]: with
A = F + 1/2 G G^T Sigma^-1 the flow is du/dt = A u - 1/2 G G^T Sigma^-1 D x0hat, and the transition
of A is R_t R_s^-1 (dR/dt = A R). Equivalently one step of either form with no model call: the x0
form with x0hat = 0, the eps form with eps_R = R_T^-1 u_T (u_t = Psi u_s + (R_t - Psi R_s) R_s^-1 u_s).
For fresh noise this needs nothing at all: u_T = R_T z gives u_{t_s} = R_{t_s} z ~ N(0, Sigma_{t_s}),
which is what the runtime draws for a table whose grid starts at t_s. It is an approximation: the
data's signal in u_{t_s} (of size |D_{t_s}| |x0|, i.e. ~ |x0| / rho_s per unit noise) is dropped.
Its cost is measured, not assumed (validation/peers.py: the exact flow from the skipped state
against the exact flow from T); it grows with the data's distance from 0 and explodes once rho_s
reaches the range where the flow separates the modes (VP, data of scale 1: rho ~ 15).
"""

import math

import gmpy2
import numpy as np

from . import _grids, _hp
from ._errors import SpecError

KINDS = ("power", "logsnr", "edm")


def parse_start(text, where="--grid"):
    """'<kind>@<rho_s>' -> (kind text, rho_s as float); text without '@' -> (text, None)."""
    if not isinstance(text, str) or "@" not in text:
        return text, None
    base, _, value = text.rpartition("@")
    try:
        rho_s = float(value)
    except ValueError:
        rho_s = float("nan")
    if not math.isfinite(rho_s) or rho_s <= 0:
        raise SpecError(where, "grid", f"<kind>@<rho_s> needs a noise-to-signal ratio rho_s > 0, got {text!r}")
    kind = _grids.parse_kind(base, where)
    if kind[0] not in KINDS:
        raise SpecError(where, "grid", f"a start below T (@<rho_s>) applies to uniform, quadratic, power, logsnr "
                                       f"and edm grids, not {base!r}")
    return base, rho_s


def start_time(deriv, rho_s, where="--grid"):
    """t_s (float64): rho(t_s) = rho_s, or T when rho(T) <= rho_s. SpecError if rho_s <= rho(t_min)."""
    spec = deriv.spec
    T, t_min = float(_hp.mpf(spec.T)), float(_hp.mpf(spec.t_min))
    lo, hi = _grids._rho(deriv, np.array([_hp.mpf(t_min), _hp.mpf(T)], dtype=object))
    if not lo < hi:
        raise SpecError(where, "grid", "a start below T needs a noise-to-signal ratio increasing in t")
    target = gmpy2.mpfr(rho_s)
    if target >= hi:
        return T
    if target <= lo:
        raise SpecError(where, "grid", f"start rho_s = {rho_s:g} is at or below rho(t_min) = {float(lo):.4g}")
    return _grids._invert(deriv, [target], t_min, T)[0]


def start_grid(kind, rho_s, n_steps, deriv, where="--grid"):
    """Float64 times [N+1] of ``kind`` (as ``_grids.parse_kind`` returns it) from t_s down to t_min."""
    kind_name, param = kind
    if kind_name not in KINDS:
        raise SpecError(where, "grid", f"no start below T for a {kind_name} grid")
    if n_steps < 1:
        raise SpecError(where, "nfe", "needs at least one sampling step")
    t_s = start_time(deriv, rho_s, where)
    return _grids.named_times(kind_name, param, n_steps, deriv, where, t_s, gmpy2.mpfr(t_s))


def make_grid(text, n_steps, deriv, where="--grid"):
    """Times for a grid text with or without '@<rho_s>' (without: ``_grids.make_grid``)."""
    base, rho_s = parse_start(text, where)
    kind = _grids.parse_kind(base, where)
    if rho_s is None:
        return _grids.make_grid(kind, n_steps, deriv, where)
    return start_grid(kind, rho_s, n_steps, deriv, where)


def skip_map(deriv, t_s):
    """R_{t_s} R_T^-1 per coordinate, float64 [P, k, k] (rounded once): the state at t_s from a given u_T."""
    tt = _hp.array([t_s, float(_hp.mpf(deriv.spec.T))])
    R = deriv.R(tt)                                          # [2, n_distinct, k, k]
    M = R[0] @ _hp.inv(R[1])
    return np.ascontiguousarray(np.take(_hp.to_float64(M, "skip_map"), deriv.coord_index, axis=0))
