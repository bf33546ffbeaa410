"""`dittune estimate`: peak tensor memory of each phase of a run, per component, without loading any weight.

How: the run's own code runs with fake weights (`dittune.train.weightless`: every model is built from its config
as a `FakeTensor` model, nothing is read) on fake inputs (pixels, cache entries), under a meter of live tensor
bytes (`dittune.train.memory`). What the models compute is fake (sizes only, nothing computed); the code around
them (tokenizers, masks, noise, schedulers) runs for real where it needs values. The phases, as a run has them:

- caching: `ModelSpec.load_vae` + `encode_pixels` of one image or clip of the largest bucket, then
  `load_text_encoders` + `encode_prompts` of the longest prompt with the VAE still loaded, as `fill_caches` does
  (it encodes every item alone, so that an entry's bytes never depend on the others);
- training: the model as `build_run` makes it (`train.method`: LoRA, full, or a ControlNet beside the frozen
  denoiser; base storage, gradient checkpointing), the configured optimizer with its state already created, then
  one optimizer step as `Trainer.optimizer_step` takes it (`train.batch_size` samples of the largest bucket from
  cache entries in the cache's dtypes, with control latents of the same shape for a ControlNet; the method's
  loss under autocast, backward, a second micro-batch with `gradient_accumulation_steps` > 1, clipping, step,
  zero_grad);
- validation: the method's pipeline (the stock one, or the ControlNet pipeline with a control image) around the
  trained model, VAE and frozen experts, two denoising steps at the validation size (every step needs the same
  memory) and the VAE decode.

Parameter bytes are exact. The rest is the tensor bytes the traced code keeps alive, at its peak. The code runs
with CPU kernels whatever `device` is, so attention and convolution kernels that choose differently on a GPU,
fused-kernel workspaces, host↔device copies (no-ops on the CPU) and the allocator's rounding and caching are not
in it. The tests check the estimate against measured runs (see docs/scaling.md, "Estimating memory").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from dittune.cache.build import DTYPES
from dittune.config.schema import DittuneConfig
from dittune.models.base import ModelSpec, SampleMeta, TrainBatch
from dittune.models.draws import SampleDraws
from dittune.precision import Precision, choose_precision, device_precision
from dittune.train.memory import Stage, module_tensors, modules_in, storage_bytes, trace
from dittune.train.methods import TrainingMethod, method_for
from dittune.train.optim import optimizer_tensors

TEXT_ENCODERS, VAE, FROZEN, TRAINABLE = "text encoders", "VAE", "denoiser (frozen)", "denoiser (trainable)"
CONTROLNET_FROZEN, CONTROLNET = "ControlNet (frozen)", "ControlNet (trainable)"
"""A ControlNet run's ControlNet (all fp32): its frozen parts (Hunyuan-DiT's embedders) and what trains."""
OPTIMIZER, OPTIMIZER_HOST, EXPERTS = "optimizer state", "optimizer state (CPU)", "frozen experts"
VALIDATION_STEPS = 2
"""Denoising steps traced for validation: each needs the same memory; two show any growth between steps."""


class EstimateConfigError(ValueError):
    """The config cannot be estimated (problems found before anything loads)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {path}: {message}" if path else f"  {message}" for path, message in problems)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")


@dataclass
class Phase:
    """One phase of a run: its stages, or why it could not be traced."""

    name: str
    stages: list[Stage] = field(default_factory=list)
    problem: str | None = None

    @property
    def worst(self) -> Stage | None:
        """The stage with the highest peak."""
        return max(self.stages, key=lambda stage: stage.peak, default=None)

    @property
    def peak(self) -> int | None:
        return None if self.problem or self.worst is None else self.worst.peak


@dataclass
class Estimate:
    device: str
    precision: str
    weight_dtype: str
    phases: list[Phase]
    weights: dict[str, dict[str, int]]
    """Component → dtype → bytes of its parameters and buffers (exact)."""
    assumptions: list[str]
    not_modelled: list[str]
    seconds: float = 0.0

    def phase(self, name: str) -> Phase:
        return next(phase for phase in self.phases if phase.name == name)


