"""`dittune export RUN --to single-file|official`: a full fine-tune's denoiser as one checkpoint file."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_export(args: argparse.Namespace) -> int:
    from dittune.export.single_file import export_denoiser

    out = export_denoiser(Path(args.run), args.to, Path(args.out) if args.out else None, args.component)
    print(f"wrote {out} ({args.to})")
    return 0


def add_export_parser(commands: argparse._SubParsersAction) -> None:
    """Register `dittune export`."""
    export = commands.add_parser(
        "export",
        help="write a full fine-tune's denoiser as one file (original layout .safetensors, or official .pt)",
    )
    export.add_argument("run", metavar="RUN", help="output folder of a full fine-tune (or any diffusers folder)")
    export.add_argument(
        "--to",
        required=True,
        choices=("single-file", "official"),
        help="single-file: .safetensors in the family's original layout (ComfyUI, from_single_file); "
        "official: the same as a .pt state dict",
    )
    export.add_argument("--out", default=None, metavar="FILE", help="default: RUN/export/<component>-<layout>.<ext>")
    export.add_argument("--component", default=None, metavar="NAME", help="denoiser component (default: the family's)")
    export.set_defaults(handler=_cmd_export)
