"""Family-independent rectified-flow maths (SD3, Flux and other flow-matching transformers).

Convention (diffusers' FlowMatchEulerDiscreteScheduler): σ ∈ (0, 1), ``x_σ = (1 − σ)·x0 + σ·noise``,
the model predicts the velocity ``v = noise − x0`` and is called with ``timestep = 1000·σ``. A
prediction turns back into the clean latent as ``x0 = x_σ − σ·v``.

σ is drawn per sample (`sample_sigmas`): "uniform", "logit_normal" (σ = sigmoid(N(m, s)), SD3's
default), "mode" (SD3 paper's mode sampling with a scale) or "shift" (uniform, then shifted as the
inference schedule is). An explicit shift s maps σ to s·σ / (1 + (s − 1)·σ), which equals diffusers'
exponential time shift with μ = ln s. Loss weights per σ: "none", "sigma_sqrt" (σ⁻²), "cosmap".

A σ range (`within`, e.g. one expert's side of a model's expert boundary) keeps the draw's own
distribution restricted to the range: its quantile is mapped linearly into the range's quantiles, so σ
follows the draw's distribution conditioned on lying in the range (what rejection sampling gives, as
musubi-tuner's `--preserve_distribution_shape` does, with one draw per sample).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from dittune.models.base import LossSettings
from dittune.models.draws import Draws, as_draws

TimestepSampling = Literal["uniform", "logit_normal", "mode", "shift"]
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]
NUM_TRAIN_TIMESTEPS = 1000
_EPS = 1e-5


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): s > 1 moves σ towards the noisy end; s = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"flow shift must be positive, got {shift}")
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift: s = exp(μ), μ linear in the packed image sequence length."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


def scheduler_shift(scheduler_config: dict) -> float:
    """The fixed σ shift a flow scheduler config samples with: `shift` (FlowMatchEuler) or `flow_shift` (UniPC)."""
    if scheduler_config.get("_class_name") == "UniPCMultistepScheduler":
        return float(scheduler_config.get("flow_shift") or 1.0)
    return float(scheduler_config.get("shift") or 1.0)


def training_shift(settings: LossSettings, scheduler_config: dict, sequence_length: int | None = None) -> float | None:
    """The σ shift for training: an explicit `loss.flow_shift`; else, for "shift" sampling, the shift the stock
    pipeline samples with — `resolution_shift` of `sequence_length` tokens for a scheduler with dynamic shifting
    (Flux, LTX-Video), its fixed shift otherwise; else none."""
    if settings.flow_shift is not None:
        return settings.flow_shift
    if settings.timestep_sampling != "shift":
        return None
    if not scheduler_config.get("use_dynamic_shifting"):
        return scheduler_shift(scheduler_config)
    if sequence_length is None:
        raise ValueError("a scheduler with dynamic shifting needs the sequence length")
    return resolution_shift(
        sequence_length,
        int(scheduler_config.get("base_image_seq_len", 256)),
        int(scheduler_config.get("max_image_seq_len", 4096)),
        float(scheduler_config.get("base_shift", 0.5)),
        float(scheduler_config.get("max_shift", 1.15)),
    )


def unshift_sigma(sigma: float, shift: float) -> float:
    """The inverse of `shift_sigmas` for one σ: σ / (s − (s − 1)·σ)."""
    return sigma / (shift - (shift - 1.0) * sigma)


def _mode_sigma(u: float | torch.Tensor, mode_scale: float):
    """SD3's mode sampling: σ = 1 − u − scale·(cos²(πu/2) − 1 + u), decreasing from 1 (u = 0) to 0 (u = 1)."""
    cos = torch.cos(math.pi * u / 2.0) if isinstance(u, torch.Tensor) else math.cos(math.pi * u / 2.0)
    return 1.0 - u - mode_scale * (cos**2 - 1.0 + u)


def _quantile(sigma: float, sampling: str, logit_mean: float, logit_std: float, mode_scale: float) -> float:
    """The probability of the base draw (uniform u, or Φ of the normal) that gives the unshifted `sigma`."""
    if sigma <= 0.0 or sigma >= 1.0:
        edge = float(sigma >= 1.0)
        return 1.0 - edge if sampling == "mode" else edge
    if sampling == "logit_normal":
        z = (math.log(sigma / (1.0 - sigma)) - logit_mean) / logit_std
        return 0.5 * math.erfc(-z / math.sqrt(2.0))
    if sampling == "mode":  # σ(u) decreases: bisect for the u that gives `sigma`
        low, high = 0.0, 1.0
        for _ in range(60):
            middle = (low + high) / 2.0
            low, high = (middle, high) if _mode_sigma(middle, mode_scale) > sigma else (low, middle)
        return (low + high) / 2.0
    return sigma


