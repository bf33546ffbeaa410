"""Checks that need the file system or the family's spec class, run before any model is loaded.

`preflight` never imports torch (`dittune config check` uses it); `device_checks` is given the device.
"""

from __future__ import annotations

import difflib
import importlib.util

from dittune.config.schema import DittuneConfig
from dittune.data.buckets import snap
from dittune.models.facts import FamilyFacts
from dittune.models.registry import facts_class, family_names
from dittune.train.optim import optimizer_arg_problems, optimizer_problems

Problem = tuple[str, str]


def _controlnet_problems(cfg: DittuneConfig) -> list[Problem]:
    """`train.method = "controlnet"`: a family with a ControlNet, control images that exist, options that fit."""
    if cfg.train.method != "controlnet":
        return []
    problems: list[Problem] = [
        (f"validation.control_images[{index}]", f"{image} does not exist.")
        for index, image in enumerate(cfg.validation.control_images)
        if not image.is_file()
    ]
    if cfg.model.family in family_names() and facts_class(cfg.model.family).controlnet_class is None:
        have = ", ".join(f for f in family_names() if facts_class(f).controlnet_class)
        problems.append(
            ("train.method", f"{cfg.model.family} has no ControlNet in dittune (families with one: {have}).")
        )
    for key, value in (
        ("model.base_storage", cfg.model.base_storage != "default"),
        ("train.blocks_to_swap", cfg.train.blocks_to_swap),
    ):
        if value:
            problems.append((key, "applies to LoRA runs only; a ControlNet run keeps the denoiser frozen as it is."))
    return problems


def _checkpoint_problems(cfg: DittuneConfig, spec_cls: type) -> list[Problem]:
    """A single-file model.path: the file exists, and a folder with the other components is named."""
    checkpoint = cfg.model.checkpoint
    if checkpoint is None:
        return []
    problems: list[Problem] = []
    if not checkpoint.is_file():
        problems.append(("model.path", f"{checkpoint} does not exist."))
    if cfg.model.components is None and not (checkpoint.parent / "model_index.json").is_file():
        problems.append(
            (
                "model.components",
                f"model.path {checkpoint} is a single-file checkpoint; set model.components to a diffusers "
                f"{spec_cls.display_name} folder with the text encoders, VAE and scheduler.",
            )
        )
    return problems


