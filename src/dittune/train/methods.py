"""Training methods: what trains, what a checkpoint holds, what validation samples with and what is exported.

One object per `train.method`, so setup, the loop and export never branch on it:
- `LoraMethod`: peft adapters on the frozen denoiser; checkpoints hold the adapter only; exports
  `final/lora.safetensors`.
- `FullMethod`: every denoiser weight in fp32; checkpoints hold the whole model; exports a diffusers folder.
- `ControlNetMethod`: a ControlNet initialised from the denoiser (the family's `build_controlnet`), driving the
  frozen denoiser through `ControlledDenoiser`; checkpoints hold the ControlNet only; exports `final/controlnet/`,
  loadable with the ControlNet class's `from_pretrained`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dittune.config.schema import DittuneConfig
from dittune.export.full import save_full_pipeline
from dittune.export.lora_file import LoraInfo, save_lora
from dittune.models.base import LossOutput, ModelSpec, TrainBatch
from dittune.models.lora import inject_lora, is_lora_key, lora_module_state, lora_parameters, lora_state_dict
from dittune.train.sharding import gather_state, is_sharded, load_full_state

if TYPE_CHECKING:
    from dittune.models.draws import Draws
    from dittune.train.setup import Run

ADAPTER_FILE = "adapter.safetensors"
CONTROLNET_FILE = "controlnet.safetensors"
MODEL_FILE = "model.safetensors"


def gathers_together(accelerator: Any, model: nn.Module) -> bool:
    """Whether gathering `model`'s weights is a collective (FSDP2 shards, DeepSpeed): every process must take
    part. Otherwise only the main process copies them to the CPU (N copies of a full model would not fit)."""
    return is_sharded(model) or str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


class TrainingMethod(ABC):
    name: ClassVar[str]

    @abstractmethod
    def load(
        self, cfg: DittuneConfig, spec: ModelSpec, dtype: torch.dtype, device: torch.device, quantise: bool = True
    ) -> tuple[nn.Module, list[nn.Parameter]]:
        """The module `compute_loss` runs and its trainable parameters (frozen weights in `dtype`)."""

    def trained_core(self, model: nn.Module) -> nn.Module:
        """The module whose blocks compilation and block swapping act on (the denoiser, or the ControlNet)."""
        return model

    def checkpointed(self, model: nn.Module) -> list[nn.Module]:
        """The modules whose blocks `train.gradient_checkpointing` recomputes in backward."""
        return [self.trained_core(model)]

    gathered_keys: ClassVar[Callable[[str], bool] | None] = None
    """The state-dict keys export gathers from a sharded or wrapped model (None: all)."""

    def save_weights(self, accelerator: Any, model: nn.Module, folder: Path) -> None:
        """Write what a checkpoint holds of `model` (prepared) into `folder` (default: every weight, in
        `model.safetensors`). A collective: every process calls it; the main process writes."""
        if gathers_together(accelerator, model) or accelerator.is_main_process:
            state = gather_state(model, accelerator)
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / MODEL_FILE))

    def load_weights(self, accelerator: Any, model: nn.Module, folder: Path) -> None:
        """Load what `save_weights` wrote (every process reads the file)."""
        state = load_file(str(folder / MODEL_FILE))
        module = accelerator.unwrap_model(model)
        missing = sorted(set(module.state_dict()) - set(state))
        if missing:
            raise ValueError(f"{folder / MODEL_FILE} lacks {len(missing)} weight(s) of the model, e.g. {missing[:3]}")
        load_full_state(module, state)

    def register_checkpoint_hooks(self, accelerator: Any) -> None:
        """Under DeepSpeed, whose engine writes the checkpoint through accelerate, `save_weights`' file goes along
        (the full method leaves the weights to the engine)."""
        if self.name == "full":
            return

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            for model in models:
                self.save_weights(accelerator, model, Path(output_dir))
            weights.clear()

        def load_hook(models: list, input_dir: str) -> None:
            while models:
                self.load_weights(accelerator, models.pop(), Path(input_dir))

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def loss(self, run: Run, batch: TrainBatch, draws: Draws) -> LossOutput:
        return run.spec.compute_loss(run.denoiser, run.scheduler, batch, draws, run.loss)

    def validation_pipeline(self, spec: ModelSpec, model: nn.Module, vae: nn.Module, conditioned: bool) -> Any:
        """The stock pipeline validation samples with, around the live model."""
        return spec.build_pipeline(model, vae, spec.load_scheduler(), conditioned)

    def validation_kwargs(self, cfg: DittuneConfig, index: int) -> dict[str, Any]:
        """Extra pipeline arguments for validation prompt `index`."""
        return {}

    @abstractmethod
    def export(
        self, run: Run, model: nn.Module, state: dict[str, torch.Tensor] | None, final: Path, steps: int
    ) -> None:
        """Write the trained weights under `final` (main process; `state`: gathered when the model is sharded)."""


class LoraMethod(TrainingMethod):
    name = "lora"
    gathered_keys = staticmethod(is_lora_key)

    def load(self, cfg, spec, dtype, device, quantise=True):
        denoiser = spec.load_denoiser(dtype)
        denoiser.requires_grad_(False)
        inject_lora(
            denoiser,
            rank=cfg.lora.rank,
            alpha=lora_alpha(cfg),
            targets=cfg.lora.targets or list(spec.default_lora_targets),
            dropout=cfg.lora.dropout,
        )
        trainable = lora_parameters(denoiser)
        for param in trainable:
            param.data = param.data.float()
            param.requires_grad_(True)
        if quantise or cfg.model.base_storage not in ("nf4", "int8"):
            from dittune.models.storage import apply_base_storage  # after injection: LoRA weights stay fp32

            apply_base_storage(
                denoiser,
                cfg.model.base_storage,
                compute_dtype=dtype,
                spec_patterns=spec.storage_skip_patterns,
                device=device,
            )
        return denoiser, trainable

    def save_weights(self, accelerator, model, folder):
        """Checkpoints of LoRA runs hold only the adapter, not the frozen base weights."""
        if not (gathers_together(accelerator, model) or accelerator.is_main_process):
            return
        full = gather_state(model, accelerator, keep=is_lora_key)
        if accelerator.is_main_process:
            adapter = lora_state_dict(accelerator.unwrap_model(model), state=full)
            save_file(adapter, str(folder / ADAPTER_FILE))

    def load_weights(self, accelerator, model, folder):
        model = accelerator.unwrap_model(model)
        load_full_state(model, lora_module_state(model, load_file(str(folder / ADAPTER_FILE))))

    def export(self, run, model, state, final, steps):
        cfg, spec = run.cfg, run.spec
        final.mkdir(parents=True, exist_ok=True)
        info = LoraInfo(
            family=spec.family,
            component=spec.denoiser_component,
            key_prefix=spec.lora_key_prefix,
            rank=cfg.lora.rank,
            alpha=lora_alpha(cfg),
            targets=list(cfg.lora.targets or spec.default_lora_targets),
            base_model=str(cfg.model.checkpoint or spec.path),
            version=run.info.version,
            extra={"steps": steps, "config": json.loads(cfg.model_dump_json())},
        )
        save_lora(final / "lora.safetensors", lora_state_dict(model, state=state), info)


class FullMethod(TrainingMethod):
    name = "full"

    def load(self, cfg, spec, dtype, device, quantise=True):
        denoiser = spec.load_denoiser(torch.float32, random_init=cfg.train.init == "random")
        denoiser.requires_grad_(True)
        return denoiser, [p for p in denoiser.parameters() if p.requires_grad]

    def export(self, run, model, state, final, steps):
        if state is not None:  # gathered from shards: an unsharded copy on the CPU holds them for saving
            model = run.spec.load_denoiser(torch.float32, random_init=True)
            model.load_state_dict(state)
        save_full_pipeline(run.spec.path, run.spec.denoiser_component, model, final)


class ControlNetMethod(TrainingMethod):
    name = "controlnet"

    def load(self, cfg, spec, dtype, device, quantise=True):
        from dittune.models.controlnet import ControlledDenoiser

        denoiser = spec.load_denoiser(dtype).requires_grad_(False)
        controlnet, trainable = spec.build_controlnet(denoiser, cfg.controlnet.layers)
        controlnet.to(torch.float32)
        model = ControlledDenoiser(denoiser, controlnet, spec.control_argument)
        return model, trainable

    def trained_core(self, model):
        return model.controlnet

    def checkpointed(self, model):
        """The ControlNet and the frozen denoiser: backward runs through the denoiser's blocks after the first
        residual, whose activations would otherwise all be kept."""
        return [model.controlnet, model.denoiser]

    def save_weights(self, accelerator, model, folder):
        """Checkpoints hold the ControlNet only; the frozen denoiser comes from the model folder."""
        if accelerator.is_main_process:
            controlnet = accelerator.unwrap_model(model).controlnet
            state = {k: v.detach().contiguous() for k, v in controlnet.state_dict().items()}
            save_file(state, str(folder / CONTROLNET_FILE))

    def load_weights(self, accelerator, model, folder):
        state = load_file(str(folder / CONTROLNET_FILE))
        accelerator.unwrap_model(model).controlnet.load_state_dict(state, strict=True)

    def loss(self, run, batch, draws):
        if batch.control is None:
            raise RuntimeError("a ControlNet batch without control latents (the data plan has no control images)")
        control = run.spec.latents_from_moments(batch.control, draws, False)  # the posterior mean: no draw
        model = run.accelerator.unwrap_model(run.denoiser)
        with model.condition(control):
            return run.spec.compute_loss(run.denoiser, run.scheduler, batch, draws, run.loss)

    def validation_pipeline(self, spec, model, vae, conditioned):
        return spec.build_control_pipeline(model.denoiser, model.controlnet, vae, spec.load_scheduler())

    def validation_kwargs(self, cfg, index):
        from dittune.media import load_image

        return {
            "control_image": load_image(cfg.validation.control_images[index]),
            "controlnet_conditioning_scale": cfg.controlnet.conditioning_scale,
        }

    def export(self, run, model, state, final, steps):
        final.mkdir(parents=True, exist_ok=True)
        model.controlnet.save_pretrained(final / "controlnet", safe_serialization=True)


METHODS: dict[str, type[TrainingMethod]] = {m.name: m for m in (LoraMethod, FullMethod, ControlNetMethod)}


def method_for(cfg: DittuneConfig) -> TrainingMethod:
    return METHODS[cfg.train.method]()


def lora_alpha(cfg: DittuneConfig) -> float:
    return cfg.lora.alpha if cfg.lora.alpha is not None else float(cfg.lora.rank)
