"""validation.calibrate: the sampler configuration chosen with the model itself.

- The reference it scores against (the model's probability flow, dopri5 at 1e-8, then the final
  denoising with the model) against validation.bench's reference (exact score, dopri5 at 1e-9,
  exact denoising): a different tolerance and a different denoising path.
- Each candidate's error is its mean endpoint distance to that reference, recomputed here from the
  runtime's samples against the bench reference.
- The choice: the smallest error wins; a candidate that cannot run (variable undefined) is skipped.
- Slow: on the CLD rings at NFE 10, the pick made on 128 draws of one noise seed is scored on 500
  draws of another: within 1.2x of the best candidate there and better than ``--order auto``'s.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import derive
import gddim_runtime as gr
from validation import bench
from validation.calibrate import choose, energy_distance, pick, prior_draws, reference
from validation.exact import DenseModel, MixtureScore


@pytest.fixture(scope="module")
def vp():
    d = derive.derive("vp_linear")
    mix = MixtureScore(*bench.rings())
    dense = d.dense().to_runtime()
    base = d.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime()
    x_T = bench.prior(base, 32, (2,), ("identity", ()))
    exact, _ = bench.reference_endpoint(mix, dense, base, x_T, 1e-9)
    return d, DenseModel(mix, dense), x_T, exact[:, 0]


def test_a_pick_that_does_not_follow_the_model_is_flagged(vp):
    """best["spread"] is the rms spread of the reference's samples, computed here from the independent exact
    endpoints; the warning fires when even the best candidate is off by more than FOLLOWS of it (NFE 2: one
    step from T; a learned 3-state chain gave samples 1e2-2e4 off at NFE 10-20 and calibrate wrote its pick
    without a word) and not at NFE 8, where the pick is within 1.5 % of the spread."""
    from validation.calibrate import FOLLOWS, not_followed
    d, model, x_T, exact = vp
    spread = float((exact - exact.mean(0)).square().mean().sqrt())
    configs = [("uniform", 1, "t", "gddim"), ("auto", 3, "t", "gddim_x0_pc")]
    coarse, _ = choose(d, model, 2, x_T, configs=configs[:1])
    fine, _ = choose(d, model, 8, x_T, configs=configs)
    for best in (coarse, fine):
        assert abs(best["spread"] - spread) < 1e-5 * spread
    assert coarse["endpoint"] > 2 * FOLLOWS * spread and fine["endpoint"] < 0.5 * FOLLOWS * spread
    warning = not_followed(coarse)
    assert warning.startswith(f"warning: the best candidate ends {coarse['endpoint']:.3g} from the model's own flow")
    assert not_followed(fine) is None


def test_reference_is_the_models_flow(vp):
    d, model, x_T, exact = vp
    ref = reference(d, model, x_T)[:, 0]
    assert float((ref - exact).abs().max()) < 1e-5                 # 1.3e-6 measured


def test_scores_are_endpoint_and_w1_distances(vp):
    d, model, x_T, exact = vp
    configs = [("auto", 1, "t", "gddim"), ("auto", 3, "t", "gddim_x0_pc"), ("uniform", 2, "t", "gddim")]
    best, ev = choose(d, model, 8, x_T, configs=configs, score="endpoint")
    for grid, q, variable, sampler in configs:
        tab = d.table(nfe=8, order=q, grid=f"auto:{q}" if grid == "auto" else grid, variable=variable, form="x0",
                      corrector=True, verify="none").to_runtime()
        u = gr.sample(model, tab, x_T=x_T, sampler=sampler, dtype=torch.float64)[:, 0]
        e = float(((u - exact).norm(dim=1) / math.sqrt(2)).mean())
        w = sum(float(np.mean(np.abs(np.sort(u[:, j].numpy()) - np.sort(exact[:, j].numpy())))) for j in range(2)) / 2
        got = ev[(grid, q, variable, sampler)]
        assert abs(got["endpoint"] - e) < 1e-5 + 1e-3 * e and abs(got["w1"] - w) < 1e-5 + 1e-3 * w, (grid, q, sampler)
    assert (best["grid"], best["order"], best["sampler"]) == ("auto:3", 3, "gddim_x0_pc")
    assert ev[("auto", 1, "t", "gddim")]["endpoint"] > 3 * best["endpoint"]
    tab = d.table(nfe=8, **best["table"]).to_runtime()
    assert tab.tensors["t"].shape[0] == 8                        # 7 steps + the final denoising


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=30), st.lists(st.floats(-5, 5), min_size=1, max_size=30))
def test_energy_distance_is_twice_the_cramer_distance_in_1d(a, b):
    """In one dimension the energy distance of two sample sets is 2 int (F - G)^2 dx (F, G their empirical
    CDFs; Szekely and Rizzo): computed here from the sorted union, not from pairwise distances."""
    x, y = (torch.tensor(v, dtype=torch.float64)[:, None] for v in (a, b))
    knots = sorted(set(a) | set(b))
    cramer = sum((sum(v <= lo for v in a) / len(a) - sum(v <= lo for v in b) / len(b)) ** 2 * (hi - lo)
                 for lo, hi in zip(knots[:-1], knots[1:]))
    assert energy_distance(x, y) == pytest.approx(2 * cramer, rel=1e-9, abs=1e-9)
    assert energy_distance(x, torch.full_like(y, math.nan)) == math.inf


def test_pick_by_each_score():
    """A is best in endpoint (ratios 1 / 3), B in W1 (2 / 1), C close on both (1.2 / 1.1): "endpoint" -> A,
    "w1" -> B, "both" (the larger ratio, smallest) -> C; ties go to the earlier candidate."""
    ev = {"A": {"endpoint": 1.0, "w1": 3.0}, "B": {"endpoint": 2.0, "w1": 1.0}, "C": {"endpoint": 1.2, "w1": 1.1},
          "D": {"endpoint": math.inf, "w1": math.inf}}
    assert (pick(ev, "endpoint"), pick(ev, "w1"), pick(ev, "both")) == ("A", "B", "C")
    assert pick({"X": {"endpoint": 1.0, "w1": 1.0}, "Y": {"endpoint": 1.0, "w1": 1.0}}, "both") == "X"
    en = {k: {"endpoint": v["endpoint"], "energy": v["w1"]} for k, v in ev.items()}     # the same table in energy
    assert (pick(en, "energy"), pick(en, "endpoint+energy")) == ("B", "C")
    with pytest.raises(ValueError, match="finite"):
        pick({"D": ev["D"]})
    with pytest.raises(ValueError, match="score"):
        pick(ev, "cfd")


def test_an_undefined_candidate_is_skipped(vp, monkeypatch):
    d, model, x_T, _ = vp
    real = d.table

    def table(nfe, **kw):
        if kw.get("variable") == "rho":
            raise derive.SpecError("x.yaml", "variable", "undefined here")
        return real(nfe, **kw)
    monkeypatch.setattr(d, "table", table)
    best, ev = choose(d, model, 6, x_T, configs=[("auto", 2, "rho", "gddim_x0"), ("auto", 2, "t", "gddim_x0")])
    assert ev[("auto", 2, "rho", "gddim_x0")]["endpoint"] == math.inf and best["variable"] == "t"


def test_parametrization_is_passed_through(vp):
    """The same exact model returning x0 (parametrization "x0") instead of eps_R: the same flow, so the same
    evaluations (float64 conversions only)."""
    d, model, x_T, _ = vp
    configs = [("auto", 2, "t", "gddim"), ("auto", 2, "t", "gddim_x0_pc")]
    _, a = choose(d, model, 6, x_T, configs=configs)
    _, b = choose(d, DenseModel(model.mix, model.dense, parametrization="x0"), 6, x_T, configs=configs,
                  parametrization="x0")
    for key in configs:
        for m in ("endpoint", "w1"):
            assert abs(a[key][m] - b[key][m]) < 1e-7 * (1 + a[key][m]), (key, m, a[key][m], b[key][m])


def test_prior_draws_are_the_benchmarks(vp):
    """prior_draws (R_T z) == validation.bench.prior's draws from the same seed (its own code path)."""
    d = vp[0]
    base = d.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime()
    ours = prior_draws(base, 16, (2,), torch.Generator().manual_seed(0))
    assert torch.equal(ours, bench.prior(base, 16, (2,), ("identity", ())))


