"""The spec language: YAML file -> validated ``Spec`` with exact sympy content.

This is the only module that reads YAML or expressions. Numbers are exact: YAML decimals are
kept as their source text and turned into rationals (0.04 -> 1/25), never into floats.
"""

import dataclasses
import difflib
import hashlib
import json
import re
from pathlib import Path

import sympy as sp
import yaml

from ._errors import SpecError
from ._expr import MAX_LITERAL, ExprError, check_name, exact_number, parse

t = sp.Symbol("t", real=True, nonnegative=True)

TOP_KEYS = {
    "name", "description", "state", "parameters", "definitions", "drift", "diffusion",
    "initial_covariance", "marginal", "basis", "R0", "time", "tables",
}
REQUIRED = {"name", "time"}
TABLE_KEYS = {"nfe", "order", "grid", "denoise", "corrector", "lam"}
MAX_STATE = 6
MAX_COORDS = 1 << 16
NAME_RE = re.compile(r"^[a-z0-9_]+$")


@dataclasses.dataclass(frozen=True)
class Basis:
    kind: str = "identity"          # 'identity' or 'dct2d'
    symbol: sp.Symbol = None        # per-coordinate parameter (dct2d: the frequency)
    size: tuple = ()                # (H, W) for dct2d

    @property
    def n_coords(self):
        return self.size[0] * self.size[1] if self.kind == "dct2d" else 1

    def values(self):
        """Exact per-coordinate values of the symbol, row-major in (i, j): p = i * W + j."""
        if self.kind != "dct2d":
            return [None]
        H, W = self.size
        return [(sp.pi * i / H) ** 2 + (sp.pi * j / W) ** 2 for i in range(H) for j in range(W)]


@dataclasses.dataclass(frozen=True)
class TableDefaults:
    """A spec's default tables. order "auto": per NFE what ``_autogrid.recommend`` picks (order, grid,
    variable, form, corrector); grid None: the recommendation's grid, or quadratic for an integer order."""
    nfe: tuple = (10, 20, 50)
    order: int | str = "auto"
    grid: str | None = None
    denoise: bool = True
    corrector: bool = False
    lam: tuple = ()


@dataclasses.dataclass(frozen=True)
class Spec:
    """A linear SDE du = F(t) u dt + G(t) dw per data coordinate (MATH.md section 1)."""
    path: str
    name: str
    description: str
    state: tuple
    form: str                       # 'sde' or 'marginal'
    F: sp.Matrix                    # k x k, in t (and basis symbol)
    G: sp.Matrix                    # k x m
    Sigma0: sp.Matrix               # k x k
    mean: sp.Expr                   # marginal form only: data-to-state coefficient m_t
    std: sp.Expr                    # marginal form only
    basis: Basis
    R0: object                      # 'sqrtm', 'cholesky' or an exact sp.Matrix
    t_min: sp.Rational
    T: sp.Rational
    tables: TableDefaults
    normalized: dict                # canonical content (written next to the coefficients)
    sha256: str

    @property
    def k(self):
        return self.F.shape[0]

    @property
    def symbols(self):
        return (t,) if self.basis.symbol is None else (t, self.basis.symbol)


