"""The `dittune` command line.

Heavy libraries (torch, diffusers) are imported inside the command handlers only, so `dittune config
check` and `dittune --version` start fast. Mistakes a user can make (bad config, missing file, bad
value) are printed as `error: ...` with exit status 2; set DITTUNE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

from safetensors import SafetensorError

from dittune.cli.caption_cmd import add_caption_parser
from dittune.cli.export_cmd import add_export_parser
from dittune.cli.lora_cmd import add_lora_parser
from dittune.cli.prepare_cmd import add_prepare_parser
from dittune.config import ConfigError, DittuneConfig, load_config
from dittune.errors import RunStopped
from dittune.models.registry import tiny_builder, tiny_families

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

TINY_BUILDERS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(tiny_families())
"""family → tiny-model variants (default first), from the model registry."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dittune")
    except PackageNotFoundError:
        return "unknown"


def _load(args: argparse.Namespace) -> DittuneConfig:
    return load_config(Path(args.config), args.set)


# --- handlers ---------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dittune.train.runner import run_train

    run_train(cfg, resume=args.resume, overwrite=args.overwrite)
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dittune.train.runner import run_cache

    run_cache(cfg)
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    from dittune.sample import run_sample

    run_sample(
        model=Path(args.model),
        lora=Path(args.lora) if args.lora is not None else None,
        lora_scale=args.lora_scale,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        out=Path(args.out),
        family=args.family,
        precision=args.precision,
        frames=args.frames,
        fps=args.fps,
        image=Path(args.image) if args.image is not None else None,
        low_vram=args.low_vram,
    )
    return EXIT_OK


def _cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dittune.cli.check_cmd import data_report, json_problems, weight_problems

    unreadable = json_problems(cfg)
    problems: list[Any] = unreadable + weight_problems(cfg)
    try:
        from dittune.train.preflight import preflight
    except ImportError:
        pass
    else:
        if not unreadable:  # preflight reads the model's JSON files
            problems += preflight(cfg)
    report, data_problems = data_report(cfg, model_readable=not unreadable)
    problems += data_problems
    if problems:
        if report:
            print(report)
        print(f"error: {args.config}: {len(problems)} problem(s):", file=sys.stderr)
        for path, message in problems:
            print(f"  {path}: {message}" if path else f"  {message}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"config OK: {args.config}")
    print(f"  family={cfg.model.family} method={cfg.train.method} max_steps={cfg.train.max_steps}")
    if cfg.train.mixed_precision == "auto":
        from dittune.precision import cpu_bf16

        cpu = cpu_bf16()
        here = "bf16" if cpu.native else "fp32"
        print(f"  precision auto: bf16 on GPUs with bf16; on this CPU {here} ({cpu.detail})")
    clips = _clip_line(cfg)
    if clips:
        print(clips)
    if report:
        print(report)
    return EXIT_OK


def _clip_line(cfg: DittuneConfig) -> str:
    """ "  clips: 49 frames (4k+1) at the source rate, from the start", for a video family's folder; else ""."""
    from dittune.models.registry import facts_class

    facts = facts_class(cfg.model.family)
    if not (cfg.model.folder / "model_index.json").is_file():
        return ""
    rule = facts.frame_rule_at(cfg.model.folder)
    if not rule.is_video:
        return ""
    asked = cfg.data.frames or facts.default_frames_at(cfg.model.folder)
    frames = rule.snap_down(asked)
    snapped = f" (data.frames {asked} snapped down)" if frames != asked else ""
    rate = f"{cfg.data.fps:g} fps" if cfg.data.fps else "each clip's own rate"
    return f"  clips: {frames} frames{snapped}, {rule} rule, at {rate}, sampling {cfg.data.frame_sampling!r}"


def _cmd_estimate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from dittune.train.estimate import EstimateConfigError, estimate
    from dittune.train.estimate_report import estimate_json, format_estimate

    try:
        result = estimate(cfg, device=args.device)
    except EstimateConfigError as error:
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.json:
        import json

        print(json.dumps(estimate_json(result), indent=2))
    else:
        print(format_estimate(result, args.config))
    return EXIT_OK


def _cmd_config_show(args: argparse.Namespace) -> int:
    from dittune.config import resolved_toml

    print(resolved_toml(_load(args)), end="")
    return EXIT_OK


def _cmd_config_docs(args: argparse.Namespace) -> int:
    from dittune.config import config_reference_markdown

    print(config_reference_markdown(), end="")
    return EXIT_OK


def _cmd_tiny(args: argparse.Namespace) -> int:
    variants = TINY_BUILDERS[args.family]
    variant = args.variant or variants[0]
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} for {args.family}; choose one of {', '.join(variants)}")
    print(tiny_builder(args.family)(Path(args.out_dir), variant=variant, seed=args.seed))
    return EXIT_OK


