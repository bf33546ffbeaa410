"""The bad-input table (issue 13): every input a user can get wrong, with the message and exit status dittune gives.

Each row builds one bad (or awkward but valid) input, runs the cheapest `dittune` command that reads it —
`config check` (no model load), `prepare` (the training pixel pipeline, no model), or `sample` (a tiny model) —
and checks the exit status, a fragment of the message, and that no traceback was printed. Rows for awkward
inputs that must *work* (an EXIF-rotated JPEG, 16-bit and palette PNGs, CMYK, a BOM caption) also check the
pixels or caption training would see.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tests.conftest import write_config
from torch import nn

from dittune.cli.main import main
from dittune.export.lora_file import LoraInfo, save_lora
from dittune.media import load_image
from dittune.models.lora import inject_lora, lora_state_dict
from dittune.models.registry import spec_class, tiny_builder

RED, BLUE = (220, 30, 30), (30, 30, 220)


class Inputs:
    """Shared tiny models and LoRA files, and a folder per case."""

    def __init__(self, root: Path, hunyuan: Path) -> None:
        self.root = root
        self.hunyuan = hunyuan
        self.pixart = tiny_builder("pixart-sigma")(root / "pixart", seed=0)
        self.lora = _make_lora(hunyuan, "hunyuan-dit", root / "hunyuan-lora.safetensors")
        self.pixart_lora = _make_lora(self.pixart, "pixart-sigma", root / "pixart-lora.safetensors")

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def data(self, case: str, good: int = 1) -> Path:
        """A data folder with `good` valid captioned images (bad inputs are added next to them)."""
        data = self.folder(case) / "data"
        data.mkdir(exist_ok=True)
        for index in range(good):
            _png(data / f"good{index}.png", RED)
            (data / f"good{index}.txt").write_text("a red square")
        return data

    def config(self, case: str, data: Path | None = None, extra: str = "", model: Path | None = None, **kw) -> Path:
        data = data if data is not None else self.data(case)
        path = self.folder(case) / "config.toml"
        return write_config(path, model or self.hunyuan, data, self.folder(case) / "out", extra, **kw)

    def check(self, case: str, data: Path | None = None, **kw) -> list[str]:
        return ["config", "check", str(self.config(case, data, **kw))]

    def prepare(self, case: str, data: Path) -> list[str]:
        return ["prepare", str(data), str(self.folder(case) / "prepared"), "--resolution", "64"]

    def sample(self, case: str, model: Path | None = None, *extra: str) -> list[str]:
        out = self.folder(case) / "out.png"
        args = ["sample", "--model", str(model or self.hunyuan), "--prompt", "a red square", "--out", str(out)]
        return [*args, "--steps", "1", "--width", "32", "--height", "32", "--precision", "fp32", *extra]


def _make_lora(model: Path, family: str, path: Path, rank: int = 2) -> Path:
    """A LoRA on the attention projections of `model`'s denoiser, with random A and B, as dittune writes it."""
    spec = spec_class(family)(model)
    denoiser = spec.load_denoiser(torch.float32)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)})
    targets = [t for t in targets if t in ("to_q", "to_k", "to_v")]
    inject_lora(denoiser, rank=rank, alpha=float(rank), targets=targets)
    state = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
        for k, v in lora_state_dict(denoiser).items()
    }
    info = LoraInfo(family=family, component=spec.denoiser_component, rank=rank, alpha=float(rank), targets=targets)
    return save_lora(path, state, info)


# --------------------------------------------------------------------------------------------- file builders


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def _captioned(data: Path, name: str, caption: str | bytes = "a thing") -> Path:
    path = data / (Path(name).stem + ".txt")
    path.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return data / name


def _exif_rotated_jpeg(path: Path) -> Path:
    """An upright 64×96 image (red top half, blue bottom half) stored lying on its side with EXIF orientation 6
    ("rotate 90° clockwise to display")."""
    upright = Image.new("RGB", (64, 96), BLUE)
    upright.paste(Image.new("RGB", (64, 48), RED), (0, 0))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: displaying rotates it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif.tobytes())
    return path


