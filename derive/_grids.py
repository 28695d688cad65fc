"""Time grids in sampling order t_0 = T > t_1 > ... > t_N = t_min (MATH.md section 7).

Every grid time is rounded to float64 once, here, and all coefficients are then computed at
exactly those float64 values, so the runtime's t and the tables agree bit for bit.

Kinds:
  uniform, quadratic, power:<kappa>  t_i = (T^(1/kappa) + i/N (t_min^(1/kappa) - T^(1/kappa)))^kappa
  logsnr                             uniform in log rho_t (rho = noise-to-signal ratio, below)
  edm[:<rho>]                        rho_t^(1/r) uniform, r = 7 by default (Karras et al. 2022)
  <path> or file:<path>              explicit times, whitespace separated, strictly decreasing
  auto[:<q>]                         equidistributes the measured local error of the order-q sampler
                                     on Gaussian data proxies (derive/_autogrid.py); q defaults to
                                     the ``order`` passed to make_grid, else the spec's tables order
  <kind>@<rho_s>                     (kind: uniform, quadratic, power, logsnr, edm) that grid on
                                     [t_min, t_s], rho(t_s) = rho_s (t_s = T if rho(T) <= rho_s): the
                                     start skip, derive/_start.py; the state at t_s is R_ts R_T^-1 u_T,
                                     i.e. the runtime's prior draw R_{t_0} z

rho_t for logsnr/edm: std_t / |mean_t| for scalar families; for k > 1 the geometric-mean
ratio det(Sigma_t)^(1/2k) / |det Psi(t,0)|^(1/k). With a per-coordinate basis it is taken at
coordinate p = 0 (the DC frequency of dct2d). rho must be increasing in t on [t_min, T].
"""

import math
import re
from pathlib import Path

import gmpy2
import numpy as np

from . import _hp
from ._errors import SpecError


def parse_kind(text, where="--grid"):
    """Normalise a grid name: returns (kind, parameter)."""
    if not isinstance(text, str) or not text:
        raise SpecError(where, "grid", "empty grid name")
    if text in ("uniform", "quadratic"):
        return ("power", 1.0 if text == "uniform" else 2.0)
    if text.startswith("power:"):
        try:
            kappa = float(text.split(":", 1)[1])
        except ValueError:
            kappa = float("nan")
        if not math.isfinite(kappa) or not 0.1 <= kappa <= 20:
            raise SpecError(where, "grid", f"power:<kappa> needs 0.1 <= kappa <= 20, got {text!r}")
        return ("power", kappa)
    if text == "logsnr":
        return ("logsnr", None)
    if text == "auto" or text.startswith("auto:"):
        if text == "auto":
            return ("auto", None)
        q = text.split(":", 1)[1]
        if q not in ("1", "2", "3", "4"):
            raise SpecError(where, "grid", f"auto:<q> needs an order q in 1..4, got {text!r}")
        return ("auto", int(q))
    if "@" in text and not Path(text).is_file():
        from ._start import parse_start
        base, rho_s = parse_start(text, where)
        return ("start", (rho_s, parse_kind(base, where)))
    if text == "edm" or text.startswith("edm:"):
        try:
            rho = float(text.split(":", 1)[1]) if ":" in text else 7.0
        except ValueError:
            rho = float("nan")
        if not math.isfinite(rho) or not 0.5 <= rho <= 50:
            raise SpecError(where, "grid", f"edm:<rho> needs 0.5 <= rho <= 50, got {text!r}")
        return ("edm", rho)
    path = text[5:] if text.startswith("file:") else text
    if Path(path).is_file():
        return ("file", path)
    if text.startswith("file:") or any(c in text for c in "/\\") or Path(text).suffix:
        raise SpecError(where, "grid", f"no such file of times: {path!r}")
    raise SpecError(where, "grid", f"unknown grid {text!r}: use uniform, quadratic, power:<kappa>, "
                                   "logsnr, edm[:<rho>], auto[:<q>], <kind>@<rho_s> or a file of times")


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")   # ASCII digits only
_FIELD_SPLIT = re.compile(r"\s*,\s*|\s+")


