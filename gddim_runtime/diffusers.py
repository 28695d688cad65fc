"""gDDIM as a diffusers scheduler, for marginal (scalar, k = 1) families such as VP/DDPM.

    from diffusers import DDPMPipeline
    from gddim_runtime.diffusers import GDDIMScheduler
    pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
    pipe.scheduler = GDDIMScheduler("coeffs/vp_linear/vp_linear_dense.safetensors", solver_order=3)
    images = pipe(num_inference_steps=10).images

The scheduler computes its table for any number of steps at ``set_timesteps`` from the dense
file (``gddim_runtime.table_from_dense``, float64, no sympy) and steps exactly as
``gddim_runtime.sample(..., sampler="gddim")`` does: with ``num_inference_steps = n`` and the
final denoising evaluation (default) it makes n - 1 multistep steps t_0 = T > ... > t_{n-1} =
t_min and returns E[x_0 | x_{t_min}] = D^-1 (x - R eps) at the n-th model call.

Conventions. The sample is the state u_t = D_t x_0 + R_t eps (VP: D = sqrt(alpha_bar), R =
sqrt(1 - alpha_bar)), passed to the model unscaled. For k = 1, R_t = std_t > 0, so the
gDDIM eps_R is the usual eps (prediction_type "epsilon"); "sample" (x_0) and "v_prediction"
(v = D eps - R x_0, DDPM/v-diffusion) are converted to it. Model timesteps are
tau = timestep_scale * t + timestep_shift; the default 1000 t - 1 is DDPM's (integer step i
has alpha_bar_i = alpha_bar((i + 1)/1000), vp_linear's beta 0.1 -> 20 being DDPM's linear
schedule 1e-4 -> 0.02 in the continuous limit), so T = 1 is timestep 999. The timesteps are
floats unless ``integer_timesteps``, which snaps the grid to t = (round(tau) - shift)/scale.
diffusers is optional: ``pip install gddim-toolkit[diffusers]``.
"""

import math
import numbers

import numpy as np
import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
except ImportError as _exc:                       # pragma: no cover - exercised in a subprocess test
    raise ImportError("gddim_runtime.diffusers needs the diffusers package: "
                      "pip install 'gddim-toolkit[diffusers]' (or pip install diffusers)") from _exc

