"""Learned networks: train for a derived SDE with gr.add_noise, sample them with every sampler, measure.

    python -m validation.learned --train     # train the missing checkpoints (validation/checkpoints/)
    python -m validation.learned --quick     # cached checkpoints, fewer NFE/samplers: < 10 min on 2 cores
    python -m validation.learned             # the full table -> validation/results/learned/
    python -m validation.learned --retrain   # retrain every network first (the committed ones were made so)
    python -m validation.learned --calibrated  # validation.calibrate with each network -> results/learned/calibrated.md

Data that ship with packages: scikit-learn's 8 x 8 digits (1797 images, scaled to [-1, 1]) and the 2-D rings
of validation.bench (12-component Gaussian mixture). Processes: VP (vp_linear), CLD, PSLD (non-isotropic,
k = 2) on both; BDM on digits (derive/sdes/bdm8.yaml: the bdm spec on an 8 x 8 DCT basis). One network
per data kind, same architecture and training budget for every process (validation/_nets.py: a residual MLP
plus a skip to the exact eps of Gaussian data with the data's mean and variance), trained in
the eps_R parametrisation with gr.add_noise, gr.sample_times (uniform in sqrt t) and gr.diffusion_loss.

Metrics:
  digits  FD: Frechet distance between the 32-d penultimate features of a small digit classifier (trained
          once on 80% of the real digits; held-out accuracy reported) of the samples (clipped to [-1, 1])
          and of one half of the real digits; noise floor: the other half against the same half (equal
          sizes). TV: total variation between the classifier's predicted-class histogram of the samples
          and of the real half (mode coverage).
  rings   CFD: validation.bench's component Frechet distance against the true mixture; noise floor: an
          exact sample set of the same size.
K = L vs K = R (CLD): the same eps_R network, its output converted to eps_L = L^T R^-T eps_R at each grid
time and integrated by the exponential multistep rule that freezes/extrapolates eps_L (weights
int 1/2 Psi G G^T L^-T l_j dr from validation's scipy reference; the runtime only emits K = R tables).
"""

import argparse
import time
from pathlib import Path

import torch

import gddim_runtime as gr

from . import _nets
from .bench import Tables, exact_samples, rings

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "validation" / "checkpoints"
OUT = ROOT / "validation" / "results" / "learned"
PROCESSES = {"rings": ("vp_linear", "cld", "psld"), "digits": ("vp_linear", "cld", "bdm8", "psld")}
BUDGET = {"rings": {"steps": 3000, "batch": 256}, "digits": {"steps": 2000, "batch": 128}}
NETS = {"rings": _nets.rings_net, "digits": _nets.digits_net}
SHAPES = {"rings": (2,), "digits": (8, 8)}


# ----- data ---------------------------------------------------------------------------------

def digits():
    """(images [1797, 8, 8] float32 in [-1, 1], labels [1797])."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 8 - 1, torch.tensor(d.target)


def drawer(kind):
    if kind == "digits":
        X = digits()[0]
        return lambda n, g: X[torch.randint(0, X.shape[0], (n,), generator=g)]
    means, stds = rings()
    return lambda n, g: exact_samples(means, stds, n, g).to(torch.float32)


class Process:
    """Tables (in memory, from derive) and the dense coefficients of one built-in spec."""

    def __init__(self, name):
        from derive import _tables
        self.name = name
        self.tabs = Tables(name)
        self.k = self.tabs.spec.k
        arrays = _tables.dense(self.tabs.deriv)       # what `python -m derive NAME --dense` writes (tol 1e-14)
        self.dense = gr.dense_from_tensors(arrays, path=name)


# ----- checkpoints ----------------------------------------------------------------------------

def data_moments(kind):
    """(mean [*data_shape], per-coordinate variance about it) of the data: the Gaussian skip's parameters."""
    if kind == "digits":
        X = digits()[0].to(torch.float64)
        return X.mean(0), float(X.var(0, unbiased=False).mean())
    means, stds = rings()
    return torch.zeros(2, dtype=torch.float64), float((means ** 2).sum(1).mean() / 2 + (stds ** 2).mean())


