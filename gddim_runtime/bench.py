"""Benchmark: the sampler's per-step cost beyond the model, and the same work through diffusers.

    python -m gddim_runtime.bench [--device cpu|cuda] [--repeats 15] [--threads 1] [--compile]

With a zero-cost model (the identity), side by side in one process, interleaved repeats:

1. Overhead: ``gr.sample`` (gDDIM, NFE 50 order 3 with the final denoising, batch 256 x 3x32x32,
   float32) on CLD and BDM (DCT basis) against a bare loop that does the same tensor work in
   place (the same preallocated buffer, fused matmul / multiply-adds, NaN flag, copies) written
   inline with its matrices built before the clock starts. Per step: both times, the overhead in
   microseconds and the ratio (median over repeats of the per-repeat ratio, and its range); again
   at batch 1, where the tensor work is negligible and the difference is the fixed cost per step.
2. diffusers: the same VP work (VP linear, 50 steps, 50 model evaluations, batch 64 x 3x32x32) through
   ``DDIMScheduler`` (vs gDDIM order 1) and ``DPMSolverMultistepScheduler`` (order 2, vs gDDIM
   order 2), each loop timed whole, set-up included.
3. On CUDA also: each step's memory-traffic floor (bytes the step must read and write over the
   measured device-to-device copy bandwidth) and the ratio to it, and the graph-capture speed-up
   (``sample(..., compile=...)`` against eager: the compiled step and the whole-call CUDA graph); on
   the CPU the compiled step with ``--compile``.

Torch runs on ``--threads`` CPU threads (default 1: on a shared 2-core machine, two threads
spend their time waiting for each other). The VP tables of order 1 and 2 are derived on the fly
(python -m derive in a subprocess, into a temporary folder), so this script needs derive's
dependencies; the runtime itself does not.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gddim_runtime as gr
from gddim_runtime._table import block_apply

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 32, 32)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _identity(x, t):
    return x


class _Bare:
    """gDDIM (predictor, order q, final denoising) written as a bare in-place loop: the same tensor
    operations as the runtime's, no plan, evaluator, callbacks, checks of shapes or options."""

    def __init__(self, table, batch, dtype=torch.float32):
        tensors = table.tensors
        self.N, self.q, self.k, self.P = table.steps, table.order, table.k, table.P
        self.dct = table.basis[0] == "dct2d"
        self.basis = table.basis
        N, q, k = self.N, self.q, self.k
        S = q
        self.S = S
        self.t = [tensors["t"][i].to(dtype).expand(batch) for i in range(N + 1)]
        self.ring = [1 + m % S for m in range(N + 1)]
        self.cur = [0 if i % 2 == 0 else S + 1 for i in range(N + 1)]
        # fused weights per step, columns in slot order of the step's run (built by plain loops)
        self.W = []
        for i in range(N):
            first = i % 2
            cols = [None] * (S + 1)
            cols[self.cur[i] - first] = tensors["psi"][i]
            for j in range(q):
                if i - j >= 0:
                    cols[self.ring[i - j] - first] = tensors["eps_weights"][i, j]
            cols = [torch.zeros_like(tensors["psi"][i]) if c is None else c for c in cols]
            W = torch.stack(cols).to(dtype)                                # [S+1, P, k, k]
            if self.P == 1 and k > 1:
                self.W.append(W[:, 0].permute(1, 0, 2).reshape(k, (S + 1) * k).expand(batch, k, (S + 1) * k))
            elif self.P > 1:
                self.W.append(list(W[:, :, 0, 0].reshape((S + 1,) + table.basis[1])))
            else:
                self.W.append(list(W[:, 0, 0, 0]))
        self.x0w = tensors["x0_weights"].to(dtype)
        self.batch, self.dtype = batch, dtype

    def __call__(self, model, x_T):
        N, S, k, B = self.N, self.S, self.k, self.batch
        buf = torch.zeros((B, S + 2, k) + SHAPE, dtype=self.dtype, device=x_T.device)
        slots = [buf[:, s] for s in range(S + 2)]
        flat = buf.view(B, (S + 2) * k, -1)
        ok = torch.ones(N + 1, dtype=torch.bool, device=x_T.device)
        slots[0].copy_(gr.dct2(x_T) if self.dct else x_T)
        for i in range(N):
            u = slots[self.cur[i]]
            out = model(gr.idct2(u) if self.dct else u, self.t[i])
            ok[i].logical_and_(torch.isfinite(out.sum()))
            slots[self.ring[i]].copy_(gr.dct2(out) if self.dct else out)
            first, dst = i % 2, self.cur[i + 1]
            c = self.W[i]
            if self.P == 1 and k > 1:
                torch.bmm(c, flat[:, first * k:(first + S + 1) * k], out=flat[:, dst * k:(dst + 1) * k])
            else:                                                          # k = 1 (BDM: per-frequency)
                torch.mul(slots[first], c[0], out=slots[dst])
                for s in range(1, S + 1):
                    slots[dst].addcmul_(slots[first + s], c[s])
        u = slots[self.cur[N]]
        out = model(gr.idct2(u) if self.dct else u, self.t[N])
        ok[N].logical_and_(torch.isfinite(out.sum()))
        o = slots[self.ring[N]]
        o.copy_(gr.dct2(out) if self.dct else out)
        x0 = block_apply(self.x0w[0], u, self.basis) + block_apply(self.x0w[1], o, self.basis)
        bool((~ok).any())                                                  # the one host read after the loop
        return gr.idct2(x0) if self.dct else x0


