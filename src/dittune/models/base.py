"""The model seam: one `ModelSpec` subclass per family owns everything family-specific.

The trainer, data, cache, validation and export layers only talk to this interface. They never
import a family module and never branch on a family name. See docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dittune.fingerprint import Fingerprinter
from dittune.models.draws import Draws
from dittune.models.facts import FamilyFacts, ModelInfo, TextEncoderSlot
from dittune.models.weight_files import check_weight_files

__all__ = ["FamilyFacts", "ModelInfo", "ModelSpec", "TextEncoderSlot"]  # ModelInfo, TextEncoderSlot: from facts

TextEmbedding = dict[str, torch.Tensor]
"""One prompt's encoder outputs, unbatched (e.g. ``{"prompt_embeds": (77, 1024), ...}``)."""

Moments = dict[str, torch.Tensor]
"""One sample's cached VAE output, unbatched (e.g. ``{"mean": (4, h, w), "logvar": (4, h, w)}`` for an image
family, ``(C, f, h, w)`` for a clip)."""


@dataclass
class SampleMeta:
    """Geometry of one training sample, in pixels (all sizes are (width, height)); `frames` and `fps` of the
    clip (1 and None for a still)."""

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop_left_top: tuple[int, int]
    flipped: bool = False
    frames: int = 1
    fps: float | None = None


@dataclass
class TrainBatch:
    """A collated batch handed to `ModelSpec.compute_loss`; tensors are already on the device."""

    moments: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    meta: list[SampleMeta]
    control: dict[str, torch.Tensor] | None = None
    """ControlNet training: the cached moments of each sample's control image (same layout as `moments`)."""

    @property
    def size(self) -> int:
        return len(self.meta)


@dataclass
class LossOutput:
    """The scalar loss to backpropagate and the terms to log.

    `logs` values are detached 0-d tensors (or plain numbers): the trainer reads them back from the
    device only at a logging step.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class LossSettings:
    """Family-independent loss options resolved from the config."""

    vlb: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    sample_latents: bool = True
    """Draw latents from the cached posterior (True) or use its mean."""
    timestep_sampling: str = "uniform"
    """Flow-matching σ sampling: uniform, logit_normal, mode or shift (see models/flow_objective.py)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | None = None
    """Explicit shift of drawn σ; None: the family's default for "shift" sampling, else no shift."""
    weighting: str = "none"
    guidance: float = 1.0
    """Guidance-embedding input of guidance-distilled models during training."""
    first_frame_p: float = 0.0
    """Probability per sample of first-frame conditioning (families that train image-to-video this way)."""


def denoiser_dtype(denoiser: nn.Module) -> torch.dtype:
    """The dtype a denoiser computes in: diffusers' `dtype` (which reports the compute dtype of layers stored in
    fp8), through a DDP wrapper; else its first floating parameter's."""
    model = getattr(denoiser, "module", denoiser)
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


