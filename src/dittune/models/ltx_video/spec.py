"""LTX-Video (0.9.x, `LTXVideoTransformer3DModel`): everything family-specific lives here.

Text: one T5 encoder (`model.t5_max_length`, default 128), as `LTXPipeline.encode_prompt`: padded to
the full length and encoded *without* an attention mask; the mask is cached next to the hidden states
and given to the transformer's cross-attention.

Latents: the causal video VAE compresses ×32 in space and ×8 in time (8k+1 frames → k+1 latent
frames, the first from the first frame alone). The cache keeps the posterior (mean, and the log-variance
the encoder shares across channels); training normalises with the per-channel `latents_mean` /
`latents_std` buffers stored in the VAE's weights and its `scaling_factor`, as the pipeline does. x0 is
(B, C, f, h, w); the transformer sees it packed into a token sequence (patch size 1: one token per
latent pixel).

Objective: rectified flow (models/flow_objective.py). "shift" sampling (the default) shifts σ by the
pipeline's dynamic shift for the clip's latent token count (`calculate_shift` over the scheduler's
base/max sequence lengths and shifts, s = exp(μ)). RoPE is scaled by (8 / fps, 32, 32) with each
clip's frame rate. First-frame conditioning (`loss.first_frame_p`): with that probability per clip the
first latent frame is left clean, its tokens get timestep 0 (as `LTXImageToVideoPipeline` feeds an
image) and it is left out of the loss, so the model keeps working image-to-video.
"""

from __future__ import annotations

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
    SampleMeta,
    TextEmbedding,
    TrainBatch,
    denoiser_dtype,
)
from dittune.models.draws import Draws, as_draws
from dittune.models.folder import weight_keys
from dittune.models.ltx_video.facts import COMPONENTS, LTXVideoFacts, vae_compression
from dittune.models.text_encoder import SingleTextEncoder, load_single_text_encoder