def sample_sigmas(
    count: int,
    sampling: TimestepSampling,
    *,
    generator: Draws | torch.Generator,
    device: torch.device | str = "cpu",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float | None = None,
    within: tuple[float, float] | None = None,
) -> torch.Tensor:
    """`count` noise levels σ in (0, 1), float32.

    `generator` draws one base value per sample (a `Draws`, or a plain generator for the whole batch).
    `shift` is applied after the draw when given (for "shift" it is required). `within` = (low, high) keeps σ
    in [low, high) with the draw's own distribution restricted to that range (see the module's docstring).
    """
    if sampling == "shift" and shift is None:
        raise ValueError('timestep sampling "shift" needs a shift value')
    if sampling not in ("uniform", "shift", "logit_normal", "mode"):
        raise ValueError(f"unknown timestep sampling {sampling!r}; use uniform, logit_normal, mode or shift")
    draws = as_draws(generator)
    bounds = None
    if within is not None:
        unshifted = [unshift_sigma(b, shift) if shift is not None else b for b in within]
        bounds = sorted(_quantile(b, sampling, logit_mean, logit_std, mode_scale) for b in unshifted)
    if sampling == "logit_normal":
        draw = draws.randn((count,), device=device)
        if bounds is not None:
            precise = torch.float32 if draw.device.type == "mps" else torch.float64  # MPS has no float64
            p = bounds[0] + (bounds[1] - bounds[0]) * torch.special.ndtr(draw.to(precise))
            draw = torch.special.ndtri(p).float()
        sigmas = torch.sigmoid(draw * logit_std + logit_mean)
    else:
        u = draws.rand((count,), device=device)
        if bounds is not None:
            u = bounds[0] + (bounds[1] - bounds[0]) * u
        sigmas = _mode_sigma(u, mode_scale) if sampling == "mode" else u
    if shift is not None:
        sigmas = shift_sigmas(sigmas, shift)
    sigmas = sigmas.clamp(_EPS, 1.0 - _EPS).float()
    if within is not None:  # rounding must not cross the range's edges: [low, high)
        high = torch.nextafter(torch.tensor(within[1], dtype=torch.float32), torch.tensor(0.0))
        sigmas = sigmas.clamp(min(max(within[0], _EPS), float(high)), float(high))
    return sigmas


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·x0 + σ·noise``."""
    s = _expand(sigmas, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target ``v = noise − x0``."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate ``x0 = x_σ − σ·v``."""
    return x_t - _expand(sigmas, x_t) * velocity


def loss_weights(weighting: LossWeighting, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight (float32)."""
    sigmas = sigmas.float()
    if weighting == "none":
        return torch.ones_like(sigmas)
    if weighting == "sigma_sqrt":
        return sigmas.pow(-2.0)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas.square()))
    raise ValueError(f"unknown loss weighting {weighting!r}; use none, sigma_sqrt or cosmap")


def flow_matching_loss(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting: LossWeighting = "none",
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Weighted MSE between the predicted and the true velocity; returns (scalar loss, logs).

    The logs (``loss_mse``, ``sigma_mean``) are detached 0-d tensors: nothing is read back from the device here.
    """
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    target = velocity_target(x0.to(dtype), noise.to(dtype))
    per_sample = (prediction.to(dtype) - target).square().mean(dim=tuple(range(1, target.ndim)))
    weighted = per_sample * loss_weights(weighting, sigmas).to(per_sample.device, dtype)
    loss = weighted.mean()
    return loss, {"loss_mse": per_sample.detach().mean(), "sigma_mean": sigmas.detach().float().mean()}


def training_draw(
    x0: torch.Tensor,
    settings: LossSettings,
    draws: Draws | torch.Generator,
    shift: float | None,
    within: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ, noise, x_σ) for one batch from the loss settings; `shift` and `within` as `sample_sigmas` takes them."""
    sigmas = sample_sigmas(
        x0.shape[0],
        settings.timestep_sampling,  # type: ignore[arg-type]
        generator=draws,
        device=x0.device,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        shift=shift,
        within=within,
    )
    noise = as_draws(draws).randn(x0.shape, device=x0.device, dtype=x0.dtype)
    return sigmas, noise, noisy_latents(x0, noise, sigmas)


def describe(settings: LossSettings, shift: str | None) -> str:
    """The start-up summary line of a flow-matching objective (`shift`: how σ is shifted, or None)."""
    sampling = "uniform" if settings.timestep_sampling == "shift" else settings.timestep_sampling
    if sampling == "logit_normal":
        sampling += f"({settings.logit_mean:g}, {settings.logit_std:g})"
    elif sampling == "mode":
        sampling += f"(scale {settings.mode_scale:g})"
    shifted = f" shifted by {shift}" if shift else ""
    return f"rectified flow, σ {sampling}{shifted}, weighting {settings.weighting}"
