"""Noise schedule and samplers of the latent diffusion model (DDPM, Ho et al. 2020; DDIM, Song et al. 2021;
PLMS, Liu et al. 2022; DPM-Solver++, Lu et al. 2022), as MinD-Vis stage B uses them.

The schedule is the CompVis "linear" one: ``betas = linspace(sqrt(b0), sqrt(b1), T)^2`` in float64 (diffusers
calls it ``scaled_linear``), cumulative products in float64, tables kept in float32.

The samplers are pure functions of an epsilon model ``eps_fn(x: [B, C, h, w], t: [B] int64) -> [B, C, h, w]``,
a starting latent ``x_T`` and the schedule, in the manner of k-diffusion:

* :func:`ddim_sample` and :func:`plms_sample` reproduce the CompVis samplers step for step: timesteps
  ``range(0, T, T // S) + 1`` run in descending order, the last step's ``alpha_prev`` is ``alphas_cumprod[0]``
  (not 1), no clipping, and PLMS starts with a pseudo improved-Euler step followed by Adams-Bashforth steps
  of order 2, 3 and 4 on the raw model outputs.
* :func:`dpmsolver_sample` runs diffusers' multistep DPM-Solver++ (order 2) on the same schedule: the fast
  path (about 25 steps).

Each sampler can report every step (``callback(StepState)``), which the parity tests compare with the
original's per-step states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mindvis.config import ConfigMixin, check_int
from mindvis.errors import ConfigError

_logger = logging.getLogger(__name__)

SamplerName = Literal["plms", "ddim", "dpmsolver++"]
SAMPLERS: tuple[str, ...] = ("plms", "ddim", "dpmsolver++")
#: Default step counts: the original's PLMS 250, DDIM 50, DPM-Solver++ 25.
DEFAULT_STEPS: dict[str, int] = {"plms": 250, "ddim": 50, "dpmsolver++": 25}

EpsFn = Callable[[Tensor, Tensor], Tensor]

#: Names and order of the twelve schedule buffers the original stores at the top of its state dict.
ORIGINAL_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


# ----------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------


@dataclass
class NoiseScheduleConfig(ConfigMixin):
    """The diffusion noise schedule.

    Args:
        num_train_timesteps: T (1000).
        linear_start / linear_end: first and last beta of the CompVis "linear" schedule (0.0015, 0.0195).
        beta_schedule: only ``"linear"`` (CompVis naming; diffusers' ``scaled_linear``).
        prediction_type: only ``"epsilon"``.
        v_posterior: weight of beta in the posterior variance (0 in the original).
    """

    num_train_timesteps: int = 1000
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    v_posterior: float = 0.0

    def __post_init__(self) -> None:
        check_int("num_train_timesteps", self.num_train_timesteps, 2)
        for name in ("linear_start", "linear_end", "v_posterior"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ConfigError(f"expected a finite number, got {v!r}", field=name)
            setattr(self, name, float(v))
        if not 0 < self.linear_start <= self.linear_end < 1:
            raise ConfigError(
                f"expected 0 < linear_start <= linear_end < 1, got {self.linear_start}, {self.linear_end}",
                field="linear_start",
            )
        if self.beta_schedule != "linear":
            raise ConfigError(
                f"only the CompVis 'linear' schedule is supported, got {self.beta_schedule!r}",
                field="beta_schedule",
            )
        if self.prediction_type != "epsilon":
            raise ConfigError(
                f"only epsilon prediction is supported, got {self.prediction_type!r}", field="prediction_type"
            )


class NoiseSchedule:
    """Tables of a :class:`NoiseScheduleConfig` (float64 maths, float32 results)."""

    def __init__(self, config: NoiseScheduleConfig | None = None):
        self.config = config or NoiseScheduleConfig()
        c = self.config
        betas = (
            np.linspace(c.linear_start**0.5, c.linear_end**0.5, c.num_train_timesteps, dtype=np.float64) ** 2
        )
        alphas = 1.0 - betas
        acp = np.cumprod(alphas, axis=0)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas64 = betas
        self.alphas_cumprod64 = acp
        post_var = (1 - c.v_posterior) * betas * (1.0 - acp_prev) / (1.0 - acp) + c.v_posterior * betas
        self._buffers64 = {
            "betas": betas,
            "alphas_cumprod": acp,
            "alphas_cumprod_prev": acp_prev,
            "sqrt_alphas_cumprod": np.sqrt(acp),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
            "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
        }
        # ELBO weights of the eps parameterisation; t = 0 has zero posterior variance and copies t = 1.
        with np.errstate(divide="ignore", invalid="ignore"):
            lvlb = betas**2 / (2 * post_var * alphas * (1 - acp))
        lvlb[0] = lvlb[1]
        self._lvlb64 = lvlb

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def alphas_cumprod_tensor(self) -> Tensor:
        """``[T]`` float32 cumulative alphas (``alphas_cumprod[0] = 1 - linear_start``)."""
        return torch.from_numpy(self.alphas_cumprod64.astype(np.float32))

    def betas_tensor(self) -> Tensor:
        return torch.from_numpy(self.betas64.astype(np.float32))

    def lvlb_weights_tensor(self) -> Tensor:
        return torch.from_numpy(self._lvlb64.astype(np.float32))

    def original_buffers(self) -> dict[str, Tensor]:
        """The twelve float32 ``[T]`` buffers the original stores at the top of its state dict."""
        return {k: torch.from_numpy(self._buffers64[k].astype(np.float32)) for k in ORIGINAL_SCHEDULE_BUFFERS}


def sampler_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """The original's timesteps for ``num_steps`` sampler steps, ascending: ``{0, c, 2c, ...} + 1``, ``c = T // S``.

    10 steps give 1, 101, ..., 901; 250 give 1, 5, ..., 997. When ``S`` does not divide ``T`` the original's
    ``range(0, T, c)`` has more than ``S`` entries (30 -> 31) or reaches ``T`` and fails (3 -> index 1000);
    we take its first ``S`` entries, which is its exact sequence whenever it has ``S``.

    Raises:
        ConfigError: ``num_steps`` is not in ``[1, T - 1]``.
    """
    T = num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps < T:
        raise ConfigError(f"expected 1 <= steps <= {T - 1}, got {num_steps!r}", field="num_inference_steps")
    c = T // int(num_steps)
    return np.arange(int(num_steps), dtype=np.int64) * c + 1


@dataclass
class DDIMTables:
    """Per-step tables of the DDIM/PLMS samplers, aligned with the ascending ``timesteps``.

    Attributes:
        timesteps: ``[S]`` int64 ascending.
        alphas: ``[S]`` float32 ``acp[t]``; ``alphas_prev``: ``acp`` of the previous (smaller) timestep,
            ``acp[0]`` for the first; ``sqrt_one_minus_alphas``: ``sqrt(1 - alphas)``; ``sigmas``:
            ``eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``.
    """

    timesteps: np.ndarray
    alphas: Tensor
    alphas_prev: Tensor
    sqrt_one_minus_alphas: Tensor
    sigmas: Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def timesteps_exec(self) -> np.ndarray:
        """Timesteps in execution (descending) order."""
        return self.timesteps[::-1].copy()


def ddim_tables(schedule: NoiseSchedule, num_steps: int, eta: float = 0.0) -> DDIMTables:
    """Tables for :func:`ddim_sample` / :func:`plms_sample` (the original's float32/float64 mix)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not np.isfinite(eta) or eta < 0:
        raise ConfigError(f"expected eta >= 0, got {eta!r}", field="eta")
    ts = sampler_timesteps(num_steps, schedule.num_train_timesteps)
    acp32 = schedule.alphas_cumprod64.astype(np.float32)
    alphas = acp32[ts]
    alphas_prev = np.asarray([acp32[0]] + acp32[ts[:-1]].tolist(), dtype=np.float64)
    a64 = alphas.astype(np.float64)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - a64) * (1 - a64 / alphas_prev))
    return DDIMTables(
        timesteps=ts,
        alphas=torch.from_numpy(alphas),
        alphas_prev=torch.from_numpy(alphas_prev.astype(np.float32)),
        sqrt_one_minus_alphas=torch.from_numpy(np.sqrt(np.float32(1.0) - alphas)),
        sigmas=torch.from_numpy(sigmas.astype(np.float32)),
    )