def test_needs_draws(vp):
    d, model, _, _ = vp
    with pytest.raises(ValueError, match="x_T"):
        choose(d, model, 6)


@pytest.mark.slow
def test_calibrated_pick_holds_on_fresh_noise_cld_rings():
    """Chosen on 128 draws (seed 1), scored on 1000 others (validation.bench's prior, seed 0) against the
    model's flow from those draws (dopri5 at 1e-8): within 1.2x of the best of the 96 candidates there, and
    within 1.2x of ``--order auto``'s data-blind pick. Before the blended auto grid the pick was also >= 1.3x
    better than that default (4.76e-2 vs 6.52e-2); since the blend the default, auto:4 x0+pc/rho, is itself
    the best of the 96 on these draws (7.83e-2; auto_default.md "After the blend") and calibrate picks its
    neighbour auto:4 x0+pc/t (1.16x). On 500 draws, as this test had, the same pick measured 1.207x: the
    mean endpoint error's own noise at that size, so the test scores on the 1000 of auto_default.csv."""
    from derive import _autogrid
    d = derive.derive("cld")
    mix = MixtureScore(*bench.rings())
    dense = d.dense().to_runtime()
    model = DenseModel(mix, dense)
    best, _ = choose(d, model, 10, batch=128, data_shape=(2,), generator=torch.Generator().manual_seed(1))
    base = d.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime()
    x_T = bench.prior(base, 1000, (2,), ("identity", ()))
    _, ev = choose(d, model, 10, x_T)                            # every candidate on the fresh draws
    fresh = {key: v["endpoint"] for key, v in ev.items()}
    rec = _autogrid.recommend(d.derivation, 10)
    rec_key = ("auto", rec["order"], rec["variable"], rec["sampler"])
    grid = "auto" if best["grid"].startswith("auto") else best["grid"]
    pick = fresh[(grid, best["order"], best["variable"], best["sampler"])]
    assert pick <= 1.2 * min(fresh.values()), (best, pick, min(fresh.values()))
    assert pick <= 1.2 * fresh[rec_key], (best, pick, rec, fresh[rec_key])


