"""Spec parsing and bad input: one-line errors naming file and key, exit 2, nothing written."""

import textwrap
from fractions import Fraction

import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import SDES, run_derive
from derive._errors import SpecError
from derive._spec import build_spec, load_spec

GOOD = textwrap.dedent("""\
    name: good
    state: [x, v]
    parameters: {beta: 4, M: 1/4, gamma: 0.04, eps: 1e-6}
    drift: [[0, beta / M], [-beta, -beta / M]]
    diffusion: [[0], [sqrt(2 * beta)]]
    initial_covariance: [[eps, 0], [0, gamma * M + eps]]
    time: {t_min: 1e-3, T: 1}
""")


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_numbers_are_exact(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.Sigma0[1, 1] == sp.Rational(1, 100) + sp.Rational(1, 10 ** 6)
    assert spec.F[0, 1] == 16 and spec.t_min == sp.Rational(1, 1000)


def test_hash_ignores_formatting(tmp_path):
    a = load_spec(write(tmp_path, GOOD, "a.yaml"))
    b = load_spec(write(tmp_path, GOOD.replace("beta: 4", "beta:    4") + "\n# comment\n", "b.yaml"))
    assert a.sha256 == b.sha256


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(-10 ** 6, 10 ** 6), shift=st.integers(0, 3), zeros=st.integers(1, 3))
def test_hash_is_of_the_value_whatever_its_decimal_spelling(tmp_path, n, shift, zeros):
    """`beta: 20`, `beta: 20.0`, `beta: 2.0e+1` are one number (exact), so one spec and one hash: the YAML
    floats are kept as exact rationals and an integer one was hashed as the text "20" beside the int 20."""
    mantissa = f"{n / 10 ** shift:.{shift}f}" if shift else f"{n}.{'0' * zeros}"
    spellings = [str(n), f"{n}.{'0' * zeros}", f"{mantissa}e+{shift}" if shift else f"{n}.0e+0"]
    hashes = {load_spec(write(tmp_path, GOOD.replace("gamma: 0.04", f"gamma: 0.04, k: {text}"))).sha256
              for text in spellings}
    assert len(hashes) == 1, spellings
    other = load_spec(write(tmp_path, GOOD.replace("gamma: 0.04", f"gamma: 0.04, k: {n + 1}"))).sha256
    assert other not in hashes


