"""`dittune caption`: write same-stem caption files with a local image-text-to-text model.

Any chat VLM that transformers loads through `AutoProcessor` + `AutoModelForImageTextToText` works
(Qwen2.5-VL, Qwen2-VL, LLaVA, Idefics3/SmolVLM, Gemma 3 ...). A "structured" caption in the style of
HunyuanDiT's captioner is a prompt, not a different model. Images are found as the data layer's folder
scan finds them; a clip is captioned from its middle frame. Images with a non-empty caption file are left
alone unless `overwrite`; an unreadable image is reported and the rest go on.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from dittune.data.discover import IMAGE_EXTENSIONS, METADATA_CSV, METADATA_JSONL, check_image
from dittune.data.video import VIDEO_EXTENSIONS

PROMPT_STYLES = ("short", "structured")
LANGUAGES = ("en", "zh", "both")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")

PROMPTS: dict[tuple[str, str], str] = {
    ("short", "en"): "Describe this image in one sentence, in English. Write only the caption.",
    ("short", "zh"): "用一句中文描述这张图片。只输出描述本身。",
    ("structured", "en"): (
        "Write a caption for this image as one English paragraph, covering in order: the main subject; "
        "its appearance (colours, shapes, materials, clothing); what it is doing; the setting and background; "
        "the style, lighting and colour tone; and the composition (shot size, viewpoint, where things are "
        "in the frame). Describe only what is visible. Write only the caption."
    ),
    ("structured", "zh"): (
        "请用一段中文为这张图片写一段描述，依次包括：主体是什么；主体的外观（颜色、形状、材质、服饰）；"
        "主体在做什么；场景与背景；风格、光线与色调；构图（景别、视角、各元素在画面中的位置）。"
        "只描述画面中可见的内容，只输出描述本身。"
    ),
}
"""The prompt of each (style, language); `--language both` asks twice, English first."""

DEFAULT_MAX_NEW_TOKENS = {"short": 64, "structured": 320, "custom": 320}
_REASONS_SHOWN = 20


@dataclass
class CaptionReport:
    """What a captioning run did: files written, media skipped (already captioned), media that failed."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def caption_prompts(style: str = "short", language: str = "en", prompt: str | None = None) -> list[str]:
    """The prompts each image is captioned with: one, or English then Chinese for `language="both"`."""
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty; give the instruction text, or leave --prompt out")
        return [prompt.strip()]
    if style not in PROMPT_STYLES:
        raise ValueError(f"--prompt-style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if language not in LANGUAGES:
        raise ValueError(f"--language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    languages = ("en", "zh") if language == "both" else (language,)
    return [PROMPTS[style, lang] for lang in languages]


def find_media(root: Path) -> list[Path]:
    """Images and clips under `root`, recursively and sorted, skipping names that start with "."."""
    suffixes = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    ]


def has_caption(caption_path: Path) -> bool:
    """Whether a caption file exists with something other than whitespace in it."""
    try:
        return bool(caption_path.read_bytes().strip())
    except (FileNotFoundError, IsADirectoryError):
        return False


def load_picture(path: Path) -> Image.Image | str:
    """The RGB image (EXIF rotation applied) or, for a clip, its middle frame; or a reason it cannot be read."""
    if path.suffix.lower() in VIDEO_EXTENSIONS and path.suffix.lower() not in IMAGE_EXTENSIONS:
        return _middle_frame(path)
    checked = check_image(path)
    if isinstance(checked, str):
        return checked
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        return f"image is truncated or corrupt ({error})"


def _middle_frame(path: Path) -> Image.Image | str:
    from dittune.data.transforms import ImageLoadError
    from dittune.data.video import VideoSupportMissing, decode_frames, probe_video, select_frames

    try:
        info = probe_video(path)
        if isinstance(info, str):
            return info
        (index,), _ = select_frames(info, 1, None, "middle")
        return decode_frames(path, (index,))[0]
    except VideoSupportMissing as error:
        return str(error)
    except ImageLoadError as error:
        return str(error.args[0]) if error.args else "video does not decode"


def write_caption(path: Path, text: str) -> None:
    """Write `text` (and a final newline) to `path` atomically: a hidden temporary file, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_dtype(dtype: str, device_type: str) -> Any:
    """The torch dtype for `dtype` ("auto": bf16 on CUDA GPUs that compute it, else fp32)."""
    import torch

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype == "auto":
        cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype == "fp16" and device_type != "cuda":
        raise ValueError('--dtype fp16 needs a CUDA GPU; use "auto" or "fp32" on the CPU')
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def check_model_dir(model_dir: Path) -> Path:
    """`model_dir`, once it is a folder with a config.json (else FileNotFoundError naming the fix)."""
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"--model {model_dir}: no such folder. Download a VLM first, e.g. "
            f"`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {model_dir}`"
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json; point --model at a transformers model folder")
    return model_dir


def load_vlm(model_dir: Path, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """`(processor, model)` from a local folder, the model in eval mode on `device` (default: cuda if any)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = check_model_dir(Path(model_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, torch.device(device).type)
    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
    except ImportError as error:  # e.g. the Qwen-VL processors' video part needs torchvision
        raise ValueError(f"--model {model_dir}: its processor or model needs a missing package: {error}") from error
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(
            f"--model {model_dir}: cannot load it as an image-text-to-text model "
            f"(AutoProcessor + AutoModelForImageTextToText): {str(error).strip().splitlines()[0]}"
        ) from error
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"--model {model_dir}: its processor has no chat template; use an instruction-tuned (chat) VLM "
            "such as Qwen2.5-VL-7B-Instruct"
        )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor, model.to(device).eval()


def generate_captions(
    processor: Any, model: Any, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy captions, one per (image, prompt) pair, generated as one left-padded batch.

    Only the new tokens are decoded; each text is stripped and its whitespace runs (newlines too) become
    single spaces, so one caption is one line.
    """
    import torch

    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        for image, prompt in zip(images, prompts, strict=True)
    ]
    inputs = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(model.device)
    floating = {k: v.to(model.dtype) for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}
    inputs.update(floating)
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
    config.max_new_tokens = max_new_tokens
    if config.pad_token_id is None:
        config.pad_token_id = processor.tokenizer.pad_token_id
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config)
    if not model.config.is_encoder_decoder:
        output = output[:, inputs["input_ids"].shape[1] :]
    texts = processor.batch_decode(output, skip_special_tokens=True)
    return [" ".join(text.split()) for text in texts]


def caption_folder(
    data_dir: Path,
    model_dir: Path,
    *,
    prompt_style: str = "short",
    language: str = "en",
    prompt: str | None = None,
    trigger: str | None = None,
    overwrite: bool = False,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    caption_extension: str = ".txt",
    dtype: str = "auto",
    progress: bool = True,
) -> CaptionReport:
    """Caption every image and clip under `data_dir` that has no caption file yet (all with `overwrite`).

    A caption is the model's answer to each prompt of `caption_prompts` (for `language="both"`, English
    then Chinese on two lines), prefixed with "`trigger`, " when given.
    """
    from tqdm import tqdm

    data_dir, extension = Path(data_dir), _caption_extension(caption_extension)
    prompts = caption_prompts(prompt_style, language, prompt)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS["custom" if prompt is not None else prompt_style]
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"DATA_DIR {data_dir}: no such folder")
    check_model_dir(Path(model_dir))
    for name in (METADATA_JSONL, METADATA_CSV):
        if (data_dir / name).is_file():
            raise ValueError(
                f"{data_dir / name}: this folder's captions come from {name}, so {extension} files would be "
                f"ignored in training; caption a folder without {name}, or fill its text column instead"
            )
    media = find_media(data_dir)
    if not media:
        raise FileNotFoundError(
            f"DATA_DIR {data_dir}: no images or clips found (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))})"
        )
    report = CaptionReport()
    todo: list[Path] = []
    owners: dict[Path, Path] = {}
    for path in media:
        caption_path = path.with_suffix(extension)
        if caption_path in owners:
            report.failed.append((path, f"{owners[caption_path].name} has the same caption file {caption_path.name}"))
        elif not overwrite and has_caption(caption_path):
            report.skipped.append(path)
        else:
            todo.append(path)
        owners.setdefault(caption_path, path)
    if not todo:
        return report
    processor, model = load_vlm(Path(model_dir), dtype)
    with tqdm(total=len(todo), unit="image", desc="captioning", disable=not progress) as bar:
        for batch in _batches(todo, batch_size):
            loaded: list[tuple[Path, Image.Image]] = []
            for path in batch:
                picture = load_picture(path)
                if isinstance(picture, str):
                    report.failed.append((path, picture))
                else:
                    loaded.append((path, picture))
            if loaded:
                _caption_batch(processor, model, loaded, prompts, max_new_tokens, trigger, extension, report)
            bar.update(len(batch))
    return report


def _caption_batch(
    processor: Any,
    model: Any,
    loaded: list[tuple[Path, Image.Image]],
    prompts: list[str],
    max_new_tokens: int,
    trigger: str | None,
    extension: str,
    report: CaptionReport,
) -> None:
    images = [image for _, image in loaded]
    answers = [generate_captions(processor, model, images, [p] * len(images), max_new_tokens) for p in prompts]
    for index, (path, _) in enumerate(loaded):
        parts = [answer[index] for answer in answers]
        if not all(parts):
            report.failed.append((path, "the model generated no text (try another --prompt or model)"))
            continue
        text = "\n".join(parts)
        if trigger and trigger.strip():
            text = f"{trigger.strip()}, {text}"
        caption_path = path.with_suffix(extension)
        try:
            write_caption(caption_path, text)
        except OSError as error:
            report.failed.append((path, f"cannot write {caption_path.name} ({error})"))
            continue
        report.written.append(caption_path)


def format_report(report: CaptionReport, root: Path, overwrite: bool = False) -> str:
    """A readable summary: counts, then each failure with its reason."""

    def rel(path: Path) -> str:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return str(path)

    hint = "" if overwrite or not report.skipped else " (--overwrite to redo them)"
    lines = [
        f"captions written: {len(report.written)}",
        f"skipped, already captioned: {len(report.skipped)}{hint}",
        f"failed: {len(report.failed)}",
    ]
    for path, reason in report.failed[:_REASONS_SHOWN]:
        lines.append(f"  {rel(path)}: {reason}")
    if len(report.failed) > _REASONS_SHOWN:
        lines.append(f"  ... and {len(report.failed) - _REASONS_SHOWN} more")
    return "\n".join(lines)


def _caption_extension(extension: str) -> str:
    extension = extension.strip()
    if not extension or extension == ".":
        raise ValueError('--caption-extension must not be empty (e.g. ".txt")')
    extension = extension if extension.startswith(".") else "." + extension
    if extension.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
        raise ValueError(f"--caption-extension {extension} is an image or video suffix; use a text one such as .txt")
    return extension


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