def read_times(path):
    """The times in a grid file: ASCII decimals separated by whitespace or single commas."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(path, "grid", f"cannot read times: {exc}") from None
    fields = _FIELD_SPLIT.split(text.strip()) if text.strip() else []
    for field in fields:
        if not _DECIMAL.fullmatch(field):
            raise SpecError(path, "grid", f"not a decimal number: {field[:40]!r} (write times as 0.5, 1e-3, "
                            "separated by spaces, newlines or single commas)")
    values = [float(v) for v in fields]
    if len(values) < 2:
        raise SpecError(path, "grid", f"needs at least two times (T first, t_min last), found {len(values)}")
    return values


def _check(times, where, t_min, T):
    if len(times) < 2:
        raise SpecError(where, "grid", "needs at least two times")
    for a, b in zip(times, times[1:]):
        if not math.isfinite(a) or not math.isfinite(b):
            raise SpecError(where, "grid", "times must be finite")
        if b == a:
            raise SpecError(where, "grid", f"repeated time {a!r} (zero-length step)")
        if b > a:
            raise SpecError(where, "grid", f"times must decrease strictly (sampling order), found {a!r} then {b!r}")
    if times[0] > float(T) or times[-1] < 0:
        raise SpecError(where, "grid", f"times must lie in [0, T = {float(T)!r}]")
    return times


def make_grid(kind, n_steps, deriv, where="--grid", order=None):
    """Float64 times [N+1], decreasing; N = n_steps (ignored for a file grid).

    order: the sampler's order, used by the auto grid only (``auto:<q>`` overrides it; neither
    given: order 3)."""
    kind_name, param = kind
    spec = deriv.spec
    T, t_min = float(_hp.mpf(spec.T)), float(_hp.mpf(spec.t_min))
    if kind_name == "file":
        times = _check(read_times(param), param, t_min, T)
        if times[-1] < t_min:                               # below the spec's t_min: is Sigma resolved there?
            deriv.check_noise_at(times[-1], "grid", param)
        return times
    if n_steps < 1:
        raise SpecError(where, "nfe", "needs at least one sampling step")
    if kind_name == "start":
        from ._start import start_grid
        return start_grid(param[1], param[0], n_steps, deriv, where)
    if kind_name == "auto":
        from ._autogrid import make_auto_grid
        q = param or order or 3                             # auto without a stated order: designed for q3
        return _check(make_auto_grid(deriv, n_steps, q), where, t_min, T)
    return named_times(kind_name, param, n_steps, deriv, where, T, _hp.mpf(spec.T))


def named_times(kind_name, param, n_steps, deriv, where, top, top_hp):
    """A power, logsnr or edm grid of n_steps steps on [t_min, top], checked (float64, decreasing).

    top: the first time (T, or the start skip's t_s, derive/_start.py); top_hp: its high-precision
    value for the power grid (the spec's exact T, not its float64 rounding)."""
    spec = deriv.spec
    t_min = float(_hp.mpf(spec.t_min))
    if kind_name == "power":
        kappa = gmpy2.mpfr(param)
        a = top_hp ** (1 / kappa)
        b = _hp.mpf(spec.t_min) ** (1 / kappa)
        times = [float((a + (b - a) * i / n_steps) ** kappa) for i in range(n_steps + 1)]
    else:
        lo, hi = _rho(deriv, np.array([_hp.mpf(t_min), _hp.mpf(top)], dtype=object))
        if not lo < hi:
            raise SpecError(where, "grid", f"{kind_name} grid needs a noise-to-signal ratio increasing in t")
        if kind_name == "logsnr":
            a, b = gmpy2.log(hi), gmpy2.log(lo)
            targets = [gmpy2.exp(a + (b - a) * i / n_steps) for i in range(n_steps + 1)]
        else:
            inv = 1 / gmpy2.mpfr(param)
            a, b = hi ** inv, lo ** inv
            targets = [(a + (b - a) * i / n_steps) ** gmpy2.mpfr(param) for i in range(n_steps + 1)]
        times = [top] + _invert(deriv, targets[1:-1], t_min, top) + [t_min]
    times[0], times[-1] = top, t_min
    times = _check(times, where, t_min, float(_hp.mpf(spec.T)))
    if kind_name in ("logsnr", "edm"):
        rho = _rho(deriv, _hp.array(times))
        if any(a <= b for a, b in zip(rho, rho[1:])):
            raise SpecError(where, "grid", f"{kind_name} grid: the noise-to-signal ratio is not monotone in t")
    return times


def _rho(deriv, tt):
    """Noise-to-signal ratio at coordinate 0 (see module docstring)."""
    k = deriv.k
    S = deriv.sigma(tt)[:, 0]
    D = deriv.data_to_state(tt)[:, 0]
    out = []
    for m in range(len(tt)):
        detS = _det(S[m])
        detD = abs(_det(D[m]))
        if detS <= 0 or detD == 0:
            raise SpecError(deriv.spec.path, "grid", "noise-to-signal ratio undefined (singular Sigma or Psi)")
        out.append(detS ** (1 / gmpy2.mpfr(2 * k)) / detD ** (1 / gmpy2.mpfr(k)))
    return out


def _det(A):
    import mpmath
    with mpmath.workprec(_hp.PREC_BITS):
        M = mpmath.matrix([[mpmath.mpf(str(v)) for v in row] for row in A.tolist()])
        return gmpy2.mpfr(str(mpmath.det(M)))


def _invert(deriv, targets, t_min, T):
    """Float64 times where rho(t) = target, by vectorised bisection (rho increasing)."""
    lo = [t_min] * len(targets)
    hi = [T] * len(targets)
    for _ in range(64):
        mid = [(a + b) / 2 for a, b in zip(lo, hi)]
        vals = _rho(deriv, _hp.array(mid))
        for i, (v, g) in enumerate(zip(vals, targets)):
            if v < g:
                lo[i] = mid[i]
            else:
                hi[i] = mid[i]
    return [float(np.nextafter(a, b)) if a == b else (a + b) / 2 for a, b in zip(lo, hi)]
