"""The configuration schema: every option, its type, default and documentation.

This module is the single source of truth: TOML loading, `--set` overrides, `dittune config show`,
the README's config reference and validation all come from these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

PathValue = Annotated[Path, Strict(False)]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
"""Suffixes of single-file denoiser checkpoints that `model.path` may name."""
"""A path given as a TOML string (strict mode otherwise rejects str for Path)."""

MEGAPIXEL = 1024 * 1024
"""`resolution_type = "area"` counts megapixels of 1024² pixels, so 1.0 means 1024×1024."""


class Section(BaseModel):
    """Base for every section: strict types, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelSection(Section):
    family: str = Field(description='Model family, e.g. "hunyuan-dit".')
    path: PathValue = Field(
        description=(
            "Local model folder in diffusers layout (model_index.json inside), or a single-file checkpoint of the "
            "denoiser (.safetensors, or an official .pt/.pth/.ckpt read with weights_only=True) in diffusers or "
            "the family's original layout (converted on load, see docs/formats.md); the other components then "
            "come from model.components."
        )
    )
    components: PathValue | None = Field(
        None,
        description=(
            "With a single-file model.path: the diffusers folder holding the other components (text encoders, "
            "VAE, scheduler) and the denoiser's config.json. Default: the folder the file is in, when that is a "
            "diffusers folder."
        ),
    )
    weight_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Storage dtype of frozen weights (text encoders, VAE, and the base denoiser for LoRA). "
            '"auto": follows train.mixed_precision (fp32 when it resolves to fp32, else its dtype). '
            "Trainable parameters are always kept in fp32."
        ),
    )
    base_storage: Literal["default", "fp8_e4m3", "fp8_e5m2", "nf4", "int8"] = Field(
        "default",
        description=(
            "LoRA runs only: how the frozen denoiser's Linear layers are stored (norms, embeddings and the output "
            'projection stay in weight_dtype). "default": in weight_dtype. "fp8_e4m3" / "fp8_e5m2": 1 byte per '
            'weight, upcast per layer to weight_dtype for the forward and backward passes. "nf4" / "int8": '
            'quantised with bitsandbytes (pip install "dittune[bnb]"; CUDA or CPU). The compute dtype stays '
            "weight_dtype under train.mixed_precision; LoRA weights stay fp32 and LoRA files are unchanged."
        ),
    )
    t5_max_length: int | None = Field(
        None,
        description=(
            "Tokens the T5 encoder keeps (captions are padded/truncated to it). Default: the family's "
            "(SD3: 256, up to 512; PixArt-Sigma: 300; Flux.1: 512). Hunyuan-DiT's is fixed at 256."
        ),
        ge=1,
    )
    expert: str | None = Field(
        None,
        description=(
            "For models with several denoiser experts, the one this run trains (required there), e.g. Wan 2.2 "
            'A14B: "high_noise" trains `transformer` (the steps above the boundary), "low_noise" trains '
            "`transformer_2`. Training draws noise levels from the expert's side of the boundary only."
        ),
    )

    @property
    def checkpoint(self) -> Path | None:
        """The single-file denoiser checkpoint, when model.path names a file."""
        return self.path if self.path.suffix.lower() in CHECKPOINT_SUFFIXES else None

    @property
    def folder(self) -> Path:
        """The diffusers folder of the model's components (model.path itself, unless that is a single file)."""
        if self.checkpoint is None:
            return self.path
        return self.components if self.components is not None else self.path.parent

    @model_validator(mode="after")
    def _single_file(self) -> ModelSection:
        if self.components is not None and self.checkpoint is None:
            raise ValueError(
                f"model.components is only for a single-file model.path (.safetensors, .pt, .pth, .ckpt); "
                f"{self.path} is a folder: remove model.components"
            )
        return self