@pytest.mark.slow
def test_calibrated_pick_is_within_1_2x_of_the_held_out_best_vp_rings():
    """"Our best" for a rule that does not see the scoring noise: the candidate best on 1000 draws of seed 1,
    scored on 1000 draws of seed 0 (validation.bench's prior). The pick from 128 draws of seed 1 is within
    1.2x of it on seed 0 at NFE 5 and 10 (auto_default.md: 1.00 and 1.17; against the in-sample best of seed 0,
    chosen after seeing it, NFE 10 is 1.30 -- winner's curse). Candidates: calibrate's 96 (auto_default.md's
    held-out best ranges over ~120). The data-blind recommendation in the pick's place fails (NFE 5: 0.146
    vs 1.2 x 0.067)."""
    d = derive.derive("vp_linear")
    mix = MixtureScore(*bench.rings())
    dense = d.dense().to_runtime()
    model = DenseModel(mix, dense)
    base = d.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime()
    seed0 = bench.prior(base, 1000, (2,), ("identity", ()))
    seed1 = prior_draws(base, 1000, (2,), torch.Generator().manual_seed(1))
    for nfe in (5, 10):
        best, _ = choose(d, model, nfe, batch=128, data_shape=(2,), generator=torch.Generator().manual_seed(1))
        _, ev1 = choose(d, model, nfe, seed1)
        _, ev0 = choose(d, model, nfe, seed0)
        held = min(ev1, key=lambda k: ev1[k]["endpoint"])
        grid = "auto" if best["grid"].startswith("auto") else best["grid"]
        pick = ev0[(grid, best["order"], best["variable"], best["sampler"])]["endpoint"]
        assert pick <= 1.2 * ev0[held]["endpoint"], (nfe, best, pick, held, ev0[held])


