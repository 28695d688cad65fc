"""Hypothesis strategies for spec files across the whole spec language (README 'The spec language').

Every generated spec comes with what a correct toolkit must do with it:

- ``expect = "ok"``: a valid linear process by construction (positive diffusion where k = 1,
  positive-definite Sigma_0 where k > 1, marginal families with std/mean increasing); derive
  must exit 0 with tables that pass the fast check.
- ``expect = "bad"``: a defect put in on purpose (unknown name, reserved name, non-symmetric
  or indefinite Sigma_0, decreasing std/mean, ...); derive must exit 2 with one line.

Expressions are built as text with a guaranteed range on t in [0, T] (interval arithmetic,
conservative), so that every whitelisted function appears with an argument inside its domain:
sqrt exp log sin cos tan sinh cosh tanh atan asin acos expm1 log1p, plus the sqrt(x**2)
patterns that sympy rewrites to Abs (and whose derivatives hold sign). Names are drawn from a
pool that includes the derivation's internal names (r, s, B, ...) and the evaluators' argument
names, so that any capture shows up.
"""

import math
from fractions import Fraction

import yaml
from hypothesis import strategies as st

# Names a user may pick that are (or were) used inside derive/validation: the integration
# variables r and s, the expm argument B, evaluator parameters (expr, M, env), sympy-ish names.
INTERNAL_NAMES = ["r", "s", "B", "tau", "lam", "expr", "M", "env", "name", "kind", "I", "N", "S", "O", "Q",
                  "Psi", "Sigma", "R", "L", "F", "G", "D", "x0", "nan", "oo", "zoo"]
PLAIN_NAMES = ["x", "v", "y", "z", "u", "w", "a", "b", "c", "beta", "gamma", "sigma", "alpha", "mu",
               "eps", "kappa", "rho", "omega", "theta", "phase", "k2", "A1", "q_0"]
NAME_POOL = INTERNAL_NAMES + PLAIN_NAMES
BAD_NAMES = ["t", "pi", "E", "exp", "sqrt", "lambda", "for", "abs", "min", "1x", "x-y", "_a"]

FUNCTIONS = ["sqrt", "exp", "log", "sin", "cos", "tan", "sinh", "cosh", "tanh",
             "atan", "asin", "acos", "expm1", "log1p"]

# domain [lo, hi] each function's argument is mapped into, and a conservative image of [a, b]
_DOMAIN = {
    "sqrt": (0.25, 4), "exp": (-2, 2), "log": (0.5, 4), "sin": (-3, 3), "cos": (-3, 3),
    "tan": (-1, 1), "sinh": (-2, 2), "cosh": (-2, 2), "tanh": (-3, 3), "atan": (-3, 3),
    "asin": (-0.9, 0.9), "acos": (-0.9, 0.9), "expm1": (-2, 2), "log1p": (-0.5, 3),
}


def _image(fn, a, b):
    if fn in ("sin", "cos"):
        return -1.0, 1.0
    if fn == "cosh":
        return 1.0, math.cosh(max(abs(a), abs(b)))
    if fn == "acos":
        return math.acos(b), math.acos(a)
    f = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "tan": math.tan, "sinh": math.sinh,
         "tanh": math.tanh, "atan": math.atan, "asin": math.asin, "expm1": math.expm1,
         "log1p": math.log1p}[fn]
    return f(a), f(b)


def _widen(lo, hi):
    """Outward margin against float rounding in the interval arithmetic."""
    pad = 1e-9 * (1 + abs(lo) + abs(hi))
    return lo - pad, hi + pad


def _frac(x, den=16):
    return Fraction(x).limit_denominator(den)


def _num(q):
    """Fraction -> spec text ('3/4', '-2', '(-3/4)')."""
    q = Fraction(q)
    text = str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"
    return f"({text})" if q < 0 or q.denominator != 1 else text


