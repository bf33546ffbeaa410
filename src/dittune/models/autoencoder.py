"""The `AutoencoderKL` side shared by latent-diffusion families: load, encode to moments, latents.

The cache stores the posterior (mean, log-variance) per image; a training step turns it into a
latent (a draw or the mean), then applies the VAE's shift and scaling factors from its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dittune.fingerprint import Fingerprinter
from dittune.models.base import Moments
from dittune.models.draws import Draws, as_draws


def load_autoencoder(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen `AutoencoderKL` from `folder` (e.g. MODEL/vae)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def posterior_moments(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's batched (mean, logvar) on the CPU, for pixels in [-1, 1] (images or clips)."""
    param = next(vae.parameters())
    posterior = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    return posterior.mean.cpu(), posterior.logvar.cpu()


def split_moments(mean: torch.Tensor, logvar: torch.Tensor) -> list[Moments]:
    """Batched moments → one {"mean", "logvar"} dict per sample (own storage, so each is saved alone)."""
    return [{"mean": mean[i].clone(), "logvar": logvar[i].clone()} for i in range(mean.shape[0])]


def draw_latents(
    mean: torch.Tensor, logvar: torch.Tensor, draws: Draws | torch.Generator, sample: bool
) -> torch.Tensor:
    """float32 z: a posterior draw (mean + std·ε from `draws`) when `sample`, else the mean."""
    mean = mean.float()
    if not sample:
        return mean
    std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
    return mean + std * as_draws(draws).randn(mean.shape, device=mean.device, dtype=mean.dtype)


def encode_moments(vae: nn.Module, pixels: torch.Tensor) -> list[Moments]:
    """(B, 3, H, W) or (B, 3, 1, H, W) in [-1, 1] → one CPU dict {"mean", "logvar"} per image."""
    if pixels.ndim == 5:
        if pixels.shape[2] != 1:
            raise ValueError(f"an image VAE encodes single frames, got {pixels.shape[2]} frames per sample")
        pixels = pixels[:, :, 0]
    mean, logvar = posterior_moments(vae, pixels)
    return [{"mean": mean[i], "logvar": logvar[i]} for i in range(mean.shape[0])]


def latents_from_moments(
    moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool, vae_config: dict[str, Any]
) -> torch.Tensor:
    """Float32 model-space latents: (z − shift_factor) · scaling_factor, z drawn or the mean."""
    z = draw_latents(moments["mean"], moments["logvar"], draws, sample)
    shift = vae_config.get("shift_factor") or 0.0
    return (z - shift) * float(vae_config.get("scaling_factor") or 1.0)


def autoencoder_identity(fingerprinter: Fingerprinter, family: str, folder: Path) -> dict[str, Any]:
    """Cache identity of the latents: the VAE folder's fingerprint and what is stored."""
    return {"family": family, "vae": fingerprinter.folder(folder), "outputs": "mean+logvar"}


class AutoencoderKLFamily:
    """`ModelSpec` mixin for families whose VAE is an `AutoencoderKL` in MODEL/vae."""

    path: Path
    family: str

    def load_vae(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        return load_autoencoder(self.path / "vae", device, dtype)

    def encode_pixels(self, vae: nn.Module, pixels: torch.Tensor) -> list[Moments]:
        return encode_moments(vae, pixels)

    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return autoencoder_identity(fingerprinter, self.family, self.path / "vae")

    def latents_from_moments(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        return latents_from_moments(moments, draws, sample, self.vae_config)