BAD = [
    ("", "file", "empty"),
    ("- 1\n- 2\n", "file", "mapping"),
    ("name: [\n", "yaml", ""),
    (GOOD.replace("drift:", "drfit:"), "drfit", "did you mean 'drift'"),
    (GOOD.replace("name: good\n", ""), "name", "missing"),
    (GOOD.replace("name: good", "name: Bad-Name"), "name", "[a-z0-9_]+"),
    (GOOD.replace("[[0, beta / M], [-beta, -beta / M]]", "[[0, 1, 2], [1, 2, 3]]"), "drift", "square"),
    (GOOD.replace("[[0], [sqrt(2 * beta)]]", "[[0], [1], [2]]"), "diffusion", "rows"),
    (GOOD.replace("[[eps, 0], [0, gamma * M + eps]]", "[[eps, 1], [0, 1]]"), "initial_covariance", "symmetric"),
    (GOOD.replace("[[eps, 0], [0, gamma * M + eps]]", "[[1, 2], [2, 1]]"), "initial_covariance", "positive definite"),
    (GOOD.replace("beta / M]", "bta / M]"), "drift[0][1]", "unknown name 'bta'"),
    (GOOD.replace("sqrt(2 * beta)", "__import__('os').system('echo hi')"), "diffusion[1][0]", "not allowed"),
    (GOOD.replace("sqrt(2 * beta)", "beta.__class__"), "diffusion[1][0]", "forbidden syntax"),
    (GOOD.replace("sqrt(2 * beta)", "beta / (M - 1/4)"), "diffusion[1][0]", "division by zero"),
    (GOOD.replace("T: 1}", "T: 1e-3}"), "time.T", "greater than t_min"),
    (GOOD.replace("{beta: 4,", "{beta: 4, beta: 5,"), "yaml", "duplicate key"),
    (GOOD.replace("beta: 4", "t: 4"), "parameters.t", "reserved"),
    (GOOD.replace("beta: 4", "beta: abc"), "parameters.beta", "unknown name"),
    (GOOD.replace("beta: 4", "beta: 1.0e+5000"), "parameters.beta", "out of range"),      # YAML float: expanded
    ("? [a, b]\n: 1\n" + GOOD, "yaml", "a key must be a name"),          # sweep 11: exit 3 (unhashable key)
    (GOOD.replace("name: good", 'name: "good\\n"'), "name", "[a-z0-9_]+"),  # sweep 11: wrote a folder 'good\n'
    (GOOD.replace("[0, beta / M]", "[0, -(-8)**(1/3)]"), "drift[0][1]", "not finite and real"),   # 2 (-1)^(1/3)
    (GOOD.replace("state: [x, v]", 'state: ["x\\n", v]'), "state[0]", ""),
    (GOOD.replace("beta: 4", "beta: 4 * 1e-5000"), "parameters.beta", "out of range"),    # in an expression
    (GOOD.replace("beta: 4", "beta: true"), "parameters.beta", "expected a number"),
    (GOOD + "basis: {kind: dct3d}\n", "basis.kind", "unknown kind"),
    (GOOD + "R0: [[1, 0], [0, 1]]\n", "R0", "must equal"),
    (GOOD + "tables: {order: 7}\n", "tables.order", "1..4"),
    (GOOD + "tables: {order: automatic}\n", "tables.order", "1..4 or auto"),
    (GOOD.replace("beta: 4", "beta: .inf"), "parameters.beta", "not a number: '.inf'"),
    (GOOD.replace("beta: 4", "beta: 1" + "0" * 5000), "yaml", "number longer than 100 characters"),  # was exit 3
    (GOOD.replace("T: 1}", "T: .nan}"), "time.T", "not a number"),
    ("name: m\nmarginal: {mean: 1, std: sin(t)/sqrt(t)}\ntime: {t_min: 1e-3, T: 1}\n", "marginal.std",
     "not defined at t = 0"),                            # was 'initial_covariance: must be symmetric' (nan != nan)
    ("name: m\nmarginal: {mean: 1, std: sqrt(t - 2)}\ntime: {t_min: 1e-3, T: 1}\n", "marginal.std",
     "not a real number at t = 0"),                      # was 'initial_covariance: variance -2 is negative'
    ("name: m\nmarginal: {mean: 1, std: sqrt(t * (t - 1/2))}\ntime: {t_min: 1e-3, T: 1}\n", "marginal.std",
     "not a real number at t = 0.001"),
    ("name: m\nmarginal: {mean: log(t - 1/2), std: sqrt(t)}\ntime: {t_min: 1e-3, T: 1}\n", "marginal.mean",
     "not a real number at t = 0.001"),
    # nested aliases: each level multiplies the entries (9 levels of 10 were 10^9 entries to walk: a hang;
    # 5 here, so that the test fails rather than hangs without the refusal)
    (GOOD.replace("gamma: 0.04,", "gamma: 0.04, " + ", ".join(
        f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i else "1"] * 10) + "]" for i in range(5)) + ","),
     "yaml", "aliases (*name) are not supported"),
    # YAML 1.1 integers that are not decimal changed the process without a word (sweep 6): 020 was octal 16
    (GOOD.replace("beta: 4", "beta: 020"), "yaml", "'020' would be read by YAML 1.1 as 16"),
    (GOOD.replace("beta: 4", "beta: 1:20"), "yaml", "'1:20' would be read by YAML 1.1 as 80"),
    (GOOD.replace("beta: 4", "beta: 0x14"), "yaml", "as 20 (octal, base 60, binary or hex): write the number"),
    (GOOD.replace("beta: 4", "beta: 0b100"), "yaml", "'0b100' would be read by YAML 1.1 as 4"),
]