class ModelSpec(FamilyFacts, ABC):
    """Everything one model family needs: loading, encoding, objective, sampling and export.

    A spec instance is bound to one model folder. Construction is cheap (no weights are read; the headers of
    its weight files are checked, so a truncated file is named at once);
    `inspect` reads configs and weight headers only. The class-level declarations (names, alignment,
    text encoders, LoRA targets, loss options, `check_folder`) live in the family's torch-free facts
    class (`dittune.models.facts.FamilyFacts`).
    """

    def __init__(
        self,
        path: str | Path,
        t5_max_length: int | None = None,
        expert: str | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        # A single-file denoiser checkpoint (`model.path` naming a file): its weights replace the folder's denoiser.
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        # A truncated or damaged weight file is named here, before any loader fails on it without its path (files
        # cut exactly at their header pass: their shapes serve `dittune estimate`; `load_pipeline` refuses them).
        check_weight_files(self.path, self.checkpoint, header_only_ok=True)
        # A model with several denoiser experts (`experts_at`) trains the one named by `expert` (`model.expert`).
        problem = self.expert_problem(self.path, expert)
        if problem:
            raise ValueError(problem)
        self.expert = expert
        if expert is not None:
            self.denoiser_component = self.experts_at(self.path)[expert]
        # What depends on the folder (e.g. a temporal patch or another VAE), read from its configs once: on a spec
        # instance these hold the model's values, on the class the family's defaults.
        self.alignment = self.alignment_at(self.path)
        self.fixed_size = self.fixed_size_at(self.path)
        self.default_frames = self.default_frames_at(self.path)
        self.default_fps = self.default_fps_at(self.path)
        if t5_max_length is not None and self.t5_lengths is None:
            raise ValueError(f"{self.display_name} has a fixed text length; model.t5_max_length cannot change it")
        self.t5_max_length = t5_max_length or (self.t5_lengths[0] if self.t5_lengths else None)

    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        """The denoiser's config.json."""
        from dittune.models.folder import read_json

        return read_json(self.path / self.denoiser_component / "config.json")

    @cached_property
    def vae_config(self) -> dict[str, Any]:
        """MODEL/vae/config.json."""
        from dittune.models.folder import read_json

        return read_json(self.path / "vae" / "config.json")

    @cached_property
    def scheduler_config(self) -> dict[str, Any]:
        """MODEL/scheduler/scheduler_config.json."""
        from dittune.models.folder import read_json

        return read_json(self.path / "scheduler" / "scheduler_config.json")

    # ----------------------------------------------------------------- inspection
    @abstractmethod
    def inspect(self) -> ModelInfo:
        """Detect version and settings from configs and weight headers; warn about mismatches."""

    @abstractmethod
    def default_loss_settings(self, method: str) -> LossSettings:
        """Family defaults for the objective given the training method (`lora` or `full`)."""

    # ------------------------------------------------------------------ text side
    @abstractmethod
    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> Any:
        """Load tokenizers and text encoders (frozen, eval mode)."""

    @abstractmethod
    def encode_prompts(self, encoders: Any, prompts: list[str]) -> list[TextEmbedding]:
        """Encode prompts; one unbatched CPU dict per prompt."""

    @abstractmethod
    def text_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        """Everything about the text side that changes embeddings (for cache keys)."""

    # ---------------------------------------------------------------- image side
    def load_vae(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """The frozen `vae_class` from MODEL/vae, in eval mode on `device`."""
        import diffusers

        vae = getattr(diffusers, self.vae_class).from_pretrained(self.path / "vae", torch_dtype=dtype)
        return vae.to(device).eval().requires_grad_(False)

    def encode_pixels(self, vae: nn.Module, pixels: torch.Tensor) -> list[Moments]:
        """Encode a batch of samples in [-1, 1], shape (B, 3, F, H, W) (F = 1 for stills); one CPU dict each.

        Default (video VAEs): the posterior's mean and log-variance of each clip, (C, f, h, w) each, after checking
        the clip length against the model's frame rule."""
        from dittune.models.autoencoder import posterior_moments, split_moments

        rule = self.frame_rule_at(self.path)
        if pixels.ndim != 5 or not rule.valid(pixels.shape[2]):
            raise ValueError(
                f"{self.display_name} encodes (B, 3, F, H, W) clips with F = {rule} frames, got {tuple(pixels.shape)}"
            )
        return split_moments(*posterior_moments(vae, pixels))

    def configure_vae(self, vae: nn.Module, tiling: bool) -> None:
        """Turn on the VAE's tiling and slicing (`cache.vae_tiling`) where it has them."""
        if tiling:
            for switch in ("enable_tiling", "enable_slicing"):
                if hasattr(vae, switch):
                    getattr(vae, switch)()

    @abstractmethod
    def vae_identity(self, fingerprinter: Fingerprinter) -> dict[str, Any]:
        """Everything about the VAE that changes latents (for cache keys)."""

    @abstractmethod
    def latents_from_moments(
        self, moments: dict[str, torch.Tensor], draws: Draws | torch.Generator, sample: bool
    ) -> torch.Tensor:
        """Batched cached moments → the denoiser's clean latents x0 (a posterior draw or its mean), float32."""

    def pipeline_latents(self, latents: torch.Tensor, width: int, height: int, frames: int = 1) -> torch.Tensor:
        """The stock pipeline's `output_type="latent"` result in the layout `latents_from_moments` returns."""
        return latents

    # ------------------------------------------------------------------ denoiser
    def load_denoiser(self, dtype: torch.dtype, random_init: bool = False) -> nn.Module:
        """The trainable model (`denoiser_class` from the denoiser folder); `random_init` builds it
        from its config alone."""
        import diffusers

        cls = getattr(diffusers, self.denoiser_class)
        folder = self.path / self.denoiser_component
        if random_init:
            return cls.from_config(cls.load_config(folder)).to(dtype)
        if self.checkpoint is not None:
            from accelerate import init_empty_weights

            from dittune.models.single_file import cast_like_from_pretrained, load_checkpoint_into

            with init_empty_weights(include_buffers=False):
                model = cls.from_config(cls.load_config(folder))
            load_checkpoint_into(model, self.checkpoint, self.original_layout())
            return cast_like_from_pretrained(model, dtype)
        return cls.from_pretrained(folder, torch_dtype=dtype)

    def denoiser_weight_names(self) -> set[str] | None:
        """The denoiser's tensor names from weight headers (the single-file checkpoint's, in diffusers names, when
        there is one), for version detection; None when the weights are not safetensors."""
        from dittune.models.folder import weight_keys

        if self.checkpoint is None:
            return weight_keys(self.path / self.denoiser_component)
        from dittune.models.single_file import checkpoint_names, diffusers_names

        expected = weight_keys(self.path / self.denoiser_component)
        if expected is None:  # a components folder with the denoiser's config.json only: its names from the class
            import diffusers
            from accelerate import init_empty_weights

            cls = getattr(diffusers, self.denoiser_class)
            with init_empty_weights():
                expected = set(cls.from_config(cls.load_config(self.path / self.denoiser_component)).state_dict())
        return set(diffusers_names(checkpoint_names(self.checkpoint), self.original_layout(), expected))

    def load_scheduler(self) -> Any:
        """The noise scheduler named in the folder's scheduler_config.json."""
        import diffusers

        from dittune.models.folder import read_json

        config = read_json(self.path / "scheduler" / "scheduler_config.json")
        return getattr(diffusers, config["_class_name"]).from_pretrained(self.path / "scheduler")

    storage_skip_patterns: ClassVar[tuple[str, ...]] = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
    """Regexes (`re.search` on module names) of denoiser layers `model.base_storage` keeps in `weight_dtype`, besides
    the diffusers class's own `_skip_layerwise_casting_patterns` (default: diffusers' DEFAULT_SKIP_MODULES_PATTERN)."""

    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    """Attributes of the denoiser holding its transformer blocks (`nn.ModuleList`s), in call order: the
    unit of regional compilation (`train.compile`) and of dittune's own block checkpointing."""

    def transformer_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The denoiser's transformer blocks, from every list in `block_lists`."""
        missing = [name for name in self.block_lists if not isinstance(getattr(denoiser, name, None), nn.ModuleList)]
        if missing:
            raise ValueError(f"{type(denoiser).__name__} has no block list {missing} (see {type(self).__name__})")
        return [block for name in self.block_lists for block in getattr(denoiser, name)]

    def enable_gradient_checkpointing(self, denoiser: nn.Module) -> None:
        """Per-block recomputation (diffusers' own switch where the model has one)."""
        denoiser.enable_gradient_checkpointing()

    def enable_partial_checkpointing(self, denoiser: nn.Module, ratio: float) -> int:
        """Recompute the first ceil(ratio · N) of `transformer_blocks` in backward; returns how many.

        All of them (ratio 1, or a fraction that rounds up to N): `enable_gradient_checkpointing`, exactly as
        before ratios existed. Fewer: dittune's `enable_block_checkpointing` on the first blocks in call order,
        whose recomputation then runs after the later blocks' saved activations are freed (the lowest peak of
        any choice of blocks, as measured in benchmarks/gradient_checkpointing.py)."""
        from dittune.models.checkpointing import checkpointed_count, enable_block_checkpointing

        blocks = self.transformer_blocks(denoiser)
        count = checkpointed_count(ratio, len(blocks))
        if count == len(blocks):
            self.enable_gradient_checkpointing(denoiser)
        else:
            enable_block_checkpointing(blocks[:count])
        return count

    @abstractmethod
    def compute_loss(
        self,
        denoiser: nn.Module,
        scheduler: Any,
        batch: TrainBatch,
        draws: Draws | torch.Generator,
        settings: LossSettings,
    ) -> LossOutput:
        """Sample latents from moments, noise them, run the denoiser and return the loss.

        Every random number (posterior draw, noise, noise level, …) comes from `draws`, per sample (see
        `dittune.models.draws`): the trainer's `SampleDraws` key them by (seed, step, position in the global
        batch), so a sample's numbers do not depend on how the batch is split between processes or micro-batches.
        A plain generator is accepted too (one draw for the whole batch)."""

    # ------------------------------------------------------------------ sampling
    pipeline_init_extras: ClassVar[dict[str, Any]] = {}
    """Extra constructor arguments for `build_pipeline` (e.g. a flag that silences a warning)."""

    def sampling_pipeline_class(self, conditioned: bool) -> str:
        """The stock pipeline that samples this model: `pipeline_class`, or an image-to-video one when
        `conditioned` (a family that samples I2V with another pipeline overrides this)."""
        if conditioned and not self.takes_image:
            raise ValueError(f"{self.display_name} ({self.path}) does not take a conditioning image")
        return self.pipeline_class

    @property
    def takes_image(self) -> bool:
        """Whether sampling accepts a conditioning image (`validation.images`, `sample --image`)."""
        return self.image_conditioning_at(self.path) != "none"

    @property
    def needs_image(self) -> bool:
        """Whether sampling requires a conditioning image (an image-to-video model)."""
        return self.image_conditioning_at(self.path) == "required"

    @property
    def frozen_experts(self) -> list[str]:
        """Pipeline components of the experts this run does not train (frozen in validation's pipeline)."""
        return [c for c in self.experts_at(self.path).values() if c != self.denoiser_component]

    def build_controlnet(self, denoiser: nn.Module, layers: int | None) -> tuple[nn.Module, list[nn.Parameter]]:
        """A `controlnet_class` initialised from the (frozen) denoiser as the family's official trainer does, and
        the parameters that train; `layers` (`controlnet.layers`) its blocks, None for the family's default."""
        raise ValueError(
            f'{self.display_name} has no ControlNet in dittune; train.method = "controlnet" needs a family '
            "with one (Hunyuan-DiT, SD3)"
        )

    def build_control_pipeline(self, denoiser: nn.Module, controlnet: nn.Module, vae: nn.Module, scheduler: Any) -> Any:
        """`controlnet_pipeline_class` around a live denoiser and ControlNet (validation of ControlNet runs)."""
        if self.controlnet_pipeline_class is None:
            raise ValueError(f"{self.display_name} has no ControlNet pipeline")
        return self.build_pipeline(
            denoiser, vae, scheduler, pipeline_class=self.controlnet_pipeline_class, extra={"controlnet": controlnet}
        )

    def build_pipeline(
        self,
        denoiser: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        conditioned: bool = False,
        *,
        pipeline_class: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        """The stock pipeline around a live denoiser; every other required component (text encoders,
        tokenizers, safety checker) is None, as validation feeds cached embeddings. The experts not trained
        (`frozen_experts`) are loaded frozen from the folder in the VAE's dtype, on the CPU (see
        `offloaded_parts`)."""
        import inspect

        import diffusers

        cls = getattr(diffusers, pipeline_class or self.sampling_pipeline_class(conditioned))
        experts = {name: self._frozen_expert(name, next(vae.parameters()).dtype) for name in self.frozen_experts}
        given = {
            self.denoiser_component: denoiser,
            "vae": vae,
            "scheduler": scheduler,
            **experts,
            **self.pipeline_init_extras,
            **(extra or {}),
        }
        params = inspect.signature(cls.__init__).parameters
        absent = {
            name: None
            for name, param in params.items()
            if name != "self" and name not in given and param.default is inspect.Parameter.empty
        }
        pipeline = cls(**absent, **given)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _frozen_expert(self, component: str, dtype: torch.dtype) -> nn.Module:
        import diffusers

        expert = getattr(diffusers, self.denoiser_class).from_pretrained(self.path / component, torch_dtype=dtype)
        return expert.eval().requires_grad_(False)

    def offloaded_parts(self, pipeline: Any) -> list[nn.Module]:
        """Frozen modules of a `build_pipeline` result, besides the VAE, that wait on the CPU between validations
        (the trainer moves them to the device for a validation and back): the frozen experts."""
        return [getattr(pipeline, name) for name in self.frozen_experts]

    def load_pipeline(self, dtype: torch.dtype, conditioned: bool = False) -> Any:
        """The complete stock pipeline from the model folder (used by `dittune sample`)."""
        import diffusers

        cls = getattr(diffusers, self.sampling_pipeline_class(conditioned))
        check_weight_files(self.path)
        pipeline = cls.from_pretrained(self.path, torch_dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @abstractmethod
    def embedding_kwargs(self, positive: TextEmbedding, negative: TextEmbedding) -> dict[str, Any]:
        """Pipeline arguments carrying one prompt's cached embeddings and the negative prompt's."""

    def size_kwargs(self, width: int, height: int) -> dict[str, Any]:
        """Pipeline arguments for the image size (families add their size conditioning)."""
        return {"width": width, "height": height}

    def clip_kwargs(self, frames: int, fps: float, image: Any | None) -> dict[str, Any]:
        """Pipeline arguments for the clip length, frame rate and conditioning image (none for images)."""
        return {}

    def text_call_kwargs(self) -> dict[str, Any]:
        """Extra arguments when the pipeline encodes the text itself (e.g. the T5 length)."""
        return {}

    def pipeline_kwargs(
        self,
        positive: TextEmbedding,
        negative: TextEmbedding,
        *,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        generator: torch.Generator,
        frames: int = 1,
        fps: float | None = None,
        image: Any | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments for the pipeline call from cached embeddings (validation)."""
        return {
            **self.embedding_kwargs(positive, negative),
            **self.size_kwargs(width, height),
            **self.clip_kwargs(frames, fps or self.default_fps, image),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": generator,
        }

    def prompt_kwargs(
        self,
        prompt: str,
        negative_prompt: str,
        *,
        width: int,
        height: int,
        frames: int = 1,
        fps: float | None = None,
        image: Any | None = None,
    ) -> dict[str, Any]:
        """Pipeline keyword arguments for a plain-text call (the pipeline encodes the prompt itself)."""
        return {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            **self.size_kwargs(width, height),
            **self.clip_kwargs(frames, fps or self.default_fps, image),
            **self.text_call_kwargs(),
        }

    def output_frames(self, output: Any) -> list[Any]:
        """The first sample of a pipeline call as a list of PIL frames (one for an image family)."""
        if hasattr(output, "frames"):
            return list(output.frames[0])
        return [output.images[0]]

    def describe_objective(self, settings: LossSettings) -> str:
        """One line for the start-up summary: the objective and the loss options in effect."""
        return (
            f"vlb {'on' if settings.vlb else 'off'}, noise offset {settings.noise_offset:g}, "
            f"min-SNR {settings.min_snr_gamma or 'off'}"
        )

    def default_size(self, pipeline: Any) -> tuple[int, int]:
        """(width, height) of `dittune sample` when not given: the denoiser's native size."""
        side = 8 * int(getattr(self.denoiser_from_pipeline(pipeline).config, "sample_size", 128))
        return side, side

    def denoiser_from_pipeline(self, pipeline: Any) -> nn.Module:
        return getattr(pipeline, self.denoiser_component)