@dataclass
class _Context:
    cfg: DittuneConfig
    spec: ModelSpec
    device: torch.device
    """Where the traced code runs: always the CPU (fake tensors allocate nothing)."""
    target: str
    """The device estimated for: "cuda" or "cpu"."""
    dtype: torch.dtype
    precision: Precision
    bucket: tuple[int, int, int]
    host_optimizer: bool
    not_modelled: list[str]
    method: TrainingMethod
    fake: Any = None
    """The `FakeTensorMode` of `weightless()`: entered for inputs and set-up, left for the traced stages."""
    objects: dict[str, Any] = field(default_factory=dict)


def estimate(cfg: DittuneConfig, device: str = "cuda") -> Estimate:
    """The memory estimate of `cfg` for a run on `device` ("cuda" or "cpu"); raises `EstimateConfigError` for a
    config that cannot run, before anything is loaded."""
    from dittune.train.preflight import preflight
    from dittune.train.prepare import plan_data
    from dittune.train.setup import load_spec, weight_dtype_name
    from dittune.train.weightless import weightless

    started = time.perf_counter()
    problems = preflight(cfg)
    if problems:
        raise EstimateConfigError(problems)
    spec, _ = load_spec(cfg)
    plan = plan_data(cfg, spec)
    if not plan.buckets:
        raise EstimateConfigError([("data.path", f"no training samples found in {cfg.data.path}")])
    precision, assumed_gpu = _precision(cfg, device)
    dtype_name = weight_dtype_name(cfg, precision)
    bucket = max(plan.buckets, key=lambda b: (b[0] * b[1] * b[2], b))
    ctx = _Context(
        cfg=cfg,
        spec=spec,
        device=torch.device("cpu"),
        target=device,
        dtype=DTYPES[dtype_name],
        precision=precision,
        bucket=(int(bucket[0]), int(bucket[1]), int(bucket[2])),
        host_optimizer=cfg.train.optimizer_offload and device != "cpu",
        not_modelled=_unmodelled_options(cfg),
        method=method_for(cfg),
    )
    width, height, frames = ctx.bucket
    clip = f", {frames} frames" if frames > 1 else ""
    assumptions = [
        f"compute {precision.name} ({precision.reason}), frozen weights {dtype_name}",
        f"largest bucket {width}×{height}{clip}; train.batch_size {cfg.train.batch_size}",
        *(["a GPU with bf16 (no CUDA here to ask)"] if assumed_gpu else []),
    ]
    # Every distinct prompt is encoded, as prepare_data does: captions, the empty prompt and validation's.
    prompts = [*(s.record.caption for s in plan.samples), "", *cfg.validation.prompts, cfg.validation.negative_prompt]
    captions = sorted(dict.fromkeys(prompts), key=len, reverse=True)
    scheduler = spec.load_scheduler()  # real (small tensors, no weights): its code needs values
    vae_batch = 1  # fill_caches encodes each image or clip alone
    with weightless() as (ctx.fake, assumed):
        phases = [
            _phase("caching", lambda: _caching(ctx, captions, vae_batch)),
            _phase("training", lambda: _training(ctx, scheduler)),
        ]
        if cfg.validation.prompts:
            phases.append(_phase("validation", lambda: _validation(ctx, plan)))
        sizes = {name: storage_bytes(tensors) for name, tensors in ctx.objects.get("weights", {}).items()}
    if assumed.seen:
        ctx.not_modelled.append(
            f"checks of computed values took the general branch ({', '.join(sorted(assumed.seen))})"
        )
    return Estimate(
        device=device,
        precision=precision.name,
        weight_dtype=dtype_name,
        phases=phases,
        weights={name: by_dtype for name, by_dtype in sizes.items() if by_dtype},
        assumptions=assumptions + ctx.objects.get("assumptions", []),
        not_modelled=ctx.not_modelled,
        seconds=time.perf_counter() - started,
    )


def _precision(cfg: DittuneConfig, device: str) -> tuple[Precision, bool]:
    """The run's precision on `device`; (…, True) when a GPU's bf16 support had to be assumed."""
    stored = cfg.model.weight_dtype if cfg.model.weight_dtype in ("bf16", "fp16") else None
    if device == "cuda" and not torch.cuda.is_available():
        assumed = cfg.train.mixed_precision == "auto" and stored is None
        return choose_precision(cfg.train.mixed_precision, "cuda", cuda_bf16=True, needs=stored), assumed
    return device_precision(cfg.train.mixed_precision, device, needs=stored), False