class DataSection(Section):
    path: PathValue = Field(
        description=(
            "Image folder (searched recursively) with same-stem .txt captions, "
            "or a folder holding metadata.jsonl / metadata.csv with `file_name` and `text` columns."
        )
    )
    resolution: float = Field(
        description=(
            'Training size. With resolution_type "pixel": the short edge in pixels (e.g. 512). '
            'With "area": megapixels of 1024² pixels (e.g. 0.5 ≈ 724×724, snapped to the family alignment).'
        ),
        gt=0,
    )
    resolution_type: Literal["pixel", "area"] = Field(
        description='"pixel" = short edge in pixels; "area" = megapixels (1.0 = 1024×1024).'
    )
    bucket_step: int = Field(
        64,
        description=(
            "Step in pixels between neighbouring aspect buckets; must be a multiple of the family "
            "alignment (16 for Hunyuan-DiT)."
        ),
        gt=0,
    )
    max_aspect_ratio: float = Field(
        2.0, description="Widest bucket (long edge ÷ short edge). Wider images are cropped to it.", ge=1.0
    )
    crop: Literal["center", "random"] = Field(
        "center",
        description=(
            '"random" draws one crop per image and seed (stable across runs, part of the cache key); '
            "crop coordinates are kept for size conditioning."
        ),
    )
    random_flip: bool = Field(
        False, description="Flip horizontally with probability 0.5 per sample and epoch (both variants cached)."
    )
    crop_seed: int = Field(0, description="Seed for random crops (changing it re-encodes the latents).")
    caption_extension: str = Field(".txt", description="Caption file extension for folder datasets.")
    missing_caption: Literal["skip", "empty", "error"] = Field(
        "skip",
        description="What to do with an image without caption: skip it (listed), train it unconditioned, or stop.",
    )
    incomplete_batches: Literal["keep", "drop"] = Field(
        "keep",
        description=(
            "Buckets whose image count is not a multiple of the batch size: keep the smaller last batch, "
            "or drop the remainder (listed in the bucket report)."
        ),
    )
    repeats: int = Field(1, description="Times each image appears per epoch.", ge=1)
    frames: int | None = Field(
        None,
        description=(
            "Frames per training clip (video families), snapped down to the family's rule (4k+1 for HunyuanVideo "
            "and CogVideoX 1.0, 8k+1 for CogVideoX 1.5 and LTX-Video); the bucket report says what was snapped. "
            "Default: the family's clip length (49 for most, 81 for Wan 2.1); image families train on single frames."
        ),
        ge=1,
    )
    fps: float | None = Field(
        None,
        description="Resample clips to this frame rate before choosing frames; unset keeps each clip's own rate.",
        gt=0,
    )
    frame_sampling: Literal["start", "middle", "uniform"] = Field(
        "start",
        description=(
            'Which frames a clip uses: "start" (from the first frame), "middle" (centred), or "uniform" '
            "(spread evenly over the whole clip, ignoring data.fps)."
        ),
    )
    short_clips: Literal["skip", "shorten"] = Field(
        "skip",
        description=(
            'Clips with fewer frames than data.frames: "skip" them (listed in the report with both counts) or '
            '"shorten": train them at the longest valid length they have (their own frame bucket).'
        ),
    )
    shuffle: bool = Field(True, description="Shuffle batches each epoch (deterministic given train.seed).")


class CacheSection(Section):
    dir: PathValue | None = Field(
        None,
        description=(
            "Cache folder for text embeddings and VAE latents. Default: OUTPUT_DIR/cache. Entries are keyed "
            "by everything that produced them, so a folder can be shared between runs safely."
        ),
    )
    source_fingerprint: Literal["content", "stat"] = Field(
        "content",
        description=(
            '"content": SHA-256 of each image file (memoised per path, size and mtime, so an edit is seen unless '
            "it keeps the size and the modification time was deliberately restored). "
            '"stat": path + size + modification time (faster on huge datasets; a same-size edit '
            "that keeps the mtime is not seen)."
        ),
    )
    latent_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Stored dtype of VAE moments.")
    text_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Stored dtype of text embeddings.")
    vae_batch_size: int = Field(
        4,
        description=(
            "Images loaded ahead of the VAE. Each is encoded alone, so an entry's bytes never depend on the others "
            "(batched encoding differs in the last bits)."
        ),
        ge=1,
    )
    text_batch_size: int = Field(
        16, description="No effect any more: prompts are encoded one at a time, for the same reason.", ge=1
    )
    vae_tiling: bool = Field(
        False,
        description=(
            "Encode (and decode validation clips) with the VAE's tiling and slicing where it has them: less memory "
            "for large clips, slightly different latents (part of the cache key)."
        ),
    )
    latent_sampling: Literal["sample", "mode"] = Field(
        "sample",
        description=(
            'The VAE posterior is cached as mean and log-variance; "sample" draws a fresh latent each '
            'step (as the official trainer), "mode" uses the mean.'
        ),
    )


