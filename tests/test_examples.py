"""Every shipped example config stays valid: schema, and every check that does not need real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dittune.config import load_config
from dittune.train.preflight import preflight

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
PATH_KEYS = {"model.path", "data.path", "validation.images[0]"}
"""Examples point at placeholder folders; problems about those alone are expected."""


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"hunyuan-dit-lora.toml", "hunyuan-dit-full.toml"} <= names
    from dittune.models.registry import family_names

    for family in family_names():
        assert any(load_config(p).model.family == family for p in EXAMPLES), f"no example for {family}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    cfg = load_config(path)
    problems = preflight(cfg)
    assert {key for key, _ in problems} <= PATH_KEYS, problems


def test_examples_say_what_their_names_say() -> None:
    by_name = {p.name: p for p in EXAMPLES}
    lora = load_config(by_name["hunyuan-dit-lora.toml"])
    full = load_config(by_name["hunyuan-dit-full.toml"])
    assert lora.train.method == "lora" and (lora.lora.rank, lora.lora.alpha) == (64, 64)
    assert full.train.method == "full" and full.loss.vlb is None  # family default: VLB on for full
    for cfg in (lora, full):
        assert cfg.train.mixed_precision == "auto" and cfg.train.gradient_checkpointing
        assert (cfg.data.resolution, cfg.data.resolution_type) == (1.0, "area")
        assert set(cfg.train.caption_dropout_per_encoder) == {"clip", "t5"}
        assert any(any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in cfg.validation.prompts)


LAUNCHES = sorted((Path(__file__).resolve().parents[1] / "examples" / "accelerate").glob("*.yaml"))


def test_every_accelerate_launch_is_shipped_and_parses() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    found = {p.stem: load_config_from_file(str(p)) for p in LAUNCHES}
    expected = {
        "ddp",
        "fsdp2",
        "deepspeed_zero2",
        "deepspeed_zero2_offload",
        "deepspeed_zero3",
        "deepspeed_zero3_offload",
    }
    assert set(found) == expected
    assert str(found["ddp"].distributed_type).endswith("MULTI_GPU")
    assert found["fsdp2"].fsdp_config["fsdp_version"] == 2  # dittune shards with FSDP2 only
    for name in expected - {"ddp", "fsdp2"}:
        deepspeed = found[name].deepspeed_config
        assert deepspeed["zero_stage"] == int(name[len("deepspeed_zero")])
        assert (deepspeed["offload_optimizer_device"] == "cpu") == name.endswith("_offload")