def test_tables_order_auto_is_the_default(tmp_path):
    """order: auto parses, and a spec without a tables block defaults to it (grid left to it)."""
    from derive._spec import TableDefaults
    assert load_spec(write(tmp_path, GOOD + "tables: {order: auto}\n")).tables == TableDefaults(order="auto")
    assert load_spec(write(tmp_path, GOOD)).tables.order == "auto"
    assert load_spec(write(tmp_path, GOOD)).tables.grid is None
    assert load_spec(write(tmp_path, GOOD + "tables: {order: 2, grid: edm}\n")).tables == TableDefaults(order=2, grid="edm")


@pytest.mark.parametrize("text, key, fragment", BAD)
def test_bad_spec_message(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert info.value.key == key and fragment in msg


@pytest.mark.parametrize("text, key, fragment", BAD[:4] + BAD[9:12])
def test_cli_bad_spec_exit_2_nothing_written(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    out = tmp_path / "out"
    proc = run_derive(path, "--out", out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--order", "5"], "order"), (["--nfe", "2", "--order", "3"], "smaller than the order"),
    (["--lam", "-0.5"], "lam"), (["--grid", "zigzag"], "unknown grid"), (["--nfe", "1"], "no sampling step"),
])
def test_cli_bad_options(tmp_path, args, fragment):
    out = tmp_path / "out"
    proc = run_derive("vp_linear", "--out", out, *args)
    assert proc.returncode == 2 and fragment in proc.stderr and not out.exists()


def test_grid_with_repeats_rejected(tmp_path):
    times = tmp_path / "times.txt"
    times.write_text("1 0.5 0.5 0.001\n")
    proc = run_derive("vp_linear", "--out", tmp_path / "out", "--grid", times, "--no-denoise")
    assert proc.returncode == 2 and "repeated time" in proc.stderr


def test_unknown_builtin(tmp_path):
    proc = run_derive("nonexistent_sde", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "built-ins" in proc.stderr


def test_builtins_parse():
    names = sorted(p.stem for p in SDES.glob("*.yaml"))
    assert {"vp_linear", "vp_cosine", "ve", "sub_vp", "cld", "bdm", "psld", "hold3"} <= set(names)
    for name in names:
        spec = load_spec(SDES / f"{name}.yaml")
        assert spec.name == name


# ---- property tests: random junk and random well-formed specs never give a traceback ---------

_scalar = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.none(), st.booleans())
_junk = st.recursive(_scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                  st.dictionaries(st.text(max_size=8), c, max_size=4)),
                     max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_junk)
def test_random_junk_structures(data):
    try:
        build_spec(data if isinstance(data, dict) else {"junk": data})
    except SpecError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_files(tmp_path_factory, blob):
    p = tmp_path_factory.mktemp("junk") / "x.yaml"
    p.write_bytes(blob)
    try:
        load_spec(p)
    except SpecError:
        pass


_expr = st.sampled_from(["0", "1", "t", "-t", "beta", "beta * t", "exp(-t)", "sqrt(1 + t)", "1 / t",
                         "log(t)", "sin(t)**2", "1/2", "0.5 * beta", "nope", "t**(1/3)", "beta / (beta - 2)"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 3), m=st.integers(1, 2), data=st.data())
def test_random_wellformed_specs(k, m, data):
    mat = lambda r, c: [[data.draw(_expr) for _ in range(c)] for _ in range(r)]
    spec = {"name": "rand", "state": [f"u{i}" for i in range(k)], "parameters": {"beta": data.draw(st.sampled_from([1, 2, "1/3"]))},
            "drift": mat(k, k), "diffusion": mat(k, m),
            "initial_covariance": [[1 if i == j else 0 for j in range(k)] for i in range(k)],
            "time": {"t_min": data.draw(st.sampled_from([0, "1e-3", 1])), "T": 1}}
    try:
        out = build_spec(spec)
    except SpecError:
        return
    assert out.k == k