class Ex:
    """An expression as spec text with a guaranteed range [lo, hi] for t in [0, T]."""

    def __init__(self, text, lo, hi):
        self.text, self.lo, self.hi = text, float(lo), float(hi)
        self.lo, self.hi = _widen(self.lo, self.hi)

    def __repr__(self):
        return f"Ex({self.text!r}, [{self.lo:.3g}, {self.hi:.3g}])"


def fit(ex, lo, hi):
    """``ex`` itself if its range lies in [lo, hi], else the affine image a*ex + b that does."""
    if lo <= ex.lo and ex.hi <= hi:
        return ex
    width = ex.hi - ex.lo
    mid = (lo + hi) / 2
    for shrink in (0.8, 0.5, 0.25, 0.1):
        # slope at most 4 (a near-constant expression is shifted, not magnified)
        a = min(_frac((hi - lo) / max(width, 1e-12) * shrink, 64), Fraction(4))
        if a == 0:
            a = Fraction(1, 64)
        b = _frac(mid - float(a) * (ex.lo + ex.hi) / 2, 64)
        nlo, nhi = float(a) * ex.lo + float(b), float(a) * ex.hi + float(b)
        if lo <= nlo and nhi <= hi:
            a_text = "" if a == 1 else f"{_num(a)} * "
            return Ex(f"{a_text}({ex.text}) + {_num(b)}", nlo, nhi)
    q = _frac(mid, 8)
    return Ex(_num(q), float(q), float(q))


@st.composite
def constants(draw, lo=-3, hi=3):
    q = draw(st.fractions(min_value=Fraction(lo), max_value=Fraction(hi), max_denominator=8))
    style = draw(st.sampled_from(["frac", "decimal", "frac"]))
    if style == "decimal" and q.denominator in (1, 2, 4, 5, 8):
        text = repr(float(q))                    # exact decimal (0.125, -2.5)
        return Ex(f"({text})" if q < 0 else text, q, q)
    return Ex(_num(q), q, q)


def leaves(T, env):
    """t, numbers, pi, E and the names defined so far (parameters / definitions)."""
    t = st.just(Ex("t", 0, T))
    options = [t, t, t, t, constants(), st.just(Ex("pi", math.pi, math.pi)), st.just(Ex("E", math.e, math.e))]
    if env:
        options.append(st.sampled_from(sorted(env.items())).map(lambda kv: Ex(kv[0], kv[1].lo, kv[1].hi)))
    return st.one_of(*options)


