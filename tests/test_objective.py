"""The DDPM objective against an independent float64 NumPy reference and the stock diffusers scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dittune.models.diffusion_objective import (
    DDPMTables,
    add_noise,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    eps_from_v,
    learned_sigma_v_loss,
    min_snr_weight,
    normal_kl,
    v_target,
    vlb_bits,
    x0_from_v,
)

BETA_START, BETA_END, T = 0.00085, 0.018, 1000


# ---------------------------------------------------------------- independent float64 reference


def ref_schedule() -> dict[str, np.ndarray]:
    """scaled_linear schedule and posterior quantities, written from the DDPM formulas."""
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, T, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "betas": betas,
        "acp": acp,
        "acp_prev": acp_prev,
        "post_var": post_var,
        "post_var_clipped": np.concatenate([[post_var[1]], post_var[1:]]),
    }


def ref_phi(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_vlb_bits(x0, x_t, t, v, var_values) -> np.ndarray:
    """VLB in bits per sample; KL computed from variances (not log-variances)."""
    s = ref_schedule()
    out = np.empty(x0.shape[0])
    for i, ti in enumerate(t):
        a, a_prev, beta = s["acp"][ti], s["acp_prev"][ti], s["betas"][ti]

        # posterior q(x_{t-1} | x_t, x0): mean via mu = (sqrt(a_prev) beta x0 + sqrt(1-beta)(1-a_prev) x_t)/(1-a)
        def post_mean(x_start, i=i, a=a, a_prev=a_prev, beta=beta):
            return (np.sqrt(a_prev) * beta * x_start + np.sqrt(1.0 - beta) * (1.0 - a_prev) * x_t[i]) / (1.0 - a)

        true_var = s["post_var_clipped"][ti]
        frac = (var_values[i] + 1.0) / 2.0
        model_var = beta**frac * true_var ** (1.0 - frac)  # geometric interpolation == log-linear
        pred_x0 = np.sqrt(a) * x_t[i] - np.sqrt(1.0 - a) * v[i]
        model_mean = post_mean(pred_x0)
        if ti == 0:
            sd = np.sqrt(model_var)
            c = x0[i] - model_mean
            up, lo = ref_phi((c + 1.0 / 255) / sd), ref_phi((c - 1.0 / 255) / sd)
            logp = np.where(
                x0[i] < -0.999,
                np.log(np.maximum(up, 1e-12)),
                np.where(x0[i] > 0.999, np.log(np.maximum(1.0 - lo, 1e-12)), np.log(np.maximum(up - lo, 1e-12))),
            )
            out[i] = -logp.mean() / np.log(2.0)
        else:
            true_mean = post_mean(x0[i])
            ratio = true_var / model_var
            kl = 0.5 * (ratio - 1.0 - np.log(ratio) + (true_mean - model_mean) ** 2 / model_var)
            out[i] = kl.mean() / np.log(2.0)
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="scaled_linear",
        beta_start=BETA_START,
        beta_end=BETA_END,
        prediction_type="v_prediction",
        clip_sample=False,
    )


@pytest.fixture(scope="module")
def tables(scheduler: DDPMScheduler) -> DDPMTables:
    return DDPMTables.from_scheduler(scheduler)


def _data(batch: int, seed: int = 0, shape=(4, 6, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g) * 1.3, torch.randn(batch, *shape, generator=g)


# ---------------------------------------------------------------- tables


def test_tables_match_reference_and_scheduler(tables: DDPMTables, scheduler: DDPMScheduler) -> None:
    ref = ref_schedule()
    assert all(getattr(tables, f).dtype == torch.float64 for f in ("betas", "alphas_cumprod", "log_betas"))
    np.testing.assert_allclose(tables.betas.numpy(), ref["betas"], rtol=1e-6)
    np.testing.assert_allclose(tables.alphas_cumprod.numpy(), ref["acp"], rtol=1e-5)
    np.testing.assert_allclose(tables.alphas_cumprod.numpy(), scheduler.alphas_cumprod.double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(tables.alphas_cumprod_prev.numpy(), ref["acp_prev"], rtol=1e-5)
    np.testing.assert_allclose(tables.posterior_variance.numpy(), ref["post_var"], rtol=1e-5, atol=0)
    assert tables.posterior_variance[0] == 0
    np.testing.assert_allclose(
        tables.posterior_log_variance_clipped.numpy(), np.log(ref["post_var_clipped"]), rtol=1e-6
    )
    assert tables.posterior_log_variance_clipped[0] == tables.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(tables.log_betas.numpy(), np.log(ref["betas"]), rtol=1e-6)
    # the posterior mean coefficients reproduce the closed-form posterior mean
    c1 = ref["betas"] * np.sqrt(ref["acp_prev"]) / (1 - ref["acp"])
    c2 = (1 - ref["acp_prev"]) * np.sqrt(1 - ref["betas"]) / (1 - ref["acp"])
    np.testing.assert_allclose(tables.posterior_mean_coef1.numpy(), c1, rtol=1e-5)
    np.testing.assert_allclose(tables.posterior_mean_coef2.numpy(), c2, rtol=1e-5)


def test_gather_shape_dtype(tables: DDPMTables) -> None:
    t = torch.tensor([0, 7, 999])
    got = tables.gather("betas", t, ndim=4, dtype=torch.float32, device="cpu")
    assert got.shape == (3, 1, 1, 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.flatten(), tables.betas[t].float())
    with pytest.raises(KeyError):
        tables.gather("nope", t, ndim=2)


# ---------------------------------------------------------------- VLB


@pytest.mark.parametrize("near_truth", [False, True])
def test_vlb_matches_independent_reference(tables: DDPMTables, near_truth: bool) -> None:
    t = torch.tensor([0, 1, 10, 500, 999, 0, 999, 500])
    x0, noise = _data(len(t), seed=1)
    x0[0, 0, 0, :3] = torch.tensor([-1.5, 1.5, 0.2])  # exercise both edge bins and the interior
    x_t = add_noise(tables, x0, noise, t)
    g = torch.Generator().manual_seed(2)
    v_true = v_target(tables, x0, noise, t)
    v = v_true + 0.1 * torch.randn(x0.shape, generator=g) if near_truth else torch.randn(x0.shape, generator=g)
    var_values = torch.rand(x0.shape, generator=g) * 2 - 1

    got = vlb_bits(tables, x0, x_t, t, v, var_values)
    assert got.shape == (len(t),) and got.dtype == torch.float32
    want = ref_vlb_bits(
        *(a.double().numpy() for a in (x0, x_t)), t.numpy(), v.double().numpy(), var_values.double().numpy()
    )
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5)
    assert (got > 0).all()


def test_vlb_t0_decoder_only_depends_on_x0_bins(tables: DDPMTables) -> None:
    # a perfect mean and the smallest variance beat a bad mean at t=0 (decoder NLL)
    x0, noise = _data(2, seed=3)
    t = torch.zeros(2, dtype=torch.long)
    x_t = add_noise(tables, x0, noise, t)
    v = v_target(tables, x0, noise, t)
    good = vlb_bits(tables, x0, x_t, t, v, -torch.ones_like(x0))
    bad = vlb_bits(tables, x0, x_t, t, v + 1.0, -torch.ones_like(x0))
    assert (good < bad).all()


def test_small_functions(tables: DDPMTables) -> None:
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    phi = torch.distributions.Normal(0.0, 1.0).cdf(x)
    torch.testing.assert_close(approx_standard_normal_cdf(x), phi, atol=1e-3, rtol=0)
    m1, m2 = torch.tensor([0.3]), torch.tensor([-0.2])
    lv1, lv2 = torch.tensor([-1.0]), torch.tensor([0.5])
    want = 0.5 * (math.exp(-1.5) - 1 + 1.5 + 0.25 / math.exp(0.5))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.tensor([want]))
    assert normal_kl(m1, lv1, m1, lv1).item() == 0.0
    # likelihood of a bin with a tight Gaussian centred on it is ~1; edge bins extend to infinity
    ll = discretized_gaussian_log_likelihood(
        torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.0, 1.0, -1.0]), torch.full((3,), -8.0)
    )
    torch.testing.assert_close(ll, torch.zeros(3), atol=1e-5, rtol=0)
    far = discretized_gaussian_log_likelihood(torch.tensor([0.5]), torch.tensor([-0.5]), torch.tensor([-8.0]))
    torch.testing.assert_close(far, torch.tensor([math.log(1e-12)]))


# ---------------------------------------------------------------- v parametrisation


@pytest.mark.parametrize("step", [5, 500, 995])
def test_v_round_trip_and_stock_sampler(tables: DDPMTables, scheduler: DDPMScheduler, step: int) -> None:
    x0, noise = _data(2, seed=step)
    t = torch.full((2,), step, dtype=torch.long)
    x_t = add_noise(tables, x0, noise, t)
    v = v_target(tables, x0, noise, t)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0_from_v(tables, x_t, v, t), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(eps_from_v(tables, x_t, v, t), noise, atol=1e-4, rtol=0)
    out = scheduler.step(v, step, x_t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-4, rtol=0)


def test_half_precision_inputs_keep_dtype(tables: DDPMTables) -> None:
    x0, noise = _data(2, seed=9)
    t = torch.tensor([3, 900])
    x_t = add_noise(tables, x0.to(torch.bfloat16), noise.to(torch.bfloat16), t)
    assert x_t.dtype == torch.bfloat16
    torch.testing.assert_close(x_t.float(), add_noise(tables, x0, noise, t), atol=3e-2, rtol=1e-2)


# ---------------------------------------------------------------- min-SNR


def test_min_snr_weights(tables: DDPMTables) -> None:
    acp = ref_schedule()["acp"]
    t = torch.tensor([0, 10, 200, 500, 999])
    snr = acp[t.numpy()] / (1 - acp[t.numpy()])
    for gamma in (1.0, 5.0):
        v_w = min_snr_weight(tables, t, gamma, "v_prediction")
        e_w = min_snr_weight(tables, t, gamma, "epsilon")
        assert v_w.shape == (5,) and v_w.dtype == torch.float32
        np.testing.assert_allclose(v_w.numpy(), np.minimum(snr, gamma) / (snr + 1), rtol=1e-6)
        np.testing.assert_allclose(e_w.numpy(), np.minimum(snr, gamma) / snr, rtol=1e-6)
    # t=0 has huge SNR: weight ≈ γ/(snr+1); t=999 has SNR < γ: v weight = snr/(snr+1), eps weight = 1
    assert min_snr_weight(tables, t, 5.0, "epsilon")[-1].item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        min_snr_weight(tables, t, 5.0, "sample")


# ---------------------------------------------------------------- the loss


def _loss_inputs(tables: DDPMTables, seed: int = 0):
    x0, noise = _data(4, seed=seed)
    t = torch.tensor([0, 3, 400, 999])
    x_t = add_noise(tables, x0, noise, t)
    out = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(seed + 100), requires_grad=True)
    return out, x0, x_t, noise, t


def _grad(tables: DDPMTables, *, vlb: bool, gamma: float | None = None):
    out, x0, x_t, noise, t = _loss_inputs(tables)
    loss, logs = learned_sigma_v_loss(tables, out, x0, x_t, noise, t, vlb=vlb, min_snr_gamma=gamma)
    loss.backward()
    return loss, logs, out.grad


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_vlb_gradient_only_reaches_variance_channels(tables: DDPMTables, gamma: float | None) -> None:
    _, logs_off, g_off = _grad(tables, vlb=False, gamma=gamma)
    _, logs_on, g_on = _grad(tables, vlb=True, gamma=gamma)
    assert torch.equal(g_on[:, :4], g_off[:, :4])
    assert torch.count_nonzero(g_off[:, 4:]) == 0
    assert (g_on[:, 4:].abs() > 0).float().mean() > 0.9
    assert logs_off["loss_vlb"] == 0.0 and logs_on["loss_vlb"] > 0
    assert logs_on["loss_mse"] == logs_off["loss_mse"]


def test_loss_values(tables: DDPMTables) -> None:
    out, x0, x_t, noise, t = _loss_inputs(tables, seed=5)
    target = v_target(tables, x0, noise, t)
    per_mse = (target - out[:, :4]).pow(2).mean(dim=(1, 2, 3))
    vb = vlb_bits(tables, x0, x_t, t, out[:, :4].detach(), out[:, 4:])

    loss, logs = learned_sigma_v_loss(tables, out, x0, x_t, noise, t, vlb=True, min_snr_gamma=None)
    torch.testing.assert_close(loss, (per_mse + vb).mean())
    assert isinstance(logs["loss_mse"], torch.Tensor) and not logs["loss_mse"].requires_grad  # read when logged
    assert float(logs["loss_mse"]) == pytest.approx(per_mse.mean().item())
    assert float(logs["loss_vlb"]) == pytest.approx(vb.mean().item())

    w = min_snr_weight(tables, t, 2.0)
    loss_w, _ = learned_sigma_v_loss(tables, out, x0, x_t, noise, t, vlb=False, min_snr_gamma=2.0)
    torch.testing.assert_close(loss_w, (per_mse * w).mean())

    with pytest.raises(ValueError):
        learned_sigma_v_loss(tables, out[:, :4], x0, x_t, noise, t, vlb=False, min_snr_gamma=None)


# ---------------------------------------------------------------- epsilon prediction (PixArt)


@pytest.fixture(scope="module")
def linear_tables() -> tuple[DDPMTables, DDPMScheduler]:
    """PixArt's training schedule: linear betas 1e-4 → 0.02, epsilon prediction."""
    scheduler = DDPMScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon", clip_sample=False
    )
    return DDPMTables.from_scheduler(scheduler), scheduler


