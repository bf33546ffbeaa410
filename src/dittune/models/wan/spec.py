"""Wan 2.1 / 2.2 text-to-video (`WanTransformer3DModel`, `WanPipeline`): everything family-specific lives here.

Text, exactly as `WanPipeline.encode_prompt`: each prompt is cleaned as the pipeline cleans it (HTML entities,
whitespace, and ftfy where installed), tokenized by the UMT5 tokenizer to 512 tokens and encoded *with* its
attention mask; the hidden states are kept for the prompt's own tokens and zeroed after them. The transformer
takes no text mask: it attends to the zero padding, as in sampling, so only the (512, D) states are cached.

Latents: `AutoencoderKLWan`, a causal video VAE (4× temporal: clips of 4k+1 frames, the first frame alone;
8× spatial for the Wan 2.1 VAE, 16× for Wan 2.2's, which unshuffles 2×2 pixels first). The cache keeps the
posterior mean and per-channel log-variance; training draws from it (or takes the mean) and normalises with
the per-channel `latents_mean` / `latents_std` lists of the VAE's config.json, ``(z − mean) · (1 / std)``: the
inverse of what the pipeline does before decoding (``latents / (1 / std) + mean``).

Objective: rectified flow (models/flow_objective.py), ``timestep = 1000·σ``. By default σ is drawn uniformly
and shifted by the scheduler's flow shift (3.0 in the Wan 2.1 T2V checkpoints' UniPC config, the 480p
setting; 5.0 for TI2V-5B): the stock sampler spaces σ uniformly and applies the same shift, so training sees
noise levels in the proportion sampling visits them (musubi-tuner's recommended Wan recipe is the same
"shift" sampling with shift 3). `loss.flow_shift` changes it (Wan's authors sample 720p with 5.0);
`loss.timestep_sampling = "logit_normal"` is the SD3-style alternative. UniPC feeds the transformer
integer timesteps (it truncates 1000·σ); training feeds the continuous 1000·σ, which the sinusoidal time
embedding treats alike.

Wan 2.2 TI2V-5B folders (`expand_timesteps` in model_index.json) get the timestep once per latent token, as
that pipeline feeds it, and their own alignment (32), clip length (121 frames), rate (24 fps) and size
(1280×704).

Wan 2.2 A14B folders (two experts, `transformer` for timesteps ≥ boundary_ratio·1000 and `transformer_2` below;
T2V-A14B: 0.875) train one expert per run (`model.expert`: "high_noise" or "low_noise"). The expert only sees its
side of the boundary b: σ is drawn as above and restricted to [b, 1) (high noise) or (0, b) (low noise), keeping
the draw's distribution within the range (`flow_objective.sample_sigmas(within=...)`; musubi-tuner's recommended
A14B recipe: min/max timestep 875/1000 and 0/875 with `--preserve_distribution_shape`). Validation samples with the
whole A14B pipeline: the live expert and the other one loaded frozen from the folder, switched at b.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dittune.fingerprint import Fingerprinter
from dittune.models.autoencoder import draw_latents
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
from dittune.models.flow_objective import scheduler_shift
from dittune.models.text_encoder import SingleTextEncoder, load_single_text_encoder
from dittune.models.wan.facts import COMPONENTS, TEXT_LENGTH, WanFacts


def clean_prompt(prompt: str) -> str:
    """The pipeline's own prompt cleaning (`prompt_clean`: ftfy where installed, HTML entities, whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(prompt)