@st.composite
def expressions(draw, T, env=None, depth=2, fn=None):
    """A random expression of the whitelisted grammar with a known range on [0, T]."""
    env = env or {}
    if depth <= 0 or (fn is None and draw(st.integers(0, 3)) == 0):
        return draw(leaves(T, env))
    kind = "call" if fn is not None else draw(st.sampled_from(["call", "call", "binop", "pow", "abs"]))
    if kind == "call":
        name = fn or draw(st.sampled_from(FUNCTIONS))
        inner = draw(expressions(T, env, depth - 1))
        dlo, dhi = _DOMAIN[name]
        arg = fit(inner, dlo, dhi)
        lo, hi = _image(name, arg.lo, arg.hi)
        return Ex(f"{name}({arg.text})", lo, hi)
    if kind == "binop":
        a = draw(expressions(T, env, depth - 1))
        b = draw(expressions(T, env, depth - 1))
        op = draw(st.sampled_from("+-*/"))
        if op == "+":
            return Ex(f"{a.text} + {b.text}", a.lo + b.lo, a.hi + b.hi)
        if op == "-":
            return Ex(f"{a.text} - ({b.text})", a.lo - b.hi, a.hi - b.lo)
        a = fit(a, -3, 3)
        if op == "*":
            c = fit(b, -3, 3)
            p = [a.lo * c.lo, a.lo * c.hi, a.hi * c.lo, a.hi * c.hi]
            return Ex(f"({a.text}) * ({c.text})", min(p), max(p))
        c = fit(b, 0.5, 2)                        # divide by something in [1/2, 2]
        p = [a.lo / c.lo, a.lo / c.hi, a.hi / c.lo, a.hi / c.hi]
        return Ex(f"({a.text}) / ({c.text})", min(p), max(p))
    if kind == "pow":
        a = draw(expressions(T, env, depth - 1))
        n = draw(st.sampled_from(["2", "3", "-1", "1/2", "3/2", "0.5", "-2"]))
        if n in ("2",):
            a = fit(a, -2, 2)
            m = max(abs(a.lo), abs(a.hi))
            lo = 0.0 if a.lo <= 0 <= a.hi else min(a.lo ** 2, a.hi ** 2)
            return Ex(f"({a.text})**2", lo, m * m)
        if n == "3":
            a = fit(a, -2, 2)
            return Ex(f"({a.text})**3", a.lo ** 3, a.hi ** 3)
        a = fit(a, 0.5, 2)                        # negative and fractional powers of positives
        e = float(Fraction(n.replace("0.5", "1/2")))
        vals = [a.lo ** e, a.hi ** e]
        return Ex(f"({a.text})**{n if '/' not in n else '(' + n + ')'}", min(vals), max(vals))
    # 'abs': sqrt(x**2)-type rewriting (sympy turns it into Abs(x) for real x)
    a = fit(draw(expressions(T, env, depth - 1)), -2, 2)
    m = max(abs(a.lo), abs(a.hi))
    form = draw(st.sampled_from(["sqrt(({x})**2)", "(({x})**2)**(1/2)", "(({x})**4)**0.25"]))
    return Ex(form.format(x=a.text), 0.0, m)


def positive(ex, lo=0.25, hi=2.0):
    return fit(ex, lo, hi)


# Increasing functions of t with inc(0) = 0 (text builder taking the scale c, t in [0, 1])
INCREASING = {
    "t": lambda c: f"{c} * t",
    "t2": lambda c: f"{c} * t**2",
    "expm1": lambda c: f"expm1({c} * t)",
    "sinh": lambda c: f"sinh({c} * t)",
    "tan": lambda c: f"tan({c} * t / 2)",
    "log1p": lambda c: f"log1p({c} * t)",
    "atan": lambda c: f"atan({c} * t)",
    "tanh": lambda c: f"tanh({c} * t)",
    "asin": lambda c: f"asin(t / ({c} + 1))",
    "1-cos": lambda c: f"1 - cos(t / ({c} + 1))",
    "sqrt": lambda c: f"sqrt(1 + {c} * t) - 1",
    "log": lambda c: f"log(1 + {c} * t)",
    "exp": lambda c: f"exp({c} * t) - 1",
    "cosh": lambda c: f"cosh({c} * t) - 1",
    "acos": lambda c: f"acos(0) - acos(t / ({c} + 1))",
    "sin": lambda c: f"sin(t / ({c} + 1))",
}


@st.composite
def increasing(draw):
    """Text of a strictly increasing function of t on [0, 1] that vanishes at t = 0."""
    parts = draw(st.lists(st.sampled_from(sorted(INCREASING)), min_size=1, max_size=2, unique=True))
    terms = []
    for p in parts:
        c = draw(st.sampled_from(["1", "2", "1/2", "3/4", "1.5"]))
        w = draw(st.sampled_from(["1", "2", "1/3"]))
        terms.append(f"{w} * ({INCREASING[p](c)})")
    return " + ".join(terms)


def _names(draw, n, taken):
    out = []
    for _ in range(n):
        name = draw(st.sampled_from([x for x in NAME_POOL if x not in taken and x not in out]))
        out.append(name)
    return out


