"""OUTPUT_DIR/final/README.md: a Hugging Face model card for the exported LoRA or pipeline.

YAML front matter (base model, library, pipeline tag, tags, a license placeholder, the trigger words as
`instance_prompt`) and a body with the trigger words, how to load the result, the training settings and the
last validation grid (copied next to the card). Everything arrives as plain values: this module never names a
model family.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

TRIGGER_SHARE = 0.8
"""A word is a trigger word when at least this share of the training captions contains it."""

TRIGGER_LIMIT = 8
"""At most this many trigger words (the earliest in the captions)."""

LICENSE_NAME = "base-model-license"
"""`license_name` of the `license: other` placeholder; the card's body asks to replace it."""

STOP_WORDS = frozenset(
    """a an the and or but nor of in on at to from by for with without into onto over under above below near
    is are was were be been being has have had do does did this that these those it its their his her there
    here as than then so very some any each every all both no not one two three very just also""".split()
)
"""English function words that are never trigger words."""

_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def derive_trigger_words(
    captions: Sequence[str], share: float = TRIGGER_SHARE, limit: int = TRIGGER_LIMIT
) -> list[str]:
    """Words that appear in at least `share` of the captions (case-insensitive, stop words, numbers and single
    characters left out), in the order they first appear; at most `limit`. Fewer than two captions say nothing
    about what they share: no trigger words."""
    if len(captions) < 2:
        return []
    counts: Counter[str] = Counter()
    first_seen: dict[str, tuple[int, int, str]] = {}
    for index, caption in enumerate(captions):
        words = [match.group(0) for match in _WORD.finditer(caption)]
        for position, word in enumerate(words):
            key = word.lower()
            if key not in first_seen:
                first_seen[key] = (index, position, word)
        counts.update({word.lower() for word in words})
    needed = share * len(captions)
    chosen = [
        key
        for key, count in counts.items()
        if count >= needed and key not in STOP_WORDS and len(key) > 1 and not key.isdigit()
    ]
    chosen.sort(key=lambda key: first_seen[key][:2])
    return [first_seen[key][2] for key in chosen[:limit]]