@pytest.mark.parametrize("body, key", [
    ("marginal:\n  mean: exp(-t)\n  std: sqrt(1 - exp(-2*t)) / (t - 1/2)\n", "marginal.std"),  # std/mean falls after the pole
    ("marginal:\n  mean: 1 - t\n  std: t\n", "marginal.mean"),                              # mean vanishes at T = 1
    ("marginal:\n  mean: exp(-t)\n  std: exp(-t) * (1 + t) / (1 + 2 * t)\n", "marginal.std"),  # std/mean decreases
    ("drift: [[log(t - 2)]]\ndiffusion: [[1]]\n", "drift[0][0]"),                          # NaN everywhere
    ("drift: [[-1 / (t - 1/2)]]\ndiffusion: [[1]]\n", "drift[0][0]"),                      # a pole: hung for minutes
    ("drift: [[1000]]\ndiffusion: [[1]]\n", "order auto"),                                 # e^1000 overflows float64
    ("drift: [[1000]]\ndiffusion: [[1]]\n", "the process at time.T"),                      # with --order 1: exit 3 before
])
def test_cli_evaluation_failures(tmp_path, body, key):
    """Specs that parse but are no forward diffusion, or fail numerically: one line, exit 2."""
    path = write(tmp_path, "name: bad\n" + body + "time: {t_min: 1e-3, T: 1}\n")
    out = tmp_path / "out"
    proc = run_derive(path, "--out", out, "--nfe", "6", *(["--order", "1"] if key == "the process at time.T" else []))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {key}: ") and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("marginal, key, fragment", [
    ("{mean: 0, std: 1}", "marginal.mean", "must not be zero"),
    ("{mean: exp(-t), std: 0}", "marginal.std", "must not be zero"),
    ("{mean: exp(-t), std: exp(-2 * t)}", "marginal.std", "decreases"),                  # constant G^2 < 0
    ("{mean: exp(-t), std: sqrt(1 - exp(-2 * t)) * (t - 1/2)}", "marginal.std", "decreases"),
    ("{mean: 1 - t, std: t}", "marginal.mean", "is zero at t = 1"),                      # mean_T = 0
])
def test_marginal_that_is_no_forward_diffusion(tmp_path, marginal, key, fragment):
    """A marginal family needs mean != 0 and std/mean non-decreasing (G^2 = mean^2 d(std/mean)^2/dt >= 0)."""
    text = f"name: m\nmarginal: {marginal}\ntime: {{t_min: 1e-3, T: 1}}\n"
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert info.value.key == key and fragment in str(info.value) and "\n" not in str(info.value)


def test_marginal_with_noiseless_dc_coordinate_is_accepted(tmp_path):
    """Inverse heat dissipation: G^2 = 2 lam tau' std^2 is exactly 0 at lam = 0 (allowed, not negative)."""
    text = ("name: heat\nbasis: {kind: dct2d, frequency: lam, size: [2, 2]}\n"
            "marginal: {mean: exp(-lam * t**2), std: 1/100}\ntime: {t_min: 1e-3, T: 1}\n")
    spec = load_spec(write(tmp_path, text))
    assert spec.G[0, 0].subs(spec.basis.symbol, 0) == 0


def test_singular_sigma0_says_why_and_what_to_write(tmp_path):
    """k > 1 with a singular Sigma_0 (R_0 = 0): the refusal names the R ODE and the eps workaround."""
    from derive import SpecError, load_spec
    for sigma0 in ("[[0, 0], [0, 0]]", "[[0, 0], [0, 1]]", "[[1, 1], [1, 1]]"):
        spec = GOOD.replace("[[eps, 0], [0, gamma * M + eps]]", sigma0)
        path = tmp_path / "s.yaml"
        path.write_text(spec)
        with pytest.raises(SpecError) as err:
            load_spec(path)
        msg = str(err.value)
        assert "initial_covariance" in msg and "singular" in msg and "small eps on the diagonal" in msg
        assert "\n" not in msg