class ControlNetSection(Section):
    layers: int | None = Field(
        None,
        description=(
            'train.method = "controlnet": transformer blocks of the ControlNet, copied from the first blocks of the '
            "denoiser. Default: the family's (Hunyuan-DiT: num_layers // 2 - 1 as the official ControlNets; SD3: "
            "half the denoiser's blocks)."
        ),
        ge=1,
    )
    conditioning_scale: float = Field(
        1.0, description="Strength of the ControlNet's residuals when validating (training uses 1).", ge=0
    )


class LoraSection(Section):
    rank: int = Field(16, description="LoRA rank r.", ge=1)
    alpha: float | None = Field(None, description="LoRA alpha; scale = alpha / rank. Default: alpha = rank.")
    dropout: float = Field(0.0, description="Dropout on the LoRA branch.", ge=0.0, lt=1.0)
    targets: list[str] | None = Field(
        None,
        description=(
            "Module name suffixes to adapt (peft target_modules). Default: the family's attention "
            "projections (Hunyuan-DiT: to_q, to_k, to_v, to_out.0 in every block)."
        ),
    )


class LossSection(Section):
    vlb: bool | None = Field(
        None,
        description=(
            "Add the variational-bound term on learned-variance channels (families with learned sigma). "
            "Default: on for full fine-tuning, off for LoRA."
        ),
    )
    noise_offset: float = Field(0.0, description="Offset noise strength (0 disables).", ge=0.0)
    min_snr_gamma: float | None = Field(
        None, description="Min-SNR-γ loss weighting (DDPM families; prediction-type aware); unset disables.", gt=0
    )
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "shift"] | None = Field(
        None,
        description=(
            'How flow-matching families (SD3, Flux) draw the noise level σ per sample: "uniform"; '
            '"logit_normal" (σ = sigmoid(N(logit_mean, logit_std))); "mode" (SD3 paper, mode_scale); '
            '"shift" (uniform, then shifted by flow_shift like the inference schedule). '
            'Default: the family\'s ("logit_normal" for SD3, "shift" for Flux).'
        ),
    )
    logit_mean: float = Field(0.0, description='Mean of the normal behind "logit_normal" sampling.')
    logit_std: float = Field(1.0, description='Standard deviation behind "logit_normal" sampling.', gt=0)
    mode_scale: float = Field(1.29, description='Scale of "mode" sampling (0 = uniform).')
    flow_shift: float | None = Field(
        None,
        description=(
            'Shift s applied to drawn σ (s·σ / (1 + (s − 1)·σ)). Default: none, except for "shift" '
            "sampling, which uses the family's (SD3: the scheduler's shift; Flux: from the image size)."
        ),
        gt=0,
    )
    guidance: float = Field(
        1.0,
        description=(
            "Value given to a guidance-distilled model's guidance embedding while training (Flux.1-dev); "
            "1.0 as most Flux trainers use."
        ),
        ge=0,
    )
    first_frame_p: float = Field(
        0.1,
        description=(
            "LTX-Video: probability per sample of first-frame conditioning while training (that frame kept clean "
            "and left out of the loss), so the LoRA also works image-to-video."
        ),
        ge=0,
        le=1,
    )
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none", description='Per-σ loss weight of flow-matching families: "none", "sigma_sqrt" (σ⁻²) or "cosmap".'
    )


