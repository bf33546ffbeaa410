"""HunyuanVideo (text-to-video, the guidance-distilled 1.0 release): everything family-specific lives here.

Text, exactly as `HunyuanVideoPipeline.encode_prompt`: each prompt is put into the pipeline's chat
template, tokenized by the Llama tokenizer to 256 + `crop_start` tokens (padded on the right), and the
Llama hidden states two layers below the top are kept with the attention mask, both with the first
`crop_start` (template) positions cropped off; CLIP-L gives the pooled output of the bare prompt
(77 tokens). The two encoders are cached (and dropped for caption dropout) separately. The Llama
tokenizer is loaded as its own config declares it (see `load_tokenizer`), also for `dittune sample`.

Latents: `AutoencoderKLHunyuanVideo` (8× spatial, 4× temporal compression: clips of 4k+1 frames); the
cache keeps the posterior mean and log-variance, the model sees ``z · scaling_factor`` (the pipeline
divides by it before decoding; there is no shift factor).

Objective: rectified flow (models/flow_objective.py), ``timestep = 1000·σ``. By default σ is drawn
uniformly and shifted by the scheduler's shift (7.0 in the released model), the training recipe of
musubi-tuner: the stock sampler spaces σ uniformly and applies the same shift, so training sees noise
levels in the proportion the sampler visits them (most steps at high noise). `loss.flow_shift` lowers it
(musubi suggests about 3 for fine detail); `loss.timestep_sampling = "uniform"` (no shift) is
finetrainers' and OneTrainer's choice; "logit_normal" is diffusion-pipe's.

Guidance: the transformer is guidance-distilled. The stock pipeline feeds its `guidance_scale` × 1000 to
the guidance embedding, so training feeds `loss.guidance` × 1000 the same way (1.0 by default, as
finetrainers, OneTrainer and diffusion-pipe train). At validation `validation.guidance` is that
distilled guidance (6.0 is the pipeline's default); the cached negative prompt is passed, but the stock
pipeline only uses it with `true_cfg_scale` > 1, which dittune leaves at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dittune.fingerprint import Fingerprinter
from dittune.models.autoencoder import autoencoder_identity, latents_from_moments
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
from dittune.models.folder import read_json
from dittune.models.hunyuan_video.facts import COMPONENTS, HunyuanVideoFacts

LLAMA_LENGTH = 256
"""Prompt tokens after the template crop (the pipeline's `max_sequence_length` default)."""
CLIP_LENGTH = 77
LAYERS_TO_SKIP = 2
"""The pipeline's `num_hidden_layers_to_skip`: hidden states of layer −3 (embeddings count as a layer)."""
GUIDANCE_SCALE = 1000.0
"""The pipeline multiplies `guidance_scale` by this before the guidance embedding."""


@dataclass
class HunyuanVideoTextEncoders:
    tokenizer: Any
    text_encoder: nn.Module
    tokenizer_2: Any
    text_encoder_2: nn.Module
    device: torch.device


def prompt_template() -> dict[str, Any]:
    """The stock pipeline's default prompt template (`template` with one `{}`, `crop_start`)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return dict(DEFAULT_PROMPT_TEMPLATE)


def crop_start(tokenizer: Any, template: dict[str, Any]) -> int:
    """Template tokens to drop; when the template declares none, counted as the pipeline counts them."""
    if template.get("crop_start") is not None:
        return int(template["crop_start"])
    ids = tokenizer(template["template"], padding="max_length", return_tensors="pt").input_ids
    return ids.shape[-1] - 2


class HunyuanVideoSpec(HunyuanVideoFacts, ModelSpec):
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    """The double-stream (joint) blocks, then the single-stream ones."""

    # ----------------------------------------------------------------- inspection
    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer_config.get("guidance_embeds", True))

    def inspect(self) -> ModelInfo:
        cfg, scfg = self.transformer_config, self.scheduler_config
        if scfg.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"{self.path}/scheduler declares {scfg.get('_class_name')}; HunyuanVideo is a rectified-flow model "
                "and needs FlowMatchEulerDiscreteScheduler"
            )
        if cfg.get("image_condition_type"):
            raise ValueError(
                f"{self.path}: the transformer is an image-to-video one ({cfg['image_condition_type']}); "
                "dittune trains the text-to-video HunyuanVideo"
            )
        self._check_widths(cfg)
        warnings = []
        if not self.guidance_distilled:
            warnings.append(
                "no guidance embedding in the transformer: loss.guidance and validation.guidance do nothing"
            )
        summary = {
            "double/single blocks": f"{cfg.get('num_layers')}/{cfg.get('num_single_layers')}",
            "hidden": int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128)),
            "guidance embedding": self.guidance_distilled,
            "scheduler": f"FlowMatchEulerDiscreteScheduler shift={scfg.get('shift', 1.0)}",
            "text": f"Llama layer -{LAYERS_TO_SKIP + 1} ({LLAMA_LENGTH} tokens after the template) + CLIP pooled",
        }
        version = "T2V (guidance-distilled)" if self.guidance_distilled else "T2V"
        return ModelInfo(family=self.family, version=version, path=self.path, summary=summary, warnings=warnings)

    def _check_widths(self, cfg: dict[str, Any]) -> None:
        """The transformer's input widths must match the VAE and both text encoders."""
        pairs = {
            "vae latent_channels / transformer in_channels": (self.vae_config.get("latent_channels"), "in_channels"),
            "text_encoder hidden_size / transformer text_embed_dim": (
                read_json(self.path / "text_encoder" / "config.json").get("hidden_size"),
                "text_embed_dim",
            ),
            "text_encoder_2 hidden_size / transformer pooled_projection_dim": (
                read_json(self.path / "text_encoder_2" / "config.json").get("hidden_size"),
                "pooled_projection_dim",
            ),
        }
        for what, (given, key) in pairs.items():
            if given is not None and cfg.get(key) is not None and int(given) != int(cfg[key]):
                raise ValueError(f"{self.path}: {what} differ ({given} vs {cfg[key]})")

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(timestep_sampling="shift")

    def sampling_shift(self, settings: LossSettings, scheduler_config: dict[str, Any]) -> float | None:
        """The σ shift for training (see `flow_objective.training_shift`)."""
        from dittune.models.flow_objective import training_shift

        return training_shift(settings, scheduler_config)

    def describe_objective(self, settings: LossSettings) -> str:
        from dittune.models import flow_objective as flow

        shift = self.sampling_shift(settings, self.scheduler_config)
        line = flow.describe(settings, f"{shift:g}" if shift else None)
        if self.guidance_distilled:
            line += f", guidance {settings.guidance:g} (embedded ×{GUIDANCE_SCALE:g})"
        return line

    # ------------------------------------------------------------------ text side
    def load_tokenizer(self) -> Any:
        """The Llama tokenizer as its own tokenizer_config.json declares it (`AutoTokenizer`).

        Not `LlamaTokenizerFast` as model_index.json names it: in transformers 5 that class rebuilds a
        SentencePiece-style pipeline (``▁`` spaces, byte fallback) around the vocabulary of tokenizer.json,
        which garbles a byte-level Llama 3 tokenizer such as the released checkpoint's
        (PreTrainedTokenizerFast). For a SentencePiece-style Llama tokenizer both give the same tokens.
        """
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / "tokenizer")

    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> HunyuanVideoTextEncoders:
        from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel

        llama = LlamaModel.from_pretrained(self.path / "text_encoder", dtype=dtype)
        clip = CLIPTextModel.from_pretrained(self.path / "text_encoder_2", dtype=dtype)
        for module in (llama, clip):
            module.to(device).eval().requires_grad_(False)
        return HunyuanVideoTextEncoders(
            tokenizer=self.load_tokenizer(),
            text_encoder=llama,
            tokenizer_2=CLIPTokenizer.from_pretrained(self.path / "tokenizer_2"),
            text_encoder_2=clip,
            device=device,
        )

    @torch.no_grad()
    def encode_prompts(self, encoders: HunyuanVideoTextEncoders, prompts: list[str]) -> list[TextEmbedding]:
        states, mask = self._llama(encoders, prompts)
        clip_ids = encoders.tokenizer_2(
            prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = encoders.text_encoder_2(clip_ids.to(encoders.device), output_hidden_states=False).pooler_output.cpu()
        return [
            {"llama_embeds": states[i], "llama_mask": mask[i], "clip_pooled": pooled[i]} for i in range(len(prompts))
        ]

    def _llama(self, encoders: HunyuanVideoTextEncoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, attention mask) of the templated prompts, template positions cropped (CPU)."""
        template = prompt_template()
        crop = crop_start(encoders.tokenizer, template)
        tokens = encoders.tokenizer(
            [template["template"].format(p) for p in prompts],
            max_length=LLAMA_LENGTH + crop,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        mask = tokens.attention_mask.to(encoders.device)
        output = encoders.text_encoder(
            input_ids=tokens.input_ids.to(encoders.device), attention_mask=mask, output_hidden_states=True
        )
        states = output.hidden_states[-(LAYERS_TO_SKIP + 1)]
        return states[:, crop:].cpu(), mask[:, crop:].cpu()

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        template = prompt_template()
        return {
            "family": self.family,
            **{name: fingerprinter.folder(self.path / name) for name in COMPONENTS[3:]},
            "template": template["template"],
            "crop_start": template.get("crop_start"),
            "max_length": [LLAMA_LENGTH, CLIP_LENGTH],
            "padding": "max_length, truncation; Llama with attention mask",
            "outputs": f"Llama hidden states[-{LAYERS_TO_SKIP + 1}] + mask, template cropped; CLIP pooler_output",
        }

    # ---------------------------------------------------------------- video side
    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return autoencoder_identity(fingerprinter, self.family, self.path / "vae")

    def latents_from_moments(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        return latents_from_moments(moments, draws, sample, self.vae_config)

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
        shift = self.sampling_shift(settings, scheduler.config)
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
        """One transformer call with the inputs in the dtypes the stock pipeline uses: latents, text and
        guidance (`guidance` × 1000) in the compute dtype, `timestep = 1000·σ` in float32."""
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(x_t.device.type) else compute_dtype
        device = x_t.device
        guidance_input = None
        if self.guidance_distilled:
            guidance_input = torch.full((x_t.shape[0],), guidance, device=device, dtype=input_dtype) * GUIDANCE_SCALE
        return denoiser(
            hidden_states=x_t.to(input_dtype),
            timestep=(sigmas.to(device=device, dtype=torch.float32) * 1000.0),
            encoder_hidden_states=text["llama_embeds"].to(input_dtype),
            encoder_attention_mask=text["llama_mask"].to(input_dtype),
            pooled_projections=text["clip_pooled"].to(input_dtype),
            guidance=guidance_input,
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ sampling
    def load_pipeline(self, dtype: torch.dtype, conditioned: bool = False) -> Any:
        """The stock pipeline from the model folder, with the tokenizer `load_tokenizer` reads."""
        import diffusers

        cls = getattr(diffusers, self.sampling_pipeline_class(conditioned))
        pipeline = cls.from_pretrained(self.path, torch_dtype=dtype, tokenizer=self.load_tokenizer())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        return {
            "prompt_embeds": positive["llama_embeds"].unsqueeze(0),
            "prompt_attention_mask": positive["llama_mask"].unsqueeze(0),
            "pooled_prompt_embeds": positive["clip_pooled"].unsqueeze(0),
            "negative_prompt_embeds": negative["llama_embeds"].unsqueeze(0),
            "negative_prompt_attention_mask": negative["llama_mask"].unsqueeze(0),
            "negative_pooled_prompt_embeds": negative["clip_pooled"].unsqueeze(0),
        }

    def clip_kwargs(self, frames: int, fps: float, image: Any | None) -> dict[str, Any]:
        """The clip length; the pipeline has no frame-rate input (fps only sets the written clip's rate)."""
        return {"num_frames": frames}

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": LLAMA_LENGTH}

    def pipeline_latents(self, latents: torch.Tensor, width: int, height: int, frames: int = 1) -> torch.Tensor:
        """The pipeline's latent output is already (B, C, f, h, w) in model space (before ÷ scaling_factor)."""
        return latents

    def default_size(self, pipeline: Any) -> tuple[int, int]:
        """The stock pipeline's own default (1280 × 720)."""
        import inspect

        params = inspect.signature(type(pipeline).__call__).parameters
        return int(params["width"].default), int(params["height"].default)