# ----------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StepState:
    """One sampler step, reported through ``callback``.

    Attributes:
        index: step number in execution order (0 first); ``t``: its timestep.
        x: ``[B, C, h, w]`` latent after the step; ``pred_x0``: the step's estimate of the clean latent;
        eps: the raw model output at the step's input (for PLMS: not the multistep combination).
    """

    index: int
    t: int
    x: Tensor
    pred_x0: Tensor
    eps: Tensor


StepCallback = Callable[[StepState], None]
NoiseFn = Callable[[int, torch.Size], Tensor]


def _tvec(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _ddim_update(
    x: Tensor, e: Tensor, tables: DDIMTables, j: int, noise: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One deterministic-or-not DDIM update at ascending index ``j``: returns ``(x_prev, pred_x0)``."""
    dev, dt = x.device, x.dtype
    a_t = tables.alphas[j].to(dev, dt)
    a_prev = tables.alphas_prev[j].to(dev, dt)
    sigma = tables.sigmas[j].to(dev, dt)
    s1m = tables.sqrt_one_minus_alphas[j].to(dev, dt)
    pred_x0 = (x - s1m * e) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma**2).sqrt() * e
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None and float(tables.sigmas[j]) != 0.0:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def ddim_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    tables: DDIMTables,
    noise_fn: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM from ``x_T: [B, C, h, w]``; returns ``x_0`` of the chain.

    ``noise_fn(step_index, shape)`` supplies the per-step noise when ``eta > 0`` (not called otherwise).
    """
    x = x_T
    S = tables.num_steps
    for i, t in enumerate(tables.timesteps_exec):
        j = S - 1 - i
        e = eps_fn(x, _tvec(t, x))
        noise = None
        if float(tables.sigmas[j]) != 0.0:
            if noise_fn is None:
                raise ConfigError("DDIM with eta > 0 needs a noise source", field="eta")
            noise = noise_fn(i, x.shape).to(x.device, x.dtype)
        x, pred_x0 = _ddim_update(x, e, tables, j, noise)
        if callback is not None:
            callback(StepState(i, int(t), x, pred_x0, e))
    return x


def plms_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    tables: DDIMTables,
    callback: StepCallback | None = None,
) -> Tensor:
    """PLMS (pseudo linear multistep) from ``x_T: [B, C, h, w]``, deterministic (``eta`` must be 0).

    Step 1 is a pseudo improved-Euler step (average of eps at ``(x, t)`` and at the DDIM estimate for the next
    timestep); later steps combine the current and up to three previous raw eps with Adams-Bashforth weights.
    The first step costs two model calls, so ``S`` steps cost ``S + 1``.
    """
    if bool((tables.sigmas != 0).any()):
        raise ConfigError("PLMS is deterministic; eta must be 0", field="eta")
    x = x_T
    S = tables.num_steps
    exec_ts = tables.timesteps_exec
    old_eps: list[Tensor] = []
    for i, t in enumerate(exec_ts):
        j = S - 1 - i
        t_next = exec_ts[min(i + 1, S - 1)]
        e = eps_fn(x, _tvec(t, x))
        if not old_eps:
            x_guess, _ = _ddim_update(x, e, tables, j, None)
            e_next = eps_fn(x_guess, _tvec(t_next, x))
            e_prime = (e + e_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, pred_x0 = _ddim_update(x, e_prime, tables, j, None)
        old_eps.append(e)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback(StepState(i, int(t), x, pred_x0, e))
    return x


def dpmsolver_scheduler(schedule: NoiseSchedule, **overrides: Any) -> Any:
    """A diffusers ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2) on exactly our betas."""
    from diffusers import DPMSolverMultistepScheduler

    kwargs: dict[str, Any] = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        trained_betas=schedule.betas64.astype(np.float32),
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        lower_order_final=True,
        timestep_spacing="linspace",
        final_sigmas_type="zero",
    )
    kwargs.update(overrides)
    return DPMSolverMultistepScheduler(**kwargs)


def dpmsolver_sample(
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int,
    callback: StepCallback | None = None,
    **scheduler_overrides: Any,
) -> Tensor:
    """Multistep DPM-Solver++ (order 2) from ``x_T: [B, C, h, w]``; ``num_steps`` model calls, deterministic."""
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, (int, np.integer))
        or not (1 <= num_steps <= schedule.num_train_timesteps)
    ):
        raise ConfigError(
            f"expected 1 <= steps <= {schedule.num_train_timesteps}, got {num_steps!r}",
            field="num_inference_steps",
        )
    sched = dpmsolver_scheduler(schedule, **scheduler_overrides)
    sched.set_timesteps(int(num_steps), device=x_T.device)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        tv = _tvec(int(t), x)
        e = eps_fn(x, tv)
        x = sched.step(e, t, x, return_dict=False)[0]
        if callback is not None:
            callback(StepState(i, int(t), x, sched.model_outputs[-1], e))
    return x