class TrainSection(Section):
    method: Literal["lora", "full", "controlnet"] = Field(
        "lora",
        description=(
            '"lora" (peft adapter), "full" fine-tuning, or "controlnet": a ControlNet initialised from the denoiser '
            "(families with one: Hunyuan-DiT, SD3), the denoiser frozen; conditioning images come from same-stem "
            "`*_control.*` files or a `control` metadata column (see [controlnet])."
        ),
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description=(
            '"random" initialises the denoiser from its config instead of its weights (full training from '
            'scratch; only with method = "full").'
        ),
    )
    max_steps: int = Field(description="Optimizer steps to train for.", ge=1)
    batch_size: int = Field(1, description="Images per micro-batch (all from one bucket).", ge=1)
    gradient_accumulation_steps: int = Field(
        1, description="Micro-batches per optimizer step; steps always count optimizer steps.", ge=1
    )
    seed: int = Field(0, description="Seed for data order, noise, timesteps and caption dropout.")
    learning_rate: float = Field(1e-4, description="Peak learning rate.", gt=0)
    lr_scheduler: Literal[
        "constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"
    ] = Field("constant", description="Learning-rate schedule after warmup (diffusers get_scheduler names).")
    lr_warmup_steps: int = Field(0, description="Linear warmup steps.", ge=0)
    optimizer: Literal["adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy", "schedulefree_adamw"] = Field(
        "adamw",
        description=(
            '"adamw" (torch, fused); "adamw8bit" / "lion8bit" (bitsandbytes; 8-bit states for tensors ≥ 4096 '
            'elements); "adafactor" (torch; factored second moment, no momentum; learning_rate caps its relative '
            'step, try 1e-3–1e-2); "prodigy" (prodigyopt; estimates the step size, keep learning_rate = 1.0); '
            '"schedulefree_adamw" (schedulefree; averages the weights itself: use lr_scheduler = "constant"; '
            "checkpoints, validation and the export hold the averaged weights)."
        ),
    )
    optimizer_args: dict[str, bool | int | float | str | list[float]] = Field(
        default_factory=dict,
        description=(
            "Extra keyword arguments of the optimizer's constructor, e.g. {d_coef = 0.5, safeguard_warmup = true} "
            "for prodigy, {warmup_steps = 100} for schedulefree_adamw, {betas = [0.95, 0.98]} for lion8bit; lists "
            "are passed as tuples. The learning rate, betas, ε and weight decay have their own keys."
        ),
    )
    optimizer_offload: bool = Field(
        False,
        description=(
            "Keep the optimizer state and an fp32 copy of the trainable weights on the CPU: gradients are copied "
            "there, the step is computed by the CPU and the new weights copied back. Frees the state's device "
            "memory (8 bytes per trainable parameter for adamw) for two copies per step and a CPU-speed step."
        ),
    )
    adam_beta1: float = Field(
        0.9, ge=0, lt=1, description="β1 of adamw, adamw8bit, prodigy and schedulefree_adamw (its interpolation)."
    )
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="β2 of adamw, adamw8bit, prodigy and schedulefree_adamw.")
    adam_epsilon: float = Field(1e-8, gt=0, description="ε of adamw, adamw8bit, prodigy and schedulefree_adamw.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (every optimizer).")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm; unset disables.", gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description=(
            'Autocast precision through accelerate. "auto": bf16 on CUDA GPUs that support it (fp16 on older '
            "ones); on a CPU bf16 only where it computes bf16 natively (AMX or AVX512-BF16), else fp32 "
            '("no"). The start-up summary says what was chosen and why. fp16 needs a GPU.'
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "Regional torch.compile of the denoiser's transformer blocks (training steps only; validation runs "
            "eagerly). The first step compiles (minutes on a small CPU, which needs a C++ compiler). Measured on "
            "CPU: a step is 4–20 % faster and the compile pays back after ~600–1,600 steps (a few dozen with a "
            "warm inductor cache); see benchmarks/README.md. Not measured on GPUs yet."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute transformer blocks in backward instead of keeping their activations: less memory, "
            "slower steps. All blocks, or a fraction with gradient_checkpointing_ratio."
        ),
    )
    gradient_checkpointing_ratio: float = Field(
        1.0,
        description=(
            "With gradient_checkpointing: the fraction of transformer blocks recomputed in backward, the first "
            "ceil(ratio × blocks) in call order (at least one); 1.0: all (diffusers' own switch where the model "
            "has one). Memory saved and step time paid both grow about linearly with it. Measured on CPU (LoRA, "
            "8-block image and video models): peak activation memory 0.56–0.58 of no checkpointing at 0.5 and "
            "0.22–0.32 at 1.0, for steps 1.15–1.33× and 1.34–1.61× as long; see benchmarks/README.md. A value "
            "below 1 without gradient_checkpointing = true is an error."
        ),
        gt=0,
        le=1,
    )
    blocks_to_swap: int = Field(
        0,
        description=(
            "LoRA runs only: keep the frozen weights of this many transformer blocks (the first in call order) on "
            "the CPU and copy each to the GPU just before it runs, the next one prefetched meanwhile (on a side "
            "CUDA stream). Frees the device memory of all but two of them, for one host-to-device copy of each "
            "per forward and per backward; swapped blocks are always recomputed in backward. For a model too big "
            "for the card. 0: off; at most the model's number of blocks (checked when it loads)."
        ),
        ge=0,
    )
    caption_dropout: float = Field(
        0.0,
        description="Probability, per sample and text encoder independently, of training on the empty caption.",
        ge=0,
        le=1,
    )
    caption_dropout_per_encoder: dict[str, float] = Field(
        default_factory=dict,
        description="Per-encoder override of caption_dropout, e.g. {clip = 0.1, t5 = 0.1} for Hunyuan-DiT.",
    )
    log_every_steps: int = Field(1, description="Write metrics every N optimizer steps.", ge=1)
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description=(
            "What a NaN or infinite loss or gradient norm does. "
            '"stop": the run stops with exit status 1 at the next logged step, checkpoint or export (these also '
            "check the trainable weights), naming the first bad step and the last good checkpoint; nothing is "
            "written from a bad step on, and steps read nothing more back from the device. "
            '"skip": such a step changes nothing (weights, optimizer state, learning-rate schedule; counted as '
            "`nonfinite_skips` in metrics.jsonl) and the run stops after max_nonfinite_skips in a row; this reads "
            "one flag back from the device every step (not with DeepSpeed, which steps inside backward). With fp16 "
            "only the loss counts: the loss scaler skips steps with overflowing gradients itself."
        ),
    )
    max_nonfinite_skips: int = Field(
        5, description='on_nonfinite = "skip": stop after this many non-finite steps in a row.', ge=1
    )
    trackers: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers besides metrics.jsonl."
    )