@pytest.mark.slow
def test_calibrated_pick_rescues_the_64d_mixture():
    """Where the data-blind default fails (VP, the 64-D mixture of validation.peers: auto's measured grid
    leaves the high-noise end with few steps), the model's choice -- with the quadratic grid offered
    beside auto -- is held-out better: picked on 128 draws (seed 1), scored on 300 others (seed 0)
    against dopri5 (1e-8) with the exact score. Measured on these draws with the model-error charge in the
    default (auto q4 x0+pc/rho at NFE 10): NFE 10 3.5e-2 vs 8.2e-2 (before the charge: 2.0e-1); NFE 20 the pick
    6.5e-3 on these draws, the default 3.8e-2 on auto_default.md's 1000 (10.5x the best there); asserted 1.8x
    at NFE 10, 3x at NFE 20. With auto alone on offer it fails (NFE 20: 4.6e-2)."""
    from derive import _autogrid
    from validation.peers import mixture64
    d = derive.derive("vp_linear")
    mix = MixtureScore(*mixture64())
    dense = d.dense().to_runtime()
    model = DenseModel(mix, dense)
    base = d.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime()
    x_T = bench.prior(base, 300, (64,), ("identity", ()))
    exact = bench.reference_endpoint(mix, dense, base, x_T, 1e-8)[0][:, 0]

    def err(table_kw, sampler, nfe):
        u = gr.sample(model, d.table(nfe=nfe, verify="none", **table_kw).to_runtime(), x_T=x_T, sampler=sampler,
                      dtype=torch.float64)[:, 0]
        return float(((u - exact).norm(dim=1) / 8).mean())
    for nfe, factor in ((10, 1.8), (20, 3)):
        best, _ = choose(d, model, nfe, batch=128, data_shape=(64,), generator=torch.Generator().manual_seed(1))
        rec = _autogrid.recommend(d.derivation, nfe)
        ours = err(best["table"], best["sampler"], nfe)
        default = err(rec["table"],
                      rec["sampler"], nfe)
        assert factor * ours < default, (nfe, best, ours, rec, default)


def test_held_out_best_and_counts():
    """bench_auto's report of calibrate (auto_default.md): the held-out best is the seed-0 value of the
    configuration best on seed 1 (not the seed-0 minimum), per metric; a pick counts as within 1.2x
    at exactly 1.2 and not above; points without seed-1 rows count only in-sample."""
    from validation.bench_auto import calibrated_counts, held_out_best
    sel = {"a": {"endpoint_error": 1.0, "cfd": 4.0}, "b": {"endpoint_error": 2.0, "cfd": 1.0},
           "c": {"endpoint_error": 3.0, "cfd": 2.0}}
    other = {"a": {"endpoint_error": 5.0, "cfd": 1.0}, "c": {"endpoint_error": 0.5, "cfd": 9.0}}
    assert held_out_best(sel, other) == {"endpoint_error": 3.0, "cfd": 4.0}
    assert held_out_best(sel, {}) is None
    recs = [{"rule": "x", "in": {"endpoint_error": 1.2, "cfd": 1.21}, "held": {"endpoint_error": 0.9, "cfd": 1.3}},
            {"rule": "x", "in": {"endpoint_error": 1.0, "cfd": 1.0}, "held": None}]
    line = [r for r in calibrated_counts(recs).splitlines() if r.startswith("| x ")][0]
    assert line == "| x | 2 of 2 | 1 of 2 | 1 of 1 | 0 of 1 |"


