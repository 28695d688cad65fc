"""derive's Python API: the same numbers as the committed files, in memory, into the runtime."""

import importlib.metadata

import numpy as np
import pytest
import torch

import derive
import gddim_runtime as gr
from conftest import ROOT, SDES
from derive import SpecError, TableRequest, VerificationFailed
from gddim_runtime._format import DENSE_FORMAT, read_table

COEFFS = ROOT / "coeffs"


@pytest.fixture(scope="module")
def vp():
    return derive.derive("vp_linear")


def _same_as_file(built, path, kind=None):
    """Bytes equal to the committed file; where only tool versions differ, tensors and the rest of meta."""
    if built.to_bytes() == path.read_bytes():
        return
    tensors, meta = read_table(path) if kind is None else read_table(path, kind=kind)
    assert meta["tools"] != built.meta["tools"], f"{path.name} differs although the tool versions are the same"
    assert {k: v for k, v in meta.items() if k != "tools"} == {k: v for k, v in built.meta.items() if k != "tools"}
    for name in tensors:
        assert tensors[name].tobytes() == built.tensors[name].tobytes(), name


def test_table_in_memory_equals_committed_file(vp):
    tab = vp.table(nfe=10, order=3, grid="quadratic")
    assert tab.filename == "vp_linear_nfe10_quadratic_q3.safetensors"
    assert all(a.dtype == np.float64 for a in tab.tensors.values())
    assert tab.meta["verification"]["level"] == "fast" and tab.meta["verification"]["passed"]
    _same_as_file(tab, COEFFS / "vp_linear" / tab.filename)
    assert tab.describe() == (COEFFS / "vp_linear" / "vp_linear_nfe10_quadratic_q3.md").read_text()


def test_dense_equals_committed_file(vp):
    _same_as_file(vp.dense(), COEFFS / "vp_linear" / "vp_linear_dense.safetensors", kind=DENSE_FORMAT)


def test_dense_to_runtime_equals_the_loaded_file(vp):
    """DenseTable.to_runtime gives what gr.load_dense reads from the committed file: the same coefficients at
    any t (the file is compared with the derivation above); a tensor missing is named."""
    mem, disk = vp.dense().to_runtime(), gr.load_dense(COEFFS / "vp_linear" / "vp_linear_dense.safetensors")
    t = torch.tensor([1e-3, 0.0123, 0.5, 0.999], dtype=torch.float64)
    a, b = mem.at(t), disk.at(t)
    assert all(torch.equal(a[n], b[n]) for n in b) and mem.path == "<memory>/vp_linear_dense.safetensors"
    with pytest.raises(gr.TableError, match="missing dense tensors .'R'."):
        gr.dense_from_tensors({k: v for k, v in vp.dense().tensors.items() if k != "R"})


def test_model_error_option_steers_the_recommendation(vp):
    """model_error=0 (an exact score): the pick is the candidate of smallest exact-score proxy error alone,
    from the two terms computed separately; the default charge (1e-3) picks another configuration at NFE 5
    (auto:2 -> auto:4 eps/t on the blended auto grid); a non-auto order refuses it."""
    from derive import _autogrid
    exact, _ = _autogrid.candidate_scores(vp.derivation, 10, model_error=0.0)
    cfgs = _autogrid.candidates()
    q, form, variable, corr = min(exact, key=lambda c: (exact[c], cfgs.index(c)))
    assert vp.request(10, order="auto", model_error=0.0) == TableRequest(
        nfe=10, order=q, grid=f"auto:{q}", corrector=corr, variable=variable, form=form)
    assert vp.request(5, order="auto") != vp.request(5, order="auto", model_error=0.0)
    assert vp.request(10, order="auto") == vp.request(10, order="auto", model_error=_autogrid.MODEL_ERROR)
    with pytest.raises(SpecError, match="only applies with --order auto"):
        vp.request(10, order=3, model_error=0.0)
    for bad in (True, "1e-3", None.__class__, -1e-3, float("nan"), 2.0):
        with pytest.raises(SpecError, match=r"--model-error: model_error: needs a number in \[0, 1\]"):
            vp.request(10, order="auto", model_error=bad)
    assert vp.request(10, order="auto", model_error=np.float32(0.0)) == vp.request(10, order="auto", model_error=0)


