"""Rectified-flow maths, checked numerically against diffusers' scheduler and training utilities."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dittune.models import flow_objective as fo


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shift_matches_the_scheduler_tables() -> None:
    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(fo.shift_sigmas(plain.sigmas, 3.0), shifted.sigmas, rtol=1e-5, atol=1e-6)
    assert torch.equal(fo.shift_sigmas(plain.sigmas, 1.0), plain.sigmas)


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 4096])
def test_resolution_shift_is_exp_of_flux_mu(seq_len: int) -> None:
    assert fo.resolution_shift(seq_len) == pytest.approx(math.exp(calculate_shift(seq_len)))
    # the exponential time shift of the scheduler equals our shift formula with s = exp(mu)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.05, 0.95, 7)
    mu = calculate_shift(seq_len)
    torch.testing.assert_close(scheduler.time_shift(mu, 1.0, t), fo.shift_sigmas(t, math.exp(mu)))


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sampling_matches_diffusers_densities(scheme: str) -> None:
    ours = fo.sample_sigmas(4096, scheme, generator=_gen(1), logit_mean=0.3, logit_std=0.8, mode_scale=1.29)
    theirs = compute_density_for_timestep_sampling(
        "none" if scheme == "uniform" else scheme, 4096, logit_mean=0.3, logit_std=0.8, mode_scale=1.29
    )
    assert ours.dtype == torch.float32 and ours.min() > 0 and ours.max() < 1
    # same distribution: quantiles agree (different draws)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(ours, q), torch.quantile(theirs.float(), q), atol=0.03, rtol=0)


def test_logit_normal_median_and_shift_direction() -> None:
    sigmas = fo.sample_sigmas(20000, "logit_normal", generator=_gen(2))
    assert sigmas.median().item() == pytest.approx(0.5, abs=0.02)
    shifted = fo.sample_sigmas(20000, "shift", generator=_gen(2), shift=3.0)
    uniform = fo.sample_sigmas(20000, "uniform", generator=_gen(2))
    # same underlying draws: shifting raises every σ
    assert bool((shifted >= uniform - 1e-6).all()) and shifted.mean() > uniform.mean() + 0.1
    with pytest.raises(ValueError, match="needs a shift"):
        fo.sample_sigmas(4, "shift", generator=_gen())
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        fo.sample_sigmas(4, "cosine", generator=_gen())  # type: ignore[arg-type]


def test_sampling_is_deterministic_given_the_generator() -> None:
    a = fo.sample_sigmas(8, "logit_normal", generator=_gen(5))
    b = fo.sample_sigmas(8, "logit_normal", generator=_gen(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_weights_match_diffusers(scheme: str) -> None:
    sigmas = torch.tensor([0.02, 0.3, 0.5, 0.9])
    torch.testing.assert_close(fo.loss_weights(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())


@pytest.mark.parametrize("sigma", [0.02, 0.5, 0.98])
def test_exact_velocity_recovers_x0_and_a_scheduler_step_lands_on_it(sigma: float) -> None:
    x0 = torch.randn(2, 4, 6, 6, generator=_gen(3), dtype=torch.float64)
    noise = torch.randn(2, 4, 6, 6, generator=_gen(4), dtype=torch.float64)
    sigmas = torch.full((2,), sigma, dtype=torch.float64)
    x_t = fo.noisy_latents(x0, noise, sigmas)
    v = fo.velocity_target(x0, noise)
    torch.testing.assert_close(fo.x0_from_velocity(x_t, v, sigmas), x0)
    # diffusers' Euler step from σ to 0 with the true velocity lands on x0 as well
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(sigmas=[sigma], device="cpu")
    step = scheduler.step(v, scheduler.timesteps[0], x_t, return_dict=False)[0]
    torch.testing.assert_close(step.double(), x0, rtol=1e-5, atol=1e-5)
    # and the noisy sample matches the scheduler's own forward process
    scaled = scheduler.scale_noise(x0, scheduler.timesteps[:1].repeat(2), noise)
    torch.testing.assert_close(scaled.double(), x_t, rtol=1e-5, atol=1e-5)


def test_loss_is_zero_for_the_true_velocity_and_weighted_per_sample() -> None:
    x0 = torch.randn(3, 4, 4, 4, generator=_gen(6))
    noise = torch.randn(3, 4, 4, 4, generator=_gen(7))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    loss, logs = fo.flow_matching_loss(fo.velocity_target(x0, noise), x0, noise, sigmas)
    assert loss.item() == 0.0 and float(logs["loss_mse"]) == 0.0
    wrong = torch.zeros_like(x0)
    plain, _ = fo.flow_matching_loss(wrong, x0, noise, sigmas, "none")
    per_sample = (noise - x0).square().mean(dim=(1, 2, 3))
    assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    weighted, _ = fo.flow_matching_loss(wrong, x0, noise, sigmas, "sigma_sqrt")
    assert weighted.item() == pytest.approx((per_sample / sigmas.square()).mean().item(), rel=1e-5)
