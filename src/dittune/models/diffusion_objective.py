"""Family-independent DDPM maths: noising, v-prediction, min-SNR and the learned-sigma VLB.

This is the objective of DDPM-trained transformers with a learned-range variance head
(Hunyuan-DiT; reusable for PixArt-style families): MSE on the v-target for the first C
output channels, plus the variational bound in bits on the last C ("variance value")
channels with the predicted mean detached.

Schedule tables are built once in float64 (`DDPMTables`); per-sample coefficients are
gathered from them and cast to the working dtype. Elementwise maths runs in the input dtype
(promoted to at least float32 for the loss terms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

LOG2 = math.log(2.0)
_CDF_COEF = math.sqrt(2.0 / math.pi)
_BIN_HALF_WIDTH = 1.0 / 255.0  # data in [-1, 1] quantised to 256 levels: bin width 2/255
_EDGE = 0.999
_LOG_FLOOR = 1e-12


@dataclass(frozen=True, eq=False)
class DDPMTables:
    """Per-timestep float64 schedule tables, shape (T,), on CPU. Compared by identity.

    `on(name, device)` keeps one copy per device, so a training step gathers from the device without a
    host-to-device copy (which would wait for the device) each time.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas: torch.Tensor
    _copies: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_betas(cls, betas: torch.Tensor | Any) -> DDPMTables:
        """Derive all tables from a 1-D beta schedule (computed in float64)."""
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if betas.numel() < 2:
            raise ValueError("a DDPM schedule needs at least two timesteps")
        if bool((betas <= 0).any()) or bool((betas > 1).any()):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        one_minus = 1.0 - alphas_cumprod
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
        # posterior_variance[0] is 0; use index 1's value there so the log stays finite.
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=torch.log(clipped),
            posterior_mean_coef1=betas * torch.sqrt(alphas_cumprod_prev) / one_minus,
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / one_minus,
            log_betas=torch.log(betas),
        )

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> DDPMTables:
        """Build from a diffusers scheduler's ``betas``; ᾱ is recomputed in float64 from them.

        A scheduler whose own ``alphas_cumprod`` is not the product of its betas (CogVideoX's shifts ᾱ by
        ``snr_shift_scale``) is refused: these tables would train on the wrong noise levels. Such a family
        reads ``scheduler.alphas_cumprod`` itself (see models/cogvideox/spec.py).
        """
        betas = getattr(scheduler, "betas", None)
        if betas is None:
            raise TypeError(f"{type(scheduler).__name__} has no `betas`; a DDPM-style scheduler is needed")
        tables = cls.from_betas(betas)
        own = getattr(scheduler, "alphas_cumprod", None)
        if own is not None and not torch.allclose(own.double(), tables.alphas_cumprod, rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"{type(scheduler).__name__}'s alphas_cumprod is not the product of its betas (a shifted or "
                "rescaled schedule); DDPM tables built from the betas would use the wrong noise levels"
            )
        return tables

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """Table `name` on `device`: float64 (float32 on MPS, which has no float64), copied there once."""
        key = (name, str(device))
        table = self._copies.get(key)
        if table is None:
            table = getattr(self, name)
            table = self._copies[key] = (table.to(torch.float32) if device.type == "mps" else table).to(device)
        return table

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def gather(
        self,
        name: str,
        t: torch.Tensor,
        ndim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Values of table ``name`` at integer timesteps ``t`` (B,), shaped (B, 1, ..., 1) with ``ndim`` dims."""
        if name.startswith("_") or name not in {f.name for f in fields(self)}:
            raise KeyError(f"unknown DDPM table {name!r}")
        values = _index(self, name, t).to(dtype)
        device = t.device if device is None else device
        return values.to(device).reshape(-1, *([1] * (ndim - 1)))


class SchedulerTables:
    """`DDPMTables` of the scheduler last asked for, built once per scheduler object."""

    def __init__(self) -> None:
        self._scheduler: Any = None
        self._tables: DDPMTables | None = None

    def __call__(self, scheduler: Any) -> DDPMTables:
        if self._tables is None or self._scheduler is not scheduler:
            self._scheduler, self._tables = scheduler, DDPMTables.from_scheduler(scheduler)
        return self._tables


def _index(tables: DDPMTables, name: str, t: torch.Tensor) -> torch.Tensor:
    """``tables.<name>[t]`` on t's device, in float64 where the device supports it (float32 otherwise, e.g. MPS)."""
    return tables.on(name, t.device)[t.reshape(-1).long()]


_Getter = Callable[[str], torch.Tensor]


def _coef(
    tables: DDPMTables,
    fn: Callable[[_Getter], torch.Tensor],
    t: torch.Tensor,
    like: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Evaluate ``fn(getter)`` on gathered float64 table values, then cast and broadcast like ``like``."""
    idx = t.reshape(-1).long()
    values = fn(lambda name: _index(tables, name, idx))
    values = values.to(dtype or like.dtype).to(like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _sqrt_acp(g: _Getter) -> torch.Tensor:
    return torch.sqrt(g("alphas_cumprod"))


def _sqrt_one_minus_acp(g: _Getter) -> torch.Tensor:
    return torch.sqrt(1.0 - g("alphas_cumprod"))


def add_noise(tables: DDPMTables, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process sample ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·noise``."""
    return _coef(tables, _sqrt_acp, t, x0) * x0 + _coef(tables, _sqrt_one_minus_acp, t, x0) * noise


def v_target(tables: DDPMTables, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity target ``v = sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·x0``."""
    return _coef(tables, _sqrt_acp, t, x0) * noise - _coef(tables, _sqrt_one_minus_acp, t, x0) * x0


def x0_from_v(tables: DDPMTables, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate ``x0 = sqrt(ᾱ_t)·x_t − sqrt(1−ᾱ_t)·v``."""
    return _coef(tables, _sqrt_acp, t, x_t) * x_t - _coef(tables, _sqrt_one_minus_acp, t, x_t) * v


def x0_from_eps(tables: DDPMTables, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate ``x0 = (x_t − sqrt(1−ᾱ_t)·eps) / sqrt(ᾱ_t)``."""
    return (x_t - _coef(tables, _sqrt_one_minus_acp, t, x_t) * eps) / _coef(tables, _sqrt_acp, t, x_t)


def x0_from_prediction(
    tables: DDPMTables, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 from a ``"v_prediction"`` or ``"epsilon"`` model output."""
    if prediction_type == "v_prediction":
        return x0_from_v(tables, x_t, prediction, t)
    if prediction_type == "epsilon":
        return x0_from_eps(tables, x_t, prediction, t)
    raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', not {prediction_type!r}")


def eps_from_v(tables: DDPMTables, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise estimate ``eps = sqrt(1−ᾱ_t)·x_t + sqrt(ᾱ_t)·v``."""
    return _coef(tables, _sqrt_one_minus_acp, t, x_t) * x_t + _coef(tables, _sqrt_acp, t, x_t) * v


def _gaussian_kl(mean_diff: torch.Tensor, log_var_gap: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(m1, e^lv1) ‖ N(m2, e^lv2)) from ``m1 − m2``, ``lv2 − lv1`` and ``lv2``.

    Written with ``expm1`` so that nearly equal variances do not cancel catastrophically.
    """
    return 0.5 * (log_var_gap + torch.expm1(-log_var_gap) + mean_diff.square() * torch.exp(-logvar2))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL divergence KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))) in nats."""
    return _gaussian_kl(mean1 - mean2, logvar2 - logvar1, logvar2)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via the tanh approximation ``0.5·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``.

    Evaluated as the identical ``sigmoid(2·…)``, which keeps relative precision in the lower tail.
    """
    return torch.sigmoid(2.0 * _CDF_COEF * (x + 0.044715 * x.pow(3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-probability (nats) of ``x`` under a Gaussian discretised into bins of width 2/255.

    The outermost bins (``x < −0.999`` / ``x > 0.999``) extend to ∓∞. Logs are floored at 1e-12.
    Upper-tail probabilities use the CDF's symmetry (1 − Φ(z) = Φ(−z)) instead of subtracting from 1.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    plus_in = inv_std * (centered + _BIN_HALF_WIDTH)
    min_in = inv_std * (centered - _BIN_HALF_WIDTH)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    one_minus_cdf_min = approx_standard_normal_cdf(-min_in)
    cdf_delta = torch.where(
        centered > 0,
        one_minus_cdf_min - approx_standard_normal_cdf(-plus_in),
        cdf_plus - approx_standard_normal_cdf(min_in),
    )
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_LOG_FLOOR))
    log_one_minus_cdf_min = torch.log(one_minus_cdf_min.clamp(min=_LOG_FLOOR))
    log_cdf_delta = torch.log(cdf_delta.clamp(min=_LOG_FLOOR))
    return torch.where(x < -_EDGE, log_cdf_plus, torch.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def vlb_bits(
    tables: DDPMTables,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mean_v_detached: torch.Tensor,
    var_values: torch.Tensor,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """Per-sample variational bound term in bits, shape (B,).

    The model mean is the posterior mean of q(x_{t−1} | x_t, x̂0) with x̂0 recovered from the
    mean prediction (v or eps, per ``prediction_type``); the variance interpolates in log space
    between β̃_t (clipped) and β_t with
    ``frac = (var_values + 1) / 2``. For t > 0 this is KL(q ‖ p_θ); for t == 0 it is the
    discretised-Gaussian decoder NLL of x0. Computed in at least float32. The caller decides
    whether ``mean_v_detached`` carries gradient (the official objective detaches it).
    """
    dtype = torch.promote_types(var_values.dtype, torch.float32)
    x0, x_t = x0.to(dtype), x_t.to(dtype)
    v, frac = mean_v_detached.to(dtype), (var_values.to(dtype) + 1.0) / 2.0

    pred_x0 = x0_from_prediction(tables, x_t, v, t, prediction_type)
    min_log = _coef(tables, lambda g: g("posterior_log_variance_clipped"), t, x0, dtype)
    log_gap = _coef(tables, lambda g: g("log_betas") - g("posterior_log_variance_clipped"), t, x0, dtype)
    coef1 = _coef(tables, lambda g: g("posterior_mean_coef1"), t, x0, dtype)
    coef2 = _coef(tables, lambda g: g("posterior_mean_coef2"), t, x0, dtype)

    model_var_gap = frac * log_gap  # model log-variance minus the true (clipped) posterior log-variance
    model_log_var = min_log + model_var_gap
    # true_mean − model_mean = coef1·(x0 − x̂0): formed directly to avoid cancelling two near-equal means.
    kl = _gaussian_kl(coef1 * (x0 - pred_x0), model_var_gap, model_log_var)
    kl_bits = _mean_flat(kl) / LOG2

    model_mean = coef1 * pred_x0 + coef2 * x_t
    nll = -discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var)
    nll_bits = _mean_flat(nll) / LOG2

    return torch.where(t.reshape(-1).to(kl_bits.device) == 0, nll_bits, kl_bits)


def min_snr_weight(
    tables: DDPMTables, t: torch.Tensor, gamma: float, prediction_type: str = "v_prediction"
) -> torch.Tensor:
    """Min-SNR-γ loss weight per sample (float32, (B,)); SNR = ᾱ/(1−ᾱ).

    ``v_prediction``: min(SNR, γ)/(SNR + 1); ``epsilon``: min(SNR, γ)/SNR.
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    acp = _index(tables, "alphas_cumprod", t)
    snr = acp / (1.0 - acp)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        weight = clipped / (snr + 1.0)
    elif prediction_type == "epsilon":
        weight = clipped / snr
    else:
        raise ValueError(f"min-SNR weighting supports 'v_prediction' and 'epsilon', not {prediction_type!r}")
    return weight.to(torch.float32)


def learned_sigma_v_loss(
    tables: DDPMTables,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    vlb: bool,
    min_snr_gamma: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """`learned_sigma_loss` for v-prediction (Hunyuan-DiT)."""
    return learned_sigma_loss(
        tables, model_output, x0, x_t, noise, t, vlb=vlb, min_snr_gamma=min_snr_gamma, prediction_type="v_prediction"
    )


def learned_sigma_loss(
    tables: DDPMTables,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    vlb: bool,
    min_snr_gamma: float | None,
    prediction_type: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The mean-prediction + learned-range-variance objective; returns (scalar loss, logs).

    The logs (``loss_mse``, ``loss_vlb``) are detached 0-d tensors: nothing is read back from the device here.

    ``model_output`` has 2C channels: the first C are the mean prediction (v or eps, per
    ``prediction_type``), the last C the variance values. The MSE (optionally min-SNR weighted)
    trains the mean; the VLB, when enabled, sees the mean detached, so it only trains the variance
    channels (as DiT, PixArt and Hunyuan-DiT train).
    """
    channels = x0.shape[1]
    if model_output.shape[1] != 2 * channels or model_output.shape[2:] != x0.shape[2:]:
        raise ValueError(
            f"model_output {tuple(model_output.shape)} must have 2×{channels} channels and x0's spatial size"
        )
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    mean_prediction, var_values = model_output.to(dtype).split(channels, dim=1)
    if prediction_type == "v_prediction":
        target = v_target(tables, x0.to(dtype), noise.to(dtype), t)
    elif prediction_type == "epsilon":
        target = noise.to(dtype)
    else:
        raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', not {prediction_type!r}")
    mse = _mean_flat((target - mean_prediction).square())
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(tables, t, min_snr_gamma, prediction_type).to(mse.device, dtype)
    per_sample = mse
    vlb_value: torch.Tensor | float = 0.0
    if vlb:
        vb = vlb_bits(tables, x0, x_t, t, mean_prediction.detach(), var_values, prediction_type)
        per_sample = per_sample + vb
        vlb_value = vb.detach().mean()
    loss = per_sample.mean()
    return loss, {"loss_mse": mse.detach().mean(), "loss_vlb": vlb_value}