# --- parser -----------------------------------------------------------------------------------


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.toml", help="run config (see `dittune config docs`)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=100 (repeatable; value read as TOML)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every `dittune` command."""
    parser = argparse.ArgumentParser(prog="dittune", description="Fine-tune diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"dittune {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train (LoRA or full) from a config")
    _add_config_args(train)
    train.add_argument("--resume", metavar="latest|PATH", help="resume from the newest or a given checkpoint")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start anew in an output_dir that holds another run: remove its checkpoints, final/, validation/, "
        "metrics and logs first (the cache is kept)",
    )
    train.set_defaults(handler=_cmd_train)

    cache = commands.add_parser("cache", help="encode text embeddings and VAE latents ahead of training")
    _add_config_args(cache)
    cache.set_defaults(handler=_cmd_cache)

    sample = commands.add_parser("sample", help="generate one image or clip from a model folder (and a LoRA)")
    sample.add_argument("--model", required=True, metavar="DIR", help="model folder in diffusers layout")
    sample.add_argument(
        "--lora", metavar="FILE", help="LoRA to apply: dittune/diffusers, kohya, ComfyUI or official (PEFT folder)"
    )
    sample.add_argument("--lora-scale", type=float, default=1.0, metavar="F", help="LoRA strength (default 1)")
    sample.add_argument("--prompt", required=True, metavar="TEXT")
    sample.add_argument("--negative-prompt", default="", metavar="TEXT")
    sample.add_argument("--seed", type=int, default=0, metavar="N")
    sample.add_argument("--steps", type=int, default=30, metavar="N")
    sample.add_argument("--guidance", type=float, default=5.0, metavar="F")
    sample.add_argument("--width", type=int, default=None, metavar="W")
    sample.add_argument("--height", type=int, default=None, metavar="H")
    sample.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.png (an image; for a clip a lossless strip of all frames, frame 0 at the left), .mp4, .gif or .webp",
    )
    sample.add_argument("--frames", type=int, default=None, metavar="N", help="clip length (video families)")
    sample.add_argument("--fps", type=float, default=None, metavar="F", help="frame rate (video families)")
    sample.add_argument("--image", default=None, metavar="FILE", help="conditioning image (image-to-video)")
    sample.add_argument("--family", default=None, metavar="NAME", help="model family (default: detected)")
    sample.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="compute precision (auto: bf16 where the GPU or CPU computes it natively, else fp32)",
    )
    sample.add_argument(
        "--low-vram",
        action="store_true",
        help="encode the prompt, free the text encoders, then denoise and decode with VAE tiling (CUDA: model CPU "
        "offload, 8-bit T5 with bitsandbytes); prints the peak memory",
    )
    sample.set_defaults(handler=_cmd_sample)

    estimate = commands.add_parser(
        "estimate", help="peak memory of caching, a training step and validation, without loading weights"
    )
    _add_config_args(estimate)
    estimate.add_argument(
        "--device", default="cuda", choices=("cuda", "cpu"), help="the device the run will use (default: cuda)"
    )
    estimate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    estimate.set_defaults(handler=_cmd_estimate)

    config = commands.add_parser("config", help="check, show or document configs")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate a config and its paths")
    _add_config_args(check)
    check.set_defaults(handler=_cmd_config_check)
    show = config_commands.add_parser("show", help="print the fully resolved config as TOML")
    _add_config_args(show)
    show.set_defaults(handler=_cmd_config_show)
    docs = config_commands.add_parser("docs", help="print the config reference (Markdown)")
    docs.set_defaults(handler=_cmd_config_docs)

    tiny = commands.add_parser("tiny", help="write a tiny random model for tests and smoke runs")
    tiny.add_argument("family", choices=sorted(TINY_BUILDERS), help="model family")
    tiny.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) folder to write")
    variants = sorted({v for vs in TINY_BUILDERS.values() for v in vs})
    tiny.add_argument("--variant", default=None, help=f"family variant ({' | '.join(variants)}; default: latest)")
    tiny.add_argument("--seed", type=int, default=0, metavar="N")
    tiny.set_defaults(handler=_cmd_tiny)
    add_lora_parser(commands)
    add_export_parser(commands)
    add_prepare_parser(commands)
    add_caption_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `dittune` with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    # dittune reads local folders only: no network at run time (the hub libraries honour these)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return EXIT_OK if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = os.environ.get("DITTUNE_DEBUG", "") not in ("", "0")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        if debug:
            raise
        source = f" {args.config}" if getattr(args, "config", None) else ""
        print(f"error: invalid config{source}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except RunStopped as exc:
        if debug:
            raise
        print(f"stopped: {exc}", file=sys.stderr)
        return exc.exit_status
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        if debug:
            raise
        message = os_error_message(exc) if isinstance(exc, OSError) and exc.errno else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SafetensorError as exc:  # a weight file a loader could not read; its message names no file
        if debug:
            raise
        from dittune.cli.check_cmd import unreadable_weights_message

        print(f"error: {unreadable_weights_message(args, exc)}", file=sys.stderr)
        return EXIT_PROBLEMS
    except OSError as exc:  # a full disk, no permission, a file where a folder must be: the path and the fix
        if debug:
            raise
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_PROBLEMS


OS_ERROR_FIXES = {
    errno.ENOSPC: "the disk is full: free space (or point output_dir / cache.dir elsewhere) and resume",
    errno.EDQUOT: "the disk quota is exceeded: free space and resume",
    errno.EACCES: "no permission: choose a folder you can write, or fix its permissions",
    errno.EPERM: "not permitted: choose a folder you can write, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: move it away or choose another path",
    errno.EEXIST: "a file stands where a folder is needed (or the name is taken): move it away or choose another path",
}


def os_error_message(error: OSError) -> str:
    """One line naming what failed, the path(s) and the fix (a traceback only with DITTUNE_DEBUG=1)."""
    paths = " → ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    what = error.strerror or str(error)
    fix = OS_ERROR_FIXES.get(error.errno or -1, "")
    return f"{what}: {paths}" + (f"; {fix}" if fix else "") if paths else what + (f"; {fix}" if fix else "")


def run() -> None:
    """The `dittune` console script and `python -m dittune`: `main()`, then a quick exit.

    Everything a command writes is closed by the time `main` returns; what is left is Python tearing
    down the ~3,700 modules torch, diffusers and transformers import, which takes 2–3 s on two cores
    (measured in benchmarks/README.md). So: wait for non-daemon threads, run the atexit handlers, flush,
    and leave with `os._exit`. In-process callers (tests, notebooks) use `main` and are unaffected.
    """
    code = main()
    try:
        close_process_group()
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        import atexit
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # anything odd: fall back to the normal, slow exit
        raise SystemExit(code) from None
    os._exit(code)


def close_process_group() -> None:
    """End the process group of a multi-process run (torchrun / accelerate launch), if one was started."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