def test_grid_file_messages_name_the_file_and_the_problem(tmp_path):
    """An empty file of times was reported as '--nfe: must be in 1..10000, got 0', a missing one as an
    unknown grid name."""
    from derive._grids import parse_kind, read_times
    empty = tmp_path / "times.txt"
    empty.write_text("\n")
    assert parse_kind(str(empty)) == ("file", str(empty))
    with pytest.raises(SpecError, match=r"times.txt: grid: needs at least two times .* found 0"):
        read_times(empty)
    for text in (str(tmp_path / "missing.txt"), "file:missing", "missing.txt"):
        with pytest.raises(SpecError, match=r"--grid: grid: no such file of times"):
            parse_kind(text)
    with pytest.raises(SpecError, match="unknown grid 'zigzag'"):
        parse_kind("zigzag")


@pytest.mark.parametrize("text, values", [
    ("1 0.5 1e-3\n", [1.0, 0.5, 1e-3]), ("1, .5,\n2.5E-1 , +0.001", [1.0, 0.5, 0.25, 0.001]),
    ("\t1.\n\n0\n", [1.0, 0.0])])
def test_grid_file_reads_ascii_decimals(tmp_path, text, values):
    from derive._grids import read_times
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert read_times(path) == values


@pytest.mark.parametrize("text", ["1,,0.5", "1, 0.5,", "1 0_5", "1 \uff10.5", "1 \u0660.\u0665", "1 nan",
                                  "1 inf", "1 0x1p-1", "1 0.5.1", "1 - 0.5", "1 ٫5"])
def test_grid_file_refuses_what_is_not_an_ascii_decimal(tmp_path, text):
    """Python's float() took '0_5', full-width and Arabic-Indic digits, and '1,,0.5' read as two
    times (sweep 6): a grid file is data, read with a whitelist like the spec's expressions."""
    from derive._grids import read_times
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match=r"t.txt: grid: not a decimal number"):
        read_times(path)


def test_a_spec_name_too_long_for_the_file_system_is_bad_input():
    """Path.is_file() raises for names beyond NAME_MAX: 'internal error ... File name too long' (exit 3)."""
    from derive import derive
    with pytest.raises(SpecError, match=r"^a{77}\.\.\.: spec: no such file or built-in spec"):
        derive("a" * 300)


def test_a_negative_t_min_is_refused():
    """time.t_min < 0 (sweep 8: a check moved to t_min < -1 passed every test)."""
    from derive import derive
    with pytest.raises(SpecError, match=r"time.t_min: must be >= 0, got -1/2"):
        derive("name: neg\nstate: [x]\ndrift: [[-1]]\ndiffusion: [[1]]\ntime: {t_min: -1/2, T: 1}\n")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.fractions(min_value=0, max_value=2).filter(lambda a: a != 0), kind=st.sampled_from(["pole", "log", "root"]))
def test_a_coefficient_undefined_inside_the_time_range_is_refused_by_key(tmp_path, a, kind):
    """A pole or a domain violation inside [t_min, T] = [1e-3, 1] is a SpecError naming the entry; outside it
    the spec loads. Before, -beta / (t - 1/2) hung the Sigma ODE for minutes (ever smaller panels toward
    the pole), and log(t - 2) was found only where an evaluation met it."""
    text_a, t_min = f"({a.numerator}/{a.denominator})", Fraction(1, 1000)
    expr = {"pole": f"-beta / M + 1 / (t - {text_a})", "log": f"-beta / M + log(t - {text_a}) / 100",
            "root": f"-beta / M + sqrt(t - {text_a})"}[kind]
    text = GOOD.replace("[-beta, -beta / M]", f"[-beta, {expr}]")
    inside = {"pole": t_min <= a <= 1, "log": a >= t_min, "root": a > t_min}[kind]
    if inside:
        with pytest.raises(SpecError) as info:
            load_spec(write(tmp_path, text))
        assert info.value.key == "drift[1][1]" and "not real and continuous" in str(info.value)
        assert "\n" not in str(info.value)
    else:
        load_spec(write(tmp_path, text))