@pytest.mark.parametrize("step", [3, 500, 990])
def test_true_eps_recovers_x0_like_the_scheduler(linear_tables, step: int) -> None:
    from dittune.models.diffusion_objective import x0_from_eps

    tables, scheduler = linear_tables
    generator = torch.Generator().manual_seed(step)
    x0 = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64)
    eps = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64)
    t = torch.full((2,), step)
    x_t = add_noise(tables, x0, eps, t)
    torch.testing.assert_close(x0_from_eps(tables, x_t, eps, t), x0)
    stock = scheduler.step(eps[:1].float(), step, x_t[:1].float()).pred_original_sample
    torch.testing.assert_close(stock.double(), x0[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("step", [0, 40, 700])
def test_vlb_agrees_between_eps_and_v_for_the_same_prediction(linear_tables, step: int) -> None:
    """An eps prediction and the v prediction implying the same x̂0 give the same bound."""
    tables, _ = linear_tables
    generator = torch.Generator().manual_seed(7 + step)
    x0 = torch.rand(2, 4, 5, 5, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
    t = torch.full((2,), step)
    x_t = add_noise(tables, x0, eps, t)
    eps_hat = eps + 0.1 * torch.randn(2, 4, 5, 5, generator=generator, dtype=torch.float64)
    acp = tables.alphas_cumprod[step]
    x0_hat = (x_t - (1 - acp).sqrt() * eps_hat) / acp.sqrt()
    v_hat = acp.sqrt() * eps_hat - (1 - acp).sqrt() * x0_hat
    var_values = torch.rand(2, 4, 5, 5, generator=generator, dtype=torch.float64) * 2 - 1
    from_eps = vlb_bits(tables, x0, x_t, t, eps_hat, var_values, "epsilon")
    from_v = vlb_bits(tables, x0, x_t, t, v_hat, var_values, "v_prediction")
    torch.testing.assert_close(from_eps, from_v)


def test_eps_loss_is_zero_mse_for_the_true_noise_and_trains_only_variance_through_vlb(linear_tables) -> None:
    from dittune.models.diffusion_objective import learned_sigma_loss

    tables, _ = linear_tables
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 4, 4, generator=generator)
    eps = torch.randn(3, 4, 4, 4, generator=generator)
    t = torch.tensor([5, 300, 900])
    x_t = add_noise(tables, x0, eps, t)
    output = torch.cat([eps, torch.zeros_like(eps)], dim=1).requires_grad_(True)
    loss, logs = learned_sigma_loss(
        tables, output, x0, x_t, eps, t, vlb=True, min_snr_gamma=None, prediction_type="epsilon"
    )
    assert float(logs["loss_mse"]) == 0.0 and float(logs["loss_vlb"]) > 0
    loss.backward()
    assert output.grad[:, :4].abs().max() == 0  # the mean half only learns from the MSE
    assert output.grad[:, 4:].abs().max() > 0
    with pytest.raises(ValueError, match="prediction_type"):
        learned_sigma_loss(tables, output, x0, x_t, eps, t, vlb=False, min_snr_gamma=None, prediction_type="sample")


def test_ddpm_tables_refuse_a_scheduler_whose_alphas_are_not_its_betas() -> None:
    """CogVideoX's scheduler shifts ᾱ (snr_shift_scale): tables rebuilt from its betas would be wrong."""
    from diffusers import CogVideoXDDIMScheduler, DDPMScheduler

    from dittune.models.diffusion_objective import DDPMTables

    DDPMTables.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear"))  # ᾱ = ∏(1 − β): accepted
    shifted = CogVideoXDDIMScheduler(snr_shift_scale=3.0, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="not the product of its betas"):
        DDPMTables.from_scheduler(shifted)
