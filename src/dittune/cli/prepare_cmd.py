"""`dittune prepare IN OUT --resolution R`: pre-resize and crop a dataset to its buckets, cut videos into clips.

The bucket options mean what the `data.*` keys of a training config mean (their defaults are read from the
config schema); the pixel alignment comes from `--alignment`, else the model (`--model DIR`, `--family`),
else 16. The work itself is in `dittune.data.prepare` (imported when the command runs, so `dittune --help`
stays fast).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dittune.config.schema import DataSection
from dittune.models.facts import STILL, FrameRule
from dittune.models.registry import detect_family, facts_class, family_names

DEFAULT_ALIGNMENT = 16
"""Pixel alignment without --alignment, --model or --family (that of most families)."""


def _default(key: str) -> Any:
    """The schema default of `data.<key>`."""
    return DataSection.model_fields[key].default


def add_prepare_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `prepare` subcommand to `commands` (the `dittune` subparsers)."""
    prepare = commands.add_parser(
        "prepare",
        help="resize and crop a dataset to its buckets, cut videos into clips, write metadata.jsonl",
        description=(
            "Write OUT with every image resized and cropped to its training bucket (as `dittune train` would at "
            "the same data.* settings), videos cut into clips of --frames frames, and a metadata.jsonl with the "
            "captions. Training on OUT with the same settings needs no further resize or crop."
        ),
    )
    prepare.add_argument("source", metavar="IN", help="dataset folder (same-stem captions, or metadata.jsonl/.csv)")
    prepare.add_argument("out", metavar="OUT", help="new (or empty) folder to write")
    buckets = prepare.add_argument_group("buckets (as the data.* config keys)")
    buckets.add_argument(
        "--resolution", type=float, required=True, metavar="R", help="short edge in pixels, or megapixels with area"
    )
    buckets.add_argument(
        "--resolution-type",
        default="pixel",
        choices=("pixel", "area"),
        help='"pixel": R is the short edge; "area": R megapixels (1.0 = 1024×1024) (default: pixel)',
    )
    buckets.add_argument(
        "--alignment",
        type=int,
        default=None,
        metavar="N",
        help=f"sides are multiples of N (default: the model's, else {DEFAULT_ALIGNMENT})",
    )
    buckets.add_argument("--model", default=None, metavar="DIR", help="model folder to take the alignment from")
    buckets.add_argument(
        "--family",
        default=None,
        choices=family_names(),
        metavar="NAME",
        help=f"model family ({', '.join(family_names())}; default: detected from --model)",
    )
    buckets.add_argument(
        "--bucket-step",
        type=int,
        default=_default("bucket_step"),
        metavar="N",
        help="pixels between neighbouring buckets (default: %(default)s)",
    )
    buckets.add_argument(
        "--max-aspect-ratio",
        type=float,
        default=_default("max_aspect_ratio"),
        metavar="F",
        help="widest bucket, long ÷ short edge (default: %(default)s)",
    )
    buckets.add_argument(
        "--crop",
        default=_default("crop"),
        choices=("center", "random"),
        help="where to crop what overhangs the bucket (default: %(default)s)",
    )
    buckets.add_argument(
        "--crop-seed", type=int, default=_default("crop_seed"), metavar="N", help="seed of --crop random"
    )
    clips = prepare.add_argument_group("videos")
    clips.add_argument(
        "--frames", type=int, default=None, metavar="N", help="cut each video into clips of N frames (default: whole)"
    )
    clips.add_argument(
        "--stride", type=int, default=None, metavar="N", help="frames between clip starts (default: N, no overlap)"
    )
    clips.add_argument("--max-clips", type=int, default=None, metavar="N", help="at most N clips per video")
    clips.add_argument("--fps", type=float, default=None, metavar="F", help="resample videos to F fps first")
    output = prepare.add_argument_group("input and output")
    output.add_argument(
        "--image-format",
        default="png",
        choices=("png", "jpeg", "keep"),
        help="png (lossless), jpeg (quality 95), or keep: JPEG sources as JPEG, others PNG (default: png)",
    )
    output.add_argument(
        "--caption-extension",
        default=_default("caption_extension"),
        metavar="EXT",
        help="caption files of a plain folder (default: %(default)s)",
    )
    output.add_argument(
        "--missing-caption",
        default=_default("missing_caption"),
        choices=("skip", "empty", "error"),
        help="a file without caption: leave it out, keep it with an empty caption, or stop (default: %(default)s)",
    )
    output.add_argument(
        "--control",
        action="store_true",
        help=(
            "ControlNet data: pair each image with its control image (<stem>_control.<ext> beside it, or a "
            "control metadata column) as training does; each is written placed like its image as "
            "<stem>_control.png and listed in a control column"
        ),
    )
    output.add_argument("--overwrite", action="store_true", help="replace OUT if a previous prepare wrote it")
    prepare.set_defaults(handler=_cmd_prepare)
    return prepare


def model_facts(model: str | None, family: str | None) -> tuple[int, tuple[int, int] | None, FrameRule]:
    """(alignment, fixed size, frame rule) of the model folder or family; defaults when neither is given."""
    if model is not None:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"--model {model}: no such folder; pass a diffusers-layout model folder")
        facts = facts_class(family or detect_family(path))
        return facts.alignment_at(path), facts.fixed_size_at(path), facts.frame_rule_at(path)
    if family is not None:
        facts = facts_class(family)
        return facts.alignment, None, facts.frame_rule
    return DEFAULT_ALIGNMENT, None, STILL


def _cmd_prepare(args: argparse.Namespace) -> int:
    from dittune.data.prepare import PrepareOptions, format_summary, prepare_dataset

    alignment, fixed_size, rule = model_facts(args.model, args.family)
    options = PrepareOptions(
        resolution=args.resolution,
        resolution_type=args.resolution_type,
        alignment=alignment if args.alignment is None else args.alignment,
        bucket_step=args.bucket_step,
        max_aspect_ratio=args.max_aspect_ratio,
        crop=args.crop,
        crop_seed=args.crop_seed,
        fixed_size=fixed_size,
        frames=args.frames,
        stride=args.stride,
        max_clips=args.max_clips,
        fps=args.fps,
        image_format=args.image_format,
        caption_extension=args.caption_extension,
        missing_caption=args.missing_caption,
        overwrite=args.overwrite,
        control=args.control,
        frame_rule=rule,
    )
    summary = prepare_dataset(Path(args.source), Path(args.out), options)
    print(format_summary(summary, options))
    return 0