def hub_model_id(base_model: str | Path) -> str:
    """The Hub id of a model folder inside a Hugging Face cache (`.../models--org--name/snapshots/HASH`),
    else the path as given."""
    for part in reversed(Path(base_model).parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return str(base_model)


def write_model_card(
    final_dir: Path,
    *,
    base_model: str | Path,
    family: str,
    family_name: str,
    method: str,
    config: Mapping[str, Any] | Any,
    steps: int,
    trigger_words: Sequence[str] = (),
    validation_prompts: Sequence[str] = (),
    grid: Path | None = None,
    task: str = "text-to-image",
    processes: int = 1,
    precision: str | None = None,
    lora_targets: Sequence[str] | None = None,
    samples: int | None = None,
    version: str | None = None,
    controlnet_classes: tuple[str, str] | None = None,
) -> Path:
    """Write FINAL_DIR/README.md (atomically) and copy `grid` next to it as `validation<suffix>`.

    `family` is the `model.family` value (a tag), `family_name` its display name; `config` is the resolved
    config as a dict or the pydantic object; `task` the Hub pipeline tag ("text-to-image", "text-to-video",
    "image-to-video"); `precision` the resolved compute precision; `lora_targets` the resolved LoRA targets
    (default: the config's); `controlnet_classes` the (ControlNet, pipeline) diffusers class names of a
    ControlNet run.
    """
    if method not in ("lora", "full", "controlnet"):
        raise ValueError(f"method must be 'lora', 'full' or 'controlnet', got {method!r}")
    if method == "controlnet" and controlnet_classes is None:
        raise ValueError("a ControlNet card needs controlnet_classes (the ControlNet and pipeline class names)")
    settings = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    model_id = hub_model_id(base_model)
    image_name = None
    if grid is not None and Path(grid).is_file():
        image_name = f"validation{Path(grid).suffix.lower()}"
        _copy_atomic(Path(grid), final_dir / image_name)
    front = _front_matter(model_id, family, method, task, trigger_words)
    noun = {"lora": "LoRA", "full": "fine-tune", "controlnet": "ControlNet"}[method]
    title = f"{final_dir.parent.name or 'dittune'}: {family_name} {noun}"
    kind = {
        "lora": f"a LoRA (rank {settings['lora']['rank']})",
        "full": "a full fine-tune",
        "controlnet": "a ControlNet (in `controlnet/`)",
    }[method]
    trained_on = f" on {samples} captioned {'clips or images' if 'video' in task else 'images'}" if samples else ""
    base_text = f"`{model_id}`" + (f" ({family_name} {version})" if version else f" ({family_name})")
    sections = [
        f"# {title}",
        f"This is {kind} of {base_text}, trained with dittune for {steps} steps{trained_on}.",
        "The `license` above is a placeholder (`other`): set it to the base model's license before publishing.",
        _trigger_section(trigger_words),
        _controlnet_usage(model_id, controlnet_classes, _example_prompt(validation_prompts, trigger_words))
        if controlnet_classes and method == "controlnet"
        else _usage_section(
            model_id, str(base_model), method, task, _example_prompt(validation_prompts, trigger_words)
        ),
        _settings_section(settings, method, steps, processes, precision, lora_targets),
        _validation_section(image_name, validation_prompts),
    ]
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n"
    text += "\n\n".join(section for section in sections if section) + "\n"
    path = final_dir / "README.md"
    _write_atomic(path, text.encode("utf-8"))
    return path


def _front_matter(model_id: str, family: str, method: str, task: str, trigger_words: Sequence[str]) -> dict[str, Any]:
    front: dict[str, Any] = {
        "base_model": model_id,
        "library_name": "diffusers",
        "license": "other",
        "license_name": LICENSE_NAME,
        "pipeline_tag": task,
    }
    if trigger_words:
        front["instance_prompt"] = " ".join(trigger_words)
    tags = [method] if method in ("lora", "controlnet") else []
    front["tags"] = [*tags, task, "diffusers", "dittune", family]
    return front


def _trigger_section(trigger_words: Sequence[str]) -> str:
    share = f"{TRIGGER_SHARE:.0%}"
    if not trigger_words:
        return (
            "## Trigger words\n\n"
            f"None: no word (other than stop words) appears in {share} of the training captions. "
            "Prompt with the vocabulary of the captions."
        )
    words = ", ".join(f"`{word}`" for word in trigger_words)
    return (
        "## Trigger words\n\n"
        f"{words}\n\n"
        f"Derived from the data: the words in at least {share} of the training captions (stop words left out). "
        "Put them in prompts to call up what was trained."
    )


def _example_prompt(validation_prompts: Sequence[str], trigger_words: Sequence[str]) -> str:
    if validation_prompts:
        return validation_prompts[0]
    return " ".join(trigger_words) or "a photo"


def _controlnet_usage(model_id: str, classes: tuple[str, str], prompt: str) -> str:
    """Python: the ControlNet from this folder's `controlnet/` with the base model's stock ControlNet pipeline."""
    controlnet, pipeline = classes
    lines = [
        "import torch",
        f"from diffusers import {controlnet}, {pipeline}",
        "from diffusers.utils import load_image",
        "",
        f'controlnet = {controlnet}.from_pretrained("controlnet", torch_dtype=torch.bfloat16)',
        f"pipeline = {pipeline}.from_pretrained(",
        f"    {json.dumps(model_id, ensure_ascii=False)}, controlnet=controlnet, torch_dtype=torch.bfloat16",
        ').to("cuda")',
        'control = load_image("control.png")  # the conditioning image (e.g. an edge or depth map)',
        f"image = pipeline({json.dumps(prompt, ensure_ascii=False)}, control_image=control).images[0]",
        'image.save("sample.png")',
    ]
    code = "\n".join(lines)
    return f"## How to use\n\nFrom this folder, with diffusers:\n\n```python\n{code}\n```"


def _usage_section(model_id: str, base_folder: str, method: str, task: str, prompt: str) -> str:
    """Python (diffusers loads `model_id`, a Hub id or a folder) and `dittune sample` (a local folder)."""
    video = "video" in task
    text = json.dumps(prompt, ensure_ascii=False)
    source = json.dumps(model_id, ensure_ascii=False) if method == "lora" else '"."  # this folder'
    lines = ["import torch", "from diffusers import DiffusionPipeline"]
    if video:
        lines.append("from diffusers.utils import export_to_video")
    if method == "lora":
        lines += ["", "import dittune"]
    lines += ["", f'pipeline = DiffusionPipeline.from_pretrained({source}, torch_dtype=torch.bfloat16).to("cuda")']
    if method == "lora":
        lines.append('dittune.load_lora(pipeline, "lora.safetensors")')
    if video:
        lines += [f"frames = pipeline({text}).frames[0]", 'export_to_video(frames, "sample.mp4")']
    else:
        lines += [f"image = pipeline({text}).images[0]", 'image.save("sample.png")']
    out = "sample.mp4" if video else "sample.png"
    model = f"{shlex.quote(base_folder)} --lora lora.safetensors" if method == "lora" else "."
    command = f"dittune sample --model {model} --prompt {shlex.quote(prompt)} --out {out}"
    code = "\n".join(lines)
    return (
        "## How to use\n\n"
        "From this folder, with diffusers"
        + (" and dittune (`dittune.load_lora` applies the LoRA file):" if method == "lora" else ":")
        + f"\n\n```python\n{code}\n```\n\nor the command line (add `--low-vram` on a small GPU):"
        + f"\n\n```bash\n{command}\n```"
    )


def _settings_section(
    settings: Mapping[str, Any],
    method: str,
    steps: int,
    processes: int,
    precision: str | None,
    lora_targets: Sequence[str] | None,
) -> str:
    train, data = settings["train"], settings["data"]
    rows: list[tuple[str, str]] = [("method", method)]
    if method == "lora":
        lora = settings["lora"]
        alpha = lora.get("alpha") if lora.get("alpha") is not None else lora["rank"]
        targets = lora_targets if lora_targets is not None else lora.get("targets")
        rows += [
            ("LoRA rank / alpha", f"{lora['rank']} / {alpha:g}"),
            ("LoRA targets", ", ".join(f"`{t}`" for t in targets) if targets else "the family's default"),
        ]
    accumulation = train.get("gradient_accumulation_steps", 1)
    global_batch = train["batch_size"] * accumulation * processes
    unit = "px (short edge)" if data.get("resolution_type") == "pixel" else "MP (area)"
    rows += [
        ("steps", str(steps)),
        (
            "global batch",
            f"{global_batch} ({train['batch_size']} × {accumulation} accumulation × {processes} process(es))",
        ),
        ("learning rate", f"{train['learning_rate']:g} ({train.get('lr_scheduler', '?')})"),
        ("optimizer", str(train["optimizer"])),
        ("precision", precision or str(train.get("mixed_precision"))),
        ("resolution", f"{data['resolution']:g} {unit}"),
    ]
    if data.get("frames"):
        rows.append(("frames", str(data["frames"])))
    rows.append(("seed", str(train["seed"])))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Training settings\n\n| setting | value |\n| --- | --- |\n{table}"


def _validation_section(image_name: str | None, prompts: Sequence[str]) -> str:
    if image_name is None:
        return ""
    listed = "\n".join(f"- `{index:02d}` {prompt}" for index, prompt in enumerate(prompts))
    return (
        "## Validation\n\nThe run's last validation grid, one tile per prompt:\n\n"
        + (f"{listed}\n\n" if listed else "")
        + f"![validation grid]({image_name})"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _copy_atomic(source: Path, target: Path) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
