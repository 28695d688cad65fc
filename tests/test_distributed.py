"""Sampling over several processes: the same samples for any number of ranks (gloo on CPU), the
shard + manifest output, per-sample noise, and the --png grid."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gddim_runtime as gr
from gddim_runtime import _distributed as dist
from conftest import ROOT

TABLE = ROOT / "coeffs" / "cld" / "cld_nfe10_quadratic_q3.safetensors"


def _env():
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")


def _cli(out, *extra, launcher=None):
    cmd = [sys.executable, "-m", "gddim_runtime", "sample", "--coeffs", str(TABLE), "--model", "toy_models:shrink",
           "--batch", "7", "--seed", "3", "--out", str(out), *extra]
    if launcher is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={launcher}",
               "-m", *cmd[2:]]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def test_split_covers_every_index_once():
    for total in (0, 1, 7, 64):
        for size in (1, 2, 3, 8):
            parts = [dist.split(total, size, r) for r in range(size)]
            assert [i for s, n in parts for i in range(s, s + n)] == list(range(total))
            assert max(n for _, n in parts) - min(n for _, n in parts) <= 1


@pytest.mark.parametrize("sampler", ["gddim", "euler_maruyama"])
def test_per_sample_noise_does_not_depend_on_the_batch(sampler):
    """Sample i's result depends only on (seed, i): samples 0-6 in one batch equal 0-2 and 3-6 apart."""
    tab = gr.load(TABLE)
    model = lambda u, t: 0.1 * u
    run = lambda idx: gr.sample(model, tab, batch=len(idx), data_shape=(2, 4), sampler=sampler,
                                _noise=dist.per_sample_noise(3, idx, "cpu"))
    whole = run(range(7))
    parts = torch.cat([run(range(0, 3)), run(range(3, 7))])
    assert torch.allclose(whole, parts, rtol=1e-6, atol=1e-6 * float(whole.abs().max()))
    assert not torch.allclose(whole[0], whole[1])                   # distinct samples have distinct noise
    again = run([5, 2])
    assert torch.allclose(again, whole[[5, 2]], rtol=1e-6, atol=1e-6 * float(whole.abs().max()))


