"""Generated files: regenerate-and-diff, determinism, atomic writes, the reader's refusals."""

import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT, run_derive
from derive._writer import atomic_write, table_bytes
from gddim_runtime._format import HEADER_KEY, TableError, read_table

COEFFS = ROOT / "coeffs"


PROVENANCE = ("tools", "content_sha256")       # tool versions, and the hash that covers them


def _strip(value):
    """JSON-like metadata without provenance keys; JSON objects held in strings are parsed."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        out = {k: _strip(v) for k, v in value.items() if k not in PROVENANCE}
        if "file" in out:                        # a manifest entry: its byte size and hash carry the tools
            out.pop("sha256", None)
            out.pop("bytes", None)
        return out
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def content(path):
    """What a generated file says, minus provenance (tool versions): a new sympy or numpy release
    changes those lines and hashes, never the numbers. Tables: every tensor's bytes + the metadata."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: (f.get_tensor(k).dtype.str, f.get_tensor(k).shape, f.get_tensor(k).tobytes()) for k in f.keys()}
            return {"tensors": tensors, "metadata": _strip(f.metadata() or {})}
    if path.suffix == ".json":
        return _strip(json.loads(path.read_text()))
    return [line for line in path.read_text().splitlines() if not re.search(r"\btools: ", line)]


def _compare_folder(committed, fresh):
    """Same file names and the same content (tensors, metadata, text) up to provenance lines."""
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    for name in names:
        if (committed / name).read_bytes() == (fresh / name).read_bytes():
            continue
        assert content(committed / name) == content(fresh / name), \
            f"{name} differs from a fresh regeneration (run python -m derive {committed.name})"


def test_compare_ignores_provenance_only(tmp_path):
    """The comparison passes when only tool versions differ and fails on one changed number (table
    tensor, table metadata, or a line of a text file)."""
    import shutil
    src = COEFFS / "vp_linear"
    table = "vp_linear_nfe10_quadratic_q3"

    def variant(name, edit_table=None, edit_text=None):
        out = tmp_path / name / "vp_linear"
        shutil.copytree(src, out)
        tensors, meta = read_table(out / f"{table}.safetensors")
        meta["tools"] = {k: v + ".post1" for k, v in meta["tools"].items()}          # another release
        if edit_table:
            edit_table(tensors, meta)
        (out / f"{table}.safetensors").write_bytes(table_bytes(tensors, meta))
        for p in out.iterdir():
            if p.suffix in (".md", ".py"):
                text = p.read_text().replace("sympy 1.", "sympy 9.")
                p.write_text(edit_text(text) if edit_text and p.name == f"{table}.md" else text)
        return out
    _compare_folder(src, variant("tools"))

    def bump(tensors, meta):
        tensors["eps_weights"][3, 1, 0, 0, 0] = np.nextafter(tensors["eps_weights"][3, 1, 0, 0, 0], 1.0)
    for label, kw in (("tensor", {"edit_table": bump}),
                      ("meta", {"edit_table": lambda t, m: m.update(order=m["order"] + 1)}),
                      ("text", {"edit_text": lambda text: text.replace("e+00]", "e+01]", 1)})):
        with pytest.raises(AssertionError, match="differs from a fresh regeneration"):
            _compare_folder(src, variant(label, **kw))


@pytest.mark.parametrize("name", ["vp_linear", "cld", pytest.param("bdm", marks=pytest.mark.slow)])
def test_committed_coeffs_regenerate(tmp_path, name):
    """coeffs/<name>/ is what the README's two commands write: the spec's default tables (order
    auto: the recommended configuration per NFE) and the paper's quadratic order-3 tables."""
    for extra in ([], ["--order", "3", "--grid", "quadratic"]):
        proc = run_derive(name, "--out", tmp_path, "--quiet", *extra)
        assert proc.returncode == 0, proc.stderr
    _compare_folder(COEFFS / name, tmp_path / name)


