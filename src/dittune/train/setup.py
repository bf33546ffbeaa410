"""Build everything a run needs: accelerator, spec, caches, denoiser, optimizer, sampler, generators."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dittune.cache.build import DTYPES, Shard
from dittune.cache.store import CacheStore
from dittune.config.schema import DittuneConfig
from dittune.data.sampler import BucketBatchSampler
from dittune.models.base import LossSettings, ModelInfo, ModelSpec
from dittune.models.lora import inject_lora, load_lora_state_dict, lora_parameters, lora_state_dict
from dittune.models.registry import spec_class
from dittune.precision import Precision, device_precision
from dittune.train.optim import build_lr_scheduler, build_optimizer
from dittune.train.prepare import PreparedData, fill_caches

log = logging.getLogger(__name__)
ADAPTER_FILE = "adapter.safetensors"


def launched_on_cpu() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without CUDA: accelerate only sets up its
    CPU process group (gloo) when asked for the CPU explicitly; otherwise every process would train alone."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def distributed_state() -> Any:
    """accelerate's process state (the process group is created on first use)."""
    from accelerate import PartialState

    return PartialState(cpu=launched_on_cpu())


def training_device() -> torch.device:
    """The device accelerate will train on (this process's GPU, else the CPU)."""
    return distributed_state().device


def cache_shard() -> Shard:
    """This process's share of cache encoding, with the barrier that ends it."""
    state = distributed_state()
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone)


def run_precision(cfg: DittuneConfig, device: torch.device | str) -> Precision:
    """`train.mixed_precision` resolved for `device` ("auto" chosen by the hardware)."""
    stored = cfg.model.weight_dtype if cfg.model.weight_dtype in ("bf16", "fp16") else None
    return device_precision(cfg.train.mixed_precision, device, needs=stored)


def weight_dtype_name(cfg: DittuneConfig, precision: Precision) -> str:
    """Storage dtype of frozen weights: explicit, or the resolved compute precision."""
    if cfg.model.weight_dtype != "auto":
        return cfg.model.weight_dtype
    return precision.name


def loss_settings(cfg: DittuneConfig, spec: ModelSpec) -> LossSettings:
    settings = spec.default_loss_settings(cfg.train.method)
    if cfg.loss.vlb is not None:
        settings.vlb = cfg.loss.vlb
    settings.noise_offset = cfg.loss.noise_offset
    settings.min_snr_gamma = cfg.loss.min_snr_gamma
    if cfg.loss.timestep_sampling is not None:
        settings.timestep_sampling = cfg.loss.timestep_sampling
    settings.logit_mean, settings.logit_std = cfg.loss.logit_mean, cfg.loss.logit_std
    settings.mode_scale, settings.flow_shift = cfg.loss.mode_scale, cfg.loss.flow_shift
    settings.weighting, settings.guidance = cfg.loss.weighting, cfg.loss.guidance
    settings.first_frame_p = cfg.loss.first_frame_p
    settings.sample_latents = cfg.cache.latent_sampling == "sample"
    return settings


@dataclass
class Run:
    """The live objects of a training run."""

    cfg: DittuneConfig
    accelerator: Any
    spec: ModelSpec
    info: ModelInfo
    prepared: PreparedData
    store: CacheStore
    denoiser: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    scheduler: Any
    sampler: BucketBatchSampler
    noise_generator: torch.Generator
    data_generator: torch.Generator
    loss: LossSettings
    vae: torch.nn.Module | None
    weight_dtype: str
    precision: Precision
    compiled_blocks: int = 0
    """Transformer blocks compiled by `train.compile` (0: eager)."""
    notes: list[str] = field(default_factory=list)

    def process_state(self) -> dict[str, torch.Tensor]:
        """What differs between processes and a checkpoint must keep per process: the noise and data generators
        (accelerate saves registered objects from the main process only)."""
        return {"noise_generator": self.noise_generator.get_state(), "data_generator": self.data_generator.get_state()}

    def load_process_state(self, state: dict[str, torch.Tensor]) -> None:
        self.noise_generator.set_state(state["noise_generator"])
        self.data_generator.set_state(state["data_generator"])


