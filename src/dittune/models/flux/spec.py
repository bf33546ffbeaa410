"""Flux.1 (dev, schnell): everything family-specific lives here.

Text: CLIP's pooled output (77 tokens) and T5's hidden states (`model.t5_max_length`, default 512),
no attention masks, as `FluxPipeline.encode_prompt`. Latents: 16 channels, packed into 2×2 patches
(a sequence of 64-wide tokens) with (0, row, column) image ids and zero text ids.

Objective: rectified flow (models/flow_objective.py). By default σ is drawn uniformly and shifted
like the inference schedule, whose shift grows with the packed sequence length
(`resolution_shift`, the scheduler's base/max shift). Guidance-distilled checkpoints (dev) get
`loss.guidance` in their guidance embedding. At validation, `validation.guidance` is that
distilled guidance; the cached negative prompt is passed, but the stock pipeline only uses it with
`true_cfg_scale` > 1, which dittune leaves at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dittune.fingerprint import Fingerprinter
from dittune.models.autoencoder import AutoencoderKLFamily
from dittune.models.base import (
    LossOutput,
    LossSettings,
    ModelInfo,
    ModelSpec,
    TextEmbedding,
    TrainBatch,
    denoiser_dtype,
)
from dittune.models.draws import Draws, as_draws
from dittune.models.flux.facts import COMPONENTS, FluxFacts

CLIP_LENGTH = 77


@dataclass
class FluxTextEncoders:
    tokenizer: Any
    text_encoder: nn.Module
    tokenizer_2: Any
    text_encoder_2: nn.Module
    device: torch.device


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C), the layout `FluxPipeline._pack_latents` produces."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """The inverse of `pack_latents`."""
    b, _, d = packed.shape
    c = d // 4
    patches = packed.view(b, latent_height // 2, latent_width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, latent_height, latent_width)


def image_ids(latent_height: int, latent_width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 · W/2, 3) ids: 0, row, column of each packed patch."""
    rows = torch.arange(latent_height // 2, device=device, dtype=dtype)
    cols = torch.arange(latent_width // 2, device=device, dtype=dtype)
    grid = torch.zeros(latent_height // 2, latent_width // 2, 3, device=device, dtype=dtype)
    grid[..., 1] = rows[:, None]
    grid[..., 2] = cols[None, :]
    return grid.reshape(-1, 3)


class FluxSpec(FluxFacts, AutoencoderKLFamily, ModelSpec):
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    """The double-stream (joint) blocks, then the single-stream ones."""

    # ----------------------------------------------------------------- inspection
    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer_config.get("guidance_embeds", False))

    def inspect(self) -> ModelInfo:
        cfg, scfg = self.transformer_config, self.scheduler_config
        if scfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"{self.path}/scheduler declares {scfg.get('_class_name')}; Flux is a rectified-flow model and "
                "needs FlowMatchEulerDiscreteScheduler"
            )
        if 4 * int(self.vae_config.get("latent_channels", 16)) != int(cfg.get("in_channels", 64)):
            raise ValueError(
                f"{self.path}: transformer in_channels must be 4 × the VAE's latent_channels (2×2 packing)"
            )
        summary = {
            "double/single blocks": f"{cfg.get('num_layers')}/{cfg.get('num_single_layers')}",
            "hidden": int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128)),
            "guidance embedding": self.guidance_distilled,
            "scheduler": "FlowMatchEulerDiscreteScheduler"
            + (" (resolution-dependent shift)" if scfg.get("use_dynamic_shifting") else f" shift={scfg.get('shift')}"),
            "t5_max_length": self.t5_max_length,
        }
        version = "dev (guidance-distilled)" if self.guidance_distilled else "schnell-style (no guidance embedding)"
        return ModelInfo(family=self.family, version=version, path=self.path, summary=summary)

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(timestep_sampling="shift")

    def sampling_shift(self, settings: LossSettings, latent_height: int, latent_width: int) -> float | None:
        """The σ shift for training: the pipeline's for this size's packed sequence (see `training_shift`)."""
        from dittune.models.flow_objective import training_shift

        return training_shift(settings, self.scheduler_config, (latent_height // 2) * (latent_width // 2))

    def describe_objective(self, settings: LossSettings) -> str:
        from dittune.models import flow_objective as flow

        shift = None
        if settings.flow_shift is not None:
            shift = f"{settings.flow_shift:g}"
        elif settings.timestep_sampling == "shift":
            dynamic = self.scheduler_config.get("use_dynamic_shifting")
            shift = "the image size's shift" if dynamic else f"{self.scheduler_config.get('shift', 1.0):g}"
        line = flow.describe(settings, shift)
        return line + (f", guidance {settings.guidance:g}" if self.guidance_distilled else "")

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> FluxTextEncoders:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        clip = CLIPTextModel.from_pretrained(self.path / "text_encoder", dtype=dtype)
        t5 = T5EncoderModel.from_pretrained(self.path / "text_encoder_2", dtype=dtype)
        for module in (clip, t5):
            module.to(device).eval().requires_grad_(False)
        return FluxTextEncoders(
            tokenizer=AutoTokenizer.from_pretrained(self.path / "tokenizer"),
            text_encoder=clip,
            tokenizer_2=AutoTokenizer.from_pretrained(self.path / "tokenizer_2"),
            text_encoder_2=t5,
            device=device,
        )

    @torch.no_grad()
    def encode_prompts(self, encoders: FluxTextEncoders, prompts: list[str]) -> list[TextEmbedding]:
        clip_ids = encoders.tokenizer(
            prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = encoders.text_encoder(clip_ids.to(encoders.device), output_hidden_states=False).pooler_output
        t5_ids = encoders.tokenizer_2(
            prompts, padding="max_length", max_length=self.t5_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        states = encoders.text_encoder_2(t5_ids.to(encoders.device), output_hidden_states=False)[0]
        pooled, states = pooled.cpu(), states.cpu()
        return [{"clip_pooled": pooled[i], "t5_embeds": states[i]} for i in range(len(prompts))]

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            **{name: fingerprinter.folder(self.path / name) for name in COMPONENTS[3:]},
            "max_length": [CLIP_LENGTH, self.t5_max_length],
            "padding": "max_length, truncation, no attention mask",
            "outputs": "CLIP pooler_output; T5 last hidden",
        }

    # ---------------------------------------------------------------- image side
    def pipeline_latents(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return unpack_latents(latents, height // 8, width // 8)

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
        shift = self.sampling_shift(settings, x0.shape[-2], x0.shape[-1])
        sigmas, noise, x_t = flow.training_draw(x0, settings, draws, shift)
        prediction = self.forward(denoiser, x_t, sigmas, batch.text, settings.guidance)
        loss, logs = flow.flow_matching_loss(prediction.float(), x0, noise, sigmas, settings.weighting)  # type: ignore[arg-type]
        return LossOutput(loss=loss, logs=logs)

    def forward(
        self,
        denoiser: nn.Module,
        x_t: torch.Tensor,
        sigmas: torch.Tensor,
        text: dict[str, torch.Tensor],
        guidance: float = 1.0,
    ) -> torch.Tensor:
        """One transformer call on packed latents; returns the unpacked velocity (B, C, H, W)."""
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(x_t.device.type) else compute_dtype
        size, _, height, width = x_t.shape
        device = x_t.device
        t5 = text["t5_embeds"]
        guidance_input = None
        if self.guidance_distilled:
            guidance_input = torch.full((size,), guidance, device=device, dtype=torch.float32)
        packed = denoiser(
            hidden_states=pack_latents(x_t).to(input_dtype),
            timestep=sigmas.to(device=device, dtype=input_dtype),
            guidance=guidance_input,
            pooled_projections=text["clip_pooled"].to(input_dtype),
            encoder_hidden_states=t5.to(input_dtype),
            txt_ids=torch.zeros(t5.shape[1], 3, device=device, dtype=input_dtype),
            img_ids=image_ids(height, width, device, input_dtype),
            return_dict=False,
        )[0]
        return unpack_latents(packed, height, width)

    # ------------------------------------------------------------------ sampling
    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        return {
            "prompt_embeds": positive["t5_embeds"].unsqueeze(0),
            "pooled_prompt_embeds": positive["clip_pooled"].unsqueeze(0),
            "negative_prompt_embeds": negative["t5_embeds"].unsqueeze(0),
            "negative_pooled_prompt_embeds": negative["clip_pooled"].unsqueeze(0),
        }

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_max_length}
