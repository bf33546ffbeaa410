"""Stable Diffusion 3 / 3.5 (MMDiT): everything family-specific lives here.

Text: CLIP-L and OpenCLIP-bigG (77 tokens; penultimate hidden states + pooled projections) and T5
(`model.t5_max_length`, default 256), combined exactly as `StableDiffusion3Pipeline.encode_prompt`:
the two CLIP sequences are concatenated on the feature axis, zero-padded to the T5 width and put in
front of the T5 sequence; the pooled projections are concatenated. Each encoder's output is cached
separately so caption dropout can drop one encoder at a time (as SD3 was trained).

Objective: rectified flow (see models/flow_objective.py) with SD3's logit-normal σ sampling by
default; `loss.timestep_sampling = "shift"` uses the scheduler's shift (3.0).
"""

from __future__ import annotations

import inspect
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
from dittune.models.sd3.facts import COMPONENTS, SD3Facts

CLIP_LENGTH = 77


@dataclass
class SD3TextEncoders:
    tokenizers: tuple[Any, Any, Any]
    encoders: tuple[nn.Module, nn.Module, nn.Module]
    device: torch.device


class SD3Spec(SD3Facts, AutoencoderKLFamily, ModelSpec):
    # ----------------------------------------------------------------- inspection
    def inspect(self) -> ModelInfo:
        cfg, scfg = self.transformer_config, self.scheduler_config
        version = "SD3.0" if not cfg.get("qk_norm") else "SD3.5"
        if cfg.get("dual_attention_layers"):
            version += " (MMDiT-X: dual attention, as 3.5 Medium)"
        warnings = []
        if scfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"{self.path}/scheduler declares {scfg.get('_class_name')}; SD3 is a rectified-flow model and "
                "needs FlowMatchEulerDiscreteScheduler"
            )
        if int(self.vae_config.get("latent_channels", 16)) != int(cfg.get("in_channels", 16)):
            raise ValueError(f"{self.path}: vae latent_channels and transformer in_channels differ")
        summary = {
            "layers": cfg.get("num_layers"),
            "hidden": int(cfg.get("num_attention_heads", 18)) * int(cfg.get("attention_head_dim", 64)),
            "joint_attention_dim": cfg.get("joint_attention_dim"),
            "scheduler": f"FlowMatchEulerDiscreteScheduler shift={scfg.get('shift', 1.0)}",
            "t5_max_length": self.t5_max_length,
        }
        return ModelInfo(family=self.family, version=version, path=self.path, summary=summary, warnings=warnings)

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(timestep_sampling="logit_normal")

    def describe_objective(self, settings: LossSettings) -> str:
        from dittune.models import flow_objective as flow

        shift = self.sampling_shift(settings, self.scheduler_config)
        return flow.describe(settings, f"{shift:g}" if shift else None)

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> SD3TextEncoders:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        encoders = (
            CLIPTextModelWithProjection.from_pretrained(self.path / "text_encoder", dtype=dtype),
            CLIPTextModelWithProjection.from_pretrained(self.path / "text_encoder_2", dtype=dtype),
            T5EncoderModel.from_pretrained(self.path / "text_encoder_3", dtype=dtype),
        )
        for module in encoders:
            module.to(device).eval().requires_grad_(False)
        tokenizers = tuple(AutoTokenizer.from_pretrained(self.path / name) for name in COMPONENTS[6:])
        return SD3TextEncoders(tokenizers=tokenizers, encoders=encoders, device=device)  # type: ignore[arg-type]

    @torch.no_grad()
    def encode_prompts(self, encoders: SD3TextEncoders, prompts: list[str]) -> list[TextEmbedding]:
        outputs: dict[str, torch.Tensor] = {}
        for name, tokenizer, encoder in zip(("clip_l", "clip_g"), encoders.tokenizers[:2], encoders.encoders[:2]):
            ids = tokenizer(
                prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
            result = encoder(ids.to(encoders.device), output_hidden_states=True)
            outputs[f"{name}_embeds"] = result.hidden_states[-2].cpu()
            outputs[f"{name}_pooled"] = result[0].cpu()
        ids = encoders.tokenizers[2](
            prompts,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        outputs["t5_embeds"] = encoders.encoders[2](ids.to(encoders.device))[0].cpu()
        return [{key: value[i] for key, value in outputs.items()} for i in range(len(prompts))]

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            **{name: fingerprinter.folder(self.path / name) for name in COMPONENTS[3:]},
            "max_length": [CLIP_LENGTH, CLIP_LENGTH, self.t5_max_length],
            "padding": "max_length, truncation, no attention mask",
            "outputs": "CLIP penultimate hidden + pooled projection; T5 last hidden",
        }

    def joint_text(self, text: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) for a batch, as the stock pipeline assembles them."""
        clip = torch.cat([text["clip_l_embeds"], text["clip_g_embeds"]], dim=-1)
        t5 = text["t5_embeds"]
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([text["clip_l_pooled"], text["clip_g_pooled"]], dim=-1)
        return torch.cat([clip, t5], dim=-2), pooled

    # ------------------------------------------------------------------ denoiser

    def sampling_shift(self, settings: LossSettings, scheduler_config: dict[str, Any]) -> float | None:
        """The σ shift for training (see `flow_objective.training_shift`)."""
        from dittune.models.flow_objective import training_shift

        return training_shift(settings, scheduler_config)

    def build_controlnet(self, denoiser: nn.Module, layers: int | None) -> tuple[nn.Module, list[nn.Parameter]]:
        """As diffusers' SD3 ControlNet trainer: the denoiser's config with `layers` blocks (default and at most half,
        so the denoiser reads every block's residual), its embedders and first blocks copied, zero-initialised input
        embedding and block outputs. Everything trains but the last block's text-stream output (its attention output
        projection and feed-forward), which no residual depends on. The pooled projection is fed to it (not zeroed),
        in training and in the pipeline alike."""
        from diffusers import SD3ControlNetModel

        from dittune.models.controlnet import copy_weights

        config = dict(denoiser.config)
        total = int(config["num_layers"])
        blocks = layers or max(1, total // 2)
        if blocks > max(1, total // 2):
            raise ValueError(
                f"controlnet.layers: {blocks} blocks; the denoiser's {total} blocks read at most {max(1, total // 2)} "
                "residuals (the others would never train)"
            )
        accepted = set(inspect.signature(SD3ControlNetModel.__init__).parameters)
        settings = {k: v for k, v in config.items() if k in accepted}
        settings.update(num_layers=blocks, extra_conditioning_channels=0, force_zeros_for_pooled_projection=False)
        controlnet = SD3ControlNetModel(**settings)
        copy_weights(
            denoiser, controlnet, ("pos_embed.", "time_text_embed.", "context_embedder.", "transformer_blocks.")
        )
        controlnet.requires_grad_(True)
        last = controlnet.transformer_blocks[-1]
        for unused in (last.attn.to_add_out, last.ff_context):  # the text stream's output after the last block
            if unused is not None:
                unused.requires_grad_(False)
        return controlnet, [p for p in controlnet.parameters() if p.requires_grad]

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
        shift = self.sampling_shift(settings, scheduler.config)
        sigmas, noise, x_t = flow.training_draw(x0, settings, draws, shift)
        prediction = self.forward(denoiser, x_t, sigmas, batch.text)
        loss, logs = flow.flow_matching_loss(prediction.float(), x0, noise, sigmas, settings.weighting)  # type: ignore[arg-type]
        return LossOutput(loss=loss, logs=logs)

    def forward(
        self, denoiser: nn.Module, x_t: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One transformer call; `timestep = 1000·σ` as the scheduler feeds it at sampling time."""
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(x_t.device.type) else compute_dtype
        prompt_embeds, pooled = self.joint_text(text)
        return denoiser(
            hidden_states=x_t.to(input_dtype),
            encoder_hidden_states=prompt_embeds.to(input_dtype),
            pooled_projections=pooled.to(input_dtype),
            timestep=(sigmas * 1000.0).to(input_dtype),
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ sampling
    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        embeds, pooled = self.joint_text({k: v.unsqueeze(0) for k, v in positive.items()})
        negative_embeds, negative_pooled = self.joint_text({k: v.unsqueeze(0) for k, v in negative.items()})
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative_embeds,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.t5_max_length}
