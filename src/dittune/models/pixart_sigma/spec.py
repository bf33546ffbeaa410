"""PixArt-Sigma: everything family-specific lives here.

Objective (as the official trainer, IDDPM): DDPM with the scheduler's betas (linear 1e-4 → 0.02,
1000 steps), epsilon prediction with learned sigma — the transformer outputs 8 channels, the first 4
are the noise prediction (MSE), the last 4 the variance values (VLB on the detached mean; on by
default for full fine-tuning). The stock pipeline drops the variance half at sampling time.

Text: one T5 encoder with its attention mask (`model.t5_max_length`, default 300 as Sigma). The
resolution/aspect-ratio micro-conditions are passed when the transformer config uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
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
from dittune.models.diffusion_objective import SchedulerTables
from dittune.models.draws import Draws, as_draws
from dittune.models.folder import read_json
from dittune.models.pixart_sigma.facts import PixArtSigmaFacts


@dataclass
class PixArtTextEncoders:
    tokenizer: Any
    text_encoder: nn.Module
    device: torch.device


class PixArtSigmaSpec(PixArtSigmaFacts, AutoencoderKLFamily, ModelSpec):
    # ----------------------------------------------------------------- inspection
    @cached_property
    def uses_micro_conditions(self) -> bool:
        """The transformer embeds resolution and aspect ratio (diffusers' rule when the key is unset)."""
        value = self.transformer_config.get("use_additional_conditions")
        return bool(value) if value is not None else int(self.transformer_config.get("sample_size", 128)) == 128

    @cached_property
    def learns_sigma(self) -> bool:
        cfg = self.transformer_config
        return int(cfg.get("out_channels") or cfg.get("in_channels", 4)) == 2 * int(cfg.get("in_channels", 4))

    def inspect(self) -> ModelInfo:
        cfg = self.transformer_config
        scfg = read_json(self.path / "scheduler" / "scheduler_config.json")
        prediction = scfg.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(
                f"{self.path}/scheduler/scheduler_config.json has prediction_type={prediction!r}; PixArt-Sigma is "
                'trained with "epsilon" — set it there'
            )
        warnings = []
        if self.uses_micro_conditions:
            warnings.append(
                "the transformer uses resolution/aspect-ratio micro-conditions: training passes them, but the stock "
                "PixArtSigmaPipeline does not, so validation images of this model will fail"
            )
        summary = {
            "layers": cfg.get("num_layers"),
            "hidden": int(cfg.get("num_attention_heads", 16)) * int(cfg.get("attention_head_dim", 72)),
            "learned sigma": self.learns_sigma,
            "micro-conditions": self.uses_micro_conditions,
            "scheduler": f"{scfg.get('_class_name')} {scfg.get('beta_schedule')} {prediction}",
            "t5_max_length": self.t5_max_length,
        }
        return ModelInfo(family=self.family, version="Sigma", path=self.path, summary=summary, warnings=warnings)

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(vlb=method == "full" and self.learns_sigma)

    def describe_objective(self, settings: LossSettings) -> str:
        return "epsilon (DDPM, learned sigma), " + super().describe_objective(settings)

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> PixArtTextEncoders:
        from transformers import AutoTokenizer, T5EncoderModel

        encoder = T5EncoderModel.from_pretrained(self.path / "text_encoder", dtype=dtype)
        encoder.to(device).eval().requires_grad_(False)
        return PixArtTextEncoders(AutoTokenizer.from_pretrained(self.path / "tokenizer"), encoder, device)

    @torch.no_grad()
    def encode_prompts(self, encoders: PixArtTextEncoders, prompts: list[str]) -> list[TextEmbedding]:
        tokens = encoders.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(encoders.device)
        states = encoders.text_encoder(tokens.input_ids.to(encoders.device), attention_mask=mask)[0].cpu()
        return [{"prompt_embeds": states[i], "prompt_attention_mask": mask[i].cpu()} for i in range(len(prompts))]

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            "tokenizer": fingerprinter.folder(self.path / "tokenizer"),
            "text_encoder": fingerprinter.folder(self.path / "text_encoder"),
            "max_length": self.t5_max_length,
            "padding": "max_length, truncation, no caption cleaning",
            "outputs": "last_hidden_state + attention_mask",
        }

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
        from dittune.models.diffusion_objective import add_noise, learned_sigma_loss, min_snr_weight

        tables = self._tables(scheduler)
        x0 = self.latents_from_moments(batch.moments, draws, settings.sample_latents)
        size, device = x0.shape[0], x0.device
        t = draws.randint(tables.num_timesteps, (size,), device=device)
        noise = draws.randn(x0.shape, device=device, dtype=x0.dtype)
        if settings.noise_offset:
            offset = draws.randn((size, x0.shape[1], 1, 1), device=device, dtype=x0.dtype)
            noise = noise + settings.noise_offset * offset
        x_t = add_noise(tables, x0, noise, t)
        output = self.forward(denoiser, x_t, t, batch).float()
        if self.learns_sigma:
            loss, logs = learned_sigma_loss(
                tables, output, x0, x_t, noise, t, vlb=settings.vlb, min_snr_gamma=settings.min_snr_gamma,
                prediction_type="epsilon",
            )  # fmt: skip
            return LossOutput(loss=loss, logs=logs)
        mse = (output - noise).square().mean(dim=(1, 2, 3))
        if settings.min_snr_gamma is not None:
            mse = mse * min_snr_weight(tables, t, settings.min_snr_gamma, "epsilon").to(mse.device)
        return LossOutput(loss=mse.mean(), logs={"loss_mse": mse.detach().mean(), "loss_vlb": 0.0})

    def micro_conditions(self, batch: TrainBatch, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """added_cond_kwargs: (height, width) and height/width of each sample, as PixArtAlphaPipeline passes."""
        if not self.uses_micro_conditions:
            return {"resolution": None, "aspect_ratio": None}
        sizes = [m.target_size for m in batch.meta]
        resolution = torch.tensor([[h, w] for w, h in sizes], dtype=dtype, device=device)
        aspect = torch.tensor([[h / w] for w, h in sizes], dtype=dtype, device=device)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def forward(self, denoiser: nn.Module, x_t: torch.Tensor, t: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(x_t.device.type) else compute_dtype
        return denoiser(
            x_t.to(input_dtype),
            encoder_hidden_states=batch.text["prompt_embeds"].to(input_dtype),
            encoder_attention_mask=batch.text["prompt_attention_mask"],
            timestep=t,
            added_cond_kwargs=self.micro_conditions(batch, x_t.device, input_dtype),
            return_dict=False,
        )[0]

    @cached_property
    def _tables(self) -> SchedulerTables:
        return SchedulerTables()

    # ------------------------------------------------------------------ sampling
    def size_kwargs(self, width: int, height: int) -> dict[str, Any]:
        return {"width": width, "height": height, "use_resolution_binning": False}

    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"negative_prompt": None}  # the default "" would clash with negative_prompt_embeds
        for key in ("prompt_embeds", "prompt_attention_mask"):
            kwargs[key] = positive[key].unsqueeze(0)
            kwargs[f"negative_{key}"] = negative[key].unsqueeze(0)
        return kwargs

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"clean_caption": False, "max_sequence_length": self.t5_max_length}
