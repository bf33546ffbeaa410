"""`dittune caption DATA_DIR --model VLM_DIR`: write same-stem caption files with a local VLM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_PROBLEMS = 0, 1


def _cmd_caption(args: argparse.Namespace) -> int:
    from dittune.caption import caption_folder, format_report

    if args.prompt is not None and (args.prompt_style is not None or args.language is not None):
        raise ValueError("--prompt replaces the built-in prompts; leave out --prompt-style and --language with it")
    report = caption_folder(
        Path(args.data_dir),
        Path(args.model),
        prompt_style=args.prompt_style or "short",
        language=args.language or "en",
        prompt=args.prompt,
        trigger=args.trigger,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        caption_extension=args.caption_extension,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    summary = format_report(report, Path(args.data_dir), overwrite=args.overwrite)
    print(summary, file=sys.stderr if report.failed else sys.stdout)
    return EXIT_PROBLEMS if report.failed else EXIT_OK


def add_caption_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `caption` to the `dittune` subcommands (`commands` is the subparsers action)."""
    caption = commands.add_parser(
        "caption",
        help="write same-stem caption files for a data folder with a local vision-language model",
        description=(
            "Caption every image (and the middle frame of every clip) under DATA_DIR that has no caption "
            "file yet, with any chat VLM that transformers loads as image-text-to-text (e.g. Qwen2.5-VL). "
            "Exit status 1 when some images failed (listed at the end)."
        ),
    )
    caption.add_argument("data_dir", metavar="DATA_DIR", help="folder of images/clips (searched recursively)")
    caption.add_argument("--model", required=True, metavar="VLM_DIR", help="local model folder (config.json, ...)")
    caption.add_argument(
        "--prompt-style",
        choices=("short", "structured"),
        default=None,
        help="short: one sentence (default); structured: one paragraph on subject, appearance, action, "
        "setting, style/lighting and composition (Hunyuan captioner style)",
    )
    caption.add_argument(
        "--language",
        choices=("en", "zh", "both"),
        default=None,
        help="caption language (default en); both: English line, then Chinese line",
    )
    caption.add_argument("--prompt", default=None, metavar="TEXT", help="your own instruction instead of the built-ins")
    caption.add_argument("--trigger", default=None, metavar="WORD", help='prefix every caption with "WORD, "')
    caption.add_argument("--overwrite", action="store_true", help="replace existing non-empty caption files")
    caption.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per generate call (4)")
    caption.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="caption length limit in tokens (default: 64 short, 320 structured or --prompt)",
    )
    caption.add_argument(
        "--caption-extension",
        default=".txt",
        metavar="EXT",
        help="caption file suffix; match data.caption_extension (default .txt)",
    )
    caption.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="model weights dtype (auto: bf16 on CUDA GPUs with bf16, else fp32)",
    )
    caption.add_argument("--no-progress", action="store_true", help="no progress bar")
    caption.set_defaults(handler=_cmd_caption)
    return caption
