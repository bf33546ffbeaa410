"""CogVideoX 1.0 / 1.5, text-to-video and image-to-video: everything family-specific lives here.

Text: T5 v1.1 XXL, 226 tokens padded to the maximum, no attention mask, last hidden state: exactly
`CogVideoXPipeline.encode_prompt`.

Latents: the cache holds each clip's VAE posterior (mean, log-variance) as (C, f, h, w); x0 is a draw
(or the mean) times `scaling_factor`, in the transformer's layout (B, f, C, h, w).

Objective (the official trainer's): v-prediction on the scheduler's own ᾱ. `CogVideoXDDIMScheduler`
shifts ᾱ by `snr_shift_scale` and rescales it to zero terminal SNR, so ᾱ is read from
`scheduler.alphas_cumprod`, never rebuilt from the betas. An integer t is drawn uniformly from
[0, 1000) per sample; x_t = √ᾱ·x0 + √(1−ᾱ)·ε; the output v gives x̂0 = √ᾱ·x_t − √(1−ᾱ)·v (the scheduler's
`get_velocity` relation); the loss is mean (x̂0 − x0)² weighted by 1/(1−ᾱ) (which equals the v-MSE).
`loss.noise_offset` and `loss.min_snr_gamma` (v-prediction form) are optional.

Positions: the 3-D RoPE of each batch's latent grid is computed as the pipelines compute it (1.0: the
crop region of the grid in the sample-size grid; 1.5: a slice of the maximum grid with ⌈f/2⌉ temporal
positions). The 1.0 I2V model also has learned positional embeddings, which fix its size.

CogVideoX 1.5 (temporal patch 2): a latent frame count that is not a multiple of the patch is padded at
the *front* with copies of the first latent frame. At inference the pipeline adds the same
`additional_frames` at the front of its latents and drops them before decoding; the official trainer
pads with first-frame copies. The padded frames take part in the loss, as in the official trainer.
`pipeline_latents` drops them from an `output_type="latent"` result.

Image-to-video: `encode_pixels` also encodes each clip's first frame after adding Gaussian noise in
pixel space with σ = exp(N(−3, 0.5)) (the official trainer's augmentation), cached as `image_mean` /
`image_logvar`. The noise is drawn at cache time from a CPU generator seeded with a hash of the frame's
8-bit pixels, so one source gives one entry, and the recipe is part of `vae_identity`. In training the
image latent (a posterior draw or the mean) is scaled as `CogVideoXImageToVideoPipeline` scales it
(× scaling_factor; ÷ when the VAE has `invert_scale_latents`, as 1.5's), placed at latent frame 0,
zero-padded to the (padded) clip length and concatenated after the noisy latents on the channel axis.
`ofs` = 2.0 where the transformer has an ofs embedding (1.5 I2V), as the pipeline passes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from dittune.fingerprint import Fingerprinter
from dittune.models.autoencoder import draw_latents, posterior_moments, split_moments
from dittune.models.base import (
    LossOutput,
    LossSettings,
    ModelInfo,
    ModelSpec,
    Moments,
    TextEmbedding,
    TrainBatch,
    denoiser_dtype,
)
from dittune.models.cogvideox.facts import (
    I2V_PIPELINE,
    TEXT_LENGTH,
    VAE_TEMPORAL,
    CogVideoXFacts,
    declared_pipeline,
)
from dittune.models.draws import Draws, as_draws
from dittune.models.text_encoder import SingleTextEncoder, load_single_text_encoder

VAE_SPATIAL = 8
SCHEDULERS = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")
"""Schedulers with CogVideoX's ᾱ (SNR shift, zero terminal SNR); both were released with the models."""
OFS = 2.0
"""The `ofs` input of CogVideoX1.5-5B-I2V, as its pipeline passes it."""
IMAGE_NOISE = {
    "frame": 0,
    "space": "pixels in [-1, 1], before encoding",
    "sigma": "exp(N(-3, 0.5))",
    "seed": "sha256 of the frame's 8-bit pixels and shape",
    "generator": "torch CPU",
    "draws": "log-sigma, then the noise",
}
"""The image-to-video conditioning recipe; part of the latent cache identity."""