def _median_ratio(a, b):
    r = sorted(x / y for x, y in zip(a, b))
    return statistics.median(r), r[0], r[-1]


def overhead(name, file, device, batch, repeats):
    table = gr.load(ROOT / "coeffs" / name / file, device=device)
    x_T = torch.randn((batch, table.k) + SHAPE, device=device, generator=torch.Generator(device).manual_seed(0))
    bare = _Bare(table, batch)
    N = table.steps
    ours, base = [], []
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a = gr.sample(_identity, table, x_T=x_T, denoise=True, progress=False)
        _sync(device)
        t1 = time.perf_counter()
        b = bare(_identity, x_T)
        _sync(device)
        t2 = time.perf_counter()
        if r == 0:                                                         # warm-up; and the two agree
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), name
            continue
        ours.append(t1 - t0)
        base.append(t2 - t1)
    per = lambda v: statistics.median(v) / (N + 1) * 1e6
    ratio, lo, hi = _median_ratio(ours, base)
    best = lambda v: min(v) / (N + 1) * 1e6
    line = (f"| {name} | {device} | {batch} | {N} | {per(ours):.0f} | {per(base):.0f} | "
            f"{per(ours) - per(base):+.0f} | {ratio:.3f} ({lo:.2f}-{hi:.2f}) | {best(ours):.0f} / {best(base):.0f} |")
    if str(device).startswith("cuda"):
        n = x_T.numel() * 4
        q = table.order
        # a step reads the state and q model outputs and writes the new state, copies the model
        # output into the buffer (read + write) and reduces it once (read); DCT round trip for BDM
        traffic = n * (q + 1 + 1 + 2 + 1) + (4 * n if table.basis[0] == "dct2d" else 0)
        bw = _bandwidth(device)
        floor = traffic / bw * 1e6
        line += f" floor {floor:.1f} us/step ({per(ours) / floor:.2f}x floor, {bw / 1e9:.0f} GB/s)"
    print(line, flush=True)


def _bandwidth(device):
    src = torch.empty(64 * 2 ** 20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * 20 / (time.perf_counter() - t0)


def _vp_table(order, folder, device):
    name = f"vp_linear_nfe50_quadratic_q{order}_nodenoise.safetensors"
    path = Path(folder) / "vp_linear" / name
    if not path.exists():
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "derive", "vp_linear", "--nfe", "50", "--order", str(order),
                               "--no-denoise", "--no-verify", "--quiet", "--out", str(folder)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"derive failed: {proc.stderr.strip()}")
    return gr.load(path, device=device)