def pack_latents(latents: torch.Tensor, patch: int = 1, patch_t: int = 1) -> torch.Tensor:
    """(B, C, F, H, W) → (B, F/pt · H/p · W/p, C·pt·p·p), the token layout of `LTXPipeline._pack_latents`."""
    b, c, f, h, w = latents.shape
    grid = latents.reshape(b, c, f // patch_t, patch_t, h // patch, patch, w // patch, patch)
    return grid.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // patch_t) * (h // patch) * (w // patch), -1)


def unpack_latents(tokens: torch.Tensor, frames: int, height: int, width: int, patch: int = 1, patch_t: int = 1):
    """The inverse of `pack_latents` for a latent grid of `frames` × `height` × `width`."""
    b = tokens.shape[0]
    grid = tokens.reshape(b, frames // patch_t, height // patch, width // patch, -1, patch_t, patch, patch)
    return grid.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, -1, frames, height, width)


class LTXVideoSpec(LTXVideoFacts, ModelSpec):
    block_lists = ("transformer_blocks",)

    # ----------------------------------------------------------------- inspection
    @property
    def compression(self) -> tuple[int, int]:
        """(spatial, temporal) compression of the VAE."""
        return vae_compression(self.vae_config)

    @property
    def patches(self) -> tuple[int, int]:
        """(spatial, temporal) patch size of the transformer."""
        cfg = self.transformer_config
        return int(cfg.get("patch_size", 1)), int(cfg.get("patch_size_t", 1))

    @cached_property
    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel `latents_mean` / `latents_std` buffers, read from its weights (float32)."""
        from safetensors import safe_open

        channels = int(self.vae_config.get("latent_channels", 128))
        found: dict[str, torch.Tensor] = {}
        for file in sorted((self.path / "vae").glob("*.safetensors")):
            with safe_open(file, framework="pt") as handle:
                names = set(handle.keys())
                found.update({k: handle.get_tensor(k) for k in ("latents_mean", "latents_std") if k in names})
        mean = found.get("latents_mean", torch.zeros(channels)).float()
        std = found.get("latents_std", torch.ones(channels)).float()
        return mean, std

    def inspect(self) -> ModelInfo:
        cfg, scfg, vcfg = self.transformer_config, self.scheduler_config, self.vae_config
        if scfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"{self.path}/scheduler declares {scfg.get('_class_name')}; LTX-Video is a rectified-flow model and "
                "needs FlowMatchEulerDiscreteScheduler"
            )
        (spatial, temporal), (patch, patch_t) = self.compression, self.patches
        if self.alignment % (spatial * patch):
            raise ValueError(
                f"{self.path}: VAE compression ×{spatial} × patch {patch} does not divide the "
                f"{self.alignment}-pixel alignment of LTX-Video in dittune"
            )
        latent = int(vcfg.get("latent_channels", 128))
        if latent * patch * patch * patch_t != int(cfg.get("in_channels", 128)):
            raise ValueError(f"{self.path}: transformer in_channels must be the VAE's latent_channels × patch volume")
        warnings = []
        keys = weight_keys(self.path / "vae") or set()
        if not {"latents_mean", "latents_std"} <= keys:
            warnings.append(
                f"{self.path}/vae weights lack latents_mean/latents_std; latents are used unnormalised (mean 0, std 1)"
            )
        summary = {
            "layers": cfg.get("num_layers"),
            "hidden": int(cfg.get("num_attention_heads", 32)) * int(cfg.get("attention_head_dim", 64)),
            "caption_channels": cfg.get("caption_channels"),
            "vae": f"×{spatial} spatial, ×{temporal} temporal, {latent} channels",
            "scheduler": "FlowMatchEulerDiscreteScheduler"
            + (" (sequence-length shift)" if scfg.get("use_dynamic_shifting") else f" shift={scfg.get('shift')}"),
            "t5_max_length": self.t5_max_length,
        }
        version = "0.9.1+ (timestep-conditioned VAE decoder)" if vcfg.get("timestep_conditioning") else "0.9"
        return ModelInfo(family=self.family, version=version, path=self.path, summary=summary, warnings=warnings)

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(timestep_sampling="shift", first_frame_p=0.1)

    def sampling_shift(self, settings: LossSettings, frames: int, height: int, width: int) -> float | None:
        """The σ shift for training: the pipeline's for a latent grid of this size (frames × height × width
        tokens; `flow_objective.training_shift`)."""
        from dittune.models.flow_objective import training_shift

        return training_shift(settings, self.scheduler_config, frames * height * width)

    def describe_objective(self, settings: LossSettings) -> str:
        from dittune.models import flow_objective as flow

        shift = None
        if settings.flow_shift is not None:
            shift = f"{settings.flow_shift:g}"
        elif settings.timestep_sampling == "shift":
            dynamic = self.scheduler_config.get("use_dynamic_shifting")
            shift = "the clip size's shift" if dynamic else f"{self.scheduler_config.get('shift', 1.0):g}"
        return flow.describe(settings, shift) + f", first-frame conditioning p={settings.first_frame_p:g}"

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> SingleTextEncoder:
        return load_single_text_encoder(self.path, "T5EncoderModel", device, dtype)

    @torch.no_grad()
    def encode_prompts(self, encoders: SingleTextEncoder, prompts: list[str]) -> list[TextEmbedding]:
        tokens = encoders.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        states = encoders.encoder(tokens.input_ids.to(encoders.device))[0].cpu()
        mask = tokens.attention_mask.bool()
        return [{"t5_embeds": states[i], "t5_mask": mask[i]} for i in range(len(prompts))]

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            **{name: fingerprinter.folder(self.path / name) for name in COMPONENTS[3:]},
            "max_length": self.t5_max_length,
            "padding": "max_length, truncation; encoder without attention mask",
            "outputs": "T5 last hidden + attention mask",
        }

    # ---------------------------------------------------------------- video side
    @torch.no_grad()
    def encode_pixels(self, vae: nn.Module, pixels: torch.Tensor) -> list[Moments]:
        """(B, 3, F, H, W) → {"mean": (C, f, h, w), "logvar": (1, f, h, w)} per clip.

        The encoder predicts one log-variance and repeats it over the channels; one channel is kept
        (all of them if a VAE ever differs)."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        mean, logvar = posterior_moments(vae, pixels)
        if torch.equal(logvar, logvar[:, :1].expand_as(logvar)):
            logvar = logvar[:, :1]
        return split_moments(mean, logvar)

    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            "vae": fingerprinter.folder(self.path / "vae"),
            "outputs": "mean + shared logvar, unnormalised",
        }

    def latents_from_moments(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        """Normalised float32 latents (B, C, f, h, w): (z − latents_mean) · scaling_factor / latents_std."""
        logvar = moments["logvar"].expand_as(moments["mean"])  # a shared log-variance channel is stored once
        z = draw_latents(moments["mean"], logvar, draws, sample)
        mean, std = (s.to(z.device).view(1, -1, 1, 1, 1) for s in self.latent_statistics)
        return (z - mean) * float(self.vae_config.get("scaling_factor") or 1.0) / std

    def latent_grid(self, width: int, height: int, frames: int) -> tuple[int, int, int]:
        """(frames, height, width) of the latent grid of a clip in pixels."""
        spatial, temporal = self.compression
        return (frames - 1) // temporal + 1, height // spatial, width // spatial

    def pipeline_latents(self, latents: torch.Tensor, width: int, height: int, frames: int = 1) -> torch.Tensor:
        if latents.ndim == 5:
            return latents
        return unpack_latents(latents, *self.latent_grid(width, height, frames), *self.patches)

    # ------------------------------------------------------------------ denoiser
    def compute_loss(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        batch: TrainBatch,
        draws: Draws | torch.Generator,
        settings: LossSettings,
    ) -> LossOutput:
        draws = as_draws(draws)
        from dittune.models import flow_objective as flow

        x0 = self.latents_from_moments(batch.moments, draws, settings.sample_latents)
        shift = self.sampling_shift(settings, *x0.shape[2:])
        sigmas, noise, x_t = flow.training_draw(x0, settings, draws, shift)
        conditioned = self.draw_first_frame(x0, settings.first_frame_p, draws)
        x_t = torch.where(self.first_frame_mask(x0, conditioned).bool(), x0, x_t)
        # Per-token timesteps only in a step that conditions a clip (one read-back, and only when p > 0).
        any_conditioned = settings.first_frame_p > 0 and x0.shape[2] > 1 and bool(conditioned.any())
        rates = self.frame_rates(batch.meta)
        prediction = self.forward(denoiser, x_t, sigmas, batch.text, rates, conditioned if any_conditioned else None)
        loss, logs = self.masked_loss(prediction.float(), x0, noise, sigmas, conditioned, settings.weighting)
        return LossOutput(loss=loss, logs=logs)

    def draw_first_frame(self, x0: torch.Tensor, p: float, draws: Draws | torch.Generator) -> torch.Tensor:
        """(B,) bool: which clips keep their first latent frame clean (never a clip of one latent frame)."""
        draws = as_draws(draws)
        draw = draws.rand((x0.shape[0],), device=x0.device)
        return (draw < p) & (x0.shape[2] > 1)

    @staticmethod
    def first_frame_mask(x0: torch.Tensor, conditioned: torch.Tensor) -> torch.Tensor:
        """(B, 1, f, 1, 1) float: 1 on the first latent frame of conditioned clips, else 0."""
        mask = torch.zeros(x0.shape[0], 1, x0.shape[2], 1, 1, device=x0.device, dtype=x0.dtype)
        mask[:, 0, 0] = conditioned.to(x0.dtype).view(-1, 1, 1)
        return mask

    def frame_rates(self, meta: list[SampleMeta]) -> list[float]:
        return [float(m.fps or self.default_fps) for m in meta]

    def forward(
        self,
        denoiser: nn.Module,
        x_t: torch.Tensor,
        sigmas: torch.Tensor,
        text: dict[str, torch.Tensor],
        fps: list[float],
        conditioned: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One transformer call on packed x_t (B, C, f, h, w); returns the velocity in the same layout.

        `timestep = 1000·σ` as the scheduler feeds it, one per clip; given `conditioned` (B,) bool, one per token,
        0 on the first latent frame of the conditioned clips (as `LTXImageToVideoPipeline`)."""
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(x_t.device.type) else compute_dtype
        frames, height, width = x_t.shape[2:]
        patch, patch_t = self.patches
        timestep = sigmas.to(device=x_t.device, dtype=torch.float32) * 1000.0
        if conditioned is not None:
            mask = self.first_frame_mask(x_t, conditioned).expand(-1, 1, -1, height, width)
            timestep = timestep[:, None] * (1.0 - pack_latents(mask, patch, patch_t)[..., 0].float())
        packed = denoiser(
            hidden_states=pack_latents(x_t, patch, patch_t).to(input_dtype),
            encoder_hidden_states=text["t5_embeds"].to(input_dtype),
            timestep=timestep.to(input_dtype),
            encoder_attention_mask=text["t5_mask"],
            num_frames=frames // patch_t,
            height=height // patch,
            width=width // patch,
            rope_interpolation_scale=self.rope_scale(fps, x_t.device),
            return_dict=False,
        )[0]
        return unpack_latents(packed, frames, height, width, patch, patch_t)

    def rope_scale(self, fps: list[float], device: torch.device) -> tuple[Any, float, float]:
        """(temporal compression / fps, spatial, spatial) as the pipeline passes it; per clip when rates differ."""
        spatial, temporal = self.compression
        if len(set(fps)) == 1:
            return temporal / fps[0], spatial, spatial
        rates = torch.tensor([temporal / f for f in fps], device=device, dtype=torch.float32)
        return rates.view(-1, 1, 1, 1, 1), spatial, spatial

    @staticmethod
    def masked_loss(
        prediction: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        conditioned: torch.Tensor,
        weighting: str = "none",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Flow-matching MSE per clip over its noised latent frames (a conditioning frame is left out)."""
        from dittune.models.flow_objective import loss_weights, velocity_target

        target = velocity_target(x0.float(), noise.float())
        per_frame = (prediction.float() - target).square().mean(dim=(1, 3, 4))  # (B, f)
        counted = torch.ones_like(per_frame)
        counted[:, 0] = 1.0 - conditioned.float()
        per_sample = (per_frame * counted).sum(dim=1) / counted.sum(dim=1)
        weighted = per_sample * loss_weights(weighting, sigmas).to(per_sample.device)  # type: ignore[arg-type]
        logs = {"loss_mse": per_sample.detach().mean(), "sigma_mean": sigmas.detach().float().mean()}
        return weighted.mean(), logs

    # ------------------------------------------------------------------ sampling
    def sampling_pipeline_class(self, conditioned: bool) -> str:
        return "LTXImageToVideoPipeline" if conditioned else self.pipeline_class

    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        return {
            "prompt_embeds": positive["t5_embeds"].unsqueeze(0),
            "prompt_attention_mask": positive["t5_mask"].unsqueeze(0),
            "negative_prompt_embeds": negative["t5_embeds"].unsqueeze(0),
            "negative_prompt_attention_mask": negative["t5_mask"].unsqueeze(0),
        }

    def clip_kwargs(self, frames: int, fps: float, image: Any | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_frames": frames, "frame_rate": fps}
        if image is not None:
            kwargs["image"] = image
        return kwargs

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_max_length}

    def default_size(self, pipeline: Any) -> tuple[int, int]:
        return 704, 512  # the stock pipelines' defaults (LTX-Video's native 768×512 class of sizes)