def test_spec_as_path_text_or_name_gives_the_same_table(vp):
    text = (SDES / "vp_linear.yaml").read_text()
    ref = vp.table(nfe=6, order=2, grid="logsnr", verify="none").tensors
    for spec in (SDES / "vp_linear.yaml", text, derive.load_spec(SDES / "vp_linear.yaml")):
        got = derive.derive(spec).table(nfe=6, order=2, grid="logsnr", verify="none").tensors
        assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)


def test_spec_defaults_fill_unset_options(vp):
    """vp_linear's default order is auto: an unset option is the recommendation's, a set one wins."""
    from derive._autogrid import recommend
    assert vp.spec.tables.order == "auto" and vp.spec.tables.grid is None
    rec = recommend(vp.derivation, 7)
    assert vp.request(7) == TableRequest(nfe=7, order=rec["order"], grid=rec["grid"], corrector=rec["corrector"],
                                         variable=rec["variable"], form=rec["form"])
    assert vp.request(7, variable="t", form="eps") == TableRequest(nfe=7, order=rec["order"], grid=rec["grid"],
                                                                   corrector=rec["corrector"])
    assert vp.request(7, order=2) == TableRequest(nfe=7, order=2, grid="quadratic")     # the paper's grid
    assert [r.nfe for r in vp.requests()] == list(vp.spec.tables.nfe)