class _Float32Net(torch.nn.Module):
    """The exact model as a user's float32 network: a parameter that requires grad, inputs asserted to
    arrive in float32, output float32 (the exact score evaluated in float64 on the float32 inputs)."""

    def __init__(self, exact):
        super().__init__()
        self.exact, self.one = exact, torch.nn.Parameter(torch.ones((), dtype=torch.float32))
        self.dtypes = set()

    def forward(self, u, t):
        self.dtypes.add((u.dtype, t.dtype))
        return self.exact(u.to(torch.float64), t.to(torch.float64)).to(torch.float32) * self.one


def test_a_float32_network_is_calibrated_in_float32(vp):
    """choose() with a float32 network whose parameters require grad: the model gets float32 inputs
    (its parameters' dtype; before, float64 inputs raised a dtype mismatch, and the buffered steps an
    autograd error), the samplers' state stays float64, and the scores agree with the float64 model's
    on the same draws to float32 rounding (1e-4 relative at these errors), so the pick is the same."""
    d, model, x_T, _ = vp
    configs = [("auto", q, v, s) for q in (2, 3) for v in ("t", "logsnr") for s in ("gddim", "gddim_x0_pc")]
    net = _Float32Net(model)
    best, ev = choose(d, net, 5, x_T, configs=configs)
    best64, ev64 = choose(d, model, 5, x_T, configs=configs)
    assert net.dtypes == {(torch.float32, torch.float32)}
    keys = ("grid", "order", "variable", "sampler", "table")
    assert {k: best[k] for k in keys} == {k: best64[k] for k in keys}
    for key in configs:
        assert ev[key]["endpoint"] == pytest.approx(ev64[key]["endpoint"], rel=1e-4), key



def test_cli_writes_the_pick_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    """python -m validation.calibrate: the pick equals choose()'s on the same draws (seed 0), the table it
    writes is verified, has that configuration and samples with the picked sampler by default; bad
    input exits 2 with one line on stderr and writes nothing."""
    from validation.calibrate import main
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import toy_models
    out = tmp_path / "chosen"
    assert main(["vp_linear", "--model", "toy_models:vp_rings_exact", "--nfe", "5", "--batch", "32",
                 "--out", str(out)]) == 0
    best, _ = choose(derive.derive("vp_linear"), toy_models.vp_rings_exact(), 5, batch=32, data_shape=(2,))
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 1
    table = gr.load(files[0])
    assert gr.default_sampler(table) == best["sampler"] and table.order == best["order"]
    assert (table.meta["grid"]["name"], table.meta.get("variable", "t")) == (best["grid"], best["variable"])
    assert f"{best['sampler']} on {best['grid']}" in capsys.readouterr().out
    for extra in (["--model", "toy_models"], ["--model", "no_such_module:f"], ["--model", "toy_models:broken"],
                  ["--model", "toy_models:vp_rings_exact", "--nfe", "1"], ["--model", "toy_models:vp_rings_exact",
                                                                          "--data-shape", "0"],
                  ["--model", "toy_models:vp_rings_exact", "--nfe", "2", "--out", "/proc/no_such_dir/x"]):
        args = ["vp_linear", "--nfe", "5", "--batch", "8", "--data-shape", "2", "--out", str(tmp_path / "bad")]
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, (extra, err)
    assert not (tmp_path / "bad").exists()


def test_choose_names_bad_candidates_and_nfe(vp):
    """nfe 1, configs=[] or a candidate with an unknown grid / order 9 all ended in 'no candidate configuration
    gave a finite endpoint' after deriving tables; a 3-tuple in a raw unpacking error."""
    vp = vp[0]
    model = lambda u, t: torch.zeros_like(u)
    for kw, match in ((dict(nfe=1), "nfe must be an integer >= 2"), (dict(nfe=6, configs=[]), "configs is empty"),
                      (dict(nfe=6, configs=[("bogus", 2, "t", "gddim")]), r"candidate \('bogus'"),
                      (dict(nfe=6, configs=[("quadratic", 9, "t", "gddim")]), r"candidate \('quadratic', 9"),
                      (dict(nfe=6, configs=[("quadratic", 2, "t")]), r"candidate \('quadratic', 2, 't'\) is not")):
        with pytest.raises(ValueError, match=match):
            choose(vp, model, batch=4, data_shape=(2,), **kw)


