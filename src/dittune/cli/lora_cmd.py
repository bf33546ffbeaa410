"""`dittune lora convert` and `dittune lora inspect`: LoRAs between dittune, kohya, ComfyUI and official formats."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMAT_CHOICES = ("diffusers", "kohya", "comfyui", "official")


def _cmd_convert(args: argparse.Namespace) -> int:
    from dittune.export.lora_convert import convert_lora, describe_lora

    out, lora = convert_lora(Path(args.source), Path(args.out), args.to, family=args.family)
    print(f"wrote {out}: {args.to} LoRA ({lora.family}, from {lora.format}, {len(lora.modules)} modules)")
    if args.verbose:
        print(describe_lora(out, family=lora.family))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from dittune.export.lora_convert import describe_lora

    print(describe_lora(Path(args.file), family=args.family))
    return 0


def add_lora_parser(commands: argparse._SubParsersAction) -> None:
    """Register `dittune lora convert|inspect`."""
    lora = commands.add_parser("lora", help="convert or inspect LoRA files (diffusers, kohya, ComfyUI, official)")
    actions = lora.add_subparsers(dest="lora_command", metavar="ACTION", required=True)
    convert = actions.add_parser(
        "convert",
        help="write a LoRA in another format",
        description="Convert a LoRA between formats. The input's format is detected from its keys; its family "
        "from dittune's metadata or its module names (else pass --family). Fused projections (q/k/v) are "
        "fused and split exactly: A stacked, B block-diagonal, alpha scaled with the rank.",
    )
    convert.add_argument("source", metavar="IN", help="LoRA .safetensors file or PEFT folder")
    convert.add_argument("out", metavar="OUT", help="output .safetensors file (a folder for --to official)")
    convert.add_argument("--to", required=True, choices=FORMAT_CHOICES, help="output format")
    convert.add_argument("--family", default=None, metavar="NAME", help="model family (default: detected)")
    convert.add_argument("--verbose", action="store_true", help="print the written file's key map")
    convert.set_defaults(handler=_cmd_convert)
    inspect = actions.add_parser("inspect", help="format, family, rank, alpha, targets and key map of a LoRA")
    inspect.add_argument("file", metavar="FILE", help="LoRA .safetensors file or PEFT folder")
    inspect.add_argument("--family", default=None, metavar="NAME", help="model family (default: detected)")
    inspect.set_defaults(handler=_cmd_inspect)
