"""Sampling over several processes (torch.distributed) with a result that does not depend on them.

Every sample owns a generator seeded from (seed, its global index), which draws its initial noise
and, for the stochastic samplers, its noise at every step; the batch is split into contiguous
index ranges, one per rank. The set of samples is therefore the same for any number of ranks
(and for one process). Each rank writes one shard; rank 0 writes a small JSON manifest after all
shards exist. ``read_samples`` puts them back together in global index order.

    torchrun --nproc_per_node 4 -m gddim_runtime sample --coeffs T.safetensors --model m:f \\
        --batch 1024 --device cuda --out samples.pt
    -> samples.rank0-of-4.pt ... samples.rank3-of-4.pt, samples.manifest.json

One process writes samples.pt itself (and the manifest). Backend: nccl on CUDA, gloo on CPU.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

MANIFEST_FORMAT = "gddim-samples"


def sample_seed(seed, index):
    """The 63-bit seed of sample ``index`` of a run with ``seed`` (sha256, so nearby pairs do not collide)."""
    digest = hashlib.sha256(f"gddim-sample:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def per_sample_noise(seed, indices, device):
    """A noise source for ``sample`` (option _noise) with one generator per sample."""
    from ._samplers import _Noise
    gens = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in indices]
    return _Noise(per_sample=gens)


def split(total, world_size, rank):
    """Contiguous share of [0, total) for ``rank``: (start, count), sizes differing by at most one."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def shard_path(out, rank, world_size):
    out = Path(out)
    return out if world_size == 1 else out.with_name(f"{out.stem}.rank{rank}-of-{world_size}{out.suffix}")


def manifest_path(out):
    out = Path(out)
    return out.with_name(f"{out.stem}.manifest.json")


def world():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(device):
    """Join the process group when launched by torchrun with several ranks; returns the rank's device."""
    _, size, local = world()
    if size == 1:
        return device
    import torch.distributed as dist
    cuda = str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _atomic_save(obj, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def write_shard(u, out, rank, world_size):
    _atomic_save(u.cpu(), shard_path(out, rank, world_size))


def write_manifest(out, world_size, total, info):
    """After every shard exists (call after a barrier): the JSON manifest, written atomically."""
    shards = []
    for r in range(world_size):
        start, count = split(total, world_size, r)
        shards.append({"file": shard_path(out, r, world_size).name, "rank": r, "start": start, "count": count})
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "world_size": world_size, "total": total,
                "shards": shards, **info}
    _atomic_save(json.dumps(manifest, indent=1, sort_keys=True) + "\n", manifest_path(out))
    return manifest


def read_samples(path):
    """All samples of a run in global index order, from its manifest (or the --out path itself)."""
    from ._samplers import SamplingError
    path = Path(path)
    mpath = path if path.suffix == ".json" else manifest_path(path)
    if not mpath.exists():
        if path.exists() and path.suffix != ".json":
            return torch.load(path)
        raise SamplingError(f"{mpath}: no such manifest")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise SamplingError(f"{mpath}: not a JSON manifest ({exc})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise SamplingError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    parts = []
    for shard in sorted(manifest["shards"], key=lambda s: s["start"]):
        u = torch.load(mpath.with_name(shard["file"]))
        if u.shape[0] != shard["count"]:
            raise SamplingError(f"{mpath}: shard {shard['file']} holds {u.shape[0]} samples, manifest says {shard['count']}")
        parts.append(u)
    return torch.cat(parts)


def png_grid(x, path):
    """Save [n, C, H, W] (C = 1 or 3) or [n, H, W] data as one image grid (values in [-1, 1] -> [0, 1])."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    x = x.detach().cpu().to(torch.float64)
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, 3))
    img = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    if c == 1:
        img = np.repeat(img, 3, axis=-1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img[i]
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    plt.imsave(tmp, grid)
    os.replace(tmp, path)