def test_reference_of_a_model_that_never_settles_ends_in_a_sampling_error(vp):
    """A NaN/inf output ended in torchdiffeq's 'AssertionError: underflow in dt 0.0' (calibrate: exit 3); a
    model whose output changes between calls on the same input (dropout in train mode) ran dopri5 for ever."""
    vp = vp[0]
    x_T = torch.randn(4, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nan_late = lambda u, t: torch.full_like(u, float("nan")) if float(t[0]) < 0.5 else torch.zeros_like(u)
    with pytest.raises(gr.SamplingError, match="did not reach t_min .*underflow in dt"):
        reference(vp, nan_late, x_T)
    gen = torch.Generator().manual_seed(1)
    jitter = lambda u, t: 0.01 * torch.randn(u.shape, generator=gen, dtype=u.dtype)     # differs on every call
    dense = vp.dense().to_runtime("cpu")
    one = vp.table(nfe=2, order=1, grid="uniform", verify="none").to_runtime("cpu")
    with pytest.raises(gr.SamplingError, match="max_num_steps exceeded"):
        gr.sample(jitter, one, x_T=x_T, sampler="probability_flow_rk45", dense=dense, rtol=1e-8, atol=1e-8,
                  dtype=torch.float64, max_steps=200)


def test_calibrate_cli_checks_model_device_and_out_before_the_work(tmp_path, capsys, monkeypatch):
    import types

    from validation.calibrate import main
    mod = types.ModuleType("calib_models")
    mod.none = lambda: None
    mod.zero = lambda: (lambda u, t: torch.zeros_like(u))
    monkeypatch.setitem(__import__("sys").modules, "calib_models", mod)
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["vp_linear", "--nfe", "4", "--data-shape", "2", "--batch", "4"]
    for extra, match in ((["--model", "calib_models:none"], "the factory returned NoneType"),
                         (["--model", "calib_models:zero", "--device", "meta"], "--device: meta: the meta device holds no data"),
                         (["--model", "calib_models:zero", "--out", str(afile)], "exists and is not a folder")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_calibrate_cli_reports_the_users_code_failing_as_the_users(capsys, monkeypatch):
    """A model (or factory) that raises was reported as 'internal error in calibrate: <its message>' (exit 3):
    calibrate's bug by its words, with the traceback hidden. Now: the user's traceback, then one line naming
    --model and the exception, exit 2. The exception is the user's own class, so nothing of ours can mimic it."""
    import types

    from validation.calibrate import main

    class NetBroke(Exception):
        pass

    def forward(u, t):
        raise NetBroke("mat1 and mat2 shapes cannot be multiplied (4x2 and 3x8)")

    def factory():
        raise NetBroke("checkpoint.pt not found")
    mod = types.ModuleType("calib_raising")
    mod.bad_model, mod.bad_factory = (lambda: forward), factory
    monkeypatch.setitem(__import__("sys").modules, "calib_raising", mod)
    base = ["vp_linear", "--nfe", "4", "--data-shape", "2", "--batch", "4"]
    for name, what, message in (("bad_model", "the model", "mat1 and mat2"), ("bad_factory", "the factory", "checkpoint")):
        assert main(base + ["--model", f"calib_raising:{name}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("Traceback") and any("NetBroke" in line for line in err[1:-1])
        assert err[-1].startswith(f"error: --model: calib_raising:{name}: {what} raised NetBroke: {message}"), err[-1]
        assert "internal error" not in "\n".join(err)