def diffusers_loops(device, batch, repeats, folder):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    x_T = torch.randn((batch, 1) + SHAPE, device=device, generator=torch.Generator(device).manual_seed(0))
    x_d = x_T[:, 0].contiguous()
    model_d = lambda x, t: x

    def run_diffusers(cls):
        sched = cls(num_train_timesteps=1000, beta_schedule="linear")
        sched.set_timesteps(50, device=device)
        x = x_d
        for t in sched.timesteps:
            x = sched.step(model_d(x, t), t, x).prev_sample
        return x

    rows = []
    for order, cls in ((1, DDIMScheduler), (2, DPMSolverMultistepScheduler)):
        table = _vp_table(order, folder, device)
        ours, theirs = [], []
        for r in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            _, info = gr.sample(_identity, table, x_T=x_T, denoise=False, progress=False, return_info=True)
            _sync(device)
            t1 = time.perf_counter()
            run_diffusers(cls)
            _sync(device)
            t2 = time.perf_counter()
            if r == 0:
                assert info["nfe"] == 50
                continue
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
        ratio, lo, hi = _median_ratio(ours, theirs)
        per = lambda v: statistics.median(v) / 50 * 1e6
        rows.append(f"| VP, gDDIM q{order} vs {cls.__name__} | {device} | {batch} | 50 | {per(ours):.0f} | "
                    f"{per(theirs):.0f} | {ratio:.3f} ({lo:.2f}-{hi:.2f}) | {min(ours) / min(theirs):.3f} |")
        print(rows[-1], flush=True)
    return rows


def compile_speedup(device, batch, repeats):
    """Graph capture against eager on CLD (gDDIM q3, NFE 50): on the CPU ``compile=True`` (torch.compile
    of the step); on CUDA ``compile="reduce-overhead"`` (the compiled step, CUDA graphs per step) and
    ``compile="graph"`` (the whole call as one graph; what True means on CUDA)."""
    table = gr.load(ROOT / "coeffs" / "cld" / "cld_nfe50_quadratic_q3.safetensors", device=device)
    modes = [False, "reduce-overhead", "graph"] if str(device).startswith("cuda") else [False, True]
    for b in (batch, 1):
        x_T = torch.randn((b, table.k) + SHAPE, device=device, generator=torch.Generator(device).manual_seed(0))
        times = {m: [] for m in modes}
        for r in range(repeats + 2):
            for m in modes:
                _sync(device)
                t0 = time.perf_counter()
                gr.sample(_identity, table, x_T=x_T, denoise=True, progress=False, compile=m)
                _sync(device)
                if r >= 2:                                                 # compile and capture first
                    times[m].append(time.perf_counter() - t0)
        for m in modes[1:]:
            ratio, lo, hi = _median_ratio(times[False], times[m])
            print(f"compile={m!r} (CLD q3, NFE 50, batch {b}, {device}): eager "
                  f"{statistics.median(times[False]) * 1e3:.2f} ms, compiled {statistics.median(times[m]) * 1e3:.2f} ms "
                  f"per call, speed-up {ratio:.2f}x ({lo:.2f}-{hi:.2f})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256, help="batch of the overhead runs (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per row (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--skip", nargs="*", default=[], choices=["overhead", "diffusers", "compile"])
    p.add_argument("--compile", action="store_true", help="also time graph capture on the CPU (always on CUDA)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    print(f"device {dev}" + (f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else
                             f", {args.threads} thread(s)") + f", {args.repeats} repeats, medians (range of the per-repeat ratio)")
    if "overhead" not in args.skip:
        print("\n| spec | device | batch | steps | runtime us/step | bare loop us/step | overhead us/step | ratio | "
              "best of repeats, runtime / bare us/step |\n|---|---|---|---|---|---|---|---|---|")
        for batch in (args.batch, 1):                  # batch 1: the fixed per-step cost, tensor work negligible
            overhead("cld", "cld_nfe50_quadratic_q3.safetensors", dev, batch, args.repeats)
            overhead("bdm", "bdm_nfe50_quadratic_q3.safetensors", dev, batch, args.repeats)
    if "diffusers" not in args.skip:
        print("\n| work | device | batch | steps | gddim_runtime us/step | diffusers us/step | ratio | ratio of best |\n"
              "|---|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as folder:
            diffusers_loops(dev, 64, args.repeats, folder)
    if "compile" not in args.skip and (dev.startswith("cuda") or args.compile):
        compile_speedup(dev, args.batch, args.repeats)


if __name__ == "__main__":
    main()
