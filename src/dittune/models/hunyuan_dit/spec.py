"""Hunyuan-DiT (v1.0–v1.2, distilled): everything family-specific lives here.

Objective (as the official trainer): DDPM, 1000 steps, scaled_linear betas, v-prediction MSE on the
first 4 output channels, optional VLB on the learned-variance channels. Text: BERT ("bilingual
CLIP", 77 tokens) and mT5 (256 tokens), both padded with id 0 and kept with their masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

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
from dittune.models.diffusion_objective import SchedulerTables
from dittune.models.draws import Draws, as_draws
from dittune.models.hunyuan_dit import inspect as folder
from dittune.models.hunyuan_dit.facts import HunyuanDiTFacts

CLIP_LENGTH = 77
T5_LENGTH = 256
ROPE_BASE_PIXELS = 512
"""RoPE positions interpolate every bucket into the 512-pixel base grid (official `base512`)."""
SAMPLING_ORIGINAL_SIZE = (1024, 1024)
"""Size conditioning at sampling time for v1.0/v1.1, as the official inference (`--size-cond 1024 1024`)."""


@dataclass
class HunyuanTextEncoders:
    tokenizer: Any
    text_encoder: nn.Module
    tokenizer_2: Any
    text_encoder_2: nn.Module
    device: torch.device


def rotary_embedding(
    head_dim: int, latent_height: int, latent_width: int, patch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE (cos, sin) for one bucket, computed as the stock pipeline does."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    grid = (latent_height // patch_size, latent_width // patch_size)
    base = ROPE_BASE_PIXELS // 8 // patch_size
    crops = get_resize_crop_region_for_grid(grid, base)
    return get_2d_rotary_pos_embed(head_dim, crops, grid, use_real=True, device=device, output_type="pt")


class HunyuanDiTSpec(HunyuanDiTFacts, AutoencoderKLFamily, ModelSpec):
    # ----------------------------------------------------------------- inspection
    def inspect(self) -> ModelInfo:
        return folder.detect(self.path, self.denoiser_weight_names(), self.checkpoint)

    @cached_property
    def uses_size_conditioning(self) -> bool:
        return bool(self.transformer_config.get("use_style_cond_and_image_meta_size", True))

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(vlb=method == "full")

    def describe_objective(self, settings: LossSettings) -> str:
        return "v-prediction (DDPM), " + super().describe_objective(settings)

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> HunyuanTextEncoders:
        from transformers import AutoTokenizer, BertModel, T5EncoderModel

        bert = BertModel.from_pretrained(self.path / "text_encoder", add_pooling_layer=False, dtype=dtype)
        t5 = T5EncoderModel.from_pretrained(self.path / "text_encoder_2", dtype=dtype)
        for module in (bert, t5):
            module.to(device).eval().requires_grad_(False)
        return HunyuanTextEncoders(
            tokenizer=AutoTokenizer.from_pretrained(self.path / "tokenizer"),
            text_encoder=bert,
            tokenizer_2=AutoTokenizer.from_pretrained(self.path / "tokenizer_2"),
            text_encoder_2=t5,
            device=device,
        )

    @torch.no_grad()
    def encode_prompts(self, encoders: HunyuanTextEncoders, prompts: list[str]) -> list[TextEmbedding]:
        outputs: dict[str, torch.Tensor] = {}
        for tokenizer, encoder, length, suffix in (
            (encoders.tokenizer, encoders.text_encoder, CLIP_LENGTH, ""),
            (encoders.tokenizer_2, encoders.text_encoder_2, T5_LENGTH, "_2"),
        ):
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=length,
                truncation=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            mask = tokens.attention_mask.to(encoders.device)
            states = encoder(tokens.input_ids.to(encoders.device), attention_mask=mask)[0]
            outputs[f"prompt_embeds{suffix}"] = states.cpu()
            outputs[f"prompt_attention_mask{suffix}"] = mask.cpu()
        return [{key: value[i] for key, value in outputs.items()} for i in range(len(prompts))]

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            "tokenizer": fingerprinter.folder(self.path / "tokenizer"),
            "tokenizer_2": fingerprinter.folder(self.path / "tokenizer_2"),
            "text_encoder": fingerprinter.folder(self.path / "text_encoder"),
            "text_encoder_2": fingerprinter.folder(self.path / "text_encoder_2"),
            "max_length": [CLIP_LENGTH, T5_LENGTH],
            "padding": "max_length, pad id from tokenizer (0), truncation",
            "outputs": "last_hidden_state + attention_mask",
        }

    # ------------------------------------------------------------------ denoiser
    block_lists = ("blocks",)

    def enable_gradient_checkpointing(self, denoiser: nn.Module) -> None:
        from dittune.models.checkpointing import enable_block_checkpointing

        enable_block_checkpointing(self.transformer_blocks(denoiser))

    def image_meta_size(self, batch: TrainBatch, device: torch.device) -> torch.Tensor:
        """(B, 6) in the official training order: original w, h, target w, h, crop left, top."""
        rows = [[*m.original_size, *m.target_size, *m.crop_left_top] for m in batch.meta]
        return torch.tensor(rows, dtype=torch.float32, device=device)

    def build_controlnet(self, denoiser: nn.Module, layers: int | None) -> tuple[nn.Module, list[nn.Parameter]]:
        """As Tencent's trainer: embedders and the first blocks copied from the denoiser, zero-initialised input and
        output projections; the blocks and projections train, the embedders stay frozen. One block per long skip
        (num_layers // 2 - 1), built from the denoiser's config (diffusers' `from_transformer` misreads v1.2's)."""
        from diffusers import HunyuanDiT2DControlNetModel

        from dittune.models.controlnet import copy_weights

        config = denoiser.config
        blocks = config.num_layers // 2 - 1
        if layers not in (None, blocks):
            raise ValueError(
                f"controlnet.layers: a Hunyuan-DiT ControlNet has one block per long skip of the denoiser, {blocks} "
                "here; remove the key"
            )
        controlnet = HunyuanDiT2DControlNetModel(
            num_attention_heads=config.num_attention_heads,
            attention_head_dim=config.attention_head_dim,
            in_channels=config.in_channels,
            patch_size=config.patch_size,
            activation_fn=config.activation_fn,
            sample_size=config.sample_size,
            hidden_size=config.hidden_size,
            transformer_num_layers=config.num_layers,
            mlp_ratio=config.mlp_ratio,
            cross_attention_dim=config.cross_attention_dim,
            cross_attention_dim_t5=config.cross_attention_dim_t5,
            pooled_projection_dim=config.pooled_projection_dim,
            text_len=config.text_len,
            text_len_t5=config.text_len_t5,
            use_style_cond_and_image_meta_size=config.use_style_cond_and_image_meta_size,
        )
        copy_weights(
            denoiser,
            controlnet,
            ("pos_embed.", "text_embedder.", "text_embedding_padding", "time_extra_emb.", "blocks."),
        )
        controlnet.requires_grad_(False)
        trained = [controlnet.blocks, controlnet.input_block, controlnet.controlnet_blocks]
        params = [p for module in trained for p in module.parameters()]
        for param in params:
            param.requires_grad_(True)
        return controlnet, params

    def compute_loss(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        batch: TrainBatch,
        draws: Draws | torch.Generator,
        settings: LossSettings,
    ) -> LossOutput:
        draws = as_draws(draws)
        from dittune.models.diffusion_objective import add_noise, learned_sigma_v_loss

        tables = self._tables(scheduler)
        x0 = self.latents_from_moments(batch.moments, draws, settings.sample_latents)
        device = x0.device
        size = x0.shape[0]
        t = draws.randint(len(tables.betas), (size,), device=device)
        noise = draws.randn(x0.shape, device=device, dtype=x0.dtype)
        if settings.noise_offset:
            offset = draws.randn((size, x0.shape[1], 1, 1), device=device, dtype=x0.dtype)
            noise = noise + settings.noise_offset * offset
        x_t = add_noise(tables, x0, noise, t)
        output = self.forward(denoiser, x_t, t, batch)
        loss, logs = learned_sigma_v_loss(
            tables, output.float(), x0, x_t, noise, t, vlb=settings.vlb, min_snr_gamma=settings.min_snr_gamma
        )
        return LossOutput(loss=loss, logs=logs)

    def forward(self, denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        """One denoiser call on a bucket batch; returns (B, 8, h, w)."""
        compute_dtype = denoiser_dtype(denoiser)
        autocast = torch.is_autocast_enabled(x_t.device.type)
        # Timesteps stay float32 under autocast: bf16 cannot hold integers above 256 exactly.
        input_dtype = torch.float32 if autocast else compute_dtype
        rope = self._rope(x_t.shape[-2], x_t.shape[-1], x_t.device)
        text = batch.text
        kwargs: dict[str, Any] = {}
        if self.uses_size_conditioning:
            kwargs["image_meta_size"] = self.image_meta_size(batch, x_t.device).to(input_dtype)
            kwargs["style"] = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
        return denoiser(
            x_t.to(input_dtype),
            t.to(input_dtype),
            encoder_hidden_states=text["prompt_embeds"].to(input_dtype),
            text_embedding_mask=text["prompt_attention_mask"],
            encoder_hidden_states_t5=text["prompt_embeds_2"].to(input_dtype),
            text_embedding_mask_t5=text["prompt_attention_mask_2"],
            image_rotary_emb=rope,
            return_dict=False,
            **kwargs,
        )[0]

    def _rope(self, latent_height: int, latent_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE per bucket, computed once per (size, device)."""
        cache: dict = self.__dict__.setdefault("_rope_cache", {})
        key = (latent_height, latent_width, str(device))
        if key not in cache:
            cfg = self.transformer_config
            cache[key] = rotary_embedding(
                int(cfg["attention_head_dim"]), latent_height, latent_width, int(cfg["patch_size"]), device
            )
        return cache[key]

    @cached_property
    def _tables(self) -> SchedulerTables:
        return SchedulerTables()

    # ------------------------------------------------------------------ sampling
    pipeline_init_extras: ClassVar[dict[str, Any]] = {"requires_safety_checker": False}

    def size_kwargs(self, width: int, height: int) -> dict[str, Any]:
        return {
            "width": width,
            "height": height,
            "use_resolution_binning": False,
            "original_size": SAMPLING_ORIGINAL_SIZE,
            "target_size": (width, height),
            "crops_coords_top_left": (0, 0),
        }

    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for key in ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_2", "prompt_attention_mask_2"):
            kwargs[key] = positive[key].unsqueeze(0)
            kwargs[f"negative_{key}"] = negative[key].unsqueeze(0)
        return kwargs
