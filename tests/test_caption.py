"""`dittune caption` with a tiny random LLaVA built offline (see dittune.models.tiny_vlm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import make_dataset
from dittune.caption import PROMPTS, generate_captions, load_picture, load_vlm
from dittune.cli.main import main
from dittune.models.tiny_vlm import build_tiny_vlm

TOKENS = "5"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava")


@pytest.fixture(scope="module")
def loaded(vlm: Path) -> tuple[object, object]:
    return load_vlm(vlm, dtype="fp32", device="cpu")


def _uncaptioned(root: Path, colours: tuple[str, ...] = ("red", "blue", "green")) -> Path:
    make_dataset(root, sizes=((40, 32),), colours=colours)
    for caption in root.glob("*.txt"):
        caption.unlink()
    return root


def _caption(data: Path, vlm: Path, *options: str) -> int:
    return main(["caption", str(data), "--model", str(vlm), "--max-new-tokens", TOKENS, "--no-progress", *options])


def _direct(vlm: Path, image_path: Path, prompt: str) -> str:
    """The caption straight from transformers: one image, chat template, greedy `generate`, new tokens only."""
    processor = AutoProcessor.from_pretrained(vlm)
    model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.float32).eval()
    image = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = model.generate(**inputs, max_new_tokens=int(TOKENS), do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _write_clip(path: Path, frames: list[Image.Image]) -> Path:
    """An MPEG-4 Part 2 clip at 8 fps (libx264 takes seconds to start; this encoder does not)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_tiny_vlm_folder_is_small_and_loads_through_the_auto_classes(vlm: Path) -> None:
    assert sum(f.stat().st_size for f in vlm.iterdir()) < 5 * 2**20
    assert type(AutoModelForImageTextToText.from_pretrained(vlm)).__name__ == "LlavaForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(vlm)).__name__ == "LlavaProcessor"


def test_captions_every_image_like_direct_generate_at_any_batch_size(
    tmp_path: Path, vlm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _uncaptioned(tmp_path / "data")
    (data / "sub").mkdir()
    Image.new("RGB", (40, 32), (200, 200, 200)).save(data / "sub" / "grey.png")
    images = sorted(data.rglob("*.png"))
    assert _caption(data, vlm, "--batch-size", "3") == 0
    assert "captions written: 4" in capsys.readouterr().out
    batched = {path: path.with_suffix(".txt").read_text(encoding="utf-8") for path in images}
    for path, text in batched.items():
        assert text.endswith("\n") and text.strip()
        assert text.strip() == _direct(vlm, path, PROMPTS["short", "en"])
    assert len(set(batched.values())) > 1, "the image must change the caption"

    assert _caption(data, vlm, "--batch-size", "1", "--overwrite") == 0
    assert {path: path.with_suffix(".txt").read_text(encoding="utf-8") for path in images} == batched
    assert not [p for p in data.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_left_padding_gives_each_prompt_its_own_answer(loaded: tuple[object, object]) -> None:
    processor, model = loaded
    images = [Image.new("RGB", (32, 32), colour) for colour in ((250, 10, 10), (10, 10, 250))]
    prompts = ["Describe.", PROMPTS["structured", "en"]]
    lengths = {len(processor.tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) == 2, "the prompts must differ in length for the batch to need padding"
    together = generate_captions(processor, model, images, prompts, max_new_tokens=4)
    alone = [generate_captions(processor, model, [i], [p], max_new_tokens=4)[0] for i, p in zip(images, prompts)]
    assert together == alone
    assert all(together)


def test_existing_captions_are_kept_unless_overwrite(
    tmp_path: Path, vlm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _uncaptioned(tmp_path / "data")
    (data / "red_0.txt").write_text("my own caption\n", encoding="utf-8")
    (data / "blue_0.txt").write_text("  \n", encoding="utf-8")  # blank: counts as no caption
    assert _caption(data, vlm) == 0
    assert (data / "red_0.txt").read_text(encoding="utf-8") == "my own caption\n"
    assert (data / "blue_0.txt").read_text(encoding="utf-8").strip()
    out = capsys.readouterr().out
    assert "captions written: 2" in out and "skipped, already captioned: 1 (--overwrite" in out

    assert _caption(data, vlm, "--overwrite", "--language", "both", "--trigger", "ohwx") == 0
    english, chinese = (data / "red_0.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert english.startswith("ohwx, ") and english != "ohwx, my own caption"
    assert chinese == _direct(vlm, data / "red_0.png", PROMPTS["short", "zh"])
    assert english.removeprefix("ohwx, ") == _direct(vlm, data / "red_0.png", PROMPTS["short", "en"])


def test_unreadable_image_is_reported_and_the_rest_captioned(
    tmp_path: Path, vlm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _uncaptioned(tmp_path / "data", colours=("red", "blue"))
    (data / "broken.png").write_bytes(b"not a png")
    assert _caption(data, vlm, "--batch-size", "2") == 1
    err = capsys.readouterr().err
    assert "failed: 1" in err and "broken.png: cannot identify image file" in err
    assert "captions written: 2" in err
    assert not (data / "broken.txt").exists()
    assert (data / "red_0.txt").read_text(encoding="utf-8").strip()
    assert (data / "blue_0.txt").read_text(encoding="utf-8").strip()


def test_clip_is_captioned_from_its_middle_frame(tmp_path: Path, vlm: Path, loaded: tuple[object, object]) -> None:
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    clip = _write_clip(tmp_path / "data" / "clip.mp4", [Image.new("RGB", (32, 32), c) for c in colours])
    middle = load_picture(clip)
    assert isinstance(middle, Image.Image)
    assert max(abs(a - b) for a, b in zip(middle.getpixel((16, 16)), colours[1])) < 24
    assert _caption(clip.parent, vlm) == 0
    processor, model = loaded
    expected = generate_captions(processor, model, [middle], [PROMPTS["short", "en"]], int(TOKENS))[0]
    assert (tmp_path / "data" / "clip.txt").read_text(encoding="utf-8") == expected + "\n"


def test_user_mistakes_exit_2_with_a_clear_message(
    tmp_path: Path, vlm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _uncaptioned(tmp_path / "data", colours=("red",))
    missing = tmp_path / "no-such-model"
    assert _caption(data, missing) == 2
    assert f"error: --model {missing}: no such folder" in capsys.readouterr().err

    assert _caption(data, vlm, "--prompt", "Say hi", "--language", "zh") == 2
    assert "--prompt replaces the built-in prompts" in capsys.readouterr().err

    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "red_0.png", "text": "x"}) + "\n")
    assert _caption(data, vlm) == 2
    assert "metadata.jsonl" in capsys.readouterr().err
    assert not (data / "red_0.txt").exists()
