"""python -m gddim_runtime sample: draw samples with a table and a model from the shell.

Example:
  python -m gddim_runtime sample --coeffs coeffs/cld/cld_nfe50_quadratic_q3.safetensors \\
      --model mypkg.nets:make_model --batch 64 --data-shape 3 32 32 --device cuda --out samples.pt \\
      --png samples.png
  torchrun --nproc_per_node 4 -m gddim_runtime sample ... --batch 1024 --device cuda --out samples.pt

--model names a factory ``module:function`` called with no arguments that returns
model(u, t) -> tensor (see gddim_runtime.sample). Sample i's noise comes from its own generator
seeded by (--seed, i), so the samples are the same whatever the number of processes. Under
torchrun each rank samples a contiguous share of the --batch samples and writes one shard
(<out stem>.rank<r>-of-<n><suffix>); rank 0 then writes <out stem>.manifest.json (one process:
--out itself and the manifest). gddim_runtime.read_samples(out) reassembles them. Backend nccl
on CUDA, gloo on CPU. Exit status 2 on bad input.
"""

import argparse
import os
import importlib
import inspect
import sys
import tempfile


def _parser():
    p = argparse.ArgumentParser(prog="python -m gddim_runtime", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw samples")
    s.add_argument("--coeffs", required=True, help="table file (.safetensors) written by python -m derive")
    s.add_argument("--model", required=True, help="factory module:function returning model(u, t)")
    s.add_argument("--batch", type=int, default=64, help="number of samples over all processes (default: %(default)s)")
    s.add_argument("--max-batch", type=int, default=None,
                   help="most samples per model call on one process (default: the process's whole share)")
    s.add_argument("--data-shape", type=int, nargs="+", default=None,
                   help="data shape per state component, e.g. 3 32 32 (default: the model's .data_shape)")
    s.add_argument("--sampler", default=None, help="gddim, gddim_pc, gddim_sde, gddim_x0, gddim_x0_pc, euler_maruyama, "
                                                   "heun, ancestral (default: the one the table was derived for)")
    s.add_argument("--parametrization", default="eps_R", help="eps_R, eps_L, score, x0 or eps_L_v (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="torch device; under torchrun cuda means cuda:<local rank> "
                                                  "(default: %(default)s)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="state dtype (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed; sample i uses a generator seeded by (seed, i) (default: %(default)s)")
    s.add_argument("--no-denoise", action="store_true", help="skip the final denoising evaluation")
    s.add_argument("--compile", action="store_true", help="on CUDA: capture the whole call as one CUDA graph (samplers without noise); on the CPU: torch.compile the gDDIM step")
    s.add_argument("--out", default="samples.pt", help="output file, torch.save of [B, k, *shape] (default: %(default)s)")
    s.add_argument("--png", default=None, help="also write a grid image of the data component (u[:, 0]) to this "
                                               "file; data shape must be (C, H, W) with C = 1 or 3, or (H, W)")
    return p


def _check_outputs(args, error):
    """Before any work: --out and --png must name files in existing folders (not folders themselves)."""
    from pathlib import Path
    for flag, path in (("--out", args.out), ("--png", args.png)):
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise error(f"{flag} {str(path)!r}: is a folder; give a file name")
        if not path.parent.is_dir():
            raise error(f"{flag} {str(path)!r}: folder {str(path.parent)!r} does not exist")
        try:                                   # a file is made and removed there: access() says yes to root on /proc
            fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".gddim-write-check-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:                 # found after the sampling, with a traceback, before
            raise error(f"{flag} {str(path)!r}: not writable ({exc.strerror})") from None
    if args.png is not None and Path(args.png).suffix.lower() != ".png":
        raise error(f"--png {args.png!r}: the grid is written as PNG; give a file name ending in .png")
    if Path(args.out).suffix.lower() == ".json":
        raise error(f"--out {args.out!r}: .json names a sharded run's manifest; give the samples file (e.g. samples.pt)")


def _model(text, error):
    """model(u, t) from the factory ``module:function`` (called with no arguments)."""
    mod_name, _, fn_name = text.partition(":")
    if not fn_name:
        raise error(f"--model {text!r}: expected module:function")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise error(f"--model {text!r}: {exc}") from None
    if not callable(factory):
        raise error(f"--model {text!r}: {fn_name} is a {type(factory).__name__}, not a function returning the model")
    try:
        inspect.signature(factory).bind()
    except TypeError as exc:                   # a factory that needs arguments: the CLI calls it with none
        raise error(f"--model {text!r}: the factory is called with no arguments ({exc})") from None
    except ValueError:                         # no signature to read (a builtin): let the call decide
        pass
    model = factory()
    if not callable(model) or isinstance(model, type):
        what = f"the class {model.__name__} (not an instance)" if isinstance(model, type) else type(model).__name__
        raise error(f"--model {text!r}: the factory returned {what}, not a callable model(u, t)")
    return model


def main(argv=None):
    args = _parser().parse_args(argv)
    import torch

    import gddim_runtime as gr
    from gddim_runtime import _distributed as dist
    rank, world_size, _ = dist.world()
    try:
        if args.batch < 1 or (args.max_batch is not None and args.max_batch < 1):
            raise gr.SamplingError("--batch and --max-batch must be positive")
        _check_outputs(args, gr.SamplingError)
        if rank == 0:
            dist.remove_manifest(args.out)                  # a failed run must not leave the last one's manifest
        device = dist.init(args.device)
        table = gr.load(args.coeffs, device=device)
        model = _model(args.model, gr.SamplingError)
        shape = args.data_shape or getattr(model, "data_shape", None)
        if shape is None:
            raise gr.SamplingError("--data-shape is required (the model has no .data_shape)")
        shape = tuple(shape)
        if args.png and not (len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))):
            raise gr.SamplingError(f"--png needs image-shaped data (C, H, W) with C = 1 or 3, or (H, W); got {shape}")
        start, count = dist.split(args.batch, world_size, rank)
        chunk = args.max_batch or max(count, 1)
        parts, nfe = [], 0
        for lo in range(start, start + count, chunk):
            idx = range(lo, min(lo + chunk, start + count))
            u, info = gr.sample(model, table, batch=len(idx), data_shape=shape, parametrization=args.parametrization,
                                sampler=args.sampler, dtype=getattr(torch, args.dtype), compile=args.compile,
                                denoise=False if args.no_denoise else None, return_info=True,
                                _noise=dist.per_sample_noise(args.seed, idx, device))
            parts.append(u.cpu())
            nfe = info["nfe"]
        u = torch.cat(parts) if parts else torch.empty((0, table.k) + shape)
        dist.write_shard(u, args.out, rank, world_size)
        dist.barrier()
        if rank == 0:
            dist.write_manifest(args.out, world_size, args.batch, {
                "seed": args.seed, "coeffs": str(args.coeffs), "coeffs_sha256": dist.sha256(args.coeffs),
                "sampler": args.sampler or gr.default_sampler(table), "parametrization": args.parametrization, "dtype": args.dtype,
                "shape": [table.k, *shape], "nfe_per_sample": nfe,
                "denoise": not args.no_denoise and bool(table.meta.get("denoise", True))
                and args.parametrization != "eps_L_v"})                 # what sample() took: eps_L_v never denoises
            where = args.out if world_size == 1 else f"{world_size} shards of {args.out}"
            print(f"wrote {(args.batch, table.k) + shape} samples to {where} ({nfe} model evaluations)")
            if args.png:
                x = gr.read_samples(args.out)[:, 0]
                dist.png_grid(x, args.png)
                print(f"wrote a grid of {x.shape[0]} images to {args.png}")
        dist.finish()
        return 0
    except (gr.TableError, gr.SamplingError) as exc:
        print(f"error: {exc}" if world_size == 1 else f"error (rank {rank}): {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