def _huge_png(path: Path, side: int = 100_000) -> Path:
    """A valid-looking PNG whose header claims `side`×`side` pixels (30 GB as RGB); a few bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _truncated(source: Path, path: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _linked_copy(model: Path, dest: Path, skip: tuple[str, ...] = (), truncate: str | None = None) -> Path:
    """A model folder of symlinks to `model`'s parts, without `skip`, and with the weights of `truncate` cut."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        if entry.name in skip:
            continue
        if entry.name == truncate:
            (dest / entry.name).mkdir()
            for part in entry.iterdir():
                if part.suffix == ".safetensors":
                    _truncated(part, dest / entry.name / part.name, 0.6)
                else:
                    shutil.copy(part, dest / entry.name / part.name)
        else:
            (dest / entry.name).symlink_to(entry)
    return dest


def _header_only_copy(inputs: Inputs, case: str, component: str) -> Path:
    """The Hunyuan-DiT folder with one component's weights cut at the end of their header (shapes kept, no data),
    as `dittune estimate` accepts them."""
    model = _linked_copy(inputs.hunyuan, inputs.folder(case) / "model", truncate=component)
    for weights in (model / component).glob("*.safetensors"):
        data = (inputs.hunyuan / component / weights.name).read_bytes()
        weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    return model


def _prepared(inputs: Inputs, case: str) -> tuple[np.ndarray, list[dict]]:
    """The single prepared image of a case (pixels as training loads them) and the prepared metadata rows."""
    out = inputs.root / case / "prepared"
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 1, rows
    return np.asarray(Image.open(out / rows[0]["file_name"]).convert("RGB")).astype(int), rows


# --------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """`build` makes the input and returns the `dittune` arguments; `check` looks at what the command made."""

    name: str
    build: Callable[[Inputs, str], list[str]]
    status: int
    fragments: tuple[str, ...]
    check: Callable[[Inputs, str], None] | None = None


def _config_text(text: str) -> Callable[[Inputs, str], list[str]]:
    """A config file whose [train] section gets `text` (appended after write_config's own keys)."""

    def build(inputs: Inputs, case: str) -> list[str]:
        return inputs.check(case, extra=text)

    return build


def _raw_config(body: str) -> Callable[[Inputs, str], list[str]]:
    def build(inputs: Inputs, case: str) -> list[str]:
        path = inputs.folder(case) / "config.toml"
        path.write_text(body.format(model=inputs.hunyuan, data=inputs.data(case), out=inputs.folder(case) / "out"))
        return ["config", "check", str(path)]

    return build


def _with_data(
    make: Callable[[Path], object], command: str = "check", good: int = 1
) -> Callable[[Inputs, str], list[str]]:
    """A data folder with `good` valid images plus what `make` adds; run through `config check` or `prepare`."""

    def build(inputs: Inputs, case: str) -> list[str]:
        data = inputs.data(case, good)
        make(data)
        return inputs.check(case, data) if command == "check" else inputs.prepare(case, data)

    return build


def _symlink_loop(data: Path) -> None:
    (data / "sub").mkdir()
    (data / "sub" / "back").symlink_to(data, target_is_directory=True)


def _jsonl(data: Path, lines: list[str]) -> None:
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _check_upright(inputs: Inputs, case: str) -> None:
    pixels, _ = _prepared(inputs, case)
    height, width, _ = pixels.shape
    assert height > width, f"prepared {width}×{height}: the EXIF rotation was not applied"
    top, bottom = pixels[height // 8, width // 2], pixels[-height // 8, width // 2]
    assert np.abs(top - RED).max() < 40 and np.abs(bottom - BLUE).max() < 40, (top, bottom)
    control = np.asarray(load_image(inputs.root / case / "data" / "photo.jpg")).astype(int)  # conditioning images
    assert control.shape[:2] == (96, 64) and np.abs(control[8, 32] - RED).max() < 40


def _check_16bit(inputs: Inputs, case: str) -> None:
    pixels, _ = _prepared(inputs, case)
    assert np.all(pixels == 128), np.unique(pixels)  # 32896 / 65535 of full scale, not clipped to 255


def _check_palette(inputs: Inputs, case: str) -> None:
    pixels, _ = _prepared(inputs, case)
    assert np.all(pixels[:, :24] == 255), "transparent pixels are composited on white"
    assert np.abs(pixels[:, 40:] - RED).max() <= 2


def _check_cmyk(inputs: Inputs, case: str) -> None:
    pixels, _ = _prepared(inputs, case)
    assert np.abs(pixels.mean(axis=(0, 1)) - (255, 0, 0)).max() < 30, pixels.mean(axis=(0, 1))


def _check_tiny_image(inputs: Inputs, case: str) -> None:
    pixels, _ = _prepared(inputs, case)
    assert pixels.shape == (64, 64, 3) and np.all(pixels == BLUE)


def _check_bom(inputs: Inputs, case: str) -> None:
    _, rows = _prepared(inputs, case)
    assert rows[0]["text"] == "a red square", rows


def _palette_png(data: Path) -> None:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))
    image.save(_captioned(data, "palette.png"), transparency=0)