def test_deterministic_across_processes(tmp_path):
    """Same spec and options in two processes with different hash seeds: identical bytes."""
    import subprocess
    import sys
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", "derive", "sub_vp", "--nfe", "6", "--out", str(out), "--quiet"],
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append(out / "sub_vp")
    for p in outs[0].iterdir():
        assert p.read_bytes() == (outs[1] / p.name).read_bytes(), p.name


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.safetensors"
    target.write_bytes(b"old")

    def crash(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.safetensors"]     # no temp left


def _small_table(tmp_path):
    tensors = {"t": np.array([1.0, 0.5]), "psi": np.ones((1, 1, 1, 1)), "R": np.ones((2, 1, 1, 1)),
               "sigma": np.ones((2, 1, 1, 1)), "L": np.ones((2, 1, 1, 1)), "eps_weights": np.ones((1, 1, 1, 1, 1)),
               "x0_weights": np.ones((2, 1, 1, 1)), "data_to_state": np.ones((2, 1, 1, 1)),
               "F": np.ones((2, 1, 1, 1)), "GGT": np.ones((2, 1, 1, 1))}
    path = tmp_path / "x.safetensors"
    path.write_bytes(table_bytes(tensors, {"note": "test"}))
    return path


def test_reader_refuses_bad_files(tmp_path):
    path = _small_table(tmp_path)
    read_table(path)                                              # sound file loads
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-9])
    with pytest.raises(TableError, match="truncated"):
        read_table(tmp_path / "trunc.safetensors")
    # edit one float64 in the payload: content hash mismatch
    edited = bytearray(data)
    edited[-3] ^= 0x01
    (tmp_path / "edit.safetensors").write_bytes(bytes(edited))
    with pytest.raises(TableError, match="hash mismatch"):
        read_table(tmp_path / "edit.safetensors")
    # a newer format version; versions not written as derive writes them (str(int)): int() took " 1", a list
    # or None was a TypeError
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    inner = json.loads(header["__metadata__"][HEADER_KEY])
    for version, match in [("99", "newer format version 99"), (" 1", "bad format_version ' 1'"),
                           ("1.0", "bad format_version"), (1, "bad format_version 1"), (None, "bad format_version None"),
                           (["1"], "bad format_version"), ("\u0661", "bad format_version"), ("0", "unknown format_version 0"), ("01", "bad format_version .01.")]:
        inner["format_version"] = version
        header["__metadata__"][HEADER_KEY] = json.dumps(inner)
        raw = json.dumps(header).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        (tmp_path / "new.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
        with pytest.raises(TableError, match=re.escape(match) if "'" in match else match):
            read_table(tmp_path / "new.safetensors")
    with pytest.raises(TableError, match="no such file"):
        read_table(tmp_path / "missing.safetensors")
    # a folder read as 'truncated or not safetensors: No such device'; a FIFO blocked for ever, Ctrl-C ignored
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(TableError, match="a folder, not a table file"):
        read_table(tmp_path / "dir.safetensors")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.safetensors")
        with pytest.raises(TableError, match=r"not a regular file \(a pipe"):
            read_table(tmp_path / "pipe.safetensors")


def test_inspect_and_plot(tmp_path):
    table = COEFFS / "cld" / "cld_nfe10_quadratic_q3.safetensors"
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "derive", "inspect", str(table), "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "command: `python -m derive cld --nfe 10 --order 3 --grid quadratic`" in proc.stdout
    assert "verification" in proc.stdout and (tmp_path / "p.png").stat().st_size > 10000
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "derive", "inspect", str(bad)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_inspect_and_out_refuse_bad_locations_before_any_work(tmp_path, capsys):
    """inspect --coord out of range was clamped silently, a folder as FILE said 'No such device', --plot into a
    missing folder ended in NotADirectoryError (exit 3); derive --out naming a file failed only after deriving."""
    from derive._cli import main
    table = str(COEFFS / "bdm" / "bdm_nfe10_quadratic_q3.safetensors")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, message in ((["inspect", table, "--coord", "1024"], "--coord: coord: must be in 0..1023"),
                          (["inspect", table, "--coord", "-1"], "--coord: coord: must be in 0..1023"),
                          (["inspect", str(COEFFS / "bdm")], "table: is a folder"),
                          (["inspect", table, "--plot", str(afile / "p.png")], "--plot: plot: .* does not exist"),
                          (["inspect", table, "--plot", str(tmp_path)], "--plot: plot: .* is a folder"),
                          (["vp_linear", "--out", str(afile)], "--out: out: .* exists and is not a folder"),
                          (["vp_linear", "--out", ""], "--out: out: '': empty")):
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and re.search(message, lines[0]), captured.err
        assert captured.out == ""                          # refused before anything was described or derived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def _tampered(edit):
    """The committed CLD x0+pc table's tensors and meta after ``edit(tensors, meta)`` (a file re-hashed
    after editing loads exactly like this: the content hash guards against corruption, not against forgery)."""
    tensors, meta = read_table(COEFFS / "cld" / "cld_nfe10_auto4_q4_pc_inrho_x0.safetensors")
    tensors = {n: a.copy() for n, a in tensors.items()}
    meta = json.loads(json.dumps(meta))
    edit(tensors, meta)
    return tensors, meta


def _nan_in(name):
    def edit(tensors, meta):
        tensors[name].flat[tensors[name].size // 2] = np.nan
    return edit


@pytest.mark.parametrize("edit, match", [
    (_nan_in("eps_weights"), "tensor eps_weights holds NaN or inf"),       # was: "model output is not finite at step 4"
    (_nan_in("x0_weights"), "tensor x0_weights holds NaN or inf"),         # was: NaN samples returned, no error
    (_nan_in("sigma"), "tensor sigma holds NaN or inf"),
    (lambda ts, m: ts["t"].__setitem__(3, ts["t"][5]), "t must decrease strictly"),     # heun stepped backwards
    (lambda ts, m: ts["t"].__setitem__(3, ts["t"][4]), "t must decrease strictly"),     # a zero-length step
    (lambda ts, m: ts["t"].__setitem__(-1, -1e-3), "t must decrease strictly from t_0 to t_N = t_min >= 0"),
    (lambda ts, m: ts.__setitem__("x0_weights_ms", ts["x0_weights_ms"][:5]), r"x0_weights_ms has shape \(5,"),
    (lambda ts, m: ts.__setitem__("x0_psi", ts["x0_psi"][:, :0]), "x0_psi has shape"),  # ValueError in the sampler
    (lambda ts, m: m.update(lam="abc"), "meta lam 'abc' is not an exact number > 0"),     # ValueError per call
    (lambda ts, m: m.update(lam="-1/2"), "meta lam '-1/2'"),
    (lambda ts, m: m.update(form="bogus"), "meta form 'bogus' is not one of"),
    (lambda ts, m: m.update(denoise="no"), "meta denoise 'no'"),
    (lambda ts, m: m["spec"]["basis"].update(size=["a"]), "meta spec.basis 'identity' of size"),  # raw TypeError
    (lambda ts, m: m["spec"]["basis"].update(kind="fourier"), "is not a basis gddim_runtime knows"),
    (lambda ts, m: m.update(order=5), "meta order 5, but eps_weights hold 4 lags"),    # validation: ValueError
    (lambda ts, m: ts.pop("x0_psi"), r"meta form 'x0' without the data-prediction tensors \['x0_psi'\]"),
    # sweep 6: each of these loaded
    (lambda ts, m: ts.__setitem__("corector_weights", ts.pop("corrector_weights")), "unknown tensor 'corector_weights'"),
    (lambda ts, m: m.update(steps=8), "meta steps 8, but tensor t holds 9 steps"),
    (lambda ts, m: m.update(nfe=12), r"meta nfe 12 is not steps 9 \+ 1"),
    (lambda ts, m: m.update(denoise=False), r"meta nfe 10 is not steps 9 \+ 0"),
    (lambda ts, m: ts["t"].__setitem__(0, 1.5), "tensor t starts at 1.5, beyond the spec's T = 1.0"),
    (lambda ts, m: m["spec"].update(T="one"), "meta spec.T 'one' is not a number")])
def test_values_the_samplers_trust_are_checked_at_load(edit, match):
    """Each of these loaded and then sampled wrong, raised a raw error, or blamed the model (sweep of forged
    tables, re-hashed so that they pass the content hash)."""
    from gddim_runtime import from_tensors
    from_tensors(*_tampered(lambda ts, m: None))                                  # the untouched table loads
    with pytest.raises(TableError, match=match):
        from_tensors(*_tampered(edit))


def test_meta_that_is_not_an_object_is_one_line(tmp_path):
    tensors, _ = read_table(COEFFS / "cld" / "cld_nfe10_quadratic_q3.safetensors")
    for meta in ([1, 2], "text", None):
        path = tmp_path / "m.safetensors"
        path.write_bytes(table_bytes(tensors, meta))
        with pytest.raises(TableError, match="meta is not a JSON object"):
            read_table(path)


def _dense_edit(edit):
    from gddim_runtime._format import DENSE_FORMAT
    tensors, meta = read_table(COEFFS / "cld" / "cld_dense.safetensors", kind=DENSE_FORMAT)
    tensors = {n: a.copy() for n, a in tensors.items()}
    meta = json.loads(json.dumps(meta))
    edit(tensors, meta)
    return tensors, meta


def _set(name, index, value):
    return lambda ts, m: ts[name].__setitem__(index, value)


@pytest.mark.parametrize("edit, match", [
    (_set("R", (3, 5), np.nan), "dense tensor R holds NaN or inf"),            # table_from_dense ran for ever
    (_set("edges", 4, np.inf), "dense tensor edges holds NaN or inf"),
    (lambda ts, m: ts.__setitem__("edges", ts["edges"][::-1].copy()), "edges must increase strictly"),
    (lambda ts, m: ts.__setitem__("edges", ts["edges"] * 2), r"edges run from 0.002 to 2, but the spec's t_min is 1/1000"),
    (lambda ts, m: ts.__setitem__("nodes", ts["nodes"][::-1].copy()), "nodes must be the Chebyshev points"),  # sampled wrong
    (lambda ts, m: ts["nodes"].__setitem__(3, ts["nodes"][3] + 1e-9), "nodes must be the Chebyshev points"),
    (lambda ts, m: ts.__setitem__("R", ts["R"][:-1]), r"dense tensor R has shape \("),                 # IndexError
    (lambda ts, m: ts.__setitem__("F", np.concatenate([ts["F"]] * 2, axis=2)), r"dense tensor F has shape"),
    (lambda ts, m: ts.__setitem__("R", ts["R"][..., 0]), r"expected \[panels, nodes, P, k, k\]"),
    (lambda ts, m: m.update(spec=[1]), "dense meta .and its spec entry. must be JSON objects")])  # AttributeError
def test_dense_structure_is_checked_at_load(edit, match):
    """Edited dense files (re-hashed, so the content hash passes) hung table_from_dense, raised IndexError /
    ValueError / AttributeError inside it, add_noise or the diffusers scheduler, or sampled wrong (sweep 6)."""
    from gddim_runtime import dense_from_tensors
    dense_from_tensors(*_dense_edit(lambda ts, m: None))
    with pytest.raises(TableError, match=match):
        dense_from_tensors(*_dense_edit(edit))


def test_two_writers_into_one_folder_leave_a_complete_manifest(tmp_path, monkeypatch):
    """Two derive runs writing one folder at once (sweep 6, with the manifest's listing slowed down): one
    listed the folder before the other's table landed and wrote its manifest last, without that table, and
    validation then failed the table as 'not listed'. write_folder holds a lock on the folder while it
    writes; here the first writer sleeps between listing and reading, and the second must wait for it."""
    import threading
    import time

    from derive import _writer
    real = _writer._file_entry
    slow = threading.Event()

    def entry(path, data):
        if threading.current_thread().name == "first" and not slow.is_set():
            slow.set()
            time.sleep(0.5)                      # the window the second writer used to fall into
        return real(path, data)
    monkeypatch.setattr(_writer, "_file_entry", entry)
    src = read_table(COEFFS / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors")
    first = threading.Thread(target=_writer.write_folder, name="first",
                             args=(tmp_path, {"a.safetensors": table_bytes(*src)}))
    first.start()
    slow.wait(5)
    _writer.write_folder(tmp_path, {"b.safetensors": table_bytes(*src)})
    first.join()
    listed = {e["file"] for e in json.loads((tmp_path / "manifest.json").read_text())["files"]}
    assert listed == {"a.safetensors", "b.safetensors"} == {p.name for p in tmp_path.iterdir()} - {"manifest.json"}


def test_a_later_run_keeps_an_edited_table_flagged_and_clears_stale_temp_files(tmp_path):
    """A table edited after derive (re-hashed, so it loads) fails validation's manifest check; a later derive
    into the folder re-listed every file from its bytes and so cleared the edit (sweep 6). Now the entry is
    kept. A killed run's temporary files are removed by the next run (it holds the folder's lock), a
    user's own hidden file is not."""
    from derive import _writer
    from validation.__main__ import _manifest_problem
    tensors, meta = read_table(COEFFS / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors")
    _writer.write_folder(tmp_path, {"a.safetensors": table_bytes(tensors, meta)})
    edited = {n: a.copy() for n, a in tensors.items()}
    edited["eps_weights"][3] *= 1.01
    (tmp_path / "a.safetensors").write_bytes(table_bytes(edited, meta))
    stale, mine = tmp_path / ".b.safetensors.k2j4_x9q.tmp", tmp_path / ".notes.tmp"
    stale.write_bytes(b"half"), mine.write_text("keep")
    assert "bytes differ" in _manifest_problem(tmp_path / "a.safetensors")
    _writer.write_folder(tmp_path, {"b.safetensors": table_bytes(tensors, meta)})
    assert "bytes differ" in _manifest_problem(tmp_path / "a.safetensors")
    assert _manifest_problem(tmp_path / "b.safetensors") is None
    assert not stale.exists() and mine.read_text() == "keep"
    _writer.write_folder(tmp_path, {"a.safetensors": table_bytes(tensors, meta)})   # derive writes it again
    assert _manifest_problem(tmp_path / "a.safetensors") is None


def test_inspect_refuses_what_the_loader_refuses_and_names_missing_meta(tmp_path):
    """inspect printed a table holding NaN (exit 0), and a table without meta 'kinds' or 'nfe' was an internal
    error (exit 3) in inspect and in validation (sweep 6): now one line, exit 2, in both."""
    import subprocess
    import sys
    tensors, meta = read_table(COEFFS / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors")
    cases = []
    bad = {n: a.copy() for n, a in tensors.items()}
    bad["eps_weights"][2, 0, 0, 0, 0] = np.nan
    cases.append((bad, meta, "tensor eps_weights holds NaN or inf"))
    cases.append((tensors, {k: v for k, v in meta.items() if k != "kinds"}, "meta lacks ['kinds']"))
    for i, (ts, m, match) in enumerate(cases):
        path = tmp_path / f"t{i}.safetensors"
        path.write_bytes(table_bytes(ts, m))
        for cmd in (["derive", "inspect", str(path)], ["validation", str(path), "--spec", "vp_linear", "--level", "fast"]):
            out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT)
            assert out.returncode == 2 and out.stderr.count("\n") == 1 and match in out.stderr, (cmd, out)


def test_a_float32_tensor_in_a_table_file_is_refused(tmp_path):
    """The reader's float64 check (sweep 8: removing it passed every test; a float32 weight would round every
    step at 1e-7). The file is forged with a valid content hash, so only the dtype check can refuse it."""
    import json as _json

    from safetensors.numpy import save

    from gddim_runtime._format import FORMAT, FORMAT_VERSION, HEADER_KEY, content_hash
    tensors, meta = read_table(COEFFS / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors")
    tensors = {n: np.ascontiguousarray(a) for n, a in tensors.items()}
    tensors["eps_weights"] = tensors["eps_weights"].astype(np.float32)
    meta_json = _json.dumps(meta, sort_keys=True, separators=(",", ":"))
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": meta_json,
              "content_sha256": content_hash(tensors, meta_json)}
    path = tmp_path / "f32.safetensors"
    path.write_bytes(save(dict(sorted(tensors.items())), metadata={HEADER_KEY: _json.dumps(header, sort_keys=True)}))
    with pytest.raises(TableError, match="tensor eps_weights is float32, expected float64"):
        read_table(path)


def test_table_bytes_do_not_depend_on_the_order_of_meta_keys():
    """Files are byte-stable: meta is serialised with sorted keys (sweep 8: dropping sort_keys passed)."""
    tensors, meta = read_table(COEFFS / "vp_linear" / "vp_linear_nfe10_quadratic_q3.safetensors")
    backwards = dict(reversed(list(meta.items())))
    assert list(backwards) != list(meta)
    assert table_bytes(tensors, backwards) == table_bytes(tensors, meta)