def test_runtime_samples_equal_from_memory_and_from_file(vp, tmp_path):
    """A table handed over in memory samples bit for bit like the same table read from its file."""
    tab = vp.table(nfe=8, order=3, grid="logsnr", verify="none")
    path = tab.save(tmp_path)
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / f"{tab.name}.md").is_file()

    def model(u, t):                      # a fixed smooth non-linear eps model
        return torch.tanh(u) * (1 + t.view(-1, 1, 1))
    u_T = torch.randn(16, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out_mem = gr.sample(model, tab.to_runtime("cpu"), x_T=u_T, dtype=torch.float64)
    out_file = gr.sample(model, gr.load(path), x_T=u_T, dtype=torch.float64)
    assert torch.equal(out_mem, out_file)


def test_verify_goes_through_the_independent_checker(vp):
    tab = vp.table(nfe=6, order=3, verify="none")
    assert tab.meta["verification"]["level"] == "none"
    assert tab.verify("fast").passed
    bad = dict(tab.tensors, eps_weights=tab.tensors["eps_weights"] * (1 + 1e-6))
    assert not derive.BuiltTable(tab.request, tab.spec, bad, tab.meta).verify("fast").passed


def test_a_verifier_can_be_passed_in(tmp_path):
    calls = []

    class Report:
        passed = False

        def summary(self):
            return {"worst": "planted"}

        def text(self):
            return "planted failure"

    def verifier(spec, tensors, meta, level):
        calls.append((spec.name, meta["nfe"], level))
        return Report()
    d = derive.derive("vp_linear", verifier=verifier)
    with pytest.raises(VerificationFailed, match="planted failure"):
        d.table(nfe=5, verify="full")
    assert calls == [("vp_linear", 5, "full")]


def test_no_verifier_installed_is_a_clear_error(monkeypatch, vp):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    with pytest.raises(SpecError, match="no verifier installed"):
        vp.table(nfe=5)
    assert vp.table(nfe=5, verify="none").meta["verification"]["level"] == "none"


def test_jobs_do_not_change_the_numbers(vp):
    requests = [TableRequest(nfe=5, order=2), TableRequest(nfe=6, order=3, lam="1", corrector=True)]
    one = vp.tables(requests, verify="none", jobs=1)
    two = vp.tables(requests, verify="none", jobs=2)
    assert [t.to_bytes() for t in one] == [t.to_bytes() for t in two]


@pytest.mark.parametrize("options, fragment", [
    (dict(nfe=2, order=3), "smaller than the order"), (dict(nfe=5, order=0), "1..4"),
    (dict(nfe=5, lam="-1"), "> 0"), (dict(nfe=5, grid="zigzag"), "unknown grid"),
    (dict(nfe=1), "no sampling step"), (dict(nfe=5, corrector="yes"), "True or False"),
])
def test_bad_requests_refused_before_any_work(options, fragment):
    with pytest.raises(SpecError, match=fragment):
        TableRequest(**options)


@pytest.mark.parametrize("options, fragment", [
    (dict(nfe="10"), r"--nfe: nfe: must be an integer in 1..10000, got '10'"),
    (dict(nfe=10.0), r"got 10.0"), (dict(nfe=True), r"got True"),
    (dict(nfe=10, order="3"), r"--order: order: must be an integer 1..4, got '3'"),
    (dict(nfe=[10]), r"got \[10\]")])
def test_table_arguments_of_the_wrong_type_name_the_type(vp, options, fragment):
    """A string NFE failed with TypeError ''<' not supported between str and int', a float NFE inside order
    auto's recommendation; '3' for the order was reported as 'must be 1..4, got 3'."""
    with pytest.raises(SpecError, match=fragment):
        vp.table(**options)


def test_numpy_integers_are_accepted_as_nfe_and_order(vp):
    import numpy as np
    a = vp.table(nfe=np.int64(5), order=np.int32(2), verify="none")
    assert a.to_bytes() == vp.table(nfe=5, order=2, verify="none").to_bytes()


def test_request_is_a_frozen_value():
    r = TableRequest(nfe=10, lam="0.5")
    assert r.lam == "1/2" and r == TableRequest(nfe=10, lam="1/2") and hash(r) == hash(TableRequest(nfe=10, lam="1/2"))
    with pytest.raises(AttributeError):
        r.nfe = 11


def test_order_auto_takes_the_recommendation_and_samples_with_its_sampler():
    """order="auto" (CLI --order auto): per NFE the order, auto grid, variable, form and corrector of
    ``_autogrid.recommend``; the runtime's default sampler for that table is the recommended one."""
    import torch
    import gddim_runtime as gr
    from derive import derive
    from derive._autogrid import recommend
    d = derive("cld")
    rec = recommend(d.derivation, 10)
    built = d.table(nfe=10, order="auto")
    r = built.request
    assert (r.order, r.grid, r.variable, r.form, r.corrector) == (
        rec["order"], rec["grid"], rec["variable"], rec["form"], rec["corrector"])
    tab = built.to_runtime()
    assert gr.default_sampler(tab) == rec["sampler"]
    x_T = torch.randn((3, 2, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = lambda x, t: 0.3 * x
    assert torch.equal(gr.sample(model, tab, x_T=x_T, dtype=torch.float64),
                       gr.sample(model, tab, x_T=x_T, dtype=torch.float64, sampler=rec["sampler"]))
    assert d.table(nfe=10, order=2, grid="quadratic").request.order == 2              # explicit wins


def test_saved_tables_verify_as_they_are_and_folders_keep_one_spec(vp, tmp_path, capsys):
    """save() wrote the table, its .md and the manifest but no spec.yaml, so `python -m validation FOLDER` stopped
    with 'no spec.yaml beside the table'; a cld table saved into a vp_linear folder went in without a word.
    The spec.yaml is the one python -m derive writes (same bytes)."""
    import validation.__main__ as vmain
    tab = vp.table(nfe=5, order=2, verify="none")
    path = tab.save(tmp_path / "mine")
    assert path == tmp_path / "mine" / tab.filename
    written = vp.write(tmp_path / "cli", [tab])
    assert (tmp_path / "mine" / "spec.yaml").read_bytes() == (tmp_path / "cli" / "vp_linear" / "spec.yaml").read_bytes()
    assert vmain.main([str(tmp_path / "mine"), "--level", "fast"]) == 0 and written
    capsys.readouterr()
    tab.save(tmp_path / "mine")                                              # again: fine
    other = derive.derive("ve").table(nfe=4, order=1, verify="none")
    with pytest.raises(SpecError, match="holds the tables of another spec"):
        other.save(tmp_path / "mine")
    with pytest.raises(SpecError, match="save: cannot write"):
        tab.save(path)                                                       # a file, not a folder


def test_api_calls_of_the_wrong_kind_are_named(vp, tmp_path):
    """verify('bogus') raised KeyError, tables([(10, 2)]) an internal error, write(out, tab) a TypeError and
    write(..., dense=True) an AttributeError."""
    tab = vp.table(nfe=5, order=2, verify="none")
    for call, match in ((lambda: tab.verify("bogus"), "verify: level: must be 'fast' or 'full'"),
                        (lambda: vp.tables([(10, 2)]), "expected TableRequest values"),
                        (lambda: vp.write(tmp_path, [tab], dense=True), "expected BuiltTable values")):
        with pytest.raises(SpecError, match=match):
            call()
    assert [p.name for p in vp.write(tmp_path, tab)][0] == tab.filename     # one table is taken as [tab]
