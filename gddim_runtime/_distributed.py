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
MANIFEST_VERSION = 1                  # readers accept 1..this; version 1 manifests may lack the shard sha256


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
    """After every shard exists (call after a barrier): the JSON manifest, written atomically. Each shard's
    sha256 is recorded, so that ``read_samples`` refuses a shard of another run (a failed rerun into the same
    --out left the old shards beside the new ones, and they were read back mixed, without a word)."""
    shards = []
    for r in range(world_size):
        start, count = split(total, world_size, r)
        file = shard_path(out, r, world_size)
        shards.append({"file": file.name, "rank": r, "start": start, "count": count, "sha256": sha256(file)})
    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "world_size": world_size,
                "total": total, "shards": shards, **info}
    _atomic_save(json.dumps(manifest, indent=1, sort_keys=True) + "\n", manifest_path(out))
    return manifest


def remove_manifest(out):
    """Before a run writes its shards: the previous run's manifest must not describe them."""
    try:
        manifest_path(out).unlink()
    except FileNotFoundError:
        pass


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_samples(path):
    """All samples of a run in global index order, from its manifest (or the --out path itself). The
    manifest is checked whole: its format and version, shards that tile [0, total) once each, and every
    shard's bytes against the sha256 recorded when it was written; any defect is a SamplingError."""
    from ._samplers import SamplingError
    path = Path(path)
    mpath = path if path.suffix == ".json" else manifest_path(path)
    if not mpath.is_file():
        if path.is_file() and path.suffix != ".json":
            return _load(path, SamplingError)
        raise SamplingError(f"{mpath}: no such manifest")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, OSError) as exc:
        raise SamplingError(f"{mpath}: not a JSON manifest ({exc})") from None
    shards = _checked_shards(manifest, mpath, SamplingError)
    parts = []
    for shard in shards:
        file = mpath.with_name(shard["file"])
        if not file.is_file():
            raise SamplingError(f"{mpath}: shard {shard['file']} is missing")
        if "sha256" in shard and sha256(file) != shard["sha256"]:
            raise SamplingError(f"{mpath}: shard {shard['file']} is not the one this run wrote (sha256 differs: "
                                "another run's shard, or replaced)")
        u = _load(file, SamplingError)
        if u.shape[0] != shard["count"]:
            raise SamplingError(f"{mpath}: shard {shard['file']} holds {u.shape[0]} samples, manifest says {shard['count']}")
        if parts and (u.shape[1:] != parts[0].shape[1:] or u.dtype != parts[0].dtype):
            raise SamplingError(f"{mpath}: shard {shard['file']} is {u.dtype} {tuple(u.shape)}, the first "
                                f"{parts[0].dtype} {tuple(parts[0].shape)}")
        parts.append(u)
    return torch.cat(parts)


def _checked_shards(manifest, mpath, error):
    """The manifest's shards in start order, after checking that they tile [0, total) once each."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise error(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
        raise error(f"{mpath}: format_version {version!r} (this gddim_runtime reads 1..{MANIFEST_VERSION})")
    shards, total = manifest.get("shards"), manifest.get("total")
    fields = ("file", "start", "count")
    if (not isinstance(shards, list) or not shards or not isinstance(total, int)
            or not all(isinstance(x, dict) and all(k in x for k in fields) for x in shards)):
        raise error(f"{mpath}: needs 'total' and a list of 'shards' with {', '.join(fields)}")
    shards = sorted(shards, key=lambda x: x["start"])
    at = 0
    for x in shards:
        if x["start"] != at or not isinstance(x["count"], int) or x["count"] < 0:
            raise error(f"{mpath}: shards do not tile [0, {total}) once each (at {at}: {x['file']} starts at {x['start']})")
        at += x["count"]
    if at != total or manifest.get("world_size", len(shards)) != len(shards):
        raise error(f"{mpath}: shards hold {at} samples in {len(shards)} files; manifest says total {total}, "
                    f"world_size {manifest.get('world_size')}")
    return shards


def _load(file, error):
    try:
        u = torch.load(file, weights_only=True)
    except Exception as exc:                               # torch's unpickling errors are long; one line here
        raise error(f"{file}: not a samples file written by gddim_runtime ({type(exc).__name__})") from None
    if not torch.is_tensor(u):
        raise error(f"{file}: holds a {type(u).__name__}, not a samples tensor")
    return u


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