def _unmodelled_options(cfg: DittuneConfig) -> list[str]:
    notes = []
    if cfg.train.compile:
        notes.append("train.compile: traced eagerly (compiled blocks may keep fewer temporaries)")
    if cfg.model.base_storage in ("nf4", "int8") and cfg.train.method == "lora":
        notes.append(
            f"model.base_storage = {cfg.model.base_storage}: bitsandbytes layers cannot be traced; the frozen "
            "denoiser is counted in model.weight_dtype (an upper bound)"
        )
    if cfg.train.blocks_to_swap and cfg.train.method == "lora":
        notes.append(
            f"train.blocks_to_swap = {cfg.train.blocks_to_swap}: the swapped blocks' frozen weights are counted on the "
            "device and those blocks are not recomputed (an upper bound; a run keeps two of them on the device)"
        )
    if cfg.train.mixed_precision == "fp16":
        notes.append("fp16 loss scaling (a scaled copy of the loss only) is left out")
    return notes


def _phase(name: str, run: Callable[[], list[Stage]]) -> Phase:
    """A phase from its stages; a failure to trace becomes the phase's problem ("not modelled")."""
    try:
        return Phase(name, run())
    except Exception as error:  # any code path fake tensors cannot follow: report it, estimate the rest
        return Phase(name, problem=f"not modelled: {type(error).__name__}: {str(error).splitlines()[0][:200]}")


# ------------------------------------------------------------------------------------ caching
def _caching(ctx: _Context, captions: list[str], vae_batch: int) -> list[Stage]:
    spec, cfg = ctx.spec, ctx.cfg
    width, height, frames = ctx.bucket
    with ctx.fake:
        vae = spec.load_vae(ctx.device, ctx.dtype)
        spec.configure_vae(vae, tiling=cfg.cache.vae_tiling)
        pixels = torch.zeros(vae_batch, 3, frames, height, width)
    weights = ctx.objects.setdefault("weights", {})
    weights[VAE] = module_tensors([vae])
    ctx.objects["vae"] = vae
    controls = "; control images: a second pass alike" if cfg.train.method == "controlnet" else ""
    latents, moments = trace(
        "VAE encode",
        lambda: spec.encode_pixels(vae, pixels),
        {VAE: weights[VAE]},
        detail=f"{vae_batch} × {width}×{height}" + (f"×{frames}" if frames > 1 else "") + controls,
    )
    ctx.objects["moments"] = _stored(moments[0], cfg.cache.latent_dtype)
    with ctx.fake:
        encoders = spec.load_text_encoders(ctx.device, ctx.dtype)
    weights[TEXT_ENCODERS] = module_tensors(modules_in(encoders))
    prompts = captions[:1]  # each prompt alone: the longest is the peak
    text, embeddings = trace(
        "text encode",
        lambda: spec.encode_prompts(encoders, prompts),
        {VAE: weights[VAE], TEXT_ENCODERS: weights[TEXT_ENCODERS]},
        detail=f"{len(prompts)} prompt(s)",
    )
    ctx.objects["text"] = _stored(embeddings[0], cfg.cache.text_dtype)
    return [latents, text]


def _stored(entry: dict[str, torch.Tensor], dtype_name: str) -> dict[str, torch.Tensor]:
    """A cache entry as training loads it: floating tensors in the cache's dtype."""
    dtype = DTYPES[dtype_name]
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in entry.items()}