class CheckpointSection(Section):
    every_steps: int = Field(500, description="Save a resumable checkpoint every N steps (and at the end).", ge=1)
    keep_last: int = Field(3, description="Keep only the newest K checkpoints.", ge=1)
    trust_deepspeed_pickles: bool = Field(
        False,
        description=(
            "Resume from a checkpoint written under DeepSpeed, whose engine stores its state with torch.save: "
            "loading it unpickles, which can run code. Every other checkpoint is safetensors + JSON and never "
            "needs this. Set it only for checkpoints you made yourself or otherwise trust."
        ),
    )


class ValidationSection(Section):
    every_steps: int = Field(0, description="Sample validation images every N steps (0: only at the end).", ge=0)
    prompts: list[str] = Field(default_factory=list, description="Validation prompts (none: no validation).")
    negative_prompt: str = Field("", description="Negative prompt for classifier-free guidance.")
    seed: int = Field(0, description="Seed of the CPU generator; prompt i uses seed + i.")
    width: int | None = Field(None, description="Image width; default: the square bucket of data.resolution.", gt=0)
    height: int | None = Field(None, description="Image height; default: the square bucket of data.resolution.", gt=0)
    frames: int | None = Field(
        None,
        description=(
            "Frames per validation clip (video families; snapped down to the family's rule). Default: data.frames."
        ),
        ge=1,
    )
    fps: float | None = Field(
        None,
        description=(
            "Frame rate of written clips (and LTX-Video's rate conditioning). Default: data.fps, else the median "
            "rate of the training clips, else the family's."
        ),
        gt=0,
    )
    images: list[PathValue] = Field(
        default_factory=list,
        description=(
            "Image-to-video: one conditioning image per prompt (same order as prompts). Required by I2V models; "
            "LTX-Video then samples with LTXImageToVideoPipeline."
        ),
    )
    control_images: list[PathValue] = Field(
        default_factory=list,
        description='train.method = "controlnet": one control image per prompt (same order), required there.',
    )
    steps: int = Field(20, description="Denoising steps.", ge=1)
    guidance: float = Field(5.0, description="Classifier-free guidance scale (≤ 1 disables).", ge=0)
    at_start: bool = Field(True, description="Also sample before training (step 0), for comparison.")
    timeout_minutes: float = Field(
        120.0,
        description=(
            "Several processes: how long the others wait for the main process to validate (only it samples). "
            "Their training collectives keep torch's own timeout."
        ),
        gt=0,
    )