def network(kind, proc, log, retrain=False):
    """The trained eps_R network for (data kind, process): cached in validation/checkpoints/ (the learned
    part only; the Gaussian skip comes from the dense coefficients and the data's mean and variance)."""
    path = CKPT / f"{kind}_{proc.name}.safetensors"
    torch.manual_seed(0)
    net = _nets.Preconditioned(NETS[kind](proc.k), proc.dense, SHAPES[kind], *data_moments(kind))
    if path.exists() and not retrain:
        return _nets.load(net, path)
    b = BUDGET[kind]
    log(f"training {kind} / {proc.name}: {_nets.n_params(net)} parameters, {b['steps']} steps of {b['batch']}")
    avg, sec, loss = _nets.train_eps_R(net, proc.dense, drawer(kind), b["steps"], b["batch"], log=log)
    meta = {"data": kind, "process": proc.name, "parametrization": "eps_R", "params": _nets.n_params(net),
            "train_seconds": round(sec, 1), "final_loss": round(loss, 5), "threads": torch.get_num_threads(),
            "device": "cpu", **b}
    _nets.save(avg, path, meta)
    log(f"  {kind} / {proc.name}: {sec:.0f} s, loss {loss:.4f}")
    return avg, meta


def classifier(log, retrain=False):
    """Digit classifier (features for the Frechet distance), trained once on 80% of the digits."""
    path = CKPT / "digits_classifier.safetensors"
    net = _nets.Classifier()
    if path.exists() and not retrain:
        return _nets.load(net, path)
    X, y = digits()
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        for idx in tr[torch.randperm(len(tr), generator=g)].split(64):
            x = X[idx] + 0.05 * torch.randn(X[idx].shape, generator=g)       # light noise: robust features
            loss = torch.nn.functional.cross_entropy(net(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(X[te]).argmax(1) == y[te]).float().mean())
    meta = {"held_out_accuracy": round(acc, 4), "train": 1437, "test": 360, "train_seconds":
            round(time.perf_counter() - start, 1)}
    _nets.save(net, path, meta)
    log(f"classifier: held-out accuracy {acc:.4f}")
    return net, meta


def train_all(log, retrain=False):
    metas = {}
    for kind, names in PROCESSES.items():
        for name in names:
            metas[(kind, name)] = network(kind, Process(name), log, retrain)[1]
    metas[("digits", "classifier")] = classifier(log, retrain)[1]
    return metas


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m validation.learned", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="cached checkpoints, NFE 10/20/50, fewer samplers (< 10 min)")
    p.add_argument("--train", action="store_true", help="only train the missing checkpoints")
    p.add_argument("--retrain", action="store_true", help="retrain every network before measuring")
    p.add_argument("--device", default="cpu", help="torch device for sampling and --calibrated, e.g. cuda (training, --train, runs on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="output folder (default validation/results/learned[/quick])")
    p.add_argument("--calibrated", action="store_true", help="validation.calibrate with each network vs the "
                   "data-blind default and the paper's table at NFE 10 and 20 -> <out>/calibrated.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)
    if args.train or args.retrain:
        train_all(log, args.retrain)
        if args.train:
            return
    if args.calibrated:
        from . import _learned_calibrated
        start = time.perf_counter()
        lines = _learned_calibrated.run(log=log, device=args.device)
        out = Path(args.out) if args.out else OUT
        out.mkdir(parents=True, exist_ok=True)
        text = (f"# Calibrate with the learned networks (`python -m validation.learned --calibrated`, "
                f"{time.perf_counter() - start:.0f} s)\n\n" + _learned_calibrated.__doc__.split("\n", 2)[2]
                + "\n" + "\n".join(lines) + "\n")
        (out / "calibrated.md").write_text(text)
        return
    from ._learned_eval import run_all
    out = Path(args.out) if args.out else OUT / ("quick" if args.quick else "")
    run_all(quick=args.quick, out=out, device=args.device, log=log)


if __name__ == "__main__":
    main()