# ------------------------------------------------------------------------------------ training
def _denoiser(ctx: _Context) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The trained model and its trainable parameters, as `build_run` makes them (checkpointing acts on the
    method's trained core: the denoiser, or the ControlNet)."""
    from dittune.train.setup import load_trained_denoiser

    cfg, spec = ctx.cfg, ctx.spec
    denoiser, trainable = load_trained_denoiser(cfg, spec, ctx.dtype, ctx.device, quantise=False)
    if cfg.train.gradient_checkpointing:
        for module in ctx.method.checkpointed(denoiser):
            spec.enable_partial_checkpointing(module, cfg.train.gradient_checkpointing_ratio)
    denoiser.to(ctx.device).train()
    return denoiser, trainable


def _model_weights(model: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> dict[str, list[torch.Tensor]]:
    """The trained model's tensors by component: the denoiser's frozen and trainable ones, or for a ControlNet run
    (a model with `controlnet` and `denoiser` parts) the frozen denoiser and the ControlNet's frozen and trainable
    ones."""
    trainable_ids = {id(p) for p in trainable}
    controlnet = getattr(model, "controlnet", None)
    if controlnet is None:
        return {FROZEN: [t for t in module_tensors([model]) if id(t) not in trainable_ids], TRAINABLE: trainable}
    return {
        FROZEN: module_tensors([model.denoiser]),
        CONTROLNET_FROZEN: [t for t in module_tensors([controlnet]) if id(t) not in trainable_ids],
        CONTROLNET: trainable,
    }


class _Unwrapped:
    """Stands in for the accelerator: the traced model is not wrapped."""

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model


@dataclass
class _RunView:
    """What a `TrainingMethod.loss` reads of a `Run`, for the traced step."""

    spec: ModelSpec
    denoiser: torch.nn.Module
    scheduler: Any
    loss: Any
    accelerator: _Unwrapped = field(default_factory=_Unwrapped)


def _autocast(ctx: _Context) -> Any:
    enabled = ctx.precision.name != "fp32"
    return torch.autocast(ctx.device.type, dtype=DTYPES[ctx.precision.name], enabled=enabled)


def _optimizer(ctx: _Context, trainable: list[torch.nn.Parameter]) -> Any:
    """The configured optimizer, built on fake tensors; one whose constructor computes tables from values
    (bitsandbytes' quantisation maps) is built outside the fake mode, unless it keeps CPU copies of the weights
    (`optimizer_offload`), which would then be real."""
    from dittune.train.optim import build_optimizer

    try:
        with ctx.fake:
            return build_optimizer(trainable, ctx.cfg.train)
    except Exception:
        if ctx.cfg.train.optimizer_offload:
            raise
        return build_optimizer(trainable, ctx.cfg.train)


def _prime(optimizer: Any, trainable: list[torch.nn.Parameter]) -> None:
    """Create the optimizer's state as its first step does."""
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _training(ctx: _Context, scheduler: Any) -> list[Stage]:
    from dittune.train.optim import set_optimizer_mode
    from dittune.train.setup import loss_settings

    cfg, spec = ctx.cfg, ctx.spec
    if "moments" not in ctx.objects or "text" not in ctx.objects:
        raise RuntimeError("the caching phase was not traced, so the shapes of the cache entries are unknown")
    with ctx.fake:
        denoiser, trainable = _denoiser(ctx)
    parts = _model_weights(denoiser, trainable)
    ctx.objects.update(denoiser=denoiser, trainable=trainable, model_parts=list(parts))
    ctx.objects.setdefault("weights", {}).update(parts)
    try:
        optimizer = _optimizer(ctx, trainable)
    except Exception as error:
        raise RuntimeError(
            f"train.optimizer = {cfg.train.optimizer} cannot be built without weights ({error})"
        ) from error
    set_optimizer_mode(optimizer, training=True)
    try:
        _prime(optimizer, trainable)
        stepping = True
    except Exception as error:  # a kernel or a check that needs values: estimate without the step and its state
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        ctx.not_modelled.append(
            f"train.optimizer = {cfg.train.optimizer}: its step needs real values ({type(error).__name__}); "
            "the training and validation peaks leave out its state"
        )
        stepping = False
    ctx.objects["optimizer"] = optimizer
    width, height, frames = ctx.bucket
    size, accumulation = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
    moments, text = ctx.objects["moments"], ctx.objects["text"]
    view = _RunView(spec, denoiser, scheduler, loss_settings(cfg, spec))
    controlled = cfg.train.method == "controlnet"

    def collate() -> TrainBatch:
        meta = [SampleMeta((width, height), (width, height), (0, 0), frames=frames) for _ in range(size)]
        entries = (moments, text, moments) if controlled else (moments, text)  # control latents: a target's shape
        stacked = [{k: torch.stack([v] * size).to(ctx.device) for k, v in entry.items()} for entry in entries]
        return TrainBatch(moments=stacked[0], text=stacked[1], meta=meta, control=stacked[2] if controlled else None)

    def step() -> None:
        for micro in range(min(accumulation, 2)):
            batch = collate()
            draws = SampleDraws(cfg.train.seed, 1, range(micro * size, (micro + 1) * size), ctx.device)
            with _autocast(ctx):
                out = ctx.method.loss(view, batch, draws)  # type: ignore[arg-type]
            (out.loss / accumulation).backward()
            del batch, out
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
        torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        if stepping:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stage, _ = trace(
        "optimizer step",
        step,
        _training_resident(ctx),
        gradients_of=trainable,
        host=[OPTIMIZER_HOST],
        detail=f"{size} × {width}×{height}" + (f"×{frames}" if frames > 1 else ""),
    )
    return [stage]


def _training_resident(ctx: _Context) -> dict[str, list[torch.Tensor]]:
    """What stays loaded while training steps: the model (denoiser, and ControlNet), the optimizer state, and on
    a CPU the VAE kept for validation."""
    weights = ctx.objects["weights"]
    optimizer = ctx.objects.get("optimizer")
    state = optimizer_tensors(optimizer) if optimizer is not None else []
    resident = {label: weights[label] for label in ctx.objects["model_parts"]}
    resident[OPTIMIZER_HOST if ctx.host_optimizer else OPTIMIZER] = state
    if ctx.cfg.validation.prompts and ctx.target == "cpu" and VAE in weights:
        resident[VAE] = weights[VAE]
    return resident


# ---------------------------------------------------------------------------------- validation
def _validation(ctx: _Context, plan: Any) -> list[Stage]:
    from PIL import Image

    from dittune.train.optim import averaged_weights
    from dittune.train.prepare import validation_fps, validation_frames, validation_size

    cfg, spec = ctx.cfg, ctx.spec
    if "denoiser" not in ctx.objects or "text" not in ctx.objects:
        raise RuntimeError("the phases before it were not traced, so the denoiser or the embeddings are unknown")
    denoiser, vae = ctx.objects["denoiser"], ctx.objects["vae"]
    optimizer = ctx.objects.get("optimizer")
    if optimizer is None:
        ctx.not_modelled.append("validation: the optimizer state is left out (the optimizer was not built)")
    conditioned = bool(cfg.validation.images)
    # Outside the fake mode: the method loads a real scheduler (its steps need values); the models in it are
    # already fake, and frozen experts load fake under `weightless()`.
    pipeline = ctx.method.validation_pipeline(spec, denoiser, vae, conditioned)
    experts = spec.offloaded_parts(pipeline)
    if experts:
        ctx.objects["weights"][EXPERTS] = module_tensors(experts)
    width, height = validation_size(cfg, spec.alignment, spec.fixed_size)
    frames = validation_frames(cfg, spec)
    text = ctx.objects["text"]
    image = Image.new("RGB", (width, height)) if conditioned else None
    kwargs = spec.pipeline_kwargs(
        text,
        text,
        width=width,
        height=height,
        steps=min(cfg.validation.steps, VALIDATION_STEPS),
        guidance=cfg.validation.guidance,
        generator=torch.Generator("cpu").manual_seed(cfg.validation.seed),
        frames=frames,
        fps=validation_fps(cfg, spec, plan),
        image=image,
    )
    kwargs.update(ctx.method.validation_kwargs(cfg, 0))  # a ControlNet's control image (real: a file's pixels)
    kwargs["output_type"] = "pt"  # the decoded tensor; turning fake pixels into PIL images is impossible
    resident = {**_training_resident(ctx), VAE: module_tensors([vae]), EXPERTS: module_tensors(experts)}
    denoiser.eval()

    def sample() -> Any:
        averaged = averaged_weights(optimizer) if optimizer is not None else nullcontext()
        with averaged, torch.no_grad(), _autocast(ctx):
            return pipeline(**kwargs)

    shape = f"{width}×{height}" + (f"×{frames}" if frames > 1 else "")
    stage, _ = trace("sampling", sample, resident, host=[OPTIMIZER_HOST], detail=f"{shape}, denoising + decode")
    guidance = f"guidance {cfg.validation.guidance:g}"
    ctx.objects.setdefault("assumptions", []).append(f"validation {shape}, one prompt at a time, {guidance}")
    return [stage]


__all__ = ["Estimate", "EstimateConfigError", "Phase", "estimate"]