@st.composite
def params_and_defs(draw, T, taken):
    """Parameters (numbers) and definitions (expressions), with their ranges, in the env."""
    params, defs, env = {}, {}, {}
    for name in _names(draw, draw(st.integers(0, 2)), taken):
        c = draw(constants(-2, 2))
        params[name] = c.text.strip("()") if draw(st.booleans()) else c.text
        env[name] = c
    for name in _names(draw, draw(st.integers(0, 2)), taken | set(params)):
        ex = draw(expressions(T, dict(env), depth=2))
        defs[name] = ex.text
        env[name] = ex
    return params, defs, env


def _time(draw, need_positive_tmin):
    T = draw(st.sampled_from([Fraction(1), Fraction(1, 2), Fraction(4, 5)]))
    t_min = draw(st.sampled_from(["1e-3", "0.01", "1/20"] + ([] if need_positive_tmin else ["0"])))
    return T, {"t_min": t_min, "T": _num(T).strip("()")}


@st.composite
def table_options(draw, allow_snr=False):
    order = draw(st.integers(1, 3))
    nfe = draw(st.integers(max(order, 2), 5))
    grids = ["uniform", "quadratic", "power:1.5"] + (["logsnr", "edm"] if allow_snr else [])
    opts = {"nfe": [nfe], "order": order, "grid": draw(st.sampled_from(grids))}
    if draw(st.integers(0, 4)) == 0:
        opts["lam"] = draw(st.sampled_from(["1", "1/2", "0.25"]))
    if draw(st.integers(0, 4)) == 0:
        opts["corrector"] = True
    return opts


def _basis(draw, taken):
    if draw(st.integers(0, 2)) > 0:
        return None, None
    name = draw(st.sampled_from([x for x in NAME_POOL if x not in taken]))
    size = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    if size == [1, 1]:
        size = [2, 2]
    return {"kind": "dct2d", "frequency": name, "size": size}, name


def _spec_head(name, state, basis, params, defs):
    """The keys every generated spec starts with; optional sections only when drawn."""
    spec = {"name": name, "state": state}
    if basis:
        spec["basis"] = basis
    if params:
        spec["parameters"] = params
    if defs:
        spec["definitions"] = defs
    return spec


@st.composite
def scalar_sde(draw):
    """k = 1: du = F(t) u dt + G(t) dw with G^2 > 0 (optionally a dct2d basis)."""
    state = _names(draw, 1, set())
    basis, lam = _basis(draw, set(state))
    taken = set(state) | ({lam} if lam else set())
    sigma0 = draw(st.sampled_from([None, "1", "1/4", "0.04"]))
    T, time = _time(draw, sigma0 is None)
    params, defs, env = draw(params_and_defs(T, taken))
    drift = fit(draw(expressions(T, env, depth=2)), -2, 2).text
    g = positive(draw(expressions(T, env, depth=2)))
    diffusion = draw(st.sampled_from(["{g}", "sqrt({g})", "-({g})", "sqrt(1/4 + ({h})**2)"])).format(
        g=g.text, h=fit(draw(expressions(T, env, depth=1)), -2, 2).text)
    if lam:   # frequency-dependent drift and noise; lam = 0 (DC) is one of the coordinates
        drift = f"-({draw(st.sampled_from(['1', '1/4', '1/10']))}) * {lam} + ({drift})"
        diffusion = f"({diffusion}) * sqrt(1 + {lam} / 10)"
    spec = _spec_head("gen_scalar", state, basis, params, defs)
    spec.update({"drift": [[drift]], "diffusion": [[diffusion]]})
    if sigma0 is not None:
        spec["initial_covariance"] = [[sigma0]]
    spec["time"] = time
    spec["tables"] = draw(table_options())
    return spec


