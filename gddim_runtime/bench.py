"""Benchmark: sampler overhead per step with a zero-cost model.

    python -m gddim_runtime.bench [--device cpu|cuda] [--repeats 5]

For CLD (batch 256, 3x32x32) and BDM (batch 256, 3x32x32, DCT basis) it times the runtime's
gDDIM loop (NFE 50, order 3) and the same tensor operations written as a bare loop, side by
side in one process, and prints per-step times and their ratio (median of repeats). On CUDA it
also prints the memory-traffic floor: bytes each step must read and write over the measured
device-to-device copy bandwidth.
"""

import argparse
import time
from pathlib import Path

import torch

import gddim_runtime as gr
from gddim_runtime._samplers import _Evaluator, _Prepared, gddim
from gddim_runtime._table import block_apply

ROOT = Path(__file__).resolve().parents[1]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bare(table_c, psi, W, x0w, u, N, q, basis, model):
    """The same arithmetic as gddim(): no evaluator, no conversions, no bookkeeping."""
    hist = []
    dct = basis[0] == "dct2d"
    for i in range(N):
        x = gr.idct2(u) if dct else u
        out = model(x, None)
        eps = gr.dct2(out) if dct else out
        hist = [eps] + hist[:q - 1]
        u_new = block_apply(psi[i], u, basis)
        for j in range(min(q, i + 1)):
            u_new = u_new + block_apply(W[i, j], hist[j], basis)
        u = u_new
    x = gr.idct2(u) if dct else u
    eps = gr.dct2(model(x, None)) if dct else model(x, None)
    return block_apply(x0w[0], u, basis) + block_apply(x0w[1], eps, basis)


def run(name, file, device, batch, repeats):
    table = gr.load(ROOT / "coeffs" / name / file, device=device)
    shape = (3, 32, 32)
    model = lambda u, t: u                                              # zero-cost model
    u0 = torch.randn((batch, table.k) + shape, device=device)
    prep = _Prepared(table, torch.float32, "eps_R")
    N, q = table.steps, table.order
    ours, bare = [], []
    for _ in range(repeats):
        ev = _Evaluator(model, prep, shape, batch, None)
        _sync(device)
        t0 = time.perf_counter()
        gddim(ev, prep, u0, denoise=True)
        _sync(device)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _bare(prep.c, prep.c["psi"], prep.c["eps_weights"], prep.c["x0_weights"], u0, N, q, prep.basis, model)
        _sync(device)
        bare.append(time.perf_counter() - t0)
    med = lambda v: sorted(v)[len(v) // 2]
    per_ours, per_bare = med(ours) / (N + 1), med(bare) / (N + 1)
    line = f"| {name} | {device} | {batch} | {N} | {per_ours * 1e3:.3f} | {per_bare * 1e3:.3f} | {per_ours / per_bare:.3f} |"
    if device.startswith("cuda"):
        n = u0.numel() * 4
        # one step reads u and q history tensors (+ DCT round trip for BDM) and writes u_new and eps
        traffic = n * (q + 1 + 2) + (4 * n if table.basis[0] == "dct2d" else 0)
        src = torch.empty(64 * 2 ** 20, device=device)
        dst = torch.empty_like(src)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(20):
            dst.copy_(src)
        _sync(device)
        bw = 2 * src.numel() * 4 * 20 / (time.perf_counter() - t0)
        line += f" floor {traffic / bw * 1e3:.3f} ms ({per_ours / (traffic / bw):.2f}x floor, {bw / 1e9:.0f} GB/s)"
    print(line, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print("| spec | device | batch | steps | runtime ms/step | bare loop ms/step | ratio |\n|---|---|---|---|---|---|---|")
    run("cld", "cld_nfe50_quadratic_q3.safetensors", args.device, args.batch, args.repeats)
    run("bdm", "bdm_nfe50_quadratic_q3.safetensors", args.device, args.batch, args.repeats)


if __name__ == "__main__":
    main()