def run_sampler(
    sampler: SamplerName | str,
    eps_fn: EpsFn,
    x_T: Tensor,
    schedule: NoiseSchedule,
    num_steps: int | None = None,
    eta: float = 0.0,
    noise_fn: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Dispatch to :func:`plms_sample`, :func:`ddim_sample` or :func:`dpmsolver_sample`.

    ``num_steps`` defaults to :data:`DEFAULT_STEPS`. ``eta`` applies to DDIM only (PLMS requires 0).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}", field="sampler")
    steps = DEFAULT_STEPS[sampler] if num_steps is None else num_steps
    if sampler == "dpmsolver++":
        if eta:
            raise ConfigError("DPM-Solver++ is deterministic here; eta must be 0", field="eta")
        return dpmsolver_sample(eps_fn, x_T, schedule, steps, callback=callback)
    if sampler == "plms":
        if eta:
            raise ConfigError("PLMS is deterministic; eta must be 0", field="eta")
        return plms_sample(eps_fn, x_T, ddim_tables(schedule, steps, 0.0), callback=callback)
    return ddim_sample(eps_fn, x_T, ddim_tables(schedule, steps, eta), noise_fn=noise_fn, callback=callback)


def model_calls(sampler: SamplerName | str, num_steps: int, num_train_timesteps: int = 1000) -> int:
    """Number of UNet evaluations a run takes (PLMS: steps + 1, its first step evaluates twice)."""
    if sampler == "dpmsolver++":
        return int(num_steps)
    n = len(sampler_timesteps(num_steps, num_train_timesteps))
    return n + 1 if sampler == "plms" else n


__all__ = [
    "DEFAULT_STEPS",
    "DDIMTables",
    "EpsFn",
    "NoiseSchedule",
    "NoiseScheduleConfig",
    "ORIGINAL_SCHEDULE_BUFFERS",
    "SAMPLERS",
    "SamplerName",
    "StepState",
    "ddim_sample",
    "ddim_tables",
    "dpmsolver_sample",
    "dpmsolver_scheduler",
    "model_calls",
    "plms_sample",
    "run_sampler",
    "sampler_timesteps",
]