class _Decimal(str):
    """A YAML float kept as its source text so that it can be read exactly."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with exact decimals and no duplicate keys, and without aliases: ``*name`` shares a
    node, so a few hundred bytes of nested aliases expand to 10^9 entries when the spec is read."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported in a spec",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _construct_float(loader, node):
    return _Decimal(loader.construct_scalar(node))


def _construct_int(loader, node):
    """YAML ints as PyYAML reads them, but none longer than MAX_LITERAL characters (a 5000-digit one
    failed Python's int <-> str limit deep inside the hashing)."""
    text = loader.construct_scalar(node)
    if len(text) > MAX_LITERAL:
        raise yaml.constructor.ConstructorError(None, None, f"number longer than {MAX_LITERAL} characters",
                                                node.start_mark)
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    if not re.fullmatch(r"[-+]?(0|[1-9][0-9_]*)", text):
        # YAML 1.1 reads 020 as octal 16, 1:20 as base 60 (80), 0b10100 and 0x14 as 20: a spec number means
        # what it says in decimal, so the other forms are refused instead of silently changing the process
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} would be read by YAML 1.1 as {value} (octal, "
                                                "base 60, binary or hex): write the number in decimal",
                                                node.start_mark)
    return value


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:    # [a, b]: unhashable, an internal error
            raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, got a {type(key).__name__}",
                                                    key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec(path):
    """Read and validate a spec file; raise SpecError (file: key: problem) on any defect."""
    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(where, "file", f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > 1 << 20:
        raise SpecError(where, "file", "larger than 1 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(where, "file", "not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(where, "yaml", f"{problem}{at}") from None
    except RecursionError:
        raise SpecError(where, "yaml", "nested too deeply") from None
    if data is None:
        raise SpecError(where, "file", "empty spec")
    if not isinstance(data, dict):
        raise SpecError(where, "file", f"top level must be a mapping, found {type(data).__name__}")
    return build_spec(data, where)


def _near(key, options):
    close = difflib.get_close_matches(str(key), sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data, allowed, where, prefix, required=()):
    for key in data:
        if not isinstance(key, str) or key not in allowed:
            raise SpecError(where, f"{prefix}{key}", f"unknown key{_near(key, allowed)}")
    for key in required:
        if key not in data:
            raise SpecError(where, f"{prefix}{key}", "missing")


def _number(value, where, key, names=None):
    """Exact real number from an int, YAML decimal or expression string."""
    if isinstance(value, bool) or value is None:
        raise SpecError(where, key, f"expected a number, got {value!r}")
    try:
        if isinstance(value, _Decimal):
            x = exact_number(str(value))
        elif isinstance(value, (int, str)):
            x = parse(value, names or {})
        else:
            raise ExprError(f"expected a number, got {type(value).__name__}")
    except ExprError as exc:
        raise SpecError(where, key, str(exc)) from None
    if not x.is_number or x.free_symbols:
        raise SpecError(where, key, f"{value!r} is not a constant")
    if not x.is_real or x.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
        raise SpecError(where, key, f"{value!r} is not a finite real number")
    return x


def _expression(value, where, key, names):
    if isinstance(value, _Decimal):
        value = str(value)
    try:
        expr = parse(value, names)
    except ExprError as exc:
        raise SpecError(where, key, str(exc)) from None
    if expr.has(sp.zoo, sp.oo, -sp.oo, sp.nan, sp.I) or any(   # (-8)**(1/3) is 2 (-1)**(1/3): complex, no I in it
            p.is_Pow and p.base.is_number and p.base.is_negative and not p.exp.is_integer
            for p in sp.preorder_traversal(expr)):
        raise SpecError(where, key, f"{value!r} is not finite and real")
    return expr


def _matrix(value, where, key, names, rows=None, cols=None):
    if not isinstance(value, list) or not value or not all(isinstance(r, list) and r for r in value):
        raise SpecError(where, key, "expected a non-empty list of rows, e.g. [[a, b], [c, d]]")
    width = len(value[0])
    if any(len(r) != width for r in value):
        raise SpecError(where, key, "rows have different lengths")
    if rows is not None and len(value) != rows:
        raise SpecError(where, key, f"has {len(value)} rows, expected {rows} (one per state component)")
    if cols is not None and width != cols:
        raise SpecError(where, key, f"has {width} columns, expected {cols}")
    entries = [[_expression(v, where, f"{key}[{i}][{j}]", names) for j, v in enumerate(r)]
               for i, r in enumerate(value)]
    return sp.Matrix(entries)


def _canonical(value, where, key=""):
    """Plain-data copy of the YAML content with numbers as exact text (for hashing / writing); a
    number that is not one (.inf, .nan) is a SpecError naming its key."""
    if isinstance(value, dict):
        return {str(k): _canonical(v, where, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, _Decimal):
        try:
            exact = exact_number(str(value))
        except ExprError as exc:
            raise SpecError(where, key or "number", str(exc)) from None
        return int(exact) if exact.is_Integer else str(exact)     # 20.0 and 2e1 hash as 20 does
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)


def build_spec(data, where="<spec>"):
    """Validate the parsed YAML mapping ``data`` and build a Spec (one helper per section, in
    the order the errors are reported)."""
    _check_keys(data, TOP_KEYS, where, "", REQUIRED)
    normalized = _canonical(data, where)
    name, description = _name(data, where)
    claim = _NameClaims(where)
    state = _state(data, where, claim)
    basis = _basis(data.get("basis"), where, claim)
    names = {} if basis.symbol is None else {basis.symbol.name: basis.symbol}
    _parameters(data, where, claim, names)
    names["t"] = t
    _definitions(data, where, claim, names)
    t_min, T = _time(data, where)
    if "marginal" in data:
        form, (F, G, Sigma0, mean, std) = "marginal", _marginal(data, where, state, names, basis, t_min, T)
    else:
        form, (F, G, Sigma0), mean, std = "sde", _sde(data, where, state, names), None, None
    _check_dynamics(where, form, F, G, Sigma0, mean, std)
    _check_continuous(where, form, F, G, mean, std, basis, t_min, T)
    _check_sigma0(Sigma0, basis, where, t_min)
    R0 = _R0(data.get("R0", "sqrtm"), Sigma0, where, names)
    tables = _tables(data.get("tables", {}), where)
    digest = hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()
    return Spec(path=where, name=name, description=description.strip(), state=tuple(state), form=form,
                F=F, G=G, Sigma0=Sigma0, mean=mean, std=std, basis=basis, R0=R0, t_min=t_min, T=T,
                tables=tables, normalized=normalized, sha256=digest)


def _name(data, where):
    """``name`` and ``description``."""
    name = data["name"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > 64:
        raise SpecError(where, "name", f"{name!r} must match [a-z0-9_]+ (at most 64 characters)")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(where, "description", "must be a string")
    return name, description


class _NameClaims:
    """The spec's names (state components, parameters, definitions, basis symbol): each safe and
    used once; calling ``claim(name, key)`` records that ``key`` defines ``name``."""

    def __init__(self, where):
        self.where, self.used = where, {}

    def __call__(self, n, key):
        try:
            check_name(n)
        except ExprError as exc:
            raise SpecError(self.where, key, str(exc)) from None
        if n in self.used:
            raise SpecError(self.where, key, f"name {n!r} already used by {self.used[n]}")
        self.used[n] = key


def _state(data, where, claim):
    """``state``: the component names (default one component, x)."""
    state = data.get("state", ["x"])
    if not isinstance(state, list) or not state or len(state) > MAX_STATE:
        raise SpecError(where, "state", f"expected a list of 1 to {MAX_STATE} component names")
    for i, s in enumerate(state):
        claim(s, f"state[{i}]")
    return state


def _parameters(data, where, claim, names):
    """``parameters``: exact numbers, each may use the ones before it; added to ``names``."""
    params = data.get("parameters", {}) or {}
    if not isinstance(params, dict):
        raise SpecError(where, "parameters", "must be a mapping name: value")
    for pname, pvalue in params.items():
        claim(pname, f"parameters.{pname}")
        names[pname] = _number(pvalue, where, f"parameters.{pname}", dict(names))


def _definitions(data, where, claim, names):
    """``definitions``: expressions in t and the names before them; added to ``names``."""
    defs = data.get("definitions", {}) or {}
    if not isinstance(defs, dict):
        raise SpecError(where, "definitions", "must be a mapping name: expression")
    for dname, dvalue in defs.items():
        claim(dname, f"definitions.{dname}")
        names[dname] = _expression(dvalue, where, f"definitions.{dname}", names)


def _time(data, where):
    """``time``: (t_min, T) exact, 0 <= t_min < T."""
    time = data["time"]
    if not isinstance(time, dict):
        raise SpecError(where, "time", "must be a mapping {t_min: ..., T: ...}")
    _check_keys(time, {"t_min", "T"}, where, "time.", ("t_min", "T"))
    t_min = _number(time["t_min"], where, "time.t_min")
    T = _number(time["T"], where, "time.T")
    if t_min < 0:
        raise SpecError(where, "time.t_min", f"must be >= 0, got {t_min}")
    if T <= t_min:
        raise SpecError(where, "time.T", f"T = {T} must be greater than t_min = {t_min}")
    return t_min, T


def _marginal(data, where, state, names, basis, t_min, T):
    """``marginal: {mean, std}`` (scalar family) -> (F, G, Sigma0, mean, std):
    F = d log mean / dt, G^2 = d std^2 / dt - 2 F std^2, Sigma0 = std(0)^2."""
    for key in ("drift", "diffusion", "initial_covariance"):
        if key in data:
            raise SpecError(where, key, "not allowed together with 'marginal' (F, G, Sigma_0 follow from it)")
    if len(state) != 1:
        raise SpecError(where, "marginal", "the marginal form is scalar: state must have one component")
    marg = data["marginal"]
    if not isinstance(marg, dict):
        raise SpecError(where, "marginal", "must be a mapping {mean: ..., std: ...}")
    _check_keys(marg, {"mean", "std"}, where, "marginal.", ("mean", "std"))
    mean = _expression(marg["mean"], where, "marginal.mean", names)
    std = _expression(marg["std"], where, "marginal.std", names)
    if mean.is_zero:
        raise SpecError(where, "marginal.mean", "must not be zero (Psi(t, s) = mean_t / mean_s)")
    if std.is_zero:
        raise SpecError(where, "marginal.std", "must not be zero (Sigma_t = std_t^2 must be positive for t > 0)")
    std0 = std.subs(t, 0)
    if std0.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        raise SpecError(where, "marginal.std", f"not defined at t = 0 (it evaluates to {std0}; Sigma_0 = std(0)^2): "
                        "write it in a form that is finite at t = 0 (limits are not taken)")
    if std0.is_real is False or (std0.is_number and sp.N(std0, 30).as_real_imag()[1] != 0):
        raise SpecError(where, "marginal.std", f"not a real number at t = 0 (std(0) = {std0})")
    f = sp.diff(mean, t) / mean
    dstd2, drift_part = sp.diff(std ** 2, t), 2 * f * std ** 2
    g2 = dstd2 - drift_part
    _check_marginal(where, (mean, std), g2, dstd2, drift_part, basis, t_min, T)
    return sp.Matrix([[f]]), sp.Matrix([[sp.sqrt(g2)]]), sp.Matrix([[std.subs(t, 0) ** 2]]), mean, std


def _sde(data, where, state, names):
    """``drift``, ``diffusion``, ``initial_covariance`` -> (F [k, k], G [k, m], Sigma0 [k, k])."""
    for key in ("drift", "diffusion"):
        if key not in data:
            raise SpecError(where, key, "missing (or give 'marginal: {mean, std}' for a scalar family)")
    k = len(state)
    F = _matrix(data["drift"], where, "drift", names)
    if F.shape[0] != F.shape[1]:
        raise SpecError(where, "drift", f"must be square, got {F.shape[0]} x {F.shape[1]}")
    if F.shape[0] != k:
        raise SpecError(where, "drift", f"is {F.shape[0]} x {F.shape[1]} but state has {k} components")
    G = _matrix(data["diffusion"], where, "diffusion", names, rows=k)
    if "initial_covariance" in data:
        Sigma0 = _matrix(data["initial_covariance"], where, "initial_covariance", names, rows=k, cols=k)
    elif k == 1:
        Sigma0 = sp.zeros(1, 1)
    else:
        raise SpecError(where, "initial_covariance", "missing (required when the state has more than one component)")
    if Sigma0.has(t):
        raise SpecError(where, "initial_covariance", "must not depend on t")
    return F, G, Sigma0


def _check_dynamics(where, form, F, G, Sigma0, mean, std):
    """Every entry of the dynamics is evaluable after sympy's rewriting (``_check_evaluable``), named by its key."""
    if form == "marginal":
        _check_evaluable(where, [("marginal.mean", mean), ("marginal.mean (its log-derivative, the drift F)", F[0, 0]),
                                 ("marginal.std", std), ("marginal.std (the diffusion G)", G[0, 0])])
    else:
        _check_evaluable(where, [(f"{key}[{i}][{j}]", M[i, j]) for key, M in
                                 (("drift", F), ("diffusion", G), ("initial_covariance", Sigma0))
                                 for i in range(M.shape[0]) for j in range(M.shape[1])])


SCAN_POINTS = 512            # intervals of [t_min, T] on which _check_continuous evaluates
SCAN_CONDITIONS = 64        # sub-expressions checked per coefficient (a hostile spec has up to MAX_NODES)


def _conditions(expr):
    """(kind, argument) for each sub-expression of ``expr`` in t that is only defined under a condition:
    "pole" (a denominator, tan's cosine: no zero), "root" (a fractional power's base: >= 0), "log" (> 0),
    "unit" (asin, acos: within [-1, 1])."""
    out = []
    for node in sp.preorder_traversal(expr):
        if len(out) >= SCAN_CONDITIONS or not getattr(node, "free_symbols", None) or t not in node.free_symbols:
            continue
        if node.is_Pow and node.exp.is_number:
            if node.exp.is_negative:
                out.append(("pole", node.base))
            if not node.exp.is_integer:
                out.append(("root", node.base))
        elif isinstance(node, sp.log):
            out.append(("log", node.args[0]))
        elif isinstance(node, (sp.asin, sp.acos)):
            out.append(("unit", node.args[0]))
        elif isinstance(node, sp.tan):
            out.append(("pole", sp.cos(node.args[0])))
    return out


def _violation(kind, v):
    """Index of the first sample (or interval) of ``v`` breaking ``kind``'s condition, or None."""
    for i, x in enumerate(v):
        if x != x or (kind == "root" and x < 0) or (kind == "log" and x <= 0) or (kind == "unit" and abs(x) > 1) \
                or (kind == "pole" and (x == 0 or (i and (x > 0) != (v[i - 1] > 0)))):
            return i
    return None


def _check_continuous(where, form, F, G, mean, std, basis, t_min, T):
    """Every coefficient is real and continuous on [t_min, T]: each sub-expression defined only under a
    condition (``_conditions``) is evaluated (MPFR) at SCAN_POINTS + 1 times and must keep it; a denominator
    changing sign has a zero between (a pole). A pole inside, -beta / (t - 1/2), sent the Sigma ODE into
    ever smaller panels for minutes; log(t - 2) was found only where an evaluation met it. A basis symbol
    is set to the ends of its spectrum. (sympy's continuous_domain decides more, but took 118 s on
    sqrt(1 - exp(4 acos(t/3) - 2 pi)); this scan is linear in the expression.)"""
    from ._hp import Unsupported, compile_expr, mpf
    import numpy as np
    times = np.array([mpf(t_min + (T - t_min) * sp.Rational(k, SCAN_POINTS)) for k in range(SCAN_POINTS + 1)],
                     dtype=object)
    if form == "marginal":
        items = [("marginal.mean", mean), ("marginal.std", std), ("marginal.mean (its log-derivative, the drift F)",
                                                                 F[0, 0])]
    else:
        items = [(f"{key}[{i}][{j}]", M[i, j]) for key, M in (("drift", F), ("diffusion", G))
                 for i in range(M.shape[0]) for j in range(M.shape[1])]
    values = _probe_values(basis)
    values = [None] if values == [None] else [values[0], values[-1]]
    what = {"pole": "a denominator is zero (a pole)", "root": "a root of a negative number",
            "log": "the log of a number <= 0", "unit": "asin / acos of a number outside [-1, 1]"}
    for key, expr in items:
        for value in values:
            e = expr if value is None else expr.subs(basis.symbol, value)
            for kind, arg in _conditions(e):
                try:
                    v = np.broadcast_to(np.asarray(compile_expr(arg)({"t": times}), dtype=object), times.shape)
                except (Unsupported, ArithmeticError, ValueError, TypeError):
                    continue
                i = _violation(kind, v)
                if i is not None:
                    at = "" if value is None else f", {basis.symbol.name} = {sp.N(value, 6)}"
                    near = f"at t = {float(times[i]):.6g}" if kind != "pole" or v[i] == 0 else \
                        f"between t = {float(times[i - 1]):.6g} and {float(times[i]):.6g}"
                    raise SpecError(where, key, f"is not real and continuous on [t_min, T]: {what[kind]} {near}{at} "
                                    f"({arg}); the process must be smooth where it runs")


def _basis(value, where, claim):
    if value is None:
        return Basis()
    if not isinstance(value, dict):
        raise SpecError(where, "basis", "must be a mapping {kind: identity | dct2d, ...}")
    _check_keys(value, {"kind", "frequency", "size"}, where, "basis.", ("kind",))
    kind = value["kind"]
    if kind == "identity":
        if len(value) > 1:
            raise SpecError(where, "basis", "kind identity takes no other keys")
        return Basis()
    if kind != "dct2d":
        raise SpecError(where, "basis.kind", f"unknown kind {kind!r}{_near(kind, {'identity', 'dct2d'})}")
    for key in ("frequency", "size"):
        if key not in value:
            raise SpecError(where, f"basis.{key}", "missing (required for kind dct2d)")
    claim(value["frequency"], "basis.frequency")
    size = value["size"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)):
        raise SpecError(where, "basis.size", "expected [H, W] with positive integers")
    if size[0] * size[1] > MAX_COORDS:
        raise SpecError(where, "basis.size", f"H * W must be at most {MAX_COORDS}")
    return Basis("dct2d", sp.Symbol(value["frequency"], real=True, nonnegative=True), tuple(size))


def _probe_values(basis):
    values = sorted(set(basis.values()), key=lambda e: float(e)) if basis.symbol is not None else [None]
    if len(values) > 64:
        values = values[:16] + values[16:-16:max(1, len(values) // 32)] + values[-16:]
    return values


def _check_marginal(where, mean_std, g2, dstd2, drift_part, basis, t_min, T):
    """A marginal family is a forward diffusion only if mean and std are real, std/mean does not
    decrease (G^2 >= 0) and mean does not vanish; probed on a grid of [t_min, T] at (a sample of)
    every coordinate."""
    from ._hp import Unsupported, compile_expr, mpf
    import numpy as np
    mean, std = mean_std
    try:
        fm, fs, fg, fa, fb = (compile_expr(e) for e in (mean, std, g2, dstd2, drift_part))
    except Unsupported:
        return                                 # _check_evaluable names the function
    times = np.array([mpf(t_min + (T - t_min) * sp.Rational(k, 8)) for k in range(9)], dtype=object)
    for value in _probe_values(basis):
        env = {"t": times}
        if basis.symbol is not None:
            env[basis.symbol.name] = compile_expr(value)({})
        m = np.broadcast_to(np.asarray(fm(env), dtype=object), times.shape)
        sd = np.broadcast_to(np.asarray(fs(env), dtype=object), times.shape)
        g = np.broadcast_to(np.asarray(fg(env), dtype=object), times.shape)
        scale = (np.broadcast_to(np.asarray(fa(env), dtype=object), times.shape),
                 np.broadcast_to(np.asarray(fb(env), dtype=object), times.shape))
        at = "" if basis.symbol is None else f" ({basis.symbol.name} = {sp.N(value, 6)})"
        for i, tv in enumerate(times):
            for key, v in (("marginal.mean", m[i]), ("marginal.std", sd[i])):
                if v != v:                     # MPFR: nan for the root or log of a negative number
                    raise SpecError(where, key, f"not a real number at t = {float(tv):.6g}{at}")
            if m[i] == 0:
                raise SpecError(where, "marginal.mean", f"is zero at t = {float(tv):.6g}{at} (Psi = mean_t / mean_s)")
            size = abs(scale[0][i]) + abs(scale[1][i])
            if g[i] == g[i] and abs(g[i]) != float("inf") and g[i] < -1e-30 * size:
                raise SpecError(where, "marginal.std", f"std/mean decreases at t = {float(tv):.6g}{at}: "
                                f"G^2 = d std^2/dt - 2 F std^2 = {float(g[i]):.3g} < 0 (not a forward diffusion)")


def _check_evaluable(where, items):
    """Every function sympy left in the spec's expressions is in the evaluators' table.

    sympy rewrites on its own (sqrt(x**2) -> Abs(x), d|x|/dt -> sign(x) x'); what comes out
    must be evaluable by derive (derive/_hp.py FUNCS) and by validation (the same set), else
    one line here, before anything runs.
    """
    from ._hp import Unsupported, compile_expr
    for key, expr in items:
        try:
            compile_expr(expr)
        except Unsupported as exc:
            raise SpecError(where, key, f"cannot be evaluated after sympy's rewriting: {exc}") from None


def _positive_definite(S):
    """Sylvester's criterion on a numeric symmetric matrix (exact where the entries are)."""
    return all(sp.N(S[:i, :i].det(), 50) > 0 for i in range(1, S.shape[0] + 1))


def _check_sigma0(Sigma0, basis, where, t_min):
    k = Sigma0.shape[0]
    if not (Sigma0 - Sigma0.T).applyfunc(sp.simplify).is_zero_matrix:
        raise SpecError(where, "initial_covariance", "must be symmetric")
    samples = [Sigma0] if basis.symbol is None else [
        Sigma0.subs(basis.symbol, v) for v in sorted(set(basis.values()), key=lambda e: float(e))]
    if len(samples) > 64:    # a large basis: check both ends of the spectrum and a stride inside
        samples = samples[:16] + samples[16:-16:max(1, len(samples) // 32)] + samples[-16:]
    singular = False
    for S in samples:
        if k > 1:
            if not _positive_definite(S) and sp.N(S.det(), 50) == 0:
                raise SpecError(where, "initial_covariance", "singular Sigma_0 is not supported for k > 1: Sigma_0^-1 does not exist, so the R ODE dR/dt = (F + 1/2 G G^T Sigma^-1) R is singular at t = 0 (R_0 = 0 when Sigma_0 = 0); add a small eps on the diagonal, as CLD does (e.g. [[eps, 0], [0, gamma * M + eps]] with eps: 1e-6)")
            if not _positive_definite(S):
                raise SpecError(where, "initial_covariance", "must be positive definite when the state has more than one component")
        else:
            v = sp.N(S[0, 0], 40)
            if v < 0:
                raise SpecError(where, "initial_covariance", f"variance {v} is negative")
            singular |= bool(v == 0)
    if singular and t_min == 0:
        raise SpecError(where, "time.t_min", "must be > 0 when Sigma_0 is singular (R_t^-1 is needed at t_min)")


def _R0(value, Sigma0, where, names):
    if value in ("sqrtm", "cholesky"):
        return value
    R0 = _matrix(value, where, "R0", names, rows=Sigma0.shape[0], cols=Sigma0.shape[0])
    if R0.has(t):
        raise SpecError(where, "R0", "must not depend on t")
    _check_evaluable(where, [(f"R0[{i}][{j}]", R0[i, j]) for i in range(R0.rows) for j in range(R0.cols)])
    if not (R0 * R0.T - Sigma0).applyfunc(sp.simplify).is_zero_matrix:
        raise SpecError(where, "R0", "R0 R0^T must equal initial_covariance exactly")
    return R0


def _tables(value, where):
    if value is None:
        return TableDefaults()
    if not isinstance(value, dict):
        raise SpecError(where, "tables", "must be a mapping")
    _check_keys(value, TABLE_KEYS, where, "tables.")
    out = {}
    if "nfe" in value:
        nfe = value["nfe"]
        nfe = [nfe] if isinstance(nfe, int) else nfe
        if (not isinstance(nfe, list) or not nfe
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10000 for n in nfe)):
            raise SpecError(where, "tables.nfe", "expected a list of integers in [1, 10000]")
        out["nfe"] = tuple(nfe)
    if "order" in value:
        if value["order"] != "auto" and (not isinstance(value["order"], int) or isinstance(value["order"], bool)
                                         or not 1 <= value["order"] <= 4):
            raise SpecError(where, "tables.order", "expected an integer in 1..4 or auto")
        out["order"] = value["order"]
    if "grid" in value:
        if not isinstance(value["grid"], str):
            raise SpecError(where, "tables.grid", "expected a grid name such as quadratic")
        out["grid"] = value["grid"]
    for key in ("denoise", "corrector"):
        if key in value:
            if not isinstance(value[key], bool):
                raise SpecError(where, f"tables.{key}", "expected true or false")
            out[key] = value[key]
    if "lam" in value:
        lam = value["lam"] if isinstance(value["lam"], list) else [value["lam"]]
        out["lam"] = tuple(str(_number(v, where, "tables.lam")) for v in lam)
        if any(sp.Rational(v) <= 0 for v in out["lam"]):
            raise SpecError(where, "tables.lam", "stochastic tables need lam > 0")
    return TableDefaults(**out)