@st.composite
def marginal(draw):
    """Scalar marginal families: std/mean strictly increasing, mean > 0."""
    state = _names(draw, 1, set())
    basis, lam = _basis(draw, set(state))
    taken = set(state) | ({lam} if lam else set())
    family = draw(st.sampled_from(["general", "vp", "vp_cosine_sqrt", "ve", "heat"] if lam else
                                  ["general", "vp", "vp_cosine_sqrt", "ve"]))
    T, time = _time(draw, True)
    params, defs, env = draw(params_and_defs(T, taken))
    inc = draw(increasing())
    if family == "general":               # std = mean sqrt(v), v increasing, mean any positive
        mean = positive(draw(expressions(T, env, depth=2)), 0.5, 2).text
        v0 = draw(st.sampled_from(["0", "1/100", "1"]))
        std = f"({mean}) * sqrt({v0} + {inc})"
    elif family == "vp":                  # mean decreasing in (0, 1], std = sqrt(1 - mean^2)
        mean = f"exp(-({inc}))"
        std = f"sqrt(1 - ({mean})**2)"
    elif family == "vp_cosine_sqrt":      # alpha_bar = cos^2: sqrt(alpha_bar) becomes Abs(cos(..))
        s0 = draw(st.sampled_from(["0.008", "1/10", "0.2"]))
        ab = f"cos(pi / 2 * (t + {s0}) / (1 + {s0}))**2 / cos(pi / 2 * {s0} / (1 + {s0}))**2"
        mean = f"sqrt({ab})"
        std = f"sqrt(1 - {ab})"
        if T == 1:
            time["T"] = "0.99"
    elif family == "ve":
        mean = "1"
        std = f"sqrt({draw(st.sampled_from(['0', '1/100']))} + {inc})"
    else:                                 # inverse heat dissipation: DC has zero drift and noise
        tau = draw(increasing())
        mean = f"exp(-{lam} * ({tau}))"
        std = draw(st.sampled_from(["1/100", "0.1", "1"]))
    if lam and family not in ("heat",):   # blur-like per-frequency factor, decreasing in t
        mean = f"({mean}) * ({draw(st.sampled_from(['exp(-' + lam + ' * t)', '(1 + ' + lam + ' * t)**(-1)', '1']))})"
        if family in ("vp", "vp_cosine_sqrt", "ve"):   # keep std/mean increasing: std scales too
            std = f"({std}) * sqrt(1 + {lam})"
    spec = _spec_head("gen_marginal", state, basis, params, defs)
    spec["marginal"] = {"mean": mean, "std": std}
    spec["time"] = time
    spec["tables"] = draw(table_options(allow_snr=family != "heat"))
    return spec


def _pd_matrix(draw, k):
    """Exact symmetric positive-definite k x k (diagonally dominant), as spec text rows."""
    diag = [Fraction(draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 4, 10]))) for _ in range(k)]
    M = [[Fraction(0)] * k for _ in range(k)]
    for i in range(k):
        M[i][i] = diag[i]
    for i in range(k):
        for j in range(i + 1, k):
            if draw(st.booleans()):
                bound = min(diag[i], diag[j]) / (2 * k)
                v = Fraction(draw(st.integers(-4, 4)), 4) * bound
                M[i][j] = M[j][i] = v
    return M