class WanSpec(WanFacts, ModelSpec):
    block_lists = ("blocks",)

    def __init__(
        self,
        path: str | Path,
        t5_max_length: int | None = None,
        expert: str | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        super().__init__(path, t5_max_length, expert, checkpoint)
        self.geometry = self.geometry_at(self.path)
        self.pipeline_init_extras = {"expand_timesteps": True} if self.geometry.ti2v else {}
        self.boundary = self.boundary_at(self.path) if expert is not None else None
        if self.boundary is not None:
            self.pipeline_init_extras = {**self.pipeline_init_extras, "boundary_ratio": self.boundary}

    @property
    def sigma_range(self) -> tuple[float, float] | None:
        """The σ range the trained expert denoises: [boundary, 1) for high noise, (0, boundary) for low; None
        for a single denoiser. The pipeline gives `transformer` the timesteps t ≥ boundary·1000."""
        if self.boundary is None:
            return None
        return (self.boundary, 1.0) if self.denoiser_component == "transformer" else (0.0, self.boundary)

    def _range_text(self) -> str:
        low, high = self.sigma_range
        return f"{'[' if low > 0 else '('}{low:g}, {high:g})"

    # ----------------------------------------------------------------- inspection
    @cached_property
    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (`latents_mean`, `latents_std`) from the VAE's config, float32 (C,)."""
        return tuple(torch.tensor(self.vae_config[key], dtype=torch.float32) for key in ("latents_mean", "latents_std"))

    def inspect(self) -> ModelInfo:
        cfg, scfg, vcfg, geometry = self.transformer_config, self.scheduler_config, self.vae_config, self.geometry
        problems = self.check_folder(self.path) if self.expert is not None else []
        if problems:
            raise ValueError(problems[-1])
        name = scfg.get("_class_name")
        flow = name == "FlowMatchEulerDiscreteScheduler" or (
            name == "UniPCMultistepScheduler"
            and scfg.get("use_flow_sigmas")
            and scfg.get("prediction_type") == "flow_prediction"
        )
        if not flow:
            raise ValueError(
                f"{self.path}/scheduler declares {name} without flow-matching σ; Wan is a rectified-flow model "
                "(UniPCMultistepScheduler with use_flow_sigmas and flow_prediction, or FlowMatchEulerDiscreteScheduler)"
            )
        channels = int(vcfg.get("z_dim", 16))
        if cfg.get("image_dim") or cfg.get("added_kv_proj_dim") or int(cfg.get("in_channels", 16)) != channels:
            raise ValueError(
                f"{self.path}: the transformer takes {cfg.get('in_channels')} input channels (image conditioning?) "
                f"but the VAE gives {channels}; dittune trains Wan text-to-video models"
            )
        if any(len(vcfg.get(key) or ()) != channels for key in ("latents_mean", "latents_std")):
            raise ValueError(f"{self.path}/vae/config.json needs latents_mean and latents_std with {channels} values")
        heads, layers = int(cfg.get("num_attention_heads", 40)), int(cfg.get("num_layers", 40))
        if geometry.ti2v:
            version = "2.2 TI2V-5B"
        elif self.boundary is not None:
            version = "2.2 A14B"
        else:
            version = {(12, 30): "2.1 1.3B", (40, 40): "2.1 14B"}.get((heads, layers), "2.1")
        summary = {
            "layers": layers,
            "hidden": heads * int(cfg.get("attention_head_dim", 128)),
            "vae": f"×{geometry.spatial} spatial, ×{geometry.temporal} temporal, {channels} channels",
            "scheduler": f"{name} flow shift {scheduler_shift(scfg):g}",
            "timesteps": "per token" if geometry.ti2v else "per clip",
            "text_length": TEXT_LENGTH,
        }
        if self.boundary is not None:
            summary["expert"] = f"{self.expert} ({self.denoiser_component}), σ in {self._range_text()}"
        return ModelInfo(family=self.family, version=version, path=self.path, summary=summary)

    def default_loss_settings(self, method: str) -> LossSettings:
        return LossSettings(timestep_sampling="shift")

    def sampling_shift(self, settings: LossSettings) -> float | None:
        """The σ shift for training: explicit, else the scheduler's for "shift" sampling, else none."""
        from dittune.models.flow_objective import training_shift

        return training_shift(settings, self.scheduler_config)

    def describe_objective(self, settings: LossSettings) -> str:
        from dittune.models import flow_objective as flow

        shift = self.sampling_shift(settings)
        line = flow.describe(settings, f"{shift:g}" if shift else None)
        if self.sigma_range is not None:
            line += (
                f", {self.expert} expert ({self.denoiser_component}): σ in {self._range_text()} "
                "(the draw restricted to the expert's side of the boundary)"
            )
        return line + (", timestep per token (TI2V)" if self.geometry.ti2v else "")

    # ------------------------------------------------------------------ text side
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> SingleTextEncoder:
        return load_single_text_encoder(self.path, "UMT5EncoderModel", device, dtype)

    @torch.no_grad()
    def encode_prompts(self, encoders: SingleTextEncoder, prompts: list[str]) -> list[TextEmbedding]:
        tokens = encoders.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=TEXT_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask
        states = encoders.encoder(tokens.input_ids.to(encoders.device), mask.to(encoders.device))
        states = states.last_hidden_state.cpu()
        embeddings = []
        for i, length in enumerate(mask.gt(0).sum(dim=1).tolist()):
            kept = torch.zeros_like(states[i])
            kept[:length] = states[i, :length]
            embeddings.append({"t5_embeds": kept})
        return embeddings

    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        import importlib.util

        ftfy = importlib.util.find_spec("ftfy") is not None
        return {
            "family": self.family,
            **{name: fingerprinter.folder(self.path / name) for name in COMPONENTS[3:]},
            "cleaning": ("ftfy, " if ftfy else "") + "HTML unescape, whitespace",
            "max_length": TEXT_LENGTH,
            "padding": "max_length, truncation; UMT5 with attention mask",
            "outputs": "UMT5 last hidden state, zero after the prompt's tokens",
        }

    # ---------------------------------------------------------------- video side
    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        return {
            "family": self.family,
            "vae": fingerprinter.folder(self.path / "vae"),
            "outputs": "mean + logvar, unnormalised",
        }

    def latents_from_moments(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        """Normalised float32 latents (B, C, f, h, w): (z − latents_mean) · (1 / latents_std), z drawn or the mean."""
        z = draw_latents(moments["mean"], moments["logvar"], draws, sample)
        mean, std = (s.to(z.device).view(1, -1, 1, 1, 1) for s in self.latent_statistics)
        return (z - mean) * (1.0 / std)

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
        shift = self.sampling_shift(settings)
        sigmas, noise, x_t = flow.training_draw(x0, settings, draws, shift, self.sigma_range)
        prediction = self.forward(denoiser, x_t, sigmas, batch.text)
        loss, logs = flow.flow_matching_loss(prediction.float(), x0, noise, sigmas, settings.weighting)  # type: ignore[arg-type]
        return LossOutput(loss=loss, logs=logs)

    def forward(
        self, denoiser: nn.Module, x_t: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One transformer call as the pipeline makes it: latents and text in the compute dtype, `timestep =
        1000·σ` in float32, one per clip (or one per latent token for a TI2V folder)."""
        compute_dtype = denoiser_dtype(denoiser)
        input_dtype = torch.float32 if torch.is_autocast_enabled(x_t.device.type) else compute_dtype
        timestep = sigmas.to(device=x_t.device, dtype=torch.float32) * 1000.0
        if self.geometry.ti2v:
            frames, height, width = x_t.shape[2:]
            patch = self.geometry.patch
            timestep = timestep[:, None].expand(-1, frames * (height // patch) * (width // patch))
        return denoiser(
            hidden_states=x_t.to(input_dtype),
            timestep=timestep,
            encoder_hidden_states=text["t5_embeds"].to(input_dtype),
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ sampling
    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        return {
            "prompt_embeds": positive["t5_embeds"].unsqueeze(0),
            "negative_prompt_embeds": negative["t5_embeds"].unsqueeze(0),
        }

    def clip_kwargs(self, frames: int, fps: float, image: Any | None) -> dict[str, Any]:
        """The clip length; the pipeline has no frame-rate input (fps only sets the written clip's rate)."""
        return {"num_frames": frames}

    def text_call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": TEXT_LENGTH}

    def pipeline_latents(self, latents: torch.Tensor, width: int, height: int, frames: int = 1) -> torch.Tensor:
        """The pipeline's latent output is already (B, C, f, h, w) in model space (before denormalising)."""
        return latents

    def output_frames(self, output: Any) -> list[Any]:
        """The first clip as PIL frames. `WanPipeline` returns float arrays by default (`output_type="np"`);
        they are converted as its own `output_type="pil"` would (× 255, rounded)."""
        from diffusers.image_processor import VaeImageProcessor

        frames = output.frames[0]
        if isinstance(frames, list):
            return list(frames)
        if isinstance(frames, torch.Tensor):
            frames = frames.permute(0, 2, 3, 1).float().cpu().numpy()  # output_type="pt": (F, C, H, W)
        return VaeImageProcessor.numpy_to_pil(frames)

    def default_size(self, pipeline: Any) -> tuple[int, int]:
        """832×480 (Wan 2.1's 480p, the pipeline's default) or 1280×704 for a TI2V-5B folder."""
        return self.geometry.size