@dataclass
class Schedule:
    """ᾱ of one scheduler and the coefficients derived from it, (T,) on one device."""

    alphas_cumprod: torch.Tensor
    sqrt_alpha: torch.Tensor
    sqrt_one_minus: torch.Tensor
    inverse_one_minus: torch.Tensor

    @classmethod
    def of(cls, alphas_cumprod: torch.Tensor, device: torch.device) -> Schedule:
        """Derived in float64 (float32 on MPS, which has none), then moved to `device`."""
        acp = alphas_cumprod.detach().to("cpu", torch.float64)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        tables = (acp, acp.sqrt(), (1.0 - acp).sqrt(), 1.0 / (1.0 - acp))
        return cls(*(table.to(dtype).to(device) for table in tables))


def rotary_embeddings(
    config: dict[str, Any], frames: int, height: int, width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The transformer's 3-D RoPE (cos, sin) for a latent grid of frames × height × width (latent units,
    1.5's frames already padded), as `CogVideoXPipeline._prepare_rotary_positional_embeddings` computes
    it; None for a model without RoPE (CogVideoX-2B)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not config.get("use_rotary_positional_embeddings"):
        return None
    patch, patch_t = int(config["patch_size"]), config.get("patch_size_t")
    grid = (height // patch, width // patch)
    base_height, base_width = int(config["sample_height"]) // patch, int(config["sample_width"]) // patch
    head_dim = int(config["attention_head_dim"])
    if patch_t is None:
        crops = get_resize_crop_region_for_grid(grid, base_width, base_height)
        return get_3d_rotary_pos_embed(head_dim, crops, grid, temporal_size=frames, device=device)
    return get_3d_rotary_pos_embed(
        head_dim,
        None,
        grid,
        temporal_size=-(-frames // int(patch_t)),
        grid_type="slice",
        max_size=(base_height, base_width),
        device=device,
    )


def padding_frames(latent_frames: int, patch_t: int | None) -> int:
    """Latent frames CogVideoX 1.5's pipelines add in front of `latent_frames` (their `additional_frames`)."""
    if not patch_t or latent_frames % patch_t == 0:
        return 0
    return patch_t - latent_frames % patch_t


def image_noise(frame: torch.Tensor) -> torch.Tensor:
    """The augmentation noise for one first frame (3, 1, H, W) in [-1, 1]: σ·N(0, 1) with σ = exp(N(−3, 0.5)),
    drawn from a generator seeded by the frame's 8-bit pixels (float32, CPU)."""
    levels = ((frame.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    digest = hashlib.sha256(repr(tuple(levels.shape)).encode() + levels.numpy().tobytes()).digest()
    generator = torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    sigma = torch.exp(-3.0 + 0.5 * torch.randn((), generator=generator))
    return sigma * torch.randn(tuple(frame.shape), generator=generator)


class CogVideoXSpec(CogVideoXFacts, ModelSpec):
    block_lists = ("transformer_blocks",)

    # ----------------------------------------------------------------- inspection
    @cached_property
    def is_i2v(self) -> bool:
        return declared_pipeline(self.path) == I2V_PIPELINE

    @property
    def version(self) -> str:
        return "1.5" if self.transformer_config.get("patch_size_t") else "1.0"

    @property
    def patch_t(self) -> int | None:
        value = self.transformer_config.get("patch_size_t")
        return int(value) if value else None

    def inspect(self) -> ModelInfo:
        cfg, scfg = self.transformer_config, self.scheduler_config
        latent = int(self.vae_config.get("latent_channels", 16))
        if int(cfg.get("in_channels", 16)) != latent * (2 if self.is_i2v else 1):
            kind = "an image-to-video" if self.is_i2v else "a text-to-video"
            raise ValueError(
                f"{self.path}: model_index.json names {kind} pipeline, but the transformer takes "
                f"{cfg.get('in_channels')} channels for {latent} latent channels"
            )
        if scfg.get("_class_name") not in SCHEDULERS or scfg.get("prediction_type") != "v_prediction":
            raise ValueError(
                f"{self.path}/scheduler declares {scfg.get('_class_name')} ({scfg.get('prediction_type')}); CogVideoX "
                f"trains on the SNR-shifted ᾱ of a v-prediction {' or '.join(SCHEDULERS)}"
            )
        warnings = []
        if int(cfg.get("max_text_seq_length", TEXT_LENGTH)) != TEXT_LENGTH:
            warnings.append(f"transformer max_text_seq_length {cfg['max_text_seq_length']}; prompts use {TEXT_LENGTH}")
        positions = "RoPE" if cfg.get("use_rotary_positional_embeddings") else "sin-cos"
        if cfg.get("use_learned_positional_embeddings"):
            width, height = self.native_size
            positions += f" + learned ({width}×{height} only; at other than {cfg.get('sample_frames')} frames "
            positions += "diffusers swaps them for sin-cos)"
            warnings.append(f"{self.path} has learned positional embeddings: it trains and samples at {width}×{height}")
        summary = {
            "kind": "image-to-video" if self.is_i2v else "text-to-video",
            "layers": cfg.get("num_layers"),
            "hidden": int(cfg.get("num_attention_heads", 30)) * int(cfg.get("attention_head_dim", 64)),
            "positions": positions,
            "frames": f"{self.frame_rule_at(self.path)} (temporal patch {self.patch_t or 1})",
            "scheduler": f"{scfg.get('_class_name')} snr_shift_scale={scfg.get('snr_shift_scale', 3.0)}",
            "text_length": TEXT_LENGTH,
        }
        version = f"{self.version} {'I2V' if self.is_i2v else 'T2V'}"
        return ModelInfo(family=self.family, version=version, path=self.path, summary=summary, warnings=warnings)

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings()

    def describe_objective(self, settings: LossSettings) -> str:
        shift = self.scheduler_config.get("snr_shift_scale", 3.0)
        text = (
            f"v-prediction on the scheduler's ᾱ (SNR shift {shift:g}), weight 1/(1−ᾱ); noise offset "
            f"{settings.noise_offset:g}, min-SNR {settings.min_snr_gamma or 'off'}"
        )
        if self.patch_t:
            text += "; odd latent frame counts padded in front (temporal patch 2)"
        if self.is_i2v:
            text += "; first frame noised (σ = exp(N(−3, 0.5))) as the image condition"
        return text

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> SingleTextEncoder:
        return load_single_text_encoder(self.path, "T5EncoderModel", device, dtype)

    @torch.no_grad()
    def encode_prompts(self, encoders: SingleTextEncoder, prompts: list[str]) -> list[TextEmbedding]:
        ids = encoders.tokenizer(
            prompts,
            padding="max_length",
            max_length=TEXT_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        embeds = encoders.encoder(ids.to(encoders.device))[0].cpu()
        return [{"t5_embeds": embeds[i]} for i in range(len(prompts))]

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            "text_encoder": fingerprinter.folder(self.path / "text_encoder"),
            "tokenizer": fingerprinter.folder(self.path / "tokenizer"),
            "max_length": TEXT_LENGTH,
            "padding": "max_length, truncation, no attention mask",
            "outputs": "T5 last hidden state",
        }

    # ---------------------------------------------------------------- image side
    @torch.no_grad()
    def encode_pixels(self, vae: nn.Module, pixels: torch.Tensor) -> list[Moments]:
        """Posterior moments of each clip (C, f, h, w); for an I2V model also those of its noised first frame."""
        moments = split_moments(*posterior_moments(vae, pixels))
        if self.is_i2v:
            first = pixels[:, :, :1].detach().float().cpu()
            noisy = first + torch.stack([image_noise(frame) for frame in first])
            for entry, image in zip(moments, split_moments(*posterior_moments(vae, noisy))):
                entry.update(image_mean=image["mean"], image_logvar=image["logvar"])
        return moments

    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        identity: dict[str, Any] = {
            "family": self.family,
            "vae": fingerprinter.folder(self.path / "vae"),
            "outputs": "mean+logvar (C, f, h, w)",
        }
        if self.is_i2v:
            identity["image_condition"] = IMAGE_NOISE
        return identity

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor") or 1.15258426)

    def latents_from_moments(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        """(B, C, f, h, w) moments → x0 = z · scaling_factor as (B, f, C, h, w), float32."""
        z = draw_latents(moments["mean"], moments["logvar"], draws, sample)
        return (z * self.scaling_factor).permute(0, 2, 1, 3, 4)

    def image_latents(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        """The cached first-frame condition, (B, 1, C, h, w), scaled as the I2V pipeline scales its image."""
        z = draw_latents(moments["image_mean"], moments["image_logvar"], draws, sample)
        inverted = bool(self.vae_config.get("invert_scale_latents"))
        scale = 1.0 / self.scaling_factor if inverted else self.scaling_factor
        return (z * scale).permute(0, 2, 1, 3, 4)

    def pipeline_latents(self, latents: torch.Tensor, width: int, height: int, frames: int = 1) -> torch.Tensor:
        """Drops the frames 1.5's pipelines pad in front (a pipeline returns them with `output_type="latent"`)."""
        wanted = (frames - 1) // VAE_TEMPORAL + 1
        return latents[:, latents.shape[1] - wanted :]

    # ------------------------------------------------------------------ denoiser
    def pad_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, f, C, h, w) with 1.5's padding in front: copies of the first latent frame."""
        extra = padding_frames(latents.shape[1], self.patch_t)
        if not extra:
            return latents
        return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1)

    @staticmethod
    def image_condition(image: torch.Tensor, frames: int) -> torch.Tensor:
        """The image latent (B, 1, C, h, w) at frame 0, zeros after it, `frames` long."""
        zeros = image.new_zeros((image.shape[0], frames - 1, *image.shape[2:]))
        return torch.cat([image, zeros], dim=1)

    def schedule(self, scheduler: Any, device: torch.device) -> Schedule:
        """The scheduler's own ᾱ and its coefficients on `device` (built once per scheduler and device)."""
        key = (id(scheduler), str(device))
        entry = self._schedules.get(key)
        if entry is None or entry[0] is not scheduler:
            entry = self._schedules[key] = (scheduler, Schedule.of(scheduler.alphas_cumprod, device))
        return entry[1]

    @cached_property
    def _schedules(self) -> dict[tuple[int, str], tuple[Any, Schedule]]:
        return {}

    def compute_loss(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        batch: TrainBatch,
        draws: Draws | torch.Generator,
        settings: LossSettings,
    ) -> LossOutput:
        draws = as_draws(draws)
        x0 = self.latents_from_moments(batch.moments, draws, settings.sample_latents)
        image = self.image_latents(batch.moments, draws, settings.sample_latents) if self.is_i2v else None
        x0 = self.pad_frames(x0)
        size, device = x0.shape[0], x0.device
        tables = self.schedule(scheduler, device)
        t = draws.randint(tables.alphas_cumprod.shape[0], (size,), device=device)
        noise = draws.randn(x0.shape, device=device, dtype=x0.dtype)
        if settings.noise_offset:
            offset = draws.randn((size, 1, x0.shape[2], 1, 1), device=device, dtype=x0.dtype)
            noise = noise + settings.noise_offset * offset
        shape = (size, 1, 1, 1, 1)
        sqrt_alpha = tables.sqrt_alpha[t].to(x0.dtype).reshape(shape)
        sqrt_one_minus = tables.sqrt_one_minus[t].to(x0.dtype).reshape(shape)
        x_t = sqrt_alpha * x0 + sqrt_one_minus * noise
        model_input = x_t if image is None else torch.cat([x_t, self.image_condition(image, x_t.shape[1])], dim=2)
        v = self.forward(denoiser, model_input, t, batch.text["t5_embeds"]).float()
        x0_pred = sqrt_alpha * x_t - sqrt_one_minus * v
        mse = (x0_pred - x0).square().mean(dim=(1, 2, 3, 4)) * tables.inverse_one_minus[t].float()
        if settings.min_snr_gamma is not None:
            mse = mse * self.min_snr_weight(tables, t, settings.min_snr_gamma)
        logs = {"loss_mse": mse.detach().mean(), "timestep": t.detach().float().mean()}
        return LossOutput(loss=mse.mean(), logs=logs)  # type: ignore[arg-type]

    @staticmethod
    def min_snr_weight(tables: Schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """min(SNR, γ)/(SNR + 1), the v-prediction form; SNR = ᾱ/(1−ᾱ)."""
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
        acp = tables.alphas_cumprod[t]
        snr = acp / (1.0 - acp)
        return (snr.clamp(max=gamma) / (snr + 1.0)).float()

    def forward(
        self, denoiser: nn.Module, model_input: torch.Tensor, t: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """One transformer call on (B, f, C, h, w) input (1.5: frames padded; I2V: condition concatenated),
        with the RoPE and `ofs` the pipelines pass for that grid."""
        cfg = self.transformer_config
        frames, height, width = model_input.shape[1], model_input.shape[3], model_input.shape[4]
        self._check_size(height, width)
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(model_input.device.type) else compute_dtype
        hidden = model_input.to(input_dtype)
        ofs = hidden.new_full((1,), OFS) if cfg.get("ofs_embed_dim") else None
        return denoiser(
            hidden_states=hidden,
            encoder_hidden_states=text.to(input_dtype),
            timestep=t,
            ofs=ofs,
            image_rotary_emb=rotary_embeddings(cfg, frames, height, width, model_input.device),
            return_dict=False,
        )[0]

    def _check_size(self, height: int, width: int) -> None:
        """Sizes the positional embeddings cannot take, with the fix (latent units in, pixels in the message)."""
        cfg = self.transformer_config
        native_w, native_h = self.native_size
        size = f"{width * VAE_SPATIAL}×{height * VAE_SPATIAL}"
        if cfg.get("use_learned_positional_embeddings") and (height, width) != self._sample_grid:
            raise ValueError(
                f"{self.path} has learned positional embeddings for {native_w}×{native_h} only, not {size}; "
                "train it at that size (data.resolution)"
            )
        if self.patch_t and (height > self._sample_grid[0] or width > self._sample_grid[1]):
            raise ValueError(f"{size} exceeds the RoPE grid of {self.path} ({native_w}×{native_h} at most)")

    @property
    def _sample_grid(self) -> tuple[int, int]:
        cfg = self.transformer_config
        return int(cfg.get("sample_height", 60)), int(cfg.get("sample_width", 90))

    # ------------------------------------------------------------------ sampling
    def sampling_pipeline_class(self, conditioned: bool) -> str:
        super().sampling_pipeline_class(conditioned)
        return I2V_PIPELINE if self.is_i2v else self.pipeline_class

    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        return {
            "prompt_embeds": positive["t5_embeds"].unsqueeze(0),
            "negative_prompt_embeds": negative["t5_embeds"].unsqueeze(0),
        }

    def clip_kwargs(self, frames: int, fps: float, image: Any | None) -> dict[str, Any]:
        """`num_frames`, and the conditioning image (PIL) of an I2V model; CogVideoX takes no frame rate."""
        if not self.is_i2v:
            return {"num_frames": frames}
        if image is None:
            raise ValueError(f"{self.path} is an image-to-video model: give a conditioning image")
        return {"num_frames": frames, "image": image}

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": TEXT_LENGTH}

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) of the transformer's sample size in pixels."""
        cfg = self.transformer_config
        return int(cfg.get("sample_width", 90)) * VAE_SPATIAL, int(cfg.get("sample_height", 60)) * VAE_SPATIAL

    def default_size(self, pipeline: Any) -> tuple[int, int]:
        """1.0: its sample size (720×480). 1.5: 1360×768 as its model card, within the RoPE grid's maximum
        (its sample size, 2400×2400 in the release)."""
        width, height = self.native_size
        if self.patch_t:
            return min(width, 1360), min(height, 768)
        return width, height