@st.composite
def matrix_sde(draw, max_k=6):
    """k = 2..max_k: F(t) = f(t) A or entrywise, G k x m, Sigma_0 positive definite, R0 choice."""
    k = draw(st.integers(2, max_k))
    state = _names(draw, k, set())
    basis, lam = _basis(draw, set(state))
    taken = set(state) | ({lam} if lam else set())
    T, time = _time(draw, False)
    params, defs, env = draw(params_and_defs(T, taken))
    structure = draw(st.sampled_from(["scaled", "entrywise", "constant", "diagonal"]))
    f = positive(draw(expressions(T, env, depth=1)), 0.25, 2).text
    A = [[Fraction(draw(st.integers(-4, 4)), 4) for _ in range(k)] for _ in range(k)]
    drift = []
    for i in range(k):
        row = []
        for j in range(k):
            a = A[i][j]
            if structure == "diagonal" and i != j:
                row.append("0")
            elif structure == "constant":
                row.append(_num(a))
            elif structure == "scaled":
                row.append(f"{_num(a)} * ({f})")
            else:
                if a == 0:
                    row.append("0")
                else:
                    row.append(fit(draw(expressions(T, env, depth=1)), -1, 1).text)
        drift.append(row)
    if lam:
        drift[0][0] = f"{drift[0][0]} - {lam} / 4"
    m = draw(st.integers(1, k))
    diffusion = []
    for i in range(k):
        row = []
        for j in range(m):
            if draw(st.integers(0, 2)) == 0:
                row.append("0")
            else:
                row.append(fit(draw(expressions(T, env, depth=1)), -1, 1).text)
        diffusion.append(row)
    S = _pd_matrix(draw, k)
    spec = _spec_head("gen_matrix", state, basis, params, defs)
    spec.update({"drift": drift, "diffusion": diffusion,
                 "initial_covariance": [[_num(x).strip("()") if x >= 0 else _num(x) for x in row] for row in S]})
    R0 = draw(st.sampled_from(["sqrtm", "cholesky", None]))
    if R0:
        spec["R0"] = R0
    spec["time"] = time
    opts = draw(table_options())
    if k > 3:                                  # keep the numerical R ODE quick
        opts["nfe"] = [min(opts["nfe"][0], 3)]
        opts["order"] = min(opts["order"], opts["nfe"][0])
    spec["tables"] = opts
    return spec


# ----- defects that must be refused with exit 2 and one line ------------------------------

def _mutations(spec):
    out = []
    if "drift" in spec:
        out.append(("unknown name", lambda s: s["drift"][0].__setitem__(0, "nosuchname * t")))
        out.append(("call not allowed", lambda s: s["drift"][0].__setitem__(0, "Abs(t)")))
        out.append(("syntax", lambda s: s["drift"][0].__setitem__(0, "t +* 2")))
        out.append(("drift not square", lambda s: s["drift"][0].append("1")))
    if "marginal" in spec:
        out.append(("std decreasing", lambda s: s["marginal"].__setitem__("std", "exp(-t) * (" + s["marginal"]["mean"] + ")")))
        out.append(("mean zero", lambda s: s["marginal"].__setitem__("mean", "0")))
    if len(spec.get("initial_covariance", [])) > 1:
        out.append(("Sigma0 not symmetric", lambda s: s["initial_covariance"][0].__setitem__(1, "1/7")))
        out.append(("Sigma0 indefinite", lambda s: s["initial_covariance"][0].__setitem__(0, "-1")))
    out.append(("reserved name", lambda s: s["state"].__setitem__(0, BAD_NAMES[len(s["state"]) % len(BAD_NAMES)])))
    out.append(("unknown key", lambda s: s.__setitem__("drfit", [["0"]])))
    out.append(("T not after t_min", lambda s: s["time"].__setitem__("T", s["time"]["t_min"])))
    out.append(("bad order", lambda s: s["tables"].__setitem__("order", 7)))
    return out


@st.composite
def bad_specs(draw, max_k=6):
    spec = draw(st.one_of(scalar_sde(), marginal(), matrix_sde(max_k)))
    muts = _mutations(spec)
    what, apply = draw(st.sampled_from(muts))
    apply(spec)
    return what, spec


@st.composite
def any_spec(draw, max_k=6):
    """(expect, label, spec dict): mostly valid processes, some deliberately broken ones."""
    choice = draw(st.sampled_from(["scalar", "scalar", "marginal", "marginal", "matrix", "matrix", "bad", "bad"]))
    if choice == "bad":
        what, spec = draw(bad_specs(max_k))
        return "bad", what, spec
    spec = draw(scalar_sde() if choice == "scalar" else marginal() if choice == "marginal" else matrix_sde(max_k))
    return "ok", choice, spec


def dump(spec):
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=200)