from ._dct import dct2, idct2
from ._dense import load_dense
from ._weights import _Interp, table_from_dense

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class GDDIMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic multistep gDDIM (Zhang, Tao & Chen 2023) for a diffusers pipeline.

    dense_path: ``<name>_dense.safetensors`` written by ``python -m derive`` (k = 1 spec);
    solver_order: multistep order q, 1-4; grid: uniform | quadratic | power:<kappa> | logsnr |
    edm[:<rho>] (derive's definitions); denoise_final: the last model call returns
    E[x_0 | x_{t_min}] (True) or the last call is a step to t_min (False); prediction_type:
    epsilon | sample | v_prediction; timestep_scale, timestep_shift: model timestep
    tau = scale * t + shift; integer_timesteps: round tau and take the table at those times;
    dct_size: [H, W] for a dct2d family (BDM), else None.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, dense_path: str = "", solver_order: int = 3, grid: str = "quadratic",
                 denoise_final: bool = True, prediction_type: str = "epsilon", timestep_scale: float = 1000.0,
                 timestep_shift: float = -1.0, integer_timesteps: bool = False, num_train_timesteps: int = 1000,
                 dct_size: list = None):
        if not dense_path:
            raise ValueError("GDDIMScheduler: dense_path: give the <name>_dense.safetensors file from python -m derive")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"GDDIMScheduler: prediction_type: {prediction_type!r} is not one of {PREDICTION_TYPES}")
        if not isinstance(solver_order, int) or not 1 <= solver_order <= 4:
            raise ValueError(f"GDDIMScheduler: solver_order: needs 1-4, got {solver_order!r}")
        for name, value in (("timestep_scale", timestep_scale), ("timestep_shift", timestep_shift)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
                    name == "timestep_scale" and value == 0):
                raise ValueError(f"GDDIMScheduler: {name}: needs a finite number{' other than 0' if name == 'timestep_scale' else ''} "
                                 f"(model timestep tau = timestep_scale * t + timestep_shift), got {value!r}")
        self.dense = load_dense(dense_path)
        k, P = self.dense.values["R"].shape[-1], self.dense.values["R"].shape[-3]
        if k != 1:
            raise ValueError(f"GDDIMScheduler: {dense_path}: k = {k} state components; a diffusers pipeline "
                             "carries the data only, so this scheduler takes marginal (k = 1) families; "
                             "use gddim_runtime.sample for the others")
        recorded = (self.dense.meta.get("spec") or {}).get("basis") or {}
        if P > 1 and dct_size is None and recorded.get("kind") == "dct2d":         # dense files that record it
            dct_size = [int(v) for v in recorded["size"]]
            self.register_to_config(dct_size=dct_size)
        if P > 1 and (dct_size is None or int(dct_size[0]) * int(dct_size[1]) != P):
            side = math.isqrt(P)
            if dct_size is not None or side * side != P:
                raise ValueError(f"GDDIMScheduler: dct_size: {dct_size!r} does not match the dense file's {P} coordinates")
            self.register_to_config(dct_size=[side, side])
        ip = _Interp(self.dense)
        self.t_min, self.T = ip.t_min, ip.T
        self.init_noise_sigma = float(ip(("R",), [ip.T])["R"][0, 0, 0, 0])   # std of x_T (VP: sqrt(1 - alpha_bar_T))
        self.table = None
        self.timesteps = None
        self.num_inference_steps = None
        self._step_index = None
        self._history = []
        self._probed = set()                                     # step counts whose table the stability probe ran on

    # ----- saving: the dense file travels with the config ----------------------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """The config (diffusers' scheduler_config.json) plus a copy of the dense file beside it, recorded by
        its name: the saved folder loads anywhere (the absolute or working-directory path did not)."""
        import shutil
        from pathlib import Path
        src, folder = Path(self.config.dense_path), Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / src.name).exists() or not (folder / src.name).samefile(src):
            shutil.copyfile(src, folder / src.name)
        before = self.config.dense_path
        self.register_to_config(dense_path=src.name)
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            self.register_to_config(dense_path=before)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """diffusers' loader, with a relative dense_path taken inside the saved folder (save_pretrained's copy)."""
        import os
        config, kwargs, _ = cls.load_config(pretrained_model_name_or_path=pretrained_model_name_or_path,
                                            subfolder=subfolder, return_unused_kwargs=True, return_commit_hash=True,
                                            **kwargs)
        inside = os.path.join(str(pretrained_model_name_or_path), subfolder or "", config.get("dense_path", ""))
        if config.get("dense_path") and not os.path.isabs(config["dense_path"]) and os.path.isfile(inside):
            config = {**config, "dense_path": inside}
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ----- set-up -----------------------------------------------------------------------------
    def _basis(self):
        size = self.config.dct_size
        return ("dct2d", tuple(int(v) for v in size)) if size else ("identity", ())

    def _times(self, n):
        """The grid argument for table_from_dense: the named grid, or its times snapped to integer tau."""
        cfg = self.config
        if not cfg.integer_timesteps:
            return cfg.grid
        steps = n - (1 if cfg.denoise_final else 0)
        named = table_from_dense(self.dense, nfe=n, order=1, grid=cfg.grid, denoise=cfg.denoise_final,
                                 basis=self._basis(), probe=False).t.tolist()
        tau = [round(cfg.timestep_scale * t + cfg.timestep_shift) for t in named]
        times = [min(max((v - cfg.timestep_shift) / cfg.timestep_scale, self.t_min), self.T) for v in tau]
        if any(b >= a for a, b in zip(times, times[1:])) or len(times) != steps + 1:
            raise ValueError(f"GDDIMScheduler: {n} steps do not fit distinct integer timesteps on this grid")
        return times

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Build the table for ``num_inference_steps`` model evaluations (float64, from the dense file)."""
        cfg = self.config
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
            raise ValueError(f"GDDIMScheduler: num_inference_steps: needs an integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        if n < (2 if cfg.denoise_final else 1):
            raise ValueError(f"GDDIMScheduler: num_inference_steps: needs at least {2 if cfg.denoise_final else 1}, got {n}")
        device = torch.device("cpu" if device is None else device)
        self.table = table_from_dense(self.dense, nfe=n, order=cfg.solver_order, grid=self._times(n),
                                      denoise=cfg.denoise_final, device=device, basis=self._basis(),
                                      probe=n not in self._probed)      # the stability probe once per step count
        self._probed.add(n)
        calls = self.table.steps + (1 if cfg.denoise_final else 0)
        tau = cfg.timestep_scale * self.table.t[:calls] + cfg.timestep_shift
        self.timesteps = tau.round() if cfg.integer_timesteps else tau
        if device.type == "mps":                                           # no float64 there
            self.timesteps = self.timesteps.float()
        self.num_inference_steps = n
        self._step_index, self._history = None, []

    @property
    def step_index(self):
        return self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model takes the state x_t itself: unchanged."""
        return sample

    def __len__(self):
        return self.config.num_train_timesteps

    # ----- stepping ---------------------------------------------------------------------------
    def _coef(self, name, *index, dtype):
        """A table coefficient as a scalar or an [H, W] per-frequency tensor, in ``dtype``."""
        c = self.table.tensors[name][index][..., 0, 0].to(dtype)                     # [P]
        return c[0] if c.shape[0] == 1 else c.view(self._basis()[1])

    def _index(self, timestep):
        if self.timesteps is None:
            raise ValueError("GDDIMScheduler: call set_timesteps(num_inference_steps) before step()")
        tau = float(timestep)
        if not math.isfinite(tau):
            raise ValueError(f"GDDIMScheduler: timestep {tau!r} is not one of scheduler.timesteps")
        i = int((self.timesteps.double().cpu() - tau).abs().argmin())
        if abs(float(self.timesteps[i]) - tau) > 1e-6 * (abs(tau) + 1):
            raise ValueError(f"GDDIMScheduler: timestep {tau!r} is not one of scheduler.timesteps")
        if i == 0:
            self._history = []                                            # a new sampling run
        elif i != self._step_index:
            raise ValueError(f"GDDIMScheduler: timestep {tau!r} is step {i}, expected step {self._step_index} "
                             "(a multistep scheduler steps in the order of scheduler.timesteps)")
        return i

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One gDDIM step from t_i = timesteps[i]: x_{i+1} = psi_i x_i + sum_j C_ij eps_{i-j}; the last
        call (denoise_final) returns D^-1 (x - R eps) at t_min. ``generator`` is unused (deterministic)."""
        i = self._index(timestep)
        if not (torch.is_tensor(model_output) and torch.is_tensor(sample)) or model_output.shape != sample.shape:
            raise ValueError(f"GDDIMScheduler: model_output {_shape(model_output)} and sample {_shape(sample)} must be "
                             "tensors of the same shape")
        if i > 0 and self._history and self._history[0].shape != sample.shape:
            raise ValueError(f"GDDIMScheduler: sample shape {tuple(sample.shape)} changed mid-run (was "
                             f"{tuple(self._history[0].shape)}): start again at scheduler.timesteps[0]")
        dtype = torch.promote_types(sample.dtype, torch.float32)
        dct = self._basis()[0] == "dct2d"
        u = sample.to(dtype)
        out = model_output.to(dtype)
        if dct:
            u, out = dct2(u), dct2(out)
        eps = self._eps(out, u, i, dtype)
        N = self.table.steps
        if i == N:                                                        # final denoising at t_min
            new = self._coef("x0_weights", 0, dtype=dtype) * u + self._coef("x0_weights", 1, dtype=dtype) * eps
        else:
            self._history = [eps] + self._history[:self.config.solver_order - 1]   # lag 0 = newest
            new = self._coef("psi", i, dtype=dtype) * u
            for j, e in enumerate(self._history[:min(self.table.order, i + 1)]):
                new = new + self._coef("eps_weights", i, j, dtype=dtype) * e
        self._step_index = i + 1
        new = (idct2(new) if dct else new).to(sample.dtype)
        return SchedulerOutput(prev_sample=new) if return_dict else (new,)

    def _eps(self, out, u, i, dtype):
        """eps (= gDDIM's eps_R for k = 1) from the model output at grid index i."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return out
        D, R = self._coef("data_to_state", i, dtype=dtype), self._coef("R", i, dtype=dtype)
        if kind == "sample":
            return (u - D * out) / R
        return (D * out + R * u) / (D * D + R * R)                          # v = D eps - R x_0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = D_t x_0 + R_t noise at model timesteps tau (per batch element; identity basis only)."""
        if self._basis()[0] != "identity":
            raise NotImplementedError("GDDIMScheduler.add_noise: dct2d families: use gddim_runtime.add_noise")
        cfg = self.config
        timesteps = torch.as_tensor(timesteps)
        if timesteps.numel() not in (1, original_samples.shape[0]) or noise.shape != original_samples.shape:
            raise ValueError(f"GDDIMScheduler.add_noise: timesteps ({timesteps.numel()}) must be one per sample "
                             f"({original_samples.shape[0]}) and noise {tuple(noise.shape)} shaped as the samples "
                             f"{tuple(original_samples.shape)}")
        t = ((timesteps.double().reshape(-1).cpu() - cfg.timestep_shift) / cfg.timestep_scale).numpy()
        slack = 1 / abs(cfg.timestep_scale)                   # one model timestep: rounding of the grid's ends
        if not (np.isfinite(t).all() and (t >= self.t_min - slack).all() and (t <= self.T + slack).all()):
            lo, hi = sorted(cfg.timestep_scale * v + cfg.timestep_shift for v in (self.t_min, self.T))
            raise ValueError(f"GDDIMScheduler.add_noise: timesteps must lie in [{lo:g}, {hi:g}] (t in [t_min, T]); "
                             f"got {timesteps.min().item():g} .. {timesteps.max().item():g}")
        v = _Interp(self.dense)(("D", "R"), t.clip(self.t_min, self.T))
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        D = torch.from_numpy(v["D"][:, 0, 0, 0]).to(original_samples.device, original_samples.dtype).view(shape)
        R = torch.from_numpy(v["R"][:, 0, 0, 0]).to(original_samples.device, original_samples.dtype).view(shape)
        return D * original_samples + R * noise


def _shape(x):
    return tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
