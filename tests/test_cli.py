"""python -m derive / python -m validation: exit codes, one-line errors, --jobs, manifest, names, inspect."""

import hashlib
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, run_derive
from derive import _cli, _pipeline, _tables, _writer
from derive._pipeline import TableRequest
from gddim_runtime._format import read_table

DEBUG_HINT = "; rerun with GDDIM_DEBUG=1 for the traceback"


def _boom(*args, **kwargs):
    raise RuntimeError("planted failure")


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- exit codes ------------------------------------------------------------------------------

@pytest.mark.parametrize("target, stage", [("build", "tables"), ("step_moments", "tables"), ("dense", "dense")])
def test_internal_error_is_one_line_exit_3(tmp_path, monkeypatch, capsys, target, stage):
    monkeypatch.delenv("GDDIM_DEBUG", raising=False)
    monkeypatch.setattr(_tables, target, _boom)
    code = _cli.main(["vp_linear", "--nfe", "4", "--jobs", "1", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3
    assert _one_line(err) == f"internal error in {stage}: RuntimeError: planted failure{DEBUG_HINT}"
    assert not (tmp_path / "out").exists()


def test_internal_error_traceback_with_debug(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GDDIM_DEBUG", "1")
    monkeypatch.setattr(_tables, "build", _boom)
    code = _cli.main(["vp_linear", "--nfe", "4", "--jobs", "1", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" in err and "_boom" in err and "planted failure" in err
    assert err.strip().splitlines()[-1].startswith("internal error in tables: RuntimeError")


@pytest.mark.parametrize("target", ["build", "step_moments"])
def test_internal_error_in_a_forked_worker(tmp_path, monkeypatch, capsys, target):
    monkeypatch.delenv("GDDIM_DEBUG", raising=False)
    monkeypatch.setattr(_tables, target, _boom)
    code = _cli.main(["vp_linear", "--nfe", "4", "5", "--jobs", "2", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 3
    assert _one_line(capsys.readouterr().err).startswith("internal error in tables: RuntimeError: planted failure")


def test_crashing_verifier_is_an_internal_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_pipeline, "find_verifier", lambda: lambda *a, **k: {}["sign"])
    code = _cli.main(["vp_linear", "--nfe", "4", "--jobs", "1", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 3
    assert _one_line(capsys.readouterr().err) == f"internal error in verification: KeyError: 'sign'{DEBUG_HINT}"


def test_failed_verification_exit_1_nothing_written(tmp_path, monkeypatch, capsys):
    class Failed:
        passed = False

        def summary(self):
            return {}

        def text(self):
            return "psi off by 1e-3"
    monkeypatch.setattr(_pipeline, "find_verifier", lambda: lambda *a, **k: Failed())
    code = _cli.main(["vp_linear", "--nfe", "4", "--jobs", "1", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 1 and "psi off by 1e-3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragment", [(["--order", "5"], "--order: order: must be an integer 1..4"),
                                            (["--jobs", "0"], "--jobs: jobs"),
                                            (["--lam", "0"], "--lam: lam: must be > 0"),
                                            (["--order", "3", "--model-error", "0.1"],
                                             "--model-error: model_error: only applies with --order auto"),
                                            (["--order", "auto", "--model-error=-1e-3"],
                                             "--model-error: model_error: needs a number in [0, 1] (rms of the eps "
                                             "error per call), got -0.001"),
                                            (["--model-error", "nan"], "needs a number in [0, 1]"),
                                            (["--model-error", "inf"], "needs a number in [0, 1]"),
                                            (["--model-error", "1.5"], "got 1.5"),
                                            (["--no-tables", "--model-error", "nan"], "needs a number in [0, 1]"),
                                            (["--no-denoise", "--model-error", "0"],
                                             "--model-error: model_error: steers order auto's recommendation, which "
                                             "cannot run here")])
def test_bad_input_still_exit_2(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.setattr(_tables, "build", _boom)       # never reached: options are checked first
    code = _cli.main(["vp_linear", "--quiet", "--out", str(tmp_path / "out"), *args])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("error: ") and fragment in line


def test_validation_internal_error_exit_3(monkeypatch, capsys):
    import validation.__main__ as vmain
    monkeypatch.delenv("GDDIM_DEBUG", raising=False)
    monkeypatch.setattr(vmain, "check_table", _boom)
    code = vmain.main([str(ROOT / "coeffs" / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors")])
    line = _one_line(capsys.readouterr().err)
    assert code == 3
    assert line == f"internal error in checking vp_linear_nfe10_quadratic_q3.safetensors: RuntimeError: planted failure{DEBUG_HINT}"


def test_validation_bad_input_exit_2(tmp_path, capsys):
    import validation.__main__ as vmain
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a table")
    (tmp_path / "spec.yaml").write_bytes((ROOT / "coeffs" / "vp_linear" / "spec.yaml").read_bytes())
    assert vmain.main([str(bad)]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: {bad}: table: ")


def test_validation_of_a_table_moved_away_from_its_spec(tmp_path, capsys):
    """Without spec.yaml beside it the message was 'spec.yaml: file: cannot read'; now it says what to give,
    and --spec takes a built-in name as python -m derive does."""
    import validation.__main__ as vmain
    table = tmp_path / "cld_nfe10_quadratic_q3.safetensors"
    table.write_bytes((ROOT / "coeffs" / "cld" / table.name).read_bytes())
    assert vmain.main([str(table)]) == 2
    assert "no spec.yaml beside the table" in _one_line(capsys.readouterr().err)
    assert vmain.main([str(table), "--spec", "cld", "--level", "fast"]) == 0
    assert "PASSED" in capsys.readouterr().out


# ---- --jobs ----------------------------------------------------------------------------------

def test_jobs_1_does_not_fork_and_gives_the_same_bytes(tmp_path, monkeypatch):
    args = ["vp_linear", "--nfe", "4", "6", "--lam", "1", "--corrector", "--quiet", "--no-verify"]
    assert _cli.main([*args, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    monkeypatch.setattr(_pipeline.concurrent.futures, "ProcessPoolExecutor", _boom)
    assert _cli.main([*args, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    one, two = tmp_path / "one" / "vp_linear", tmp_path / "two" / "vp_linear"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for p in one.iterdir():
        assert p.read_bytes() == (two / p.name).read_bytes(), p.name


# ---- manifest.json ---------------------------------------------------------------------------

NAME_RE = re.compile(r"^(?P<spec>[a-z0-9_]+?)_nfe(?P<nfe>\d+)_(?P<grid>[a-z0-9.-]+)_q(?P<order>\d)"
                     r"(_lam(?P<lam>[0-9over]+))?(?P<pc>_pc)?(?P<nodenoise>_nodenoise)?\.safetensors$")


def test_manifest_lists_every_file_with_options_and_hash(tmp_path):
    assert _cli.main(["vp_linear", "--nfe", "4", "--order", "3", "--grid", "edm", "--lam", "0.5", "--corrector",
                      "--jobs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    folder = tmp_path / "vp_linear"
    doc = json.loads((folder / "manifest.json").read_text())
    listed = {e["file"]: e for e in doc["files"]}
    assert set(listed) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    for name, entry in listed.items():
        data = (folder / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    tables = [e for e in doc["files"] if e["kind"] == "table"]
    assert len(tables) == 1
    m = NAME_RE.match(tables[0]["file"])                 # the README's naming rule, read back
    opts = tables[0]["options"]
    assert m and int(m["nfe"]) == opts["nfe"] == 4 and int(m["order"]) == opts["order"] == 3
    assert m["grid"] == "edm7" and opts["grid"]["name"] == "edm" and opts["grid"]["param"] == 7.0
    assert m["lam"] == "1over2" and opts["lam"] == "1/2" and m["pc"] and opts["corrector"]
    assert not m["nodenoise"] and opts["denoise"] and opts["steps"] == 3
    _, meta = read_table(folder / tables[0]["file"])
    assert tables[0]["command"] == meta["command"] and tables[0]["verification"] == "fast"
    kinds = sorted(e["kind"] for e in doc["files"])
    assert kinds == ["closed forms", "closed forms", "dense", "spec", "table", "table text"]


def test_the_recorded_command_rewrites_the_table_byte_for_byte(tmp_path):
    """A table's meta command, run as written (shlex.split), writes the same bytes: for a spec file and a
    grid file whose paths hold spaces (the command was joined unquoted), and for a spec given as YAML text
    (it recorded 'python -m derive <text>'; now the spec.yaml written beside the table)."""
    import shlex
    from derive import derive
    text = "name: ou\nstate: [x]\ndrift: [[-1/2]]\ndiffusion: [[1]]\ntime: {t_min: 1/100, T: 3}\n"
    home = tmp_path / "my dir"
    home.mkdir()
    (home / "my spec.yaml").write_text(text)
    (home / "t 1.txt").write_text("3 1 0.2 0.01\n")
    assert run_derive("my dir/my spec.yaml", "--grid", "my dir/t 1.txt", "--nfe", "4", "--order", "2", "--quiet",
                      cwd=tmp_path).returncode == 0
    derive(text).table(4, order=2, grid="uniform").save(home / "api")
    tables = [p for p in (tmp_path / "coeffs" / "ou").glob("*.safetensors") if "dense" not in p.name]
    tables += list((home / "api").glob("*_q2.safetensors"))
    assert len(tables) == 2 and tables[0].name.startswith("ou_nfe4_file-t-1-")
    assert tables[1].name == "ou_nfe4_uniform_q2.safetensors"
    for table in tables:
        _, meta = read_table(table)
        cwd = table.parent if "api" in str(table) else tmp_path
        argv = shlex.split(meta["command"])
        assert argv[:3] == ["python", "-m", "derive"]
        proc = run_derive(*argv[3:], "--out", tmp_path / "again", "--quiet", cwd=cwd)
        assert proc.returncode == 0, (meta["command"], proc.stderr)
        assert (tmp_path / "again" / "ou" / table.name).read_bytes() == table.read_bytes(), meta["command"]


def test_manifest_same_whether_written_at_once_or_added_later(tmp_path):
    common = ["vp_linear", "--jobs", "1", "--quiet", "--no-verify"]
    assert _cli.main([*common, "--nfe", "4", "--order", "3", "--out", str(tmp_path / "later")]) == 0
    first = (tmp_path / "later" / "vp_linear" / "manifest.json").read_text()
    assert _cli.main([*common, "--nfe", "5", "--order", "2", "--out", str(tmp_path / "later")]) == 0
    assert _cli.main([*common, "--nfe", "4", "--order", "3", "--out", str(tmp_path / "once")]) == 0
    assert _cli.main([*common, "--nfe", "5", "--order", "2", "--out", str(tmp_path / "once")]) == 0
    later = (tmp_path / "later" / "vp_linear" / "manifest.json").read_bytes()
    assert later == (tmp_path / "once" / "vp_linear" / "manifest.json").read_bytes()
    files = [e["file"] for e in json.loads(later)["files"]]
    assert "vp_linear_nfe4_quadratic_q3.safetensors" in files and "vp_linear_nfe5_quadratic_q2.safetensors" in files
    assert len(json.loads(later)["files"]) == len(json.loads(first)["files"]) + 2
    # the manifest is regenerated from the folder: a file removed by hand drops out on the next run
    (tmp_path / "once" / "vp_linear" / "vp_linear_nfe4_quadratic_q3.md").unlink()
    (tmp_path / "once" / "vp_linear" / "manifest.json").write_text(_writer.manifest_text(tmp_path / "once" / "vp_linear"))
    assert "vp_linear_nfe4_quadratic_q3.md" not in (tmp_path / "once" / "vp_linear" / "manifest.json").read_text()


# ---- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, label", [
    (dict(nfe=20), "x_nfe20_quadratic_q3"),
    (dict(nfe=20, grid="uniform", order=1), "x_nfe20_uniform_q1"),
    (dict(nfe=20, grid="power:2"), "x_nfe20_quadratic_q3"),
    (dict(nfe=20, grid="power:3"), "x_nfe20_power3_q3"),
    (dict(nfe=20, grid="power:1.5"), "x_nfe20_power1.5_q3"),
    (dict(nfe=20, grid="logsnr"), "x_nfe20_logsnr_q3"),
    (dict(nfe=20, grid="edm"), "x_nfe20_edm7_q3"),
    (dict(nfe=20, grid="edm:5"), "x_nfe20_edm5_q3"),
    (dict(nfe=20, lam="0.5", corrector=True, denoise=False), "x_nfe20_quadratic_q3_lam1over2_pc_nodenoise"),
    (dict(nfe=20, lam="2"), "x_nfe20_quadratic_q3_lam2"),
])
def test_names_follow_the_documented_rule(options, label):
    assert TableRequest(**options).label("x") == label


_kappa = st.floats(0.1, 20, allow_nan=False)
_rho_s = st.floats(1e-3, 1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(_kappa, _kappa, _rho_s, _rho_s)
def test_different_grid_parameters_never_share_a_file_name(k1, k2, r1, r2):
    """Power, edm and start-skip parameters are written in full (shortest round-trip text), so two
    different values never map to one file (':g' kept 6 digits: power:3.0000001 was 'power3')."""
    label = lambda grid: TableRequest(nfe=20, grid=grid).label("x")
    for a, b in ((f"power:{k1!r}", f"power:{k2!r}"), (f"edm:{max(k1, 0.5)!r}", f"edm:{max(k2, 0.5)!r}"),
                 (f"quadratic@{r1!r}", f"quadratic@{r2!r}")):
        same_value = _pipeline._grids.parse_kind(a) == _pipeline._grids.parse_kind(b)
        assert (label(a) == label(b)) == same_value, (a, b)


def test_full_precision_grid_labels():
    assert TableRequest(nfe=20, grid="power:3.0000001").label("x") == "x_nfe20_power3.0000001_q3"
    assert TableRequest(nfe=20, grid="quadratic@25").label("x") == "x_nfe20_quadratic-from-rho25_q3"
    assert TableRequest(nfe=20, grid="logsnr@12.5").label("x") == "x_nfe20_logsnr-from-rho12.5_q3"


def test_grid_file_label(tmp_path):
    """The stem in lower case and a hash of the times: two files with one stem (a/g.txt, b/g.txt)
    gave one name, and the second table silently replaced the first (sweep 6)."""
    import hashlib
    times = tmp_path / "My Times.txt"
    times.write_text("1 0.5 0.1 0.001\n")
    digest = hashlib.sha256(b"1.0,0.5,0.1,0.001").hexdigest()[:8]
    assert TableRequest(nfe=4, grid=str(times)).label("x") == f"x_nfe4_file-my-times-{digest}_q3"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "g.txt").write_text("1 0.5 0.1 0.001\n")
    (tmp_path / "b" / "g.txt").write_text("1 0.4 0.1 0.001\n")
    (tmp_path / "c.txt").write_text("1.0, 5e-1 0.1\n1e-3")                 # the same times, written otherwise
    labels = [TableRequest(nfe=4, grid=str(tmp_path / f)).label("x") for f in ("a/g.txt", "b/g.txt")]
    assert labels[0] != labels[1]
    assert TableRequest(nfe=4, grid=str(tmp_path / "c.txt")).label("x").endswith(f"-{digest}_q3")


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_prints_each_line_once_with_the_x0_weights(tmp_path):
    path = ROOT / "coeffs" / "cld" / "cld_nfe10_quadratic_q3.safetensors"
    proc = run_derive("inspect", path)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == len(set(lines)), "a line is printed twice"
    x0 = [l for l in lines if l.startswith("x0 weights")]
    assert len(x0) == 1
    tensors, _ = read_table(path)
    numbers = [float(v) for v in re.findall(r"[-+]?\d\.\d+e[-+]\d+", x0[0])]
    np.testing.assert_allclose(numbers, np.concatenate([tensors["x0_weights"][0, 0].ravel(),
                                                        tensors["x0_weights"][1, 0].ravel()]), rtol=1e-9)


def test_validation_builds_a_spec_through_the_api(tmp_path, capsys):
    """python -m validation SPEC: the spec's default tables built in memory, then checked."""
    import validation.__main__ as vmain
    spec = tmp_path / "small.yaml"
    text = (ROOT / "derive" / "sdes" / "vp_linear.yaml").read_text()
    text = re.sub(r"(?m)^tables: .*$", "tables: {nfe: [4, 5], order: 2}", re.sub(r"(?m)^name: .*$", "name: small", text))
    spec.write_text(text)
    assert vmain.main([str(spec), "--level", "fast"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^## (\S+)$", out, re.M) == ["small_nfe4_quadratic_q2", "small_nfe5_quadratic_q2"]
    assert out.count("PASSED") == 2


def test_unwritable_out_is_bad_input(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = _cli.main(["vp_linear", "--nfe", "4", "--jobs", "1", "--quiet", "--no-verify", "--out", str(blocker)])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line == f"error: --out: out: {str(blocker)!r}: exists and is not a folder"   # before deriving
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "vp_linear").write_text("a file where the spec's folder goes")
    code = _cli.main(["vp_linear", "--nfe", "4", "--jobs", "1", "--quiet", "--no-verify", "--out", str(tmp_path / "root")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"error: {tmp_path / 'root' / 'vp_linear'}: --out: cannot write")


def test_validation_holds_each_table_to_the_manifest_beside_it(tmp_path, capsys):
    """A table renamed (nfe10_q3 -> nfe99_q1) or replaced by another's bytes passed: the manifest python -m derive
    writes (file names and sha256) was never read."""
    import shutil
    import validation.__main__ as vmain
    folder = tmp_path / "vp_linear"
    shutil.copytree(ROOT / "coeffs" / "vp_linear", folder)
    table = folder / "vp_linear_nfe10_quadratic_q3.safetensors"
    assert vmain.main([str(table), "--level", "fast"]) == 0
    capsys.readouterr()
    renamed = table.rename(folder / "vp_linear_nfe99_quadratic_q1.safetensors")
    assert vmain.main([str(renamed), "--level", "fast"]) == 1
    assert "not listed in manifest.json" in capsys.readouterr().out
    renamed.rename(table)
    table.write_bytes((folder / "vp_linear_nfe20_quadratic_q3.safetensors").read_bytes())
    assert vmain.main([str(table), "--level", "fast"]) == 1
    assert "bytes differ from the sha256 manifest.json records" in capsys.readouterr().out


def test_a_second_spec_of_the_same_name_is_refused_not_mixed_in(tmp_path):
    """sweep 11: two specs named alike derived into one --out mixed their tables (exit 0), and validation
    then failed on the spec hash. Now the second is refused in one line and the folder is left as it was."""
    first = tmp_path / "a.yaml"
    first.write_text("name: same\nstate: [x]\ndrift: [[-1]]\ndiffusion: [[1]]\ninitial_covariance: [[1]]\n"
                     "time: {t_min: 1e-3, T: 1}\n")
    second = tmp_path / "b.yaml"
    second.write_text(first.read_text().replace("[[-1]]", "[[-2]]"))
    out = tmp_path / "out"
    assert run_derive(first, "--out", out, "--nfe", "6", "--order", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "same").iterdir()}
    proc = run_derive(second, "--out", out, "--nfe", "8", "--order", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "holds the tables of another spec named 'same'" in proc.stderr
    assert {p.name: p.read_bytes() for p in (out / "same").iterdir()} == before
    assert run_derive(first, "--out", out, "--nfe", "8", "--order", "1").returncode == 0   # its own spec: fine