def preflight(cfg: DittuneConfig) -> list[Problem]:
    """Every problem found, as (dotted key, message with the fix); empty when the run can start."""
    problems: list[Problem] = []
    if cfg.model.family not in family_names():
        close = difflib.get_close_matches(cfg.model.family, family_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.append(
            ("model.family", f"unknown family {cfg.model.family!r} (known: {', '.join(family_names())}).{hint}")
        )
        return problems + _generic_checks(cfg)
    spec_cls = facts_class(cfg.model.family)
    checkpoint_problems = _checkpoint_problems(cfg, spec_cls)
    problems += checkpoint_problems
    folder_key = "model.components" if cfg.model.components is not None else "model.path"
    if not any(key == "model.components" for key, _ in checkpoint_problems):
        problems += [(folder_key, p) for p in spec_cls.check_folder(cfg.model.folder)]
    has_folder = (cfg.model.folder / "model_index.json").is_file()
    expert_problem = spec_cls.expert_problem(cfg.model.folder, cfg.model.expert) if has_folder else None
    if expert_problem:
        problems.append(("model.expert", expert_problem))
    alignment = spec_cls.alignment_at(cfg.model.folder) if has_folder else spec_cls.alignment
    if cfg.data.bucket_step % alignment:
        nearest = snap(cfg.data.bucket_step, alignment)
        problems.append(
            (
                "data.bucket_step",
                f"{cfg.data.bucket_step} is not a multiple of the {spec_cls.display_name} alignment "
                f"({alignment}); use {nearest}.",
            )
        )
    encoder_names = [slot.name for slot in spec_cls.text_encoders]
    for name in cfg.train.caption_dropout_per_encoder:
        if name not in encoder_names:
            problems.append(
                (
                    f"train.caption_dropout_per_encoder.{name}",
                    f"{spec_cls.display_name} has no text encoder {name!r}; its encoders are {encoder_names}.",
                )
            )
    length = cfg.model.t5_max_length
    if length is not None and spec_cls.t5_lengths is None:
        problems.append(("model.t5_max_length", f"{spec_cls.display_name}'s text length is fixed; remove the key."))
    elif length is not None and length > spec_cls.t5_lengths[1]:
        problems.append(
            ("model.t5_max_length", f"{length} exceeds {spec_cls.display_name}'s maximum of {spec_cls.t5_lengths[1]}.")
        )
    problems += _clip_checks(cfg, spec_cls)
    for key in sorted(cfg.loss.model_fields_set - spec_cls.loss_options):
        problems.append(
            (
                f"loss.{key}",
                f"{spec_cls.display_name} training does not use this option; remove it "
                f"(its loss options: {', '.join(sorted(spec_cls.loss_options)) or 'none'}).",
            )
        )
    return problems + _generic_checks(cfg)


def _clip_checks(cfg: DittuneConfig, spec_cls: type[FamilyFacts]) -> list[Problem]:
    """Frame settings against the model's frame rule, and conditioning images against what it samples."""
    problems: list[Problem] = [
        (f"validation.images[{index}]", f"{image} does not exist.")
        for index, image in enumerate(cfg.validation.images)
        if not image.is_file()
    ]
    path, name = cfg.model.folder, spec_cls.display_name
    if not (path / "model_index.json").is_file():
        return problems  # reported by check_folder; the readers below need the folder
    if not spec_cls.frame_rule_at(path).is_video:
        for key, value in (("data.frames", cfg.data.frames), ("validation.frames", cfg.validation.frames)):
            if value not in (None, 1):
                problems.append((key, f"{name} trains on still images; remove the key (or set it to 1)."))
    conditioning = spec_cls.image_conditioning_at(path)
    if cfg.validation.images and conditioning == "none":
        problems.append(("validation.images", f"{name} ({path}) does not take a conditioning image; remove the key."))
    if conditioning == "required" and cfg.validation.prompts and not cfg.validation.images:
        problems.append(
            ("validation.images", f"{path} is an image-to-video model: give one conditioning image per prompt.")
        )
    return problems


def _generic_checks(cfg: DittuneConfig) -> list[Problem]:
    problems: list[Problem] = []
    if not cfg.data.path.is_dir():
        problems.append(("data.path", f"{cfg.data.path} is not a folder; point it at your images."))
    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
        problems.append(("output_dir", f"{cfg.output_dir} exists and is not a folder."))
    if cfg.model.weight_dtype in ("bf16", "fp16") and cfg.train.mixed_precision == "no":
        problems.append(
            (
                "model.weight_dtype",
                f"{cfg.model.weight_dtype} weights need autocast; set train.mixed_precision = "
                f'"{cfg.model.weight_dtype}" (or "auto") or weight_dtype = "fp32".',
            )
        )
    precisions = {cfg.train.mixed_precision, cfg.model.weight_dtype} - {"auto", "no", "fp32"}
    if len(precisions) > 1:
        problems.append(
            (
                "model.weight_dtype",
                f"{cfg.model.weight_dtype} weights cannot be computed under {cfg.train.mixed_precision} autocast; "
                'make them equal, or set weight_dtype = "auto".',
            )
        )
    problems += optimizer_problems(cfg.train)
    problems += _controlnet_problems(cfg)
    if cfg.model.base_storage != "default" and cfg.train.method == "full":
        problems.append(
            (
                "model.base_storage",
                'applies to the frozen base of LoRA runs; full fine-tuning trains it in fp32: use "default".',
            )
        )
    if cfg.train.blocks_to_swap and cfg.train.method == "full":
        problems.append(
            (
                "train.blocks_to_swap",
                "swaps the frozen base of LoRA runs; full fine-tuning trains every weight (the optimizer keeps them "
                "on the device): set 0 (or train.optimizer_offload = true for the optimizer state).",
            )
        )
    if cfg.train.blocks_to_swap and cfg.model.base_storage in ("nf4", "int8"):
        problems.append(
            (
                "train.blocks_to_swap",
                f"cannot swap bitsandbytes-quantised ({cfg.model.base_storage}) layers; use model.base_storage = "
                '"fp8_e4m3" or "default" with it, or set 0.',
            )
        )
    if cfg.model.base_storage in ("nf4", "int8") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            ("model.base_storage", f'{cfg.model.base_storage} needs bitsandbytes: pip install "dittune[bnb]".')
        )
    if "wandb" in cfg.train.trackers and importlib.util.find_spec("wandb") is None:
        problems.append(("train.trackers", 'wandb is not installed: pip install "dittune[wandb]" or drop it.'))
    if cfg.lora.targets is not None and not cfg.lora.targets:
        problems.append(("lora.targets", "an empty list adapts nothing; remove the key for the family default."))
    return problems


def device_checks(cfg: DittuneConfig, device_type: str) -> list[Problem]:
    """Problems that depend on the device the run will use ("cuda", "cpu", ...), checked when training starts."""
    problems: list[Problem] = []
    settings = {"train.mixed_precision": cfg.train.mixed_precision, "model.weight_dtype": cfg.model.weight_dtype}
    if device_type != "cuda":
        message = f'fp16 needs a CUDA GPU (this run is on {device_type}); use "auto" instead.'
        problems += [(key, message) for key, value in settings.items() if value == "fp16"]
    if cfg.model.base_storage.startswith("fp8") and device_type == "mps":
        problems.append(("model.base_storage", 'MPS has no fp8 dtypes; use "default" (or nf4/int8 on CUDA or CPU).'))
    if cfg.train.compile:
        from dittune.models.compile import compile_problems  # imports torch: only when asked for

        problems += [("train.compile", message) for message in compile_problems(device_type)]
    if cfg.train.optimizer_args:
        problems += optimizer_arg_problems(cfg.train)  # imports the optimizer's package (and torch)
    return problems