def make_accelerator(cfg: DittuneConfig, precision: Precision | None = None) -> Any:
    """An Accelerator computing in `precision` (default: resolved from the config for this machine)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps process-wide singletons; a new run (e.g. a second one in the same Python process)
    # must be free to choose its own precision. The distributed state itself is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    precision = precision or run_precision(cfg, training_device())
    project = ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs"))
    return Accelerator(
        cpu=launched_on_cpu(),
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=list(cfg.train.trackers) or None,
        project_config=project,
    )


def load_spec(cfg: DittuneConfig) -> tuple[ModelSpec, ModelInfo]:
    spec = spec_class(cfg.model.family)(cfg.model.path, t5_max_length=cfg.model.t5_max_length, expert=cfg.model.expert)
    return spec, spec.inspect()


def build_run(
    cfg: DittuneConfig, accelerator: Any, *, precision: Precision | None = None, progress: bool = True, announce=print
) -> Run:
    """Everything up to the first step; text encoders are released, the VAE kept on CPU for validation.

    `precision` must be the one `accelerator` was made with (default: resolved again from the config).
    """
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    spec, info = load_spec(cfg)
    for warning in info.warnings:
        announce(f"warning: {warning}")
    device = accelerator.device
    precision = precision or run_precision(cfg, device)
    dtype_name = weight_dtype_name(cfg, precision)
    prepared, vae = fill_caches(
        cfg,
        spec,
        device=device,
        compute_dtype=dtype_name,
        keep_vae=bool(cfg.validation.prompts),
        progress=progress,
        announce=announce,
        shard=Shard(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone),
    )

    torch.manual_seed(cfg.train.seed)
    if cfg.train.method == "full":
        denoiser = spec.load_denoiser(torch.float32, random_init=cfg.train.init == "random")
        denoiser.requires_grad_(True)
        trainable = [p for p in denoiser.parameters() if p.requires_grad]
    else:
        denoiser = spec.load_denoiser(DTYPES[dtype_name])
        denoiser.requires_grad_(False)
        inject_lora(
            denoiser,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha if cfg.lora.alpha is not None else float(cfg.lora.rank),
            targets=cfg.lora.targets or list(spec.default_lora_targets),
            dropout=cfg.lora.dropout,
        )
        trainable = lora_parameters(denoiser)
        for param in trainable:
            param.data = param.data.float()
            param.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        spec.enable_gradient_checkpointing(denoiser)
    compiled_blocks = 0
    if cfg.train.compile:
        from dittune.models.compile import compile_blocks

        compiled_blocks = compile_blocks(spec, denoiser)
    denoiser.to(device).train()

    optimizer = build_optimizer(trainable, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    sampler = BucketBatchSampler(
        prepared.plan.buckets,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        drop_incomplete=cfg.data.incomplete_batches == "drop",
        random_flip=cfg.data.random_flip,
        repeats=cfg.data.repeats,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
    )
    rank = accelerator.process_index
    noise_generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + 1 + rank)
    data_generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + 2 + rank)
    for obj in (lr_scheduler, sampler):  # the same on every process: saved once (by the main process)
        accelerator.register_for_checkpointing(obj)
    if cfg.train.method == "lora":
        _register_adapter_hooks(accelerator)
    return Run(
        cfg=cfg,
        accelerator=accelerator,
        spec=spec,
        info=info,
        prepared=prepared,
        store=CacheStore(cfg.cache_dir),
        denoiser=denoiser,
        trainable=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scheduler=spec.load_scheduler(),
        sampler=sampler,
        noise_generator=noise_generator,
        data_generator=data_generator,
        loss=loss_settings(cfg, spec),
        vae=vae,
        weight_dtype=dtype_name,
        precision=precision,
        compiled_blocks=compiled_blocks,
    )


def _register_adapter_hooks(accelerator: Any) -> None:
    """Checkpoints of LoRA runs hold only the adapter, not the frozen base weights."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                save_file(lora_state_dict(accelerator.unwrap_model(model)), str(Path(output_dir) / ADAPTER_FILE))
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        state = load_file(str(Path(input_dir) / ADAPTER_FILE))
        while models:
            load_lora_state_dict(accelerator.unwrap_model(models.pop()), state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