class DittuneConfig(Section):
    """A dittune run."""

    output_dir: PathValue = Field(description="Where checkpoints, metrics, validation images and final weights go.")
    model: ModelSection
    data: DataSection
    train: TrainSection
    lora: LoraSection = Field(default_factory=LoraSection)
    controlnet: ControlNetSection = Field(default_factory=ControlNetSection)
    loss: LossSection = Field(default_factory=LossSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)

    @model_validator(mode="after")
    def _cross_field_checks(self) -> DittuneConfig:
        data = self.data
        if data.resolution_type == "area" and data.resolution > 16:
            raise ValueError(
                f'data.resolution: {data.resolution:g} with resolution_type = "area" would be '
                f"{data.resolution:g} megapixels; area takes megapixels (e.g. 0.5 or 1.0). "
                'For a short edge in pixels use resolution_type = "pixel".'
            )
        if data.resolution_type == "pixel" and (data.resolution < 8 or data.resolution != int(data.resolution)):
            raise ValueError(
                f'data.resolution: {data.resolution:g} with resolution_type = "pixel" is not a pixel '
                "size; pixel takes the short edge in whole pixels (e.g. 512). For megapixels use "
                'resolution_type = "area".'
            )
        if self.train.gradient_checkpointing_ratio < 1 and not self.train.gradient_checkpointing:
            raise ValueError(
                f"train.gradient_checkpointing_ratio: {self.train.gradient_checkpointing_ratio:g} only applies with "
                "train.gradient_checkpointing = true; set that too, or remove the ratio."
            )
        if self.train.init == "random" and self.train.method != "full":
            raise ValueError('train.init: "random" needs train.method = "full" (a LoRA on random weights is useless).')
        if self.train.method == "controlnet" and len(self.validation.control_images) != len(self.validation.prompts):
            raise ValueError(
                f"validation.control_images: {len(self.validation.control_images)} image(s) for "
                f"{len(self.validation.prompts)} prompt(s); a ControlNet validates with one control image per prompt."
            )
        if self.validation.control_images and self.train.method != "controlnet":
            raise ValueError('validation.control_images: only for train.method = "controlnet"; remove the key.')
        if self.validation.images and len(self.validation.images) != len(self.validation.prompts):
            raise ValueError(
                f"validation.images: {len(self.validation.images)} image(s) for {len(self.validation.prompts)} "
                "prompt(s); give one conditioning image per prompt."
            )
        for name, p in self.train.caption_dropout_per_encoder.items():
            if not 0 <= p <= 1:
                raise ValueError(f"train.caption_dropout_per_encoder.{name}: {p} is not a probability in [0, 1].")
        return self

    @property
    def cache_dir(self) -> Path:
        return self.cache.dir if self.cache.dir is not None else self.output_dir / "cache"
