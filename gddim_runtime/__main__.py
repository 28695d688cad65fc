"""python -m gddim_runtime sample: draw samples with a table and a model from the shell.

Example:
  python -m gddim_runtime sample --coeffs coeffs/cld/cld_nfe50_quadratic_q3.safetensors \\
      --model mypkg.nets:make_model --batch 64 --data-shape 3 32 32 --device cuda --out samples.pt

--model names a factory ``module:function`` called with no arguments that returns
model(u, t) -> tensor (see gddim_runtime.sample). Exit status 2 on bad input.
"""

import argparse
import importlib
import sys


def _parser():
    p = argparse.ArgumentParser(prog="python -m gddim_runtime", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="draw samples")
    s.add_argument("--coeffs", required=True, help="table file (.safetensors) written by python -m derive")
    s.add_argument("--model", required=True, help="factory module:function returning model(u, t)")
    s.add_argument("--batch", type=int, default=64, help="number of samples (default: %(default)s)")
    s.add_argument("--data-shape", type=int, nargs="+", default=None,
                   help="data shape per state component, e.g. 3 32 32 (default: the model's .data_shape)")
    s.add_argument("--sampler", default="gddim", help="gddim, gddim_pc, gddim_sde, euler_maruyama, heun, "
                                                      "ancestral (default: %(default)s)")
    s.add_argument("--parametrization", default="eps_R", help="eps_R, eps_L, score or x0 (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="state dtype (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    s.add_argument("--no-denoise", action="store_true", help="skip the final denoising evaluation")
    s.add_argument("--out", default="samples.pt", help="output file, torch.save of [B, k, *shape] (default: %(default)s)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    import torch
    import gddim_runtime as gr
    try:
        table = gr.load(args.coeffs, device=args.device)
        mod_name, _, fn_name = args.model.partition(":")
        if not fn_name:
            raise gr.SamplingError(f"--model {args.model!r}: expected module:function")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise gr.SamplingError(f"--model {args.model!r}: {exc}") from None
        model = factory()
        shape = args.data_shape or getattr(model, "data_shape", None)
        if shape is None:
            raise gr.SamplingError("--data-shape is required (the model has no .data_shape)")
        gen = torch.Generator(args.device).manual_seed(args.seed)
        u, info = gr.sample(model, table, batch=args.batch, data_shape=tuple(shape), parametrization=args.parametrization,
                            sampler=args.sampler, generator=gen, dtype=getattr(torch, args.dtype),
                            denoise=False if args.no_denoise else None, return_info=True)
        torch.save(u.cpu(), args.out)
        print(f"wrote {tuple(u.shape)} samples to {args.out} ({info['nfe']} model evaluations)")
        return 0
    except (gr.TableError, gr.SamplingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
