"""Build everything a run needs: accelerator, spec, caches, denoiser, optimizer, sampler."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from dittune.cache.build import DTYPES, Shard
from dittune.cache.store import CacheStore
from dittune.config.schema import DittuneConfig
from dittune.data.sampler import BucketBatchSampler
from dittune.models.base import LossSettings, ModelInfo, ModelSpec
from dittune.models.registry import spec_class
from dittune.precision import Precision, device_precision
from dittune.train.checkpoint import Checkpointed
from dittune.train.methods import LoraMethod, TrainingMethod, method_for
from dittune.train.metrics import PhaseMemory
from dittune.train.optim import build_lr_scheduler, build_optimizer
from dittune.train.prepare import PreparedData, fill_caches
from dittune.train.sharding import accelerate_fsdp_options, configure_deepspeed, shard_denoiser

log = logging.getLogger(__name__)


def launched_on_cpu() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without CUDA: accelerate only sets up its
    CPU process group (gloo) when asked for the CPU explicitly; otherwise every process would train alone."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def launch_engine() -> str:
    """How `accelerate launch` distributes the run: "fsdp", "deepspeed", or "ddp" (also torchrun and one process)."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return "ddp"


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
    loss: LossSettings
    vae: torch.nn.Module | None
    weight_dtype: str
    precision: Precision
    compiled_blocks: int = 0
    """Transformer blocks compiled by `train.compile` (0: eager)."""
    checkpointed_blocks: int = 0
    """Transformer blocks recomputed in backward (`train.gradient_checkpointing`; 0: none)."""
    notes: list[str] = field(default_factory=list)
    memory: PhaseMemory | None = None
    """Peak memory per phase, from caching on (metrics.jsonl's `memory_*_mb`)."""
    method: TrainingMethod = field(default_factory=LoraMethod)
    """What trains, and how it is checkpointed, validated and exported (`train.method`)."""

    def checkpointed(self) -> Checkpointed:
        """What `save_checkpoint` writes and `load_checkpoint` restores."""
        return Checkpointed(
            accelerator=self.accelerator,
            model=self.denoiser,
            optimizer=self.optimizer,
            objects={"lr_scheduler": self.lr_scheduler, "sampler": self.sampler},  # the same on every process
            save_weights=partial(self.method.save_weights, self.accelerator, self.denoiser),
            load_weights=partial(self.method.load_weights, self.accelerator, self.denoiser),
        )


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
    spec = spec_class(cfg.model.family)(
        cfg.model.folder,
        t5_max_length=cfg.model.t5_max_length,
        expert=cfg.model.expert,
        checkpoint=cfg.model.checkpoint,
    )
    return spec, spec.inspect()


def load_trained_denoiser(
    cfg: DittuneConfig, spec: ModelSpec, dtype: torch.dtype, device: torch.device, quantise: bool = True
) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The model to train and its trainable parameters, as `train.method` builds them (see `train.methods`):
    frozen weights in `dtype`, trainable ones in fp32. `quantise=False` leaves nf4/int8 storage out (for fake
    weights, which cannot be quantised)."""
    return method_for(cfg).load(cfg, spec, dtype, device, quantise)


def build_run(
    cfg: DittuneConfig,
    accelerator: Any,
    *,
    precision: Precision | None = None,
    progress: bool = True,
    announce=print,
    check_data: Callable[[dict], None] | None = None,
) -> Run:
    """Everything up to the first step; text encoders are released, the VAE kept on CPU for validation.

    `precision` must be the one `accelerator` was made with (default: resolved again from the config);
    `check_data` sees the data's fingerprint before anything is encoded (see `prepare_data`).
    """
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    spec, info = load_spec(cfg)
    for warning in info.warnings:
        announce(f"warning: {warning}")
    device = accelerator.device
    precision = precision or run_precision(cfg, device)
    dtype_name = weight_dtype_name(cfg, precision)
    memory = PhaseMemory(device)
    prepared, vae = fill_caches(
        cfg,
        spec,
        device=device,
        compute_dtype=dtype_name,
        keep_vae=bool(cfg.validation.prompts),
        progress=progress,
        announce=announce,
        shard=Shard(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone),
        check_data=check_data,
    )
    memory.end("caching")

    torch.manual_seed(cfg.train.seed)
    method = method_for(cfg)
    denoiser, trainable = method.load(cfg, spec, DTYPES[dtype_name], device)
    core = method.trained_core(denoiser)
    checkpointed_blocks = 0
    if cfg.train.gradient_checkpointing:
        for module in method.checkpointed(denoiser):
            checkpointed_blocks += spec.enable_partial_checkpointing(module, cfg.train.gradient_checkpointing_ratio)
    compiled_blocks = 0
    if cfg.train.compile:
        from dittune.models.compile import compile_blocks

        compiled_blocks = compile_blocks(spec, core)
    if cfg.train.blocks_to_swap:  # after checkpointing and compile; `.to(device)` then leaves the swapped weights
        from dittune.models.block_offload import offload_blocks  # a sharded engine is refused in `run_train`

        offload_blocks(spec, core, cfg.train.blocks_to_swap, device=device)
    denoiser.to(device).train()
    fsdp = accelerate_fsdp_options(accelerator)
    if fsdp is not None:  # FSDP2 by the spec's blocks; accelerate then takes the sharded model as it is
        shard_denoiser(spec, denoiser, **fsdp)
        trainable = [p for p in denoiser.parameters() if p.requires_grad]

    optimizer = build_optimizer(trainable, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    configure_deepspeed(accelerator, cfg.train.batch_size, cfg.train.max_grad_norm)
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
        accumulation=cfg.train.gradient_accumulation_steps,
    )
    # Noise, noise levels and caption dropout are drawn per sample, keyed by (seed, step, position in the global
    # batch) — see dittune.models.draws — so there are no per-process generators to keep.
    if str(accelerator.distributed_type).endswith("DEEPSPEED"):  # its engine checkpoints through accelerate
        for obj in (lr_scheduler, sampler):
            accelerator.register_for_checkpointing(obj)
        method.register_checkpoint_hooks(accelerator)
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
        loss=loss_settings(cfg, spec),
        vae=vae,
        weight_dtype=dtype_name,
        precision=precision,
        compiled_blocks=compiled_blocks,
        checkpointed_blocks=checkpointed_blocks,
        memory=memory,
        method=method,
    )