def test_two_gloo_processes_equal_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) writes two shards and a manifest whose samples equal one process's."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    proc = _cli(one)
    assert proc.returncode == 0, proc.stderr
    proc = _cli(two, launcher=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.manifest.json", "one.pt", "two.manifest.json",
                                                         "two.rank0-of-2.pt", "two.rank1-of-2.pt"]
    manifest = json.loads((tmp_path / "two.manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["total"] == 7 and manifest["nfe_per_sample"] == 10
    assert [(s["start"], s["count"]) for s in manifest["shards"]] == [(0, 4), (4, 3)]
    a, b = gr.read_samples(one), gr.read_samples(two)
    assert a.shape == (7, 2, 2, 4) and torch.equal(a, torch.load(one))
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


def test_png_grid(tmp_path):
    import matplotlib.image as mpimg
    out, png = tmp_path / "s.pt", tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "-m", "gddim_runtime", "sample", "--coeffs", str(TABLE), "--model",
                           "toy_models:shrink", "--batch", "5", "--data-shape", "1", "4", "6", "--out", str(out),
                           "--png", str(png)], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    img = mpimg.imread(png)
    assert img.shape[:2] == (2 * 5 + 1, 3 * 7 + 1)                  # 5 images of 4 x 6 on a 2 x 3 grid, 1-px gaps
    x = torch.load(out)[:, 0, 0]
    first = torch.from_numpy(img[1:5, 1:7, 0].astype("float64"))
    assert torch.allclose(first, ((x[0].double().clamp(-1, 1) + 1) / 2), atol=1 / 255 + 1e-6)
    proc = _cli(tmp_path / "t.pt", "--data-shape", "8", "--png", str(tmp_path / "no.png"))   # not an image
    assert proc.returncode == 2 and proc.stderr.startswith("error: --png needs image-shaped data")
    assert not (tmp_path / "no.png").exists() and not (tmp_path / "t.pt").exists()


def test_output_locations_are_checked_before_sampling(tmp_path, capsys, monkeypatch):
    """An --out or --png in a missing folder (or naming a folder) used to fail with a traceback after
    all the sampling work; now: one line, exit 2, before the model is even built."""
    import toy_models
    from gddim_runtime.__main__ import main
    built = []
    monkeypatch.setattr(toy_models, "counted", lambda: built.append(1) or (lambda u, t: torch.zeros_like(u)),
                        raising=False)
    base = ["sample", "--coeffs", str(TABLE), "--model", "toy_models:counted", "--batch", "2", "--data-shape", "1", "4", "4"]
    for extra, message in ((["--out", str(tmp_path / "no" / "s.pt")], "--out .*folder .* does not exist"),
                           (["--out", str(tmp_path)], "--out .*is a folder"),
                           (["--out", str(tmp_path / "s.pt"), "--png", str(tmp_path / "no" / "g.png")],
                            "--png .*does not exist"),
                           # sweep 12: these failed after the sampling, with a traceback (exit 1) or as a manifest
                           (["--out", str(tmp_path / "s.pt"), "--png", str(tmp_path / "g.xyz")], "--png .*ending in .png"),
                           (["--out", str(tmp_path / "s.json")], "--out .*manifest"),
                           (["--out", "/proc/s.pt"], "--out .*not writable")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not built and list(tmp_path.iterdir()) == []
    assert main(base + ["--out", str(tmp_path / "s.pt")]) == 0 and built == [1]
    assert gr.read_samples(tmp_path / "s.pt").shape == (2, 2, 1, 4, 4)
    manifest = json.loads((tmp_path / "s.manifest.json").read_text())
    assert manifest["denoise"] is True and manifest["nfe_per_sample"] == 10
    # eps_L_v never denoises: the manifest said "denoise": true beside 9 evaluations (sweep 12)
    monkeypatch.setattr(toy_models, "counted_v", lambda: lambda u, t: torch.zeros_like(u[:, -1:]), raising=False)
    assert main(base[:4] + ["toy_models:counted_v"] + base[5:] + ["--out", str(tmp_path / "v.pt"),
                                                                 "--parametrization", "eps_L_v"]) == 0
    manifest = json.loads((tmp_path / "v.manifest.json").read_text())
    assert manifest["denoise"] is False and manifest["nfe_per_sample"] == 9


def test_read_samples_refuses_a_manifest_that_does_not_describe_the_files(tmp_path, monkeypatch):
    """A rerun that failed half-way left the last run's manifest and shards beside the new ones, and
    read_samples returned them mixed (first half seed 7, second half seed 0) without a word; a shard of
    another run, a shard listed twice, edited totals and a newer format_version were read as well.
    Now: each shard's sha256 is in the manifest, the shards must tile [0, total) once each, and a run
    removes the previous manifest before it samples."""
    import shutil

    import toy_models
    from gddim_runtime.__main__ import main
    base = ["sample", "--coeffs", str(TABLE), "--model", "toy_models:shrink", "--batch", "5", "--data-shape", "2"]
    assert main(base + ["--seed", "7", "--out", str(tmp_path / "b.pt")]) == 0
    assert main(base + ["--out", str(tmp_path / "a.pt")]) == 0
    good = gr.read_samples(tmp_path / "a.pt")
    manifest = json.loads((tmp_path / "a.manifest.json").read_text())
    assert good.shape == (5, 2, 2) and len(manifest["shards"][0]["sha256"]) == 64

    def broken(edit=None, swap=False):
        folder = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
        folder.mkdir()
        shutil.copy(tmp_path / "a.pt", folder / "a.pt")
        m = json.loads(json.dumps(manifest))
        if edit:
            edit(m)
        (folder / "a.manifest.json").write_text(json.dumps(m))
        if swap:
            shutil.copy(tmp_path / "b.pt", folder / "a.pt")       # another run's shard under this name
        return folder / "a.pt"

    cases = [(dict(swap=True), "not the one this run wrote"),
             (dict(edit=lambda m: m.update(total=1000)), "manifest says total 1000"),
             (dict(edit=lambda m: m["shards"].append(dict(m["shards"][0]))), "do not tile"),
             (dict(edit=lambda m: m.update(format_version=99)), "format_version 99"),
             (dict(edit=lambda m: m.update(shards=[])), "a list of 'shards'"),
             (dict(edit=lambda m: m.update(shards=None)), "a list of 'shards'")]
    for kw, match in cases:
        with pytest.raises(gr.SamplingError, match=match):
            gr.read_samples(broken(**kw))
    missing = broken()
    missing.unlink()
    with pytest.raises(gr.SamplingError, match="shard a.pt is missing"):
        gr.read_samples(missing)

    def failing():
        raise RuntimeError("the model cannot be built")
    monkeypatch.setattr(toy_models, "failing", failing, raising=False)
    with pytest.raises(RuntimeError):                                   # a rerun into the same --out that fails
        main(["sample", "--coeffs", str(TABLE), "--model", "toy_models:failing", "--batch", "5", "--data-shape", "2",
              "--out", str(tmp_path / "a.pt")])
    assert not (tmp_path / "a.manifest.json").exists()                 # no manifest describes a run that failed
    assert torch.equal(gr.read_samples(tmp_path / "a.pt"), good)         # one process: its file is still whole
    shard = tmp_path / "c.rank0-of-2.pt"                                  # several: shards alone are not a run
    shutil.copy(tmp_path / "a.pt", shard)
    with pytest.raises(gr.SamplingError, match="no such manifest"):
        gr.read_samples(tmp_path / "c.pt")


def test_a_misused_model_factory_is_one_line(tmp_path, capsys, monkeypatch):
    """sweep 12: an attribute that is not callable, a factory that needs arguments, and one returning a
    class gave tracebacks (exit 1); now one line naming --model, exit 2, nothing written."""
    import toy_models
    from gddim_runtime.__main__ import main
    monkeypatch.setattr(toy_models, "number", 3, raising=False)
    monkeypatch.setattr(toy_models, "needs", lambda width: None, raising=False)
    monkeypatch.setattr(toy_models, "a_class", lambda: torch.nn.Linear, raising=False)
    base = ["sample", "--coeffs", str(TABLE), "--batch", "2", "--data-shape", "1", "4", "4",
            "--out", str(tmp_path / "s.pt")]
    for name, message in (("number", "is a int, not a function"), ("needs", "called with no arguments"),
                          ("a_class", "the class Linear")):
        assert main(base + ["--model", f"toy_models:{name}"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--model" in err and message in err, err
    assert list(tmp_path.iterdir()) == []