def _lora_with(inputs: Inputs, case: str, change: Callable[[dict, dict], None]) -> Path:
    """The Hunyuan-DiT LoRA rewritten after `change(tensors, dittune_metadata)`."""
    from safetensors import safe_open

    with safe_open(inputs.lora, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(inputs.lora)
    settings = json.loads(metadata["dittune_lora"])
    change(tensors, settings)
    metadata["dittune_lora"] = json.dumps(settings)
    path = inputs.folder(case) / "lora.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


def _narrower(tensors: dict, settings: dict) -> None:
    """Adapters for a model whose layers are one feature narrower (another size of the architecture)."""
    for key in list(tensors):
        if key.endswith("lora_A.weight"):
            tensors[key] = tensors[key][:, :-1].contiguous()


def _other_rank(tensors: dict, settings: dict) -> None:
    settings["rank"] = 8  # the tensors are rank 2


def _sample_lora(make: Callable[[Inputs, str], Path]) -> Callable[[Inputs, str], list[str]]:
    def build(inputs: Inputs, case: str) -> list[str]:
        return inputs.sample(case, None, "--lora", str(make(inputs, case)))

    return build


CASES = [
    # --- configs (`dittune config check`)
    Case("config-missing", lambda i, c: ["config", "check", str(i.root / "nope.toml")], 2, ("nope.toml",)),
    Case("config-toml-syntax", _raw_config('output_dir = "{out}"\n[model\nfamily = "x"\n'), 2, ("line 2",)),
    Case("config-unknown-key", _config_text("max_stepz = 3"), 2, ("max_stepz",)),
    Case("config-wrong-type", _config_text('learning_rate = "fast"'), 2, ("learning_rate",)),
    Case("config-bad-enum", _config_text('optimizer = "sgdd"'), 2, ("optimizer", "sgdd")),
    Case("config-out-of-range", _config_text("gradient_accumulation_steps = 0"), 2, ("gradient_accumulation_steps",)),
    Case(
        "config-no-model-path",
        _raw_config('output_dir = "{out}"\n[model]\nfamily = "hunyuan-dit"\n[data]\npath = "{data}"\n'),
        2,
        ("model.path",),
    ),
    Case(
        "config-unknown-family",
        lambda i, c: i.check(c, family="hunyuan-ditt"),
        1,
        ("unknown family 'hunyuan-ditt'", "Did you mean 'hunyuan-dit'"),
    ),
    Case("config-bad-set", lambda i, c: [*i.check(c), "--set", "train.max_steps"], 2, ("--set",)),
    Case(
        "config-output-dir-is-a-file",
        lambda i, c: [*i.check(c), *((i.folder(c) / "out").touch() or [])],
        1,
        ("output_dir", "not a folder"),
    ),
    # --- model folders
    Case("model-missing", lambda i, c: i.check(c, model=i.root / "no-model"), 1, ("no-model", "does not exist")),
    Case(
        "model-missing-component",
        lambda i, c: i.check(c, model=_linked_copy(i.hunyuan, i.folder(c) / "model", skip=("vae",))),
        1,
        ("vae",),
    ),
    Case("model-other-family", lambda i, c: i.check(c, model=i.pixart), 1, ("PixArtSigmaPipeline", "model.family")),
    Case(
        "model-truncated-weights-check",
        lambda i, c: i.check(c, model=_linked_copy(i.hunyuan, i.folder(c) / "model", truncate="transformer")),
        1,
        ("transformer/diffusion_pytorch_model.safetensors", "truncated"),
    ),
    Case(
        "model-truncated-weights-sample",
        lambda i, c: i.sample(c, _linked_copy(i.hunyuan, i.folder(c) / "model", truncate="vae")),
        2,
        ("vae/diffusion_pytorch_model.safetensors", "truncated"),
    ),
    Case(
        "model-header-only-weights",
        lambda i, c: i.sample(c, _header_only_copy(i, c, "vae")),
        2,
        ("vae/diffusion_pytorch_model.safetensors", "holds only its header"),
    ),
    Case(
        "model-header-only-text-encoder-cache",
        lambda i, c: ["cache", str(i.config(c, model=_header_only_copy(i, c, "text_encoder")))],
        1,
        ("text_encoder/model.safetensors", "holds only its header"),
    ),
    Case(
        "model-index-not-json",
        lambda i, c: i.check(c, model=_broken_index(i, c)),
        1,
        ("model_index.json",),
    ),
    # --- images (good ones must work and load as training loads them)
    Case(
        "image-exif-rotated",
        _with_data(lambda d: _exif_rotated_jpeg(_captioned(d, "photo.jpg")), "prepare", good=0),
        0,
        ("1 image",),
        _check_upright,
    ),
    Case(
        "image-16-bit-png",
        _with_data(
            lambda d: Image.fromarray(np.full((64, 64), 32896, np.uint16)).save(_captioned(d, "deep.png")),
            "prepare",
            good=0,
        ),
        0,
        ("1 image",),
        _check_16bit,
    ),
    Case("image-palette-transparency", _with_data(_palette_png, "prepare", good=0), 0, ("1 image",), _check_palette),
    Case(
        "image-cmyk-jpeg",
        _with_data(
            lambda d: Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(_captioned(d, "cmyk.jpg")), "prepare", good=0
        ),
        0,
        ("1 image",),
        _check_cmyk,
    ),
    Case(
        "image-1x1",
        _with_data(lambda d: _png(_captioned(d, "dot.png"), BLUE, (1, 1)), "prepare", good=0),
        0,
        ("1 image",),
        _check_tiny_image,
    ),
    Case(
        "image-1x1-check",
        _with_data(lambda d: _png(_captioned(d, "dot.png"), BLUE, (1, 1))),
        0,
        ("dot.png: 1×1 enlarged 64× to cover its 64×64 bucket",),
    ),
    Case(
        "image-huge-header",
        _with_data(lambda d: _huge_png(_captioned(d, "huge.png"))),
        0,
        ("huge.png", "too large to open safely"),
    ),
    Case(
        "image-truncated",
        _with_data(lambda d: _truncated(_png(d / "full.png", RED, (256, 256)), _captioned(d, "cut.png"), 0.3)),
        0,
        ("cut.png", "truncated or corrupt"),
    ),
    Case(
        "image-corrupt",
        _with_data(lambda d: _captioned(d, "noise.jpg").write_bytes(bytes(range(256)) * 4)),
        0,
        ("noise.jpg", "cannot identify image file"),
    ),
    Case(
        "image-zero-bytes",
        _with_data(lambda d: _captioned(d, "empty.png").write_bytes(b"")),
        0,
        ("empty.png", "0 bytes"),
    ),
    Case(
        "image-none-usable",
        _with_data(lambda d: _captioned(d, "noise.png").write_bytes(b"not an image"), good=0),
        1,
        ("no usable image", "noise.png"),
    ),
    Case("image-none-at-all", _with_data(lambda d: None, good=0), 1, ("no images found",)),
    Case("data-path-missing", lambda i, c: i.check(c, i.root / c / "nowhere"), 1, ("nowhere", "not a folder")),
    Case("data-symlink-loop", _with_data(_symlink_loop), 0, ("symlink loop",)),
    # --- captions
    Case(
        "caption-not-utf8",
        _with_data(lambda d: _png(_captioned(d, "latin.png", "caf\xe9".encode("latin-1")), BLUE)),
        0,
        ("latin.txt", "not UTF-8", "0xe9"),
    ),
    Case(
        "caption-bom",
        _with_data(lambda d: _png(_captioned(d, "bom.png", "\ufeffa red square".encode()), RED), "prepare", good=0),
        0,
        ("1 image",),
        _check_bom,
    ),
    Case(
        "caption-empty",
        _with_data(lambda d: _png(_captioned(d, "blank.png", ""), BLUE)),
        0,
        ("unconditioned", "blank.png"),
    ),
    Case("caption-missing", _with_data(lambda d: _png(d / "bare.png", BLUE)), 0, ("bare.png", "no caption file")),
    # --- metadata files
    Case(
        "metadata-malformed-line",
        _with_data(lambda d: _jsonl(d, ['{"file_name": "good0.png", "text": "red"}', '{"file_name": "x.png", "te'])),
        0,
        ("metadata.jsonl line 2", "invalid JSON"),
    ),
    Case(
        "metadata-missing-file",
        _with_data(
            lambda d: _jsonl(d, ['{"file_name": "good0.png", "text": "red"}', '{"file_name": "gone.png", "text": "x"}'])
        ),
        0,
        ("gone.png", "metadata.jsonl line 2", "missing"),
    ),
    Case(
        "metadata-outside-folder",
        _with_data(
            lambda d: _jsonl(d, ['{"file_name": "good0.png", "text": "red"}', '{"file_name": "../x.png", "text": "x"}'])
        ),
        0,
        ("not inside the data folder",),
    ),
    Case(
        "metadata-not-utf8",
        _with_data(lambda d: (d / "metadata.jsonl").write_bytes(b'{"file_name": "good0.png", "text": "caf\xe9"}\n')),
        1,
        ("metadata.jsonl", "not UTF-8"),
    ),
    Case(
        "metadata-csv-no-text-column",
        _with_data(lambda d: (d / "metadata.csv").write_text("file_name,caption\ngood0.png,red\n")),
        1,
        ("metadata.csv", "missing required column", "text"),
    ),
    # --- videos (`dittune prepare` reads clips with any family)
    Case(
        "video-corrupt-mp4",
        _with_data(lambda d: _captioned(d, "clip.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + bytes(500)), "prepare"),
        0,
        ("clip.mp4",),
    ),
    # --- sampling and LoRA files (`dittune sample`, which applies LoRAs through `dittune.load_lora`)
    Case(
        "sample-family-bogus", lambda i, c: i.sample(c, None, "--family", "bogus"), 2, ("unknown model family 'bogus'",)
    ),
    Case("sample-model-missing", lambda i, c: i.sample(c, i.root / "no-model"), 2, ("no-model",)),
    Case(
        "lora-missing", lambda i, c: i.sample(c, None, "--lora", str(i.root / "no.safetensors")), 2, ("no.safetensors",)
    ),
    Case("lora-other-family", _sample_lora(lambda i, c: i.pixart_lora), 2, ("pixart-sigma LoRA", "HunyuanDiTPipeline")),
    Case(
        "lora-other-shapes",
        _sample_lora(lambda i, c: _lora_with(i, c, _narrower)),
        2,
        ("lora.safetensors", "does not fit", "to_q"),
    ),
    Case(
        "lora-other-rank",
        _sample_lora(lambda i, c: _lora_with(i, c, _other_rank)),
        2,
        ("lora.safetensors", "rank 8", "rank 2"),
    ),
    Case(
        "lora-truncated",
        _sample_lora(lambda i, c: _truncated(i.lora, i.folder(c) / "cut.safetensors", 0.7)),
        2,
        ("cut.safetensors", "truncated"),
    ),
    Case(
        "lora-not-a-lora",
        _sample_lora(lambda i, c: i.hunyuan / "transformer" / "diffusion_pytorch_model.safetensors"),
        2,
        ("diffusion_pytorch_model.safetensors", "no LoRA"),
    ),
]


def _broken_index(inputs: Inputs, case: str) -> Path:
    model = _linked_copy(inputs.hunyuan, inputs.folder(case) / "model", skip=("model_index.json",))
    (model / "model_index.json").write_text('{"_class_name": "HunyuanDiTPipeline",')
    return model


@pytest.fixture(scope="module")
def inputs(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("bad-input"), tiny_models["v1.2"])


def test_the_table_has_every_kind_of_input() -> None:
    assert len(CASES) >= 38 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input(case: Case, inputs: Inputs, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DITTUNE_DEBUG", raising=False)
    argv = case.build(inputs, case.name)
    try:
        status = main(argv)
    except BaseException as error:  # an escaping exception is the traceback a user would see
        pytest.fail(f"dittune {' '.join(argv)} raised {type(error).__name__}: {error}")
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output
    assert status == case.status, output
    for fragment in case.fragments:
        assert fragment in output, f"{fragment!r} not in:\n{output}"
    if case.check is not None:
        case.check(inputs, case.name)


def test_debug_shows_the_traceback(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    """DITTUNE_DEBUG=1 lets the exception through (a traceback) for a bad LoRA that is one message without it."""
    monkeypatch.setenv("DITTUNE_DEBUG", "1")
    with pytest.raises(ValueError, match="pixart-sigma LoRA"):
        main(inputs.sample("debug", None, "--lora", str(inputs.pixart_lora)))
